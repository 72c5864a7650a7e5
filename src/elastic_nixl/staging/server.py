"""The producer's side of the staged path: gather blocks, WRITE them to a consumer.

See :mod:`elastic_nixl.staging.protocol` for the messages. A ``Stage`` is
checked before any lease or slot is taken (at most ``max_blocks_per_transfer``
blocks, every id inside this producer's rows), then leases the blocks for the
transfer (so they stay mapped while they are gathered) and is refused, before
any GPU access, when a block is not mapped. A chunk moves once the consumer
granted it a slot and one of ours is free: gather into our slot, WRITE into
theirs with ``Written`` as the notification, free our slot when the WRITE
completes. A gather or WRITE that raises returns its slot and ends its
transfer with ``Failed`` naming the reason. Jobs take turns; one that makes no
progress for the timeout (a consumer that vanished) is failed and its lease
released. A ``Cancel`` is always answered: at once when nothing of the
transfer runs (even one we never saw), else once its last WRITE is done.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastic_nixl.capabilities import KVMemoryError, Lease
from elastic_nixl.staging.buffer import chunk_ids
from elastic_nixl.staging.endpoint import (
    DEFAULT_TIMEOUT_S,
    StagingEndpoint,
    is_done,
)
from elastic_nixl.staging.protocol import (
    MAX_BLOCKS_PER_TRANSFER,
    Cancel,
    Failed,
    Grant,
    Message,
    Stage,
    StagingOffer,
    Written,
    encode,
)

logger = logging.getLogger(__name__)

LeaseFn = Callable[[Sequence[int]], Lease]
Key = tuple[str, str]  # (consumer staging agent, xfer): one transfer
# Transfers that ended, remembered so a replayed Stage does not start again.
_RECENT = 4096


@dataclass
class _Job:
    key: Key
    chunks: list[list[int]]
    lease: Lease | None
    target: StagingOffer
    granted: dict[int, int] = field(default_factory=dict)  # chunk -> their slot
    started: set[int] = field(default_factory=set)  # gathered or being written
    sent: set[int] = field(default_factory=set)  # WRITE completed
    gathering: int = 0  # gathers in flight: the lease must outlive them
    writing: int = 0
    ended: bool = False
    reason: str | None = None  # why it ended early; None: every chunk sent
    active: float = field(default_factory=time.monotonic)


class StagingServer(StagingEndpoint):
    """Producer side: pushes requested blocks through slots into consumers'.

    State is keyed by transfer ``(consumer agent, xfer)``; a chunk moves only
    into the slot its consumer granted for it, and each consumer slot holds
    at most one grant at a time.
    """

    def __init__(
        self,
        agent: Any,
        region_views: Sequence[torch.Tensor],
        lease: LeaseFn,
        slot_blocks: int,
        slots: int,
        mem_type: str,
        *,
        slot_timeout_s: float = DEFAULT_TIMEOUT_S,
        max_blocks_per_transfer: int | None = None,
        name: str = "elastic-nixl-staging-server",
    ) -> None:
        super().__init__(agent, region_views, slot_blocks, slots, mem_type, name)
        self._lease = lease
        # A request names each of its blocks once, so no honest Stage names
        # more blocks than this producer has rows: the default bound. The
        # wire format's MAX_BLOCKS_PER_TRANSFER is only the decoder's limit.
        bound = (
            self.rows.num_blocks
            if max_blocks_per_transfer is None
            else max_blocks_per_transfer
        )
        if bound < 1:
            raise ValueError(
                f"staging server: max_blocks_per_transfer {bound} must be at least 1"
            )
        self.max_blocks_per_transfer = min(bound, MAX_BLOCKS_PER_TRANSFER)
        self._timeout = slot_timeout_s
        self._jobs: dict[Key, _Job] = {}
        # Jobs that ended with a gather or WRITE of theirs still in flight.
        self._draining: dict[Key, _Job] = {}
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._order: deque[Key] = deque()
        self._readers: dict[str, StagingOffer] = {}
        # consumer agent -> its slots granted to a chunk not yet written
        self._claimed: dict[str, set[int]] = {}
        self._gathering: list[tuple[torch.cuda.Event | None, int, _Job, int]] = []
        self._writing: list[tuple[Any, int, _Job, int]] = []
        self.start()

    @property
    def active_transfers(self) -> int:
        """Transfers holding a lease now."""
        return len(self._jobs)

    def step(self) -> bool:
        self.drain_notifications()
        self._finish_gathers()
        self._finish_writes()
        self._dispatch()
        self._expire()
        return bool(self._gathering or self._writing or self._order)

    def handle(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Stage):
            self._on_stage(peer, msg)
        elif isinstance(msg, Grant):
            self._on_grant(peer, msg)
        elif isinstance(msg, Cancel):
            key = (peer, msg.xfer)
            job = self._jobs.get(key)
            if job is not None:
                self._end(job, "cancelled by the consumer")
            elif key not in self._draining:
                # Nothing of it runs or will be written (a Stage we refused or
                # never saw, or one long over): say so, so the consumer need
                # not hold the slots it granted until its quarantine ends. A
                # transfer still draining answers once its last WRITE is done.
                self.send(peer, Failed(msg.xfer, "no such transfer is running"))
        else:
            self.reject(peer, f"{type(msg).__name__} is not a consumer's message")

    def _on_stage(self, peer: str, msg: Stage) -> None:
        if msg.reader is not None:
            self._know_reader(peer, msg.reader)
        target = self._readers.get(peer)
        if target is None:
            self.reject(peer, f"Stage {msg.xfer} from an agent that sent no slots")
            return
        key = (peer, msg.xfer)
        if key in self._jobs or key in self._ended:
            # A replay must not take a second lease on the same blocks.
            self.reject(peer, f"Stage {msg.xfer} repeats a transfer already staged")
            return
        why = self._refusal(msg.block_ids)
        if why is None:
            try:
                lease = self._lease(msg.block_ids)
            except KVMemoryError as e:
                why = str(e)
            except Exception as e:  # noqa: BLE001 - the consumer must hear why
                why = f"{type(e).__name__}: {e}"
        if why is not None:
            self.stats.failures += 1
            self._remember(key)
            self.send(peer, Failed(msg.xfer, f"producer cannot stage blocks: {why}"))
            return
        step = min(self.slot_blocks, target.slot_blocks, msg.max_blocks)
        job = _Job(key, chunk_ids(msg.block_ids, step), lease, target)
        self._jobs[key] = job
        self._order.append(key)
        for chunk, slot in enumerate(msg.grants):
            self._grant(job, chunk, slot)

    def _refusal(self, block_ids: Sequence[int]) -> str | None:
        """Why a Stage of ``block_ids`` cannot be served (before any lease or
        slot is taken), or None. O(ids), vectorised."""
        n = len(block_ids)
        if n > self.max_blocks_per_transfer:
            return (
                f"{n} blocks in one transfer; this producer stages at most "
                f"{self.max_blocks_per_transfer} (max_blocks_per_transfer)"
            )
        ids = np.asarray(block_ids, dtype=np.int64)
        rows = self.rows.num_blocks
        bad = np.flatnonzero((ids < 0) | (ids >= rows))
        if bad.size:
            more = f" ({bad.size} ids out of range)" if bad.size > 1 else ""
            return (
                f"block {int(ids[bad[0]])} is outside this producer's blocks "
                f"[0, {rows}){more}"
            )
        return None

    def _know_reader(self, peer: str, offer: StagingOffer) -> None:
        if offer.agent_name != peer:
            raise ValueError(f"{peer} sent the slots of agent {offer.agent_name!r}")
        offer.validate()
        if offer.num_regions != self.num_regions or offer.block_len != self.block_len:
            raise ValueError(
                f"consumer {peer} slots hold {offer.num_regions} regions of "
                f"{offer.block_len}-byte pages; this engine has "
                f"{self.num_regions} of {self.block_len}"
            )
        self.load_peer(offer)
        self._readers[peer] = offer
        self._claimed.setdefault(peer, set())

    def _on_grant(self, peer: str, msg: Grant) -> None:
        job = self._jobs.get((peer, msg.xfer))
        if job is None:
            self.reject(peer, f"Grant for {msg.xfer}, a transfer not running")
            return
        self._grant(job, msg.chunk, msg.slot)

    def _grant(self, job: _Job, chunk: int, slot: int) -> None:
        peer = job.key[0]
        why = None
        if chunk >= len(job.chunks):
            why = f"chunk {chunk} of a {len(job.chunks)}-chunk transfer"
        elif chunk in job.granted or chunk in job.sent:
            why = f"chunk {chunk} again"
        elif slot >= job.target.slots:
            why = f"slot {slot} of {job.target.slots}"
        elif slot in self._claimed[peer]:
            why = f"slot {slot}, which holds another chunk's grant"
        if why is not None:
            self.reject(peer, f"Grant for {job.key[1]} names {why}")
            return
        job.granted[chunk] = slot
        self._claimed[peer].add(slot)
        job.active = time.monotonic()

    def _dispatch(self) -> None:
        """Gather granted chunks into free slots, jobs taking turns."""
        rounds = len(self._order)
        while self.free_slots and self._order and rounds > 0:
            rounds -= 1
            key = self._order.popleft()
            job = self._jobs.get(key)
            if job is None:
                continue
            ready = [c for c in job.granted if c not in job.started]
            if ready:
                chunk = min(ready)
                if not self._start_gather(job, chunk):
                    continue  # the job ended; it takes no further turn
                rounds = len(self._order) + 1
            if len(job.started) < len(job.chunks):
                self._order.append(key)

    def _start_gather(self, job: _Job, chunk: int) -> bool:
        """Gather ``chunk`` into a free slot. Whatever the gather raises, the
        slot comes back and the job ends, its consumer told why: no failure
        may keep a slot (every later transfer would wait for it)."""
        slot = self.free_slots.popleft()
        started = False
        reason = "gather interrupted"
        try:
            event = self.copy_async(self.buffer.gather, job.chunks[chunk], slot)
            started = True
        except Exception as e:  # noqa: BLE001 - fails this transfer alone
            reason = f"gather of chunk {chunk} failed: {type(e).__name__}: {e}"
            logger.warning("staging server: transfer %s: %s", job.key, reason)
        finally:
            if not started:
                self.free_slots.appendleft(slot)
                self._end(job, reason)
        if not started:
            return False
        job.started.add(chunk)
        job.gathering += 1
        self._gathering.append((event, slot, job, chunk))
        return True

    def _finish_gathers(self) -> None:
        pending = []
        for item in self._gathering:
            event, slot, job, chunk = item
            if not is_done(event):
                pending.append(item)
                continue
            job.gathering -= 1
            if job.ended:
                self.free_slots.append(slot)
                self._release_when_idle(job)
                continue
            n = len(job.chunks[chunk])
            their = job.granted[chunk]
            try:
                handle = self.write(
                    slot,
                    n,
                    job.target,
                    their,
                    encode(Written(job.key[1], chunk, their, n)),
                )
            except Exception as e:  # noqa: BLE001 - fails this transfer alone
                self.free_slots.append(slot)
                self._end(job, f"WRITE of chunk {chunk} failed: {e}")
                continue
            job.writing += 1
            self._writing.append((handle, slot, job, chunk))
        self._gathering = pending

    def _finish_writes(self) -> None:
        pending = []
        for item in self._writing:
            handle, slot, job, chunk = item
            try:
                state = self.agent.check_xfer_state(handle)
            except Exception as e:  # noqa: BLE001
                state = f"ERR ({e})"
            if state == "PROC":
                pending.append(item)
                continue
            self.release(handle)
            self.free_slots.append(slot)
            job.writing -= 1
            their = job.granted.pop(chunk, None)
            if their is not None:
                self._claimed[job.key[0]].discard(their)
            if job.ended:
                self._release_when_idle(job)
                continue
            if state != "DONE":
                self._end(job, f"WRITE of chunk {chunk} ended in {state}")
                continue
            n = len(job.chunks[chunk])
            job.sent.add(chunk)
            job.active = time.monotonic()
            self.stats.chunks += 1
            self.stats.blocks += n
            self.stats.bytes += self.buffer.geometry.chunk_bytes(n)
            if len(job.sent) == len(job.chunks):
                self.stats.transfers += 1
                self._end(job, None)
        self._writing = pending

    def _end(self, job: _Job, reason: str | None) -> None:
        """End a job: no new chunk starts; its lease goes once no gather of it
        runs, and a consumer that asked to cancel is answered once no WRITE
        of it is in flight (so it may reuse the slots it granted)."""
        if job.ended:
            return
        job.ended = True
        job.reason = reason
        self._jobs.pop(job.key, None)
        self._draining[job.key] = job
        self._remember(job.key)
        if reason is not None:
            self.stats.failures += 1
        self._release_when_idle(job)

    def _release_when_idle(self, job: _Job) -> None:
        if job.gathering == 0 and job.lease is not None:
            job.lease.release()
            job.lease = None
        if job.gathering == 0 and job.writing == 0:
            self._draining.pop(job.key, None)
            claimed = self._claimed.get(job.key[0], set())
            for slot in job.granted.values():
                claimed.discard(slot)
            job.granted.clear()
            if job.reason is not None:
                self.send(job.key[0], Failed(job.key[1], job.reason))
                job.reason = None  # said once

    def _remember(self, key: Key) -> None:
        self._ended[key] = None
        while len(self._ended) > _RECENT:
            self._ended.popitem(last=False)

    def _expire(self) -> None:
        """A consumer that vanished mid-transfer must not hold a lease forever."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job.gathering or job.writing or now - job.active <= self._timeout:
                continue
            logger.warning(
                "staging server: transfer %s made no progress for %.0f s; ended",
                job.key,
                self._timeout,
            )
            self._end(
                job,
                f"no grant from the consumer within {self._timeout:.0f} s",
            )

    def close(self) -> None:
        super().close()
        for item in self._writing:
            self.release(item[0])
        self._writing.clear()
        self._gathering.clear()
        for job in list(self._jobs.values()):
            job.gathering = job.writing = 0
            self._end(job, "producer shut down")
        # Jobs that ended with work in flight: that work is dropped with the
        # thread, so their leases go now.
        for job in list(self._draining.values()):
            job.gathering = job.writing = 0
            self._release_when_idle(job)
