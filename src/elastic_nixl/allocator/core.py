"""The elastic KV allocator: page table, grow/shrink, leases, epochs, events.

An elastic KV cache is one large virtual reservation holding ``V`` blocks in
the flat-buffer layout vLLM 0.32 views (``allocate_kv_cache`` /
``create_kv_cache_views``), with physical memory mapped on demand in
``chunk_bytes`` units by a :class:`~elastic_nixl.allocator.backend.MemoryBackend`
(host mmap, CUDA VMM). Where a block's bytes sit is
:mod:`~elastic_nixl.allocator.geometry`; this module decides what is mapped.
``VmmKVAllocator`` implements :class:`~elastic_nixl.capabilities.KVMemory`.

Torch is imported lazily (only ``tensor()`` needs it), so the allocator and
its math load in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from elastic_nixl.allocator import registry
from elastic_nixl.allocator.backend import MemoryBackend
from elastic_nixl.allocator.geometry import (
    BlockGeometry,
    GeometryLike,
    Pieces,
    block_runs_inside,
    block_runs_touching,
    check_int,
    chunk_runs_of_blocks,
)
from elastic_nixl.capabilities import (
    TRANSFERABLE_KV_LAYOUTS,
    ExportKind,
    KVMemoryCapabilities,
    KVMemoryError,
    MappingEvent,
    MappingEventKind,
    MappingListener,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)
from elastic_nixl.runs import IntArray, Runs, as_ids

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# An unmap of up to this many blocks works on the blocks themselves; a larger
# one (a shrink of a range) first narrows them to blocks touching mapped chunks.
_DIRECT_UNMAP_BLOCKS = 1 << 16


class BlockLease:
    """Blocks pinned mapped while a transfer reads or writes them.

    Releasing is idempotent; unmapping deferred on these blocks happens at the
    release of the last lease on them.
    """

    def __init__(
        self, owner: VmmKVAllocator, block_ids: tuple[int, ...], runs: Runs
    ) -> None:
        self._owner = owner
        self._block_ids = block_ids
        self._runs = runs  # the blocks, as runs: what the allocator tracks
        self._released = False

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self._block_ids

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._owner._release_lease(self)

    def __enter__(self) -> BlockLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"BlockLease({len(self._block_ids)} blocks, {state})"


class _Subscription:
    __slots__ = ("listener",)

    def __init__(self, listener: MappingListener) -> None:
        self.listener = listener


class VmmKVAllocator:
    """An elastic KV cache: ``num_virtual_blocks`` of address space, physical
    memory mapped in ``chunk_bytes`` units on demand.

    Implements ``capabilities.KVMemory``. State is O(mapped): a set of mapped
    chunk indices, the blocks asked for as runs, and each live lease's blocks
    as runs. A lease costs O(ids) (sort and search against the fully mapped
    blocks, cached per epoch), never O(ids x layers), under the lock.

    Mapping events are delivered synchronously, with the allocator's lock
    held, after the state (``epoch``, ``mapped_extents``) already shows the
    change: for ``MAPPED`` the memory is mapped; for ``UNMAPPING`` it is still
    mapped and is unmapped when the listeners return. A listener may call back
    into the allocator (the lock is reentrant) but must not block on another
    thread that needs it. A listener that raises does not stop the change; the
    error is re-raised as ``KVMemoryError`` once the change is complete.
    """

    # What the connector can know at config time, before any allocation
    # (``get_required_kvcache_layout``): every layout, re-stridable, elastic.
    # Memory kind and export kinds here are the CUDA backend's defaults; an
    # instance's ``capabilities`` reports its actual backend.
    CAPABILITIES: ClassVar[KVMemoryCapabilities] = KVMemoryCapabilities(
        name="elastic_nixl.vmm",
        memory_kind=MemoryKind.CUDA,
        # Layouts whose per-layer page of a block is one contiguous run: what
        # NIXL descriptors over elastic memory can cover (not BHLNC / LHBNC).
        layouts=TRANSFERABLE_KV_LAYOUTS,
        can_restride=True,
        stability=MappingStability.ELASTIC,
        export_kinds=frozenset({ExportKind.POSIX_FD}),
    )

    def __init__(
        self,
        backend: MemoryBackend,
        geometry: GeometryLike,
        num_virtual_blocks: int,
        chunk_bytes: int | None = None,
        name: str = "elastic-kv",
    ) -> None:
        if not isinstance(backend, MemoryBackend):
            raise TypeError(
                f"backend must be a MemoryBackend, got {type(backend).__name__}"
            )
        self._name = str(name)
        self._num_blocks = check_int("num_virtual_blocks", num_virtual_blocks, 1)
        granularity = int(backend.granularity)
        if chunk_bytes is None:
            chunk_bytes = granularity
        chunk_bytes = check_int("chunk_bytes", chunk_bytes, 1)
        if chunk_bytes % granularity:
            raise ValueError(
                f"chunk_bytes {chunk_bytes} is not a multiple of the "
                f"{type(backend).__name__} granularity {granularity} "
                f"(try {-(-chunk_bytes // granularity) * granularity})"
            )
        self._geometry = (
            (geometry,) if isinstance(geometry, BlockGeometry) else tuple(geometry)
        )
        self._pieces = Pieces.of(self._geometry)
        for g in self._geometry:
            self._check_geometry(g)
        self._chunk = chunk_bytes
        span = max(g.reservation_bytes(self._num_blocks) for g in self._geometry)
        self._num_chunks = -(-span // chunk_bytes)
        self._nbytes = self._num_chunks * chunk_bytes
        self._backend = backend
        self._kind = backend.memory_kind
        self._device = int(backend.device)
        self._capabilities = dataclasses.replace(
            self.CAPABILITIES,
            name=self._name,
            memory_kind=self._kind,
            export_kinds=frozenset(backend.export_kinds),
        )

        self._lock = threading.RLock()
        self._mapped: set[int] = set()
        self._wanted = Runs.empty()
        self._leases: set[BlockLease] = set()
        self._leased_cache: Runs | None = None  # union of the live leases' runs
        # Whether a leased block may be unwanted, i.e. an unmap was deferred:
        # without one, releasing a lease has nothing to unmap (the common
        # case, kept O(lease) rather than O(mapped)).
        self._deferred = False
        self._subs: list[_Subscription] = []
        self._epoch = 0
        self._closed = False
        # Mapped chunks as runs, kept up to date by every change (so a change
        # costs O(runs), not a rebuild from the set); fully mapped blocks and
        # the extent tuple are derived lazily, per epoch, for whoever asks.
        self._mapped_runs = Runs.empty()
        self._full_epoch = -1
        self._full = Runs.empty()
        self._extents_epoch = 0
        self._extents: tuple[MemoryExtent, ...] = ()
        self._tensor_ref: weakref.ref[torch.Tensor] | None = None

        self._base = int(backend.reserve(self._nbytes))
        self._reservation = MemoryExtent(
            self._base, self._nbytes, self._device, self._kind
        )
        self._finalizer = weakref.finalize(self, _free_backend, backend, self._name)
        registry.register(self)

    def _check_geometry(self, g: BlockGeometry) -> None:
        """Refuse a geometry built for fewer blocks than ``num_virtual_blocks``:
        its layers (or blocks) would overlap."""
        v = self._num_blocks
        if g.num_layers > 1 and g.layer_stride >= g.block_stride:
            need = (v - 1) * g.block_stride + g.segment_bytes
            if g.layer_stride < need:
                raise ValueError(
                    f"layer_stride {g.layer_stride} is too small for "
                    f"num_virtual_blocks {v} (a layer spans {need} bytes): build "
                    "the geometry with the virtual block count"
                )
        elif g.num_layers > 1 and g.block_stride < g.num_layers * g.layer_stride:
            raise ValueError(
                f"block_stride {g.block_stride} is smaller than num_layers * "
                f"layer_stride ({g.num_layers} * {g.layer_stride}): blocks overlap"
            )

    # ------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> MemoryBackend:
        return self._backend

    @property
    def geometry(self) -> tuple[BlockGeometry, ...]:
        return self._geometry

    @property
    def chunk_bytes(self) -> int:
        return self._chunk

    @property
    def num_chunks(self) -> int:
        """Chunks in the reservation (mapped or not)."""
        return self._num_chunks

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        return self._capabilities

    @property
    def reservation(self) -> MemoryExtent:
        return self._reservation

    @property
    def num_virtual_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_mapped_blocks(self) -> int:
        """Blocks all of whose bytes (every layer) are mapped (O(mapped) once
        per epoch: for reports, not hot paths)."""
        with self._lock:
            return self._fully_mapped().count

    @property
    def num_mapped_chunks(self) -> int:
        return len(self._mapped)

    @property
    def mapped_bytes(self) -> int:
        return len(self._mapped) * self._chunk

    @property
    def epoch(self) -> int:
        return self._epoch

    def wanted_blocks(self) -> Runs:
        """Blocks mapped on request (``map_blocks``/``grow_to``) and not since
        unmapped; other blocks may be mapped because they share chunks."""
        with self._lock:
            return self._wanted

    def leased_blocks(self) -> dict[int, int]:
        """Block id -> number of live leases on it (O(leased ids): for reports
        and tests, not hot paths)."""
        with self._lock:
            if not self._leases:
                return {}
            ids = np.concatenate([lease._runs.ids() for lease in self._leases])
            uniq, counts = np.unique(ids, return_counts=True)
            return dict(zip(uniq.tolist(), counts.tolist(), strict=True))

    def _leased_runs(self) -> Runs:
        """Blocks under at least one live lease (cached until one changes)."""
        if self._leased_cache is None:
            if not self._leases:
                self._leased_cache = Runs.empty()
            else:
                leases = list(self._leases)
                self._leased_cache = Runs.from_intervals(
                    np.concatenate([lease._runs.starts for lease in leases]),
                    np.concatenate([lease._runs.ends for lease in leases]),
                )
        return self._leased_cache

    # ------------------------------------------------------------- queries

    def _fully_mapped(self) -> Runs:
        """Blocks every byte of which is mapped, cached per epoch."""
        if self._full_epoch != self._epoch:
            self._full = block_runs_inside(
                self._pieces, self._mapped_runs, self._chunk, self._num_blocks
            )
            self._full_epoch = self._epoch
        return self._full

    def _extent(self, chunk: int) -> MemoryExtent:
        return MemoryExtent(
            self._base + chunk * self._chunk, self._chunk, self._device, self._kind
        )

    def mapped_extents(self) -> tuple[MemoryExtent, ...]:
        """One extent per mapped chunk, sorted by base."""
        with self._lock:
            if self._extents_epoch != self._epoch:
                self._extents = tuple(self._extent(c) for c in sorted(self._mapped))
                self._extents_epoch = self._epoch
            return self._extents

    def unmapped_blocks(self, block_ids: Iterable[int]) -> list[int]:
        """The ids (in the order given) that are out of range or not fully mapped.

        O(ids x pieces), whatever is mapped: each piece of each block must lie
        in one run of mapped chunks.
        """
        ids = as_ids(block_ids)
        ok = (ids >= 0) & (ids < self._num_blocks)
        with self._lock:
            if ok.any():
                p, chunk = self._pieces, self._chunk
                start = p.base[None, :] + ids[ok, None] * p.stride[None, :]
                lo = start // chunk
                hi = (start + p.nbytes[None, :] - 1) // chunk + 1
                ok[ok] = self._mapped_runs.covers_ranges(lo, hi).all(axis=1)
        return ids[~ok].tolist()

    # ------------------------------------------------------------- events

    def subscribe(self, listener: MappingListener) -> Callable[[], None]:
        """Call ``listener`` on every change (see the class docstring for when).

        Returns an idempotent unsubscribe.
        """
        if not callable(listener):
            raise TypeError("listener must be callable")
        sub = _Subscription(listener)
        with self._lock:
            self._subs.append(sub)

        def unsubscribe() -> None:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

        return unsubscribe

    def _emit(self, event: MappingEvent) -> Exception | None:
        first: Exception | None = None
        for sub in list(self._subs):
            try:
                sub.listener(event)
            except Exception as exc:
                logger.exception(
                    "%s: mapping listener %r failed on %s (epoch %d)",
                    self._name,
                    sub.listener,
                    event.kind.value,
                    event.epoch,
                )
                if first is None:
                    first = KVMemoryError(
                        f"allocator {self._name!r}: mapping listener "
                        f"{sub.listener!r} failed on {event.kind.value} event "
                        f"(epoch {event.epoch}): {exc}"
                    )
                    first.__cause__ = exc
        return first

    # ------------------------------------------------------------- mapping

    def _ensure_open(self) -> None:
        if self._closed:
            raise KVMemoryError(f"allocator {self._name!r} is closed")

    def _checked_ids(self, block_ids: Iterable[int] | npt.ArrayLike) -> IntArray:
        ids = as_ids(block_ids)
        bad = ids[(ids < 0) | (ids >= self._num_blocks)]
        if bad.size:
            more = f" ({bad.size} ids out of range)" if bad.size > 1 else ""
            raise ValueError(
                f"block id {int(bad[0])} out of range [0, {self._num_blocks}) of "
                f"allocator {self._name!r}{more}"
            )
        return ids

    def _check_count(self, num_blocks: int) -> int:
        n = check_int("num_blocks", num_blocks, 0)
        if n > self._num_blocks:
            raise ValueError(
                f"num_blocks {n} exceeds num_virtual_blocks {self._num_blocks} of "
                f"allocator {self._name!r}"
            )
        return n

    def map_blocks(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[MemoryExtent, ...]:
        """Map every chunk the blocks touch (all layers); the newly mapped extents.

        Emits one ``MAPPED`` event and bumps the epoch once if anything was
        mapped. On failure nothing is left half-mapped.
        """
        with self._lock:
            self._ensure_open()
            return self._map_runs(Runs.from_ids(self._checked_ids(block_ids)))

    def grow_to(self, num_blocks: int) -> tuple[MemoryExtent, ...]:
        """Map blocks ``[0, num_blocks)``; the newly mapped extents."""
        with self._lock:
            self._ensure_open()
            return self._map_runs(Runs.range(0, self._check_count(num_blocks)))

    def unmap_blocks(
        self, block_ids: Iterable[int] | npt.ArrayLike
    ) -> tuple[MemoryExtent, ...]:
        """Stop wanting the blocks; unmap chunks no wanted or leased block uses.

        Chunks holding a leased block stay mapped until its last lease is
        released. Returns the extents unmapped now.
        """
        with self._lock:
            self._ensure_open()
            return self._unmap_runs(Runs.from_ids(self._checked_ids(block_ids)))

    def shrink_to(self, num_blocks: int) -> tuple[MemoryExtent, ...]:
        """Unmap blocks ``[num_blocks, V)`` (as ``unmap_blocks``)."""
        with self._lock:
            self._ensure_open()
            n = self._check_count(num_blocks)
            return self._unmap_runs(Runs.range(n, self._num_blocks))

    def _map_runs(self, blocks: Runs) -> tuple[MemoryExtent, ...]:
        need = chunk_runs_of_blocks(self._pieces, blocks, self._chunk).difference(
            self._mapped_runs
        )
        done: list[int] = []
        for c in need.ids().tolist():
            try:
                self._backend.map(c * self._chunk, self._chunk)
            except Exception as exc:
                for d in reversed(done):
                    try:
                        self._backend.unmap(d * self._chunk, self._chunk)
                    except Exception:
                        logger.exception(
                            "%s: rollback of chunk %d failed", self._name, d
                        )
                raise KVMemoryError(
                    f"allocator {self._name!r}: mapping chunk {c} "
                    f"(offset {c * self._chunk}, {self._chunk} bytes) failed; "
                    f"{len(done)} chunks mapped by this call were rolled back: {exc}"
                ) from exc
            done.append(c)
        self._wanted = self._wanted.union(blocks)
        if not done:
            return ()
        self._mapped.update(done)
        self._mapped_runs = self._mapped_runs.union(need)
        self._epoch += 1
        extents = tuple(self._extent(c) for c in done)
        error = self._emit(MappingEvent(MappingEventKind.MAPPED, extents, self._epoch))
        if error is not None:
            raise error
        return extents

    def _unmap_runs(self, blocks: Runs) -> tuple[MemoryExtent, ...]:
        self._wanted = self._wanted.difference(blocks)
        self._deferred = self._deferred or bool(self._leases)
        mapped_runs = self._mapped_runs
        if blocks.count > _DIRECT_UNMAP_BLOCKS:
            # A bulk shrink (``shrink_to``): only blocks that touch mapped
            # chunks matter, which keeps it O(mapped), not O(V).
            blocks = blocks.intersection(
                block_runs_touching(
                    self._pieces, mapped_runs, self._chunk, self._num_blocks
                )
            )
        candidates = chunk_runs_of_blocks(
            self._pieces, blocks, self._chunk
        ).intersection(mapped_runs)
        return self._release_unneeded(candidates)

    def _release_unneeded(self, candidates: Runs) -> tuple[MemoryExtent, ...]:
        """Unmap the candidate chunks that no wanted or leased block touches."""
        if not candidates:
            return ()
        users = block_runs_touching(
            self._pieces, candidates, self._chunk, self._num_blocks
        )
        keepers = users.intersection(self._wanted.union(self._leased_runs()))
        keep = chunk_runs_of_blocks(self._pieces, keepers, self._chunk)
        release = candidates.difference(keep)
        if not release:
            return ()
        return self._unmap_chunks(release.ids().tolist())

    def _unmap_chunks(self, chunks: list[int]) -> tuple[MemoryExtent, ...]:
        extents = tuple(self._extent(c) for c in chunks)
        self._mapped.difference_update(chunks)
        self._mapped_runs = self._mapped_runs.difference(Runs.from_ids(chunks))
        self._epoch += 1
        error = self._emit(
            MappingEvent(MappingEventKind.UNMAPPING, extents, self._epoch)
        )
        failed: list[tuple[str, Exception]] = []
        try:
            self._backend.quiesce()
        except Exception as exc:  # unmap anyway: the state already says so
            logger.exception("%s: quiesce before unmapping failed", self._name)
            failed.append(("quiesce before unmapping", exc))
        for c in chunks:
            try:
                self._backend.unmap(c * self._chunk, self._chunk)
            except Exception as exc:
                logger.exception("%s: unmapping chunk %d failed", self._name, c)
                failed.append((f"unmapping chunk {c}", exc))
        if failed:
            what, cause = failed[0]
            raise KVMemoryError(
                f"allocator {self._name!r}: {what} failed "
                f"({len(failed)} failures unmapping {len(chunks)} chunks): {cause}"
            ) from cause
        if error is not None:
            raise error
        return extents

    # -------------------------------------------------------------- leases

    def lease(self, block_ids: Sequence[int]) -> BlockLease:
        """Pin ``block_ids`` mapped until the lease is released.

        Raises ``KVMemoryError`` naming the first block that is out of range
        or not fully mapped. Leases on the same block stack. Costs O(ids):
        the ids are sorted into runs and checked against the fully mapped
        blocks (runs, cached per epoch), whatever the number of layers.
        """
        ids = as_ids(block_ids)
        # Sorting into runs and the tuple are O(ids): outside the lock, which
        # is held for O(runs) (O(ids) only to name the culprits of a refusal).
        runs = Runs.from_ids(ids)
        as_tuple = tuple(ids.tolist())
        with self._lock:
            self._ensure_open()
            if runs.difference(self._fully_mapped()):
                # (Blocks out of range are never fully mapped.)
                bad = ids[~self._fully_mapped().contains(ids)]
                b = int(bad[0])
                why = (
                    f"out of range [0, {self._num_blocks})"
                    if not 0 <= b < self._num_blocks
                    else "not mapped"
                )
                more = (
                    f" ({bad.size} of {ids.size} blocks unusable)"
                    if bad.size > 1
                    else ""
                )
                raise KVMemoryError(
                    f"cannot lease block {b} of allocator {self._name!r}: "
                    f"it is {why}{more}"
                )
            lease = BlockLease(self, as_tuple, runs)
            self._leases.add(lease)
            self._leased_cache = None
            return lease

    def _release_lease(self, lease: BlockLease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            self._leases.discard(lease)
            self._leased_cache = None
            if self._closed or not self._deferred:
                # Nothing was unmapped while leased: nothing to unmap now.
                return
            leased = self._leased_runs()
            freed = lease._runs.difference(leased)
            if not freed:
                return
            candidates = chunk_runs_of_blocks(
                self._pieces, freed, self._chunk
            ).intersection(self._mapped_runs)
            self._release_unneeded(candidates)
            self._deferred = bool(self._leased_runs().difference(self._wanted))

    # -------------------------------------------------------------- tensor

    def tensor(self) -> torch.Tensor:
        """Flat int8 tensor over the whole reservation (mapped or not).

        vLLM builds per-layer ``as_strided`` views over it in any layout.
        Touching unmapped bytes faults (host: SIGSEGV; CUDA: illegal address).
        The tensor keeps the allocator alive, but ``close()`` unmaps
        regardless: do not use views after closing.
        """
        with self._lock:
            self._ensure_open()
            t = self._tensor_ref() if self._tensor_ref is not None else None
            if t is None:
                t = self._backend.tensor(self._nbytes, keepalive=self)
                self._tensor_ref = weakref.ref(t)
            return t

    # ----------------------------------------------------------- lifetime

    def close(self) -> None:
        """Unmap everything (``UNMAPPING`` first), free the reservation.

        Outstanding leases become inert; idempotent.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._mapped:
                    self._unmap_chunks(sorted(self._mapped))
            finally:
                self._closed = True
                self._wanted = Runs.empty()
                self._leased_cache = None
                for lease in self._leases:
                    lease._released = True
                self._leases.clear()
                self._subs.clear()
                self._finalizer.detach()
                registry.unregister(self)
                self._backend.free()

    def __enter__(self) -> VmmKVAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VmmKVAllocator({self._name!r}, {self._kind.value}, "
            f"base=0x{self._base:x}, {self._num_blocks} blocks, "
            f"{len(self._mapped)}/{self._num_chunks} chunks of {self._chunk} bytes "
            f"mapped, epoch {self._epoch}{', closed' if self._closed else ''})"
        )


def _free_backend(backend: MemoryBackend, name: str) -> None:
    """Finalizer for an allocator dropped without ``close()``."""
    try:
        backend.free()
    except Exception:
        logger.exception("%s: freeing the reservation at exit failed", name)
