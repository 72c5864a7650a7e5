"""What a memory backend gives the allocator: one reservation, mapped by chunk."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from elastic_nixl.capabilities import ExportKind, MemoryKind

if TYPE_CHECKING:
    import torch


class MemoryBackend(abc.ABC):
    """Where the bytes come from: one reservation, mapped chunk by chunk.

    Offsets are relative to the reservation base and multiples of
    ``granularity``; the allocator never maps a range twice or unmaps a range
    it did not map.

    A range is in one of three states. *Reserved*: never mapped; any access
    faults. *Mapped*: backed by memory, read-write. *Retired*: unmapped after
    being mapped; its memory is given back, writes fault, reads return zeros
    (backed by nothing, or by one shared zero page). Retired rather than
    reserved because NIXL cannot take back what it handed out: a peer that
    loaded our metadata keeps a key to memory we have since deregistered,
    and a read with it still reaches us (measured with nixl 1.5.1: under
    UCX's TCP transport such a read of deregistered ``PROT_NONE`` host memory
    kills the owner with SIGSEGV). A late read of a retired range reads zeros.
    """

    @property
    @abc.abstractmethod
    def granularity(self) -> int:
        """Smallest unit ``map``/``unmap`` accept; chunk sizes are multiples."""

    @property
    @abc.abstractmethod
    def memory_kind(self) -> MemoryKind: ...

    @property
    @abc.abstractmethod
    def device(self) -> int:
        """Device ordinal reported in extents (0 for host memory)."""

    @property
    @abc.abstractmethod
    def export_kinds(self) -> frozenset[ExportKind]: ...

    @abc.abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of address space with nothing mapped; the base."""

    @abc.abstractmethod
    def map(self, offset: int, nbytes: int) -> None:
        """Back ``[base+offset, +nbytes)`` with memory and make it accessible."""

    @abc.abstractmethod
    def unmap(self, offset: int, nbytes: int) -> None:
        """Give the memory back and retire the range: reads return zeros,
        writes fault, until it is mapped again."""

    def quiesce(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Wait until no in-flight work can touch memory about to be unmapped."""

    @abc.abstractmethod
    def free(self) -> None:
        """Unmap anything left and release the reservation; idempotent."""

    @abc.abstractmethod
    def tensor(self, nbytes: int, keepalive: object = None) -> torch.Tensor:
        """Flat int8 tensor over the first ``nbytes`` of the reservation,
        built without touching memory; holds ``keepalive`` while alive."""
