"""The allocator core, run for real on the host backend (no GPU, no vLLM)."""

from __future__ import annotations

import ctypes
import gc
import random
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from elastic_nixl.allocator import (
    BlockGeometry,
    HostBackend,
    VmmKVAllocator,
    blocks_in_chunk,
    chunks_for_blocks,
    find_owner,
    registry,
)
from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    ExportKind,
    KVMemory,
    KVMemoryError,
    Lease,
    MappingEvent,
    MappingEventKind,
    MappingStability,
    MemoryKind,
)
from elastic_nixl.runs import Runs

PAGE = 4096


def peek(addr: int) -> int:
    return int(ctypes.c_int8.from_address(addr).value)


def poke(addr: int, value: int) -> None:
    ctypes.c_int8.from_address(addr).value = value


Factory = Callable[..., VmmKVAllocator]


@pytest.fixture
def make() -> Iterator[Factory]:
    """Factory for host allocators, all closed at the end of the test."""
    made: list[VmmKVAllocator] = []

    def factory(
        geometry: BlockGeometry,
        num_blocks: int,
        chunk_bytes: int = PAGE,
        name: str = "test",
        backend: HostBackend | None = None,
    ) -> VmmKVAllocator:
        a = VmmKVAllocator(
            backend or HostBackend(), geometry, num_blocks, chunk_bytes, name
        )
        made.append(a)
        return a

    yield factory
    for a in made:
        a.close()


# ------------------------------------------------------------------ geometry


def test_layer_outermost_geometry_lbhnc() -> None:
    g = BlockGeometry.layer_outermost(
        page_bytes=PAGE, num_layers=3, num_blocks=10, offset=64
    )
    assert (g.block_stride, g.layer_stride, g.num_layers) == (PAGE, 10 * PAGE, 3)
    starts, n = g.byte_ranges([0, 4])
    assert n == PAGE
    assert starts.tolist() == [
        [64, 64 + 10 * PAGE, 64 + 20 * PAGE],
        [64 + 4 * PAGE, 64 + 14 * PAGE, 64 + 24 * PAGE],
    ]
    assert g.reservation_bytes(10) == 64 + 30 * PAGE
    assert g.block_bytes == 3 * PAGE


def test_block_outermost_geometry_blhnc() -> None:
    g = BlockGeometry.block_outermost(page_bytes=1000, num_layers=4)
    assert (g.block_stride, g.layer_stride) == (4000, 1000)
    starts, n = g.byte_ranges(np.array([2]))
    assert n == 1000
    assert starts.tolist() == [[8000, 9000, 10000, 11000]]
    assert g.reservation_bytes(5) == 20000
    wide = BlockGeometry.block_outermost(
        page_bytes=1000, num_layers=4, block_stride=5000
    )
    assert wide.reservation_bytes(5) == 4 * 5000 + 4000


# Strides of vLLM 0.32's compute_layout_strides for FullAttentionSpec(block_size=4,
# num_kv_heads=3, head_size=8, float16), 7 blocks, 5 layers: logical [L, B, H, N, C].
VLLM_STRIDES = {
    "LBHNC": (2688, 384, 128, 32, 1),
    "LBNHC": (2688, 384, 32, 96, 1),
    "LHBNC": (2688, 128, 896, 32, 1),
    "BLHNC": (384, 1920, 128, 32, 1),
    "BLNHC": (384, 1920, 32, 96, 1),
    "BHLNC": (128, 1920, 640, 32, 1),
}


@pytest.mark.parametrize("layout", sorted(ALL_KV_LAYOUTS))
def test_for_layout_matches_vllm_views(layout: str) -> None:
    """Each block's byte ranges are exactly the bytes vLLM's view gives it."""
    L, V, H, N, C = 5, 7, 3, 4, 32
    g = BlockGeometry.for_layout(
        layout, num_layers=L, num_blocks=V, num_heads=H, num_tokens=N, content_bytes=C
    )
    size = L * V * H * N * C
    assert g.reservation_bytes(V) == size
    raw = np.zeros(size, np.int8)
    view = np.lib.stride_tricks.as_strided(
        raw, shape=(L, V, H, N, C), strides=VLLM_STRIDES[layout]
    )
    for b in range(V):
        raw[:] = 0
        view[:, b] = 1
        starts, n = g.byte_ranges([b])
        expected = np.zeros(size, bool)
        for s in starts[0]:
            expected[s : s + n] = True
        assert np.array_equal(raw.astype(bool), expected), (layout, b)


def test_for_layout_agrees_with_shortcuts_and_rejects_unknown() -> None:
    kw = dict(num_layers=4, num_blocks=9, num_heads=2, num_tokens=16, content_bytes=64)
    page = 2 * 16 * 64
    assert BlockGeometry.for_layout("LBHNC", **kw) == BlockGeometry.layer_outermost(
        page, 4, 9
    )
    assert BlockGeometry.for_layout("BLNHC", **kw) == BlockGeometry.block_outermost(
        page, 4
    )
    with pytest.raises(ValueError, match="unknown KV layout 'HND'"):
        BlockGeometry.for_layout("HND", **kw)


def test_geometry_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="page_bytes"):
        BlockGeometry(page_bytes=0, block_stride=1, layer_stride=1, num_layers=1)
    with pytest.raises(ValueError, match="block_stride .* overlap"):
        BlockGeometry(page_bytes=100, block_stride=50, layer_stride=1000, num_layers=2)
    with pytest.raises(ValueError, match="num_segments"):
        BlockGeometry(
            page_bytes=100,
            block_stride=100,
            layer_stride=0,
            num_layers=1,
            num_segments=3,
        )
    with pytest.raises(TypeError, match="num_layers"):
        BlockGeometry(page_bytes=100, block_stride=100, layer_stride=0, num_layers=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- runs


def test_runs_set_algebra_matches_python_sets() -> None:
    rng = random.Random(7)
    for _ in range(200):
        a = {rng.randrange(60) for _ in range(rng.randrange(30))}
        b = {rng.randrange(60) for _ in range(rng.randrange(30))}
        ra, rb = Runs.from_ids(sorted(a)), Runs.from_ids(sorted(b))
        assert set(ra.ids().tolist()) == a and ra.count == len(a)
        assert set(ra.union(rb).ids().tolist()) == a | b
        assert set(ra.intersection(rb).ids().tolist()) == a & b
        assert set(ra.difference(rb).ids().tolist()) == a - b
        probe = np.arange(-2, 63)
        assert ra.contains(probe).tolist() == [int(x) in a for x in probe]
        # Runs are maximal: no two touch.
        assert np.all(ra.starts[1:] > ra.ends[:-1])
    assert Runs.from_intervals([5, 0, 3], [9, 2, 6]) == Runs(
        np.array([0, 3]), np.array([2, 9])
    )
    assert not Runs.empty() and Runs.range(3, 3) == Runs.empty()


# ------------------------------------------------------------ chunk <-> block


def brute_chunks(g: BlockGeometry, block: int, chunk: int) -> set[int]:
    starts, n = g.byte_ranges([block])
    return {
        c
        for s in starts[0].tolist()
        for c in range(s // chunk, (s + n - 1) // chunk + 1)
    }


GEOMETRIES = [
    (BlockGeometry.layer_outermost(PAGE, 3, 40), 3 * PAGE),  # block < chunk
    (BlockGeometry.layer_outermost(3 * PAGE, 2, 40), 2 * PAGE),  # block straddles
    (BlockGeometry.block_outermost(1000, 5), PAGE),  # unaligned pages
    (BlockGeometry.block_outermost(PAGE, 8), 2 * PAGE),  # gap 7 pages > chunk
    (
        BlockGeometry.for_layout(
            "LHBNC",
            num_layers=3,
            num_blocks=40,
            num_heads=4,
            num_tokens=8,
            content_bytes=100,
        ),
        PAGE,
    ),
    (
        BlockGeometry.for_layout(
            "BHLNC",
            num_layers=3,
            num_blocks=40,
            num_heads=4,
            num_tokens=8,
            content_bytes=100,
        ),
        PAGE,
    ),
]


@pytest.mark.parametrize(("g", "chunk"), GEOMETRIES)
def test_chunk_block_math_matches_brute_force(g: BlockGeometry, chunk: int) -> None:
    V = 40
    rng = random.Random(3)
    for _ in range(20):
        ids = rng.sample(range(V), rng.randrange(1, 8))
        want = set().union(*(brute_chunks(g, b, chunk) for b in ids))
        assert chunks_for_blocks(g, ids, chunk).tolist() == sorted(want)
    per_block = {b: brute_chunks(g, b, chunk) for b in range(V)}
    n_chunks = -(-g.reservation_bytes(V) // chunk)
    for c in range(n_chunks):
        fully, partially = blocks_in_chunk(g, c, chunk, V)
        assert partially.tolist() == [b for b in range(V) if c in per_block[b]]
        assert fully.tolist() == [b for b in range(V) if per_block[b] == {c}]


# ------------------------------------------------------------- construction


def test_capabilities_and_protocols(make: Factory) -> None:
    g = BlockGeometry.layer_outermost(PAGE, 2, 16)
    a = make(g, 16, 2 * PAGE, name="kv0")
    assert isinstance(a, KVMemory)
    caps = a.capabilities
    assert caps.name == "kv0"
    assert caps.memory_kind is MemoryKind.HOST
    assert caps.layouts == {"LBHNC", "LBNHC", "BLHNC", "BLNHC"} and caps.can_restride
    assert caps.stability is MappingStability.ELASTIC
    assert caps.export_kinds == frozenset({ExportKind.HOST})
    # Config-time answer, before any allocation exists.
    assert VmmKVAllocator.CAPABILITIES.layouts == caps.layouts
    assert VmmKVAllocator.CAPABILITIES.can_restride
    assert a.reservation.nbytes == 32 * PAGE and a.reservation.kind is MemoryKind.HOST
    assert a.num_virtual_blocks == 16 and a.num_mapped_blocks == 0 and a.epoch == 0
    assert a.mapped_extents() == ()
    a.grow_to(1)
    with a.lease([0]) as lease:
        assert isinstance(lease, Lease) and lease.block_ids == (0,)


def test_reservation_rounds_up_to_chunks(make: Factory) -> None:
    a = make(BlockGeometry.block_outermost(1000, 3), 10, 4 * PAGE)
    assert a.reservation.nbytes == 2 * 4 * PAGE and a.num_chunks == 2


def test_bad_settings_are_named(make: Factory) -> None:
    g = BlockGeometry.layer_outermost(PAGE, 2, 16)
    with pytest.raises(ValueError, match=r"chunk_bytes 5000 is not a multiple .* 4096"):
        make(g, 16, 5000)
    with pytest.raises(ValueError, match="num_virtual_blocks must be >= 1"):
        make(g, 0)
    with pytest.raises(ValueError, match="num_virtual_blocks 32"):
        make(g, 32)  # geometry built for 16 blocks: layers would overlap
    a = make(g, 16)
    with pytest.raises(ValueError, match=r"block id 16 out of range \[0, 16\)"):
        a.map_blocks([3, 16])
    with pytest.raises(ValueError, match="block id -1"):
        a.unmap_blocks([-1])
    with pytest.raises(ValueError, match="num_blocks 17 exceeds"):
        a.grow_to(17)
    with pytest.raises(TypeError, match="integers"):
        a.map_blocks([1.5])  # type: ignore[list-item]
    assert a.epoch == 0 and a.num_mapped_chunks == 0


# ----------------------------------------------------------------- mapping


def test_grow_maps_exactly_the_chunks_needed(make: Factory) -> None:
    g = BlockGeometry.layer_outermost(PAGE, 2, 16)  # 2 blocks per chunk per layer
    a = make(g, 16, 2 * PAGE)
    base = a.reservation.base
    new = a.grow_to(3)
    assert [(e.base - base) // (2 * PAGE) for e in new] == [0, 1, 8, 9]
    assert all(e.nbytes == 2 * PAGE for e in new)
    assert a.mapped_extents() == new
    assert a.num_mapped_blocks == 4  # block 3 shares chunks with block 2
    assert a.unmapped_blocks(range(6)) == [4, 5]
    assert a.grow_to(4) == ()  # nothing new
    assert [(e.base - base) // (2 * PAGE) for e in a.grow_to(5)] == [2, 10]


def test_holes_and_extents_per_chunk(make: Factory) -> None:
    g = BlockGeometry.block_outermost(PAGE, 2)  # one block = 2 pages
    a = make(g, 100, PAGE)
    a.map_blocks([0, 10, 11, 50])
    base = a.reservation.base
    offsets = [(e.base - base) // PAGE for e in a.mapped_extents()]
    assert offsets == [0, 1, 20, 21, 22, 23, 100, 101]
    assert a.num_mapped_blocks == 4
    assert a.unmapped_blocks([0, 1, 9, 10, 11, 12, 50, 100, -3]) == [1, 9, 12, 100, -3]
    poke(base + 20 * PAGE, 5)
    assert peek(base + 20 * PAGE) == 5


def test_epoch_bumps_once_per_changing_call(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 4, 64), 64)
    events: list[MappingEvent] = []
    a.subscribe(events.append)
    a.grow_to(10)  # 40 chunks, one call
    assert a.epoch == 1 and len(events) == 1 and len(events[0].extents) == 40
    a.grow_to(10)
    a.map_blocks([3, 4])
    a.unmap_blocks([20, 30])
    a.shrink_to(10)
    assert a.epoch == 1 and len(events) == 1
    a.shrink_to(5)
    assert a.epoch == 2 and events[-1].kind is MappingEventKind.UNMAPPING
    assert len(events[-1].extents) == 20 and events[-1].epoch == 2
    a.map_blocks([7, 40])
    assert a.epoch == 3 and events[-1].kind is MappingEventKind.MAPPED
    assert [e.epoch for e in events] == [1, 2, 3]


def test_mapped_event_after_mapping_unmapping_before_unmap(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    seen: list[tuple[str, int, int, bool]] = []

    def listener(ev: MappingEvent) -> None:
        addr = ev.extents[0].base
        if ev.kind is MappingEventKind.MAPPED:
            poke(addr, 42)  # mapped already: writable
        # Still mapped for UNMAPPING: readable, value intact.
        in_list = ev.extents[0] in a.mapped_extents()
        seen.append((ev.kind.value, peek(addr), a.epoch - ev.epoch, in_list))

    a.subscribe(listener)
    a.grow_to(1)
    a.shrink_to(0)
    # The state already shows the change when listeners run.
    assert seen == [("mapped", 42, 0, True), ("unmapping", 42, 0, False)]


def test_unmap_really_happens_after_listeners(make: Factory) -> None:
    calls: list[str] = []

    class Recording(HostBackend):
        def map(self, offset: int, nbytes: int) -> None:
            calls.append(f"map {offset // PAGE}")
            super().map(offset, nbytes)

        def quiesce(self) -> None:
            calls.append("quiesce")

        def unmap(self, offset: int, nbytes: int) -> None:
            calls.append(f"unmap {offset // PAGE}")
            super().unmap(offset, nbytes)

    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8, backend=Recording())
    a.subscribe(lambda ev: calls.append(ev.kind.value))
    a.grow_to(2)
    a.shrink_to(0)
    assert calls == [
        "map 0",
        "map 1",
        "mapped",
        "unmapping",
        "quiesce",
        "unmap 0",
        "unmap 1",
    ]


def test_remapped_chunk_is_zero(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    a.grow_to(1)
    poke(a.reservation.base + 7, 9)
    a.shrink_to(0)
    a.grow_to(1)
    assert peek(a.reservation.base + 7) == 0


def test_neighbour_blocks_share_chunks(make: Factory) -> None:
    g = BlockGeometry.block_outermost(1024, 2)  # 2 blocks per 4 KiB chunk
    a = make(g, 20, PAGE)
    a.map_blocks([0])
    assert a.num_mapped_blocks == 2  # block 1 rides along, not wanted
    assert a.wanted_blocks() == Runs.range(0, 1)
    a.map_blocks([1])
    a.unmap_blocks([0])
    assert a.num_mapped_chunks == 1  # block 1 still wants the chunk
    a.unmap_blocks([1])
    assert a.num_mapped_chunks == 0 and a.epoch == 2


def test_map_failure_rolls_back(make: Factory) -> None:
    class Flaky(HostBackend):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def map(self, offset: int, nbytes: int) -> None:
            self.n += 1
            if self.n == 3:
                raise KVMemoryError("out of memory (test)")
            super().map(offset, nbytes)

    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8, backend=Flaky())
    events: list[MappingEvent] = []
    a.subscribe(events.append)
    with pytest.raises(
        KVMemoryError, match=r"mapping chunk 2 .* 2 chunks .* rolled back"
    ):
        a.grow_to(4)
    assert a.epoch == 0 and events == [] and a.num_mapped_chunks == 0
    assert a.wanted_blocks() == Runs.empty()
    a.grow_to(2)
    assert a.num_mapped_blocks == 2


def test_listener_error_does_not_stop_the_change(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    got: list[int] = []

    def bad(ev: MappingEvent) -> None:
        raise RuntimeError("nixl said no")

    unsubscribe = a.subscribe(bad)
    a.subscribe(lambda ev: got.append(ev.epoch))
    with pytest.raises(
        KVMemoryError, match="listener .* failed on mapped event .*nixl said no"
    ):
        a.grow_to(1)
    assert a.num_mapped_blocks == 1 and got == [1]
    with pytest.raises(KVMemoryError, match="failed on unmapping event"):
        a.close()  # still unmaps and frees
    assert a.closed and got == [1, 2]
    unsubscribe()


def test_unsubscribe(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    got: list[MappingEvent] = []
    unsubscribe = a.subscribe(got.append)
    a.grow_to(1)
    unsubscribe()
    unsubscribe()
    a.grow_to(2)
    assert len(got) == 1


# ------------------------------------------------------------------- leases


def test_lease_defers_unmapping_until_release(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 2, 8), 8)
    events: list[MappingEvent] = []
    a.subscribe(events.append)
    a.grow_to(4)
    first = a.lease([2, 3])
    second = a.lease([3])
    assert a.leased_blocks() == {2: 1, 3: 2}
    a.shrink_to(0)
    # Blocks 0, 1 went (4 chunks); 2 and 3 stay for the lease.
    assert a.num_mapped_blocks == 2 and a.unmapped_blocks(range(4)) == [0, 1]
    assert a.epoch == 2 and len(events[-1].extents) == 4
    poke(a.mapped_extents()[0].base, 1)  # still usable
    first.release()
    assert a.unmapped_blocks([2, 3]) == [2] and a.epoch == 3
    first.release()  # idempotent
    assert a.epoch == 3
    with second:
        pass
    assert a.num_mapped_chunks == 0 and a.epoch == 4 and a.leased_blocks() == {}


def test_release_keeps_wanted_blocks_mapped(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    a.grow_to(2)
    a.lease([0, 0, 1]).release()
    assert a.num_mapped_blocks == 2 and a.epoch == 1


def test_lease_on_unmapped_block_names_it(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 2, 8), 8)
    a.grow_to(2)
    with pytest.raises(KVMemoryError, match="cannot lease block 5 .* not mapped"):
        a.lease([0, 5, 6])
    with pytest.raises(KVMemoryError, match=r"block 8 .* out of range \[0, 8\)"):
        a.lease([8])
    assert a.leased_blocks() == {}


def test_lease_block_partially_mapped_is_refused(make: Factory) -> None:
    # Block 0 needs a chunk in each layer; map only layer 0's by hand.
    g = BlockGeometry.layer_outermost(PAGE, 2, 8)
    a = make(g, 8)
    a.backend.map(0, PAGE)  # bypasses the allocator: it does not count
    with pytest.raises(KVMemoryError, match="block 0"):
        a.lease([0])
    a.backend.unmap(0, PAGE)


# ---------------------------------------------------------------- lifetime


def test_close_unmaps_everything_and_unregisters(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 2, 8), 8)
    events: list[MappingEvent] = []
    a.subscribe(events.append)
    a.grow_to(3)
    lease = a.lease([1])
    base = a.reservation.base
    assert find_owner(base + 100) is a
    a.close()
    assert (
        events[-1].kind is MappingEventKind.UNMAPPING and len(events[-1].extents) == 6
    )
    assert a.closed and a.mapped_extents() == () and find_owner(base + 100) is None
    lease.release()
    a.close()
    with pytest.raises(KVMemoryError, match="'test' is closed"):
        a.grow_to(1)
    with pytest.raises(KVMemoryError, match="closed"):
        a.lease([0])


def test_context_manager() -> None:
    with VmmKVAllocator(
        HostBackend(), BlockGeometry.layer_outermost(PAGE, 1, 4), 4
    ) as a:
        a.grow_to(4)
    assert a.closed


# ---------------------------------------------------------------- registry


def test_registry_finds_owner_by_address(make: Factory) -> None:
    a = make(BlockGeometry.layer_outermost(PAGE, 1, 8), 8, name="a")
    b = make(BlockGeometry.layer_outermost(PAGE, 1, 16), 16, name="b")
    for alloc in (a, b):
        res = alloc.reservation
        assert find_owner(res.base) is alloc
        assert find_owner(res.end - 1) is alloc
        assert find_owner(res.end) is not alloc
    assert find_owner(0) is None
    assert {x.name for x in registry.registered()} >= {"a", "b"}
    with pytest.raises(ValueError, match="overlaps"):
        registry.register(a)


def test_registry_is_weak() -> None:
    a = VmmKVAllocator(HostBackend(), BlockGeometry.layer_outermost(PAGE, 1, 8), 8)
    base = a.reservation.base
    assert find_owner(base) is a
    del a
    gc.collect()
    assert find_owner(base) is None


# ---------------------------------------------------------------- scaling


def _peak_bytes_of_a_session(num_virtual: int) -> int:
    """Peak Python memory of map / query / lease / shrink with 1000 blocks
    mapped out of ``num_virtual``."""
    import tracemalloc

    g = BlockGeometry.layer_outermost(PAGE, 2, num_virtual)
    tracemalloc.start()
    a = VmmKVAllocator(HostBackend(), g, num_virtual, PAGE, name="big")
    try:
        ids = np.arange(0, num_virtual, num_virtual // 1000)[:1000]
        a.map_blocks(ids)
        extents = a.mapped_extents()
        assert len(extents) == 2000 and a.num_mapped_blocks == 1000
        assert a.unmapped_blocks(ids) == []
        assert len(a.unmapped_blocks(range(5000))) == 5000 - len(ids[ids < 5000])
        a.lease(ids[:10]).release()
        a.shrink_to(num_virtual // 2)
        assert a.num_mapped_blocks == 500
        a.shrink_to(0)
        assert a.mapped_extents() == ()
    finally:
        a.close()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_state_is_o_mapped_not_o_virtual() -> None:
    """The same 1000 mapped blocks out of 100k or 4M virtual ones cost the
    same memory: nothing is built per virtual block (a memory bound, not a
    timing one, so a loaded machine cannot fail it; 4M int64 would be 32 MB)."""
    small = _peak_bytes_of_a_session(100_000)
    large = _peak_bytes_of_a_session(4_000_000)
    assert large < 1.5 * small + (1 << 20), (small, large)


def test_grow_all_of_a_large_reservation_is_vectorised() -> None:
    """Growing over all 200k blocks works in runs: no Python object per block
    (a per-block list or set would take well over 5 MB)."""
    import tracemalloc

    g = BlockGeometry.layer_outermost(PAGE, 1, 200_000)
    tracemalloc.start()
    try:
        with VmmKVAllocator(HostBackend(), g, 200_000, 256 * PAGE) as a:
            a.grow_to(200_000)
            assert a.num_mapped_blocks == 200_000 and a.num_mapped_chunks == 782
            a.shrink_to(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


# ------------------------------------------------------------------ tensor


def test_tensor_covers_reservation_and_round_trips(make: Factory) -> None:
    torch = pytest.importorskip("torch")
    L, V, H, N, C = 2, 16, 2, 16, 64
    g = BlockGeometry.for_layout(
        "LBHNC", num_layers=L, num_blocks=V, num_heads=H, num_tokens=N, content_bytes=C
    )
    a = make(g, V)
    t = a.tensor()
    assert t.dtype == torch.int8 and t.device.type == "cpu"
    assert t.numel() == a.reservation.nbytes and t.data_ptr() == a.reservation.base
    assert a.tensor() is t
    a.map_blocks([3, 9])
    # vLLM-style per-layer views: as_strided over the flat buffer.
    strides = (V * H * N * C, H * N * C, N * C, C, 1)
    view = torch.as_strided(t, (L, V, H, N, C), strides)
    view[1, 9] = 7
    view[0, 3] = -2
    starts, n = g.byte_ranges([9])
    assert peek(a.reservation.base + int(starts[0, 1])) == 7
    assert int(t[starts[0, 1] : starts[0, 1] + n].sum()) == 7 * n
    assert int(view[0, 3].sum()) == -2 * H * N * C
    # Re-striding (what vLLM's layouts do) works on this tensor.
    layer = view[0].permute(0, 2, 1, 3)
    assert layer.shape == (V, N, H, C)


def test_tensor_keeps_allocator_alive() -> None:
    pytest.importorskip("torch")
    a = VmmKVAllocator(HostBackend(), BlockGeometry.layer_outermost(PAGE, 1, 4), 4)
    a.grow_to(4)
    t = a.tensor()
    base = a.reservation.base
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is not None and find_owner(base) is ref()  # the tensor holds it
    t[0] = 3
    assert int(t[0]) == 3
    del t
    gc.collect()
    assert ref() is None and find_owner(base) is None  # finalizer freed it


def test_concurrent_use_keeps_state_consistent(make: Factory) -> None:
    g = BlockGeometry.layer_outermost(PAGE, 2, 256)
    a = make(g, 256)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                ids = rng.sample(range(256), 4)
                a.map_blocks(ids)
                try:
                    with a.lease(ids):
                        poke(a.reservation.base + ids[0] * PAGE, 1)
                except KVMemoryError:
                    pass  # another thread unmapped them in between
                a.unmap_blocks(ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.leased_blocks() == {}
    assert a.num_mapped_chunks == 0 and a.wanted_blocks() == Runs.empty()


def test_a_lease_costs_memory_of_its_ids_not_ids_times_layers(make: Factory):
    """Issue 21: a lease built dense ids x layers arrays under the lock (a
    Stage of 2^20 ids on 32 layers: +1.7 GB and seconds of lock wait). It now
    works on runs of block ids: its peak memory does not grow with layers."""
    import tracemalloc

    n, layers = 1 << 16, 256
    g = BlockGeometry.layer_outermost(page_bytes=64, num_layers=layers, num_blocks=n)
    a = make(g, n, 2 << 20)
    a.grow_to(n)
    ids = np.random.default_rng(1).permutation(n)
    tracemalloc.start()
    try:
        lease = a.lease(ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ids x layers x int64 would be 128 MiB per array; the ids alone 0.5 MiB.
    assert peak < 16 << 20, f"a lease of {n} ids peaked at {peak >> 20} MiB"
    assert a.leased_blocks() == dict.fromkeys(range(n), 1)
    a.unmap_blocks(range(n))  # deferred: every block is leased
    assert a.unmapped_blocks([0, n - 1]) == []
    lease.release()
    assert a.num_mapped_chunks == 0 and a.leased_blocks() == {}
