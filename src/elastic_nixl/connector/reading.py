"""How a consumer gets to read an elastic producer's blocks, and when it may
say it has.

The layer of the worker between the handshake (``handshake.py``) and the full
worker (``worker.py``) that holds the consumer's two waits on a producer:

* **its registrations**: a request naming blocks this engine has not seen
  the producer register waits, on the refresher's thread, until a fetched
  payload covers them (:mod:`.refresh`); the engine thread then hands NIXL
  the new payload before it reads (:meth:`ReadingWorker._apply_fetched`);
* **its hold on the blocks**: heartbeats this engine sends are followed; a
  read the lease cannot vouch for waits, on a second refresher thread, for
  the producer's own answer (:class:`~.leases.LeaseVerdicts`, asked on its
  side channel) and fails if the hold ended first: freed bytes are never
  reported (:mod:`.leases`, ``docs/leases.md``).

The producer's half of the same rule is here too: which requests it released
after their reads' notifications, and which when their hold ended.
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
from elastic_nixl.connector.side_channel import fetch_lease_verdicts
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
        # The producers' holds on the blocks of requests to read; reads the
        # hold cannot vouch for, asking the producer (our request id ->
        # producer, its request id), and the answers (None: read in time).
        self._read_leases = ReadLeases()
        self._verdict_lock = threading.Lock()
        self._verdicts_asked: dict[str, tuple[EngineId, str]] = {}
        self._verdicts_in: dict[str, str | None] = {}
        self._verdict_waiter: PeerRefresher[dict[str, bool]] = PeerRefresher(
            self._fetch_verdicts,
            self.peers.ranks,
            self._on_verdicts,
            name="elastic_nixl_lease_verdicts",
        )
        # Producer: requests released since the last step, read in time or not.
        self._released: dict[str, bool] = {}

    # ------------------------------------------------------------------
    # The producer's answer: was each released request read while held?
    # ------------------------------------------------------------------

    def _get_new_notifs(self) -> set[str]:
        """vLLM's: requests every reader has notified (before any lease of
        this step is reaped, so these were read while held)."""
        notified = super()._get_new_notifs()
        self._released.update(dict.fromkeys(notified, True))
        return notified

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        """vLLM's: release requests whose hold ended before every reader
        notified; any read of them may have found freed bytes."""
        before = set(done_sending)
        super()._reap_expired_send_leases(done_sending)
        self._released.update(dict.fromkeys(done_sending - before, False))

    def _take_lease_verdicts(self) -> dict[str, bool]:
        """The requests released since the last call (for the scheduler)."""
        released, self._released = self._released, {}
        return released

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

    def _vouch_for_reads(
        self, done: set[str], holding: dict[str, list[int]]
    ) -> dict[str, str]:
        """Of the reads vLLM found complete (``done``), the ones not to trust,
        and why: removed from ``done``. A read the lease cannot vouch for
        stays in vLLM's ``holding`` table, out of ``done``, until its
        producer answers (``_verdict_waiter``); then it is done, or failed."""
        with self._verdict_lock:
            answered = {
                r: self._verdicts_in.pop(r) for r in done & self._verdicts_in.keys()
            }
            waiting = done & self._verdicts_asked.keys()
        untrusted: dict[str, str] = {}
        for req_id in list(done):
            if req_id in waiting:
                done.discard(req_id)
                holding[req_id] = []  # vLLM looks again next step
                continue
            if req_id in answered:
                why = answered[req_id]
            else:
                why = self._read_was_late(req_id)
                with self._verdict_lock:
                    asked = (
                        req_id in self._verdicts_asked or req_id in self._verdicts_in
                    )
                if asked:  # the lease could not tell: the producer will
                    done.discard(req_id)
                    holding[req_id] = []
                    continue
            if why is not None:
                done.discard(req_id)
                untrusted[req_id] = why
        return untrusted

    def _ask_producer(self, req_id: str, engine_id: EngineId, remote_id: str) -> None:
        """Wait, off the engine thread, for ``engine_id`` to say whether it
        released ``remote_id`` after the read's notification or before."""

        def answered(fetched: list[tuple[int, dict[str, bool]]]) -> bool:
            return all(remote_id in answers for _, answers in fetched)

        with self._verdict_lock:
            self._verdicts_asked[req_id] = (engine_id, remote_id)
        self._verdict_waiter.wait_for(
            RefreshWait(
                req_id,
                engine_id,
                answered,
                deadline=time.monotonic() + 2 * self._handshake_deadline_s,
            )
        )

    def _fetch_verdicts(self, engine_id: EngineId, rank: int) -> dict[str, bool]:
        """One question to ``engine_id``'s rank about every read waiting on it."""
        with self._verdict_lock:
            ids = [
                rid for eid, rid in self._verdicts_asked.values() if eid == engine_id
            ]
        view = self.peers.get((engine_id, rank))
        return fetch_lease_verdicts(view.host, view.port, rank, ids)

    def _on_verdicts(self, outcome: RefreshOutcome[dict[str, bool]]) -> None:
        """The waiter's thread: the producer's answer, or why there is none."""
        with self._verdict_lock:
            engine_id, remote_id = self._verdicts_asked[outcome.req_id]
        why: str | None
        if outcome.covered and outcome.fetched is not None:
            held = all(answers[remote_id] for _, answers in outcome.fetched)
            why = (
                None
                if held
                else (
                    f"engine {engine_id} released the request's KV blocks (its "
                    "kv_lease_duration, extended by heartbeats, ended) before the "
                    "read's notification reached it: the bytes read are not "
                    "trusted. Raise kv_lease_duration in the producer's "
                    "kv_connector_extra_config, or give the engines more CPU"
                )
            )
        else:
            why = (
                f"engine {engine_id} did not say in {outcome.waited_s:.1f} s "
                f"({outcome.attempts} question(s) on its side channel: "
                f"{outcome.error or 'still holding the blocks'}) whether it still "
                "held the request's KV blocks when the read ended, and the lease "
                "could not vouch for it: the bytes read are not trusted"
            )
        logger.info(
            "ElasticNixlConnector: request %s: engine %s says its read %s (%.2f s, "
            "%d question(s))",
            outcome.req_id,
            engine_id,
            "came in time" if why is None else "is not to be trusted",
            outcome.waited_s,
            outcome.attempts,
        )
        with self._verdict_lock:
            del self._verdicts_asked[outcome.req_id]
            self._verdicts_in[outcome.req_id] = why

    def _read_was_late(self, req_id: str) -> str | None:
        """Why a completed read of ``req_id`` cannot be trusted, if it cannot:
        it completed after the producer's hold on the blocks ended. When the
        lease cannot vouch for it and the producer answers, ask it instead
        (the read then waits; ``None`` here)."""
        tracked = self._read_leases.get(req_id)
        self._read_leases.forget(req_id)
        if tracked is None:
            return None  # vLLM's NixlConnector as producer: vLLM's semantics
        engine_id, remote_id, lease = tracked
        clock = self._producer_clock(engine_id)
        if clock is None:
            return None
        now, error = clock
        if lease.held_at(now + min(error, MAX_CLOCK_ERROR_S)):
            return None
        if lease.answers and self.peers.ranks(engine_id):
            self._ask_producer(req_id, engine_id, remote_id)
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
