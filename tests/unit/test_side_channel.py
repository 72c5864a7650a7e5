"""The side channel an elastic engine serves (connector/side_channel.py):
vLLM's GET_META unchanged, the lease question, and bad clients."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.utils import zmq_ctx
from vllm.utils.network_utils import make_zmq_path

from elastic_nixl.connector.leases import LeaseVerdicts
from elastic_nixl.connector.peers import fetch_handshake_timed
from elastic_nixl.connector.side_channel import (
    fetch_lease_verdicts,
    serve_side_channel,
)
from elastic_nixl.tools.harness.vllm_objects import free_port


@pytest.fixture
def served() -> Iterator[tuple[int, dict[tuple[int, int], bytes], LeaseVerdicts]]:
    payloads = {(0, 0): b"rank-0 payload", (0, 1): b"rank-1 payload"}
    verdicts = LeaseVerdicts()
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=serve_side_channel,
        args=(payloads, verdicts, ready, stop, "127.0.0.1", port),
        daemon=True,
    )
    thread.start()
    assert ready.wait(10)
    yield port, payloads, verdicts
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def raw(port: int, msg: bytes) -> list[bytes]:
    with zmq_ctx(zmq.REQ, make_zmq_path("tcp", "127.0.0.1", port)) as sock:
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.send(msg)
        return list(sock.recv_multipart())


def test_get_meta_is_vllms_and_payloads_are_replaceable(served):
    port, payloads, _ = served
    payload, clock = fetch_handshake_timed("127.0.0.1", port, 0, 1)
    assert payload == b"rank-1 payload"
    assert clock is not None and clock.width >= 0  # vLLM's clock echo
    payloads[(0, 1)] = b"newer"
    assert fetch_handshake_timed("127.0.0.1", port, 0, 1)[0] == b"newer"


def test_the_lease_question_answers_what_the_rank_released(served):
    port, _, verdicts = served
    assert fetch_lease_verdicts("127.0.0.1", port, 0, ["a", "b"]) == {}
    verdicts.record(0, {"a": True, "b": False})
    verdicts.record(1, {"c": True})
    assert fetch_lease_verdicts("127.0.0.1", port, 0, ["a", "b", "c"]) == {
        "a": True,
        "b": False,
    }
    assert fetch_lease_verdicts("127.0.0.1", port, 1, ["c"]) == {"c": True}


@pytest.mark.parametrize(
    "msg",
    [
        b"\xc1 not msgpack",
        msgspec.msgpack.encode("get_meta_msg"),
        msgspec.msgpack.encode((b"get_meta_msg", 0, 7)),  # a rank not served
        msgspec.msgpack.encode((b"elastic_nixl_lease_verdicts", 0, 0, [1, 2])),
        msgspec.msgpack.encode((b"something else", 0, 0)),
    ],
)
def test_a_bad_client_gets_an_empty_answer_and_the_channel_keeps_serving(
    served, msg
):
    port, _, _ = served
    assert raw(port, msg)[0] == b""
    assert fetch_handshake_timed("127.0.0.1", port, 0, 0)[0] == b"rank-0 payload"
