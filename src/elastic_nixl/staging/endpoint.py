"""One side of the staged path: a NIXL agent, its registered slots, one thread.

:class:`StagingEndpoint` is the base of the producer's
:class:`~elastic_nixl.staging.server.StagingServer` and the consumer's
:class:`~elastic_nixl.staging.reader.StagedReader`. It owns a staging agent
(vLLM's agent stays with vLLM's threads), the bounce slots registered with
it, the CUDA stream that gathers and scatters, and the thread that drives the
agent: busy threads spin, idle ones poll notifications every millisecond.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from elastic_nixl.capabilities import KVMemoryError
from elastic_nixl.memory.cuda import describe_cuda_pointer
from elastic_nixl.staging.buffer import BlockRows, SlotGeometry, StagingBuffer
from elastic_nixl.staging.protocol import Message, StagingOffer, decode, encode

logger = logging.getLogger(__name__)

# Idle threads poll NIXL notifications this often; busy ones, and ones busy
# within the last _HOT_S (back-to-back requests), spin instead: at ~7 ms a
# GiB on H200, a millisecond of polling latency per request shows.
_IDLE_POLL_S = 0.001
_HOT_S = 0.05
DEFAULT_TIMEOUT_S = 60.0


@dataclass
class StagingStats:
    chunks: int = 0
    blocks: int = 0
    bytes: int = 0
    transfers: int = 0
    failures: int = 0
    # Messages dropped: undecodable, or matching no transfer, chunk or slot.
    rejected_messages: int = 0


class StagingEndpoint:
    """A staging agent, its registered slots and the thread that drives both.

    Subclasses implement :meth:`step` (one pass over notifications and
    in-flight work; True when busy) and call :meth:`start`.
    """

    def __init__(
        self,
        agent: Any,
        region_views: Sequence[torch.Tensor],
        slot_blocks: int,
        slots: int,
        mem_type: str,
        thread_name: str,
    ) -> None:
        self.agent = agent
        self.rows = BlockRows(region_views)
        self.num_regions = self.rows.num_regions
        self.block_len = self.rows.page
        self.device = self.rows.device
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self.mem_type = mem_type
        self.buffer = StagingBuffer(
            self.num_regions, self.block_len, slot_blocks, slots, self.device
        )
        if self.device.type == "cuda":
            _require_exportable(self.buffer.buffer)
        self._reg = agent.register_memory(
            agent.get_reg_descs(
                [(self.buffer.geometry.base, self.buffer.nbytes, self.device_id, "")],
                mem_type,
            )
        )
        self.offer = StagingOffer(
            agent_name=agent_name(agent),
            agent_metadata=agent.get_agent_metadata(),
            base=self.buffer.geometry.base,
            slots=slots,
            slot_blocks=slot_blocks,
            num_regions=self.num_regions,
            block_len=self.block_len,
            device_id=self.device_id,
            mem_type=mem_type,  # type: ignore[arg-type]
        )
        self.free_slots: deque[int] = deque(range(slots))
        self.stats = StagingStats()
        self._stream = (
            torch.cuda.Stream(device=self.device)
            if self.device.type == "cuda"
            else None
        )
        if self._stream is not None:
            width = self.rows.index_size(slot_blocks)
            self._pinned_ids = torch.empty(
                (slots, width), dtype=torch.long, pin_memory=True
            )
            self._device_ids = torch.empty(
                (slots, width), dtype=torch.long, device=self.device
            )
        self._stop = threading.Event()
        self._wake = threading.Event()  # new local work: skip the idle wait
        self._thread = threading.Thread(
            target=self._main, name=thread_name, daemon=True
        )
        self._loaded: dict[str, StagingOffer] = {}
        # peer -> (our chunk list, its chunk list, chunk sizes per slot)
        self._preps: dict[str, tuple[Any, Any, int]] = {}

    @property
    def slot_blocks(self) -> int:
        return self.buffer.geometry.slot_blocks

    @property
    def slots(self) -> int:
        return self.buffer.geometry.slots

    def write(
        self,
        slot: int,
        num_blocks: int,
        target: StagingOffer,
        target_slot: int,
        notif: bytes,
    ) -> Any:
        """Post a WRITE of our chunk in ``slot`` into ``target``'s slot; the
        handle to poll (the caller releases it). Descriptor lists of every
        chunk size were prepped when the peer was loaded: one
        ``make_prepped_xfer``, no list built per chunk."""
        local, remote, width = self._preps[target.agent_name]
        handle = self.agent.make_prepped_xfer(
            "WRITE",
            local,
            [SlotGeometry.chunk_index(slot, num_blocks, width)],
            remote,
            [SlotGeometry.chunk_index(target_slot, num_blocks, width)],
            notif,
        )
        try:
            if self.agent.transfer(handle) == "ERR":
                raise RuntimeError("NIXL transfer returned ERR")
        except BaseException:
            self.release(handle)
            raise
        return handle

    def load_peer(self, offer: StagingOffer) -> None:
        """Know a peer's agent and prep both sides' chunk descriptors, once
        per offer: a changed offer (a restarted or fixed peer) is loaded
        again, never used stale."""
        name = offer.agent_name
        if self._loaded.get(name) == offer:
            return
        old = self._preps.pop(name, None)
        if old is not None:
            self._release_dlist(old[0])
            self._release_dlist(old[1])
        if self._loaded.pop(name, None) is not None:
            # NIXL refuses new metadata under a name it knows (a peer that
            # restarted under the same name): forget the old agent first.
            self.agent.remove_remote_agent(name)
        self.agent.add_remote_agent(offer.agent_metadata)
        width = min(self.slot_blocks, offer.slot_blocks)
        local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            self.agent.get_xfer_descs(
                self.buffer.geometry.every_chunk(self.device_id, width), self.mem_type
            ),
        )
        remote = self.agent.prep_xfer_dlist(
            name,
            self.agent.get_xfer_descs(
                offer.geometry.every_chunk(offer.device_id, width), offer.mem_type
            ),
        )
        self._preps[name] = (local, remote, width)
        self._loaded[name] = offer

    def copy_async(
        self,
        fn: Callable[[BlockRows, torch.Tensor, int, int], None],
        block_ids: Sequence[int],
        slot: int,
    ) -> torch.cuda.Event | None:
        """Run a gather or scatter; on CUDA on our stream, with an event to poll.

        The index is computed on the host into the slot's own pinned buffer
        (free: the slot's previous use finished before the slot was), so the
        device runs one copy and one kernel, and the copy does not wait for
        the stream's earlier work as one from pageable memory would.
        """
        n = len(block_ids)
        index = self.rows.index(block_ids)
        if self._stream is None:
            fn(self.rows, torch.from_numpy(index), slot, n)
            return None
        host = self._pinned_ids[slot, : index.size]
        host.numpy()[:] = index
        with torch.cuda.stream(self._stream):
            idx = self._device_ids[slot, : index.size]
            idx.copy_(host, non_blocking=True)
            fn(self.rows, idx, slot, n)
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
        """One pass over notifications and in-flight work; True when busy."""
        raise NotImplementedError

    def handle(self, peer: str, msg: Message) -> None:
        """Act on one decoded message from ``peer``."""
        raise NotImplementedError

    def drain_notifications(self) -> None:
        """Decode and handle every new notification, each on its own: one bad
        message is dropped (and counted) without touching the rest."""
        for peer, msgs in self.agent.get_new_notifs().items():
            peer = peer.decode() if isinstance(peer, bytes) else str(peer)
            for raw in msgs:
                try:
                    msg = decode(raw, peer)
                except Exception as e:  # noqa: BLE001 - one message, not the batch
                    self.reject(peer, str(e))
                    continue
                try:
                    self.handle(peer, msg)
                except Exception:  # noqa: BLE001 - one message, not the thread
                    self.stats.rejected_messages += 1
                    logger.exception(
                        "%s: handling %r from %s failed", self._thread.name, msg, peer
                    )

    def reject(self, peer: str, why: str) -> None:
        """Drop a message that fits no schema or no state, saying why."""
        self.stats.rejected_messages += 1
        logger.warning(
            "%s: dropped a message from %s: %s", self._thread.name, peer, why
        )

    def _halt(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._stream is not None:
            self._stream.synchronize()

    def send(self, peer: str, msg: Message) -> None:
        """Notify ``peer``; a peer that is gone is logged, not raised."""
        try:
            self.agent.send_notif(peer, encode(msg))
        except Exception as e:  # noqa: BLE001 - a gone peer must not stop the thread
            logger.warning("staging: cannot notify %s: %s", peer, e)

    def close(self) -> None:
        """Stop the thread, release descriptor lists, deregister the slots."""
        self._halt()
        for local, remote, _ in self._preps.values():
            self._release_dlist(local)
            self._release_dlist(remote)
        self._preps.clear()
        try:
            self.agent.deregister_memory(self._reg)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.exception("staging: deregistration failed")

    def release(self, handle: Any) -> None:
        """Release a transfer handle; a failure is logged."""
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001
            logger.exception("staging: cannot release a transfer handle")

    def _release_dlist(self, prep: Any) -> None:
        try:
            self.agent.release_dlist_handle(prep)
        except Exception:  # noqa: BLE001 - best effort
            logger.exception("staging: cannot release a descriptor list")


def is_done(event: torch.cuda.Event | None) -> bool:
    """Whether a copy recorded as ``event`` finished (None: it ran inline)."""
    return event is None or bool(event.query())


def _require_exportable(buffer: torch.Tensor) -> None:
    """The bounce buffer is only useful if UCX can export it."""

    info = describe_cuda_pointer(buffer.data_ptr())
    if not info.legacy_ipc_capable:
        raise KVMemoryError(
            "ElasticNixlConnector: the staging buffer torch allocated at "
            f"0x{buffer.data_ptr():x} is not legacy-CUDA-IPC capable ({info.origin}); "
            "staging would not help. Unset expandable_segments in "
            "PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF."
        )


def agent_name(agent: Any) -> str:
    """A NIXL agent's name as ``str``."""
    name = getattr(agent, "name", None)
    if name is None:
        raise TypeError(f"NIXL agent {agent!r} has no name")
    return name.decode() if isinstance(name, bytes) else str(name)
