"""Transfer regions of elastic KV tensors, from the tensors themselves.

Mirrors what vLLM 0.32's ``NixlBaseConnectorWorker.register_kv_caches``
computes for attention layers (one region per unique base address, block
stride from ``stride(0)``), but over the *virtual* block dimension and with
no registration side effects. Plain data in, plain data out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import regex as re

from elastic_nixl.connector.planning import RegionGeometry


@dataclass(frozen=True)
class LayerView:
    """What the planner needs of one layer's KV tensor."""

    name: str
    data_ptr: int
    num_blocks: int  # size of the block dimension (virtual capacity)
    block_stride: int  # bytes
    page_bytes: int  # bytes of one block of this layer
    group_id: int
    is_mla: bool


@dataclass(frozen=True)
class Region:
    geometry: RegionGeometry
    name: str  # first layer that owns it, as vLLM names regions
    group_id: int  # -1 when shared by layers of several groups
    num_blocks: int
    is_mla: bool


SHARED_GROUP = -1


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """``layers.2`` before ``layers.10``; vLLM orders regions the same way."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", name)
    )


def plan_regions(views: Iterable[LayerView]) -> list[Region]:
    """One region per unique base address, in model-layer order."""
    by_base: dict[int, Region] = {}
    order: list[int] = []
    for v in sorted(views, key=lambda v: natural_key(v.name)):
        if v.block_stride < v.page_bytes:
            raise ValueError(
                f"layer {v.name}: block stride {v.block_stride} < page "
                f"{v.page_bytes} bytes; blocks would overlap"
            )
        existing = by_base.get(v.data_ptr)
        if existing is None:
            by_base[v.data_ptr] = Region(
                RegionGeometry(v.data_ptr, v.page_bytes, v.block_stride, v.num_blocks),
                v.name,
                v.group_id,
                v.num_blocks,
                v.is_mla,
            )
            order.append(v.data_ptr)
            continue
        if existing.geometry.block_stride != v.block_stride:
            raise ValueError(
                f"layers {existing.name} and {v.name} share base {v.data_ptr:#x} "
                "with different block strides"
            )
        group = existing.group_id if existing.group_id == v.group_id else SHARED_GROUP
        page = max(existing.geometry.block_len, v.page_bytes)
        blocks = min(existing.num_blocks, v.num_blocks)
        by_base[v.data_ptr] = Region(
            RegionGeometry(v.data_ptr, page, v.block_stride, blocks),
            existing.name,
            group,
            blocks,
            existing.is_mla or v.is_mla,
        )
    return [by_base[b] for b in order]


def block_spans(regions: list[Region], block_id: int) -> list[tuple[int, int]]:
    """Byte ranges ``(addr, nbytes)`` block ``block_id`` occupies in every region."""
    return [
        (r.geometry.base + block_id * r.geometry.block_stride, r.geometry.block_len)
        for r in regions
    ]


def mapped_prefix_blocks(regions: list[Region], coverage: list[tuple[int, int]]) -> int:
    """How many leading blocks ``0..n-1`` are inside registered coverage in
    every region: what a vanilla peer, which preps a descriptor per block, may
    address."""
    best: int | None = None
    for r in regions:
        g = r.geometry
        n = 0
        for base, nbytes in coverage:
            if base <= g.base < base + nbytes:
                end = base + nbytes
                n = max(0, (end - g.base - g.block_len) // g.block_stride + 1)
                break
        n = min(n, r.num_blocks)
        best = n if best is None else min(best, n)
    return best or 0
