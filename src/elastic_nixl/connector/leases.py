"""When a consumer may report a read successful: the producer's lease, seen
from the consumer.

vLLM's producer holds a finished request's blocks for ``kv_lease_duration``
seconds; each heartbeat a consumer sends while the request waits extends the
hold to ``2/3 * kv_lease_duration`` past its arrival. After that the blocks
are freed: vLLM may hand them to another request, and with elastic memory
the pool may release (unmap) them, after which NIXL still serves reads of the
retired range, as zeros. A READ of freed blocks therefore completes without
any error, with wrong bytes.

The rule this module keeps: **a read is reported successful only if it
completed while the producer still held the blocks.** An elastic producer
stamps into ``kv_transfer_params`` the end of its lease (its own clock, the
one its side channel reports to a consumer's handshake) and a heartbeat's
extension.
The consumer follows its own heartbeats and, when a read completes, checks
the completion time against the lease it can prove:

* a heartbeat counts only if it left a quarter of an extension before the
  lease it extends would end (delivery on a loaded host takes time; a
  heartbeat arriving after the end extends nothing);
* the completion must come before the end, on the producer's clock as the
  consumer's side-channel round trips place it (the middle of the tightest
  bounds, plus half their width, at most ``MAX_CLOCK_ERROR_S``).

The estimate errs one way while the clock is known to within
``2 * MAX_CLOCK_ERROR_S`` (on one host, where both clocks are the same, always):
a read it accepts finished under the lease; a read it refuses may have been
fine, and fails alone with a message naming
``kv_lease_duration``. A producer that stamps nothing (vLLM's own
``NixlConnector``) keeps vLLM's semantics.

Plain data, no vLLM: tested alone (``tests/unit/test_leases.py``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# Seconds a completion must precede the lease's end: the producer frees
# blocks on its next step after the end, so a small margin is enough once the
# clock's uncertainty is accounted for (the caller passes the latest reading).
COMPLETION_MARGIN_S = 0.01
# The most clock uncertainty a check adds to a completion time: round trips
# measured while a host is loaded can be seconds wide; on one host the clocks
# are the same and the middle of the bounds is exact.
MAX_CLOCK_ERROR_S = 1.0


@dataclass
class ReadLease:
    """The producer's hold on one request's blocks, in the producer's clock.

    Args:
        expiry: when the hold ends unless a heartbeat extends it.
        extension: how far past its arrival a heartbeat extends it.
    """

    expiry: float
    extension: float
    heartbeats: int = 0
    # Whether the producer answers, over its side channel, if it still held
    # the blocks when the read's notification arrived (:class:`LeaseVerdicts`).
    answers: bool = False

    def heartbeat(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (producer's clock)."""
        if sent_at + self.extension / 4 < self.expiry:
            self.expiry = max(self.expiry, sent_at + self.extension)
            self.heartbeats += 1

    def held_at(self, completed_at: float, margin: float = COMPLETION_MARGIN_S) -> bool:
        """Whether a read completed at ``completed_at`` finished under the hold."""
        return completed_at + margin < self.expiry


class ReadLeases:
    """The leases of the requests a consumer will read, by request id.

    Heartbeats name the producer's request ids; reads complete under the
    consumer's. Both are kept.
    """

    def __init__(self) -> None:
        self._by_req: dict[str, tuple[str, str, ReadLease]] = {}
        self._by_remote: dict[tuple[str, str], str] = {}

    def track(
        self,
        req_id: str,
        engine_id: str,
        remote_req_id: str,
        lease: ReadLease,
    ) -> None:
        """Follow the lease of ``req_id`` (the producer's ``remote_req_id``)."""
        self._by_req[req_id] = (engine_id, remote_req_id, lease)
        self._by_remote[(engine_id, remote_req_id)] = req_id

    def heartbeat(self, engine_id: str, remote_req_id: str, sent_at: float) -> None:
        """A heartbeat for the producer's ``remote_req_id`` left at ``sent_at``."""
        req_id = self._by_remote.get((engine_id, remote_req_id))
        if req_id is not None:
            self._by_req[req_id][2].heartbeat(sent_at)

    def get(self, req_id: str) -> tuple[str, str, ReadLease] | None:
        """The producer engine, its request id and the lease of ``req_id``."""
        return self._by_req.get(req_id)

    def forget(self, req_id: str) -> None:
        entry = self._by_req.pop(req_id, None)
        if entry is not None:
            self._by_remote.pop((entry[0], entry[1]), None)

    def __len__(self) -> int:
        return len(self._by_req)

    def prune(self, engine_clock: dict[str, float], older_than_s: float) -> None:
        """Forget leases that ended ``older_than_s`` ago (aborted requests that
        never completed); ``engine_clock`` is each producer's clock now."""
        for req_id, (engine_id, _, lease) in list(self._by_req.items()):
            now = engine_clock.get(engine_id)
            if now is not None and lease.expiry + older_than_s < now:
                self.forget(req_id)


class LeaseVerdicts:
    """The producer's own answer, per request it served: did every consumer's
    read notification arrive while it still held the blocks (``True``), or
    did the hold end first (``False``)?

    vLLM's producer processes a step's notifications before it releases the
    leases that ended, and a READ's notification leaves only after its bytes
    did: a ``True`` answer proves the bytes were read from held blocks, with
    no clock involved. A consumer that cannot prove its read in time from the
    lease alone asks for this answer instead of refusing.

    Kept ``keep_s`` seconds, keyed by the producer's rank and request id;
    written by the engine thread, read by the side channel's.
    """

    MAX_ENTRIES = 1 << 16

    def __init__(
        self, keep_s: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keep_s = keep_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, str], tuple[bool, float]] = OrderedDict()

    def record(self, rank: int, verdicts: Mapping[str, bool]) -> None:
        """Rank ``rank`` released these requests: read in time or not. A
        ``False`` is final (one late reader taints the request)."""
        now = self._clock()
        with self._lock:
            for req_id, held in verdicts.items():
                key = (rank, req_id)
                old = self._entries.pop(key, None)
                self._entries[key] = (held and (old is None or old[0]), now)
            while self._entries:
                key, (_, at) = next(iter(self._entries.items()))
                if at + self._keep_s >= now and len(self._entries) <= self.MAX_ENTRIES:
                    break
                del self._entries[key]

    def answer(self, rank: int, req_ids: Iterable[str]) -> dict[str, bool]:
        """What rank ``rank`` knows of ``req_ids``; a request it has not
        released yet is absent (ask again)."""
        with self._lock:
            found = ((r, self._entries.get((rank, r))) for r in req_ids)
            return {r: entry[0] for r, entry in found if entry is not None}
