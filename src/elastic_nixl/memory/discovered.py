"""KV memory whose owner implements nothing: read its mapped set from outside.

The base of :class:`~elastic_nixl.memory.host.DiscoveredHostMemory` (the
process's memory map) and :class:`~elastic_nixl.memory.cuda.DiscoveredCudaMemory`
(the CUDA driver's pointer attributes). Such memory announces no changes and
cannot pin blocks, so it is described, never trusted to stay put.
"""

from __future__ import annotations

import abc
import bisect
import threading
from collections.abc import Callable, Iterable, Sequence

from elastic_nixl.capabilities import (
    KVMemoryCapabilities,
    KVMemoryError,
    Lease,
    MappingListener,
    MemoryExtent,
)

BlockSpans = Callable[[int], list[tuple[int, int]]]


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
        block_spans: BlockSpans,
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
