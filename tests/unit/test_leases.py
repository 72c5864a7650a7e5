"""ReadLease: when a consumer may report a read successful (connector/leases.py)."""

from __future__ import annotations

from elastic_nixl.connector.leases import (
    COMPLETION_MARGIN_S,
    LeaseVerdicts,
    ReadLease,
    ReadLeases,
)


def test_a_read_completing_under_the_lease_is_trusted_and_a_late_one_is_not():
    lease = ReadLease(expiry=100.0, extension=20.0)
    assert lease.held_at(100.0 - COMPLETION_MARGIN_S - 0.01)
    assert not lease.held_at(100.0 - COMPLETION_MARGIN_S + 0.01)
    assert not lease.held_at(130.0)


def test_heartbeats_extend_the_lease_as_the_producer_does():
    lease = ReadLease(expiry=30.0, extension=20.0)
    for sent_at in range(5, 100, 5):  # every lease/6, as vLLM sends them
        lease.heartbeat(float(sent_at))
    assert lease.expiry == 95.0 + 20.0
    assert lease.held_at(110.0)


def test_a_heartbeat_that_may_arrive_after_the_end_extends_nothing():
    """Sent within a quarter extension of the end: it may arrive after the
    producer freed the blocks, so the consumer does not count it."""
    lease = ReadLease(expiry=30.0, extension=20.0)
    lease.heartbeat(26.0)
    assert lease.expiry == 30.0
    lease.heartbeat(40.0)  # after the end: nothing to extend
    assert lease.expiry == 30.0
    assert not lease.held_at(35.0)


def test_the_table_follows_heartbeats_by_the_producers_request_id():
    leases = ReadLeases()
    leases.track("d-1", "P", "p-1", ReadLease(30.0, 20.0))
    leases.track("d-2", "P", "p-2", ReadLease(30.0, 20.0))
    leases.heartbeat("P", "p-1", 20.0)
    leases.heartbeat("Q", "p-2", 20.0)  # another engine's request: ignored
    assert leases.get("d-1") == ("P", "p-1", ReadLease(40.0, 20.0, heartbeats=1))
    assert leases.get("d-2") == ("P", "p-2", ReadLease(30.0, 20.0))
    leases.forget("d-1")
    leases.heartbeat("P", "p-1", 25.0)
    assert leases.get("d-1") is None and len(leases) == 1
    leases.prune({"P": 1000.0}, older_than_s=600.0)
    assert len(leases) == 0


def test_the_producer_answers_for_what_each_rank_released():
    now = [0.0]
    book = LeaseVerdicts(keep_s=60.0, clock=lambda: now[0])
    book.record(0, {"p-1": True, "p-2": False})
    book.record(1, {"p-1": True})
    assert book.answer(0, ["p-1", "p-2", "p-3"]) == {"p-1": True, "p-2": False}
    assert book.answer(1, ["p-1", "p-2"]) == {"p-1": True}  # p-2: still held
    # A late reader taints the request for good.
    book.record(0, {"p-2": True})
    assert book.answer(0, ["p-2"]) == {"p-2": False}
    # Answers are kept keep_s, then forgotten.
    now[0] = 61.0
    book.record(0, {"p-4": True})
    assert book.answer(0, ["p-1", "p-4"]) == {"p-4": True}
