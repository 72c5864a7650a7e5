"""Pure planning: which layout, what to register, which descriptors a read needs.

Plain functions over plain data (ints, tuples, numpy arrays). Nothing here
imports vLLM or NIXL, so all of it is tested without either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from elastic_nixl.capabilities import (
    DEFAULT_KV_LAYOUT,
    ExportKind,
    KVMemoryCapabilities,
    MemoryKind,
)
from elastic_nixl.config import AllocatorChoice, TransferPath
from elastic_nixl.runs import Runs, Span

# vLLM's NixlConnector asks for this layout (its old name: HND).
VLLM_NIXL_PREFERRED_LAYOUT = "LBHNC"


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def choose_kv_layout(
    allocator: AllocatorChoice,
    use_mla: bool,
    capabilities: KVMemoryCapabilities | None,
) -> str | None:
    """The layout ElasticNixlConnector asks vLLM for.

    ``None`` for MLA (layout does not matter; vLLM's default), vLLM's own
    preference for the static buffer and for allocators that can produce it,
    and the non-restrided default (``LBNHC``, the old NHD) when the memory
    behind the tensors is not known at config time (``auto``: a foreign
    allocator such as kvcached cannot re-stride its tensors) or the allocator
    says it cannot produce the preferred one.
    """
    if use_mla:
        return None
    if allocator is AllocatorChoice.STATIC:
        return VLLM_NIXL_PREFERRED_LAYOUT
    if capabilities is None:
        return DEFAULT_KV_LAYOUT
    if capabilities.can_restride and VLLM_NIXL_PREFERRED_LAYOUT in capabilities.layouts:
        return VLLM_NIXL_PREFERRED_LAYOUT
    if DEFAULT_KV_LAYOUT in capabilities.layouts:
        return DEFAULT_KV_LAYOUT
    return sorted(capabilities.layouts)[0]


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationPlan:
    """What to change in NIXL so that exactly ``desired`` is registered."""

    register: tuple[Span, ...]
    deregister: tuple[Span, ...]

    @property
    def is_noop(self) -> bool:
        return not self.register and not self.deregister


def plan_registration(
    registered: Iterable[Span], desired: Iterable[Span]
) -> RegistrationPlan:
    """Diff registered extents against the desired set.

    Desired extents are deduplicated (many layer tensors share one backing
    allocation); overlapping distinct extents are a bug in the memory
    description and are refused rather than registered twice.
    """
    want = sorted(set(desired))
    for (base_a, len_a), (base_b, _) in zip(want, want[1:], strict=False):
        if base_a + len_a > base_b:
            raise ValueError(
                f"extents overlap: [{base_a:#x}, +{len_a}) and [{base_b:#x}, ...): "
                "each byte must be registered exactly once"
            )
    have = set(registered)
    want_set = set(want)
    return RegistrationPlan(
        register=tuple(s for s in want if s not in have),
        deregister=tuple(sorted(have - want_set)),
    )


# --------------------------------------------------------------------------
# Descriptors for one read
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionGeometry:
    """One transfer region: block ``b`` is ``[base + b*block_stride, +block_len)``
    for ``0 <= b < num_blocks`` (None: unbounded, for callers that check ids
    themselves)."""

    base: int
    block_len: int
    block_stride: int
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_len <= 0 or self.block_stride < self.block_len:
            raise ValueError(
                f"region at {self.base:#x}: block_len={self.block_len} "
                f"block_stride={self.block_stride} is not a valid geometry"
            )
        if self.num_blocks is not None and self.num_blocks < 0:
            raise ValueError(f"region at {self.base:#x}: num_blocks < 0")

    def out_of_range(self, ids: np.ndarray) -> np.ndarray:
        """Mask of ids that are not blocks of this region (checked before any
        address arithmetic, which would otherwise wrap in int64)."""
        bad = ids < 0
        if self.num_blocks is not None:
            bad |= ids >= self.num_blocks
        return bad


class DescriptorPlanError(ValueError):
    """A read would touch memory outside what a side has registered."""

    def __init__(
        self,
        side: str,
        region: int,
        block_ids: Sequence[int],
        what: str = "memory the {side} side registered",
    ) -> None:
        self.side = side
        self.region = region
        self.block_ids = tuple(block_ids)
        shown = list(self.block_ids[:8])
        more = f" (+{len(self.block_ids) - 8} more)" if len(self.block_ids) > 8 else ""
        super().__init__(
            f"{side} block(s) {shown}{more} of region {region} lie outside the "
            + what.format(side=side)
        )


@dataclass(frozen=True)
class ExtentIndex:
    """Registered extents of one side, searchable by address.

    A descriptor must lie inside one registration (``next_boundary``); a
    block is readable when registered memory covers it (``uncovered``), even
    across abutting registrations.
    """

    bases: np.ndarray  # sorted int64 extent starts
    ends: np.ndarray  # matching extent ends
    cover: Runs  # merged contiguous coverage

    @classmethod
    def build(cls, extents: Iterable[Span]) -> ExtentIndex:
        ext = sorted(extents)
        return cls(
            bases=np.array([b for b, _ in ext], dtype=np.int64),
            ends=np.array([b + n for b, n in ext], dtype=np.int64),
            cover=Runs.from_spans(ext),
        )

    def uncovered(self, addrs: np.ndarray, length: int) -> np.ndarray:
        """Mask of ``[addr, addr+length)`` ranges not inside registered memory."""
        return ~self.cover.covers(addrs, length)

    def next_boundary(self, addr: int) -> int:
        """End of the single registration that contains ``addr``."""
        i = int(np.searchsorted(self.bases, addr, side="right")) - 1
        return int(self.ends[i])


@dataclass(frozen=True)
class ReadPlan:
    """Matched descriptor rows ``(addr, len, device)`` for local and remote."""

    local: np.ndarray
    remote: np.ndarray
    num_blocks: int

    @property
    def num_descs(self) -> int:
        return int(self.local.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.local[:, 1].sum()) if self.num_descs else 0


def _runs(ids_a: np.ndarray, ids_b: np.ndarray, contiguous: bool) -> list[slice]:
    """Split positions into runs where both id sequences step by one."""
    n = len(ids_a)
    if n == 0:
        return []
    if not contiguous:
        return [slice(i, i + 1) for i in range(n)]
    breaks = np.nonzero((np.diff(ids_a) != 1) | (np.diff(ids_b) != 1))[0] + 1
    edges = [0, *breaks.tolist(), n]
    return [slice(s, e) for s, e in zip(edges, edges[1:], strict=False)]


def plan_read(
    local_regions: Sequence[RegionGeometry],
    remote_regions: Sequence[RegionGeometry],
    local_block_ids: Sequence[Sequence[int]],
    remote_block_ids: Sequence[Sequence[int]],
    local_extents: ExtentIndex,
    remote_extents: ExtentIndex,
    local_device: int = 0,
    remote_device: int = 0,
) -> ReadPlan:
    """Descriptors that copy remote blocks into local blocks, region by region.

    ``*_block_ids[i]`` are the block ids of region ``i``. Runs of blocks that
    are consecutive on both sides and densely packed (``stride == len``)
    become one descriptor; descriptors are cut where a registration ends so
    each lies inside one registered extent, as NIXL requires. A block outside
    registered memory on either side raises :class:`DescriptorPlanError`
    naming it, so nothing is posted.
    """
    if len(local_regions) != len(remote_regions):
        raise ValueError(
            f"region count differs: local {len(local_regions)}, "
            f"remote {len(remote_regions)}"
        )
    local_rows: list[tuple[int, int]] = []
    remote_rows: list[tuple[int, int]] = []
    total_blocks = 0
    for i, (lg, rg) in enumerate(zip(local_regions, remote_regions, strict=True)):
        lids = np.asarray(local_block_ids[i], dtype=np.int64)
        rids = np.asarray(remote_block_ids[i], dtype=np.int64)
        if len(lids) != len(rids):
            raise ValueError(
                f"region {i}: {len(lids)} local blocks vs {len(rids)} remote blocks"
            )
        if lg.block_len != rg.block_len:
            raise ValueError(
                f"region {i}: local block_len {lg.block_len} != remote {rg.block_len}"
            )
        if len(lids) == 0:
            continue
        for side, ids, geom in (("local", lids, lg), ("remote", rids, rg)):
            bad = geom.out_of_range(ids)
            if bad.any():
                raise DescriptorPlanError(
                    side, i, ids[bad].tolist(), f"{geom.num_blocks} blocks it has"
                )
        laddr = lg.base + lids * lg.block_stride
        raddr = rg.base + rids * rg.block_stride
        for side, addrs, ids, index in (
            ("local", laddr, lids, local_extents),
            ("remote", raddr, rids, remote_extents),
        ):
            bad = index.uncovered(addrs, lg.block_len)
            if bad.any():
                raise DescriptorPlanError(side, i, ids[bad].tolist())
        total_blocks += len(lids)
        dense = lg.block_stride == lg.block_len and rg.block_stride == rg.block_len
        for run in _runs(lids, rids, dense):
            lo = int(laddr[run.start])
            ro = int(raddr[run.start])
            remaining = (run.stop - run.start) * lg.block_len
            while remaining > 0:
                cut = min(
                    remaining,
                    local_extents.next_boundary(lo) - lo,
                    remote_extents.next_boundary(ro) - ro,
                )
                local_rows.append((lo, cut))
                remote_rows.append((ro, cut))
                lo += cut
                ro += cut
                remaining -= cut
    return ReadPlan(
        local=_rows(local_rows, local_device),
        remote=_rows(remote_rows, remote_device),
        num_blocks=total_blocks,
    )


def _rows(rows: list[tuple[int, int]], device: int) -> np.ndarray:
    out = np.empty((len(rows), 3), dtype=np.uint64)
    if rows:
        arr = np.asarray(rows, dtype=np.uint64)
        out[:, 0] = arr[:, 0]
        out[:, 1] = arr[:, 1]
        out[:, 2] = device
    return out


# --------------------------------------------------------------------------
# Transfer path
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferPathChoice:
    path: TransferPath  # DIRECT or STAGED
    reason: str


def choose_transfer_path(
    memory_kind: MemoryKind,
    export_kinds: frozenset[ExportKind],
    setting: TransferPath,
    read_fast: bool | None = None,
) -> TransferPathChoice:
    """Direct unless a peer's READ of this memory would crawl.

    Two measured reasons stage (push through slots with WRITE) instead:

    * GPU memory that is not legacy-IPC exportable (VMM): UCX's cuda_ipc lane
      cannot map it and moves it by software emulation over TCP (~0.4 GB/s on
      2xH200 against ~150-200 GB/s for cudaMalloc memory, docs/gpu.md);
    * ``read_fast`` False: UCX turns cuda_ipc READ off on a GPU with no active
      NVLink ("cuda-ipc get zcopy disabled as no nvlinks detected"), so even
      cudaMalloc memory is READ at ~0.4 GB/s while a WRITE runs at ~190 GB/s
      (one H100). None: not known (host memory).
    """
    not_exportable = (
        memory_kind is MemoryKind.CUDA
        and ExportKind.LEGACY_CUDA_IPC not in export_kinds
    )
    no_fast_read = memory_kind is MemoryKind.CUDA and read_fast is False
    if setting is TransferPath.DIRECT:
        why = "transfer_path='direct'"
        if not_exportable:
            why += (
                ": this GPU memory is not legacy-IPC exportable, so UCX will move "
                "it by software emulation over TCP (~0.4 GB/s on H200)"
            )
        elif no_fast_read:
            why += (
                ": this GPU has no active NVLink, so UCX serves a peer's READ by "
                "software emulation over TCP (~0.4 GB/s)"
            )
        return TransferPathChoice(TransferPath.DIRECT, why)
    if setting is TransferPath.STAGED:
        return TransferPathChoice(TransferPath.STAGED, "transfer_path='staged'")
    if not_exportable:
        return TransferPathChoice(
            TransferPath.STAGED,
            f"GPU memory exportable only as {sorted(k.value for k in export_kinds)}, "
            "not legacy CUDA IPC: UCX cuda_ipc cannot map it and would fall back "
            "to software emulation over TCP; pushing through slots instead",
        )
    if no_fast_read:
        return TransferPathChoice(
            TransferPath.STAGED,
            "no active NVLink on this GPU: UCX turns cuda_ipc READ off (a peer's "
            "READ would be software emulation over TCP, ~0.4 GB/s) while WRITE "
            "stays fast; pushing through slots with WRITE instead",
        )
    return TransferPathChoice(
        TransferPath.DIRECT, "memory is exportable to the transport"
    )


def blocks_beyond(
    block_ids: Sequence[Sequence[int]],
    regions: Sequence[RegionGeometry],
    engine_id: str,
) -> str | None:
    """Why ``block_ids`` (per KV cache group) name blocks a peer does not have,
    or None: the first few ids at or beyond its smallest region's capacity."""
    known = [r.num_blocks for r in regions if r.num_blocks is not None]
    if not known:
        return None
    capacity = min(known)
    bad = sorted({int(b) for group in block_ids for b in group if int(b) >= capacity})
    if not bad:
        return None
    more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
    return (
        f"remote block(s) {bad[:8]}{more} are beyond the {capacity} blocks engine "
        f"{engine_id} has (kv_transfer_params['remote_block_ids'])"
    )
