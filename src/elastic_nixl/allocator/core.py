"""Backend-independent core of the elastic KV allocator.

An elastic KV cache is one large virtual reservation holding ``V`` blocks in
the flat-buffer layout vLLM 0.32 views (``allocate_kv_cache`` /
``create_kv_cache_views``), with physical memory mapped on demand in
``chunk_bytes`` units. This module holds everything that does not depend on
where the bytes live:

* ``BlockGeometry``: where block ``b`` of layer ``l`` sits in the reservation.
* ``Runs``: integer sets as sorted runs, so that the state of a million-block
  reservation costs O(runs), not O(V).
* block <-> chunk math, as pure vectorised functions.
* ``VmmKVAllocator``: page table, grow/shrink, leases, epochs and mapping
  events; it implements ``capabilities.KVMemory``.
* ``MemoryBackend``: the few operations a backend (host mmap, CUDA VMM) gives.

Torch is imported lazily (only ``tensor()`` needs it), so the allocator and
its math load in a fraction of a second.
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from elastic_nixl.allocator import registry
from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    ExportKind,
    KVMemoryCapabilities,
    KVMemoryError,
    MappingEvent,
    MappingEventKind,
    MappingListener,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]

# Logical axes of vLLM's 5D KV view [L, B, H, N, C] and each KVCacheLayout's
# physical order (vllm/v1/kv_cache_layout.py), copied so we need no vLLM.
_L, _B, _H, _N, _C = 0, 1, 2, 3, 4
_LAYOUT_ORDERS: dict[str, tuple[int, ...]] = {
    "LBHNC": (_L, _B, _H, _N, _C),
    "LBNHC": (_L, _B, _N, _H, _C),
    "LHBNC": (_L, _H, _B, _N, _C),
    "BLHNC": (_B, _L, _H, _N, _C),
    "BLNHC": (_B, _L, _N, _H, _C),
    "BHLNC": (_B, _H, _L, _N, _C),
}
assert frozenset(_LAYOUT_ORDERS) == ALL_KV_LAYOUTS
TRANSFERABLE_KV_LAYOUTS = frozenset({"LBHNC", "LBNHC", "BLHNC", "BLNHC"})


def _check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer setting, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_ids(block_ids: Iterable[int] | npt.ArrayLike) -> IntArray:
    """Block ids as a 1-D int64 array, refusing non-integers."""
    if isinstance(block_ids, np.ndarray):
        arr = block_ids
    elif isinstance(block_ids, range):
        arr = np.arange(block_ids.start, block_ids.stop, block_ids.step, np.int64)
    else:
        arr = np.asarray(list(block_ids))  # type: ignore[arg-type]
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"block ids must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


# --------------------------------------------------------------------- runs


class Runs:
    """A set of integers as sorted, disjoint, non-touching runs ``[start, end)``.

    Block ids and chunk indices are kept this way so that ``grow_to(V)``, the
    mapped-block count and the chunk <-> block math cost O(runs).
    """

    __slots__ = ("ends", "starts")

    def __init__(self, starts: IntArray, ends: IntArray) -> None:
        # Internal: callers pass normalised runs (use the classmethods).
        self.starts = starts
        self.ends = ends

    @classmethod
    def empty(cls) -> Runs:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def range(cls, start: int, end: int) -> Runs:
        if end <= start:
            return cls.empty()
        return cls(np.array([start], np.int64), np.array([end], np.int64))

    @classmethod
    def from_ids(cls, ids: Iterable[int] | npt.ArrayLike) -> Runs:
        u = np.unique(_as_ids(ids))
        if u.size == 0:
            return cls.empty()
        brk = np.flatnonzero(np.diff(u) != 1) + 1
        starts = u[np.concatenate(([0], brk))]
        ends = u[np.concatenate((brk - 1, [u.size - 1]))] + 1
        return cls(starts, ends)

    @classmethod
    def from_intervals(cls, starts: npt.ArrayLike, ends: npt.ArrayLike) -> Runs:
        """Union of arbitrary (overlapping, unsorted, maybe empty) intervals."""
        return _coverage(np.asarray(starts, np.int64), np.asarray(ends, np.int64), 1)

    def __len__(self) -> int:
        return int(self.starts.size)

    @property
    def count(self) -> int:
        """How many integers the set holds."""
        return int((self.ends - self.starts).sum())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts.tolist(), self.ends.tolist(), strict=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Runs):
            return NotImplemented
        return bool(
            np.array_equal(self.starts, other.starts)
            and np.array_equal(self.ends, other.ends)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"[{s}, {e})" for s, e in list(self)[:8])
        more = f", ... ({len(self)} runs)" if len(self) > 8 else ""
        return f"Runs({shown}{more})"

    def ids(self) -> IntArray:
        """Every integer in the set, ascending (vectorised)."""
        lens = self.ends - self.starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        offsets = np.repeat(self.starts - (np.cumsum(lens) - lens), lens)
        return np.arange(total, dtype=np.int64) + offsets

    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Elementwise membership of ``ids``."""
        arr = np.asarray(ids, np.int64)
        if self.starts.size == 0:
            return np.zeros(arr.shape, bool)
        i = np.searchsorted(self.starts, arr, "right") - 1
        return (i >= 0) & (arr < self.ends[np.maximum(i, 0)])

    def union(self, other: Runs) -> Runs:
        if not other:
            return self
        if not self:
            return other
        return _combine(self, other, np.logical_or)

    def intersection(self, other: Runs) -> Runs:
        if not self or not other:
            return Runs.empty()
        return _combine(self, other, np.logical_and)

    def difference(self, other: Runs) -> Runs:
        if not self or not other:
            return self
        return _combine(self, other, lambda a, b: a & ~b)


def _runs_from_mask(xs: IntArray, selected: npt.NDArray[np.bool_]) -> Runs:
    """Runs from the elementary segments ``[xs[i], xs[i+1])`` marked selected."""
    if not selected.any():
        return Runs.empty()
    edges = np.diff(np.concatenate(([False], selected, [False])).astype(np.int8))
    return Runs(xs[np.flatnonzero(edges == 1)], xs[np.flatnonzero(edges == -1)])


def _coverage(starts: IntArray, ends: IntArray, min_count: int) -> Runs:
    """Integers covered by at least ``min_count`` of the intervals."""
    keep = starts < ends
    s = np.sort(starts[keep])
    e = np.sort(ends[keep])
    if s.size == 0:
        return Runs.empty()
    xs = np.unique(np.concatenate((s, e)))
    count = np.searchsorted(s, xs, "right") - np.searchsorted(e, xs, "right")
    return _runs_from_mask(xs, count[:-1] >= min_count)


def _combine(
    a: Runs,
    b: Runs,
    op: Callable[[npt.NDArray[np.bool_], npt.NDArray[np.bool_]], Any],
) -> Runs:
    xs = np.unique(np.concatenate((a.starts, a.ends, b.starts, b.ends)))
    in_a = np.searchsorted(a.starts, xs, "right") > np.searchsorted(a.ends, xs, "right")
    in_b = np.searchsorted(b.starts, xs, "right") > np.searchsorted(b.ends, xs, "right")
    return _runs_from_mask(xs, np.asarray(op(in_a, in_b))[:-1])


# ----------------------------------------------------------------- geometry


@dataclass(frozen=True)
class BlockGeometry:
    """Where each block's bytes sit in the reservation (vLLM's KVCacheTensor).

    Block ``b`` of layer ``l`` is ``num_segments`` runs of
    ``page_bytes // num_segments`` bytes starting at
    ``offset + l*layer_stride + b*block_stride + s*segment_stride``. With one
    segment (every layout whose heads are inside the block: LBHNC, LBNHC,
    BLHNC, BLNHC) that is ``[offset + l*layer_stride + b*block_stride,
    + page_bytes)``. LHBNC and BHLNC put the head axis outside the block
    axis, so a block of a layer is one segment per head.
    """

    page_bytes: int
    block_stride: int
    layer_stride: int
    num_layers: int
    offset: int = 0
    num_segments: int = 1
    segment_stride: int = 0

    def __post_init__(self) -> None:
        _check_int("page_bytes", self.page_bytes, 1)
        _check_int("block_stride", self.block_stride, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("layer_stride", self.layer_stride, 0 if self.num_layers == 1 else 1)
        _check_int("offset", self.offset, 0)
        _check_int("num_segments", self.num_segments, 1)
        _check_int("segment_stride", self.segment_stride, 0)
        if self.page_bytes % self.num_segments:
            raise ValueError(
                f"page_bytes {self.page_bytes} is not divisible by "
                f"num_segments {self.num_segments}"
            )
        if self.num_segments > 1 and self.segment_stride < self.segment_bytes:
            raise ValueError(
                f"segment_stride {self.segment_stride} is smaller than a segment "
                f"({self.segment_bytes} bytes): segments would overlap"
            )
        if self.block_stride < self.segment_bytes:
            raise ValueError(
                f"block_stride {self.block_stride} is smaller than the bytes of one "
                f"contiguous piece of a block ({self.segment_bytes}): blocks would "
                "overlap"
            )

    @property
    def segment_bytes(self) -> int:
        """Bytes of one contiguous piece of a block of a layer."""
        return self.page_bytes // self.num_segments

    @property
    def num_pieces(self) -> int:
        """Contiguous pieces per block (all layers)."""
        return self.num_layers * self.num_segments

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        return self.page_bytes * self.num_layers

    @classmethod
    def layer_outermost(
        cls, page_bytes: int, num_layers: int, num_blocks: int, offset: int = 0
    ) -> BlockGeometry:
        """LBHNC / LBNHC: each layer owns ``num_blocks`` consecutive pages."""
        _check_int("num_blocks", num_blocks, 1)
        return cls(
            page_bytes=page_bytes,
            block_stride=page_bytes,
            layer_stride=page_bytes * num_blocks,
            num_layers=num_layers,
            offset=offset,
        )

    @classmethod
    def block_outermost(
        cls,
        page_bytes: int,
        num_layers: int,
        offset: int = 0,
        block_stride: int | None = None,
    ) -> BlockGeometry:
        """BLHNC / BLNHC: each block holds every layer's page back to back.

        ``block_stride`` defaults to ``num_layers * page_bytes``; pass vLLM's
        ``bytes_per_block`` when several KV cache groups share each block.
        """
        return cls(
            page_bytes=page_bytes,
            block_stride=num_layers * page_bytes
            if block_stride is None
            else block_stride,
            layer_stride=page_bytes,
            num_layers=num_layers,
            offset=offset,
        )

    @classmethod
    def for_layout(
        cls,
        layout: str,
        *,
        num_layers: int,
        num_blocks: int,
        num_heads: int,
        num_tokens: int,
        content_bytes: int,
        offset: int = 0,
    ) -> BlockGeometry:
        """The geometry of vLLM's views for ``layout`` (unpadded pages).

        Mirrors ``compute_layout_strides`` over the logical shape
        ``[L, B, H, N, C]`` with ``C`` in bytes (``content_bytes``).
        """
        order = _LAYOUT_ORDERS.get(layout)
        if order is None:
            raise ValueError(
                f"unknown KV layout {layout!r}; choose one of {sorted(ALL_KV_LAYOUTS)}"
            )
        shape = (
            _check_int("num_layers", num_layers, 1),
            _check_int("num_blocks", num_blocks, 1),
            _check_int("num_heads", num_heads, 1),
            _check_int("num_tokens", num_tokens, 1),
            _check_int("content_bytes", content_bytes, 1),
        )
        strides = [0] * 5
        current = 1
        for dim in reversed(order):
            strides[dim] = current
            current *= shape[dim]
        page = num_heads * num_tokens * content_bytes
        heads_inside_block = order.index(_H) > max(order.index(_L), order.index(_B))
        return cls(
            page_bytes=page,
            block_stride=strides[_B],
            layer_stride=strides[_L],
            num_layers=num_layers,
            offset=offset,
            num_segments=1 if heads_inside_block else num_heads,
            segment_stride=0 if heads_inside_block else strides[_H],
        )

    def piece_offsets(self) -> IntArray:
        """Byte offset of each piece of block 0, layer-major (l, s)."""
        layers = np.arange(self.num_layers, dtype=np.int64) * self.layer_stride
        segs = np.arange(self.num_segments, dtype=np.int64) * self.segment_stride
        return (self.offset + layers[:, None] + segs[None, :]).reshape(-1)

    def reservation_bytes(self, num_blocks: int) -> int:
        """Bytes from the reservation start to the end of block ``num_blocks-1``."""
        _check_int("num_blocks", num_blocks, 1)
        last = int(self.piece_offsets().max())
        return last + (num_blocks - 1) * self.block_stride + self.segment_bytes

    def byte_ranges(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[IntArray, int]:
        """Start offsets ``(len(ids), num_pieces)`` of each block's pieces, and
        the bytes of one piece. Row ``i`` is layer-major (l, s)."""
        ids = _as_ids(block_ids)
        starts = ids[:, None] * self.block_stride + self.piece_offsets()[None, :]
        return starts, self.segment_bytes


GeometryLike = BlockGeometry | Sequence[BlockGeometry]


@dataclass(frozen=True, eq=False)
class _Pieces:
    """Every contiguous piece of block 0 over one or more geometries.

    Block ``b``'s pieces are ``[base + b*stride, + nbytes)``.
    """

    base: IntArray
    nbytes: IntArray
    stride: IntArray

    @classmethod
    def of(cls, geometry: GeometryLike) -> _Pieces:
        geoms = [geometry] if isinstance(geometry, BlockGeometry) else list(geometry)
        if not geoms:
            raise ValueError("geometry must name at least one BlockGeometry")
        for g in geoms:
            if not isinstance(g, BlockGeometry):
                raise TypeError(f"expected BlockGeometry, got {type(g).__name__}")
        base = np.concatenate([g.piece_offsets() for g in geoms])
        nbytes = np.concatenate(
            [np.full(g.num_pieces, g.segment_bytes, np.int64) for g in geoms]
        )
        stride = np.concatenate(
            [np.full(g.num_pieces, g.block_stride, np.int64) for g in geoms]
        )
        return cls(base, nbytes, stride)

    @property
    def count(self) -> int:
        return int(self.base.size)


def _chunk_runs_of_blocks(p: _Pieces, blocks: Runs, chunk: int) -> Runs:
    """Chunks touched by any byte of any block in ``blocks``.

    For pieces whose gap to the next block (stride - nbytes) is below a chunk,
    no chunk can fall between two blocks, so a run of blocks touches one run
    of chunks. Pieces with larger gaps are expanded per block; each such
    (piece, block) touches chunks of its own, so that is O(touched chunks).
    """
    if not blocks:
        return Runs.empty()
    lo_parts: list[IntArray] = []
    hi_parts: list[IntArray] = []
    dense = (p.stride - p.nbytes) < chunk
    if dense.any():
        base, nb, st = p.base[dense, None], p.nbytes[dense, None], p.stride[dense, None]
        s, e = blocks.starts[None, :], blocks.ends[None, :]
        lo_parts.append(((base + s * st) // chunk).ravel())
        hi_parts.append(((base + (e - 1) * st + nb - 1) // chunk + 1).ravel())
    if (~dense).any():
        ids = blocks.ids()[None, :]
        base, nb = p.base[~dense, None], p.nbytes[~dense, None]
        start = base + ids * p.stride[~dense, None]
        lo_parts.append((start // chunk).ravel())
        hi_parts.append(((start + nb - 1) // chunk + 1).ravel())
    return _coverage(np.concatenate(lo_parts), np.concatenate(hi_parts), 1)


def _block_runs_touching(p: _Pieces, chunks: Runs, chunk: int, num_blocks: int) -> Runs:
    """Blocks with at least one byte inside ``chunks``."""
    if not chunks:
        return Runs.empty()
    a = chunks.starts[None, :] * chunk
    e = chunks.ends[None, :] * chunk
    base, nb, st = p.base[:, None], p.nbytes[:, None], p.stride[:, None]
    lo = np.clip((a - nb - base) // st + 1, 0, num_blocks)
    hi = np.clip((e - base - 1) // st + 1, 0, num_blocks)
    return _coverage(lo.ravel(), hi.ravel(), 1)


def _block_runs_inside(p: _Pieces, chunks: Runs, chunk: int, num_blocks: int) -> Runs:
    """Blocks all of whose bytes are inside ``chunks``.

    Per piece, the blocks whose piece lies inside one chunk run form one
    interval per run, disjoint across runs; a block is inside iff every piece
    is, i.e. it is covered by ``num_pieces`` intervals.
    """
    if not chunks:
        return Runs.empty()
    a = chunks.starts[None, :] * chunk
    e = chunks.ends[None, :] * chunk
    base, nb, st = p.base[:, None], p.nbytes[:, None], p.stride[:, None]
    lo = np.clip(-((base - a) // st), 0, num_blocks)
    hi = np.clip((e - nb - base) // st + 1, 0, num_blocks)
    return _coverage(lo.ravel(), hi.ravel(), p.count)


def chunks_for_blocks(
    geometry: GeometryLike, block_ids: Iterable[int] | npt.ArrayLike, chunk_bytes: int
) -> IntArray:
    """Sorted chunk indices that must be mapped for ``block_ids`` to be usable."""
    _check_int("chunk_bytes", chunk_bytes, 1)
    return _chunk_runs_of_blocks(
        _Pieces.of(geometry), Runs.from_ids(block_ids), chunk_bytes
    ).ids()


def blocks_in_chunk(
    geometry: GeometryLike, chunk: int, chunk_bytes: int, num_blocks: int
) -> tuple[IntArray, IntArray]:
    """``(fully, partially)``: blocks all of whose bytes lie in chunk ``chunk``,
    and blocks with some byte in it (fully is a subset of partially)."""
    _check_int("chunk", chunk, 0)
    _check_int("chunk_bytes", chunk_bytes, 1)
    _check_int("num_blocks", num_blocks, 1)
    p = _Pieces.of(geometry)
    one = Runs.range(chunk, chunk + 1)
    return (
        _block_runs_inside(p, one, chunk_bytes, num_blocks).ids(),
        _block_runs_touching(p, one, chunk_bytes, num_blocks).ids(),
    )


# ------------------------------------------------------------------ dlpack

# A minimal DLPack producer (dlpack.h, unversioned "dltensor" capsule). It
# lets torch wrap a raw address without reading it, with the device named
# explicitly rather than looked up from the pointer (torch's
# __cuda_array_interface__ path asks the driver about the pointer), and gives
# host and CUDA memory one code path that the CPU tests exercise.


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


# ----------------------------------------------------------------- backend


class MemoryBackend(abc.ABC):
    """Where the bytes come from: one reservation, mapped chunk by chunk.

    Offsets are relative to the reservation base and multiples of
    ``granularity``; the allocator never maps a range twice or unmaps a range
    it did not map.
    """

    @property
    @abc.abstractmethod
    def granularity(self) -> int:
        """Smallest unit ``map``/``unmap`` accept; chunk sizes are multiples."""

    @property
    @abc.abstractmethod
    def memory_kind(self) -> MemoryKind: ...

    @property
    @abc.abstractmethod
    def device(self) -> int:
        """Device ordinal reported in extents (0 for host memory)."""

    @property
    @abc.abstractmethod
    def export_kinds(self) -> frozenset[ExportKind]: ...

    @abc.abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of address space with nothing mapped; the base."""

    @abc.abstractmethod
    def map(self, offset: int, nbytes: int) -> None:
        """Back ``[base+offset, +nbytes)`` with memory and make it accessible."""

    @abc.abstractmethod
    def unmap(self, offset: int, nbytes: int) -> None:
        """Give the memory back; touching the range afterwards faults."""

    def quiesce(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Wait until no in-flight work can touch memory about to be unmapped."""

    @abc.abstractmethod
    def free(self) -> None:
        """Unmap anything left and release the reservation; idempotent."""

    @abc.abstractmethod
    def tensor(self, nbytes: int, keepalive: object = None) -> torch.Tensor:
        """Flat int8 tensor over the first ``nbytes`` of the reservation,
        built without touching memory; holds ``keepalive`` while alive."""


# ---------------------------------------------------------------- allocator


class BlockLease:
    """Blocks pinned mapped while a transfer reads or writes them.

    Releasing is idempotent; unmapping deferred on these blocks happens at the
    release of the last lease on them.
    """

    def __init__(self, owner: VmmKVAllocator, block_ids: tuple[int, ...]) -> None:
        self._owner = owner
        self._block_ids = block_ids
        self._unique = np.unique(np.asarray(block_ids, np.int64))
        self._released = False

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self._block_ids

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._owner._release_lease(self)

    def __enter__(self) -> BlockLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"BlockLease({len(self._block_ids)} blocks, {state})"


class _Subscription:
    __slots__ = ("listener",)

    def __init__(self, listener: MappingListener) -> None:
        self.listener = listener


class VmmKVAllocator:
    """An elastic KV cache: ``num_virtual_blocks`` of address space, physical
    memory mapped in ``chunk_bytes`` units on demand.

    Implements ``capabilities.KVMemory``. State is O(mapped): a set of mapped
    chunk indices, the blocks asked for as runs, and per-block lease counts.

    Mapping events are delivered synchronously, with the allocator's lock
    held, after the state (``epoch``, ``mapped_extents``) already shows the
    change: for ``MAPPED`` the memory is mapped; for ``UNMAPPING`` it is still
    mapped and is unmapped when the listeners return. A listener may call back
    into the allocator (the lock is reentrant) but must not block on another
    thread that needs it. A listener that raises does not stop the change; the
    error is re-raised as ``KVMemoryError`` once the change is complete.
    """

    # What the connector can know at config time, before any allocation
    # (``get_required_kvcache_layout``): every layout, re-stridable, elastic.
    # Memory kind and export kinds here are the CUDA backend's defaults; an
    # instance's ``capabilities`` reports its actual backend.
    CAPABILITIES: ClassVar[KVMemoryCapabilities] = KVMemoryCapabilities(
        name="elastic_nixl.vmm",
        memory_kind=MemoryKind.CUDA,
        # Layouts whose per-layer page of a block is one contiguous run: what
        # NIXL descriptors over elastic memory can cover (not BHLNC / LHBNC).
        layouts=TRANSFERABLE_KV_LAYOUTS,
        can_restride=True,
        stability=MappingStability.ELASTIC,
        export_kinds=frozenset({ExportKind.POSIX_FD}),
    )

    def __init__(
        self,
        backend: MemoryBackend,
        geometry: GeometryLike,
        num_virtual_blocks: int,
        chunk_bytes: int | None = None,
        name: str = "elastic-kv",
    ) -> None:
        if not isinstance(backend, MemoryBackend):
            raise TypeError(
                f"backend must be a MemoryBackend, got {type(backend).__name__}"
            )
        self._name = str(name)
        self._num_blocks = _check_int("num_virtual_blocks", num_virtual_blocks, 1)
        granularity = int(backend.granularity)
        if chunk_bytes is None:
            chunk_bytes = granularity
        chunk_bytes = _check_int("chunk_bytes", chunk_bytes, 1)
        if chunk_bytes % granularity:
            raise ValueError(
                f"chunk_bytes {chunk_bytes} is not a multiple of the "
                f"{type(backend).__name__} granularity {granularity} "
                f"(try {-(-chunk_bytes // granularity) * granularity})"
            )
        self._geometry = (
            (geometry,) if isinstance(geometry, BlockGeometry) else tuple(geometry)
        )
        self._pieces = _Pieces.of(self._geometry)
        for g in self._geometry:
            self._check_geometry(g)
        self._chunk = chunk_bytes
        span = max(g.reservation_bytes(self._num_blocks) for g in self._geometry)
        self._num_chunks = -(-span // chunk_bytes)
        self._nbytes = self._num_chunks * chunk_bytes
        self._backend = backend
        self._kind = backend.memory_kind
        self._device = int(backend.device)
        self._capabilities = dataclasses.replace(
            self.CAPABILITIES,
            name=self._name,
            memory_kind=self._kind,
            export_kinds=frozenset(backend.export_kinds),
        )

        self._lock = threading.RLock()
        self._mapped: set[int] = set()
        self._wanted = Runs.empty()
        self._lease_counts: dict[int, int] = {}
        self._leases: set[BlockLease] = set()
        # Whether a leased block may be unwanted, i.e. an unmap was deferred:
        # without one, releasing a lease has nothing to unmap (the common
        # case, kept O(lease) rather than O(mapped)).
        self._deferred = False
        self._subs: list[_Subscription] = []
        self._epoch = 0
        self._closed = False
        self._cache_epoch = 0
        self._cache_mapped = Runs.empty()
        self._cache_full = Runs.empty()
        self._extents_epoch = 0
        self._extents: tuple[MemoryExtent, ...] = ()
        self._tensor_ref: weakref.ref[torch.Tensor] | None = None

        self._base = int(backend.reserve(self._nbytes))
        self._reservation = MemoryExtent(
            self._base, self._nbytes, self._device, self._kind
        )
        self._finalizer = weakref.finalize(self, _free_backend, backend, self._name)
        registry.register(self)

    def _check_geometry(self, g: BlockGeometry) -> None:
        """Refuse a geometry built for fewer blocks than ``num_virtual_blocks``:
        its layers (or blocks) would overlap."""
        v = self._num_blocks
        if g.num_layers > 1 and g.layer_stride >= g.block_stride:
            need = (v - 1) * g.block_stride + g.segment_bytes
            if g.layer_stride < need:
                raise ValueError(
                    f"layer_stride {g.layer_stride} is too small for "
                    f"num_virtual_blocks {v} (a layer spans {need} bytes): build "
                    "the geometry with the virtual block count"
                )
        elif g.num_layers > 1 and g.block_stride < g.num_layers * g.layer_stride:
            raise ValueError(
                f"block_stride {g.block_stride} is smaller than num_layers * "
                f"layer_stride ({g.num_layers} * {g.layer_stride}): blocks overlap"
            )

    # ------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> MemoryBackend:
        return self._backend

    @property
    def geometry(self) -> tuple[BlockGeometry, ...]:
        return self._geometry

    @property
    def chunk_bytes(self) -> int:
        return self._chunk

    @property
    def num_chunks(self) -> int:
        """Chunks in the reservation (mapped or not)."""
        return self._num_chunks

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        return self._capabilities

    @property
    def reservation(self) -> MemoryExtent:
        return self._reservation

    @property
    def num_virtual_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_mapped_blocks(self) -> int:
        """Blocks all of whose bytes (every layer) are mapped."""
        with self._lock:
            return self._state()[1].count

    @property
    def num_mapped_chunks(self) -> int:
        return len(self._mapped)

    @property
    def mapped_bytes(self) -> int:
        return len(self._mapped) * self._chunk

    @property
    def epoch(self) -> int:
        return self._epoch

    def wanted_blocks(self) -> Runs:
        """Blocks mapped on request (``map_blocks``/``grow_to``) and not since
        unmapped; other blocks may be mapped because they share chunks."""
        with self._lock:
            return self._wanted

    def leased_blocks(self) -> dict[int, int]:
        """Block id -> number of live leases on it."""
        with self._lock:
            return dict(self._lease_counts)

    # ------------------------------------------------------------- queries

    def _state(self) -> tuple[Runs, Runs]:
        """(mapped chunk runs, fully mapped block runs), cached per epoch."""
        if self._cache_epoch != self._epoch:
            chunks = np.fromiter(self._mapped, np.int64, len(self._mapped))
            self._cache_mapped = Runs.from_ids(chunks)
            self._cache_full = _block_runs_inside(
                self._pieces, self._cache_mapped, self._chunk, self._num_blocks
            )
            self._cache_epoch = self._epoch
        return self._cache_mapped, self._cache_full

    def _extent(self, chunk: int) -> MemoryExtent:
        return MemoryExtent(
            self._base + chunk * self._chunk, self._chunk, self._device, self._kind
        )

    def mapped_extents(self) -> tuple[MemoryExtent, ...]:
        """One extent per mapped chunk, sorted by base."""
        with self._lock:
            if self._extents_epoch != self._epoch:
                self._extents = tuple(self._extent(c) for c in sorted(self._mapped))
                self._extents_epoch = self._epoch
            return self._extents

    def unmapped_blocks(self, block_ids: Iterable[int]) -> list[int]:
        """The ids (in the order given) that are out of range or not fully mapped."""
        ids = _as_ids(block_ids)
        with self._lock:
            ok = (ids >= 0) & (ids < self._num_blocks) & self._state()[1].contains(ids)
        return ids[~ok].tolist()

    # ------------------------------------------------------------- events

    def subscribe(self, listener: MappingListener) -> Callable[[], None]:
        """Call ``listener`` on every change (see the class docstring for when).

        Returns an idempotent unsubscribe.
        """
        if not callable(listener):
            raise TypeError("listener must be callable")
        sub = _Subscription(listener)
        with self._lock:
            self._subs.append(sub)

        def unsubscribe() -> None:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

        return unsubscribe

    def _emit(self, event: MappingEvent) -> Exception | None:
        first: Exception | None = None
        for sub in list(self._subs):
            try:
                sub.listener(event)
            except Exception as exc:
                logger.exception(
                    "%s: mapping listener %r failed on %s (epoch %d)",
                    self._name,
                    sub.listener,
                    event.kind.value,
                    event.epoch,
                )
                if first is None:
                    first = KVMemoryError(
                        f"allocator {self._name!r}: mapping listener "
                        f"{sub.listener!r} failed on {event.kind.value} event "
                        f"(epoch {event.epoch}): {exc}"
                    )
                    first.__cause__ = exc
        return first

    # ------------------------------------------------------------- mapping

    def _ensure_open(self) -> None:
        if self._closed:
            raise KVMemoryError(f"allocator {self._name!r} is closed")

    def _checked_ids(self, block_ids: Iterable[int] | npt.ArrayLike) -> IntArray:
        ids = _as_ids(block_ids)
        bad = ids[(ids < 0) | (ids >= self._num_blocks)]
        if bad.size:
            more = f" ({bad.size} ids out of range)" if bad.size > 1 else ""
            raise ValueError(
                f"block id {int(bad[0])} out of range [0, {self._num_blocks}) of "
                f"allocator {self._name!r}{more}"
            )
        return ids

    def _check_count(self, num_blocks: int) -> int:
        n = _check_int("num_blocks", num_blocks, 0)
        if n > self._num_blocks:
            raise ValueError(
                f"num_blocks {n} exceeds num_virtual_blocks {self._num_blocks} of "
                f"allocator {self._name!r}"
            )
        return n

    def map_blocks(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[MemoryExtent, ...]:
        """Map every chunk the blocks touch (all layers); the newly mapped extents.

        Emits one ``MAPPED`` event and bumps the epoch once if anything was
        mapped. On failure nothing is left half-mapped.
        """
        with self._lock:
            self._ensure_open()
            return self._map_runs(Runs.from_ids(self._checked_ids(block_ids)))

    def grow_to(self, num_blocks: int) -> tuple[MemoryExtent, ...]:
        """Map blocks ``[0, num_blocks)``; the newly mapped extents."""
        with self._lock:
            self._ensure_open()
            return self._map_runs(Runs.range(0, self._check_count(num_blocks)))

    def unmap_blocks(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[MemoryExtent, ...]:
        """Stop wanting the blocks; unmap chunks no wanted or leased block uses.

        Chunks holding a leased block stay mapped until its last lease is
        released. Returns the extents unmapped now.
        """
        with self._lock:
            self._ensure_open()
            return self._unmap_runs(Runs.from_ids(self._checked_ids(block_ids)))

    def shrink_to(self, num_blocks: int) -> tuple[MemoryExtent, ...]:
        """Unmap blocks ``[num_blocks, V)`` (as ``unmap_blocks``)."""
        with self._lock:
            self._ensure_open()
            n = self._check_count(num_blocks)
            return self._unmap_runs(Runs.range(n, self._num_blocks))

    def _map_runs(self, blocks: Runs) -> tuple[MemoryExtent, ...]:
        mapped_runs, _ = self._state()
        need = _chunk_runs_of_blocks(self._pieces, blocks, self._chunk).difference(
            mapped_runs
        )
        done: list[int] = []
        for c in need.ids().tolist():
            try:
                self._backend.map(c * self._chunk, self._chunk)
            except Exception as exc:
                for d in reversed(done):
                    try:
                        self._backend.unmap(d * self._chunk, self._chunk)
                    except Exception:
                        logger.exception(
                            "%s: rollback of chunk %d failed", self._name, d
                        )
                raise KVMemoryError(
                    f"allocator {self._name!r}: mapping chunk {c} "
                    f"(offset {c * self._chunk}, {self._chunk} bytes) failed; "
                    f"{len(done)} chunks mapped by this call were rolled back: {exc}"
                ) from exc
            done.append(c)
        self._wanted = self._wanted.union(blocks)
        if not done:
            return ()
        self._mapped.update(done)
        self._epoch += 1
        extents = tuple(self._extent(c) for c in done)
        error = self._emit(MappingEvent(MappingEventKind.MAPPED, extents, self._epoch))
        if error is not None:
            raise error
        return extents

    def _unmap_runs(self, blocks: Runs) -> tuple[MemoryExtent, ...]:
        self._wanted = self._wanted.difference(blocks)
        self._deferred = self._deferred or bool(self._lease_counts)
        mapped_runs, _ = self._state()
        # Only blocks that touch mapped chunks matter: keeps shrink O(mapped).
        touching = _block_runs_touching(
            self._pieces, mapped_runs, self._chunk, self._num_blocks
        )
        candidates = _chunk_runs_of_blocks(
            self._pieces, blocks.intersection(touching), self._chunk
        ).intersection(mapped_runs)
        return self._release_unneeded(candidates)

    def _release_unneeded(self, candidates: Runs) -> tuple[MemoryExtent, ...]:
        """Unmap the candidate chunks that no wanted or leased block touches."""
        if not candidates:
            return ()
        users = _block_runs_touching(
            self._pieces, candidates, self._chunk, self._num_blocks
        )
        leased = Runs.from_ids(np.fromiter(self._lease_counts, np.int64))
        keepers = users.intersection(self._wanted.union(leased))
        keep = _chunk_runs_of_blocks(self._pieces, keepers, self._chunk)
        release = candidates.difference(keep)
        if not release:
            return ()
        return self._unmap_chunks(release.ids().tolist())

    def _unmap_chunks(self, chunks: list[int]) -> tuple[MemoryExtent, ...]:
        extents = tuple(self._extent(c) for c in chunks)
        self._mapped.difference_update(chunks)
        self._epoch += 1
        error = self._emit(
            MappingEvent(MappingEventKind.UNMAPPING, extents, self._epoch)
        )
        failed: list[tuple[str, Exception]] = []
        try:
            self._backend.quiesce()
        except Exception as exc:  # unmap anyway: the state already says so
            logger.exception("%s: quiesce before unmapping failed", self._name)
            failed.append(("quiesce before unmapping", exc))
        for c in chunks:
            try:
                self._backend.unmap(c * self._chunk, self._chunk)
            except Exception as exc:
                logger.exception("%s: unmapping chunk %d failed", self._name, c)
                failed.append((f"unmapping chunk {c}", exc))
        if failed:
            what, cause = failed[0]
            raise KVMemoryError(
                f"allocator {self._name!r}: {what} failed "
                f"({len(failed)} failures unmapping {len(chunks)} chunks): {cause}"
            ) from cause
        if error is not None:
            raise error
        return extents

    # -------------------------------------------------------------- leases

    def lease(self, block_ids: Sequence[int]) -> BlockLease:
        """Pin ``block_ids`` mapped until the lease is released.

        Raises ``KVMemoryError`` naming the first block that is out of range
        or not fully mapped. Leases on the same block stack.
        """
        ids = _as_ids(block_ids)
        with self._lock:
            self._ensure_open()
            bad = self.unmapped_blocks(ids)
            if bad:
                b = bad[0]
                why = (
                    f"out of range [0, {self._num_blocks})"
                    if not 0 <= b < self._num_blocks
                    else "not mapped"
                )
                more = (
                    f" ({len(bad)} of {ids.size} blocks unusable)"
                    if len(bad) > 1
                    else ""
                )
                raise KVMemoryError(
                    f"cannot lease block {b} of allocator {self._name!r}: "
                    f"it is {why}{more}"
                )
            lease = BlockLease(self, tuple(ids.tolist()))
            for b in lease._unique.tolist():
                self._lease_counts[b] = self._lease_counts.get(b, 0) + 1
            self._leases.add(lease)
            return lease

    def _release_lease(self, lease: BlockLease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            self._leases.discard(lease)
            if self._closed:
                return
            freed: list[int] = []
            for b in lease._unique.tolist():
                n = self._lease_counts[b] - 1
                if n:
                    self._lease_counts[b] = n
                else:
                    del self._lease_counts[b]
                    freed.append(b)
            if not freed or not self._deferred:
                return
            mapped_runs, _ = self._state()
            candidates = _chunk_runs_of_blocks(
                self._pieces, Runs.from_ids(freed), self._chunk
            ).intersection(mapped_runs)
            self._release_unneeded(candidates)
            leased = Runs.from_ids(np.fromiter(self._lease_counts, np.int64))
            self._deferred = bool(leased.difference(self._wanted))

    # -------------------------------------------------------------- tensor

    def tensor(self) -> torch.Tensor:
        """Flat int8 tensor over the whole reservation (mapped or not).

        vLLM builds per-layer ``as_strided`` views over it in any layout.
        Touching unmapped bytes faults (host: SIGSEGV; CUDA: illegal address).
        The tensor keeps the allocator alive, but ``close()`` unmaps
        regardless: do not use views after closing.
        """
        with self._lock:
            self._ensure_open()
            t = self._tensor_ref() if self._tensor_ref is not None else None
            if t is None:
                t = self._backend.tensor(self._nbytes, keepalive=self)
                self._tensor_ref = weakref.ref(t)
            return t

    # ----------------------------------------------------------- lifetime

    def close(self) -> None:
        """Unmap everything (``UNMAPPING`` first), free the reservation.

        Outstanding leases become inert; idempotent.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._mapped:
                    self._unmap_chunks(sorted(self._mapped))
            finally:
                self._closed = True
                self._wanted = Runs.empty()
                self._lease_counts.clear()
                for lease in self._leases:
                    lease._released = True
                self._leases.clear()
                self._subs.clear()
                self._finalizer.detach()
                registry.unregister(self)
                self._backend.free()

    def __enter__(self) -> VmmKVAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VmmKVAllocator({self._name!r}, {self._kind.value}, "
            f"base=0x{self._base:x}, {self._num_blocks} blocks, "
            f"{len(self._mapped)}/{self._num_chunks} chunks of {self._chunk} bytes "
            f"mapped, epoch {self._epoch}{', closed' if self._closed else ''})"
        )


def _free_backend(backend: MemoryBackend, name: str) -> None:
    """Finalizer for an allocator dropped without ``close()``."""
    try:
        backend.free()
    except Exception:
        logger.exception("%s: freeing the reservation at exit failed", name)
