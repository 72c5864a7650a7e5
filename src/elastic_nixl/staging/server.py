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
from collections import OrderedDict, deque
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
    lease: Lease
    next_chunk: int = 0
    # slot -> chunk for the slots this job holds (gathering or announced).
    held: dict[int, int] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)


@dataclass
class _Slot:
    key: Key
    chunk: int
    announced: bool  # Ready sent: the consumer may read it, and ack it
    since: float


class StagingServer(StagingEndpoint):
    """Producer side: gathers requested blocks into slots for consumers.

    State is keyed by transfer ``(consumer agent, xfer)``, and each held slot
    remembers the chunk in it, so ``Done`` frees a slot only when it names
    the transfer, chunk and slot that are actually there.
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
        name: str = "elastic-nixl-staging-server",
    ) -> None:
        super().__init__(agent, region_views, slot_blocks, slots, mem_type, name)
        self._lease = lease
        self._timeout = slot_timeout_s
        self._jobs: dict[Key, _Job] = {}
        self._ended: OrderedDict[Key, None] = OrderedDict()
        self._order: deque[Key] = deque()
        self._slot_state: dict[int, _Slot] = {}
        self._gathering: list[tuple[torch.cuda.Event | None, int]] = []
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
            mem_type=mem_type,  # type: ignore[arg-type]
        )
        self.start()

    @property
    def active_transfers(self) -> int:
        """Transfers holding a lease now."""
        return len(self._jobs)

    def step(self) -> bool:
        self.drain_notifications()
        self._finish_gathers()
        self._dispatch()
        self._expire()
        return bool(self._gathering or self._order)

    def handle(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Stage):
            self._on_stage(peer, msg)
        elif isinstance(msg, Done):
            self._on_done(peer, msg)
        elif isinstance(msg, Cancel):
            job = self._jobs.get((peer, msg.xfer))
            if job is not None:
                self._end(job)
        else:
            self.reject(peer, f"{type(msg).__name__} is not a consumer's message")

    def _on_stage(self, peer: str, msg: Stage) -> None:
        if msg.reply_metadata is not None and peer not in self._known_peers:
            self.agent.add_remote_agent(msg.reply_metadata)
            self._known_peers.add(peer)
        if peer not in self._known_peers:
            self.reject(peer, f"Stage {msg.xfer} from an agent that sent no metadata")
            return
        key = (peer, msg.xfer)
        if key in self._jobs or key in self._ended:
            # A replay must not take a second lease on the same blocks.
            self.reject(peer, f"Stage {msg.xfer} repeats a transfer already staged")
            return
        try:
            lease = self._lease(msg.block_ids)
        except KVMemoryError as e:
            self.stats.failures += 1
            self._remember(key)
            self.send(peer, Failed(msg.xfer, f"producer cannot stage blocks: {e}"))
            return
        step = min(self.slot_blocks, msg.max_blocks)
        self._jobs[key] = _Job(key, chunk_ids(msg.block_ids, step), lease)
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
            job.held[slot] = chunk
            self._slot_state[slot] = _Slot(key, chunk, False, time.monotonic())
            event = self.copy_async(self.buffer.gather, job.chunks[chunk], slot)
            self._gathering.append((event, slot))
            if job.next_chunk < len(job.chunks):
                self._order.append(key)

    def _finish_gathers(self) -> None:
        pending = []
        for event, slot in self._gathering:
            if not is_done(event):
                pending.append((event, slot))
                continue
            state = self._slot_state[slot]
            job = self._jobs.get(state.key)
            if job is None:  # ended while we gathered: nobody will read it
                self._free(slot)
                continue
            n = len(job.chunks[state.chunk])
            state.announced = True
            state.since = time.monotonic()
            self.stats.chunks += 1
            self.stats.blocks += n
            self.stats.bytes += n * self.block_len * len(self.views)
            self.send(state.key[0], Ready(state.key[1], state.chunk, slot, n))
        self._gathering = pending

    def _on_done(self, peer: str, msg: Done) -> None:
        state = self._slot_state.get(msg.slot)
        key = (peer, msg.xfer)
        if (
            state is None
            or not state.announced
            or state.key != key
            or state.chunk != msg.chunk
        ):
            self.reject(
                peer,
                f"Done for chunk {msg.chunk} in slot {msg.slot} of {msg.xfer}, "
                "which that slot does not hold",
            )
            return
        job = self._jobs[key]
        self._free(msg.slot)
        del job.held[msg.slot]
        job.acked.add(msg.chunk)
        if len(job.acked) == len(job.chunks):
            self.stats.transfers += 1
            self._end(job)

    def _free(self, slot: int) -> None:
        del self._slot_state[slot]
        self.free_slots.append(slot)

    def _end(self, job: _Job) -> None:
        """Release the job's lease and the slots consumers may no longer read;
        slots still gathering are freed when their gather finishes."""
        del self._jobs[job.key]
        self._remember(job.key)
        for slot in list(job.held):
            if self._slot_state[slot].announced:
                self._free(slot)
        job.held.clear()
        job.lease.release()

    def _remember(self, key: Key) -> None:
        self._ended[key] = None
        while len(self._ended) > _RECENT:
            self._ended.popitem(last=False)

    def _expire(self) -> None:
        """A consumer that vanished mid-transfer must not keep slots forever."""
        now = time.monotonic()
        for slot, state in list(self._slot_state.items()):
            if not state.announced or now - state.since <= self._timeout:
                continue
            job = self._jobs.get(state.key)
            if job is None:
                continue
            logger.warning(
                "staging server: slot %d held by %s for over %.0f s; reclaimed",
                slot,
                state.key,
                self._timeout,
            )
            self.stats.failures += 1
            self.send(
                state.key[0],
                Failed(
                    state.key[1],
                    f"slot {slot} not acknowledged within "
                    f"{self._timeout:.0f} s; the producer reclaimed it",
                ),
            )
            self._end(job)

    def close(self) -> None:
        super().close()
        for job in list(self._jobs.values()):
            self._end(job)
