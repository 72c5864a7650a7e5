"""The consumer's side of the staged path: grant slots, scatter what arrives.

See :mod:`elastic_nixl.staging.protocol` for the messages. A read is split
into chunks no larger than either side's slot. The reader grants its free
slots to chunks (transfers taking turns); the producer WRITEs each chunk into
its slot and NIXL delivers ``Written`` once the bytes are there; the reader
scatters the slot into the blocks and grants it again. A slot granted to a
transfer that failed is reused only once the producer said the transfer is
over (so no late WRITE can land in it), or after twice the timeout. Results
are collected by the engine's thread with :meth:`StagedReader.poll_results`.

Grants are fair: a new transfer's ``Stage`` carries at most its share of our
slots (``slots // transfers waiting``, at least one), free slots go round the
waiting transfers one at a time, and the transfers of one producer never
hold more than ``slots - 1`` slots between them (granted, or quarantined
after a failure). So a producer that goes silent holding slots, and then
holds them quarantined for twice the timeout, never blocks reads from other
producers; with ``staging_slots`` 1 there is nothing to spare.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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


@dataclass(frozen=True)
class StagedRead:
    """One request's blocks from one producer rank."""

    req_id: str
    offer: StagingOffer
    remote_block_ids: Sequence[int]
    local_block_ids: Sequence[int]


@dataclass
class _Transfer:
    read: StagedRead
    xfer: str
    chunks: list[list[int]]  # positions into the read's block lists
    deadline: float
    granted: dict[int, int] = field(default_factory=dict)  # chunk -> our slot
    next_grant: int = 0  # chunks below this one have been granted
    written: set[int] = field(default_factory=set)  # chunks a Written named
    arrived: set[int] = field(default_factory=set)  # chunks scattered
    scattering: int = 0
    error: str | None = None
    finished: bool = False
    quarantine_until: float = 0.0  # slots held for a failed transfer

    @property
    def producer(self) -> str:
        return self.read.offer.agent_name


_xfer_ids = itertools.count()


class StagedReader(StagingEndpoint):
    """Consumer side: asks producers to push, scatters what they write.

    A transfer succeeds only when each of its chunks, by index, was written
    once into the slot granted to it and scattered; anything else a producer
    sends is dropped or fails that transfer alone.
    """

    def __init__(
        self,
        agent: Any,
        region_views: Sequence[torch.Tensor],
        slot_blocks: int,
        slots: int,
        mem_type: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str = "elastic-nixl-staged-reader",
    ) -> None:
        super().__init__(agent, region_views, slot_blocks, slots, mem_type, name)
        self._timeout = timeout_s
        self._inbox: queue.Queue[StagedRead] = queue.Queue()
        self._results: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        # Failed transfers whose granted slots wait for the producer's word.
        self._quarantined: dict[tuple[str, str], _Transfer] = {}
        self._told: dict[str, StagingOffer] = {}  # producer -> offer we told
        self._scatters: list[tuple[torch.cuda.Event | None, _Transfer, int, int]] = []
        self.start()

    # -- called from other threads ------------------------------------------

    def submit(self, read: StagedRead) -> None:
        """Queue ``read`` for the reader thread; raises ``ValueError`` at once
        when it cannot fit this engine's slots or memory."""
        n = len(read.local_block_ids)
        if len(read.remote_block_ids) != n:
            raise ValueError(
                f"request {read.req_id}: {len(read.remote_block_ids)} remote blocks "
                f"for {n} local blocks"
            )
        if not 0 < n <= MAX_BLOCKS_PER_TRANSFER:
            raise ValueError(
                f"request {read.req_id}: {n} blocks; a staged read moves 1 to "
                f"{MAX_BLOCKS_PER_TRANSFER}"
            )
        offer = read.offer.validate()
        if offer.num_regions != self.num_regions or offer.block_len != self.block_len:
            raise ValueError(
                f"request {read.req_id}: producer staging slots hold "
                f"{offer.num_regions} regions of {offer.block_len}-byte pages, "
                f"this engine has {self.num_regions} of {self.block_len}"
            )
        capacity = self.rows.num_blocks
        bad = [b for b in read.local_block_ids if not 0 <= int(b) < capacity]
        if bad:
            raise ValueError(
                f"request {read.req_id}: local block(s) {bad[:8]} outside this "
                f"engine's {capacity} blocks"
            )
        self._inbox.put(read)
        self._wake.set()

    def poll_results(self) -> list[tuple[str, str | None]]:
        """``(req_id, None)`` for each finished read, ``(req_id, reason)`` for
        each failed one."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def next_result(self, timeout: float) -> tuple[str, str | None]:
        """Block for the next finished or failed read (benchmarks, tools)."""
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no staged read finished within {timeout} s") from None

    @property
    def active_transfers(self) -> int:
        """Reads in flight now."""
        return len(self._transfers)

    # -- the reader thread ----------------------------------------------------

    def step(self) -> bool:
        self._start_new()
        self.drain_notifications()
        self._check_scatters()
        self._expire()
        self._grant_free_slots()
        return bool(self._scatters or self._transfers)

    def _start_new(self) -> None:
        while True:
            try:
                read = self._inbox.get_nowait()
            except queue.Empty:
                return
            offer = read.offer
            t = _Transfer(
                read,
                f"{read.req_id}#{next(_xfer_ids)}",
                # Chunks are the smallest of the two sides' slots, the rule the
                # producer applies with Stage.max_blocks.
                chunk_ids(
                    range(len(read.local_block_ids)),
                    min(self.slot_blocks, offer.slot_blocks),
                ),
                time.monotonic() + self._timeout,
            )
            try:
                self.load_peer(offer)
                first = self._told.get(offer.agent_name) != offer
                grants = self._take_grants(t)
                self.agent.send_notif(
                    offer.agent_name,
                    encode(
                        Stage(
                            t.xfer,
                            [int(b) for b in read.remote_block_ids],
                            self.slot_blocks,
                            self.offer if first else None,
                            grants,
                        )
                    ),
                )
                self._told[offer.agent_name] = offer
            except Exception as e:  # noqa: BLE001 - fails this request alone
                self.free_slots.extend(t.granted.values())
                self._finish(t, f"cannot reach producer staging agent: {e}")
                continue
            self._transfers[(offer.agent_name, t.xfer)] = t

    @property
    def producer_cap(self) -> int:
        """Most of our slots one producer's transfers may hold (granted and
        not yet written, or quarantined): all but one, so a producer that
        goes silent holding its slots never blocks reads from the others."""
        return max(1, self.slots - 1)

    def _held(self, producer: str) -> int:
        """Our slots ``producer`` holds: granted to its live transfers and not
        yet written, or quarantined after one of them failed."""
        # A failed transfer still scattering is in both maps: count it once.
        holders = {
            id(t): t
            for t in itertools.chain(
                self._transfers.values(), self._quarantined.values()
            )
            if t.producer == producer
        }
        return sum(len(t.granted) for t in holders.values())

    def _waiting(self) -> list[_Transfer]:
        """Live transfers with chunks still to grant, oldest first."""
        return [
            t
            for t in self._transfers.values()
            if t.error is None and t.next_grant < len(t.chunks)
        ]

    def _take_grants(self, t: _Transfer) -> list[int]:
        """Free slots for the first chunks of ``t``, in chunk order: at most
        its fair share of our slots while other transfers wait, and never
        more than its producer may hold."""
        share = max(1, self.slots // (len(self._waiting()) + 1))
        room = min(share, self.producer_cap - self._held(t.producer))
        slots: list[int] = []
        while self.free_slots and t.next_grant < len(t.chunks) and len(slots) < room:
            slot = self.free_slots.popleft()
            t.granted[t.next_grant] = slot
            t.next_grant += 1
            slots.append(slot)
        return slots

    def _grant_free_slots(self) -> None:
        """Give free slots to transfers that still have chunks to grant,
        oldest first, one slot each per round, none to a producer holding
        its cap."""
        while self.free_slots:
            held = {p: self._held(p) for p in {t.producer for t in self._waiting()}}
            waiting = [
                t for t in self._waiting() if held[t.producer] < self.producer_cap
            ]
            if not waiting:
                return
            for t in waiting:
                if not self.free_slots:
                    return
                if held[t.producer] >= self.producer_cap:
                    continue
                slot = self.free_slots.popleft()
                chunk = t.next_grant
                t.granted[chunk] = slot
                t.next_grant += 1
                held[t.producer] += 1
                self.send(t.producer, Grant(t.xfer, chunk, slot))

    def handle(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Written):
            self._on_written(peer, msg)
        elif isinstance(msg, Failed):
            key = (peer, msg.xfer)
            t = self._transfers.get(key)
            if t is not None:
                self._fail(t, msg.reason, tell_producer=False)
                # The producer writes nothing more for it: its slots are free.
                self._release_quarantine(t)
            elif key in self._quarantined:
                self._release_quarantine(self._quarantined.pop(key))
            else:
                self.reject(peer, f"Failed for {msg.xfer}, a transfer not running")
        else:
            self.reject(peer, f"{type(msg).__name__} is not a producer's message")

    def _on_written(self, peer: str, msg: Written) -> None:
        t = self._transfers.get((peer, msg.xfer))
        if t is None or t.error is not None:
            self.reject(peer, f"Written for {msg.xfer}, a transfer not running")
            return
        if msg.chunk in t.written:
            self.reject(peer, f"Written repeats chunk {msg.chunk} of {msg.xfer}")
            return
        slot = t.granted.get(msg.chunk)
        why = None
        if msg.chunk >= len(t.chunks):
            why = f"chunk {msg.chunk} of a {len(t.chunks)}-chunk transfer"
        elif slot is None or slot != msg.slot:
            why = f"chunk {msg.chunk} in slot {msg.slot}, which was not granted it"
        elif msg.num_blocks != len(t.chunks[msg.chunk]):
            why = (
                f"{msg.num_blocks} blocks for chunk {msg.chunk}, expected "
                f"{len(t.chunks[msg.chunk])}"
            )
        if why is not None:
            self.stats.rejected_messages += 1
            self._fail(t, f"producer wrote {why}")
            return
        assert slot is not None
        local_ids = [t.read.local_block_ids[i] for i in t.chunks[msg.chunk]]
        try:
            event = self.copy_async(self.buffer.scatter, local_ids, slot)
        except Exception as e:  # noqa: BLE001 - fails this request alone
            self._fail(t, f"scatter of chunk {msg.chunk} failed: {e}")
            return
        del t.granted[msg.chunk]
        t.written.add(msg.chunk)
        t.scattering += 1
        self._scatters.append((event, t, msg.chunk, slot))

    def _check_scatters(self) -> None:
        pending = []
        for event, t, chunk, slot in self._scatters:
            if not is_done(event):
                pending.append((event, t, chunk, slot))
                continue
            self.free_slots.append(slot)
            t.scattering -= 1
            t.arrived.add(chunk)
            n = len(t.chunks[chunk])
            self.stats.chunks += 1
            self.stats.blocks += n
            self.stats.bytes += self.buffer.geometry.chunk_bytes(n)
            if t.error is not None:
                self._fail(t, t.error)
            elif len(t.arrived) == len(t.chunks):
                self.stats.transfers += 1
                self._finish(t, None)
        self._scatters = pending

    def _expire(self) -> None:
        now = time.monotonic()
        for t in list(self._transfers.values()):
            if t.error is None and now > t.deadline:
                self._fail(
                    t,
                    f"no staged data from producer {t.producer} within "
                    f"{self._timeout:.0f} s ({len(t.arrived)}/{len(t.chunks)} "
                    "chunks)",
                )
        for key, t in list(self._quarantined.items()):
            if now > t.quarantine_until:  # a producer that never answered
                del self._quarantined[key]
                self._release_quarantine(t)

    def _fail(self, t: _Transfer, reason: str, tell_producer: bool = True) -> None:
        """Fail once no scatter of ours still reads its slots; its granted
        slots wait for the producer to say it writes no more."""
        if t.error is None:
            t.error = reason
            self.stats.failures += 1
            if tell_producer:
                self.send(t.producer, Cancel(t.xfer))
            if t.granted:
                t.quarantine_until = time.monotonic() + 2 * self._timeout
                self._quarantined[(t.producer, t.xfer)] = t
        if t.scattering == 0:
            self._finish(t, t.error)

    def _release_quarantine(self, t: _Transfer) -> None:
        self._quarantined.pop((t.producer, t.xfer), None)
        self.free_slots.extend(t.granted.values())
        t.granted.clear()

    def _finish(self, t: _Transfer, error: str | None) -> None:
        if t.finished:
            return
        t.finished = True
        self._transfers.pop((t.producer, t.xfer), None)
        self._results.put((t.read.req_id, error))
