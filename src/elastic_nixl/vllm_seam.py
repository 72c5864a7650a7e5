"""The one seam into vLLM's KV allocation.

vLLM 0.32 allocates the KV cache in ``vllm/v1/worker/utils.py:allocate_kv_cache``:
one flat int8 buffer, then per-layer ``create_kv_cache_views`` in the resolved
layout. An elastic KV cache needs the same views over a *virtual* buffer of
``V`` blocks, so this module rebuilds the placement for ``V`` blocks with
vLLM's own planner (``get_kv_cache_config_from_groups``) and views our buffer
with vLLM's own ``create_kv_cache_views``. Nothing else in the package touches
vLLM's allocation; ``tests/unit/test_vllm_seam.py`` fails when these
functions move or change shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    KVCacheTensor,
    UniformTypeKVCacheSpecs,
    create_kv_cache_views,
)

from elastic_nixl.allocator.backend import MemoryBackend
from elastic_nixl.allocator.core import VmmKVAllocator
from elastic_nixl.allocator.geometry import BlockGeometry
from elastic_nixl.config import settings_from_vllm_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True)
class ElasticKVCache:
    kv_caches: dict[str, torch.Tensor]
    allocator: VmmKVAllocator
    virtual_config: KVCacheConfig  # the same groups, placed for V blocks


def aligned_virtual_blocks(
    requested: int, unit_bytes: int, chunk_bytes: int, layer_outer: bool
) -> int:
    """Round V up so no block straddles a chunk (a NIXL registration).

    Layer-outer layouts place layer ``l`` at ``l * V * page``: V is rounded so
    every layer starts on a chunk boundary.
    """
    if chunk_bytes % unit_bytes and unit_bytes % chunk_bytes:
        raise ValueError(
            f"chunk_bytes={chunk_bytes} and the block unit {unit_bytes} bytes must "
            "divide one another so no block straddles two registrations"
        )
    if not layer_outer or unit_bytes >= chunk_bytes:
        return requested
    per_chunk = chunk_bytes // unit_bytes
    return math.ceil(requested / per_chunk) * per_chunk


def allocate_elastic_kv_cache(
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig,
    backend: MemoryBackend,
    num_virtual_blocks: int | None = None,
    chunk_bytes: int | None = None,
    name: str = "kv",
) -> ElasticKVCache:
    """vLLM's KV views over an elastic reservation of ``num_virtual_blocks``.

    Sizes default to the connector's settings (``virtual_blocks``, else four
    times vLLM's physical budget; ``chunk_bytes``). Nothing is mapped yet:
    call ``allocator.grow_to(kv_cache_config.num_blocks)`` to back vLLM's
    physical budget.
    """
    settings = settings_from_vllm_config(vllm_config)
    if num_virtual_blocks is None:
        num_virtual_blocks = settings.virtual_blocks or 4 * kv_cache_config.num_blocks
    if chunk_bytes is None:
        chunk_bytes = max(settings.chunk_bytes, backend.granularity)
    layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
    tensors = kv_cache_config.kv_cache_tensors
    if not tensors:
        raise ValueError("the KV cache config places no tensors")
    sizes = {t.size for t in tensors}
    if len(sizes) != 1 or kv_cache_config.num_blocks <= 0:
        raise ValueError("KV cache tensors must share one backing allocation")
    bytes_per_block = sizes.pop() // kv_cache_config.num_blocks
    first = tensors[0]
    unit = (
        first.block_stride
        if layout.is_block_outermost
        else _page_bytes(kv_cache_config, first)
    )
    v = aligned_virtual_blocks(
        num_virtual_blocks, unit, chunk_bytes, layer_outer=layout.is_layer_compact
    )
    virtual = get_kv_cache_config_from_groups(
        vllm_config, kv_cache_config.kv_cache_groups, v * bytes_per_block
    )
    if virtual.num_blocks != v:
        raise ValueError(
            f"vLLM placed {virtual.num_blocks} blocks for a {v}-block reservation "
            "(is cache_config.num_gpu_blocks_override set?)"
        )
    if len(virtual.kv_cache_tensors) != 1:
        raise NotImplementedError(
            "elastic KV caches support one KVCacheTensor (one layer shape); got "
            f"{len(virtual.kv_cache_tensors)}"
        )
    vt = virtual.kv_cache_tensors[0]
    spec = _spec_of(virtual, vt)
    geometry = BlockGeometry(
        page_bytes=spec.page_size_bytes,
        block_stride=vt.block_stride,
        layer_stride=vt.layer_stride,
        num_layers=len(vt.layers),
        offset=vt.offset,
    )
    allocator = VmmKVAllocator(
        backend=backend,
        geometry=geometry,
        num_virtual_blocks=v,
        chunk_bytes=chunk_bytes,
        name=name,
    )
    buf = allocator.tensor()
    views = create_kv_cache_views(buf, spec, v, layout, vt)
    kv_caches = dict(zip(vt.layers, views, strict=True))
    return ElasticKVCache(kv_caches, allocator, virtual)


def _spec_of(config: KVCacheConfig, tensor: KVCacheTensor):  # type: ignore[no-untyped-def]
    layer = tensor.layers[0]
    for group in config.kv_cache_groups:
        if layer in group.layer_names:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                spec = spec.kv_cache_specs[layer]
            return spec
    raise ValueError(f"layer {layer} is in no KV cache group")


def _page_bytes(config: KVCacheConfig, tensor: KVCacheTensor) -> int:
    return int(_spec_of(config, tensor).page_size_bytes)
