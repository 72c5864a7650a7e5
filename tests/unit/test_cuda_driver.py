"""The one module that sets up the CUDA driver and asks NVML about NVLink
(no GPU needed: a fake driver and a fake NVML library)."""

from __future__ import annotations

import ast
import ctypes
from pathlib import Path
from typing import Any

import pytest

import elastic_nixl
from elastic_nixl import cuda_driver
from elastic_nixl.allocator import cuda as allocator_cuda
from elastic_nixl.capabilities import KVMemoryError
from elastic_nixl.memory import cuda as memory_cuda

SRC = Path(elastic_nixl.__file__).parent
drv = cuda_driver.load_driver()
R = drv.CUresult


def calls_to(path: Path, attribute: str) -> list[int]:
    """Lines of ``path`` that call ``<anything>.<attribute>(...)``."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
    ]


@pytest.mark.parametrize(
    "attribute", ["cuInit", "cuDeviceGetCount", "nvmlInit_v2", "nvmlShutdown"]
)
def test_driver_and_nvml_are_set_up_only_in_the_ground_module(attribute: str):
    elsewhere = {
        str(p.relative_to(SRC)): lines
        for p in SRC.rglob("*.py")
        if p.name != "cuda_driver.py" and (lines := calls_to(p, attribute))
    }
    assert not elsewhere, f"{attribute} called outside cuda_driver.py: {elsewhere}"


def test_names_stay_importable_where_callers_find_them():
    # connector/worker.py and tools/doctor.py import these from memory.cuda;
    # allocator/__init__ and the tests from allocator.cuda.
    assert memory_cuda.cuda_ipc_read_available is cuda_driver.cuda_ipc_read_available
    assert memory_cuda.active_nvlinks is cuda_driver.active_nvlinks
    assert memory_cuda.CudaDriverError is cuda_driver.CudaDriverError
    assert allocator_cuda.CudaDriverError is cuda_driver.CudaDriverError
    assert allocator_cuda.check is cuda_driver.check
    assert allocator_cuda.load_driver is cuda_driver.load_driver


class Driver:
    """Enough of the driver for ``initialised_driver`` and the PCI bus id."""

    def __init__(self, devices: int = 1, init: Any = None) -> None:
        self.devices = devices
        self.init = R.CUDA_SUCCESS if init is None else init
        self.inits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(drv, name)

    def cuInit(self, flags: int) -> tuple[Any]:  # noqa: N802
        self.inits += 1
        return (self.init,)

    def cuDeviceGetCount(self) -> tuple[Any, int]:  # noqa: N802
        return (R.CUDA_SUCCESS, self.devices)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, int]:  # noqa: N802
        return (R.CUDA_SUCCESS, ordinal)

    def cuDeviceGetPCIBusId(self, length: int, dev: int) -> tuple[Any, bytes]:  # noqa: N802
        return (R.CUDA_SUCCESS, f"0000:{dev:02x}:00.0".encode() + b"\0" * 8)


class Nvml:
    """libnvidia-ml's four calls the probe makes; ``links`` per bus id."""

    def __init__(self, links: dict[bytes, list[int]]) -> None:
        self.links = links
        self.shutdowns = 0
        self._handles: list[bytes] = []

    def nvmlInit_v2(self) -> int:  # noqa: N802
        return 0

    def nvmlShutdown(self) -> int:  # noqa: N802
        self.shutdowns += 1
        return 0

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus: Any, handle: Any) -> int:  # noqa: N802
        if bus.value not in self.links:
            return 6  # NVML_ERROR_NOT_FOUND
        self._handles.append(bus.value)
        handle._obj.value = len(self._handles)
        return 0

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int, state: Any) -> int:  # noqa: N802
        states = self.links[self._handles[handle.value - 1]]
        if link >= len(states):
            return 3  # NVML_ERROR_NOT_SUPPORTED: no such link
        state._obj.value = states[link]
        return 0


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Driver:
    fake = Driver(devices=2)
    monkeypatch.setattr(cuda_driver, "load_driver", lambda: fake)
    return fake


def use_nvml(monkeypatch: pytest.MonkeyPatch, nvml: Nvml | None) -> None:
    def load(name: str) -> Any:
        if nvml is None:
            raise OSError(f"{name}: cannot open shared object file")
        return nvml

    monkeypatch.setattr(ctypes, "CDLL", load)


def test_active_nvlinks_counts_the_links_up_by_pci_bus_id(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
):
    nvml = Nvml({b"0000:00:00.0": [1, 0, 1, 1], b"0000:01:00.0": [0, 0]})
    use_nvml(monkeypatch, nvml)
    assert cuda_driver.active_nvlinks(0) == 3
    assert cuda_driver.cuda_ipc_read_available(0) is True
    assert cuda_driver.active_nvlinks(1) == 0
    assert cuda_driver.cuda_ipc_read_available(1) is False
    assert nvml.shutdowns == 4  # every probe shuts NVML down again


def test_nvlinks_unknown_without_nvml_or_device(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
):
    use_nvml(monkeypatch, None)
    assert cuda_driver.active_nvlinks(0) is None
    assert cuda_driver.cuda_ipc_read_available(0) is None
    use_nvml(monkeypatch, Nvml({}))  # NVML does not know the device
    assert cuda_driver.active_nvlinks(0) is None
    use_nvml(monkeypatch, Nvml({b"0000:05:00.0": [1]}))
    assert cuda_driver.active_nvlinks(5) is None  # only 2 CUDA devices
    driver.init = R.CUDA_ERROR_NO_DEVICE
    assert cuda_driver.cuda_ipc_read_available(0) is None


def test_initialised_driver_errors_say_no_cuda_device(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
):
    assert cuda_driver.initialised_driver() == (driver, 2)
    with pytest.raises(KVMemoryError, match=r"CUDA device 2 does not exist \(2 vis"):
        cuda_driver.device_handle(driver, 2, 2)
    driver.devices = 0
    with pytest.raises(KVMemoryError, match=r"^no CUDA device: cuDeviceGetCount"):
        cuda_driver.initialised_driver()

    def missing() -> Any:
        raise KVMemoryError("CUDA memory needs NVIDIA's cuda-bindings package")

    monkeypatch.setattr(cuda_driver, "load_driver", missing)
    with pytest.raises(KVMemoryError, match="^no CUDA device: CUDA memory needs"):
        cuda_driver.initialised_driver()
