"""Where a KV block's bytes sit in a reservation, and block <-> chunk math.

``BlockGeometry`` describes vLLM's per-layer views over one flat buffer
(``KVCacheTensor``: offset, layer stride, block stride, page). ``Pieces``
flattens one or more geometries into the contiguous pieces of block 0; every
other block is those pieces shifted by its stride. The chunk functions answer,
vectorised over runs of blocks, which physical chunks a block needs and which
blocks a chunk holds: what the allocator maps, unmaps and counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    KV_LAYOUT_AXES,
    heads_inside_block,
)
from elastic_nixl.runs import IntArray, Runs, as_ids, coverage


def check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer setting, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
        check_int("page_bytes", self.page_bytes, 1)
        check_int("block_stride", self.block_stride, 1)
        check_int("num_layers", self.num_layers, 1)
        check_int("layer_stride", self.layer_stride, 0 if self.num_layers == 1 else 1)
        check_int("offset", self.offset, 0)
        check_int("num_segments", self.num_segments, 1)
        check_int("segment_stride", self.segment_stride, 0)
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
        check_int("num_blocks", num_blocks, 1)
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
        if layout not in ALL_KV_LAYOUTS:
            raise ValueError(
                f"unknown KV layout {layout!r}; choose one of {sorted(ALL_KV_LAYOUTS)}"
            )
        # Logical axis index of each physical position, e.g. LBNHC -> L,B,N,H,C.
        order = [KV_LAYOUT_AXES.index(axis) for axis in layout]
        L, B, H = (KV_LAYOUT_AXES.index(a) for a in "LBH")
        shape = (
            check_int("num_layers", num_layers, 1),
            check_int("num_blocks", num_blocks, 1),
            check_int("num_heads", num_heads, 1),
            check_int("num_tokens", num_tokens, 1),
            check_int("content_bytes", content_bytes, 1),
        )
        strides = [0] * 5
        current = 1
        for dim in reversed(order):
            strides[dim] = current
            current *= shape[dim]
        page = num_heads * num_tokens * content_bytes
        one_piece = heads_inside_block(layout)
        return cls(
            page_bytes=page,
            block_stride=strides[B],
            layer_stride=strides[L],
            num_layers=num_layers,
            offset=offset,
            num_segments=1 if one_piece else num_heads,
            segment_stride=0 if one_piece else strides[H],
        )

    def piece_offsets(self) -> IntArray:
        """Byte offset of each piece of block 0, layer-major (l, s)."""
        layers = np.arange(self.num_layers, dtype=np.int64) * self.layer_stride
        segs = np.arange(self.num_segments, dtype=np.int64) * self.segment_stride
        return (self.offset + layers[:, None] + segs[None, :]).reshape(-1)

    def reservation_bytes(self, num_blocks: int) -> int:
        """Bytes from the reservation start to the end of block ``num_blocks-1``."""
        check_int("num_blocks", num_blocks, 1)
        last = int(self.piece_offsets().max())
        return last + (num_blocks - 1) * self.block_stride + self.segment_bytes

    def byte_ranges(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[IntArray, int]:
        """Start offsets ``(len(ids), num_pieces)`` of each block's pieces, and
        the bytes of one piece. Row ``i`` is layer-major (l, s)."""
        ids = as_ids(block_ids)
        starts = ids[:, None] * self.block_stride + self.piece_offsets()[None, :]
        return starts, self.segment_bytes


GeometryLike = BlockGeometry | Sequence[BlockGeometry]


@dataclass(frozen=True, eq=False)
class Pieces:
    """Every contiguous piece of block 0 over one or more geometries.

    Block ``b``'s pieces are ``[base + b*stride, + nbytes)``.
    """

    base: IntArray
    nbytes: IntArray
    stride: IntArray

    @classmethod
    def of(cls, geometry: GeometryLike) -> Pieces:
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


def chunk_runs_of_blocks(p: Pieces, blocks: Runs, chunk: int) -> Runs:
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
    return coverage(np.concatenate(lo_parts), np.concatenate(hi_parts), 1)


def block_runs_touching(p: Pieces, chunks: Runs, chunk: int, num_blocks: int) -> Runs:
    """Blocks with at least one byte inside ``chunks``."""
    if not chunks:
        return Runs.empty()
    a = chunks.starts[None, :] * chunk
    e = chunks.ends[None, :] * chunk
    base, nb, st = p.base[:, None], p.nbytes[:, None], p.stride[:, None]
    lo = np.clip((a - nb - base) // st + 1, 0, num_blocks)
    hi = np.clip((e - base - 1) // st + 1, 0, num_blocks)
    return coverage(lo.ravel(), hi.ravel(), 1)


def block_runs_inside(p: Pieces, chunks: Runs, chunk: int, num_blocks: int) -> Runs:
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
    return coverage(lo.ravel(), hi.ravel(), p.count)


def chunks_for_blocks(
    geometry: GeometryLike, block_ids: Iterable[int] | npt.ArrayLike, chunk_bytes: int
) -> IntArray:
    """Sorted chunk indices that must be mapped for ``block_ids`` to be usable."""
    check_int("chunk_bytes", chunk_bytes, 1)
    return chunk_runs_of_blocks(
        Pieces.of(geometry), Runs.from_ids(block_ids), chunk_bytes
    ).ids()


def blocks_in_chunk(
    geometry: GeometryLike, chunk: int, chunk_bytes: int, num_blocks: int
) -> tuple[IntArray, IntArray]:
    """``(fully, partially)``: blocks all of whose bytes lie in chunk ``chunk``,
    and blocks with some byte in it (fully is a subset of partially)."""
    check_int("chunk", chunk, 0)
    check_int("chunk_bytes", chunk_bytes, 1)
    check_int("num_blocks", num_blocks, 1)
    p = Pieces.of(geometry)
    one = Runs.range(chunk, chunk + 1)
    return (
        block_runs_inside(p, one, chunk_bytes, num_blocks).ids(),
        block_runs_touching(p, one, chunk_bytes, num_blocks).ids(),
    )
