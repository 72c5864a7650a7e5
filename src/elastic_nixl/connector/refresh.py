"""Keeping a consumer's view of an elastic producer current, off the read path.

An elastic producer registers memory as it grows; a consumer whose view of
the producer predates a request's blocks must fetch the producer's newer
handshake payload before it reads them. The producer serves that payload on
vLLM's NIXL side channel, from its scheduler process, which on a busy host
may answer late, and it publishes new registrations with an engine step's
output, which may come after the request's ``kv_transfer_params`` (so the
first payload fetched can still lack the blocks).

The rules, and why:

* **Own thread.** Fetches run on the refresher's thread, never on vLLM's
  single handshake executor: a request waiting for a payload must not hold up
  another peer's handshake or heartbeat.
* **Coalesced per peer.** All requests waiting on one producer share each
  fetch: n requests cost one round trip per attempt, so a client that sends
  requests naming blocks the producer never registered (or a far-future
  epoch) delays nobody else.
* **Covered, not numbered.** A request is ready when the fetched payload of
  every rank covers the blocks it reads; the epoch a client relays only
  decides whether to fetch. A freshly fetched payload is the producer's
  registrations now, which is what a read needs.
* **Retried until the lease ends.** A fetch that times out or fails is tried
  again with backoff; a request gives up at its deadline (the engine's
  ``kv_lease_duration`` after it began to wait: past it the producer may have
  released the blocks anyway), and its read is then refused naming the
  blocks. A slow producer never fails a request that could still be read.
  Once a payload is as new as the request's epoch says and still lacks the
  blocks, they get ``COVER_GRACE_S`` more (a producer step or two), so a
  request naming blocks that were never registered fails in seconds.
* **Applied on the engine thread.** The refresher only fetches and decodes;
  the worker hands NIXL the new payload on its own thread before it reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from vllm.logger import init_logger

logger = init_logger(__name__)

Payload = TypeVar("Payload")
Fetched = list[tuple[int, Payload]]  # (remote rank, payload) for every rank

FIRST_RETRY_S = 0.005
MAX_RETRY_S = 0.5
# How long blocks may still be missing from a payload as new as the request
# says: the producer publishes with its step's output, a step or two later.
COVER_GRACE_S = 2.0


@dataclass
class RefreshWait(Generic[Payload]):
    """One request waiting for a producer's payload to cover its read.

    Args:
        req_id: the consumer's request id (for logs and the outcome).
        engine_id: the producer.
        covers: whether the payloads fetched for every rank cover the read.
        deadline: monotonic time after which the request stops waiting.
        caught_up: whether the payloads are as new as the request says its
            producer was (its epoch): from then on the blocks are given
            ``COVER_GRACE_S`` more to appear, not the whole deadline.
    """

    req_id: str
    engine_id: str
    covers: Callable[[Fetched[Payload]], bool]
    deadline: float
    caught_up: Callable[[Fetched[Payload]], bool] = lambda fetched: False
    attempts: int = field(default=0)
    started: float = field(default=0.0)
    # What the fetches that did not cover it found (the last few).
    seen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RefreshOutcome(Generic[Payload]):
    """What a wait ended with: the newest payloads fetched (``None`` if no
    fetch succeeded), whether they cover the read, and why not if not."""

    req_id: str
    engine_id: str
    fetched: Fetched[Payload] | None
    covered: bool
    attempts: int
    error: str | None
    waited_s: float = 0.0
    seen: tuple[str, ...] = ()


class PeerRefresher(Generic[Payload]):
    """Fetches producers' payloads for waiting requests on its own thread.

    Args:
        fetch: one fetch of ``(engine id, rank)``'s payload; may raise (a
            timeout, a refused connection, a bad payload): it is retried.
        ranks: the remote ranks of an engine.
        on_done: called on the refresher's thread with each outcome.
        clock: monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        fetch: Callable[[str, int], Payload],
        ranks: Callable[[str], Sequence[int]],
        on_done: Callable[[RefreshOutcome[Payload]], None],
        clock: Callable[[], float] = time.monotonic,
        name: str = "elastic_nixl_refresh",
    ) -> None:
        self._fetch = fetch
        self._ranks = ranks
        self._on_done = on_done
        self._clock = clock
        self._cond = threading.Condition()
        self._waits: list[RefreshWait[Payload]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def wait_for(self, wait: RefreshWait[Payload]) -> None:
        """Queue ``wait``; its outcome arrives through ``on_done``."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the refresher is closed")
            wait.started = self._clock()
            self._waits.append(wait)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop; requests still waiting get no outcome (the engine is going)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            with self._cond:
                while not self._waits and not self._closed:
                    self._cond.wait()
                    delay = FIRST_RETRY_S  # a new wait starts a fresh backoff
                if self._closed:
                    return
                waits = list(self._waits)
            finished = {id(w) for w in self._attempt(waits)}
            with self._cond:
                self._waits = [w for w in self._waits if id(w) not in finished]
                if not self._waits:
                    continue
                # Nothing ready yet: back off, but wake for a new request.
                self._cond.wait(delay)
            delay = min(2 * delay, MAX_RETRY_S)

    def _attempt(self, waits: list[RefreshWait[Payload]]) -> list[RefreshWait[Payload]]:
        """One fetch per producer with waiting requests; the waits that ended."""
        by_engine: dict[str, list[RefreshWait[Payload]]] = {}
        for w in waits:
            by_engine.setdefault(w.engine_id, []).append(w)
        finished: list[RefreshWait[Payload]] = []
        for engine_id, group in by_engine.items():
            fetched: Fetched[Payload] | None = None
            error: str | None = None
            try:
                fetched = [
                    (rank, self._fetch(engine_id, rank))
                    for rank in self._ranks(engine_id)
                ]
            except Exception as e:  # noqa: BLE001 - retried; named if it lasts
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            now = self._clock()
            for w in group:
                w.attempts += 1
                covered = False
                why = error
                if fetched is not None:
                    try:
                        covered = w.covers(fetched)
                        if not covered and w.caught_up(fetched):
                            w.deadline = min(w.deadline, now + COVER_GRACE_S)
                    except Exception as e:  # noqa: BLE001 - this request alone
                        why = f"{type(e).__name__}: {e}"
                        w.deadline = now  # a payload it cannot judge: stop
                if not covered:
                    w.seen = [*w.seen[-3:], why or "not covered"]
                if covered or now >= w.deadline:
                    finished.append(w)
                    self._finish(w, fetched, covered, None if covered else why)
        return finished

    def _finish(
        self,
        wait: RefreshWait[Payload],
        fetched: Fetched[Payload] | None,
        covered: bool,
        error: str | None,
    ) -> None:
        outcome = RefreshOutcome(
            wait.req_id,
            wait.engine_id,
            fetched,
            covered,
            wait.attempts,
            error,
            waited_s=self._clock() - wait.started,
            seen=tuple(wait.seen),
        )
        try:
            self._on_done(outcome)
        except Exception:  # noqa: BLE001 - one request, never the thread
            logger.exception(
                "ElasticNixlConnector: handling the refresh of %s failed", wait.req_id
            )
