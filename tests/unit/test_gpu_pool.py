"""allocator 'vmm' on a GPU, without vLLM (it cannot be carried to the device
machine): the CUDA half of what ``vllm serve`` does with an elastic KV cache.

A KV-cache-shaped CUDA VMM reservation (layer-outer, 64 KiB per layer-block
as Llama-3-8B's), the scheduler's pool policy deciding which block groups to
map for a request and to release when it is done, the worker applying it
(``connector/pool.py``, the same functions the connector calls), and a
staged NIXL read of the mapped blocks into a second elastic cache.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

gpu = pytest.mark.gpu


class FakePool:
    """What the policy reads of vLLM's BlockPool (vLLM is not on the device)."""

    def __init__(self, n: int) -> None:
        self.blocks = [
            SimpleNamespace(block_id=i, ref_cnt=0, block_hash=None) for i in range(n)
        ]

    def get_new_blocks(self, n: int) -> list[Any]:
        raise AssertionError("no balloon in this test")

    def free_blocks(self, blocks: Any) -> None:
        raise AssertionError("no balloon in this test")

    def evict_blocks(self, ids: set[int]) -> None:
        for b in ids:
            self.blocks[b].block_hash = None


@gpu
def test_gpu_kv_pool_maps_on_demand_releases_and_stages(cuda_torch: Any) -> None:
    torch = cuda_torch
    from nixl._api import nixl_agent, nixl_agent_config

    from elastic_nixl.allocator.core import VmmKVAllocator
    from elastic_nixl.allocator.cuda import CudaBackend
    from elastic_nixl.allocator.geometry import BlockGeometry
    from elastic_nixl.connector.pool import (
        PoolPolicy,
        apply_group_changes,
        check_pool_geometry,
    )
    from elastic_nixl.staging import StagedRead, StagedReader, StagingServer

    chunk = CudaBackend(0).granularity
    layers, page, v = 4, 64 << 10, 4096
    kcc = SimpleNamespace(
        num_blocks=v,
        kv_cache_tensors=[
            SimpleNamespace(block_stride=page, layers=list(range(layers)))
        ],
    )
    geometry = BlockGeometry.layer_outermost(page, layers, v)
    caches = [
        VmmKVAllocator(CudaBackend(0), geometry, v, chunk, name=f"kv-{s}") for s in "pd"
    ]
    prod, cons = caches
    pools = [FakePool(v), FakePool(v)]
    policies = []
    for alloc, pool in zip(caches, pools, strict=True):
        alloc.map_blocks([0])  # what the seam maps at start: the null block
        g = check_pool_geometry(alloc, kcc, chunk)
        assert g.blocks_per_group == chunk // page
        assert g.group_bytes == layers * chunk
        policy = PoolPolicy(g, release_every=1)
        policy.bind(pool)
        policies.append(policy)

    def views(alloc: VmmKVAllocator) -> list[Any]:
        t = alloc.tensor().view(torch.uint8)
        return [
            t[i * v * page : (i + 1) * v * page].view(v, page) for i in range(layers)
        ]

    def use(side: int, ids: list[int]) -> None:
        for b in ids:
            pools[side].blocks[b].ref_cnt += 1
        ch = policies[side].step(ids, idle=False, now=0.0)
        apply_group_changes(
            caches[side],
            policies[side].geometry.blocks_per_group,
            ch.map_groups,
            ch.unmap_groups,
        )

    def free(side: int, ids: list[int]) -> list[int]:
        for b in ids:
            pools[side].blocks[b].ref_cnt -= 1
        ch = policies[side].step([], idle=True, now=time.monotonic())
        apply_group_changes(
            caches[side],
            policies[side].geometry.blocks_per_group,
            ch.map_groups,
            ch.unmap_groups,
        )
        return ch.unmap_groups

    start = prod.mapped_bytes
    free_before = torch.cuda.mem_get_info(0)[0]
    remote = list(range(3000, 3000 + 96)) + [4095]  # far beyond what is mapped
    local = list(range(700, 797))
    use(0, remote)
    use(1, local)
    # Mapped on demand: only the groups the ids touch, on both sides.
    assert prod.unmapped_blocks(remote) == [] and cons.unmapped_blocks(local) == []
    assert prod.mapped_bytes - start == 5 * policies[0].geometry.group_bytes
    assert free_before - torch.cuda.mem_get_info(0)[0] >= 8 * layers * chunk

    src, dst = views(prod), views(cons)
    for layer in range(layers):
        for i, b in enumerate(remote):
            src[layer][b].fill_((layer * 31 + i) % 251)
    torch.cuda.synchronize()

    cfg = nixl_agent_config(backends=["UCX"])
    server = StagingServer(
        nixl_agent("gpu-pool-srv", cfg), src, prod.lease, 32, 2, "VRAM"
    )
    reader = StagedReader(nixl_agent("gpu-pool-rd", cfg), dst, 32, 2, "VRAM")
    try:
        reader.submit(StagedRead("r", server.offer, remote, local))
        assert reader.next_result(60) == ("r", None)
        torch.cuda.synchronize()
        for layer in range(layers):
            for i, b in enumerate(local):
                assert int(dst[layer][b][0]) == (layer * 31 + i) % 251
                assert torch.equal(dst[layer][b], src[layer][remote[i]])
    finally:
        reader.close()
        server.close()

    # Done: both sides release every group but the null block's.
    assert sorted(free(0, remote)) == [93, 94, 95, 96, 127]
    assert len(free(1, local)) == 4
    assert prod.mapped_bytes == start and cons.mapped_bytes == start
    torch.cuda.synchronize()
    del src, dst
    for alloc in caches:
        alloc.close()
