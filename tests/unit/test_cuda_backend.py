"""The CUDA VMM backend: argument building and error translation without a GPU
(against a fake driver), and the real thing where a GPU is present."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from elastic_nixl import cuda_driver
from elastic_nixl.allocator import BlockGeometry, VmmKVAllocator
from elastic_nixl.allocator.cuda import (
    CudaBackend,
    CudaDriverError,
    build_access_desc,
    build_allocation_prop,
    check,
    load_driver,
    result_name,
)
from elastic_nixl.capabilities import (
    ExportKind,
    KVMemoryError,
    MappingEvent,
    MemoryKind,
)

drv = load_driver()
R = drv.CUresult
MiB = 1 << 20


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# ------------------------------------------------------- pure helpers (no GPU)


def test_allocation_prop_is_pinned_exportable_rdma() -> None:
    prop = build_allocation_prop(drv, 3, ExportKind.POSIX_FD, True)
    assert prop.type == drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    assert prop.location.type == drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    assert prop.location.id == 3
    assert (
        prop.requestedHandleTypes
        == drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    assert prop.allocFlags.gpuDirectRDMACapable == 1
    fabric = build_allocation_prop(drv, 0, ExportKind.FABRIC, False)
    assert (
        fabric.requestedHandleTypes
        == drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
    )
    assert fabric.allocFlags.gpuDirectRDMACapable == 0
    none = build_allocation_prop(drv, 0, ExportKind.NONE, False)
    assert (
        none.requestedHandleTypes
        == drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
    )


def test_legacy_ipc_is_not_a_vmm_handle_type() -> None:
    with pytest.raises(ValueError, match="legacy_cuda_ipc .* choose one of"):
        build_allocation_prop(drv, 0, ExportKind.LEGACY_CUDA_IPC, True)
    with pytest.raises(ValueError, match="handle_type"):
        CudaBackend(handle_type=ExportKind.LEGACY_CUDA_IPC)
    with pytest.raises(ValueError, match="device must be a CUDA device ordinal"):
        CudaBackend(device=-1)


def test_access_desc_grants_read_write() -> None:
    desc = build_access_desc(drv, 2)
    assert desc.location.id == 2
    assert desc.location.type == drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    assert desc.flags == drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE


def test_check_unpacks_and_translates_errors() -> None:
    assert check((R.CUDA_SUCCESS,), "cuCtxSynchronize") is None
    assert check((R.CUDA_SUCCESS, 7), "cuDeviceGetCount") == 7
    assert check((R.CUDA_SUCCESS, 1, 2), "x") == (1, 2)
    with pytest.raises(
        CudaDriverError,
        match=r"cuMemCreate\(2097152\) failed: "
        r"CUDA_ERROR_OUT_OF_MEMORY \(2\): the GPU has no memory",
    ) as info:
        check((R.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemCreate(2097152)")
    assert info.value.code == 2 and info.value.call == "cuMemCreate(2097152)"
    assert isinstance(info.value, KVMemoryError)
    with pytest.raises(CudaDriverError, match="CUDA_ERROR_INVALID_VALUE"):
        check((1, None), "cuMemMap")  # plain int codes are named too
    assert result_name(987654) == "CUresult 987654"


# ------------------------------------------- the backend against a fake driver


class FakeDriver:
    """Just enough of cuda.bindings.driver to run CudaBackend without a GPU."""

    def __init__(self, **attrs: int) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, Any] = {}
        named = {
            "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": 1,
            "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED": 1,
            "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED": 0,
            "CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED": 1,
            **attrs,
        }
        # Keyed by value: cuda-bindings 13.5 made some names aliases (VIRTUAL_
        # MEMORY_ -> VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED), and an alias member
        # reports the canonical name.
        self.attrs = {
            int(getattr(drv.CUdevice_attribute, k)): v for k, v in named.items()
        }
        self.live_handles: set[int] = set()
        self.mapped: dict[int, int] = {}
        self.read_only: set[int] = set()
        self.zeroed: set[int] = set()
        self.next_handle = 100
        self.init_error: Exception | None = None
        self.props: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(drv, name)  # enums and structs are the real ones

    def _ret(self, name: str, *values: Any) -> tuple[Any, ...]:
        self.calls.append(name)
        err = self.fail.pop(name, None)
        if err is not None:
            return (err, *([None] * len(values)))
        return (R.CUDA_SUCCESS, *values)

    def cuInit(self, flags: int) -> tuple[Any, ...]:  # noqa: N802
        if self.init_error is not None:
            raise self.init_error
        return self._ret("cuInit")

    def cuDeviceGetCount(self) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDeviceGetCount", 1)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDeviceGet", ordinal)

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDevicePrimaryCtxRetain", "ctx")

    def cuDevicePrimaryCtxRelease(self, dev: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDevicePrimaryCtxRelease")

    def cuDeviceGetAttribute(self, attr: Any, dev: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuDeviceGetAttribute", self.attrs[int(attr)])

    def cuCtxPushCurrent(self, ctx: Any) -> tuple[Any, ...]:  # noqa: N802
        return (R.CUDA_SUCCESS,)

    def cuCtxPopCurrent(self) -> tuple[Any, ...]:  # noqa: N802
        return (R.CUDA_SUCCESS, "ctx")

    def cuMemGetAllocationGranularity(self, prop: Any, flag: Any) -> tuple[Any, ...]:  # noqa: N802
        self.props.append(prop)
        return self._ret("cuMemGetAllocationGranularity", 2 * MiB)

    def cuMemAddressReserve(
        self, n: int, align: int, addr: int, flags: int
    ) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuMemAddressReserve", 1 << 40)

    def cuMemAddressFree(self, ptr: int, n: int) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuMemAddressFree")

    def cuMemCreate(self, n: int, prop: Any, flags: int) -> tuple[Any, ...]:  # noqa: N802
        res = self._ret("cuMemCreate", self.next_handle)
        if res[0] == R.CUDA_SUCCESS:
            self.live_handles.add(self.next_handle)
            self.next_handle += 1
        return res

    def cuMemRelease(self, handle: int) -> tuple[Any, ...]:  # noqa: N802
        self.live_handles.discard(handle)
        return self._ret("cuMemRelease")

    def cuMemMap(
        self, ptr: int, n: int, off: int, handle: int, flags: int
    ) -> tuple[Any, ...]:  # noqa: N802
        res = self._ret("cuMemMap")
        if res[0] == R.CUDA_SUCCESS:
            self.mapped[ptr] = handle
        return res

    def cuMemUnmap(self, ptr: int, n: int) -> tuple[Any, ...]:  # noqa: N802
        self.mapped.pop(ptr, None)
        return self._ret("cuMemUnmap")

    def cuMemSetAccess(
        self, ptr: int, n: int, desc: list[Any], count: int
    ) -> tuple[Any, ...]:  # noqa: N802
        flags = drv.CUmemAccess_flags
        assert count == 1
        if desc[0].flags == flags.CU_MEM_ACCESS_FLAGS_PROT_READ:
            self.read_only.add(ptr)
            return self._ret("cuMemSetAccess(READ)")
        assert desc[0].flags == flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.read_only.discard(ptr)
        return self._ret("cuMemSetAccess")

    def cuMemsetD8(self, ptr: int, value: int, n: int) -> tuple[Any, ...]:  # noqa: N802
        self.zeroed.add(ptr)
        return self._ret("cuMemsetD8")

    def cuCtxSynchronize(self) -> tuple[Any, ...]:  # noqa: N802
        return self._ret("cuCtxSynchronize")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeDriver]:
    def install(**attrs: int) -> FakeDriver:
        f = FakeDriver(**attrs)
        # The one place the driver is loaded and initialised.
        monkeypatch.setattr(cuda_driver, "load_driver", lambda: f)
        return f

    return install


def test_backend_against_fake_driver(fake: Callable[..., FakeDriver]) -> None:
    f = fake()
    backend = CudaBackend(0)
    assert backend.granularity == 2 * MiB and backend.gpu_direct_rdma
    assert backend.memory_kind is MemoryKind.CUDA
    assert backend.export_kinds == frozenset({ExportKind.POSIX_FD})
    assert f.props[0].allocFlags.gpuDirectRDMACapable == 1
    g = BlockGeometry.layer_outermost(1 * MiB, 2, 8)
    a = VmmKVAllocator(backend, g, 8, 2 * MiB, name="gpu-fake")
    events: list[MappingEvent] = []
    a.subscribe(events.append)
    assert a.capabilities.export_kinds == frozenset({ExportKind.POSIX_FD})
    assert a.reservation.kind is MemoryKind.CUDA and a.reservation.base == 1 << 40
    f.calls.clear()
    a.grow_to(3)  # 2 chunks per layer
    assert f.calls == ["cuMemCreate", "cuMemMap", "cuMemSetAccess"] * 4
    assert len(f.live_handles) == 4 and len(f.mapped) == 4
    f.calls.clear()
    a.shrink_to(0)
    # Each chunk's memory is released and the range retired: one zero chunk,
    # made and zeroed once, mapped read-only in every chunk's place.
    retire = ["cuMemMap", "cuMemSetAccess(READ)"]
    assert f.calls == (
        ["cuCtxSynchronize", "cuMemUnmap", "cuMemRelease", "cuMemCreate", "cuMemMap"]
        + ["cuMemSetAccess", "cuMemsetD8", "cuCtxSynchronize", "cuMemSetAccess(READ)"]
        + (["cuMemUnmap", "cuMemRelease"] + retire) * 3
    )
    zero = {h for h in f.live_handles}
    assert len(zero) == 1 and set(f.mapped.values()) == zero
    assert len(f.mapped) == 4 and set(f.mapped) == f.read_only
    assert len(f.zeroed) == 1
    f.calls.clear()
    a.grow_to(1)  # a retired range mapped again: the zero mapping goes first
    assert f.calls[:3] == ["cuMemUnmap", "cuMemCreate", "cuMemMap"]
    a.close()
    assert f.live_handles == set() and f.mapped == {}
    assert f.calls[-2:] == ["cuMemAddressFree", "cuDevicePrimaryCtxRelease"]
    assert [e.kind.value for e in events] == [
        "mapped",
        "unmapping",
        "mapped",
        "unmapping",
    ]


def test_oom_rolls_back_and_names_the_call(fake: Callable[..., FakeDriver]) -> None:
    f = fake()
    a = VmmKVAllocator(
        CudaBackend(0), BlockGeometry.layer_outermost(2 * MiB, 1, 8), 8, 2 * MiB
    )
    a.grow_to(1)
    real_create = f.cuMemCreate
    n = {"calls": 0}

    def create(size: int, prop: Any, flags: int) -> tuple[Any, ...]:
        n["calls"] += 1
        if n["calls"] == 3:
            f.fail["cuMemCreate"] = R.CUDA_ERROR_OUT_OF_MEMORY
        return real_create(size, prop, flags)

    f.cuMemCreate = create  # type: ignore[method-assign]
    with pytest.raises(
        KVMemoryError, match=r"cuMemCreate\(2097152\) failed: CUDA_ERROR_OUT_OF_MEMORY"
    ):
        a.grow_to(6)
    # One chunk still mapped, plus the shared zero chunk the rolled-back
    # ranges were retired onto.
    assert len(f.live_handles) == 2 and a.num_mapped_blocks == 1 and a.epoch == 1
    f.fail["cuMemSetAccess"] = R.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(KVMemoryError, match="cuMemSetAccess.*CUDA_ERROR_INVALID_VALUE"):
        a.grow_to(2)
    assert len(f.live_handles) == 2  # the failed chunk unmapped and released
    assert [h for h in f.mapped.values()].count(min(f.live_handles)) == 1
    a.close()


def test_device_checks_against_fake_driver(fake: Callable[..., FakeDriver]) -> None:
    f = fake(CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED=0)
    b = CudaBackend(0)
    assert not b.gpu_direct_rdma and f.props[-1].allocFlags.gpuDirectRDMACapable == 0
    b.free()
    with pytest.raises(KVMemoryError, match="does not support GPUDirect RDMA on VMM"):
        CudaBackend(0, gpu_direct_rdma=True)
    with pytest.raises(KVMemoryError, match="does not support handle_type fabric"):
        CudaBackend(0, handle_type=ExportKind.FABRIC)
    with pytest.raises(
        KVMemoryError, match=r"CUDA device 1 does not exist \(1 visible\)"
    ):
        CudaBackend(1)
    fake(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED=0)
    with pytest.raises(
        KVMemoryError, match="does not support virtual memory management"
    ):
        CudaBackend(0)
    f = fake()
    f.fail["cuInit"] = R.CUDA_ERROR_NO_DEVICE
    with pytest.raises(
        KVMemoryError, match=r"^no CUDA device: cuInit\(0\) failed with CUDA_ERROR_NO"
    ):
        CudaBackend(0)
    f = fake()
    f.init_error = OSError("libcuda.so.1: cannot open shared object file")
    with pytest.raises(
        KVMemoryError, match="no CUDA device: the CUDA driver library could not"
    ):
        CudaBackend(0)


def test_constructing_without_a_gpu_says_so() -> None:
    if cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(KVMemoryError, match="no CUDA device"):
        CudaBackend(0)


# ------------------------------------------------------------- on a real GPU

gpu = pytest.mark.gpu


@gpu
def test_gpu_grow_write_shrink(cuda_torch: Any) -> None:
    torch = cuda_torch
    backend = CudaBackend(0)
    gran = backend.granularity
    assert gran >= 64 * 1024 and gran & (gran - 1) == 0
    g = BlockGeometry.layer_outermost(gran // 4, 4, 4096)  # 4 blocks per chunk
    with VmmKVAllocator(backend, g, 4096, gran, name="gpu") as a:
        assert a.capabilities.export_kinds == frozenset({ExportKind.POSIX_FD})
        t = a.tensor()  # nothing mapped yet: must not touch or query the pointer
        assert (
            t.device == torch.device("cuda", 0) and t.data_ptr() == a.reservation.base
        )
        assert t.numel() == a.reservation.nbytes
        free0 = torch.cuda.mem_get_info(0)[0]
        a.grow_to(64)  # 16 chunks per layer, 64 chunks
        assert a.num_mapped_blocks == 64 and len(a.mapped_extents()) == 64
        free1 = torch.cuda.mem_get_info(0)[0]
        assert free0 - free1 >= 60 * gran
        view = torch.as_strided(
            t, (4, 4096, gran // 4), (4096 * gran // 4, gran // 4, 1)
        )
        view[:, :64] = torch.arange(64, device="cuda", dtype=torch.int8)[None, :, None]
        torch.cuda.synchronize()
        assert int(view[3, 63].float().mean()) == 63
        lease = a.lease([10])
        free2 = torch.cuda.mem_get_info(0)[0]  # torch's own allocations are done
        a.shrink_to(8)
        assert a.num_mapped_blocks == 8 + 4  # block 10's chunk stays leased
        assert int(view[2, 10, 0]) == 10
        lease.release()
        a.shrink_to(0)
        torch.cuda.synchronize()
        # Really freed: one zero chunk stands in for every retired range.
        assert torch.cuda.mem_get_info(0)[0] - free2 >= 59 * gran
        # A late read of a retired range sees zeros, not a fault.
        assert int(view[3, 63].abs().sum()) == 0 and int(view[0, 5].abs().sum()) == 0
        a.grow_to(4)  # mapped again: writable, its own memory
        view[0, :4] = 9
        torch.cuda.synchronize()
        assert int(view[0, 3, 0]) == 9 and int(view[0, 5].abs().sum()) == 0
        del view, t


@gpu
def test_gpu_tensor_views_in_every_layout(cuda_torch: Any) -> None:
    torch = cuda_torch
    L, V, H, N, C = 2, 512, 4, 16, 256
    for layout in ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"):
        g = BlockGeometry.for_layout(
            layout,
            num_layers=L,
            num_blocks=V,
            num_heads=H,
            num_tokens=N,
            content_bytes=C,
        )
        backend = CudaBackend(0)
        with VmmKVAllocator(backend, g, V, backend.granularity, name=layout) as a:
            a.map_blocks([5, 300])
            raw = a.tensor()
            starts, n = g.byte_ranges([5, 300])
            for row, value in zip(starts.tolist(), (5, 30), strict=True):
                for s in row:
                    raw[s : s + n] = value
            torch.cuda.synchronize()
            for row, value in zip(starts.tolist(), (5, 30), strict=True):
                got = torch.cat([raw[s : s + n] for s in row])
                assert bool((got == value).all()), layout


@gpu
def test_gpu_fabric_handles_if_supported(cuda_torch: Any) -> None:
    try:
        backend = CudaBackend(0, handle_type=ExportKind.FABRIC)
    except KVMemoryError as exc:
        pytest.skip(f"fabric handles unavailable here: {exc}")
    try:
        with VmmKVAllocator(
            backend,
            BlockGeometry.layer_outermost(4096, 1, 1024),
            1024,
            backend.granularity,
        ) as a:
            a.grow_to(1)
            assert a.capabilities.export_kinds == frozenset({ExportKind.FABRIC})
    except KVMemoryError as exc:
        pytest.skip(f"fabric allocation refused here: {exc}")
