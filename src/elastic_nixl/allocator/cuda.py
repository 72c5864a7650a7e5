"""CUDA VMM backend: ``cuMemAddressReserve`` + ``cuMemCreate`` per chunk.

Each chunk is its own physical allocation (so it can be released on its
own), created with an exportable handle type (POSIX fd by default, fabric on
request) and, where the device supports it, ``gpuDirectRDMACapable`` so a
NIC can register it. VMM memory is never legacy-CUDA-IPC capable
(``cuIpcGetMemHandle`` refuses it), so that export kind is never claimed.

NVIDIA's ``cuda-bindings`` is imported, and the driver initialised (by
:func:`elastic_nixl.cuda_driver.initialised_driver`), only when a backend is
constructed: this module imports on machines without a GPU.
Every driver call is checked; failures raise ``CudaDriverError`` (a
``KVMemoryError``) naming the call and the ``CUresult``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from elastic_nixl.allocator.backend import MemoryBackend
from elastic_nixl.allocator.dlpack import DL_CUDA, dlpack_tensor
from elastic_nixl.capabilities import ExportKind, KVMemoryError, MemoryKind

# The driver's set-up and error translation live in the ground module; these
# names stay importable from here, where callers have always found them.
from elastic_nixl.cuda_driver import (
    CudaDriverError,
    check,
    device_handle,
    initialised_driver,
    load_driver,
    result_name,
)

if TYPE_CHECKING:
    import torch

# ExportKind -> CUmemAllocationHandleType member name.
HANDLE_TYPES: dict[ExportKind, str] = {
    ExportKind.POSIX_FD: "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR",
    ExportKind.FABRIC: "CU_MEM_HANDLE_TYPE_FABRIC",
    ExportKind.NONE: "CU_MEM_HANDLE_TYPE_NONE",
}
# Device attribute saying the handle type is supported.
_HANDLE_ATTRS: dict[ExportKind, str] = {
    ExportKind.POSIX_FD: (
        "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"
    ),
    ExportKind.FABRIC: "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED",
}


def build_allocation_prop(
    driver: ModuleType, device: int, handle_type: ExportKind, gpu_direct_rdma: bool
) -> Any:
    """``CUmemAllocationProp`` for pinned device memory on ``device``."""
    if handle_type not in HANDLE_TYPES:
        raise ValueError(
            f"handle_type {handle_type.value} is not a VMM handle type; choose one of "
            f"{sorted(k.value for k in HANDLE_TYPES)}"
        )
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    prop.requestedHandleTypes = getattr(
        driver.CUmemAllocationHandleType, HANDLE_TYPES[handle_type]
    )
    prop.allocFlags.gpuDirectRDMACapable = 1 if gpu_direct_rdma else 0
    return prop


def build_access_desc(
    driver: ModuleType, device: int, *, read_only: bool = False
) -> Any:
    """``CUmemAccessDesc`` granting ``device`` read/write (or read only)."""
    desc = driver.CUmemAccessDesc()
    desc.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    flags = driver.CUmemAccess_flags
    desc.flags = (
        flags.CU_MEM_ACCESS_FLAGS_PROT_READ
        if read_only
        else flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    )
    return desc


class CudaBackend(MemoryBackend):
    """Device memory through the CUDA VMM driver API, one handle per chunk.

    ``gpu_direct_rdma``: ``None`` sets ``gpuDirectRDMACapable`` where the
    device reports VMM GPUDirect RDMA support; ``True`` requires it; ``False``
    never sets it. ``synchronize_before_unmap`` runs ``cuCtxSynchronize``
    before a batch of unmaps so no in-flight kernel reads freed memory.

    An unmapped chunk is *retired* (see ``MemoryBackend``): its own memory is
    released, and one shared zero chunk is mapped read-only in its place, so a
    late read of it sees zeros and a write faults.
    """

    def __init__(
        self,
        device: int = 0,
        *,
        handle_type: ExportKind = ExportKind.POSIX_FD,
        gpu_direct_rdma: bool | None = None,
        synchronize_before_unmap: bool = True,
    ) -> None:
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(
                f"device must be a CUDA device ordinal >= 0, got {device!r}"
            )
        if handle_type not in HANDLE_TYPES:
            raise ValueError(
                f"handle_type {handle_type.value} cannot be requested from "
                f"cuMemCreate; "
                f"choose one of {sorted(k.value for k in HANDLE_TYPES)}"
            )
        drv, visible = initialised_driver()
        self._drv = drv
        self._ordinal = device
        self._handle_type = handle_type
        self._sync = synchronize_before_unmap
        self._handles: dict[int, tuple[Any, int]] = {}
        # Retired ranges (offset -> nbytes), all mapped to one zero chunk.
        self._retired: dict[int, int] = {}
        self._zero: tuple[Any, int] | None = None
        self._base = 0
        self._nbytes = 0
        self._dev = device_handle(drv, visible, device)
        self._ctx: Any = check(
            drv.cuDevicePrimaryCtxRetain(self._dev),
            f"cuDevicePrimaryCtxRetain({device})",
        )
        try:
            self._configure(gpu_direct_rdma)
        except BaseException:
            self._release_context()
            raise

    def _attr(self, name: str) -> int:
        attr = getattr(self._drv.CUdevice_attribute, name)
        return int(
            check(
                self._drv.cuDeviceGetAttribute(attr, self._dev),
                f"cuDeviceGetAttribute({name})",
            )
        )

    def _configure(self, gpu_direct_rdma: bool | None) -> None:
        drv = self._drv
        if not self._attr("CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"):
            raise KVMemoryError(
                f"CUDA device {self._ordinal} does not support virtual memory "
                "management"
            )
        attr = _HANDLE_ATTRS.get(self._handle_type)
        if attr is not None and not self._attr(attr):
            raise KVMemoryError(
                f"CUDA device {self._ordinal} does not support handle_type "
                f"{self._handle_type.value} ({attr} is 0)"
            )
        rdma_ok = bool(
            self._attr("CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED")
        )
        if gpu_direct_rdma and not rdma_ok:
            raise KVMemoryError(
                f"gpu_direct_rdma=True but CUDA device {self._ordinal} does not "
                "support GPUDirect RDMA on VMM memory"
            )
        self._rdma = rdma_ok if gpu_direct_rdma is None else bool(gpu_direct_rdma)
        self._prop = build_allocation_prop(
            drv, self._ordinal, self._handle_type, self._rdma
        )
        self._access = build_access_desc(drv, self._ordinal)
        self._read_only = build_access_desc(drv, self._ordinal, read_only=True)
        with self._current():
            self._granularity = int(
                check(
                    drv.cuMemGetAllocationGranularity(
                        self._prop,
                        drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                    ),
                    "cuMemGetAllocationGranularity(RECOMMENDED)",
                )
            )

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Make the device's primary context current for the calls inside."""
        check(self._drv.cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            check(self._drv.cuCtxPopCurrent(), "cuCtxPopCurrent")

    def _release_context(self) -> None:
        if self._ctx is not None:
            self._ctx = None
            check(
                self._drv.cuDevicePrimaryCtxRelease(self._dev),
                "cuDevicePrimaryCtxRelease",
            )

    # ---------------------------------------------------------- properties

    @property
    def granularity(self) -> int:
        return self._granularity

    @property
    def memory_kind(self) -> MemoryKind:
        return MemoryKind.CUDA

    @property
    def device(self) -> int:
        return self._ordinal

    @property
    def export_kinds(self) -> frozenset[ExportKind]:
        return frozenset({self._handle_type})

    @property
    def gpu_direct_rdma(self) -> bool:
        """Whether chunks are created ``gpuDirectRDMACapable``."""
        return self._rdma

    @property
    def handle_type(self) -> ExportKind:
        return self._handle_type

    # ---------------------------------------------------------- operations

    def reserve(self, nbytes: int) -> int:
        if self._base:
            raise KVMemoryError("CudaBackend: already holds a reservation")
        if nbytes <= 0 or nbytes % self._granularity:
            raise KVMemoryError(
                f"CudaBackend: reservation size {nbytes} is not a positive multiple "
                f"of the granularity {self._granularity}"
            )
        with self._current():
            ptr = check(
                self._drv.cuMemAddressReserve(nbytes, self._granularity, 0, 0),
                f"cuMemAddressReserve({nbytes})",
            )
        self._base = int(ptr)
        self._nbytes = nbytes
        return self._base

    def map(self, offset: int, nbytes: int) -> None:
        if not self._base or offset < 0 or offset + nbytes > self._nbytes:
            raise KVMemoryError(
                f"CudaBackend: range [{offset}, +{nbytes}) is outside the reservation"
            )
        if offset in self._handles:
            raise KVMemoryError(f"CudaBackend: offset {offset} is already mapped")
        drv = self._drv
        addr = self._base + offset
        with self._current():
            if offset in self._retired:
                check(
                    drv.cuMemUnmap(addr, self._retired.pop(offset)),
                    f"cuMemUnmap(0x{addr:x}) of a retired range",
                )
            handle = check(
                drv.cuMemCreate(nbytes, self._prop, 0), f"cuMemCreate({nbytes})"
            )
            try:
                check(
                    drv.cuMemMap(addr, nbytes, 0, handle, 0),
                    f"cuMemMap(0x{addr:x}, {nbytes})",
                )
                try:
                    check(
                        drv.cuMemSetAccess(addr, nbytes, [self._access], 1),
                        f"cuMemSetAccess(0x{addr:x}, {nbytes}, READWRITE)",
                    )
                except BaseException:
                    drv.cuMemUnmap(addr, nbytes)
                    raise
            except BaseException:
                drv.cuMemRelease(handle)
                raise
        self._handles[offset] = (handle, nbytes)

    def quiesce(self) -> None:
        if self._sync and self._ctx is not None:
            with self._current():
                check(self._drv.cuCtxSynchronize(), "cuCtxSynchronize")

    def unmap(self, offset: int, nbytes: int) -> None:
        entry = self._handles.get(offset)
        if entry is None or entry[1] != nbytes:
            raise KVMemoryError(
                f"CudaBackend: [{offset}, +{nbytes}) was not mapped as one chunk"
            )
        addr = self._base + offset
        with self._current():
            check(
                self._drv.cuMemUnmap(addr, nbytes), f"cuMemUnmap(0x{addr:x}, {nbytes})"
            )
            del self._handles[offset]
            check(self._drv.cuMemRelease(entry[0]), f"cuMemRelease(offset {offset})")
            self._retire(addr, nbytes)
            self._retired[offset] = nbytes

    def _retire(self, addr: int, nbytes: int) -> None:
        """Map the shared zero chunk read-only over ``[addr, +nbytes)``; the
        first time, create it and fill it with zeros through this mapping."""
        drv = self._drv
        fill = self._zero is None
        if self._zero is None:
            handle = check(
                drv.cuMemCreate(nbytes, self._prop, 0), f"cuMemCreate({nbytes}) zero"
            )
            self._zero = (handle, nbytes)
        handle, size = self._zero
        if size != nbytes:
            raise KVMemoryError(
                f"CudaBackend: retiring {nbytes} bytes with a {size}-byte zero chunk"
            )
        check(
            drv.cuMemMap(addr, nbytes, 0, handle, 0),
            f"cuMemMap(0x{addr:x}, {nbytes}) zero",
        )
        if fill:
            check(
                drv.cuMemSetAccess(addr, nbytes, [self._access], 1),
                f"cuMemSetAccess(0x{addr:x}) zero fill",
            )
            check(drv.cuMemsetD8(addr, 0, nbytes), f"cuMemsetD8(0x{addr:x}, 0)")
            check(drv.cuCtxSynchronize(), "cuCtxSynchronize after zero fill")
        check(
            drv.cuMemSetAccess(addr, nbytes, [self._read_only], 1),
            f"cuMemSetAccess(0x{addr:x}, {nbytes}, READ)",
        )

    def free(self) -> None:
        if self._ctx is None:
            return
        errors: list[Exception] = []
        if self._handles:
            with contextlib.suppress(Exception):
                self.quiesce()
        for offset, (handle, nbytes) in sorted(self._handles.items()):
            try:
                with self._current():
                    addr = self._base + offset
                    check(self._drv.cuMemUnmap(addr, nbytes), f"cuMemUnmap(0x{addr:x})")
                    check(self._drv.cuMemRelease(handle), "cuMemRelease")
            except Exception as exc:
                errors.append(exc)
        self._handles.clear()
        for offset, nbytes in sorted(self._retired.items()):
            try:
                with self._current():
                    addr = self._base + offset
                    check(self._drv.cuMemUnmap(addr, nbytes), f"cuMemUnmap(0x{addr:x})")
            except Exception as exc:
                errors.append(exc)
        self._retired.clear()
        if self._zero is not None:
            try:
                with self._current():
                    check(self._drv.cuMemRelease(self._zero[0]), "cuMemRelease zero")
            except Exception as exc:
                errors.append(exc)
            self._zero = None
        if self._base:
            try:
                with self._current():
                    check(
                        self._drv.cuMemAddressFree(self._base, self._nbytes),
                        f"cuMemAddressFree(0x{self._base:x}, {self._nbytes})",
                    )
            except Exception as exc:
                errors.append(exc)
            self._base = 0
            self._nbytes = 0
        try:
            self._release_context()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def tensor(self, nbytes: int, keepalive: object = None) -> torch.Tensor:
        if not self._base or not 0 < nbytes <= self._nbytes:
            raise KVMemoryError(
                f"CudaBackend: cannot view {nbytes} bytes of a {self._nbytes}-byte "
                "reservation"
            )
        return dlpack_tensor(self._base, nbytes, DL_CUDA, self._ordinal, keepalive)

    def __repr__(self) -> str:
        return (
            f"CudaBackend(device={self._ordinal}, "
            f"handle_type={self._handle_type.value}, "
            f"rdma={getattr(self, '_rdma', None)}, base=0x{self._base:x}, "
            f"chunks={len(self._handles)})"
        )


__all__ = [
    "HANDLE_TYPES",
    "CudaBackend",
    "CudaDriverError",
    "build_access_desc",
    "build_allocation_prop",
    "check",
    "load_driver",
    "result_name",
]
