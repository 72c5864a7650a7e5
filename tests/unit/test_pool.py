"""The elastic pool's rules, on vLLM's real BlockPool (connector/pool.py)."""

from __future__ import annotations

import pytest

from elastic_nixl.connector.pool import (
    PoolError,
    PoolPolicy,
    pool_geometry,
    step_block_ids,
)


def make_pool(num_blocks: int, caching: bool = True):  # type: ignore[no-untyped-def]
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_blocks, enable_caching=caching, hash_block_size=16)


def cache_block(pool, block, key) -> None:  # type: ignore[no-untyped-def]
    """Enter ``block`` in the prefix cache as vLLM's cache_full_blocks does."""
    pool._insert_block_hash(key, block, None)


def geometry(num_blocks: int = 64, per_group: int = 4):  # type: ignore[no-untyped-def]
    # 4 KiB pages, 16 KiB chunks: 4 blocks a group; 2 layers.
    return pool_geometry(num_blocks, 4096, 2 * 4096, per_group * 4096)


def test_groups_follow_chunks():
    g = geometry()
    assert (g.blocks_per_group, g.group_bytes, g.num_groups) == (4, 32768, 16)
    assert list(g.blocks_of(3)) == [12, 13, 14, 15]
    # A block bigger than a chunk: one block a group.
    assert pool_geometry(10, 1 << 17, 1 << 18, 1 << 16).blocks_per_group == 1
    with pytest.raises(PoolError, match="chunk_bytes"):
        pool_geometry(10, 3000, 6000, 1 << 16)


def test_maps_what_a_step_uses_and_releases_free_groups():
    pool = make_pool(64)
    policy = PoolPolicy(geometry(), release_every=1)
    policy.bind(pool)
    blocks = pool.get_new_blocks(6)  # ids 1..6: groups 0 and 1
    changes = policy.step([b.block_id for b in blocks], idle=False, now=0.0)
    assert changes.map_groups == [1]  # group 0 is always mapped
    assert changes.unmap_groups == []
    pool.free_blocks(blocks[4:])  # 5, 6 free; group 1 still has 4 in use
    assert policy.step([], idle=False, now=0.0).unmap_groups == []
    pool.free_blocks(blocks[:4])
    changes = policy.step([], idle=True, now=1.0)
    assert changes.unmap_groups == [1]
    assert policy.mapped == {0}


def test_a_cached_block_stays_mapped_until_evicted_at_idle():
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool = make_pool(64)
    g = geometry()
    policy = PoolPolicy(g, idle_mapped_bytes=0, release_every=1)
    policy.bind(pool)
    blocks = pool.get_new_blocks(8)  # 1..8: groups 0, 1, 2
    policy.step([b.block_id for b in blocks], idle=False, now=0.0)
    # Block 9 of group 2 ... cache block 5 (group 1) as a prefix-cache entry.
    cached = blocks[4]
    key = make_block_hash_with_group_id(b"h" * 32, 0)  # type: ignore[arg-type]
    cache_block(pool, cached, key)
    pool.free_blocks(blocks)
    policy.note_freed(b.block_id for b in blocks)  # request_finished
    # Busy step: the cached group stays, the uncached one goes.
    changes = policy.step([], idle=False, now=0.0)
    assert changes.unmap_groups == [2]
    assert 1 in policy.mapped
    assert pool.cached_block_hash_to_block.get_one_block(key) is not None
    # Idle, above the idle target: evicted from the prefix cache, then released.
    changes = policy.step([], idle=True, now=1.0)
    assert changes.unmap_groups == [1]
    assert changes.evicted_blocks == 1
    assert pool.cached_block_hash_to_block.get_one_block(key) is None
    assert cached.block_hash is None


def test_idle_target_keeps_cached_groups():
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool = make_pool(64)
    g = geometry()
    policy = PoolPolicy(g, idle_mapped_bytes=2 * g.group_bytes, release_every=1)
    policy.bind(pool)
    blocks = pool.get_new_blocks(4)
    policy.step([b.block_id for b in blocks], idle=False, now=0.0)
    key = make_block_hash_with_group_id(b"k" * 32, 0)  # type: ignore[arg-type]
    cache_block(pool, blocks[3], key)
    pool.free_blocks(blocks)
    changes = policy.step([], idle=True, now=1.0)
    assert changes.unmap_groups == []  # 2 groups mapped, target 2: kept
    assert pool.cached_block_hash_to_block.get_one_block(key) is not None


def test_cap_holds_groups_out_of_vllms_pool():
    pool = make_pool(64)
    g = geometry()
    policy = PoolPolicy(g, max_mapped_bytes=5 * g.group_bytes)
    policy.bind(pool)
    # 16 groups, 5 usable: groups 1..11 held; group 0's 3 free blocks and
    # groups 12..15 (16 blocks) are what vLLM can hand out.
    assert policy.balloon == range(1, 12)
    assert pool.get_num_free_blocks() == 3 + 16
    got = pool.get_new_blocks(19)
    ids = sorted(b.block_id for b in got)
    assert ids == [1, 2, 3, *range(48, 64)]
    changes = policy.step(ids, idle=False, now=0.0)
    assert len(policy.mapped) == 5 and policy.mapped_bytes <= 5 * g.group_bytes
    assert changes.map_groups == [12, 13, 14, 15]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)  # vLLM's pool is exhausted: it waits or preempts


def test_cap_below_two_groups_is_refused():
    g = geometry()
    with pytest.raises(PoolError, match="max_mapped_bytes"):
        PoolPolicy(g, max_mapped_bytes=g.group_bytes)


def test_idle_pass_is_requested_after_activity():
    pool = make_pool(64)
    policy = PoolPolicy(geometry(), idle_interval_s=0.5)
    policy.bind(pool)
    assert not policy.needs_idle_pass
    policy.step([5], idle=False, now=0.0)
    assert policy.needs_idle_pass
    policy.step([], idle=True, now=0.1)  # the first idle scan runs at once
    assert not policy.needs_idle_pass


def test_step_block_ids_reads_a_scheduler_output():
    from types import SimpleNamespace

    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(block_ids=([1, 2],))],
        scheduled_cached_reqs=SimpleNamespace(new_block_ids=[None, ([7],)]),
    )
    assert sorted(step_block_ids(out, receiving=[[9, 10]])) == [1, 2, 7, 9, 10]


def test_busy_steps_check_only_the_groups_of_finished_requests():
    pool = make_pool(64)
    policy = PoolPolicy(geometry(), release_every=1)
    policy.bind(pool)
    a, b = pool.get_new_blocks(8), pool.get_new_blocks(8)  # groups 0-2, 2-4
    policy.step([x.block_id for x in a + b], idle=False, now=0.0)
    pool.free_blocks(a + b)
    # Freed but not reported finished (a preemption): only an idle scan finds it.
    assert policy.step([], idle=False, now=0.0).unmap_groups == []
    policy.note_freed(x.block_id for x in b)
    # b's groups; group 2 is shared with a, whose blocks are free too.
    assert policy.step([], idle=False, now=0.0).unmap_groups == [2, 3, 4]
    assert policy.step([], idle=True, now=1.0).unmap_groups == [1]
    # Nothing happened since: the next idle step does not scan again.
    assert not policy.needs_idle_pass
