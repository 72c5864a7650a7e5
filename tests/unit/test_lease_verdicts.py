"""A read the lease cannot vouch for asks the producer (connector/reading.py,
docs/leases.md): trusted when the producer still held the blocks, failed
alone when its hold had ended. Real vLLM classes, the mock NIXL agent, the
producer's real side channel."""

from __future__ import annotations

import time

import pytest

from conftest import run_until
from elastic_nixl.connector.metadata import LEASE_EXPIRY_PARAM, LEASE_VERDICTS_PARAM


def worker(engine):
    return engine.worker.connector_worker


@pytest.mark.parametrize("memory", ["static", "vmm"])
def test_a_read_the_lease_doubts_is_trusted_when_the_producer_held_it(
    make_engine, memory
):
    """The consumer's estimate says the hold ended (a proxy or a starved
    engine delayed the request); the producer still held the blocks."""
    prod = make_engine("kv_producer", f"p-held-{memory}", memory=memory)
    cons = make_engine("kv_consumer", f"d-held-{memory}", memory=memory)
    params = prod.prefill("r1", [1, 2])
    prod.step()
    params[LEASE_EXPIRY_PARAM] = 0.0  # long past, in the producer's clock
    cons.submit("r1", params, [5, 6])
    run_until(prod, cons, "r1")
    assert cons.failed_blocks == set()
    assert cons.verify("r1", [5, 6]) == []
    assert worker(cons).elastic_stats.late_reads == 0


def test_without_the_producers_answer_the_doubted_read_fails(make_engine):
    """The same read from a producer that does not answer (an older release):
    the estimate alone decides, and refuses."""
    prod = make_engine("kv_producer", "p-mute", memory="static")
    cons = make_engine("kv_consumer", "d-mute", memory="static")
    params = prod.prefill("r1", [1, 2])
    prod.step()
    params[LEASE_EXPIRY_PARAM] = 0.0
    params[LEASE_VERDICTS_PARAM] = False
    cons.submit("r1", params, [5, 6])
    run_until(prod, cons, "r1")
    assert cons.failed_blocks == {5, 6}
    assert worker(cons).elastic_stats.late_reads == 1


def test_a_read_after_the_producer_released_fails_alone(make_engine, caplog):
    prod = make_engine(
        "kv_producer", "p-gone", memory="static", extra={"kv_lease_duration": 1}
    )
    cons = make_engine("kv_consumer", "d-gone", memory="static")
    # A first request makes the handshake (and measures the clock).
    ok = prod.prefill("r0", [1, 2])
    prod.step()
    cons.submit("r0", ok, [5, 6])
    run_until(prod, cons, "r0")
    late = prod.prefill("r1", [3, 4])
    prod.step()
    time.sleep(1.2)
    prod.step()  # the hold ends: vLLM releases the blocks
    cons.submit("r1", late, [7, 8])
    run_until(prod, cons, "r1")
    assert cons.failed_blocks == {7, 8}
    assert worker(cons).elastic_stats.late_reads == 1
    assert "released the request's KV blocks" in caplog.text
    # The engines keep serving.
    again = prod.prefill("r2", [9, 10])
    prod.step()
    cons.submit("r2", again, [11, 12])
    run_until(prod, cons, "r2")
    assert cons.verify("r2", [11, 12]) == []
