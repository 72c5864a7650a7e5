"""The typed contract between a KV memory provider and the connector.

A *KV memory* is whatever backs vLLM's KV tensors: vLLM's own static buffer,
the project's VMM allocator, or memory discovered behind tensors from an
allocator that implements nothing. The connector asks it one set of questions
(what can you lay out, what is mapped, how can it be exported, tell me when
that changes, pin these blocks while I read them) and has one code path.

Follows the idiom of ``vllm/v1/kv_offload/base.py``: frozen dataclasses and
enums for data, an ABC-free ``Protocol`` for behaviour so third-party
allocators can implement it without importing us.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# vLLM's KVCacheLayout member names (vllm/v1/kv_cache_layout.py), the one
# list of layouts in the package. Kept as strings so this module imports
# without vLLM. A name spells the physical order of the logical axes of the
# 5D view: L(ayer), B(lock), H(ead), N (token in block), C(ontent).
KV_LAYOUT_AXES = "LBHNC"
ALL_KV_LAYOUTS: frozenset[str] = frozenset(
    {"LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"}
)
# What a tensor that cannot be re-strided gets: vLLM's default view order.
DEFAULT_KV_LAYOUT = "LBNHC"


def heads_inside_block(layout: str) -> bool:
    """Whether each layer's page of a block is one contiguous run.

    Args:
        layout: a ``KVCacheLayout`` name, e.g. ``"LBHNC"``.

    Returns:
        True when the head axis is inside both the layer and the block axes,
        so one descriptor covers a (layer, block) page.
    """
    return layout.index("H") > max(layout.index("L"), layout.index("B"))


# Layouts whose per-layer page is one run: what NIXL descriptors over
# elastic memory can cover (not LHBNC / BHLNC).
TRANSFERABLE_KV_LAYOUTS: frozenset[str] = frozenset(
    name for name in ALL_KV_LAYOUTS if heads_inside_block(name)
)


class MemoryKind(enum.Enum):
    """Where the bytes live."""

    HOST = "host"
    CUDA = "cuda"

    @property
    def nixl_mem_type(self) -> str:
        """NIXL's memory-type name for it: ``"DRAM"`` or ``"VRAM"``."""
        return "DRAM" if self is MemoryKind.HOST else "VRAM"


class ExportKind(enum.Enum):
    """How another process or a NIC can reach the memory."""

    HOST = "host"  # plain host memory: any transport can read it
    LEGACY_CUDA_IPC = "legacy_cuda_ipc"  # cudaMalloc: cuIpcGetMemHandle works
    POSIX_FD = "posix_fd"  # cuMemCreate with a POSIX file-descriptor handle
    FABRIC = "fabric"  # cuMemCreate with a fabric handle (IMEX / MNNVL)
    DMABUF = "dmabuf"  # exportable as a dma-buf (GPUDirect RDMA)
    NONE = "none"  # nothing known to export it


class MappingStability(enum.Enum):
    """Whether the set of mapped extents can change after registration."""

    STATIC = "static"  # mapped once, never remapped (cudaMalloc, torch.zeros)
    ELASTIC = "elastic"  # grows and shrinks; changes are announced as events


@dataclass(frozen=True, order=True)
class MemoryExtent:
    """One contiguous, mapped run of memory: the unit of NIXL registration."""

    base: int
    nbytes: int
    device: int = 0
    kind: MemoryKind = MemoryKind.HOST

    def __post_init__(self) -> None:
        if self.base < 0 or self.nbytes <= 0:
            raise ValueError(f"invalid extent base={self.base} nbytes={self.nbytes}")

    @property
    def end(self) -> int:
        """One past the last byte's address."""
        return self.base + self.nbytes

    def contains(self, addr: int, nbytes: int = 1) -> bool:
        """Whether ``[addr, addr + nbytes)`` lies wholly inside this extent.

        Args:
            addr: first byte's virtual address.
            nbytes: length of the range; 1 asks about one byte.
        """
        return self.base <= addr and addr + nbytes <= self.end


@dataclass(frozen=True)
class KVMemoryCapabilities:
    """What a provider can do, answerable at config time (before allocation).

    ``layouts`` are vLLM ``KVCacheLayout`` names the provider can hand vLLM
    views for. ``can_restride`` is False for tensors vLLM may not re-stride
    (``from_blob`` tensors: vLLM's permute fails with ``set_stride``).
    """

    name: str
    memory_kind: MemoryKind
    layouts: frozenset[str]
    can_restride: bool
    stability: MappingStability
    export_kinds: frozenset[ExportKind]

    def __post_init__(self) -> None:
        unknown = self.layouts - ALL_KV_LAYOUTS
        if unknown:
            raise ValueError(f"unknown KV layouts {sorted(unknown)}")
        if not self.layouts:
            raise ValueError("a KV memory provider must support one layout")


class MappingEventKind(enum.Enum):
    MAPPED = "mapped"  # after the pages are mapped: register them
    UNMAPPING = "unmapping"  # before the pages are unmapped: deregister now


@dataclass(frozen=True)
class MappingEvent:
    """A change of the mapped set, delivered synchronously to subscribers.

    ``UNMAPPING`` is delivered before the memory goes away, so a subscriber
    can deregister it while it is still valid.
    """

    kind: MappingEventKind
    extents: tuple[MemoryExtent, ...]
    epoch: int


MappingListener = Callable[[MappingEvent], None]


@runtime_checkable
class Lease(Protocol):
    """Blocks pinned mapped while a transfer uses them."""

    @property
    def block_ids(self) -> tuple[int, ...]: ...

    def release(self) -> None: ...


@runtime_checkable
class KVMemory(Protocol):
    """The questions the connector asks of the memory behind KV tensors."""

    @property
    def capabilities(self) -> KVMemoryCapabilities: ...

    @property
    def reservation(self) -> MemoryExtent:
        """The whole address range, mapped or not."""
        ...

    @property
    def num_virtual_blocks(self) -> int: ...

    @property
    def num_mapped_blocks(self) -> int: ...

    @property
    def epoch(self) -> int:
        """Bumped on every change of the mapped set."""
        ...

    def mapped_extents(self) -> tuple[MemoryExtent, ...]:
        """Mapped memory, one extent per registration unit, sorted by base."""
        ...

    def unmapped_blocks(self, block_ids: Iterable[int]) -> list[int]:
        """The ids among ``block_ids`` that are out of range or not mapped."""
        ...

    def subscribe(self, listener: MappingListener) -> Callable[[], None]:
        """Call ``listener`` on every mapping change; returns an unsubscribe."""
        ...

    def lease(self, block_ids: Sequence[int]) -> Lease:
        """Pin ``block_ids`` mapped until the lease is released."""
        ...


class KVMemoryError(RuntimeError):
    """KV memory cannot be described or used as asked; the message says why."""
