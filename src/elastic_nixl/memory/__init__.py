"""What memory is behind vLLM's KV tensors.

``resolve_kv_memory`` answers with a :class:`~elastic_nixl.capabilities.KVMemory`:
elastic memory that registered itself (our allocator), vLLM's static buffer
(``static``), or memory of unknown origin described from outside: the
process's memory map (``host``) or the CUDA driver (``cuda``), on the common
base in ``discovered``.
"""

from elastic_nixl.memory.cuda import (
    CudaPointerInfo,
    DiscoveredCudaMemory,
    describe_cuda_pointer,
    discover_cuda_extents,
    export_kinds_of,
)
from elastic_nixl.memory.discovered import DiscoveredMemory
from elastic_nixl.memory.host import DiscoveredHostMemory, parse_proc_maps
from elastic_nixl.memory.resolve import resolve_kv_memory, storage_extents
from elastic_nixl.memory.static import StaticKVMemory

__all__ = [
    "CudaPointerInfo",
    "DiscoveredCudaMemory",
    "DiscoveredHostMemory",
    "DiscoveredMemory",
    "StaticKVMemory",
    "describe_cuda_pointer",
    "discover_cuda_extents",
    "export_kinds_of",
    "parse_proc_maps",
    "resolve_kv_memory",
    "storage_extents",
]
