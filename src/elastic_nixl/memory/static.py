"""vLLM's own KV buffer as :class:`~elastic_nixl.capabilities.KVMemory`:
everything mapped, forever, so the connector needs one code path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from elastic_nixl.capabilities import (
    ALL_KV_LAYOUTS,
    ExportKind,
    KVMemoryCapabilities,
    KVMemoryError,
    Lease,
    MappingListener,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)

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
        """A lease on ``block_ids`` (nothing to pin); ``KVMemoryError`` naming
        the first id outside ``[0, num_blocks)``, as the elastic allocator
        refuses one, so no caller touches memory beyond vLLM's buffer."""
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((ids < 0) | (ids >= self._num_blocks))
        if bad.size:
            more = f" ({bad.size} ids out of range)" if bad.size > 1 else ""
            raise KVMemoryError(
                f"cannot lease block {int(ids[bad[0]])} of static KV memory: it is "
                f"out of range [0, {self._num_blocks}){more}; a peer or request "
                "named a block this engine does not have"
            )
        return _NoLease(tuple(ids.tolist()))
