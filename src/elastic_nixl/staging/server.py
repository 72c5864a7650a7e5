"""The producer's side of the staged path: gather requested blocks into slots.

See :mod:`elastic_nixl.staging.protocol` for the messages. A ``Stage`` leases
the blocks for the whole transfer (so they stay mapped while gathered) and is
refused, before any GPU access, when a block is not mapped; chunks are then
gathered into free slots, jobs taking turns, and announced with ``Ready``.
A slot comes back with ``Done``, or by timeout from a consumer that vanished.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic_nixl.capabilities import KVMemoryError, Lease
from elastic_nixl.staging.buffer import chunk_ids
from elastic_nixl.staging.endpoint import (
    DEFAULT_TIMEOUT_S,
    StagingEndpoint,
    agent_name,
    is_done,
)
from elastic_nixl.staging.protocol import (
    Cancel,
    Done,
    Failed,
    Message,
    Ready,
    Stage,
    StagingOffer,
    decode,
)

logger = logging.getLogger(__name__)

LeaseFn = Callable[[Sequence[int]], Lease]


@dataclass
class _Job:
    peer: str
    xfer: str
    chunks: list[list[int]]
    lease: Lease
    next_chunk: int = 0
    outstanding: set[int] = field(default_factory=set)


class StagingServer(StagingEndpoint):
    """Producer side: gathers requested blocks into slots for consumers."""

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
        name: str = "elastic-nixl-staging-server",
    ) -> None:
        super().__init__(agent, region_views, slot_blocks, slots, mem_type, name)
        self._lease = lease
        self._timeout = slot_timeout_s
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._order: deque[tuple[str, str]] = deque()
        self._gathering: list[tuple[torch.cuda.Event | None, _Job, int, int, int]] = []
        self._slot_owner: dict[int, tuple[tuple[str, str], float]] = {}
        self._known_peers: set[str] = set()
        self.offer = StagingOffer(
            agent_name=agent_name(agent),
            agent_metadata=agent.get_agent_metadata(),
            base=self.buffer.geometry.base,
            slots=slots,
            slot_blocks=slot_blocks,
            num_regions=len(self.views),
            block_len=self.block_len,
            device_id=self.device_id,
            mem_type=mem_type,
        )
        self.start()

    def step(self) -> bool:
        for peer, msgs in self.agent.get_new_notifs().items():
            peer = peer.decode() if isinstance(peer, bytes) else str(peer)
            for raw in msgs:
                self._handle(peer, decode(raw))
        self._finish_gathers()
        self._dispatch()
        self._expire()
        return bool(self._gathering or self._order)

    def _handle(self, peer: str, msg: Message | None) -> None:
        if isinstance(msg, Stage):
            self._on_stage(peer, msg)
        elif isinstance(msg, Done):
            self._release_slot(msg.slot, (peer, msg.xfer))
        elif isinstance(msg, Cancel):
            job = self._jobs.get((peer, msg.xfer))
            if job is not None:
                for slot in list(job.outstanding):
                    self._release_slot(slot, (peer, msg.xfer))
                self._end(job)
        else:
            logger.warning("staging server: unexpected message from %s: %r", peer, msg)

    def _on_stage(self, peer: str, msg: Stage) -> None:
        if msg.reply_metadata is not None and peer not in self._known_peers:
            self.agent.add_remote_agent(msg.reply_metadata)
            self._known_peers.add(peer)
        if peer not in self._known_peers:
            logger.error(
                "staging server: Stage %s from unknown agent %s without metadata",
                msg.xfer,
                peer,
            )
            return
        key = (peer, msg.xfer)
        try:
            if not msg.block_ids or msg.max_blocks <= 0:
                raise KVMemoryError("empty staging request")
            lease = self._lease(msg.block_ids)
        except KVMemoryError as e:
            self.stats.failures += 1
            self.send(peer, Failed(msg.xfer, f"producer cannot stage blocks: {e}"))
            return
        step = min(self.slot_blocks, msg.max_blocks)
        self._jobs[key] = _Job(peer, msg.xfer, chunk_ids(msg.block_ids, step), lease)
        self._order.append(key)

    def _dispatch(self) -> None:
        """Gather the next chunks into free slots, jobs taking turns."""
        while self.free_slots and self._order:
            key = self._order.popleft()
            job = self._jobs.get(key)
            if job is None or job.next_chunk >= len(job.chunks):
                continue
            slot = self.free_slots.popleft()
            chunk = job.next_chunk
            job.next_chunk += 1
            job.outstanding.add(slot)
            self._slot_owner[slot] = (key, time.monotonic())
            ids = job.chunks[chunk]
            event = self.copy_async(self.buffer.gather, ids, slot)
            self._gathering.append((event, job, chunk, slot, len(ids)))
            if job.next_chunk < len(job.chunks):
                self._order.append(key)

    def _finish_gathers(self) -> None:
        pending = []
        for item in self._gathering:
            event, job, chunk, slot, n = item
            if not is_done(event):
                pending.append(item)
                continue
            self.stats.chunks += 1
            self.stats.blocks += n
            self.stats.bytes += n * self.block_len * len(self.views)
            self.send(job.peer, Ready(job.xfer, chunk, slot, n))
        self._gathering = pending

    def _release_slot(self, slot: int, key: tuple[str, str]) -> None:
        owner = self._slot_owner.get(slot)
        if owner is None or owner[0] != key:
            logger.warning(
                "staging server: %s released slot %d it does not hold", key, slot
            )
            return
        del self._slot_owner[slot]
        self.free_slots.append(slot)
        job = self._jobs.get(key)
        if job is None:
            return
        job.outstanding.discard(slot)
        if job.next_chunk >= len(job.chunks) and not job.outstanding:
            self.stats.transfers += 1
            self._end(job)

    def _end(self, job: _Job) -> None:
        self._jobs.pop((job.peer, job.xfer), None)
        job.lease.release()

    def _expire(self) -> None:
        """A consumer that vanished mid-transfer must not keep slots forever."""
        now = time.monotonic()
        gathering = {slot for _, _, _, slot, _ in self._gathering}
        for slot, (key, since) in list(self._slot_owner.items()):
            if now - since > self._timeout and slot not in gathering:
                logger.warning(
                    "staging server: slot %d held by %s for over %.0f s; reclaimed",
                    slot,
                    key,
                    self._timeout,
                )
                job = self._jobs.get(key)
                self._release_slot(slot, key)
                if job is not None and key in self._jobs:
                    for other in list(job.outstanding):
                        self._release_slot(other, key)
                    self._end(job)

    def close(self) -> None:
        super().close()
        for job in list(self._jobs.values()):
            self._end(job)
