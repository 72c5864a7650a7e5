"""The one seam into vLLM's KV allocation.

Two entry points:

- :func:`allocate_elastic_kv_cache`: vLLM's per-layer KV views over an
  elastic reservation (the harness and the GPU checks call it directly);
- :func:`elastic_kv_allocation`: what ``ElasticNixlConnector.get_mem_pool_context``
  returns with ``allocator: vmm``. vLLM (>= 0.31) enters that context around
  ``GPUModelRunner.initialize_kv_cache_tensors``' call to ``allocate_kv_cache``
  on GPU and CPU workers. The context is meant for a memory pool, but neither
  kind of pool fits: torch has no pluggable CPU allocator, and vLLM's
  ``allocate_kv_cache`` zero-fills the whole buffer (``torch.zeros``), which
  would touch, and so map, every byte of a reservation. So, for the duration
  of the ``with`` only, the context rebinds the name ``allocate_kv_cache`` in
  ``vllm.v1.worker.gpu_model_runner`` to our allocation, which returns the
  same views over unmapped memory. That rebinding is the one place the
  package reaches into a vLLM module; ``tests/unit/test_vllm_seam.py`` fails
  when vLLM stops calling the function by that name inside the context.

  vLLM's V2 GPU model runner (the default on the CUDA wheel in 0.32 and 0.33)
  allocates in ``vllm/v1/worker/gpu/attn_utils.py:init_kv_cache``, which
  enters this context too but calls its own module's ``allocate_kv_cache``:
  the rebinding does not reach it, vLLM zero-fills a static buffer, and the
  worker's registration refuses it (``allocator = 'vmm'`` memory not from our
  allocator). The context warns when it ends with nothing allocated through
  it. vLLM 0.34 deletes the V1 runners; its ``allocate_kv_cache(...,
  allocate=)`` takes a ``bytes -> tensor`` callable that could hand vLLM our
  reservation without any rebinding, but only vLLM's own extensible KV cache
  passes one (``GPUModelRunner.initialize_kv_cache``), so a connector cannot
  reach it without a runner subclass (``--worker-cls``).

vLLM 0.32 and 0.33 allocate the KV cache in
``vllm/v1/worker/utils.py:allocate_kv_cache``:
one flat int8 buffer, then per-layer ``create_kv_cache_views`` in the resolved
layout. An elastic KV cache needs the same views over a *virtual* buffer of
``V`` blocks, so this module rebuilds the placement for ``V`` blocks with
vLLM's own planner (``get_kv_cache_config_from_groups``) and views our buffer
with vLLM's own ``create_kv_cache_views``. Nothing else in the package touches
vLLM's allocation; ``tests/unit/test_vllm_seam.py`` fails when these
functions move or change shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
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
from elastic_nixl.releases import get_kv_cache_config_from_groups

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


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
    kernel_block_size: int | None = None,
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
    if num_virtual_blocks == kv_cache_config.num_blocks:
        # vLLM's own placement (what its scheduler sees), with layer strides
        # stretched to the chunk-aligned V when it had to be rounded up.
        virtual = _stretched(kv_cache_config, v)
    else:
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
    views = create_kv_cache_views(
        buf, spec, v, layout, vt, kernel_block_size=kernel_block_size
    )
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


def _stretched(config: KVCacheConfig, v: int) -> KVCacheConfig:
    """``config`` placed for ``v >= config.num_blocks`` blocks: layer-outer
    strides grow by the extra blocks (block-outer ones never need rounding)."""
    if v == config.num_blocks:
        return config
    tensors = []
    for t in config.kv_cache_tensors:
        if t.layer_stride != t.block_stride * config.num_blocks:
            raise ValueError(
                f"cannot stretch KV cache tensor {t.layers[0]} to {v} blocks: "
                f"layer stride {t.layer_stride} is not {config.num_blocks} blocks "
                f"of {t.block_stride} bytes"
            )
        tensors.append(
            dataclasses.replace(
                t,
                layer_stride=t.block_stride * v,
                size=t.offset + len(t.layers) * t.block_stride * v,
            )
        )
    return dataclasses.replace(config, num_blocks=v, kv_cache_tensors=tensors)


# The vLLM module whose global ``allocate_kv_cache`` the context rebinds, and
# the function of it that calls that name inside the allocation context.
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
RUNNER_METHOD = "initialize_kv_cache_tensors"

BackendFactory = Callable[[Any], MemoryBackend]
"""``device -> MemoryBackend`` (a ``torch.device``: CPU or CUDA)."""


def default_backend(device: Any) -> MemoryBackend:
    """The host backend for CPU KV caches, the CUDA VMM one for GPU ones."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        from elastic_nixl.allocator.host import HostBackend

        return HostBackend()
    if dev.type == "cuda":
        from elastic_nixl.allocator.cuda import CudaBackend

        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return CudaBackend(device=index)
    raise ValueError(
        f"kv_connector_extra_config['allocator'] = 'vmm' supports CPU and CUDA KV "
        f"caches, not {dev.type}; use allocator 'static'"
    )


@dataclass
class ElasticAllocation:
    """What :func:`elastic_kv_allocation` made (``cache`` once vLLM allocated)."""

    cache: ElasticKVCache | None = None


@contextlib.contextmanager
def elastic_kv_allocation(
    vllm_config: VllmConfig,
    backend_factory: BackendFactory = default_backend,
    initial_blocks: int = 1,
) -> Iterator[ElasticAllocation]:
    """vLLM's KV cache allocated in an elastic reservation (see the module
    docstring): V is vLLM's own block count, nothing but the first
    ``initial_blocks`` (vLLM's null block) is mapped; the connector maps the
    rest as its scheduler hands blocks out."""
    import importlib

    runner: Any = importlib.import_module(RUNNER_MODULE)
    original = runner.allocate_kv_cache
    made = ElasticAllocation()

    def allocate(
        kv_cache_config: KVCacheConfig,
        device: Any,
        layout: Any,
        kernel_block_sizes: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        if kv_cache_config.needs_kv_cache_zeroing:
            raise NotImplementedError(
                "kv_connector_extra_config['allocator'] = 'vmm': this model's KV "
                "cache needs zeroing of new blocks before the connector sees the "
                "step (Mamba layers or mixed precision); use allocator 'static'"
            )
        kernel = None
        if kernel_block_sizes:
            if len(set(kernel_block_sizes)) != 1:
                raise NotImplementedError(
                    "elastic KV caches support one KV cache group; kernel block "
                    f"sizes {kernel_block_sizes}"
                )
            kernel = kernel_block_sizes[0]
        cache = allocate_elastic_kv_cache(
            vllm_config,
            kv_cache_config,
            backend_factory(device),
            num_virtual_blocks=kv_cache_config.num_blocks,
            kernel_block_size=kernel,
        )
        cache.allocator.map_blocks(range(initial_blocks))
        made.cache = cache
        return dict(cache.kv_caches)

    runner.allocate_kv_cache = allocate
    try:
        yield made
    finally:
        runner.allocate_kv_cache = original
    if made.cache is None:
        logger.warning(
            "ElasticNixlConnector: kv_connector_extra_config['allocator'] = 'vmm', "
            "but vLLM allocated its KV cache without calling %s.allocate_kv_cache "
            "(vLLM's V2 GPU model runner allocates in vllm/v1/worker/gpu/"
            "attn_utils.py, which this seam does not reach): the KV cache is "
            "vLLM's static buffer. Set VLLM_USE_V2_MODEL_RUNNER=0, or use "
            "allocator 'static'.",
            RUNNER_MODULE,
        )
