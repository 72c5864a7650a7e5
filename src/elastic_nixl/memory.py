"""Which KV memory is behind vLLM's KV tensors.

Three answers, one interface (:class:`~elastic_nixl.capabilities.KVMemory`):

* the project's VMM allocator, found by address in the allocator registry;
* vLLM's own static buffer (:class:`StaticKVMemory`);
* host memory from an allocator that implements nothing, described from the
  process's memory map (:class:`DiscoveredHostMemory`).

Anything else is refused with a message saying what was found and what to
configure; nothing is guessed.
"""

from __future__ import annotations

import abc
import bisect
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from elastic_nixl.allocator.registry import find_owner
from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    ExportKind,
    KVMemory,
    KVMemoryCapabilities,
    KVMemoryError,
    Lease,
    MappingListener,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)
from elastic_nixl.config import AllocatorChoice

STATIC_HOST_CAPABILITIES = KVMemoryCapabilities(
    name="static",
    memory_kind=MemoryKind.HOST,
    layouts=ALL_KV_LAYOUTS,
    can_restride=True,
    stability=MappingStability.STATIC,
    export_kinds=frozenset({ExportKind.HOST}),
)
STATIC_CUDA_CAPABILITIES = KVMemoryCapabilities(
    name="static",
    memory_kind=MemoryKind.CUDA,
    layouts=ALL_KV_LAYOUTS,
    can_restride=True,
    stability=MappingStability.STATIC,
    export_kinds=frozenset({ExportKind.LEGACY_CUDA_IPC}),
)


@dataclass(frozen=True)
class _NoLease:
    block_ids: tuple[int, ...]

    def release(self) -> None:
        """Static memory is never unmapped: nothing to pin."""


class StaticKVMemory:
    """vLLM's own buffer: everything mapped, forever."""

    def __init__(self, extents: Sequence[MemoryExtent], num_blocks: int) -> None:
        if not extents:
            raise KVMemoryError("static KV memory needs at least one extent")
        self._extents = tuple(sorted(set(extents)))
        self._num_blocks = num_blocks
        kind = self._extents[0].kind
        self._caps = (
            STATIC_HOST_CAPABILITIES
            if kind is MemoryKind.HOST
            else STATIC_CUDA_CAPABILITIES
        )

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        return self._caps

    @property
    def reservation(self) -> MemoryExtent:
        first, last = self._extents[0], self._extents[-1]
        return MemoryExtent(first.base, last.end - first.base, first.device, first.kind)

    @property
    def num_virtual_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_mapped_blocks(self) -> int:
        return self._num_blocks

    @property
    def epoch(self) -> int:
        return 0

    def mapped_extents(self) -> tuple[MemoryExtent, ...]:
        return self._extents

    def unmapped_blocks(self, block_ids: Iterable[int]) -> list[int]:
        return [b for b in block_ids if not 0 <= b < self._num_blocks]

    def subscribe(self, listener: MappingListener) -> Callable[[], None]:
        return lambda: None

    def lease(self, block_ids: Sequence[int]) -> Lease:
        return _NoLease(tuple(block_ids))


# --------------------------------------------------------------------------
# Host memory from an allocator that implements nothing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MapsEntry:
    start: int
    end: int
    perms: str

    @property
    def accessible(self) -> bool:
        return self.perms[:2] == "rw"


def parse_proc_maps(text: str) -> list[MapsEntry]:
    """Parse ``/proc/<pid>/maps`` lines (``start-end perms ...``)."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        start_s, _, end_s = parts[0].partition("-")
        entries.append(MapsEntry(int(start_s, 16), int(end_s, 16), parts[1]))
    return entries


def accessible_extents(
    entries: Iterable[MapsEntry], lo: int, hi: int, page: int = 4096
) -> list[tuple[int, int]]:
    """Read-write ranges of ``[lo, hi)``, cut to pages, merged."""
    spans: list[tuple[int, int]] = []
    for e in sorted(entries, key=lambda e: e.start):
        if not e.accessible or e.end <= lo or e.start >= hi:
            continue
        start = max(e.start, lo)
        end = min(e.end, hi)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


class DiscoveredMemory(abc.ABC):
    """KV memory whose owner told us nothing: the mapped set is read from
    outside (the process's memory map, the CUDA driver) on :meth:`refresh`.

    The owner announces no changes, so the connector reads it at registration;
    blocks cannot be leased, since nothing stops the owner unmapping them
    under a transfer.
    """

    def __init__(
        self,
        span: MemoryExtent,
        block_spans: Callable[[int], list[tuple[int, int]]],
        num_virtual_blocks: int,
    ) -> None:
        self._span = span
        self._block_spans = block_spans
        self._num_virtual_blocks = num_virtual_blocks
        self._lock = threading.Lock()
        self._epoch = 0
        self._extents: tuple[MemoryExtent, ...] = ()
        self._bases: list[int] = []
        self.refresh()

    @abc.abstractmethod
    def _read_extents(self) -> tuple[MemoryExtent, ...]:
        """The mapped extents of the span, sorted by base."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> KVMemoryCapabilities: ...

    def refresh(self) -> bool:
        """Re-read the mapped set; True if it changed."""
        extents = self._read_extents()
        with self._lock:
            changed = extents != self._extents
            if changed:
                self._extents = extents
                self._bases = [e.base for e in extents]
                self._epoch += 1
            return changed

    @property
    def reservation(self) -> MemoryExtent:
        return self._span

    @property
    def num_virtual_blocks(self) -> int:
        return self._num_virtual_blocks

    @property
    def num_mapped_blocks(self) -> int:
        """O(virtual blocks): for reports, not for hot paths."""
        return self._num_virtual_blocks - len(
            self.unmapped_blocks(range(self._num_virtual_blocks))
        )

    @property
    def epoch(self) -> int:
        return self._epoch

    def mapped_extents(self) -> tuple[MemoryExtent, ...]:
        return self._extents

    def _covered(self, start: int, nbytes: int) -> bool:
        """Whether consecutive mapped extents cover ``[start, start + nbytes)``."""
        extents, bases = self._extents, self._bases
        i = bisect.bisect_right(bases, start) - 1
        pos, stop = start, start + nbytes
        while pos < stop:
            if i < 0 or i >= len(extents):
                return False
            e = extents[i]
            if not e.base <= pos < e.end:
                return False
            pos = e.end
            i += 1
        return True

    def unmapped_blocks(self, block_ids: Iterable[int]) -> list[int]:
        return [
            b
            for b in block_ids
            if not 0 <= b < self._num_virtual_blocks
            or not all(self._covered(s, n) for s, n in self._block_spans(b))
        ]

    def subscribe(self, listener: MappingListener) -> Callable[[], None]:
        return lambda: None

    def lease(self, block_ids: Sequence[int]) -> Lease:
        raise KVMemoryError(
            f"blocks of {self.capabilities.name} memory cannot be leased: its owner "
            "(e.g. kvcached or vLLM's cumem pool) does not implement "
            "elastic_nixl.capabilities.KVMemory, so nothing stops it unmapping "
            "blocks under a transfer; use allocator='vmm' or implement KVMemory "
            "for that allocator"
        )


class DiscoveredHostMemory(DiscoveredMemory):
    """Host KV memory of unknown origin, described from ``/proc/self/maps``."""

    def __init__(
        self,
        span: MemoryExtent,
        block_spans: Callable[[int], list[tuple[int, int]]],
        num_virtual_blocks: int,
        maps_reader: Callable[[], str] | None = None,
    ) -> None:
        self._read_maps = maps_reader or _read_self_maps
        super().__init__(span, block_spans, num_virtual_blocks)

    def _read_extents(self) -> tuple[MemoryExtent, ...]:
        spans = accessible_extents(
            parse_proc_maps(self._read_maps()), self._span.base, self._span.end
        )
        return tuple(MemoryExtent(b, e - b, 0, MemoryKind.HOST) for b, e in spans)

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        return KVMemoryCapabilities(
            name="discovered-host",
            memory_kind=MemoryKind.HOST,
            layouts=frozenset({"LBNHC"}),
            can_restride=False,
            stability=MappingStability.ELASTIC,
            export_kinds=frozenset({ExportKind.HOST}),
        )


def _read_self_maps() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------


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
    block_spans: Callable[[int], list[tuple[int, int]]] | None = None,
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
    block_spans: Callable[[int], list[tuple[int, int]]] | None,
    num_virtual_blocks: int | None,
) -> KVMemory:
    """cudaMalloc memory is static; VMM memory of unknown origin (kvcached,
    vLLM's cumem pool) is described from the driver's pointer attributes."""
    from elastic_nixl.cuda_discovery import DiscoveredCudaMemory, describe_cuda_pointer

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
    block_spans: Callable[[int], list[tuple[int, int]]] | None,
    num_virtual_blocks: int | None,
) -> KVMemory:
    """Static if every byte is mapped read-write; else described from the map."""
    entries = parse_proc_maps(_read_self_maps())
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
