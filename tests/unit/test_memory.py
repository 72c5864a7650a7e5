"""Which KVMemory is behind the tensors: ours, static, or discovered."""

import pytest
import torch

from elastic_nixl.allocator import BlockGeometry, VmmKVAllocator, registry
from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.capabilities import KVMemory, KVMemoryError, MappingStability
from elastic_nixl.config import AllocatorChoice
from elastic_nixl.memory import (
    DiscoveredHostMemory,
    StaticKVMemory,
    parse_proc_maps,
    resolve_kv_memory,
)
from elastic_nixl.memory.host import accessible_extents

PAGE, LAYERS, V = 4096, 2, 4096


@pytest.fixture
def foreign():
    """Host VMM memory with a hole whose allocator is hidden from us: an
    allocator that implements nothing (kvcached-like)."""
    g = BlockGeometry.layer_outermost(PAGE, LAYERS, V)
    alloc = VmmKVAllocator(HostBackend(), g, V, 1 << 16, name="foreign")
    alloc.grow_to(32)
    alloc.map_blocks(range(1000, 1016))
    registry.unregister(alloc)
    buf = alloc.tensor()
    kv = {
        f"layers.{i}": buf[i * V * PAGE : (i + 1) * V * PAGE].view(V, PAGE)
        for i in range(LAYERS)
    }

    def spans(b: int) -> list[tuple[int, int]]:
        return [(t[b].data_ptr(), PAGE) for t in kv.values()]

    yield alloc, kv, spans
    alloc.close()


def test_parse_proc_maps_and_accessible():
    text = (
        "1000-3000 rw-p 0 00:00 0\n3000-5000 ---p 0 00:00 0\n5000-6000 rw-p 0 0:0 0\n"
    )
    entries = parse_proc_maps(text)
    assert accessible_extents(entries, 0x2000, 0x5800) == [
        (0x2000, 0x3000),
        (0x5000, 0x5800),
    ]


def test_auto_describes_partly_mapped_foreign_host_memory(foreign):
    alloc, kv, spans = foreign
    mem = resolve_kv_memory(kv, AllocatorChoice.AUTO, 32, spans, V)
    assert isinstance(mem, DiscoveredHostMemory) and isinstance(mem, KVMemory)
    assert mem.capabilities.stability is MappingStability.ELASTIC
    assert sum(e.nbytes for e in mem.mapped_extents()) == alloc.mapped_bytes
    assert mem.unmapped_blocks([0, 31, 32, 1000, 1015, 2000]) == [32, 2000]
    with pytest.raises(KVMemoryError, match="cannot be leased"):
        mem.lease([0])
    # The owner maps more behind our back: a refresh sees it, with a new epoch.
    epoch = mem.epoch
    alloc.map_blocks([2000])
    assert mem.refresh() and mem.epoch == epoch + 1
    assert mem.unmapped_blocks([2000]) == []


def test_vmm_setting_refuses_foreign_tensors(foreign):
    _, kv, spans = foreign
    with pytest.raises(KVMemoryError, match="allocator'\\] = 'vmm'"):
        resolve_kv_memory(kv, AllocatorChoice.VMM, 32, spans, V)


def test_fully_mapped_host_memory_is_static():
    kv = {"layers.0": torch.zeros(8, PAGE, dtype=torch.int8)}
    mem = resolve_kv_memory(kv, AllocatorChoice.AUTO, 8)
    assert isinstance(mem, StaticKVMemory)
    assert mem.mapped_extents()[0].nbytes == 8 * PAGE
