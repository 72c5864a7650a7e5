"""ElasticNixlConnector on real vLLM classes against the mock NIXL agent."""

import dataclasses

import msgspec
import pytest

from conftest import run_until
from elastic_nixl.connector.metadata import EPOCH_PARAM, decode_agent_metadata
from elastic_nixl.connector.peers import fetch_handshake_timed
from elastic_nixl.releases import PREPS_STRIDED_DESCS

V = 20_000  # virtual blocks
P = 64  # physical budget vLLM computed


def stats(engine):
    return engine.worker.connector_worker.nixl_wrapper.stats()


def vanilla_prefix_ok(meta, mapped) -> bool:
    """The blocks offered to vanilla peers: the whole mapped prefix P where
    vLLM preps a descriptor per block; where it preps one strided row per
    region (>= 0.33), each region's offered blocks lie in one registration."""
    if not PREPS_STRIDED_DESCS:
        return meta.num_blocks == P
    if not 0 < meta.num_blocks <= P:
        return False
    return all(
        any(b <= base and base + meta.num_blocks * stride <= b + n for b, n in mapped)
        for base, stride in zip(
            meta.kv_caches_base_addr, meta.block_strides, strict=True
        )
    )


def advertised(engine):
    """What peers are served: the payload is rebuilt once per engine step."""
    engine.step()
    payload = engine.worker.connector_worker.xfer_handshake_metadata
    return decode_agent_metadata(msgspec.msgpack.encode(payload))[1]


def test_registers_only_mapped_memory(make_engine):
    eng = make_engine("kv_producer", "p-reg", virtual_blocks=V, physical_blocks=P)
    alloc = eng.allocator
    st = stats(eng)
    mapped = [(e.base, e.nbytes) for e in alloc.mapped_extents()]
    assert alloc.num_virtual_blocks >= V > P
    assert st.registered_bytes == sum(n for _, n in mapped) == alloc.mapped_bytes
    assert st.registered_bytes < alloc.reservation.nbytes // 100
    meta = advertised(eng)
    assert sorted(map(tuple, meta.registered_extents)) == sorted(mapped)
    assert vanilla_prefix_ok(meta, mapped)  # what a vanilla peer may address
    assert meta.virtual_num_blocks == alloc.num_virtual_blocks
    assert st.prepped_descs == 0  # descriptors are built per request


def test_holes_and_growth_register_each_new_extent_once(make_engine):
    eng = make_engine("kv_producer", "p-holes", virtual_blocks=V, physical_blocks=P)
    alloc, w = eng.allocator, eng.worker.connector_worker
    before = stats(eng)
    new = alloc.map_blocks([10_000, 10_001, 15_000])
    after = stats(eng)
    assert after.register_calls - before.register_calls == len(new) > 0
    assert alloc.unmapped_blocks([9_000, 10_000, 14_000]) == [9_000, 14_000]
    meta = advertised(eng)
    assert meta.elastic_epoch == alloc.epoch
    # The hole keeps blocks >= P out of the prefix.
    assert vanilla_prefix_ok(meta, [(e.base, e.nbytes) for e in alloc.mapped_extents()])
    # Mapping the same blocks again registers nothing (the mock refuses doubles).
    alloc.map_blocks([10_000])
    assert stats(eng).register_calls == after.register_calls
    assert w.elastic_stats.registrations == after.register_calls


def test_shrink_deregisters_and_republishes(make_engine):
    eng = make_engine("kv_producer", "p-shrink", virtual_blocks=V, physical_blocks=P)
    alloc = eng.allocator
    alloc.map_blocks(range(5_000, 5_100))
    eng.step()  # the scheduler now serves the grown payload
    grown = stats(eng)
    alloc.unmap_blocks(range(5_000, 5_100))
    shrunk = stats(eng)
    assert shrunk.deregister_calls > grown.deregister_calls
    assert shrunk.registered_bytes == alloc.mapped_bytes
    eng.step()
    port = eng.spec.side_channel_port
    _, served = decode_agent_metadata(fetch_handshake_timed("localhost", port, 0, 0)[0])
    assert served.elastic_epoch == alloc.epoch
    assert eng.scheduler.connector_scheduler.producer_epoch == alloc.epoch


def test_virtual_block_ids_transfer_after_growth(make_engine):
    prod = make_engine("kv_producer", "p-xfer", virtual_blocks=V, physical_blocks=P)
    cons = make_engine("kv_consumer", "d-xfer", virtual_blocks=V, physical_blocks=P)
    params = prod.prefill("r1", [1, 2, 3, 7])
    prod.step()
    cons.submit("r1", params, [10, 11, 12, 13])
    run_until(prod, cons, "r1")
    assert cons.verify("r1", [10, 11, 12, 13]) == []
    # Grow both engines past the physical budget; ids >= P must be addressable.
    prod.allocator.map_blocks(range(12_000, 12_004))
    cons.allocator.map_blocks(range(9_000, 9_004))
    prod.step()
    params = prod.prefill("r2", list(range(12_000, 12_004)))
    assert params[EPOCH_PARAM] == prod.allocator.epoch
    prod.step()
    cons.submit("r2", params, list(range(9_000, 9_004)))
    run_until(prod, cons, "r2")
    assert cons.verify("r2", list(range(9_000, 9_004))) == []
    w = cons.worker.connector_worker
    assert w.elastic_stats.refreshes == 1  # stale metadata noticed and refreshed
    assert cons.failed_blocks == set()
    # Contiguous runs coalesce: one descriptor per layer region per run.
    assert w.elastic_stats.descriptors_posted <= 2 * 3


def test_unmapped_remote_block_fails_alone(make_engine):
    prod = make_engine("kv_producer", "p-bad", virtual_blocks=V, physical_blocks=P)
    cons = make_engine("kv_consumer", "d-bad", virtual_blocks=V, physical_blocks=P)
    good = prod.prefill("ok1", [1, 2])
    prod.step()
    cons.submit("ok1", good, [5, 6])
    run_until(prod, cons, "ok1")
    posted = stats(cons).transfers_posted
    # A producer (or a proxy) names a block it never mapped.
    forged = dict(good, remote_request_id="bad", remote_block_ids=([1, 17_000],))
    cons.submit("bad", forged, [7, 8])
    run_until(prod, cons, "bad")
    assert stats(cons).transfers_posted == posted  # refused before posting
    assert cons.failed_blocks == {7, 8}
    assert cons.worker.connector_worker.elastic_stats.refused_reads == 1
    # The engine keeps serving.
    again = prod.prefill("ok2", [3, 4])
    prod.step()
    cons.submit("ok2", again, [9, 10])
    run_until(prod, cons, "ok2")
    assert cons.verify("ok2", [9, 10]) == []


def test_unmapped_local_block_fails_alone(make_engine):
    prod = make_engine("kv_producer", "p-loc", virtual_blocks=V, physical_blocks=P)
    cons = make_engine("kv_consumer", "d-loc", virtual_blocks=V, physical_blocks=P)
    params = prod.prefill("r", [1, 2])
    prod.step()
    cons.submit("r", params, [3, 15_000])  # 15_000 is not mapped on the consumer
    run_until(prod, cons, "r")
    assert cons.failed_blocks == {3, 15_000}


def test_static_memory_is_vanilla(make_engine):
    vanilla = make_engine(
        "kv_producer", "p-vanilla", memory="static", connector="NixlConnector"
    )
    ours = make_engine("kv_producer", "p-static", memory="static")
    assert not ours.worker.connector_worker.elastic
    a, b = (dataclasses.asdict(advertised(e)) for e in (vanilla, ours))
    for key in ("engine_id", "agent_metadata", "kv_caches_base_addr"):
        a.pop(key), b.pop(key)
    assert a == b
    assert b["registered_extents"] is None and b["elastic_epoch"] is None
    sv, so = stats(vanilla), stats(ours)
    assert (sv.register_calls, sv.registered_bytes, sv.prepped_descs) == (
        so.register_calls,
        so.registered_bytes,
        so.prepped_descs,
    )


@pytest.mark.parametrize("direction", ["vanilla-to-elastic", "elastic-to-vanilla"])
def test_interop_with_vanilla_nixl_connector(make_engine, direction):
    elastic = {"virtual_blocks": V, "physical_blocks": P}
    vanilla = {"memory": "static", "connector": "NixlConnector", "physical_blocks": P}
    p_kw, c_kw = (
        (vanilla, elastic) if direction == "vanilla-to-elastic" else (elastic, vanilla)
    )
    prod = make_engine("kv_producer", f"p-{direction}", **p_kw)
    cons = make_engine("kv_consumer", f"d-{direction}", **c_kw)
    params = prod.prefill("r", [4, 5, 6])
    prod.step()
    cons.submit("r", params, [20, 21, 22])
    run_until(prod, cons, "r")
    assert cons.verify("r", [20, 21, 22]) == []
    assert cons.failed_blocks == set()


def test_layout_mismatch_fails_the_request_naming_both(make_engine):
    prod = make_engine("kv_producer", "p-nhd", layout="LBNHC")
    cons = make_engine("kv_consumer", "d-hnd", layout="LBHNC")
    params = prod.prefill("r", [1, 2])
    prod.step()
    cons.submit("r", params, [3, 4])
    run_until(prod, cons, "r")
    assert cons.failed_blocks == {3, 4}  # never silently corrupted


def test_remote_hnd_into_local_nhd_with_vllm_permute(make_engine):
    prod = make_engine("kv_producer", "p-hnd", layout="LBHNC")
    cons = make_engine(
        "kv_consumer", "d-nhd", layout="LBNHC", enable_permute_local_kv=True
    )
    params = prod.prefill("r", [1, 2, 3])
    prod.step()
    cons.submit("r", params, [7, 8, 9])
    run_until(prod, cons, "r")
    assert cons.failed_blocks == set()
    assert cons.verify("r", [7, 8, 9]) == []  # logical [H, N, C] content matches
