"""PeerRefresher: the consumer's wait for a producer's newer payload.

Plain threads and a fake fetch; no vLLM, no NIXL.
"""

from __future__ import annotations

import queue
import threading
import time

import zmq

from elastic_nixl.connector.refresh import PeerRefresher, RefreshOutcome, RefreshWait


class FakeSideChannel:
    """A producer's side channel: answers with its current epoch, or times out
    (``zmq.Again``, what vLLM's 5 s receive timeout raises) while ``late``."""

    def __init__(self) -> None:
        self.epoch = 1
        self.late = 0  # answers still to miss
        self.calls = 0
        self.lock = threading.Lock()

    def fetch(self, engine_id: str, rank: int) -> int:
        with self.lock:
            self.calls += 1
            if self.late:
                self.late -= 1
                raise zmq.Again("Resource temporarily unavailable")
            return self.epoch


def make(channel: FakeSideChannel) -> tuple[PeerRefresher[int], queue.Queue]:
    done: queue.Queue[RefreshOutcome[int]] = queue.Queue()
    refresher: PeerRefresher[int] = PeerRefresher(
        channel.fetch, lambda engine: [0], done.put
    )
    return refresher, done


def wait(req: str, at_least: int, deadline_s: float = 10.0) -> RefreshWait[int]:
    return RefreshWait(
        req,
        "P",
        lambda fetched: all(epoch >= at_least for _, epoch in fetched),
        deadline=time.monotonic() + deadline_s,
    )


def test_a_late_side_channel_does_not_fail_the_request():
    """The busy-host failure: the first answers time out; the wait retries and
    the request is served once the producer answers."""
    channel = FakeSideChannel()
    channel.late = 3
    refresher, done = make(channel)
    try:
        refresher.wait_for(wait("r1", at_least=1))
        outcome = done.get(timeout=10)
    finally:
        refresher.close()
    assert outcome.covered and outcome.error is None
    assert outcome.fetched == [(0, 1)] and outcome.attempts == 4


def test_waits_for_a_payload_published_after_the_request():
    """The producer publishes the blocks a step after the request's params."""
    channel = FakeSideChannel()
    refresher, done = make(channel)
    try:
        refresher.wait_for(wait("r1", at_least=2))
        time.sleep(0.05)
        assert done.empty()
        channel.epoch = 2
        outcome = done.get(timeout=10)
    finally:
        refresher.close()
    assert outcome.covered and outcome.fetched == [(0, 2)]


def test_a_wait_that_is_never_covered_ends_at_its_deadline_naming_why():
    channel = FakeSideChannel()
    channel.late = 10**6
    refresher, done = make(channel)
    try:
        refresher.wait_for(wait("r1", at_least=1, deadline_s=0.3))
        outcome = done.get(timeout=10)
    finally:
        refresher.close()
    assert not outcome.covered and outcome.fetched is None
    assert outcome.error is not None and "Again" in outcome.error


def test_forged_waits_do_not_delay_an_honest_request_and_share_fetches():
    """Many requests naming what the producer never publishes (a client-chosen
    future epoch) wait on the same fetches as an honest one, which is served
    on the first answer that covers it."""
    channel = FakeSideChannel()
    refresher, done = make(channel)
    try:
        for i in range(50):
            refresher.wait_for(wait(f"forged{i}", at_least=2**62, deadline_s=2.0))
        refresher.wait_for(wait("honest", at_least=1))
        first = done.get(timeout=10)
        calls_when_served = channel.calls
        rest = [done.get(timeout=10) for _ in range(50)]
    finally:
        refresher.close()
    assert first.req_id == "honest" and first.covered
    # One fetch per attempt for the producer, not one per waiting request.
    assert calls_when_served <= 2
    assert all(not o.covered for o in rest)
    assert channel.calls < 50


def test_a_payload_a_request_cannot_judge_fails_that_request_alone():
    channel = FakeSideChannel()
    refresher, done = make(channel)

    def broken(fetched: list[tuple[int, int]]) -> bool:
        raise ValueError("region count changed")

    try:
        refresher.wait_for(
            RefreshWait("bad", "P", broken, deadline=time.monotonic() + 10)
        )
        refresher.wait_for(wait("good", at_least=1))
        outcomes = {o.req_id: o for o in (done.get(timeout=10), done.get(timeout=10))}
    finally:
        refresher.close()
    assert outcomes["good"].covered
    assert not outcomes["bad"].covered
    assert "region count changed" in (outcomes["bad"].error or "")


def test_blocks_missing_from_a_payload_as_new_as_the_request_fail_in_seconds():
    """Caught up with the request's epoch yet the blocks are not there: they
    were never registered (a forged block id); the wait ends after the grace,
    not at the lease deadline."""
    channel = FakeSideChannel()
    refresher, done = make(channel)
    try:
        refresher.wait_for(
            RefreshWait(
                "forged-blocks",
                "P",
                lambda fetched: False,
                deadline=time.monotonic() + 600,
                caught_up=lambda fetched: True,
            )
        )
        outcome = done.get(timeout=60)
    finally:
        refresher.close()
    assert not outcome.covered
