"""Bounce slots in exportable memory, and the gather / scatter into them.

VMM memory (``cuMemCreate``) is not legacy-CUDA-IPC capable, so UCX's
``cuda_ipc`` lane cannot map it into a peer and NIXL silently falls back to
software emulation over TCP (~0.4 GB/s on H200 against ~200 GB/s for
``cudaMalloc`` memory, docs/gpu.md). Gathering scattered
blocks into a registered, exportable buffer runs at ~1.8 TB/s, so staging
costs a fraction of the link time and also turns per-block descriptors
(64 KiB for Llama-3-8B) into a few large ones.

A :class:`StagingBuffer` is ``slots`` fixed-size slots of ``slot_blocks``
blocks of every region. A chunk of ``n`` blocks is packed at the start of
its slot as ``[regions, n, page]``: one contiguous run, so one descriptor
moves a chunk whatever its size. :class:`BlockRows` addresses the KV memory
as rows of one page; a gather or scatter of a chunk is then one
``index_select`` / ``index_copy_`` over ``regions * n`` rows (the fast path of
torch's kernels: ~1.8 TB/s of payload for 32 KiB rows on H200), in the widest
integer type the page allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SlotGeometry:
    """Where slot ``s`` and the chunk packed in it live inside the buffer."""

    base: int
    num_layers: int
    slot_blocks: int
    page_bytes: int
    slots: int

    @property
    def slot_bytes(self) -> int:
        return self.num_layers * self.slot_blocks * self.page_bytes

    def chunk_bytes(self, num_blocks: int) -> int:
        """Bytes of a chunk of ``num_blocks`` blocks (every region)."""
        return self.num_layers * num_blocks * self.page_bytes

    def descriptors(self, slot: int, num_blocks: int, device: int) -> np.ndarray:
        """The one ``(addr, len, device)`` row of a chunk of ``num_blocks``."""
        if not 0 <= slot < self.slots or not 0 < num_blocks <= self.slot_blocks:
            raise ValueError(
                f"slot {slot} / {num_blocks} blocks outside {self.slots} slots of "
                f"{self.slot_blocks} blocks"
            )
        return np.array(
            [
                [
                    self.base + slot * self.slot_bytes,
                    self.chunk_bytes(num_blocks),
                    device,
                ]
            ],
            dtype=np.uint64,
        )

    def every_slot(self, device: int) -> np.ndarray:
        """The full-slot row of every slot: row ``s`` is slot ``s``."""
        return np.concatenate(
            [self.descriptors(s, self.slot_blocks, device) for s in range(self.slots)]
        )

    def every_chunk(self, device: int, max_blocks: int) -> np.ndarray:
        """A row for every chunk a slot can hold, up to ``max_blocks`` blocks:
        row :meth:`chunk_index` ``(s, n)`` is the chunk of ``n`` blocks in slot
        ``s`` (what a prepped descriptor list indexes, so no chunk size needs
        a descriptor list built per transfer)."""
        n = min(max_blocks, self.slot_blocks)
        rows = np.empty((self.slots * n, 3), dtype=np.uint64)
        starts = self.base + np.arange(self.slots, dtype=np.uint64) * self.slot_bytes
        sizes = np.arange(1, n + 1, dtype=np.uint64) * self.chunk_bytes(1)
        rows[:, 0] = np.repeat(starts, n)
        rows[:, 1] = np.tile(sizes, self.slots)
        rows[:, 2] = device
        return rows

    @staticmethod
    def chunk_index(slot: int, num_blocks: int, max_blocks: int) -> int:
        """The row of the chunk of ``num_blocks`` in ``slot`` in :meth:`every_chunk`."""
        return slot * max_blocks + num_blocks - 1


def _widest(page_bytes: int, *addresses: int) -> torch.dtype:
    """The widest integer type that tiles a page and every address given."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if page_bytes % size == 0 and all(a % size == 0 for a in addresses):
            return dtype
    return torch.uint8


class BlockRows:
    """KV memory as rows of one page: row ``(r, b)`` is block ``b`` of region
    ``r``.

    When the regions share one storage at page-multiple offsets with one
    page-multiple block stride (every layout our allocator and vLLM's flat
    buffer produce), the rows are one 2-D view and a chunk is one kernel;
    otherwise one view per region, one kernel each.
    """

    def __init__(self, region_views: Sequence[torch.Tensor]) -> None:
        views = [as_bytes(v) for v in region_views]
        if not views or any(v.ndim != 2 for v in views):
            raise ValueError("region views must be [num_blocks, page] tensors")
        pages = {int(v.shape[1]) for v in views}
        if len(pages) != 1:
            raise NotImplementedError(
                f"staged transfers need one page size across KV regions; got "
                f"{sorted(pages)} bytes"
            )
        self.page = pages.pop()
        self.num_regions = len(views)
        self.num_blocks = min(int(v.shape[0]) for v in views)
        self.device = views[0].device
        first = views[0]
        base = first.data_ptr()
        strides = {v.stride(0) for v in views}
        offsets = [v.data_ptr() - base for v in views]
        one_storage = all(
            v.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and v.stride(1) == 1
            for v in views
        )
        stride = strides.pop() if len(strides) == 1 else 0
        self.dtype = _widest(
            self.page, *[v.data_ptr() for v in views], *[v.stride(0) for v in views]
        )
        width = self.page // torch.tensor([], dtype=self.dtype).element_size()
        self.width = width
        self._rows: torch.Tensor | None = None
        if (
            one_storage
            and stride > 0
            and stride % self.page == 0
            and all(o >= 0 and o % self.page == 0 for o in offsets)
        ):
            block_rows = stride // self.page
            row_off = [o // self.page for o in offsets]
            nrows = max(
                off + (int(v.shape[0]) - 1) * block_rows + 1
                for off, v in zip(row_off, views, strict=True)
            )
            storage = first.untyped_storage()
            self._rows = (
                torch.empty(0, dtype=torch.uint8, device=self.device)
                .set_(
                    storage,
                    base - storage.data_ptr(),
                    (nrows, self.page),
                    (self.page, 1),
                )
                .view(self.dtype)
            )
            self._block_rows = block_rows
            self._row_offsets = np.asarray(row_off, dtype=np.int64)
        self._views = [v.view(self.dtype) for v in views]

    @property
    def one_kernel(self) -> bool:
        """Whether a chunk moves in one kernel (one 2-D row view)."""
        return self._rows is not None

    def index_size(self, num_blocks: int) -> int:
        """Entries of :meth:`index` for ``num_blocks`` blocks."""
        return num_blocks * (self.num_regions if self._rows is not None else 1)

    def index(self, block_ids: Sequence[int]) -> np.ndarray:
        """What a gather or scatter of ``block_ids`` indexes, computed on the
        host (so the device runs one copy and one kernel): the row of each
        (region, block), region-major, or the block ids themselves when there
        is one view per region."""
        ids = np.asarray(block_ids, dtype=np.int64)
        if self._rows is None:
            return ids
        return (self._row_offsets[:, None] + ids[None, :] * self._block_rows).ravel()

    def gather(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """Copy what ``index`` names into ``out`` ``[regions * n, width]``."""
        if self._rows is not None:
            torch.index_select(self._rows, 0, index, out=out)
            return
        n = int(index.numel())
        for r, view in enumerate(self._views):
            torch.index_select(view, 0, index, out=out[r * n : (r + 1) * n])

    def scatter(self, index: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` ``[regions * n, width]`` to what ``index`` names."""
        if self._rows is not None:
            self._rows.index_copy_(0, index, src)
            return
        n = int(index.numel())
        for r, view in enumerate(self._views):
            view.index_copy_(0, index, src[r * n : (r + 1) * n])


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
        self.buffer = torch.empty(
            (slots, num_layers * slot_blocks * page_bytes),
            dtype=torch.uint8,
            device=device,
        )
        self.geometry = SlotGeometry(
            self.buffer.data_ptr(), num_layers, slot_blocks, page_bytes, slots
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def chunk(self, slot: int, num_blocks: int, rows: BlockRows) -> torch.Tensor:
        """The packed chunk of ``num_blocks`` in ``slot`` as ``rows`` rows."""
        n = self.geometry.chunk_bytes(num_blocks)
        return self.buffer[slot, :n].view(rows.dtype).view(-1, rows.width)

    def gather(
        self, rows: BlockRows, index: torch.Tensor, slot: int, num_blocks: int
    ) -> None:
        """Copy ``num_blocks`` blocks of every region (``rows.index`` of their
        ids) into ``slot``, packed. Any memory the GPU can read works, VMM
        included."""
        rows.gather(index, self.chunk(slot, num_blocks, rows))

    def scatter(
        self, rows: BlockRows, index: torch.Tensor, slot: int, num_blocks: int
    ) -> None:
        """Copy the chunk in ``slot`` into the blocks ``index`` names."""
        rows.scatter(index, self.chunk(slot, num_blocks, rows))


def as_bytes(blocks: torch.Tensor) -> torch.Tensor:
    """A tensor viewed as bytes (``uint8``; views share memory)."""
    return blocks if blocks.dtype == torch.uint8 else blocks.view(torch.uint8)


def chunk_ids(block_ids: Sequence[int], slot_blocks: int) -> list[list[int]]:
    """Split a request's block ids into slot-sized chunks, in order."""
    ids = list(block_ids)
    return [ids[i : i + slot_blocks] for i in range(0, len(ids), slot_blocks)]
