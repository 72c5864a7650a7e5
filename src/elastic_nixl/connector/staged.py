"""Staged reads: KV blocks moved through exportable bounce slots.

VMM memory cannot be exported to UCX's ``cuda_ipc`` lane, so a peer reading
it directly gets TCP emulation (~0.4 GB/s on H200, ``docs/gpu.md``). On the
staged path the producer gathers the blocks a consumer asks for into a slot
of a registered, exportable buffer; the consumer READs the whole slot into a
slot of its own (one descriptor per region) and scatters it into its blocks.
Slots are bounded and reused, and chunks are pipelined over them.

Each side drives a NIXL agent of its own from one thread (``StagingServer``
on the producer, ``StagedReader`` on the consumer); vLLM's agent stays with
vLLM's threads. Control messages are NIXL notifications between the two
staging agents, so no port beyond NIXL's is needed:

====================  =========================================================
consumer -> producer  ``Stage(xfer, block_ids, max_blocks, reply_metadata)``
producer -> consumer  ``Ready(xfer, chunk, slot, num_blocks)`` per chunk, as
                      slots free up; or ``Failed(xfer, reason)``
consumer READ         remote slot -> local slot; once it completes,
consumer -> producer  ``Done(xfer, slot)``: the producer reuses the slot
consumer -> producer  ``Cancel(xfer)`` when it gives up on a transfer
====================  =========================================================

The producer leases the blocks of a transfer for its whole life, so they
stay mapped while they are gathered, and refuses blocks that are not mapped
before touching them (a gather from unmapped VMM memory would fault the GPU).

Nothing here imports vLLM: the same classes run in the connector and in the
GPU benchmark.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from elastic_nixl.capabilities import KVMemoryError, Lease
from elastic_nixl.staging import SlotGeometry, StagingBuffer, chunk_ids

logger = logging.getLogger(__name__)

# Idle threads poll NIXL notifications this often; busy ones, and ones busy
# within the last _HOT_S (back-to-back requests), spin instead: at ~7 ms a
# GiB on H200, a millisecond of polling latency per request shows.
_IDLE_POLL_S = 0.001
_HOT_S = 0.05
_DEFAULT_TIMEOUT_S = 60.0


class StagingOffer(msgspec.Struct, frozen=True):
    """What a producer advertises in its handshake: where its slots are."""

    agent_name: str
    agent_metadata: bytes
    base: int
    slots: int
    slot_blocks: int
    num_regions: int
    block_len: int
    device_id: int
    mem_type: str

    @property
    def geometry(self) -> SlotGeometry:
        return SlotGeometry(
            self.base, self.num_regions, self.slot_blocks, self.block_len, self.slots
        )


# ----------------------------------------------------------------------------
# Wire messages (NIXL notifications between staging agents)
# ----------------------------------------------------------------------------


class Stage(msgspec.Struct, tag="stage", frozen=True):
    xfer: str
    block_ids: list[int]
    # Largest chunk the consumer's own slots hold.
    max_blocks: int
    # The consumer's staging agent metadata, on its first message to a
    # producer agent, so the producer can answer.
    reply_metadata: bytes | None = None


class Ready(msgspec.Struct, tag="ready", frozen=True):
    xfer: str
    chunk: int
    slot: int
    num_blocks: int


class Failed(msgspec.Struct, tag="failed", frozen=True):
    xfer: str
    reason: str


class Done(msgspec.Struct, tag="done", frozen=True):
    xfer: str
    slot: int


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    xfer: str


Message = Stage | Ready | Failed | Done | Cancel
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(raw: bytes) -> Message | None:
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# ----------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------


@dataclass
class StagingStats:
    chunks: int = 0
    blocks: int = 0
    bytes: int = 0
    transfers: int = 0
    failures: int = 0


class _Side:
    """A staging agent, its registered slots and the thread that drives both."""

    def __init__(
        self,
        agent: Any,
        region_views: Sequence[torch.Tensor],
        slot_blocks: int,
        slots: int,
        mem_type: str,
        thread_name: str,
    ) -> None:
        lens = {int(v.shape[1]) for v in region_views}
        if len(lens) != 1:
            raise NotImplementedError(
                "staged transfers need one page size across KV regions; got "
                f"{sorted(lens)} bytes"
            )
        self.agent = agent
        self.views = [_bytes(v) for v in region_views]
        # Regions evenly spaced in one allocation (our allocator's layer-outer
        # layouts): one gather/scatter kernel for all of them, not one each.
        self.stacked = _stack(self.views)
        self.block_len = lens.pop()
        self.device = self.views[0].device
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self.mem_type = mem_type
        self.buffer = StagingBuffer(
            len(self.views), self.block_len, slot_blocks, slots, self.device
        )
        if self.device.type == "cuda":
            _require_exportable(self.buffer.buffer)
        self._reg = agent.register_memory(
            agent.get_reg_descs(
                [(self.buffer.geometry.base, self.buffer.nbytes, self.device_id, "")],
                mem_type,
            )
        )
        self.free_slots: deque[int] = deque(range(slots))
        self.stats = StagingStats()
        self._stream = (
            torch.cuda.Stream(device=self.device)
            if self.device.type == "cuda"
            else None
        )
        if self._stream is not None:
            self._pinned_ids = torch.empty(
                (slots, slot_blocks), dtype=torch.long, pin_memory=True
            )
            self._device_ids = torch.empty(
                (slots, slot_blocks), dtype=torch.long, device=self.device
            )
        self._stop = threading.Event()
        self._wake = threading.Event()  # new local work: skip the idle wait
        self._thread = threading.Thread(
            target=self._main, name=thread_name, daemon=True
        )

    @property
    def slot_blocks(self) -> int:
        return self.buffer.geometry.slot_blocks

    @property
    def slots(self) -> int:
        return self.buffer.geometry.slots

    def descriptors(self, slot: int, num_blocks: int) -> np.ndarray:
        return self.buffer.geometry.descriptors(slot, num_blocks, self.device_id)

    def copy_async(
        self,
        fn: Callable[[Sequence[torch.Tensor] | torch.Tensor, torch.Tensor, int], None],
        block_ids: Sequence[int],
        slot: int,
    ) -> torch.cuda.Event | None:
        """Run a gather or scatter; on CUDA on our stream, with an event to poll."""
        blocks = self.views if self.stacked is None else self.stacked
        if self._stream is None:
            fn(blocks, torch.as_tensor(list(block_ids), dtype=torch.long), slot)
            return None
        # A copy from pageable memory would wait for the stream's earlier
        # copies; the slot's own pinned index buffer is free (its previous
        # use finished before the slot was), so this one does not.
        n = len(block_ids)
        host = self._pinned_ids[slot, :n]
        host.numpy()[:] = block_ids
        with torch.cuda.stream(self._stream):
            idx = self._device_ids[slot, :n]
            idx.copy_(host, non_blocking=True)
            fn(blocks, idx, slot)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        last_busy = 0.0
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # noqa: BLE001 - the thread must outlive one bad step
                logger.exception("%s: staging step failed", self._thread.name)
                busy = False
            now = time.monotonic()
            if busy:
                last_busy = now
            if now - last_busy < _HOT_S:
                time.sleep(0)
            else:
                self._wake.wait(_IDLE_POLL_S)
                self._wake.clear()

    def step(self) -> bool:
        raise NotImplementedError

    def _halt(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._stream is not None:
            self._stream.synchronize()

    def send(self, peer: str, msg: Message) -> None:
        try:
            self.agent.send_notif(peer, encode(msg))
        except Exception as e:  # noqa: BLE001 - a gone peer must not stop the thread
            logger.warning("staging: cannot notify %s: %s", peer, e)

    def close(self) -> None:
        self._halt()
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.exception("staging: deregistration failed")


def _stack(views: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``[regions, num_blocks, page]`` over the same memory, if the regions are
    equally shaped and evenly spaced in one storage; else None."""
    first = views[0]
    storage = first.untyped_storage()
    step = views[1].data_ptr() - first.data_ptr() if len(views) > 1 else 0
    if len(views) > 1 and step <= 0:
        return None
    for i, v in enumerate(views):
        if (
            v.data_ptr() != first.data_ptr() + i * step
            or v.shape != first.shape
            or v.stride() != first.stride()
            or v.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(
        storage,
        first.data_ptr() - storage.data_ptr(),
        (len(views), *first.shape),
        (step, *first.stride()),
    )


def _done(event: torch.cuda.Event | None) -> bool:
    return event is None or bool(event.query())


def _bytes(view: torch.Tensor) -> torch.Tensor:
    if view.ndim != 2:
        raise ValueError(
            f"region view must be [num_blocks, page], got {tuple(view.shape)}"
        )
    return view if view.dtype == torch.uint8 else view.view(torch.uint8)


def _require_exportable(buffer: torch.Tensor) -> None:
    """The bounce buffer is only useful if UCX can export it."""
    from elastic_nixl.cuda_discovery import describe_cuda_pointer

    info = describe_cuda_pointer(buffer.data_ptr())
    if not info.legacy_ipc_capable:
        raise KVMemoryError(
            "ElasticNixlConnector: the staging buffer torch allocated at "
            f"0x{buffer.data_ptr():x} is not legacy-CUDA-IPC capable ({info.origin}); "
            "staging would not help. Unset expandable_segments in "
            "PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF."
        )


# ----------------------------------------------------------------------------
# Producer
# ----------------------------------------------------------------------------

LeaseFn = Callable[[Sequence[int]], Lease]


@dataclass
class _Job:
    peer: str
    xfer: str
    chunks: list[list[int]]
    lease: Lease
    next_chunk: int = 0
    outstanding: set[int] = field(default_factory=set)


class StagingServer(_Side):
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
        slot_timeout_s: float = _DEFAULT_TIMEOUT_S,
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
            agent_name=_name(agent),
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
            if not _done(event):
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


# ----------------------------------------------------------------------------
# Consumer
# ----------------------------------------------------------------------------


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
    chunks: list[list[int]]
    deadline: float
    ready: deque[tuple[int, int, int]] = field(default_factory=deque)
    done_chunks: int = 0
    in_flight: int = 0
    error: str | None = None
    finished: bool = False


_xfer_ids = itertools.count()


class StagedReader(_Side):
    """Consumer side: asks producers to stage, READs slots, scatters them."""

    def __init__(
        self,
        agent: Any,
        region_views: Sequence[torch.Tensor],
        slot_blocks: int,
        slots: int,
        mem_type: str,
        *,
        timeout_s: float = _DEFAULT_TIMEOUT_S,
        name: str = "elastic-nixl-staged-reader",
    ) -> None:
        super().__init__(agent, region_views, slot_blocks, slots, mem_type, name)
        self._timeout = timeout_s
        self._inbox: queue.Queue[StagedRead] = queue.Queue()
        self._results: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        self._known: set[str] = set()
        self._told: set[str] = set()
        self._reads: list[tuple[Any, _Transfer, int, int, int]] = []
        self._scatters: list[tuple[torch.cuda.Event | None, _Transfer, int]] = []
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
        if len(read.remote_block_ids) != len(read.local_block_ids):
            raise ValueError(
                f"request {read.req_id}: {len(read.remote_block_ids)} remote blocks "
                f"for {len(read.local_block_ids)} local blocks"
            )
        offer = read.offer
        if offer.num_regions != len(self.views) or offer.block_len != self.block_len:
            raise ValueError(
                f"request {read.req_id}: producer staging slots hold "
                f"{offer.num_regions} regions of {offer.block_len}-byte pages, "
                f"this engine has {len(self.views)} of {self.block_len}"
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

    # -- the reader thread ----------------------------------------------------

    def step(self) -> bool:
        self._start_new()
        for peer, msgs in self.agent.get_new_notifs().items():
            peer = peer.decode() if isinstance(peer, bytes) else str(peer)
            for raw in msgs:
                self._handle(peer, decode(raw))
        self._post_reads()
        self._check_reads()
        self._check_scatters()
        self._expire()
        return bool(self._reads or self._scatters or self._transfers)

    def _start_new(self) -> None:
        while True:
            try:
                read = self._inbox.get_nowait()
            except queue.Empty:
                return
            offer = read.offer
            xfer = f"{read.req_id}#{next(_xfer_ids)}"
            t = _Transfer(
                read,
                xfer,
                # Chunks are the smaller of the two sides' slots, the rule the
                # producer applies to Stage.max_blocks.
                chunk_ids(
                    range(len(read.local_block_ids)),
                    min(self.slot_blocks, offer.slot_blocks),
                ),
                time.monotonic() + self._timeout,
            )
            try:
                if offer.agent_name not in self._known:
                    self.agent.add_remote_agent(offer.agent_metadata)
                    self._known.add(offer.agent_name)
                    if offer.slot_blocks == self.slot_blocks:
                        self._remote_prep[offer.agent_name] = (
                            self.agent.prep_xfer_dlist(
                                offer.agent_name,
                                self.agent.get_xfer_descs(
                                    offer.geometry.every_slot(offer.device_id),
                                    offer.mem_type,
                                ),
                            )
                        )
                first = offer.agent_name not in self._told
                self.agent.send_notif(
                    offer.agent_name,
                    encode(
                        Stage(
                            xfer,
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
            self._transfers[(offer.agent_name, xfer)] = t

    def _handle(self, peer: str, msg: Message | None) -> None:
        if isinstance(msg, Ready):
            t = self._transfers.get((peer, msg.xfer))
            if t is None:
                # Cancelled meanwhile: hand the slot straight back.
                self.send(peer, Done(msg.xfer, msg.slot))
                return
            expected = len(t.chunks[msg.chunk]) if msg.chunk < len(t.chunks) else -1
            if msg.num_blocks != expected:
                self._fail(
                    t,
                    f"producer staged {msg.num_blocks} blocks for chunk "
                    f"{msg.chunk}, expected {expected}",
                )
                self.send(peer, Done(msg.xfer, msg.slot))
                return
            t.ready.append((msg.chunk, msg.slot, msg.num_blocks))
        elif isinstance(msg, Failed):
            t = self._transfers.get((peer, msg.xfer))
            if t is not None:
                self._fail(t, msg.reason, tell_producer=False)
        else:
            logger.warning("staged reader: unexpected message from %s: %r", peer, msg)

    def _post_reads(self) -> None:
        for t in list(self._transfers.values()):
            while t.ready and self.free_slots and t.error is None:
                chunk, remote_slot, n = t.ready.popleft()
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
                    self.send(offer.agent_name, Done(t.xfer, remote_slot))
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
            self.send(t.read.offer.agent_name, Done(t.xfer, remote_slot))
            t.in_flight -= 1
            if state != "DONE" or t.error is not None:
                self.free_slots.append(local_slot)
                self._fail(t, f"READ of chunk {chunk} ended in {state}")
                continue
            local_ids = [t.read.local_block_ids[i] for i in t.chunks[chunk]]
            event = self.copy_async(self.buffer.scatter, local_ids, local_slot)
            t.in_flight += 1
            self._scatters.append((event, t, local_slot))
            self.stats.chunks += 1
            self.stats.blocks += len(local_ids)
            self.stats.bytes += len(local_ids) * self.block_len * len(self.views)
        self._reads = pending

    def _check_scatters(self) -> None:
        pending = []
        for event, t, local_slot in self._scatters:
            if not _done(event):
                pending.append((event, t, local_slot))
                continue
            self.free_slots.append(local_slot)
            t.in_flight -= 1
            t.done_chunks += 1
            if t.done_chunks == len(t.chunks) and t.error is None:
                self.stats.transfers += 1
                self._finish(t, None)
            elif t.error is not None:
                self._fail(t, t.error)
        self._scatters = pending

    def _expire(self) -> None:
        now = time.monotonic()
        for t in list(self._transfers.values()):
            if t.error is None and now > t.deadline:
                self._fail(
                    t,
                    f"no staged data from producer {t.read.offer.agent_name} within "
                    f"{self._timeout:.0f} s ({t.done_chunks}/{len(t.chunks)} chunks)",
                )

    def _fail(self, t: _Transfer, reason: str, tell_producer: bool = True) -> None:
        """Fail once no READ or scatter of ours still touches its slots."""
        if t.error is None:
            t.error = reason
            self.stats.failures += 1
            if tell_producer:
                self.send(t.read.offer.agent_name, Cancel(t.xfer))
            for _, remote_slot, _ in t.ready:
                self.send(t.read.offer.agent_name, Done(t.xfer, remote_slot))
            t.ready.clear()
        if t.in_flight == 0:
            self._finish(t, t.error)

    def _finish(self, t: _Transfer, error: str | None) -> None:
        if t.finished:
            return
        t.finished = True
        self._transfers.pop((t.read.offer.agent_name, t.xfer), None)
        self._results.put((t.read.req_id, error))

    def close(self) -> None:
        self._halt()
        for prep in [self._local_prep, *self._remote_prep.values()]:
            try:
                self.agent.release_dlist_handle(prep)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                logger.exception("staged reader: cannot release a descriptor list")
        self._remote_prep.clear()
        super().close()

    def _release(self, handle: Any) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001
            logger.exception("staged reader: cannot release a transfer handle")


def _name(agent: Any) -> str:
    name = getattr(agent, "name", None)
    if name is None:
        raise TypeError(f"NIXL agent {agent!r} has no name")
    return name.decode() if isinstance(name, bytes) else str(name)


__all__ = [
    "Message",
    "StagedRead",
    "StagedReader",
    "StagingOffer",
    "StagingServer",
    "StagingStats",
]
