"""How a consumer gets to read an elastic producer's blocks, and when it may
say it has.

The layer of the worker between the handshake (``handshake.py``) and the full
worker (``worker.py``) that holds the consumer's two waits on a producer:

* **its registrations**: a request naming blocks this engine has not seen
  the producer register waits, on the refresher's thread, until a fetched
  payload covers them (:mod:`.refresh`); the engine thread then hands NIXL
  the new payload before it reads (:meth:`ReadingWorker._apply_fetched`);
* **its hold on the blocks**: heartbeats this engine sends are followed, and a
  read that completes after the producer's hold ended is failed, never
  reported with freed bytes (:mod:`.leases`, ``docs/leases.md``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.utils import EngineId
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import ReqMeta
from vllm.logger import init_logger

from elastic_nixl.connector.handshake import HandshakeWorker
from elastic_nixl.connector.leases import MAX_CLOCK_ERROR_S, ReadLeases
from elastic_nixl.connector.metadata import ElasticAgentMetadata
from elastic_nixl.connector.peers import PeerView
from elastic_nixl.connector.refresh import (
    COVER_GRACE_S,
    PeerRefresher,
    RefreshOutcome,
    RefreshWait,
)
from elastic_nixl.connector.stats import ElasticStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


logger = init_logger(__name__)


class ReadingWorker(HandshakeWorker):
    """vLLM's pull worker plus the consumer's waits on elastic producers."""

    def __init__(
        self, vllm_config: VllmConfig, engine_id: str, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self.elastic_stats = ElasticStats()
        # The producer epoch each request to receive names, requests already
        # refreshed for once, and payloads fetched for a refresh, waiting to
        # be applied on the engine thread.
        self._required_epochs: dict[str, int] = {}
        self._refreshed_for: set[str] = set()
        self._fetched_for_refresh: dict[EngineId, list[tuple[int, Any]]] = {}
        self._fetched_lock = threading.Lock()
        self._refresh_metas: dict[str, ReqMeta] = {}
        self._refresher: PeerRefresher[ElasticAgentMetadata] = PeerRefresher(
            self._fetch_peer, self.peers.ranks, self._on_refreshed
        )
        # The producers' holds on the blocks of requests to read.
        self._read_leases = ReadLeases()

    def _note_heartbeats(self, beating: list[tuple[EngineId, list[str]]]) -> None:
        """vLLM just sent heartbeats for these producers' request ids."""
        for eid, remote_ids in beating:
            clock = self._producer_clock(eid)
            if clock is not None:
                for remote_id in remote_ids:
                    self._read_leases.heartbeat(eid, remote_id, clock[0])

    def _producer_clock(self, engine_id: EngineId) -> tuple[float, float] | None:
        """``engine_id``'s clock now, and how far off that reading may be: the
        middle and half the width of the tightest bounds our side-channel
        round trips put on its offset (as vLLM's handshake estimates it)."""
        bounds = self.peers.clock(engine_id)
        if bounds is None:
            return None
        return time.perf_counter() + (bounds.lo + bounds.hi) / 2, bounds.width / 2

    def _read_was_late(self, req_id: str) -> str | None:
        """Why a completed read of ``req_id`` cannot be trusted, if it cannot:
        it completed after the producer's hold on the blocks ended."""
        tracked = self._read_leases.get(req_id)
        self._read_leases.forget(req_id)
        if tracked is None:
            return None  # vLLM's NixlConnector as producer: vLLM's semantics
        engine_id, lease = tracked
        clock = self._producer_clock(engine_id)
        if clock is None:
            return None
        now, error = clock
        if lease.held_at(now + min(error, MAX_CLOCK_ERROR_S)):
            return None
        return (
            f"the read completed {now - lease.expiry:+.1f} s from the end of engine "
            f"{engine_id}'s hold on the request's KV blocks (kv_lease_duration, "
            f"extended by {lease.heartbeats} heartbeat(s); clock offset known to "
            f"+-{error:.3f} s): the producer may have freed them, so the KV is not "
            "trusted. Raise kv_lease_duration in the producer's "
            "kv_connector_extra_config, or give the engines more CPU"
        )

    def _remote_blocks_unknown(
        self, view: PeerView, meta: ReqMeta, *, beyond_capacity_raises: bool = False
    ) -> bool:
        """Whether the request names remote blocks outside what we know the peer
        registered: our metadata may be stale, so refresh before refusing.
        Blocks beyond the peer's capacity can never be registered: with
        ``beyond_capacity_raises`` that ends a wait at once (ValueError)."""
        assert meta.remote is not None
        groups = self.dst_region_group_ids.get(meta.remote.engine_id) or [0]
        for i, g in enumerate(view.regions):
            gid = groups[i] if i < len(groups) else 0
            if gid >= len(meta.remote.block_ids):
                continue
            ids = np.asarray(meta.remote.block_ids[gid], dtype=np.int64)
            if not len(ids):
                continue
            if g.out_of_range(ids).any():
                if beyond_capacity_raises:
                    raise ValueError("blocks beyond the producer's capacity")
                return True  # beyond its capacity: the read will be refused
            if view.extents.uncovered(g.base + ids * g.block_stride, g.block_len).any():
                return True
        return False

    def _refresh_then_read(
        self, req_id: str, meta: ReqMeta, engine_id: EngineId
    ) -> None:
        """Wait, on the refresher's thread, until the producer's payload covers
        this read (:mod:`.refresh`), then queue the read; the engine thread
        applies what was fetched before it reads (:meth:`_apply_fetched`)."""

        def covers(fetched: list[tuple[int, ElasticAgentMetadata]]) -> bool:
            return not any(
                self._remote_blocks_unknown(PeerView.from_metadata(m, "", "", 0), meta)
                for _, m in fetched
            )

        needed = self._required_epochs.get(req_id, 0)

        def caught_up(fetched: list[tuple[int, ElasticAgentMetadata]]) -> bool:
            return all((m.elastic_epoch or 0) >= needed for _, m in fetched)

        self._refresh_metas[req_id] = meta
        self._refresher.wait_for(
            RefreshWait(
                req_id,
                engine_id,
                covers,
                deadline=time.monotonic() + self._handshake_deadline_s,
                caught_up=caught_up,
            )
        )

    def _on_refreshed(self, outcome: RefreshOutcome[ElasticAgentMetadata]) -> None:
        """The refresher's thread: keep what was fetched, queue the read."""
        meta = self._refresh_metas.pop(outcome.req_id, None)
        if meta is None:
            return
        if outcome.fetched is not None:
            with self._fetched_lock:
                self._fetched_for_refresh[outcome.engine_id] = outcome.fetched
        if outcome.attempts > 1:
            # A producer slow to answer or to publish: say what the wait saw.
            logger.info(
                "ElasticNixlConnector: request %s waited %.2f s for engine %s's "
                "registrations (%d fetches%s; before: %s)",
                outcome.req_id,
                outcome.waited_s,
                outcome.engine_id,
                outcome.attempts,
                ", covered" if outcome.covered else "",
                "; ".join(outcome.seen) or "-",
            )
        if not outcome.covered:
            why = outcome.error or "its payload still lacks them"
            self._log_failure(
                failure_type="elastic_refresh_failed",
                req_id=outcome.req_id,
                msg=(
                    f"engine {outcome.engine_id} did not advertise the request's "
                    f"blocks ({outcome.attempts} fetch(es); the wait is "
                    f"{COVER_GRACE_S:g} s once the producer is as new as the "
                    "request's epoch, at most kv_lease_duration = "
                    f"{self._handshake_deadline_s:g} s): {why}"
                ),
                meta=meta,
            )
        # Read either way: a read that still names unknown blocks is refused
        # in _read_blocks with a message naming them.
        self._ready_requests.put((outcome.req_id, meta))

    def _apply_fetched(self, engine_id: EngineId) -> None:
        with self._fetched_lock:
            fetched = self._fetched_for_refresh.pop(engine_id, None)
        if not fetched:
            return
        idle = not any(
            handles
            and (m := self._recving_metadata.get(r)) is not None
            and m.remote is not None
            and m.remote.engine_id == engine_id
            for r, handles in self._recving_transfers.items()
        )
        for rank, peer_meta in fetched:
            self._apply_peer(engine_id, rank, peer_meta, idle=idle)
            self.elastic_stats.refreshes += 1
