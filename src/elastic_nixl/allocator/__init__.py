"""The elastic KV allocator: one core, a host backend and a CUDA VMM backend.

``VmmKVAllocator`` reserves address space for ``V`` KV blocks in vLLM's
flat-buffer layout and maps physical memory on demand; it implements
``elastic_nixl.capabilities.KVMemory``. ``registry.find_owner(addr)`` tells
which allocator owns an address (how the connector finds it behind vLLM's KV
tensors). ``CudaBackend`` is importable without a GPU; constructing it needs
one.
"""

from elastic_nixl.allocator import registry
from elastic_nixl.allocator.core import (
    BlockGeometry,
    BlockLease,
    MemoryBackend,
    Runs,
    VmmKVAllocator,
    blocks_in_chunk,
    chunks_for_blocks,
)
from elastic_nixl.allocator.cuda import CudaBackend, CudaDriverError
from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.allocator.registry import find_owner

__all__ = [
    "BlockGeometry",
    "BlockLease",
    "CudaBackend",
    "CudaDriverError",
    "HostBackend",
    "MemoryBackend",
    "Runs",
    "VmmKVAllocator",
    "blocks_in_chunk",
    "chunks_for_blocks",
    "find_owner",
    "registry",
]
