"""How elastic KV memory is mapped: one core, a host backend and a CUDA VMM one.

``VmmKVAllocator`` reserves address space for ``V`` KV blocks in vLLM's
flat-buffer layout and maps physical memory on demand; it implements
:class:`elastic_nixl.capabilities.KVMemory`. ``find_owner(addr)`` tells which
elastic memory owns an address (how the connector finds it behind vLLM's KV
tensors). ``CudaBackend`` is importable without a GPU; constructing it needs
one.

Files: ``geometry`` (where a block's bytes sit, block <-> chunk math),
``backend`` (the backend ABC), ``core`` (the allocator), ``host`` / ``cuda``
(backends), ``dlpack`` (tensors over raw addresses), ``registry`` (owner
lookup by address).
"""

from elastic_nixl.allocator import registry
from elastic_nixl.allocator.backend import MemoryBackend
from elastic_nixl.allocator.core import BlockLease, VmmKVAllocator
from elastic_nixl.allocator.cuda import CudaBackend, CudaDriverError
from elastic_nixl.allocator.geometry import (
    BlockGeometry,
    blocks_in_chunk,
    chunks_for_blocks,
)
from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.allocator.registry import find_owner

__all__ = [
    "BlockGeometry",
    "BlockLease",
    "CudaBackend",
    "CudaDriverError",
    "HostBackend",
    "MemoryBackend",
    "VmmKVAllocator",
    "blocks_in_chunk",
    "chunks_for_blocks",
    "find_owner",
    "registry",
]
