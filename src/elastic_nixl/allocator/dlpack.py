"""A minimal DLPack producer: a torch tensor over a raw address, unread.

``dlpack.h``'s unversioned ``dltensor`` capsule lets torch wrap an address
without reading it, with the device named explicitly rather than looked up
from the pointer (torch's ``__cuda_array_interface__`` path asks the driver
about the pointer), and gives host and CUDA memory one code path that the CPU
tests exercise. Torch is imported only when a tensor is made.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint8),
        ("bits", ctypes.c_uint8),
        ("lanes", ctypes.c_uint16),
    ]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DLDeleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DLDeleter),
]

DL_CPU = 1
DL_CUDA = 2
_DL_INT = 0
_DL_KEEPALIVE: dict[int, tuple[object, ...]] = {}
_DL_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _dl_delete(managed: Any, _pop: Callable[..., object] = _DL_KEEPALIVE.pop) -> None:
    # Called by torch when the last view of the storage dies: drop our refs.
    _pop(ctypes.addressof(managed.contents), None)


_DL_DELETER = _DLDeleter(_dl_delete)


def dlpack_tensor(
    address: int, nbytes: int, device_type: int, device_id: int, keepalive: object
) -> torch.Tensor:
    """A flat int8 torch tensor over ``[address, address + nbytes)``; no copy,
    no read. ``keepalive`` lives as long as the tensor's storage does."""
    import torch.utils.dlpack

    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _DLDevice(device_type, device_id)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_DL_INT, 8, 1)
    managed.dl_tensor.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _DL_DELETER
    key = ctypes.addressof(managed)
    _DL_KEEPALIVE[key] = (managed, shape, keepalive)
    try:
        capsule = _PyCapsule_New(
            key, ctypes.cast(_DL_CAPSULE_NAME, ctypes.c_char_p), None
        )
        return torch.utils.dlpack.from_dlpack(capsule)
    except BaseException:
        _DL_KEEPALIVE.pop(key, None)
        raise
