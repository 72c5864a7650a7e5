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

    def get(self, req_id: str) -> tuple[str, ReadLease] | None:
        """The producer engine and lease of ``req_id``, if tracked."""
        entry = self._by_req.get(req_id)
        return None if entry is None else (entry[0], entry[2])

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
