"""Which KV memory is behind vLLM's KV tensors.

Three answers, one interface (:class:`~elastic_nixl.capabilities.KVMemory`):

* elastic memory that registered itself (the project's VMM allocator), found
  by address in :mod:`elastic_nixl.allocator.registry`;
* vLLM's own static buffer (:class:`~elastic_nixl.memory.static.StaticKVMemory`);
* memory from an allocator that implements nothing, described from the
  process's memory map (host) or the CUDA driver (GPU).

Anything else is refused with a message saying what was found and what to
configure; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from elastic_nixl.allocator.registry import find_owner
from elastic_nixl.capabilities import KVMemory, KVMemoryError, MemoryExtent, MemoryKind
from elastic_nixl.config import AllocatorChoice
from elastic_nixl.memory.cuda import DiscoveredCudaMemory, describe_cuda_pointer
from elastic_nixl.memory.discovered import BlockSpans
from elastic_nixl.memory.host import (
    DiscoveredHostMemory,
    accessible_extents,
    parse_proc_maps,
    read_self_maps,
)
from elastic_nixl.memory.static import StaticKVMemory

if TYPE_CHECKING:
    import torch


def storage_extents(kv_caches: Mapping[str, torch.Tensor]) -> list[MemoryExtent]:
    """Unique backing storages of the KV tensors (many views share one)."""
    seen: dict[int, MemoryExtent] = {}
    for tensor in kv_caches.values():
        storage = tensor.untyped_storage()
        base = storage.data_ptr()
        if base in seen:
            continue
        is_cuda = tensor.device.type == "cuda"
        seen[base] = MemoryExtent(
            base,
            storage.nbytes(),
            max(tensor.get_device(), 0) if is_cuda else 0,
            MemoryKind.CUDA if is_cuda else MemoryKind.HOST,
        )
    return sorted(seen.values())


def resolve_kv_memory(
    kv_caches: Mapping[str, torch.Tensor],
    choice: AllocatorChoice,
    num_blocks: int,
    block_spans: BlockSpans | None = None,
    num_virtual_blocks: int | None = None,
) -> KVMemory:
    """The KV memory behind ``kv_caches`` for the configured ``allocator``.

    ``block_spans(b)`` gives the byte ranges of block ``b`` (all layers); with
    it, partly mapped host memory of unknown origin is described from the
    memory map instead of refused.
    """
    if not kv_caches:
        raise KVMemoryError("no KV cache tensors to register")
    storages = storage_extents(kv_caches)
    owners = {find_owner(s.base) for s in storages}
    owner = owners.pop() if len(owners) == 1 else None
    if choice is AllocatorChoice.VMM:
        if owner is None:
            raise KVMemoryError(
                "kv_connector_extra_config['allocator'] = 'vmm', but the KV tensors "
                f"(storages at {[hex(s.base) for s in storages]}) were not allocated "
                "by the elastic_nixl VMM allocator; set allocator to 'auto' or "
                "'static', or allocate the KV cache with "
                "elastic_nixl.vllm_seam.allocate_elastic_kv_cache"
            )
        return owner
    if choice is AllocatorChoice.AUTO and owner is not None:
        return owner
    if choice is AllocatorChoice.AUTO and storages[0].kind is MemoryKind.HOST:
        return _describe_host(storages, num_blocks, block_spans, num_virtual_blocks)
    if choice is AllocatorChoice.AUTO and storages[0].kind is MemoryKind.CUDA:
        return _describe_cuda(storages, num_blocks, block_spans, num_virtual_blocks)
    return StaticKVMemory(storages, num_blocks)


def _describe_cuda(
    storages: list[MemoryExtent],
    num_blocks: int,
    block_spans: BlockSpans | None,
    num_virtual_blocks: int | None,
) -> KVMemory:
    """cudaMalloc memory is static; VMM memory of unknown origin (kvcached,
    vLLM's cumem pool) is described from the driver's pointer attributes."""
    infos = [describe_cuda_pointer(s.base, device=s.device) for s in storages]
    if not any(i.is_vmm for i in infos):
        return StaticKVMemory(storages, num_blocks)
    if len(storages) != 1 or block_spans is None or num_virtual_blocks is None:
        raise KVMemoryError(
            f"KV storages {[hex(s.base) for s in storages]} are CUDA VMM memory of "
            "unknown origin spread over several reservations; elastic_nixl can "
            "describe one reservation. Use allocator='vmm' (elastic_nixl's "
            "allocator) or implement elastic_nixl.capabilities.KVMemory."
        )
    return DiscoveredCudaMemory(storages[0], block_spans, num_virtual_blocks)


def _describe_host(
    storages: list[MemoryExtent],
    num_blocks: int,
    block_spans: BlockSpans | None,
    num_virtual_blocks: int | None,
) -> KVMemory:
    """Static if every byte is mapped read-write; else described from the map."""
    entries = parse_proc_maps(read_self_maps())
    partial = []
    for s in storages:
        spans = accessible_extents(entries, s.base, s.end)
        if spans != [(s.base, s.end)]:
            partial.append((s, spans))
    if not partial:
        return StaticKVMemory(storages, num_blocks)
    s, spans = partial[0]
    if (
        len(storages) != 1
        or block_spans is None
        or num_virtual_blocks is None
        or not spans
    ):
        raise KVMemoryError(
            f"KV storage at {s.base:#x} (+{s.nbytes} bytes) is partly mapped "
            f"({len(spans)} read-write range(s) in /proc/self/maps) and its "
            "allocator implements no elastic_nixl KVMemory interface, so which "
            "blocks are usable cannot be known. Allocate the KV cache with the "
            "elastic_nixl VMM allocator (allocator='vmm') or implement "
            "elastic_nixl.capabilities.KVMemory for it."
        )
    return DiscoveredHostMemory(s, block_spans, num_virtual_blocks)
