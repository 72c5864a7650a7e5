"""Process-wide "which elastic KV memory owns this address" lookup.

The connector gets vLLM's KV tensors, not our allocator; it asks the registry
for the memory behind a tensor's data pointer, the way the CUDA driver
answers pointer attributes. Entries are weak: memory that is dropped without
``close()`` disappears from lookups. The registry knows only the
:class:`~elastic_nixl.capabilities.KVMemory` contract, not the allocator.
"""

from __future__ import annotations

import bisect
import threading
import weakref

from elastic_nixl.capabilities import KVMemory

_lock = threading.Lock()
# Parallel lists sorted by base: reservations never overlap (distinct VA).
_bases: list[int] = []
_ends: list[int] = []
_refs: list[weakref.ref[KVMemory]] = []


def _prune() -> None:
    """Drop entries whose memory was garbage-collected (lock held)."""
    dead = [i for i, r in enumerate(_refs) if r() is None]
    for i in reversed(dead):
        del _bases[i], _ends[i], _refs[i]


def register(memory: KVMemory) -> None:
    """Make ``memory`` findable by any address in its reservation."""
    res = memory.reservation
    with _lock:
        _prune()
        i = bisect.bisect_right(_bases, res.base)
        if (i > 0 and _ends[i - 1] > res.base) or (
            i < len(_bases) and _bases[i] < res.end
        ):
            raise ValueError(
                f"reservation 0x{res.base:x}+{res.nbytes} of "
                f"{memory.capabilities.name!r} overlaps one already registered"
            )
        _bases.insert(i, res.base)
        _ends.insert(i, res.end)
        _refs.insert(i, weakref.ref(memory))


def unregister(memory: KVMemory) -> None:
    """Forget ``memory``; a no-op if it is not registered."""
    with _lock:
        for i, r in enumerate(_refs):
            if r() is memory:
                del _bases[i], _ends[i], _refs[i]
                break
        _prune()


def find_owner(addr: int) -> KVMemory | None:
    """The live memory whose reservation contains ``addr``, else None."""
    with _lock:
        i = bisect.bisect_right(_bases, addr) - 1
        if i < 0 or addr >= _ends[i]:
            return None
        return _refs[i]()


def registered() -> list[KVMemory]:
    """Live registered memories, by base address."""
    with _lock:
        return [m for m in (r() for r in _refs) if m is not None]
