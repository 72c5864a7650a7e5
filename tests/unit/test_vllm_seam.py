"""The one seam into vLLM's KV allocation: fails when vLLM moves under it."""

import inspect

import pytest
import torch

from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.tools.harness.vllm_objects import (
    make_kv_cache_config,
    make_vllm_config,
)
from elastic_nixl.vllm_seam import aligned_virtual_blocks, allocate_elastic_kv_cache


def test_vllm_functions_we_call_keep_their_shape():
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views

    assert list(inspect.signature(create_kv_cache_views).parameters)[:5] == [
        "raw",
        "spec",
        "num_blocks",
        "layout",
        "kv_cache_tensor",
    ]
    assert list(inspect.signature(get_kv_cache_config_from_groups).parameters) == [
        "vllm_config",
        "kv_cache_groups",
        "available_memory",
    ]
    fields = {f for f in KVCacheTensor.__dataclass_fields__}
    assert {"size", "layers", "layer_stride", "block_stride", "offset"} <= fields


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC"])
def test_views_match_vllm_allocation(layout):
    """Same shapes, strides and per-block bytes as vLLM's allocate_kv_cache,
    with the block dimension the virtual capacity."""
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    vc = make_vllm_config("kv_producer", extra={"allocator": "vmm"}, layout=layout)
    kcc = make_kv_cache_config(vc, 16)
    ekv = allocate_elastic_kv_cache(vc, kcc, HostBackend(), 4096, 1 << 16)
    ekv.allocator.grow_to(16)
    ref = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[layout])
    assert sorted(ekv.kv_caches) == sorted(ref)
    for name, view in ekv.kv_caches.items():
        r = ref[name]
        assert view.shape[1:] == r.shape[1:]
        assert view.shape[0] == ekv.allocator.num_virtual_blocks >= 4096
        assert view.dtype == r.dtype
        # Within a layer the view strides are vLLM's; only where each layer
        # starts differs (layer-outer layouts: a virtual region apart).
        assert view.stride() == r.stride()
        # Block 5 of every layer sits where the allocator's geometry says.
        base = ekv.allocator.reservation.base
        starts = ekv.allocator.geometry[0].byte_ranges([5])[0][0].tolist()
        assert view[5].data_ptr() - base in starts
    # grow_to(16) backs exactly the chunks of blocks 0..15 (16 whole blocks).
    assert ekv.allocator.unmapped_blocks([0, 15, 16, 4000]) == [16, 4000]


def test_no_block_straddles_a_chunk():
    assert aligned_virtual_blocks(1000, 4096, 1 << 16, layer_outer=True) % 16 == 0
    assert aligned_virtual_blocks(1000, 1 << 17, 1 << 16, layer_outer=True) == 1000
    with pytest.raises(ValueError, match="divide"):
        aligned_virtual_blocks(10, 3000, 1 << 16, layer_outer=True)
