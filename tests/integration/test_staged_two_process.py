"""The staged protocol's failure paths over real NIXL/UCX, between two processes.

A producer process runs a :class:`~elastic_nixl.staging.server.StagingServer`
over host memory leased through :class:`~elastic_nixl.memory.static.StaticKVMemory`
(vLLM's own buffer), with one bounce slot; a consumer process runs a
:class:`~elastic_nixl.staging.reader.StagedReader`. Both drive real NIXL
agents over UCX (TCP, as between nodes). No vLLM: each process starts in
seconds. Issue 21: a Stage naming a block beyond the producer's rows raised in
the gather after the slot was taken, so the slot never came back and every
later read from that producer failed after the timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROWS, PAGE = 16, 256
WAIT_S = 60.0  # a verdict the test waits on: far beyond the reader's timeout
READER_TIMEOUT_S = 8.0


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def _producer(conn: Any) -> None:
    os.environ["UCX_TLS"] = "tcp"
    import dataclasses

    import msgspec
    import torch

    from elastic_nixl.capabilities import MemoryExtent, MemoryKind
    from elastic_nixl.memory.static import StaticKVMemory
    from elastic_nixl.staging import StagingServer

    g = torch.Generator().manual_seed(21)
    kv = torch.randint(0, 255, (ROWS, PAGE), dtype=torch.uint8, generator=g)
    memory = StaticKVMemory(
        [MemoryExtent(kv.data_ptr(), kv.numel(), 0, MemoryKind.HOST)], ROWS
    )
    server = StagingServer(_agent("i21-srv"), [kv], memory.lease, 2, 1, "DRAM")
    try:
        conn.send((msgspec.msgpack.encode(server.offer), kv.numpy().tobytes()))
        conn.recv()  # the consumer is done
        # A transfer ends on the producer when its last WRITE completes, a
        # moment after the consumer saw the data: wait for the server to
        # settle (or give up and report what it holds).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            server.active_transfers or len(server.free_slots) < server.slots
        ):
            time.sleep(0.01)
        conn.send(
            {
                "stats": dataclasses.asdict(server.stats),
                "free_slots": sorted(server.free_slots),
                "active_transfers": server.active_transfers,
            }
        )
    finally:
        server.close()


def _consumer(conn: Any, offer_raw: bytes) -> None:
    os.environ["UCX_TLS"] = "tcp"
    import msgspec
    import torch

    from elastic_nixl.staging import StagedRead, StagedReader
    from elastic_nixl.staging.protocol import StagingOffer

    offer = msgspec.msgpack.decode(offer_raw, type=StagingOffer)
    dst = torch.zeros((ROWS, PAGE), dtype=torch.uint8)
    reader = StagedReader(
        _agent("i21-rd"), [dst], 2, 2, "DRAM", timeout_s=READER_TIMEOUT_S
    )
    out: dict[str, Any] = {}
    try:
        # Block ROWS + 983 is beyond the producer's rows.
        reader.submit(StagedRead("beyond", offer, [3, ROWS + 983], [0, 1]))
        out["beyond"] = reader.next_result(WAIT_S)
        # The producer still serves: its one slot came back.
        for i, (remote, local) in enumerate(([[5, 6, 7], [2, 3, 4]], [[9], [8]])):
            reader.submit(StagedRead(f"after-{i}", offer, remote, local))
            out[f"after-{i}"] = reader.next_result(WAIT_S)
        out["dst"] = dst.numpy().tobytes()
        out["free_slots"] = sorted(reader.free_slots)
    finally:
        reader.close()
        conn.send(out)


def test_a_stage_beyond_the_producers_rows_fails_alone_over_real_nixl() -> None:
    pytest.importorskip("nixl")
    import numpy as np

    ctx = mp.get_context("spawn")
    p_conn, p_child = ctx.Pipe()
    c_conn, c_child = ctx.Pipe()
    prod = ctx.Process(target=_producer, args=(p_child,), daemon=True)
    prod.start()
    cons = None
    try:
        assert p_conn.poll(120), "the producer process did not start"
        offer_raw, kv_raw = p_conn.recv()
        cons = ctx.Process(target=_consumer, args=(c_child, offer_raw), daemon=True)
        cons.start()
        assert c_conn.poll(120 + 4 * WAIT_S), "the consumer process did not finish"
        out = c_conn.recv()
        p_conn.send("done")
        assert p_conn.poll(60), "the producer process did not report"
        srv = p_conn.recv()
    finally:
        for proc in (cons, prod):
            if proc is not None:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()

    req, error = out["beyond"]
    assert req == "beyond" and error is not None
    # Refused at once, naming the block and the range, not left to time out.
    assert f"block {ROWS + 983}" in error and f"[0, {ROWS})" in error, error
    assert out["after-0"] == ("after-0", None), out["after-0"]
    assert out["after-1"] == ("after-1", None), out["after-1"]
    kv = np.frombuffer(kv_raw, np.uint8).reshape(ROWS, PAGE)
    dst = np.frombuffer(out["dst"], np.uint8).reshape(ROWS, PAGE)
    assert np.array_equal(dst[2:5], kv[5:8]) and np.array_equal(dst[8], kv[9])
    assert out["free_slots"] == [0, 1]
    # Nothing leaked on the producer: its slot, its transfers.
    assert srv["free_slots"] == [0] and srv["active_transfers"] == 0, srv
    assert srv["stats"]["failures"] == 1 and srv["stats"]["transfers"] == 2, srv
