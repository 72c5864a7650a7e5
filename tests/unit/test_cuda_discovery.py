"""Discovery of foreign CUDA memory: against a fake driver without a GPU, and
against the real driver where a GPU is present."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from elastic_nixl import cuda_driver
from elastic_nixl.allocator.cuda import CudaDriverError, load_driver
from elastic_nixl.capabilities import (
    ExportKind,
    KVMemory,
    KVMemoryError,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)
from elastic_nixl.config import TransferPath
from elastic_nixl.connector.planning import choose_transfer_path
from elastic_nixl.memory import cuda as disc
from elastic_nixl.memory.cuda import (
    CudaPointerInfo,
    DiscoveredCudaMemory,
    describe_cuda_pointer,
    discover_cuda_extents,
    export_kinds_of,
)

drv = load_driver()
R = drv.CUresult
MiB = 1 << 20
TiB = 1 << 40
RES = 1 << 40  # base of the fake reservation
POSIX = disc.HANDLE_TYPE_POSIX_FD
FABRIC = disc.HANDLE_TYPE_FABRIC


# ------------------------------------------------------------- the fake driver


@dataclass
class Alloc:
    base: int
    size: int
    vmm: bool = True
    legacy: bool = False
    handle_types: int = POSIX
    rdma: bool = True
    device: int = 0
    host: bool = False
    range_base: int = 0  # CU_POINTER_ATTRIBUTE_RANGE_START_ADDR; 0: the alloc
    range_size: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size


class FakeDriver:
    """Just enough of cuda.bindings.driver for discovery, with its conventions:
    every call returns ``(CUresult, *values)``, enums and structs are real."""

    def __init__(
        self,
        allocs: list[Alloc],
        *,
        unmapped_error: bool = False,
        devices: int = 1,
        current_ctx: int = 0,
    ) -> None:
        self.allocs = allocs
        self.unmapped_error = unmapped_error  # batch query refuses unmapped
        self.batch_error = False  # batch query refuses everything
        self.devices = devices
        self.current_ctx = current_ctx
        self.calls: list[str] = []
        self.probes: list[int] = []  # cuMemGetAddressRange addresses
        self.fail: dict[str, Any] = {}
        self.ctx_stack: list[Any] = []
        self.retained: dict[int, int] = {}
        self.live_handles = 0
        self.granularity_flags: list[Any] = []
        self.init_error: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(drv, name)

    def _ret(self, name: str, *values: Any) -> tuple[Any, ...]:
        self.calls.append(name)
        err = self.fail.get(name)
        if err is not None:
            return (err, *([None] * len(values)))
        return (R.CUDA_SUCCESS, *values)

    def find(self, addr: int) -> Alloc | None:
        return next((a for a in self.allocs if a.base <= addr < a.end), None)

    def cuInit(self, flags: int) -> tuple[Any, ...]:  # noqa: N802
        if self.init_error is not None:
            raise self.init_error
        return self._ret("cuInit")

    def cuDeviceGetCount(self) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDeviceGetCount", self.devices)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDeviceGet", ordinal)

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Any, ...]:  # noqa: N802
        self.retained[dev] = self.retained.get(dev, 0) + 1
        return self._ret("cuDevicePrimaryCtxRetain", drv.CUcontext(1000 + dev))

    def cuDevicePrimaryCtxRelease(self, dev: int) -> tuple[Any, ...]:  # noqa: N802
        self.retained[dev] -= 1
        return self._ret("cuDevicePrimaryCtxRelease")

    def cuCtxGetCurrent(self) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuCtxGetCurrent", drv.CUcontext(self.current_ctx))

    def cuCtxPushCurrent(self, ctx: Any) -> tuple[Any, ...]:  # noqa: N802
        self.ctx_stack.append(ctx)
        return self._ret("cuCtxPushCurrent")

    def cuCtxPopCurrent(self) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuCtxPopCurrent", self.ctx_stack.pop())

    def cuMemGetAllocationGranularity(self, prop: Any, flag: Any) -> tuple[Any, ...]:  # noqa: N802
        self.granularity_flags.append(flag)
        return self._ret("cuMemGetAllocationGranularity", 2 * MiB)

    def cuMemGetAddressRange(self, ptr: int) -> tuple[Any, ...]:  # noqa: N802
        self.probes.append(int(ptr))
        a = self.find(int(ptr))
        if a is None:
            self.calls.append("cuMemGetAddressRange")
            return (R.CUDA_ERROR_NOT_FOUND, None, None)
        return self._ret("cuMemGetAddressRange", drv.CUdeviceptr(a.base), a.size)

    def cuMemRetainAllocationHandle(self, ptr: int) -> tuple[Any, ...]:  # noqa: N802
        a = self.find(int(ptr))
        if a is None or not a.vmm:
            self.calls.append("cuMemRetainAllocationHandle")
            return (R.CUDA_ERROR_INVALID_VALUE, None)
        self.live_handles += 1
        return self._ret(
            "cuMemRetainAllocationHandle", drv.CUmemGenericAllocationHandle(7)
        )

    def cuMemRelease(self, handle: Any) -> tuple[Any, ...]:  # noqa: N802
        self.live_handles -= 1
        return self._ret("cuMemRelease")

    def _value(self, a: Alloc | None, name: str) -> Any:
        if a is None:  # what the driver fills in for an unknown address
            return {
                "CU_POINTER_ATTRIBUTE_RANGE_START_ADDR": drv.CUdeviceptr(0),
                "CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE": drv.CUmemoryPool(),
                "CU_POINTER_ATTRIBUTE_MAPPED": False,
                "CU_POINTER_ATTRIBUTE_IS_MANAGED": False,
                "CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE": False,
            }.get(name, 0)
        return {
            "CU_POINTER_ATTRIBUTE_MEMORY_TYPE": 1 if a.host else 2,
            "CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL": a.device,
            "CU_POINTER_ATTRIBUTE_MAPPED": True,
            "CU_POINTER_ATTRIBUTE_IS_MANAGED": False,
            "CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE": a.legacy,
            "CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES": a.handle_types,
            "CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE": int(a.rdma),
            "CU_POINTER_ATTRIBUTE_RANGE_START_ADDR": drv.CUdeviceptr(
                a.range_base or a.base
            ),
            "CU_POINTER_ATTRIBUTE_RANGE_SIZE": a.range_size or a.size,
            "CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE": drv.CUmemoryPool(),
        }[name]

    def cuPointerGetAttributes(  # noqa: N802
        self, n: int, attrs: list[Any], ptr: int
    ) -> tuple[Any, ...]:
        assert n == len(attrs)
        a = self.find(int(ptr))
        if self.batch_error or (a is None and self.unmapped_error):
            self.calls.append("cuPointerGetAttributes")
            return (R.CUDA_ERROR_INVALID_VALUE, None)
        return self._ret(
            "cuPointerGetAttributes", [self._value(a, at.name) for at in attrs]
        )

    def cuPointerGetAttribute(self, attr: Any, ptr: int) -> tuple[Any, ...]:  # noqa: N802
        a = self.find(int(ptr))
        if a is None or attr.name == "CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE":
            self.calls.append("cuPointerGetAttribute")
            return (R.CUDA_ERROR_INVALID_VALUE, None)
        return self._ret("cuPointerGetAttribute", self._value(a, attr.name))

    def assert_balanced(self) -> None:
        assert self.ctx_stack == []
        assert all(n == 0 for n in self.retained.values()), self.retained
        assert self.live_handles == 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeDriver]:
    def install(allocs: list[Alloc], **kw: Any) -> FakeDriver:
        f = FakeDriver(allocs, **kw)
        monkeypatch.setattr(cuda_driver, "load_driver", lambda: f)
        return f

    return install


def vmm_with_hole() -> list[Alloc]:
    """A 16 MiB reservation: [0, 4) and [8, 12) MiB mapped, the rest a hole."""
    return [
        Alloc(RES, 4 * MiB, range_base=RES, range_size=16 * MiB),
        Alloc(RES + 8 * MiB, 4 * MiB, range_base=RES, range_size=16 * MiB),
    ]


def malloc_info(addr: int = RES) -> CudaPointerInfo:
    return CudaPointerInfo(
        address=addr,
        mapped=True,
        memory_kind=MemoryKind.CUDA,
        device=0,
        legacy_ipc_capable=True,
        alloc_base=addr,
        alloc_size=MiB,
    )


def vmm_info(addr: int = RES, handle_types: int = POSIX) -> CudaPointerInfo:
    return CudaPointerInfo(
        address=addr,
        mapped=True,
        memory_kind=MemoryKind.CUDA,
        device=0,
        is_vmm=True,
        allowed_handle_types=handle_types,
        alloc_base=addr,
        alloc_size=MiB,
    )


# ------------------------------------------------------------ extents (no GPU)


@pytest.mark.parametrize("unmapped_error", [False, True])
def test_vmm_memory_with_a_hole_is_two_extents(
    fake: Callable[..., FakeDriver], unmapped_error: bool
) -> None:
    f = fake(vmm_with_hole(), unmapped_error=unmapped_error)
    got = discover_cuda_extents(RES, 16 * MiB, 2 * MiB)
    assert got == [(RES, 4 * MiB), (RES + 8 * MiB, 4 * MiB)]
    # a mapped probe jumps to its allocation's end; an unmapped one by a granule
    assert [p - RES for p in f.probes] == [x * MiB for x in (0, 4, 6, 8, 12, 14)]
    f.assert_balanced()


def test_unmapped_probe_advances_by_granularity(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake(vmm_with_hole())
    # start off a granule boundary inside the hole: next probe is the boundary
    got = discover_cuda_extents(RES + 5 * MiB, 5 * MiB, 2 * MiB)
    assert got == [(RES + 8 * MiB, 2 * MiB)]  # clipped to the range
    assert [p - RES for p in f.probes] == [5 * MiB, 6 * MiB, 8 * MiB]
    f.probes.clear()
    # a 512 KiB granule: four probes per MiB of hole
    got = discover_cuda_extents(RES + 1 * MiB, 8 * MiB, MiB // 2)
    assert got == [(RES + 1 * MiB, 3 * MiB), (RES + 8 * MiB, 1 * MiB)]
    assert len(f.probes) == 1 + 8 + 1
    f.assert_balanced()


def test_allocations_are_not_merged_and_blocks_may_straddle_them(
    fake: Callable[..., FakeDriver],
) -> None:
    fake([Alloc(RES + i * 2 * MiB, 2 * MiB) for i in range(3)])
    got = discover_cuda_extents(RES, 6 * MiB, 2 * MiB)
    assert got == [(RES + i * 2 * MiB, 2 * MiB) for i in range(3)]


def test_default_granularity_is_the_devices_minimum(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake(vmm_with_hole())
    assert discover_cuda_extents(RES, 16 * MiB) == [
        (RES, 4 * MiB),
        (RES + 8 * MiB, 4 * MiB),
    ]
    assert f.granularity_flags == [
        drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    ]
    f.assert_balanced()


def test_max_probes_refuses_absurd_reservations(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake([])
    with pytest.raises(
        KVMemoryError,
        match=r"more than max_probes=1000 driver probes .* up to 524288 probes at "
        r"granularity 2097152\). The reservation is too large to walk",
    ):
        discover_cuda_extents(RES, TiB, 2 * MiB, max_probes=1000)
    assert len(f.probes) == 1000
    f.assert_balanced()  # the context is popped on the way out
    # a fully mapped range needs one probe per allocation, however large
    fake([Alloc(RES, TiB)])
    assert discover_cuda_extents(RES, TiB, 2 * MiB, max_probes=1) == [(RES, TiB)]


def test_argument_and_driver_errors(fake: Callable[..., FakeDriver]) -> None:
    f = fake(vmm_with_hole())
    with pytest.raises(ValueError, match="invalid range"):
        discover_cuda_extents(RES, 0)
    with pytest.raises(ValueError, match="granularity must be > 0"):
        discover_cuda_extents(RES, MiB, 0)
    with pytest.raises(ValueError, match="max_probes must be > 0"):
        discover_cuda_extents(RES, MiB, MiB, max_probes=0)
    f.fail["cuMemGetAddressRange"] = R.CUDA_ERROR_INVALID_CONTEXT
    with pytest.raises(
        CudaDriverError, match=r"cuMemGetAddressRange\(0x.*CUDA_ERROR_INVALID_CONTEXT"
    ):
        discover_cuda_extents(RES, 16 * MiB, 2 * MiB)
    f.assert_balanced()
    with pytest.raises(KVMemoryError, match=r"CUDA device 3 does not exist \(1 vis"):
        discover_cuda_extents(RES, MiB, MiB, device=3)


# ------------------------------------------------------------ pointers (no GPU)


def auto_path(info: CudaPointerInfo) -> TransferPath:
    """The live transfer-path policy's answer for what discovery found."""
    kind = info.memory_kind or MemoryKind.CUDA
    return choose_transfer_path(kind, export_kinds_of(info), TransferPath.AUTO).path


def test_cudamalloc_memory_is_legacy_ipc_capable_and_direct(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake([Alloc(RES, 64 * MiB, vmm=False, legacy=True, handle_types=0)])
    info = describe_cuda_pointer(RES + 123)
    assert info.mapped and not info.is_vmm and info.legacy_ipc_capable
    assert info.memory_kind is MemoryKind.CUDA and info.origin == "cudaMalloc"
    assert (info.alloc_base, info.alloc_size) == (RES, 64 * MiB)
    assert info.allocation == MemoryExtent(RES, 64 * MiB, 0, MemoryKind.CUDA)
    assert export_kinds_of(info) == frozenset({ExportKind.LEGACY_CUDA_IPC})
    assert auto_path(info) is TransferPath.DIRECT
    assert f.calls.count("cuPointerGetAttributes") == 1  # all attributes at once
    f.assert_balanced()


def test_vmm_memory_is_staged_because_of_tcp_emulation(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake(vmm_with_hole())
    info = describe_cuda_pointer(RES + 9 * MiB)
    assert info.mapped and info.is_vmm and not info.legacy_ipc_capable
    assert info.origin == "vmm" and info.gpu_direct_rdma_capable and info.device == 0
    assert (info.alloc_base, info.alloc_size) == (RES + 8 * MiB, 4 * MiB)
    assert (info.range_base, info.range_size) == (RES, 16 * MiB)  # the reservation
    assert export_kinds_of(info) == frozenset({ExportKind.POSIX_FD})
    choice = choose_transfer_path(
        MemoryKind.CUDA, export_kinds_of(info), TransferPath.AUTO
    )
    assert choice.path is TransferPath.STAGED
    assert "TCP" in choice.reason and "emulation" in choice.reason
    f.assert_balanced()  # the retained allocation handle was released


@pytest.mark.parametrize("unmapped_error", [False, True])
def test_unmapped_address_is_an_answer(
    fake: Callable[..., FakeDriver], unmapped_error: bool
) -> None:
    f = fake(vmm_with_hole(), unmapped_error=unmapped_error)
    info = describe_cuda_pointer(RES + 5 * MiB)
    assert info == CudaPointerInfo(address=RES + 5 * MiB, mapped=False)
    assert info.allocation is None and info.origin == "unmapped"
    assert export_kinds_of(info) == frozenset({ExportKind.NONE})
    f.assert_balanced()


def test_batch_refusal_on_mapped_memory_queries_one_by_one(
    fake: Callable[..., FakeDriver],
) -> None:
    f = fake(vmm_with_hole())
    f.batch_error = True
    info = describe_cuda_pointer(RES)
    assert (
        info.mapped and info.is_vmm and export_kinds_of(info) == {ExportKind.POSIX_FD}
    )
    assert not info.from_mempool  # the attribute the driver refused
    assert f.calls.count("cuPointerGetAttribute") == len(disc._ATTRIBUTES)
    f.assert_balanced()


def test_export_kinds_from_handle_types() -> None:
    handle_type = drv.CUmemAllocationHandleType
    assert (
        int(handle_type.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        == disc.HANDLE_TYPE_POSIX_FD
    )
    assert int(handle_type.CU_MEM_HANDLE_TYPE_FABRIC) == disc.HANDLE_TYPE_FABRIC
    assert export_kinds_of(vmm_info(handle_types=POSIX | FABRIC)) == frozenset(
        {ExportKind.POSIX_FD, ExportKind.FABRIC}
    )
    assert export_kinds_of(vmm_info(handle_types=FABRIC)) == {ExportKind.FABRIC}
    assert export_kinds_of(vmm_info(handle_types=0)) == {ExportKind.NONE}
    host = CudaPointerInfo(address=1, mapped=True, memory_kind=MemoryKind.HOST)
    assert export_kinds_of(host) == {ExportKind.HOST}


def test_host_memory_goes_direct(fake: Callable[..., FakeDriver]) -> None:
    fake([Alloc(RES, MiB, vmm=False, host=True, handle_types=0)])
    info = describe_cuda_pointer(RES)
    assert info.memory_kind is MemoryKind.HOST and not info.is_vmm
    assert auto_path(info) is TransferPath.DIRECT


def test_context_handling(fake: Callable[..., FakeDriver]) -> None:
    f = fake(vmm_with_hole(), devices=2)
    describe_cuda_pointer(RES, device=1)
    assert f.calls[:6] == [
        "cuInit",
        "cuDeviceGetCount",
        "cuDeviceGet",
        "cuDevicePrimaryCtxRetain",
        "cuCtxPushCurrent",
        "cuPointerGetAttributes",
    ]
    assert f.retained == {1: 0}
    f.assert_balanced()
    # a context already current (torch's) is used as it is
    f = fake(vmm_with_hole(), current_ctx=42)
    describe_cuda_pointer(RES)
    assert "cuDevicePrimaryCtxRetain" not in f.calls and f.retained == {}
    f.fail["cuPointerGetAttributes"] = R.CUDA_ERROR_DEINITIALIZED
    with pytest.raises(CudaDriverError, match="CUDA_ERROR_DEINITIALIZED"):
        describe_cuda_pointer(RES)


def test_no_device_is_a_kv_memory_error(fake: Callable[..., FakeDriver]) -> None:
    f = fake([])
    f.fail["cuInit"] = R.CUDA_ERROR_NO_DEVICE
    with pytest.raises(KVMemoryError, match=r"^no CUDA device: cuInit\(0\) failed"):
        describe_cuda_pointer(RES)
    f = fake([])
    f.init_error = OSError("libcuda.so.1: cannot open shared object file")
    with pytest.raises(KVMemoryError, match="^no CUDA device: the CUDA driver lib"):
        discover_cuda_extents(RES, MiB, MiB)
    fake([], devices=0)
    with pytest.raises(KVMemoryError, match=r"^no CUDA device: cuDeviceGetCount"):
        disc.cuda_allocation_granularity()


def test_without_a_gpu_the_real_driver_says_no_cuda_device() -> None:
    try:  # the real driver, without importing torch
        disc.cuda_allocation_granularity()
    except KVMemoryError as exc:
        assert str(exc).startswith("no CUDA device"), exc
    else:
        pytest.skip("a CUDA device is present")
    with pytest.raises(KVMemoryError, match="^no CUDA device"):
        describe_cuda_pointer(RES)
    with pytest.raises(KVMemoryError, match="^no CUDA device"):
        discover_cuda_extents(RES, MiB, MiB)


# --------------------------------------------------------- KVMemory (no GPU)


def spans_of(
    block_bytes: int, base: int = RES
) -> Callable[[int], list[tuple[int, int]]]:
    return lambda b: [(base + b * block_bytes, block_bytes)]


def test_discovered_cuda_memory_is_kv_memory(fake: Callable[..., FakeDriver]) -> None:
    f = fake(vmm_with_hole())
    span = MemoryExtent(RES, 16 * MiB, 0, MemoryKind.CUDA)
    mem = DiscoveredCudaMemory(span, spans_of(MiB), 16)
    assert isinstance(mem, KVMemory)
    caps = mem.capabilities
    assert caps.name == "discovered-cuda" and caps.memory_kind is MemoryKind.CUDA
    assert caps.layouts == {"LBNHC"} and not caps.can_restride
    assert caps.stability is MappingStability.ELASTIC
    assert caps.export_kinds == {ExportKind.POSIX_FD}
    assert mem.reservation == span and mem.num_virtual_blocks == 16
    assert mem.mapped_extents() == (
        MemoryExtent(RES, 4 * MiB, 0, MemoryKind.CUDA),
        MemoryExtent(RES + 8 * MiB, 4 * MiB, 0, MemoryKind.CUDA),
    )
    assert mem.epoch == 1 and mem.num_mapped_blocks == 8
    assert mem.unmapped_blocks([0, 3, 4, 7, 8, 11, 12, 16, -1]) == [4, 7, 12, 16, -1]
    assert mem.pointer_info is not None and mem.pointer_info.is_vmm
    assert callable(mem.subscribe(lambda e: None))
    with pytest.raises(KVMemoryError, match="cannot be leased: .* kvcached"):
        mem.lease([0])
    assert not mem.refresh() and mem.epoch == 1
    # the owner maps the hole: two more allocations, found on refresh
    f.allocs += [
        Alloc(RES + 4 * MiB, 2 * MiB, range_base=RES, range_size=16 * MiB),
        Alloc(RES + 6 * MiB, 2 * MiB, range_base=RES, range_size=16 * MiB),
    ]
    assert mem.refresh() and mem.epoch == 2
    assert len(mem.mapped_extents()) == 4 and mem.num_mapped_blocks == 12
    # a block straddling two adjacent allocations is mapped; one touching a hole
    # is not
    straddle = DiscoveredCudaMemory(span, spans_of(3 * MiB, RES + MiB), 5)
    assert straddle.unmapped_blocks(range(5)) == [3, 4]
    f.allocs = []
    assert mem.refresh() and mem.num_mapped_blocks == 0
    assert mem.capabilities.export_kinds == {ExportKind.POSIX_FD}  # last seen
    f.assert_balanced()


def test_discovered_cudamalloc_memory_is_static(
    fake: Callable[..., FakeDriver],
) -> None:
    fake([Alloc(RES, 8 * MiB, vmm=False, legacy=True, handle_types=0)])
    span = MemoryExtent(RES, 8 * MiB, 0, MemoryKind.CUDA)
    mem = DiscoveredCudaMemory(span, spans_of(MiB), 8, granularity=2 * MiB)
    assert mem.capabilities.stability is MappingStability.STATIC
    assert mem.capabilities.export_kinds == {ExportKind.LEGACY_CUDA_IPC}
    assert mem.num_mapped_blocks == 8
    assert mem.pointer_info is not None
    assert auto_path(mem.pointer_info) is TransferPath.DIRECT


def test_discovered_memory_with_nothing_mapped(
    fake: Callable[..., FakeDriver],
) -> None:
    fake([])
    span = MemoryExtent(RES, 8 * MiB, 0, MemoryKind.CUDA)
    mem = DiscoveredCudaMemory(span, spans_of(MiB), 8)
    assert mem.mapped_extents() == () and mem.epoch == 0
    assert mem.capabilities.stability is MappingStability.ELASTIC
    assert mem.capabilities.export_kinds == {ExportKind.NONE}
    with pytest.raises(KVMemoryError, match="max_probes=2"):
        DiscoveredCudaMemory(span, spans_of(MiB), 8, max_probes=2)
    with pytest.raises(KVMemoryError, match="is host memory"):
        DiscoveredCudaMemory(MemoryExtent(RES, MiB), spans_of(MiB), 1)


# ------------------------------------------------------------- on a real GPU


gpu = pytest.mark.gpu


@pytest.fixture
def cuda_torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.cuda.init()
    return torch


@gpu
def test_gpu_cudamalloc_tensor(cuda_torch: Any) -> None:
    torch = cuda_torch
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        pytest.skip("torch allocates through VMM with expandable_segments")
    t = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    ptr = t.data_ptr()
    info = describe_cuda_pointer(ptr + 123)
    assert info.mapped and info.memory_kind is MemoryKind.CUDA and info.device == 0
    assert info.legacy_ipc_capable and not info.is_vmm and info.origin == "cudaMalloc"
    assert info.alloc_base <= ptr and ptr + t.numel() <= info.alloc_base + (
        info.alloc_size
    )
    assert ExportKind.LEGACY_CUDA_IPC in export_kinds_of(info)
    assert auto_path(info) is TransferPath.DIRECT
    assert discover_cuda_extents(ptr, t.numel()) == [(ptr, t.numel())]
    span = MemoryExtent(ptr, t.numel(), 0, MemoryKind.CUDA)
    mem = DiscoveredCudaMemory(span, spans_of(MiB, ptr), 64)
    assert mem.capabilities.stability is MappingStability.STATIC
    assert mem.num_mapped_blocks == 64


@gpu
def test_gpu_vmm_reservation_with_a_hole(cuda_torch: Any) -> None:
    from elastic_nixl.allocator.cuda import CudaBackend

    backend = CudaBackend(0)
    g = backend.granularity
    try:
        base = backend.reserve(8 * g)
        backend.map(0, 2 * g)
        backend.map(4 * g, g)
        backend.map(5 * g, g)
        assert discover_cuda_extents(base, 8 * g, g) == [
            (base, 2 * g),
            (base + 4 * g, g),
            (base + 5 * g, g),
        ]
        assert discover_cuda_extents(base, 8 * g) == discover_cuda_extents(
            base, 8 * g, g
        )
        info = describe_cuda_pointer(base + g + 5)
        assert info.mapped and info.is_vmm and not info.legacy_ipc_capable
        assert info.device == 0 and info.origin == "vmm"
        assert (info.alloc_base, info.alloc_size) == (base, 2 * g)
        assert export_kinds_of(info) == {ExportKind.POSIX_FD}
        assert auto_path(info) is TransferPath.STAGED
        hole = describe_cuda_pointer(base + 2 * g)
        assert not hole.mapped
        span = MemoryExtent(base, 8 * g, 0, MemoryKind.CUDA)
        mem = DiscoveredCudaMemory(span, spans_of(g, base), 8, granularity=g)
        assert mem.capabilities.stability is MappingStability.ELASTIC
        assert mem.capabilities.export_kinds == {ExportKind.POSIX_FD}
        assert mem.unmapped_blocks(range(8)) == [2, 3, 6, 7]
        backend.map(2 * g, g)
        assert mem.refresh() and mem.unmapped_blocks(range(8)) == [3, 6, 7]
        # Our backend retires what it unmaps: the shared zero chunk is mapped
        # read-only in its place (a late reader sees zeros), so the driver
        # reports the range mapped.
        backend.unmap(0, 2 * g)
        assert discover_cuda_extents(base, 2 * g, g) == [(base, 2 * g)]
        mem.refresh()  # the same extent: nothing changed for the driver
        assert mem.unmapped_blocks(range(8)) == [3, 6, 7]
    finally:
        backend.free()
