"""The consumer's side of the staged path: ask, READ whole slots, scatter.

See :mod:`elastic_nixl.staging.protocol` for the messages. A read is split
into chunks no larger than either side's slot; each ``Ready`` chunk is READ
from the producer's slot into one of ours (prepped descriptor lists: slots
never move), acknowledged with ``Done`` and scattered into the blocks.
Results are collected by the engine's thread with :meth:`StagedReader.poll_results`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import deque
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
    Done,
    Failed,
    Message,
    Ready,
    Stage,
    StagingOffer,
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
    ready: deque[tuple[int, int]] = field(default_factory=deque)  # (chunk, slot)
    announced: set[int] = field(default_factory=set)  # chunks a Ready named
    arrived: set[int] = field(default_factory=set)  # chunks scattered
    in_flight: int = 0  # READs and scatters touching our slots
    error: str | None = None
    finished: bool = False

    @property
    def producer(self) -> str:
        return self.read.offer.agent_name


_xfer_ids = itertools.count()


class StagedReader(StagingEndpoint):
    """Consumer side: asks producers to stage, READs slots, scatters them.

    A transfer succeeds only when each of its chunks, by index, was announced
    once, read and scattered; anything else a producer sends is dropped or
    fails that transfer alone.
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
        # Producer agent -> the offer we loaded it from: a changed offer (a
        # restarted or fixed producer) is loaded again, never used stale.
        self._loaded: dict[str, StagingOffer] = {}
        self._told: set[str] = set()
        self._reads: list[tuple[Any, _Transfer, int, int, int]] = []
        self._scatters: list[tuple[torch.cuda.Event | None, _Transfer, int, int]] = []
        self._my_metadata = agent.get_agent_metadata()
        # Whole-slot READs use descriptor lists prepped once (slots never
        # move): one make_prepped_xfer per chunk instead of building lists.
        self._local_prep = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            agent.get_xfer_descs(
                self.buffer.geometry.every_slot(self.device_id), mem_type
            ),
        )
        self._remote_prep: dict[str, Any] = {}
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
        if offer.num_regions != len(self.views) or offer.block_len != self.block_len:
            raise ValueError(
                f"request {read.req_id}: producer staging slots hold "
                f"{offer.num_regions} regions of {offer.block_len}-byte pages, "
                f"this engine has {len(self.views)} of {self.block_len}"
            )
        capacity = int(self.views[0].shape[0])
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
        self._post_reads()
        self._check_reads()
        self._check_scatters()
        self._expire()
        return bool(self._reads or self._scatters or self._transfers)

    def _load(self, offer: StagingOffer) -> None:
        """Know the producer's agent and prep its slot descriptors, once per
        offer."""
        name = offer.agent_name
        if self._loaded.get(name) == offer:
            return
        old = self._remote_prep.pop(name, None)
        if old is not None:
            self._release_dlist(old)
        self._loaded.pop(name, None)
        self._told.discard(name)
        self.agent.add_remote_agent(offer.agent_metadata)
        if offer.slot_blocks == self.slot_blocks:
            self._remote_prep[name] = self.agent.prep_xfer_dlist(
                name,
                self.agent.get_xfer_descs(
                    offer.geometry.every_slot(offer.device_id), offer.mem_type
                ),
            )
        self._loaded[name] = offer

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
                # Chunks are the smaller of the two sides' slots, the rule the
                # producer applies to Stage.max_blocks.
                chunk_ids(
                    range(len(read.local_block_ids)),
                    min(self.slot_blocks, offer.slot_blocks),
                ),
                time.monotonic() + self._timeout,
            )
            try:
                self._load(offer)
                first = offer.agent_name not in self._told
                self.agent.send_notif(
                    offer.agent_name,
                    encode(
                        Stage(
                            t.xfer,
                            [int(b) for b in read.remote_block_ids],
                            self.slot_blocks,
                            self._my_metadata if first else None,
                        )
                    ),
                )
                self._told.add(offer.agent_name)
            except Exception as e:  # noqa: BLE001 - fails this request alone
                self._finish(t, f"cannot reach producer staging agent: {e}")
                continue
            self._transfers[(offer.agent_name, t.xfer)] = t

    def handle(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Ready):
            self._on_ready(peer, msg)
        elif isinstance(msg, Failed):
            t = self._transfers.get((peer, msg.xfer))
            if t is None:
                self.reject(peer, f"Failed for {msg.xfer}, a transfer not running")
                return
            self._fail(t, msg.reason, tell_producer=False)
        else:
            self.reject(peer, f"{type(msg).__name__} is not a producer's message")

    def _on_ready(self, peer: str, msg: Ready) -> None:
        t = self._transfers.get((peer, msg.xfer))
        if t is None or t.error is not None:
            # Not ours, or given up (the producer was told with Cancel, which
            # frees every slot of the transfer).
            self.reject(peer, f"Ready for {msg.xfer}, a transfer not running")
            return
        if msg.chunk in t.announced:
            self.reject(peer, f"Ready repeats chunk {msg.chunk} of {msg.xfer}")
            return
        why = None
        if msg.chunk >= len(t.chunks):
            why = f"chunk {msg.chunk} of a {len(t.chunks)}-chunk transfer"
        elif msg.slot >= t.read.offer.slots:
            why = f"slot {msg.slot} of {t.read.offer.slots}"
        elif msg.num_blocks != len(t.chunks[msg.chunk]):
            why = (
                f"{msg.num_blocks} blocks for chunk {msg.chunk}, expected "
                f"{len(t.chunks[msg.chunk])}"
            )
        if why is not None:
            self.stats.rejected_messages += 1
            self._fail(t, f"producer announced {why}")
            return
        t.announced.add(msg.chunk)
        t.ready.append((msg.chunk, msg.slot))

    def _post_reads(self) -> None:
        for t in list(self._transfers.values()):
            while t.ready and self.free_slots and t.error is None:
                chunk, remote_slot = t.ready.popleft()
                n = len(t.chunks[chunk])
                local_slot = self.free_slots.popleft()
                offer = t.read.offer
                handle = None
                remote_prep = self._remote_prep.get(offer.agent_name)
                regions = len(self.views)
                try:
                    if remote_prep is not None and n == self.slot_blocks:
                        handle = self.agent.make_prepped_xfer(
                            "READ",
                            self._local_prep,
                            [local_slot * regions + r for r in range(regions)],
                            remote_prep,
                            [remote_slot * regions + r for r in range(regions)],
                        )
                    else:
                        handle = self.agent.initialize_xfer(
                            "READ",
                            self.agent.get_xfer_descs(
                                self.descriptors(local_slot, n), self.mem_type
                            ),
                            self.agent.get_xfer_descs(
                                offer.geometry.descriptors(
                                    remote_slot, n, offer.device_id
                                ),
                                offer.mem_type,
                            ),
                            offer.agent_name,
                        )
                    state = self.agent.transfer(handle)
                    if state == "ERR":
                        raise RuntimeError("NIXL transfer returned ERR")
                except Exception as e:  # noqa: BLE001 - fails this request alone
                    self.free_slots.append(local_slot)
                    if handle is not None:
                        self._release(handle)
                    self._fail(t, f"READ of producer slot {remote_slot} failed: {e}")
                    break
                t.in_flight += 1
                self._reads.append((handle, t, chunk, local_slot, remote_slot))

    def _check_reads(self) -> None:
        pending = []
        for item in self._reads:
            handle, t, chunk, local_slot, remote_slot = item
            try:
                state = self.agent.check_xfer_state(handle)
            except Exception as e:  # noqa: BLE001
                state = f"ERR ({e})"
            if state == "PROC":
                pending.append(item)
                continue
            self._release(handle)
            # The producer may refill its slot now. Sent on its own, not riding
            # on the READ; that change together with pinned index copies took
            # 1 GiB from 64 to 99 GB/s on H200 (docs/gpu.md).
            self.send(t.producer, Done(t.xfer, chunk, remote_slot))
            t.in_flight -= 1
            if state != "DONE" or t.error is not None:
                self.free_slots.append(local_slot)
                self._fail(t, t.error or f"READ of chunk {chunk} ended in {state}")
                continue
            local_ids = [t.read.local_block_ids[i] for i in t.chunks[chunk]]
            try:
                event = self.copy_async(self.buffer.scatter, local_ids, local_slot)
            except Exception as e:  # noqa: BLE001 - fails this request alone
                self.free_slots.append(local_slot)
                self._fail(t, f"scatter of chunk {chunk} failed: {e}")
                continue
            t.in_flight += 1
            self._scatters.append((event, t, chunk, local_slot))
        self._reads = pending

    def _check_scatters(self) -> None:
        pending = []
        for event, t, chunk, local_slot in self._scatters:
            if not is_done(event):
                pending.append((event, t, chunk, local_slot))
                continue
            self.free_slots.append(local_slot)
            t.in_flight -= 1
            t.arrived.add(chunk)
            n = len(t.chunks[chunk])
            self.stats.chunks += 1
            self.stats.blocks += n
            self.stats.bytes += n * self.block_len * len(self.views)
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

    def _fail(self, t: _Transfer, reason: str, tell_producer: bool = True) -> None:
        """Fail once no READ or scatter of ours still touches its slots."""
        if t.error is None:
            t.error = reason
            self.stats.failures += 1
            if tell_producer:
                # Cancel frees every slot the producer holds for the transfer.
                self.send(t.producer, Cancel(t.xfer))
            t.ready.clear()
        if t.in_flight == 0:
            self._finish(t, t.error)

    def _finish(self, t: _Transfer, error: str | None) -> None:
        if t.finished:
            return
        t.finished = True
        self._transfers.pop((t.producer, t.xfer), None)
        self._results.put((t.read.req_id, error))

    def close(self) -> None:
        self._halt()
        for prep in [self._local_prep, *self._remote_prep.values()]:
            self._release_dlist(prep)
        self._remote_prep.clear()
        super().close()

    def _release_dlist(self, prep: Any) -> None:
        try:
            self.agent.release_dlist_handle(prep)
        except Exception:  # noqa: BLE001 - best effort
            logger.exception("staged reader: cannot release a descriptor list")

    def _release(self, handle: Any) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001
            logger.exception("staged reader: cannot release a transfer handle")
