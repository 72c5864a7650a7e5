"""The one seam into vLLM's KV allocation: fails when vLLM moves under it."""

import inspect

import pytest
import torch

from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.releases import get_kv_cache_config_from_groups
from elastic_nixl.tools.harness.vllm_objects import (
    make_kv_cache_config,
    make_vllm_config,
)
from elastic_nixl.vllm_seam import aligned_virtual_blocks, allocate_elastic_kv_cache


def test_vllm_functions_we_call_keep_their_shape():
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


def test_vllm_still_calls_allocate_kv_cache_inside_the_allocation_context():
    """``elastic_kv_allocation`` rebinds ``allocate_kv_cache`` in the runner
    module for the ``with``: that works only while vLLM's runner calls the
    module-level name inside ``with allocation_context``."""
    import ast
    import importlib
    import textwrap

    from elastic_nixl.vllm_seam import RUNNER_METHOD, RUNNER_MODULE

    runner = importlib.import_module(RUNNER_MODULE)
    assert callable(runner.allocate_kv_cache)
    method = getattr(runner.GPUModelRunner, RUNNER_METHOD)
    assert "kv_cache_allocation_context" in inspect.signature(method).parameters
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    calls_inside_with = [
        call.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.With)
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
    ]
    assert "allocate_kv_cache" in calls_inside_with
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    # The CPU runner inherits the method (its workers enter the same context).
    assert RUNNER_METHOD not in vars(CPUModelRunner)


def test_elastic_kv_allocation_maps_only_the_null_block():
    import importlib

    from vllm.v1.kv_cache_layout import KVCacheLayout

    from elastic_nixl.allocator.core import VmmKVAllocator
    from elastic_nixl.allocator.registry import find_owner
    from elastic_nixl.vllm_seam import RUNNER_MODULE, elastic_kv_allocation

    runner = importlib.import_module(RUNNER_MODULE)
    original = runner.allocate_kv_cache
    vc = make_vllm_config(
        "kv_producer", extra={"allocator": "vmm", "chunk_bytes": 1 << 16}
    )
    kcc = make_kv_cache_config(vc, 100)
    with elastic_kv_allocation(vc) as made:
        assert runner.allocate_kv_cache is not original
        kv = runner.allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout.LBHNC)
    assert runner.allocate_kv_cache is original  # restored on exit
    assert made.cache is not None
    alloc = made.cache.allocator
    assert find_owner(next(iter(kv.values())).data_ptr()) is alloc
    assert isinstance(alloc, VmmKVAllocator)
    # V is vLLM's own count (rounded to whole chunks), block 0 alone mapped.
    assert alloc.num_virtual_blocks >= 100
    assert all(v.shape[0] == alloc.num_virtual_blocks for v in kv.values())
    assert alloc.unmapped_blocks([0]) == []
    assert alloc.unmapped_blocks([1, 50, 99]) == [1, 50, 99] or alloc.unmapped_blocks(
        [50, 99]
    ) == [50, 99]
    assert alloc.mapped_bytes < alloc.reservation.nbytes // 4


def test_allocation_that_escapes_the_seam_is_named():
    """vLLM's V2 GPU runner allocates where the rebinding does not reach: the
    context says so, naming the setting and the fix."""
    import logging

    from elastic_nixl.vllm_seam import elastic_kv_allocation

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("elastic_nixl.vllm_seam")
    keep = Keep(logging.WARNING)
    log.addHandler(keep)
    try:
        vc = make_vllm_config("kv_producer", extra={"allocator": "vmm"})
        with elastic_kv_allocation(vc) as made:
            pass  # vLLM allocated elsewhere
    finally:
        log.removeHandler(keep)
    assert made.cache is None
    assert any("VLLM_USE_V2_MODEL_RUNNER=0" in r.getMessage() for r in records)
