"""The staged path: producer gathers into bounce slots, consumer reads slots.

Protocol and planning without vLLM; then through ElasticNixlConnector on real
vLLM classes against the mock NIXL agent (which moves real bytes), with
slots far smaller than a request so every transfer is chunked and pipelined.
"""

import time

import pytest

from conftest import run_until
from elastic_nixl.config import ElasticNixlSettings
from elastic_nixl.staging.protocol import (
    Cancel,
    Failed,
    Grant,
    Stage,
    StagingOffer,
    Written,
    decode,
    encode,
)

V = 20_000
P = 64
STAGED = {"transfer_path": "staged", "staging_slots": 2, "staging_slot_bytes": 1}


def test_offer_geometry_is_the_slot_layout() -> None:
    offer = StagingOffer("a", b"", 0x1000, 3, 4, 2, 100, 7, "VRAM")
    # slot 1 starts after 2 regions x 4 blocks x 100 bytes; a chunk of 3
    # blocks is packed [regions, 3, page]: one descriptor of 600 bytes.
    assert offer.geometry.descriptors(1, 3, 7).tolist() == [[0x1000 + 800, 600, 7]]
    assert offer.geometry.every_slot(7)[2].tolist() == [0x1000 + 2 * 800, 800, 7]
    with pytest.raises(ValueError, match="slot 3"):
        offer.geometry.descriptors(3, 1, 0)
    with pytest.raises(ValueError, match="5 blocks"):
        offer.geometry.descriptors(0, 5, 0)


def test_messages_round_trip_and_garbage_is_refused() -> None:
    for msg in (
        Stage("r#1", [1, 2, 30_000], 4, None, [0, 1]),
        Stage("r#2", [5], 1, StagingOffer("a", b"md", 0, 1, 1, 1, 8, 0, "DRAM")),
        Grant("r#1", 1, 0),
        Written("r#1", 0, 1, 2),
        Failed("r#1", "why"),
        Cancel("r#1"),
    ):
        assert decode(encode(msg)) == msg
    with pytest.raises(ValueError, match="malformed staging message"):
        decode(b"r1:1")  # vLLM's own notification format
    with pytest.raises(ValueError, match="malformed staging message"):
        decode(b"\x93garbage")


def test_slot_blocks_from_settings() -> None:
    s = ElasticNixlSettings.from_extra_config({"staging_slot_bytes": 10_000})
    assert s.staging_slot_blocks(3_000) == 3
    assert s.staging_slot_blocks(20_000) == 1  # a slot holds at least one block
    with pytest.raises(ValueError, match="staging_slots"):
        ElasticNixlSettings.from_extra_config({"staging_slots": 0})


def _pair(make_engine, tag: str, **kw):
    prod = make_engine(
        "kv_producer", f"p-{tag}", virtual_blocks=V, physical_blocks=P, extra=STAGED
    )
    cons = make_engine(
        "kv_consumer", f"d-{tag}", virtual_blocks=V, physical_blocks=P, **kw
    )
    return prod, cons


def test_staged_transfer_chunks_through_slots(make_engine) -> None:
    prod, cons = _pair(make_engine, "st", extra=STAGED)
    pw, cw = prod.worker.connector_worker, cons.worker.connector_worker
    assert pw.staged.server is not None and pw.staged.server.slot_blocks == 1
    ids = [1, 2, 3, 7, 9]
    params = prod.prefill("r1", ids)
    prod.step()
    cons.submit("r1", params, [10, 11, 12, 13, 14])
    run_until(prod, cons, "r1")
    assert cons.verify("r1", [10, 11, 12, 13, 14]) == []
    assert cons.failed_blocks == set()
    # Nothing read the producer's KV directly: all bytes came through slots.
    assert cw.nixl_wrapper.stats().transfers_posted == 0
    assert cw.elastic_stats.staged_reads == 1
    assert pw.staged.server.stats.chunks == 5  # 5 blocks, 1-block slots
    assert cw.staged.reader is not None and cw.staged.reader.stats.blocks == 5
    # The producer is told through vLLM's own notification, as after a direct
    # READ, and unpins the request's blocks on it.
    assert cw.nixl_wrapper.stats().notifs_sent == 1
    for _ in range(200):
        if not pw._send_leases:
            break
        prod.step()
        time.sleep(0.005)
    assert not pw._send_leases


def test_staged_blocks_beyond_physical_budget_after_growth(make_engine) -> None:
    prod, cons = _pair(make_engine, "gr", extra=STAGED)
    prod.allocator.map_blocks(range(12_000, 12_006))
    cons.allocator.map_blocks(range(9_000, 9_006))
    prod.step()
    ids = list(range(12_000, 12_006))
    params = prod.prefill("r2", ids)
    prod.step()
    cons.submit("r2", params, list(range(9_000, 9_006)))
    run_until(prod, cons, "r2")
    assert cons.verify("r2", list(range(9_000, 9_006))) == []
    # The producer checks the blocks (lease) when it stages them: no handshake
    # round trip to refresh its extents first, as the direct path needs.
    assert cons.worker.connector_worker.elastic_stats.refreshes == 0


def test_many_requests_share_the_slots(make_engine) -> None:
    prod, cons = _pair(make_engine, "many", extra=STAGED)
    want = {}
    for i in range(6):
        rid = f"m{i}"
        src = [1 + 3 * i, 2 + 3 * i, 3 + 3 * i]
        dst = [30 + 3 * i, 31 + 3 * i, 32 + 3 * i]
        params = prod.prefill(rid, src)
        prod.step()
        cons.submit(rid, params, dst)
        want[rid] = dst
    done: set[str] = set()
    for _ in range(400):
        _, recving = cons.step()
        prod.step()
        done |= recving
        if done >= set(want):
            break
        time.sleep(0.005)
    assert done >= set(want)
    for rid, dst in want.items():
        assert cons.verify(rid, dst) == [], rid
    assert cons.failed_blocks == set()


def test_staged_unmapped_remote_block_fails_alone(make_engine) -> None:
    prod, cons = _pair(make_engine, "bad", extra=STAGED)
    good = prod.prefill("ok1", [1, 2])
    prod.step()
    forged = dict(good, remote_request_id="bad", remote_block_ids=([1, 17_000],))
    cons.submit("bad", forged, [7, 8])
    run_until(prod, cons, "bad")
    assert cons.failed_blocks == {7, 8}
    cw = cons.worker.connector_worker
    assert cw.elastic_stats.refused_reads == 1
    assert prod.worker.connector_worker.staged.server.stats.failures == 1
    # The leases the producer took for the refused request are gone, and both
    # engines keep serving through the same slots.
    cons.submit("ok1", good, [5, 6])
    run_until(prod, cons, "ok1")
    assert cons.verify("ok1", [5, 6]) == []


def test_consumer_direct_setting_reads_kv_directly(make_engine) -> None:
    prod, cons = _pair(make_engine, "dir", extra={"transfer_path": "direct"})
    params = prod.prefill("r", [4, 5])
    prod.step()
    cons.submit("r", params, [6, 7])
    run_until(prod, cons, "r")
    assert cons.verify("r", [6, 7]) == []
    cw = cons.worker.connector_worker
    assert cw.elastic_stats.staged_reads == 0 and cw.staged.reader is None
    assert cw.nixl_wrapper.stats().transfers_posted == 1


def test_vanilla_consumer_reads_a_staging_producer(make_engine) -> None:
    prod, cons = _pair(make_engine, "van", memory="static", connector="NixlConnector")
    params = prod.prefill("r", [1, 2])
    prod.step()
    cons.submit("r", params, [3, 4])
    run_until(prod, cons, "r")
    assert cons.verify("r", [3, 4]) == []


def test_static_memory_pushes_through_slots_too(make_engine) -> None:
    """Static memory on the staged path (what auto picks on a GPU without
    NVLink, where UCX turns READ off): vLLM's registration, plus slots."""
    prod = make_engine("kv_producer", "p-st-static", memory="static", extra=STAGED)
    cons = make_engine("kv_consumer", "d-st-static", memory="static")
    pw, cw = prod.worker.connector_worker, cons.worker.connector_worker
    assert not pw.elastic and pw.staged.server is not None
    params = prod.prefill("s1", [1, 2, 3])
    prod.step()
    cons.submit("s1", params, [4, 5, 6])
    run_until(prod, cons, "s1")
    assert cons.verify("s1", [4, 5, 6]) == [] and cons.failed_blocks == set()
    assert cw.elastic_stats.staged_reads == 1
    assert cw.nixl_wrapper.stats().transfers_posted == 0  # nothing READ directly
    # A vanilla consumer ignores the slots and reads vLLM's registration.
    van = make_engine(
        "kv_consumer", "d-st-van", memory="static", connector="NixlConnector"
    )
    params = prod.prefill("s2", [7])
    prod.step()
    van.submit("s2", params, [8])
    run_until(prod, van, "s2")
    assert van.verify("s2", [8]) == []


# ---------------------------------------------------------------------------
# The staging engine alone (no vLLM): two mock agents, real bytes
# ---------------------------------------------------------------------------


class _Lease:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        log.append("lease")

    def release(self) -> None:
        self.log.append("release")


def _lease_ok(log: list[str]):
    return lambda ids: _Lease(log)


def _engine(fabric, tag: str, views, lease, slot_blocks=2, slots=2, **kw):
    import torch  # noqa: F401 - views are torch tensors

    from conftest import mock_agent
    from elastic_nixl.staging import StagedReader, StagingServer

    server = StagingServer(
        mock_agent(f"srv-{tag}", fabric), views[0], lease, slot_blocks, slots, "DRAM"
    )
    reader = StagedReader(
        mock_agent(f"rd-{tag}", fabric), views[1], slot_blocks, slots, "DRAM", **kw
    )
    return server, reader


@pytest.mark.parametrize("stacked", [True, False])
def test_engine_moves_bytes_stacked_or_not(fabric, stacked: bool) -> None:
    import torch

    from elastic_nixl.staging import StagedRead

    g = torch.Generator().manual_seed(7)
    if stacked:  # regions evenly spaced in one allocation: one kernel
        src_all = torch.randint(0, 255, (3, 40, 96), dtype=torch.uint8, generator=g)
        dst_all = torch.zeros((3, 40, 96), dtype=torch.uint8)
        src, dst = list(src_all), list(dst_all)
    else:
        src = [torch.randint(0, 255, (40, 96), dtype=torch.uint8, generator=g)]
        src += [torch.randint(0, 255, (40, 96), dtype=torch.uint8, generator=g)]
        dst = [torch.zeros((40, 96), dtype=torch.uint8) for _ in src]
    log: list[str] = []
    server, reader = _engine(fabric, f"b{stacked}", (src, dst), _lease_ok(log))
    assert server.rows.one_kernel is stacked
    try:
        remote, local = [3, 1, 39, 20, 21], [0, 5, 6, 38, 2]
        reader.submit(StagedRead("r", server.offer, remote, local))
        assert reader.next_result(10) == ("r", None)
        for r, loc in zip(remote, local, strict=True):
            for s, d in zip(src, dst, strict=True):
                assert torch.equal(s[r], d[loc])
        for _ in range(200):  # the producer unpins once the last slot is back
            if log == ["lease", "release"]:
                break
            time.sleep(0.01)
        assert log == ["lease", "release"]
        assert server.stats.chunks == 3 and sorted(server.free_slots) == [0, 1]
    finally:
        reader.close()
        server.close()


@pytest.mark.parametrize("server_slot, reader_slot", [(3, 2), (1, 4)])
def test_engine_sides_with_different_slot_sizes(
    fabric, server_slot: int, reader_slot: int
) -> None:
    """Engines configured differently agree on the smaller chunk."""
    import torch

    from conftest import mock_agent
    from elastic_nixl.staging import StagedRead, StagedReader, StagingServer

    src = [torch.arange(40 * 64, dtype=torch.int32).view(40, 64).view(torch.uint8)]
    dst = [torch.zeros_like(src[0])]
    server = StagingServer(
        mock_agent(f"srv-{server_slot}", fabric),
        src,
        _lease_ok([]),
        server_slot,
        2,
        "DRAM",
    )
    reader = StagedReader(
        mock_agent(f"rd-{reader_slot}", fabric), dst, reader_slot, 2, "DRAM"
    )
    try:
        reader.submit(StagedRead("r", server.offer, [9, 3, 4, 5, 30], [0, 1, 2, 3, 4]))
        assert reader.next_result(10) == ("r", None)
        for r, loc in zip([9, 3, 4, 5, 30], range(5), strict=True):
            assert torch.equal(src[0][r], dst[0][loc])
    finally:
        reader.close()
        server.close()


def test_engine_refused_blocks_fail_with_the_reason(fabric) -> None:
    import torch

    from elastic_nixl.capabilities import KVMemoryError
    from elastic_nixl.staging import StagedRead

    def refuse(ids):
        raise KVMemoryError(f"cannot lease block {max(ids)}: it is not mapped")

    views = ([torch.zeros((8, 64), dtype=torch.uint8)],) * 2
    server, reader = _engine(fabric, "ref", views, refuse)
    try:
        reader.submit(StagedRead("bad", server.offer, [1, 7], [2, 3]))
        req, error = reader.next_result(10)
        assert req == "bad" and "cannot lease block 7" in (error or "")
        assert server.stats.failures == 1
    finally:
        reader.close()
        server.close()


def test_engine_reader_times_out_on_a_silent_producer(fabric) -> None:
    import torch

    from elastic_nixl.staging import StagedRead

    views = ([torch.zeros((8, 64), dtype=torch.uint8)],) * 2
    server, reader = _engine(fabric, "silent", views, _lease_ok([]), timeout_s=0.3)
    server.close()  # stops answering; its agent stays reachable
    try:
        reader.submit(StagedRead("r", server.offer, [1], [2]))
        req, error = reader.next_result(10)
        assert req == "r" and "no staged data from producer" in (error or "")
    finally:
        reader.close()


def test_engine_server_ends_the_job_of_a_vanished_consumer(fabric) -> None:
    """A consumer that stops granting slots does not hold the lease forever."""
    import torch

    from conftest import mock_agent
    from elastic_nixl.staging import StagingServer
    from elastic_nixl.staging.protocol import Stage, encode

    log: list[str] = []
    server = StagingServer(
        mock_agent("srv-gone", fabric),
        [torch.zeros((8, 64), dtype=torch.uint8)],
        _lease_ok(log),
        1,
        2,
        "DRAM",
        slot_timeout_s=0.3,
    )
    ghost = mock_agent("ghost", fabric)
    slots = torch.zeros((2, 64), dtype=torch.uint8)
    ghost.register_memory(
        ghost.get_reg_descs([(slots.data_ptr(), slots.numel(), 0, "")], "DRAM")
    )
    offer = StagingOffer(
        "ghost", ghost.get_agent_metadata(), slots.data_ptr(), 2, 1, 1, 64, 0, "DRAM"
    )
    try:
        ghost.add_remote_agent(server.offer.agent_metadata)
        # Three one-block chunks, one slot granted: chunk 0 is written, then
        # the consumer vanishes.
        stage = Stage("x#1", [1, 2, 3], 1, offer, [0])
        ghost.send_notif(server.offer.agent_name, encode(stage))
        for _ in range(100):
            if server.stats.chunks == 1:
                break
            time.sleep(0.01)
        assert server.stats.chunks == 1 and log == ["lease"]
        time.sleep(0.6)
        assert log == ["lease", "release"] and server.active_transfers == 0
        assert sorted(server.free_slots) == [0, 1]
        msgs = [decode(m) for ms in ghost.get_new_notifs().values() for m in ms]
        assert any(isinstance(m, Failed) and "no grant" in m.reason for m in msgs)
    finally:
        server.close()
