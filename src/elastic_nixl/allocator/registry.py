"""Process-wide "which allocator owns this address" lookup.

The connector gets vLLM's KV tensors, not our allocator; it asks the registry
for the allocator behind a tensor's data pointer, the way the CUDA driver
answers pointer attributes. Entries are weak: an allocator that is dropped
without ``close()`` disappears from lookups. No module-global flags.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elastic_nixl.allocator.core import VmmKVAllocator

_lock = threading.Lock()
# Parallel lists sorted by base: reservations never overlap (distinct VA).
_bases: list[int] = []
_ends: list[int] = []
_refs: list[weakref.ref[VmmKVAllocator]] = []


def _prune() -> None:
    """Drop entries whose allocator was garbage-collected (lock held)."""
    dead = [i for i, r in enumerate(_refs) if r() is None]
    for i in reversed(dead):
        del _bases[i], _ends[i], _refs[i]


def register(allocator: VmmKVAllocator) -> None:
    """Make ``allocator`` findable by any address in its reservation."""
    res = allocator.reservation
    with _lock:
        _prune()
        i = bisect.bisect_right(_bases, res.base)
        if (i > 0 and _ends[i - 1] > res.base) or (
            i < len(_bases) and _bases[i] < res.end
        ):
            raise ValueError(
                f"reservation 0x{res.base:x}+{res.nbytes} of {allocator.name!r} "
                f"overlaps one already registered"
            )
        _bases.insert(i, res.base)
        _ends.insert(i, res.end)
        _refs.insert(i, weakref.ref(allocator))


def unregister(allocator: VmmKVAllocator) -> None:
    """Forget ``allocator``; a no-op if it is not registered."""
    with _lock:
        for i, r in enumerate(_refs):
            if r() is allocator:
                del _bases[i], _ends[i], _refs[i]
                break
        _prune()


def find_owner(addr: int) -> VmmKVAllocator | None:
    """The live allocator whose reservation contains ``addr``, else None."""
    with _lock:
        i = bisect.bisect_right(_bases, addr) - 1
        if i < 0 or addr >= _ends[i]:
            return None
        return _refs[i]()


def registered() -> list[VmmKVAllocator]:
    """Live registered allocators, by base address."""
    with _lock:
        return [a for a in (r() for r in _refs) if a is not None]
