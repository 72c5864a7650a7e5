"""Discovery for foreign CUDA memory: KV tensors whose allocator implements nothing.

KV caches from kvcached, vLLM's cumem pool (sleep mode) or any other allocator
that does not implement :class:`~elastic_nixl.capabilities.KVMemory` are
described from what the CUDA driver says about their addresses:

* :func:`describe_cuda_pointer`: one ``cuPointerGetAttributes`` call (device,
  memory type, mapped, legacy-IPC capable, allowed handle types, GPUDirect RDMA
  capable, reservation range, mempool) plus ``cuMemGetAddressRange`` (the
  allocation holding the address) and ``cuMemRetainAllocationHandle`` (which
  only succeeds on VMM-mapped memory). A reserved but unmapped address is an
  answer (``mapped=False``), not an error.
* :func:`discover_cuda_extents`: the mapped allocations inside a range.
* :class:`DiscoveredCudaMemory`: the ``KVMemory`` the connector registers,
  the CUDA counterpart of :class:`elastic_nixl.memory.host.DiscoveredHostMemory`.
* :func:`export_kinds_of`: how the memory can be exported. GPU memory that is
  not legacy-CUDA-IPC capable (any VMM memory) cannot be exported by UCX's
  ``cuda_ipc`` transport; the connector's transfer-path policy
  (``connector.planning.choose_transfer_path``) decides what to do about it.

The driver (NVIDIA's ``cuda-bindings``) is set up by
:mod:`elastic_nixl.cuda_driver` only when a function needs it, so this module
imports on machines without a GPU; there every driver-using function raises
``KVMemoryError("no CUDA device: ...")``. The NVML probe of whether a peer's
READ is fast (``active_nvlinks``, ``cuda_ipc_read_available``) lives there too,
a question about the transport rather than the memory; both names are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from elastic_nixl.allocator.cuda import build_allocation_prop
from elastic_nixl.capabilities import (
    ExportKind,
    KVMemoryCapabilities,
    KVMemoryError,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)
from elastic_nixl.cuda_driver import (
    CudaDriverError,
    active_nvlinks,
    as_int,
    check,
    cuda_ipc_read_available,
    device_context,
    result_name,
)
from elastic_nixl.memory.discovered import BlockSpans, DiscoveredMemory

# CUmemAllocationHandleType bits in CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES
# (cuda.h; constant across CUDA 11-13). Kept here so export_kinds_of() needs no
# driver.
HANDLE_TYPE_POSIX_FD = 0x1
HANDLE_TYPE_WIN32 = 0x2
HANDLE_TYPE_WIN32_KMT = 0x4
HANDLE_TYPE_FABRIC = 0x8

# CUmemorytype values (cuda.h).
_MEMORYTYPE_HOST = 1
_MEMORYTYPE_DEVICE = 2
_MEMORYTYPE_ARRAY = 3
_MEMORYTYPE_UNIFIED = 4

# What cuMemGetAddressRange / cuPointerGetAttributes answer for an address
# that no allocation maps (reserved-but-unmapped VMM space, or not CUDA at
# all). Anything else is a real failure and raises.
_UNMAPPED_RESULTS = frozenset({"CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_FOUND"})

# Queried in one cuPointerGetAttributes call, in this order.
_ATTRIBUTES: tuple[str, ...] = (
    "CU_POINTER_ATTRIBUTE_MEMORY_TYPE",
    "CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL",
    "CU_POINTER_ATTRIBUTE_MAPPED",
    "CU_POINTER_ATTRIBUTE_IS_MANAGED",
    "CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE",
    "CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES",
    "CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE",
    "CU_POINTER_ATTRIBUTE_RANGE_START_ADDR",
    "CU_POINTER_ATTRIBUTE_RANGE_SIZE",
    "CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE",
)


# --------------------------------------------------------------------------
# Driver access
# --------------------------------------------------------------------------


def _address_range(drv: ModuleType, addr: int) -> tuple[int, int] | None:
    """``cuMemGetAddressRange``: (base, size) of the allocation at ``addr``.

    ``None`` when nothing is mapped there (the driver's INVALID_VALUE or
    NOT_FOUND); other failures raise ``CudaDriverError``.
    """
    result = drv.cuMemGetAddressRange(addr)
    if int(result[0]) != 0 and result_name(result[0]) in _UNMAPPED_RESULTS:
        return None
    base, size = check(result, f"cuMemGetAddressRange(0x{addr:x})")
    return as_int(base), int(size)


def _is_vmm_mapping(drv: ModuleType, addr: int) -> bool:
    """Whether ``addr`` is mapped by ``cuMemMap`` (a ``cuMemCreate`` handle).

    ``cuMemRetainAllocationHandle`` succeeds only there; the handle it returns
    is released at once.
    """
    result = drv.cuMemRetainAllocationHandle(addr)
    if int(result[0]) != 0:
        return False
    check(drv.cuMemRelease(result[1]), f"cuMemRelease(retained 0x{addr:x})")
    return True


def _pointer_attributes(drv: ModuleType, ptr: int) -> dict[str, Any] | None:
    """All of ``_ATTRIBUTES`` for ``ptr``, or None if the driver refused.

    One ``cuPointerGetAttributes`` call. The driver either fills defaults
    (mapped false) for an address it does not know or refuses with
    INVALID_VALUE; both mean "unmapped" to the caller.
    """
    attrs = [getattr(drv.CUpointer_attribute, name) for name in _ATTRIBUTES]
    result = drv.cuPointerGetAttributes(len(attrs), attrs, ptr)
    if int(result[0]) != 0:
        if result_name(result[0]) in _UNMAPPED_RESULTS:
            return None
        check(result, f"cuPointerGetAttributes(0x{ptr:x})")
    values = list(result[1])
    if len(values) != len(_ATTRIBUTES):
        raise KVMemoryError(
            f"cuPointerGetAttributes(0x{ptr:x}) returned {len(values)} values for "
            f"{len(_ATTRIBUTES)} attributes"
        )
    return dict(zip(_ATTRIBUTES, values, strict=True))


def _pointer_attributes_one_by_one(drv: ModuleType, ptr: int) -> dict[str, Any]:
    """``cuPointerGetAttribute`` per attribute; refused ones are left out.

    Used when the batch query fails on an address that *is* mapped (a driver
    that does not know one of the attributes fails the whole batch).
    """
    values: dict[str, Any] = {}
    for name in _ATTRIBUTES:
        result = drv.cuPointerGetAttribute(getattr(drv.CUpointer_attribute, name), ptr)
        if int(result[0]) == 0:
            values[name] = result[1]
    return values


# --------------------------------------------------------------------------
# One pointer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaPointerInfo:
    """What the CUDA driver says about one address.

    ``alloc_base``/``alloc_size``: the allocation containing the address
    (``cuMemGetAddressRange``: for VMM memory one ``cuMemMap`` mapping, for
    ``cudaMalloc`` the whole allocation). ``range_base``/``range_size``: the
    address range it belongs to (``CU_POINTER_ATTRIBUTE_RANGE_*``: for VMM
    memory the ``cuMemAddressReserve`` reservation). All zero when unmapped.
    ``allowed_handle_types`` is the raw ``CUmemAllocationHandleType`` bitmask.
    """

    address: int
    mapped: bool
    memory_kind: MemoryKind | None = None  # None: not memory CUDA knows
    device: int = -1
    is_vmm: bool = False
    legacy_ipc_capable: bool = False
    allowed_handle_types: int = 0
    gpu_direct_rdma_capable: bool = False
    is_managed: bool = False
    from_mempool: bool = False
    alloc_base: int = 0
    alloc_size: int = 0
    range_base: int = 0
    range_size: int = 0

    @property
    def allocation(self) -> MemoryExtent | None:
        """The allocation as an extent, or None when unmapped."""
        if not self.mapped or self.alloc_size <= 0:
            return None
        return MemoryExtent(
            self.alloc_base,
            self.alloc_size,
            max(self.device, 0),
            self.memory_kind or MemoryKind.CUDA,
        )

    @property
    def origin(self) -> str:
        """A word for messages: vmm, cudaMalloc, mempool, managed, host, ..."""
        if not self.mapped:
            return "unmapped"
        if self.memory_kind is MemoryKind.HOST:
            return "host"
        if self.is_managed:
            return "managed"
        if self.from_mempool:
            return "mempool"
        if self.is_vmm:
            return "vmm"
        return "cudaMalloc" if self.legacy_ipc_capable else "device"


def describe_cuda_pointer(ptr: int, *, device: int | None = None) -> CudaPointerInfo:
    """Describe ``ptr`` from the CUDA driver's pointer attributes.

    An address that nothing maps (reserved VMM space between mappings, or not
    CUDA memory at all) gives ``mapped=False``; it is not an error. ``device``
    picks whose primary context the queries run in when no context is current
    on this thread (default 0); with UVA any context answers for any device.

    Raises ``KVMemoryError("no CUDA device: ...")`` without a GPU and
    ``CudaDriverError`` when a query fails for another reason.
    """
    if ptr < 0:
        raise ValueError(f"address must be >= 0, got {ptr}")
    with device_context(device) as drv:
        attrs = _pointer_attributes(drv, ptr)
        rng = _address_range(drv, ptr)
        if attrs is None:
            if rng is None:
                return CudaPointerInfo(address=ptr, mapped=False)
            attrs = _pointer_attributes_one_by_one(drv, ptr)
        mapped = bool(attrs.get("CU_POINTER_ATTRIBUTE_MAPPED", rng is not None))
        mem_type = as_int(attrs.get("CU_POINTER_ATTRIBUTE_MEMORY_TYPE"))
        if not mapped or mem_type == 0:
            return CudaPointerInfo(address=ptr, mapped=False)
        kind = MemoryKind.HOST if mem_type == _MEMORYTYPE_HOST else MemoryKind.CUDA
        legacy = bool(attrs.get("CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE"))
        mempool = as_int(attrs.get("CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE")) != 0
        managed = bool(attrs.get("CU_POINTER_ATTRIBUTE_IS_MANAGED"))
        is_vmm = (
            kind is MemoryKind.CUDA
            and not (legacy or mempool or managed)
            and _is_vmm_mapping(drv, ptr)
        )
        range_base = as_int(attrs.get("CU_POINTER_ATTRIBUTE_RANGE_START_ADDR"))
        range_size = as_int(attrs.get("CU_POINTER_ATTRIBUTE_RANGE_SIZE"))
        if rng is None:  # e.g. registered host memory: fall back to the range
            rng = (range_base, range_size)
        return CudaPointerInfo(
            address=ptr,
            mapped=True,
            memory_kind=kind,
            device=int(attrs.get("CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL", -1)),
            is_vmm=is_vmm,
            legacy_ipc_capable=legacy,
            allowed_handle_types=as_int(
                attrs.get("CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES")
            ),
            gpu_direct_rdma_capable=bool(
                attrs.get("CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE")
            ),
            is_managed=managed,
            from_mempool=mempool,
            alloc_base=rng[0],
            alloc_size=rng[1],
            range_base=range_base,
            range_size=range_size,
        )


def export_kinds_of(info: CudaPointerInfo) -> frozenset[ExportKind]:
    """How the memory behind ``info`` can be exported to another process/NIC.

    Host memory: HOST. GPU memory: LEGACY_CUDA_IPC if ``cuIpcGetMemHandle``
    works on it, POSIX_FD / FABRIC from the allowed handle types; NONE when
    nothing is known to export it (also for an unmapped address).
    """
    if not info.mapped:
        return frozenset({ExportKind.NONE})
    if info.memory_kind is MemoryKind.HOST:
        return frozenset({ExportKind.HOST})
    kinds: set[ExportKind] = set()
    if info.legacy_ipc_capable:
        kinds.add(ExportKind.LEGACY_CUDA_IPC)
    if info.allowed_handle_types & HANDLE_TYPE_POSIX_FD:
        kinds.add(ExportKind.POSIX_FD)
    if info.allowed_handle_types & HANDLE_TYPE_FABRIC:
        kinds.add(ExportKind.FABRIC)
    return frozenset(kinds or {ExportKind.NONE})


# --------------------------------------------------------------------------
# A range
# --------------------------------------------------------------------------


def cuda_allocation_granularity(device: int = 0, *, recommended: bool = False) -> int:
    """``cuMemGetAllocationGranularity`` of pinned memory on ``device``.

    The minimum granularity by default: every VMM mapping starts on a multiple
    of it, so a walk in these steps cannot step over one.
    """
    with device_context(device) as drv:
        prop = build_allocation_prop(drv, device, ExportKind.NONE, False)
        flags = drv.CUmemAllocationGranularity_flags
        flag = (
            flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
            if recommended
            else flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        )
        return int(
            check(
                drv.cuMemGetAllocationGranularity(prop, flag),
                f"cuMemGetAllocationGranularity(device {device})",
            )
        )


def discover_cuda_extents(
    base: int,
    nbytes: int,
    granularity: int | None = None,
    *,
    device: int | None = None,
    max_probes: int | None = None,
) -> list[tuple[int, int]]:
    """The mapped allocations inside ``[base, base + nbytes)``, sorted.

    Walks the range with ``cuMemGetAddressRange``: a mapped probe address
    yields its allocation (clipped to the range) and the walk jumps to the
    allocation's end; an unmapped one advances to the next multiple of
    ``granularity`` (default: the device's minimum allocation granularity,
    2 MiB on current GPUs). Cost: one driver call per mapped allocation plus
    one per unmapped granule, O(allocations + unmapped bytes / granularity);
    a 1 TiB reservation with nothing mapped is 524288 probes at 2 MiB.
    ``max_probes`` caps that: the walk raises ``KVMemoryError`` rather than
    exceed it.

    Allocations are not merged: each ``cuMemMap`` (or ``cudaMalloc``) is one
    extent, the unit NIXL registers (a registration may not span two physical
    allocations). Allocations that begin off a granule boundary after a hole
    are only found from the next boundary on; VMM mappings are always
    granule-aligned.
    """
    if base < 0 or nbytes <= 0:
        raise ValueError(f"invalid range base={base} nbytes={nbytes}")
    if granularity is not None and granularity <= 0:
        raise ValueError(f"granularity must be > 0, got {granularity}")
    if max_probes is not None and max_probes <= 0:
        raise ValueError(f"max_probes must be > 0, got {max_probes}")
    if granularity is None:
        granularity = cuda_allocation_granularity(device or 0)
    end = base + nbytes
    extents: list[tuple[int, int]] = []
    probes = 0
    addr = base
    with device_context(device) as drv:
        while addr < end:
            if max_probes is not None and probes >= max_probes:
                worst = -(-nbytes // granularity)
                raise KVMemoryError(
                    f"discovering mapped CUDA memory in [0x{base:x}, +{nbytes}) "
                    f"took more than max_probes={max_probes} driver probes "
                    f"(stopped at 0x{addr:x}, {addr - base} bytes in, "
                    f"{len(extents)} allocation(s) found; up to {worst} probes "
                    f"at granularity {granularity}). The reservation is too large "
                    "to walk: pass the KV tensors' own span, a larger granularity "
                    "or a larger max_probes"
                )
            probes += 1
            rng = _address_range(drv, addr)
            if rng is None:
                addr = (addr // granularity + 1) * granularity
                continue
            a_base, a_size = rng
            a_end = a_base + a_size
            if a_size <= 0 or a_end <= addr or a_base > addr:
                raise KVMemoryError(
                    f"cuMemGetAddressRange(0x{addr:x}) returned "
                    f"[0x{a_base:x}, +{a_size}), which does not contain the "
                    "address"
                )
            start, stop = max(a_base, addr), min(a_end, end)
            extents.append((start, stop - start))
            addr = a_end
    return extents


# --------------------------------------------------------------------------
# KVMemory for CUDA memory of unknown origin
# --------------------------------------------------------------------------


class DiscoveredCudaMemory(DiscoveredMemory):
    """CUDA KV memory whose owner told us nothing: ask the driver.

    :meth:`refresh` re-walks the span (see :func:`discover_cuda_extents` for
    its cost). Capabilities come from the first mapped extent: VMM memory
    (kvcached, vLLM's cumem pool) is ELASTIC, since its owner may unmap it at
    any time, and ``cudaMalloc`` memory STATIC; a span with nothing mapped is
    taken for VMM (``cudaMalloc`` memory cannot be partly mapped).
    """

    def __init__(
        self,
        span: MemoryExtent,
        block_spans: BlockSpans,
        num_virtual_blocks: int,
        *,
        granularity: int | None = None,
        max_probes: int | None = None,
    ) -> None:
        if span.kind is not MemoryKind.CUDA:
            raise KVMemoryError(
                f"DiscoveredCudaMemory describes CUDA memory; span 0x{span.base:x} "
                f"is {span.kind.value} memory (use DiscoveredHostMemory)"
            )
        self._granularity = (
            granularity
            if granularity is not None
            else cuda_allocation_granularity(span.device)
        )
        self._max_probes = max_probes
        self._info: CudaPointerInfo | None = None
        super().__init__(span, block_spans, num_virtual_blocks)

    def _read_extents(self) -> tuple[MemoryExtent, ...]:
        spans = discover_cuda_extents(
            self._span.base,
            self._span.nbytes,
            self._granularity,
            device=self._span.device,
            max_probes=self._max_probes,
        )
        extents = tuple(
            MemoryExtent(b, n, self._span.device, MemoryKind.CUDA) for b, n in spans
        )
        if extents:
            self._info = describe_cuda_pointer(
                extents[0].base, device=self._span.device
            )
        return extents

    @property
    def pointer_info(self) -> CudaPointerInfo | None:
        """The driver's description of the first mapped extent (last seen)."""
        return self._info

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        info = self._info
        if info is None:  # nothing mapped yet: only VMM memory looks like that
            stability, exports = MappingStability.ELASTIC, frozenset({ExportKind.NONE})
        else:
            stability = (
                MappingStability.ELASTIC if info.is_vmm else MappingStability.STATIC
            )
            exports = export_kinds_of(info)
        return KVMemoryCapabilities(
            name="discovered-cuda",
            memory_kind=MemoryKind.CUDA,
            layouts=frozenset({"LBNHC"}),
            can_restride=False,
            stability=stability,
            export_kinds=exports,
        )

    def __repr__(self) -> str:
        origin = self._info.origin if self._info is not None else "nothing mapped"
        return (
            f"DiscoveredCudaMemory(span=0x{self._span.base:x}+{self._span.nbytes}, "
            f"device={self._span.device}, {origin}, extents={len(self._extents)}, "
            f"epoch={self._epoch})"
        )


__all__ = [
    "CudaDriverError",
    "active_nvlinks",
    "cuda_ipc_read_available",
    "CudaPointerInfo",
    "DiscoveredCudaMemory",
    "cuda_allocation_granularity",
    "describe_cuda_pointer",
    "discover_cuda_extents",
    "export_kinds_of",
]
