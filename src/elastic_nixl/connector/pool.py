"""How vLLM's scheduler keeps its block pool inside mapped memory.

vLLM's scheduler hands out block ids from one pool of ``V`` blocks and has no
hook to resize it. With ``allocator: vmm`` the KV cache behind those ids is a
reservation mapped in chunks, so the scheduler side decides, every step, what
the worker must map and may release; the worker applies it before the
forward pass (``bind_connector_metadata``), so a block is mapped before
anything writes to it.

The unit is a **group**: the blocks ``[g * blocks_per_group, (g + 1) *
blocks_per_group)`` whose bytes lie in the same chunks (one chunk per layer
for layer-outer layouts, one chunk for block-outer ones). Groups are
disjoint in memory, so mapping and releasing them is exact.

The rules (:class:`PoolPolicy`):

- **Map on use.** Every block id in the step's scheduler output (new
  requests, new blocks of running ones, blocks allocated for KV to receive)
  has its group mapped in that step's metadata.
- **Release when unused.** A mapped group is released when every block in
  it is free in vLLM's pool (``ref_cnt == 0``), none is in the prefix
  cache and none is pinned for a peer's read (a finished prefill's blocks,
  from ``request_finished`` until ``finished_sending``: vLLM may count them
  free while a consumer still reads them). Group 0 (vLLM's null block) is
  never released.
- **Prefix caching.** A free block that still has a block hash may be hit by
  a later request, so its group stays mapped. When the engine is idle and
  more than ``idle_mapped_bytes`` are mapped, free groups whose blocks are
  only cached are evicted from vLLM's prefix cache first
  (``BlockPool.evict_blocks``), least recently used first as vLLM itself
  would, and then released: a later request with that prefix misses and
  recomputes, and can never hit unmapped memory.
- **Physical cap.** With ``max_mapped_bytes`` the policy takes whole groups
  out of vLLM's pool at start (a balloon: allocated to nobody), so vLLM's own
  accounting never hands out more blocks than can be mapped; when the rest
  runs out the scheduler waits or preempts, as it does when vLLM runs out of
  blocks. The balloon takes the low groups after group 0, so requests use
  block ids at and above ``(1 + balloon groups) * blocks_per_group``.

Everything here is plain data and vLLM's public ``BlockPool`` methods
(``get_new_blocks``, ``free_blocks``, ``evict_blocks``, ``blocks``); the
unit tests drive it with vLLM's real pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from elastic_nixl.allocator.geometry import chunks_for_blocks
from elastic_nixl.capabilities import KVMemoryError

if TYPE_CHECKING:
    from elastic_nixl.allocator.core import VmmKVAllocator


class PoolError(ValueError):
    """The elastic pool cannot be set up as configured."""


@dataclass(frozen=True)
class PoolGeometry:
    """How block ids fall into groups of chunks."""

    num_blocks: int  # V: what vLLM's scheduler sees
    blocks_per_group: int
    group_bytes: int  # physical bytes one mapped group costs

    @property
    def num_groups(self) -> int:
        return -(-self.num_blocks // self.blocks_per_group)

    def group_of(self, block_id: int) -> int:
        return block_id // self.blocks_per_group

    def blocks_of(self, group: int) -> range:
        lo = group * self.blocks_per_group
        return range(lo, min(lo + self.blocks_per_group, self.num_blocks))


def pool_geometry(
    num_blocks: int,
    unit_bytes: int,
    bytes_per_block: int,
    chunk_bytes: int,
) -> PoolGeometry:
    """The groups of a reservation mapped in ``chunk_bytes`` units.

    ``unit_bytes`` is what one block takes in one contiguous run: the
    per-layer page for layer-outer layouts, the whole block stride for
    block-outer ones; ``bytes_per_block`` is a block's bytes in all layers.
    The two sizes must divide one another so that no block straddles chunks
    (``vllm_seam.aligned_virtual_blocks`` makes layer strides chunk-aligned).
    """
    if num_blocks < 1 or unit_bytes < 1 or bytes_per_block < unit_bytes:
        raise PoolError(
            f"bad pool geometry: {num_blocks} blocks, {unit_bytes} B unit, "
            f"{bytes_per_block} B per block"
        )
    if chunk_bytes % unit_bytes and unit_bytes % chunk_bytes:
        raise PoolError(
            f"kv_connector_extra_config['chunk_bytes'] = {chunk_bytes} and the "
            f"block's {unit_bytes}-byte run must divide one another; try "
            f"chunk_bytes = {max(unit_bytes, chunk_bytes - chunk_bytes % unit_bytes)}"
        )
    per_group = max(1, chunk_bytes // unit_bytes)
    return PoolGeometry(num_blocks, per_group, per_group * bytes_per_block)


class BlockLike(Protocol):
    block_id: int
    ref_cnt: int

    @property
    def block_hash(self) -> Any: ...


class BlockPoolLike(Protocol):
    """The part of ``vllm.v1.core.block_pool.BlockPool`` the policy uses."""

    @property
    def blocks(self) -> Sequence[Any]: ...

    def get_new_blocks(self, num_blocks: int) -> list[Any]: ...

    def free_blocks(self, ordered_blocks: Iterable[Any]) -> None: ...

    def evict_blocks(self, block_ids: set[int]) -> None: ...


@dataclass
class PoolChanges:
    """One step's decision: groups to map before the forward, groups to release."""

    map_groups: list[int] = field(default_factory=list)
    unmap_groups: list[int] = field(default_factory=list)
    evicted_blocks: int = 0

    def __bool__(self) -> bool:
        return bool(self.map_groups or self.unmap_groups)


class PoolPolicy:
    """The scheduler's mirror of what is mapped, and the rules above."""

    def __init__(
        self,
        geometry: PoolGeometry,
        max_mapped_bytes: int | None = None,
        idle_mapped_bytes: int = 0,
        release_every: int = 8,
        idle_interval_s: float = 0.05,
    ) -> None:
        self.geometry = geometry
        g = geometry
        usable = g.num_groups
        if max_mapped_bytes is not None:
            usable = max_mapped_bytes // g.group_bytes
            if usable < 2:
                raise PoolError(
                    f"kv_connector_extra_config['max_mapped_bytes'] = "
                    f"{max_mapped_bytes} holds {usable} group(s) of "
                    f"{g.group_bytes} bytes ({g.blocks_per_group} blocks); "
                    f"it must hold at least 2 (>= {2 * g.group_bytes})"
                )
            usable = min(usable, g.num_groups)
        self.usable_groups = usable
        self.balloon = range(1, 1 + g.num_groups - usable)
        self.idle_mapped_bytes = idle_mapped_bytes
        self.release_every = max(1, release_every)
        self.idle_interval_s = idle_interval_s
        self.mapped: set[int] = {0}
        self._steps = 0
        self._last_idle_scan = float("-inf")
        # After activity, one idle pass must run to release what it freed:
        # the scheduler keeps the engine stepping until it has
        # (``has_pending_push_work``), since an idle engine does not step.
        self.needs_idle_pass = False
        self._pool: BlockPoolLike | None = None
        self._held: list[Any] = []
        # Blocks a peer has still to read (a finished prefill's, which vLLM
        # may already count as free): request -> ids, and a count per id.
        self._pinned_by: dict[str, list[int]] = {}
        self._pins: dict[int, int] = {}
        # Groups that may have become free since the last scan: busy scans
        # look only at these (O(freed)); an idle scan looks at every group.
        self._dirty: set[int] = set()

    def note_freed(self, block_ids: Iterable[int]) -> None:
        """A request finished (vLLM frees, or will free, ``block_ids``)."""
        g = self.geometry
        self._dirty.update(g.group_of(b) for b in block_ids)
        self.needs_idle_pass = True

    def pin(self, req_id: str, block_ids: Iterable[int]) -> None:
        """Keep ``block_ids`` mapped until :meth:`unpin` (a peer reads them)."""
        ids = list(block_ids)
        self.unpin(req_id)
        self._pinned_by[req_id] = ids
        for b in ids:
            self._pins[b] = self._pins.get(b, 0) + 1

    def unpin(self, req_id: str) -> None:
        ids = self._pinned_by.pop(req_id, ())
        self._dirty.update(self.geometry.group_of(b) for b in ids)
        for b in ids:
            n = self._pins[b] - 1
            if n:
                self._pins[b] = n
            else:
                del self._pins[b]
        self.needs_idle_pass = True

    # ---------------------------------------------------------- set-up

    @property
    def max_mapped_bytes(self) -> int:
        return self.usable_groups * self.geometry.group_bytes

    @property
    def mapped_bytes(self) -> int:
        return len(self.mapped) * self.geometry.group_bytes

    def bind(self, pool: BlockPoolLike) -> None:
        """Take the balloon's groups out of a fresh pool (none given out yet)."""
        if len(pool.blocks) != self.geometry.num_blocks:
            raise PoolError(
                f"vLLM's block pool has {len(pool.blocks)} blocks, the KV cache "
                f"{self.geometry.num_blocks}"
            )
        self._pool = pool
        if not self.balloon:
            return
        per = self.geometry.blocks_per_group
        # The free queue of a fresh pool is 1, 2, ..., V-1 (0 is the null
        # block): take group 0's rest and the balloon, give group 0's back.
        first = pool.get_new_blocks(self.balloon.stop * per - 1)
        ids = [b.block_id for b in first]
        if ids != list(range(1, self.balloon.stop * per)):
            pool.free_blocks(first)
            raise PoolError(
                "vLLM's block pool was not fresh when the elastic pool bound to "
                "it; cannot take the max_mapped_bytes balloon"
            )
        pool.free_blocks(first[: per - 1])
        self._held = first[per - 1 :]

    # ---------------------------------------------------------- per step

    def step(
        self, used_block_ids: Iterable[int], idle: bool, now: float
    ) -> PoolChanges:
        """Groups to map for this step's blocks, and groups to release.

        ``idle``: the step schedules no tokens. Every ``release_every``
        busy steps the groups of requests finished since are checked; an
        idle step after activity checks every mapped group, at most every
        ``idle_interval_s`` (``now`` is a monotonic clock).
        """
        changes = PoolChanges()
        g = self.geometry
        for group in sorted({g.group_of(b) for b in used_block_ids}):
            if group not in self.mapped:
                if group in self.balloon:
                    raise PoolError(
                        f"block {group * g.blocks_per_group}+ of group {group} is "
                        "in the max_mapped_bytes balloon but vLLM handed it out"
                    )
                self.mapped.add(group)
                changes.map_groups.append(group)
        self._steps += 1
        if not idle:
            self.needs_idle_pass = True
        idle_scan = (
            idle
            and self.needs_idle_pass
            and now - self._last_idle_scan >= self.idle_interval_s
        )
        if idle_scan:
            self._last_idle_scan = now
            self.needs_idle_pass = False
        if idle_scan or (not idle and self._steps % self.release_every == 0):
            fresh = set(changes.map_groups)
            changes.unmap_groups, changes.evicted_blocks = self._releasable(
                idle, skip=fresh
            )
            self.mapped.difference_update(changes.unmap_groups)
        return changes

    def _releasable(self, idle: bool, skip: set[int]) -> tuple[list[int], int]:
        pool = self._pool
        if pool is None:
            return [], 0
        free: list[int] = []
        cached_only: list[tuple[int, set[int]]] = []
        candidates = self.mapped if idle else self.mapped & self._dirty
        self._dirty = set()
        for group in sorted(candidates - skip - {0}):
            state, cached = self._group_state(pool, group)
            if state == "free":
                free.append(group)
            elif state == "cached":
                cached_only.append((group, cached))
        evicted = 0
        if idle:
            over = self.mapped_bytes - len(free) * self.geometry.group_bytes
            if over > self.idle_mapped_bytes and len(cached_only) > 1:
                cached_only = self._least_recent_first(pool, cached_only)
            for group, cached in cached_only:
                if over <= self.idle_mapped_bytes:
                    break
                pool.evict_blocks(cached)
                evicted += len(cached)
                free.append(group)
                over -= self.geometry.group_bytes
        return free, evicted

    def _least_recent_first(
        self, pool: BlockPoolLike, groups: list[tuple[int, set[int]]]
    ) -> list[tuple[int, set[int]]]:
        """Cached groups in vLLM's own eviction order (its free queue is LRU,
        head first): a group goes when its most recently freed block would.
        Walks the free queue, so only on idle shrinks that must evict."""
        queue = getattr(pool, "free_block_queue", None)
        if queue is None:
            return groups
        rank = {b.block_id: i for i, b in enumerate(queue.get_all_free_blocks())}
        last = len(rank)
        return sorted(groups, key=lambda gc: max(rank.get(b, last) for b in gc[1]))

    def _group_state(self, pool: BlockPoolLike, group: int) -> tuple[str, set[int]]:
        """ "used" (a block is allocated), "cached" (free, some blocks in the
        prefix cache) or "free"."""
        cached: set[int] = set()
        for b in self.geometry.blocks_of(group):
            block = pool.blocks[b]
            if block.ref_cnt > 0 or b in self._pins:
                return "used", cached
            if block.block_hash is not None:
                cached.add(b)
        return ("cached" if cached else "free"), cached


def step_block_ids(
    scheduler_output: Any, receiving: Iterable[Any] = ()
) -> Iterator[int]:
    """Every block id a step's scheduler output allocates or uses, plus the
    local block ids of KV to receive (``receiving``: nested lists of ids)."""
    for req in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
        yield from _flat(req.block_ids)
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for ids in getattr(cached, "new_block_ids", ()) or ():
        if ids is not None:
            yield from _flat(ids)
    for ids in receiving:
        yield from _flat(ids)


def _flat(ids: Any) -> Iterator[int]:
    if isinstance(ids, int):
        yield ids
        return
    for x in ids or ():
        yield from _flat(x)


# ------------------------------------------------------------- worker side


def check_pool_geometry(
    memory: VmmKVAllocator, kv_cache_config: Any, chunk_bytes: int
) -> PoolGeometry:
    """The groups the scheduler computes from its KV cache config, checked
    against the allocator: each group must be its own chunks."""
    t = kv_cache_config.kv_cache_tensors[0]
    try:
        g = pool_geometry(
            kv_cache_config.num_blocks,
            t.block_stride,
            len(t.layers) * t.block_stride,
            chunk_bytes,
        )
    except PoolError as e:
        raise KVMemoryError(str(e)) from None
    if memory.chunk_bytes != chunk_bytes:
        raise KVMemoryError(
            f"kv_connector_extra_config['chunk_bytes'] = {chunk_bytes}, but the "
            f"{type(memory.backend).__name__} maps {memory.chunk_bytes}-byte chunks "
            f"(its granularity); set chunk_bytes to a multiple of "
            f"{memory.backend.granularity}"
        )
    seen: set[int] = set()
    for group in sorted({0, 1, g.num_groups - 1}):
        blocks = g.blocks_of(group)
        chunks = set(
            chunks_for_blocks(memory.geometry, list(blocks), chunk_bytes).tolist()
        )
        full = len(blocks) == g.blocks_per_group
        if (full and len(chunks) * chunk_bytes != g.group_bytes) or chunks & seen:
            raise KVMemoryError(
                f"elastic KV pool: block group {group} ({g.blocks_per_group} blocks) "
                f"spans {len(chunks)} chunks of {chunk_bytes} bytes, not its own "
                f"{g.group_bytes} bytes; this KV layout cannot be mapped by groups "
                "(use allocator 'static')"
            )
        seen |= chunks
    return g


def apply_group_changes(
    memory: VmmKVAllocator,
    blocks_per_group: int,
    map_groups: Sequence[int],
    unmap_groups: Sequence[int],
) -> None:
    """Release, then map, whole groups of blocks."""
    v = memory.num_virtual_blocks

    def ids(groups: Sequence[int]) -> np.ndarray:
        return np.concatenate(
            [
                np.arange(g * blocks_per_group, min((g + 1) * blocks_per_group, v))
                for g in groups
            ]
        )

    if unmap_groups:
        memory.unmap_blocks(ids(unmap_groups))
    if map_groups:
        memory.map_blocks(ids(map_groups))
