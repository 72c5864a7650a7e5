"""The CUDA driver and NVML, set up in one place.

Everything that talks to the GPU below the connector goes through here: the
allocator's VMM backend (``allocator/cuda.py``), the discovery of foreign CUDA
memory (``memory/cuda.py``), and the question the transfer path turns on,
whether a peer's READ of this GPU's memory is fast (:func:`active_nvlinks`,
:func:`cuda_ipc_read_available`).

NVIDIA's ``cuda-bindings`` and ``libnvidia-ml`` are loaded only when a
function needs them, so this module imports on machines without a GPU;
there :func:`initialised_driver` raises ``KVMemoryError("no CUDA device:
...")`` and the NVML probes answer None.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from elastic_nixl.capabilities import KVMemoryError

# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------


class CudaDriverError(KVMemoryError):
    """A CUDA driver call failed; ``call`` and ``error_name`` say which and why."""

    def __init__(self, call: str, code: int, error_name: str, hint: str = "") -> None:
        self.call = call
        self.code = code
        self.error_name = error_name
        super().__init__(f"{call} failed: {error_name} ({code}){hint}")


def load_driver() -> ModuleType:
    """NVIDIA's driver bindings (``cuda.bindings.driver``; older ``cuda.cuda``),
    not yet initialised.

    Raises:
        KVMemoryError: neither package is installed.
    """
    try:
        from cuda.bindings import driver

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as legacy_driver  # cuda-python < 12.6

        return legacy_driver
    except ImportError as exc:
        raise KVMemoryError(
            "CUDA memory needs NVIDIA's cuda-bindings package "
            f"(pip install cuda-bindings): {exc}"
        ) from exc


def result_name(err: Any) -> str:
    """``CUDA_ERROR_OUT_OF_MEMORY`` for a CUresult (or its int value)."""
    name = getattr(err, "name", None)
    if isinstance(name, str):
        return name
    try:
        from cuda.bindings import driver

        return str(driver.CUresult(int(err)).name)
    except Exception:
        return f"CUresult {int(err)}"


_HINTS = {
    "CUDA_ERROR_OUT_OF_MEMORY": ": the GPU has no memory left for another chunk",
    "CUDA_ERROR_NOT_SUPPORTED": ": the device or driver does not support this "
    "allocation property (handle type, gpuDirectRDMACapable)",
    "CUDA_ERROR_NO_DEVICE": ": no CUDA device is visible",
    "CUDA_ERROR_NOT_PERMITTED": ": for fabric handles this process needs IMEX "
    "channel access (nvidia-imex running, /dev/nvidia-caps-imex-channels)",
}


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-bindings return ``(err, *values)``; raise on error.

    Args:
        result: what the binding returned.
        call: the call as the error message should name it.

    Returns:
        ``None``, the single value, or a tuple of values.

    Raises:
        CudaDriverError: the CUresult is not ``CUDA_SUCCESS``.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    code = int(err)
    if code != 0:
        name = result_name(err)
        raise CudaDriverError(call, code, name, _HINTS.get(name, ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def initialised_driver() -> tuple[ModuleType, int]:
    """The driver after ``cuInit(0)``, and how many devices it sees.

    ``cuInit`` is idempotent and cheap after the first call; calling it here,
    before every use, keeps each caller correct in a process that forked.

    Returns:
        ``(driver module, visible device count)``, the count at least one.

    Raises:
        KVMemoryError: ``"no CUDA device: ..."`` when the bindings or the
            driver library are missing, ``cuInit`` fails, or no device is
            visible.
    """
    try:
        drv = load_driver()
    except KVMemoryError as exc:
        raise KVMemoryError(f"no CUDA device: {exc}") from exc
    try:
        result = drv.cuInit(0)
    except Exception as exc:  # driver library missing: DynamicLibNotFoundError
        raise KVMemoryError(
            f"no CUDA device: the CUDA driver library could not be loaded ({exc})"
        ) from exc
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise KVMemoryError(
            f"no CUDA device: cuInit(0) failed with {result_name(err)} ({int(err)})"
        )
    count = int(check(drv.cuDeviceGetCount(), "cuDeviceGetCount()"))
    if count == 0:
        raise KVMemoryError("no CUDA device: cuDeviceGetCount() returned 0")
    return drv, count


def device_handle(drv: ModuleType, count: int, ordinal: int) -> Any:
    """``CUdevice`` of ``ordinal``, checked against the ``count`` visible.

    Raises:
        KVMemoryError: no such device.
    """
    if isinstance(ordinal, bool) or not 0 <= ordinal < count:
        raise KVMemoryError(f"CUDA device {ordinal} does not exist ({count} visible)")
    return check(drv.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")


def as_int(value: Any) -> int:
    """``int`` of a driver value (``CUdeviceptr``, ``CUmemoryPool``, int, bool)."""
    if value is None:
        return 0
    return int(value)


@contextlib.contextmanager
def device_context(device: int | None) -> Iterator[ModuleType]:
    """The initialised driver with a context current on this thread.

    Args:
        device: an ordinal makes that device's primary context current for
            the calls inside; ``None`` uses the context already current
            (torch's, once it touched CUDA), else device 0's primary context.

    Yields:
        The driver module. A primary context is retained for the calls and
        released after them, so one that did not exist before does not
        outlive the calls.
    """
    drv, count = initialised_driver()
    if device is None:
        current = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if as_int(current) != 0:
            yield drv
            return
        device = 0
    dev = device_handle(drv, count, device)
    ctx = check(
        drv.cuDevicePrimaryCtxRetain(dev), f"cuDevicePrimaryCtxRetain({device})"
    )
    try:
        check(drv.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
        try:
            yield drv
        finally:
            check(drv.cuCtxPopCurrent(), "cuCtxPopCurrent")
    finally:
        check(drv.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")


# --------------------------------------------------------------------------
# NVML: can a peer READ this device's memory fast?
# --------------------------------------------------------------------------

_NVML_SUCCESS = 0
_NVML_MAX_LINKS = 18


def _nvml() -> ctypes.CDLL | None:
    """``libnvidia-ml`` after ``nvmlInit_v2``, or None where it cannot load."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != _NVML_SUCCESS:
        return None
    return lib


def active_nvlinks(device: int) -> int | None:
    """Active NVLink links of a CUDA device, by NVML.

    Args:
        device: the CUDA ordinal (NVML is asked by its PCI bus id, so
            ``CUDA_VISIBLE_DEVICES`` renumbering is respected).

    Returns:
        The number of links up, or None when it cannot be told (no NVML or
        CUDA driver, or the device is not found).
    """
    lib = _nvml()
    if lib is None:
        return None
    try:
        # No context needed: the PCI bus id is a device property.
        drv, count = initialised_driver()
        dev = device_handle(drv, count, device)
        bus = check(drv.cuDeviceGetPCIBusId(32, dev), "cuDeviceGetPCIBusId")
        bus_id = bus if isinstance(bus, bytes) else str(bus).encode()
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByPciBusId_v2(
            ctypes.c_char_p(bus_id.split(b"\0")[0]), ctypes.byref(handle)
        ):
            return None
        active = 0
        for link in range(_NVML_MAX_LINKS):
            state = ctypes.c_uint(0)
            rc = lib.nvmlDeviceGetNvLinkState(handle, link, ctypes.byref(state))
            if rc == _NVML_SUCCESS and state.value:
                active += 1
        return active
    except KVMemoryError:
        return None
    finally:
        lib.nvmlShutdown()


def cuda_ipc_read_available(device: int) -> bool | None:
    """Whether UCX's cuda_ipc lane serves a peer's READ of this device's memory.

    UCX turns it off ("cuda-ipc get zcopy disabled as no nvlinks detected")
    on a GPU with no active NVLink; this makes the same test with NVML.

    Args:
        device: the CUDA ordinal.

    Returns:
        True with an active NVLink, False without, None when it cannot be
        told.
    """
    links = active_nvlinks(device)
    return None if links is None else links > 0


__all__ = [
    "CudaDriverError",
    "active_nvlinks",
    "as_int",
    "check",
    "cuda_ipc_read_available",
    "device_context",
    "device_handle",
    "initialised_driver",
    "load_driver",
    "result_name",
]
