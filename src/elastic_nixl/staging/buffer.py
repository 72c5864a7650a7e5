"""Bounce slots in exportable memory, and the gather / scatter into them.

VMM memory (``cuMemCreate``) is not legacy-CUDA-IPC capable, so UCX's
``cuda_ipc`` lane cannot map it into a peer and NIXL silently falls back to
software emulation over TCP (~0.4 GB/s on H200 against ~200 GB/s for
``cudaMalloc`` memory, ``../shared/device/RESULTS.md``). Gathering scattered
blocks into a registered, exportable buffer runs at ~1.8 TB/s, so staging
costs a fraction of the link time and also turns per-block descriptors
(64 KiB for Llama-3-8B) into a few large ones.

A :class:`StagingBuffer` is ``slots`` fixed-size slots of ``slot_blocks``
blocks each, per layer: slot ``s`` holds, for layer ``l``, a contiguous run
``[slot_blocks, page]``. One descriptor per layer per slot moves a whole slot.
Used on the passive side (gather before the peer reads) and on the active
side (read into a slot, then scatter), pipelined over slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SlotGeometry:
    """Where layer ``l`` of slot ``s`` lives inside the staging buffer."""

    base: int
    num_layers: int
    slot_blocks: int
    page_bytes: int
    slots: int

    @property
    def layer_bytes(self) -> int:
        return self.slot_blocks * self.page_bytes

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def descriptors(self, slot: int, num_blocks: int, device: int) -> np.ndarray:
        """One ``(addr, len, device)`` row per layer for the first blocks of a slot."""
        if not 0 <= slot < self.slots or not 0 < num_blocks <= self.slot_blocks:
            raise ValueError(
                f"slot {slot} / {num_blocks} blocks outside {self.slots} slots of "
                f"{self.slot_blocks} blocks"
            )
        rows = np.empty((self.num_layers, 3), dtype=np.uint64)
        start = self.base + slot * self.slot_bytes
        rows[:, 0] = (
            start + np.arange(self.num_layers, dtype=np.uint64) * self.layer_bytes
        )
        rows[:, 1] = num_blocks * self.page_bytes
        rows[:, 2] = device
        return rows

    def every_slot(self, device: int) -> np.ndarray:
        """Whole-slot rows of every slot, slot-major: slot ``s``, layer ``l`` is
        row ``s * num_layers + l`` (what a prepped descriptor list indexes)."""
        return np.concatenate(
            [self.descriptors(s, self.slot_blocks, device) for s in range(self.slots)]
        )


class StagingBuffer:
    """Bounce slots in exportable memory (``cudaMalloc`` via torch on CUDA)."""

    def __init__(
        self,
        num_layers: int,
        page_bytes: int,
        slot_blocks: int,
        slots: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if page_bytes % 2:
            raise ValueError(f"page_bytes must be even, got {page_bytes}")
        self.buffer = torch.empty(
            (slots, num_layers, slot_blocks, page_bytes),
            dtype=torch.uint8,
            device=device,
        )
        self.geometry = SlotGeometry(
            self.buffer.data_ptr(), num_layers, slot_blocks, page_bytes, slots
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def gather(
        self,
        layer_blocks: Sequence[torch.Tensor] | torch.Tensor,
        block_ids: torch.Tensor,
        slot: int,
    ) -> None:
        """Copy blocks ``block_ids`` of every layer into ``slot``.

        ``layer_blocks`` is either every layer's KV as one ``[L, num_blocks,
        page]`` byte tensor (layers a constant stride apart: one kernel), or a
        sequence of per-layer ``[num_blocks, page]`` views (one kernel each).
        Any memory the GPU can read works, VMM included.
        """
        n = int(block_ids.numel())
        dst = self.buffer[slot]
        if isinstance(layer_blocks, torch.Tensor):
            out = dst[:, :n]
            if out.is_contiguous():
                torch.index_select(as_bytes(layer_blocks), 1, block_ids, out=out)
            else:
                out.copy_(torch.index_select(as_bytes(layer_blocks), 1, block_ids))
            return
        for layer, blocks in enumerate(layer_blocks):
            torch.index_select(as_bytes(blocks), 0, block_ids, out=dst[layer, :n])

    def scatter(
        self,
        layer_blocks: Sequence[torch.Tensor] | torch.Tensor,
        block_ids: torch.Tensor,
        slot: int,
    ) -> None:
        """Copy ``slot`` back into blocks ``block_ids`` of every layer."""
        n = int(block_ids.numel())
        src = self.buffer[slot]
        if isinstance(layer_blocks, torch.Tensor):
            as_bytes(layer_blocks).index_copy_(1, block_ids, src[:, :n])
            return
        for layer, blocks in enumerate(layer_blocks):
            as_bytes(blocks).index_copy_(0, block_ids, src[layer, :n])


def as_bytes(blocks: torch.Tensor) -> torch.Tensor:
    """A tensor viewed as bytes (``uint8``; views share memory)."""
    return blocks if blocks.dtype == torch.uint8 else blocks.view(torch.uint8)


def chunk_ids(block_ids: Sequence[int], slot_blocks: int) -> list[list[int]]:
    """Split a request's block ids into slot-sized chunks, in order."""
    ids = list(block_ids)
    return [ids[i : i + slot_blocks] for i in range(0, len(ids), slot_blocks)]
