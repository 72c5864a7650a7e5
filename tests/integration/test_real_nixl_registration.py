"""ElasticNixlConnector registers host-VMM memory with a real NIXL agent."""

import numpy as np
import pytest
import torch

from elastic_nixl.tools.harness.engine import EngineSpec, PDEngine
from elastic_nixl.tools.harness.vllm_objects import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def producer():
    eng = PDEngine(
        EngineSpec("kv_producer", "real-reg", free_port(), virtual_blocks=50_000)
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reader():
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent("real-reg-reader", nixl_agent_config(backends=["UCX"]))


def _read(reader, producer, remote_addr, nbytes):
    dst = np.zeros(nbytes, dtype=np.int8)
    descs = reader.get_reg_descs([(dst.ctypes.data, nbytes, 0, "")], "DRAM")
    reader.register_memory(descs)
    try:
        agent = producer.worker.connector_worker.nixl_wrapper
        name = reader.add_remote_agent(agent.get_agent_metadata())
        handle = reader.initialize_xfer(
            "READ",
            reader.get_xfer_descs([(dst.ctypes.data, nbytes, 0)], "DRAM"),
            reader.get_xfer_descs([(remote_addr, nbytes, 0)], "DRAM"),
            name,
            b"",
        )
        state = reader.transfer(handle)
        while state == "PROC":
            state = reader.check_xfer_state(handle)
        reader.release_xfer_handle(handle)
        return state, dst
    finally:
        reader.deregister_memory(descs)


def test_mapped_blocks_readable_unmapped_never_registered(producer, reader):
    from nixl._bindings import nixlNotFoundError

    alloc = producer.allocator
    w = producer.worker.connector_worker
    assert w.elastic
    assert w.elastic_stats.registered_bytes == alloc.mapped_bytes
    producer.write_blocks("probe", [3])
    layer = producer.layer_names[0]
    block = producer.kv_caches[layer][3]
    state, got = _read(reader, producer, block.data_ptr(), block.nbytes)
    assert state == "DONE"
    assert bytes(got) == block.contiguous().view(torch.int8).numpy().tobytes()
    # Block 40_000 exists in the address space but is not mapped: NIXL itself
    # must not know it (it was never registered).
    hole = producer.kv_caches[layer][40_000].data_ptr()
    with pytest.raises(nixlNotFoundError):
        _read(reader, producer, hole, block.nbytes)


def test_growth_registers_new_extent_for_real(producer, reader):
    alloc = producer.allocator
    w = producer.worker.connector_worker
    before = w.elastic_stats.registrations
    alloc.map_blocks([40_000])
    assert w.elastic_stats.registrations > before
    producer.write_blocks("grown", [40_000])
    layer = producer.layer_names[0]
    block = producer.kv_caches[layer][40_000]
    state, got = _read(reader, producer, block.data_ptr(), block.nbytes)
    assert state == "DONE" and got.any()
    alloc.unmap_blocks([40_000])
    assert w.elastic_stats.deregistrations >= 1
    assert w.elastic_stats.registered_bytes == alloc.mapped_bytes
