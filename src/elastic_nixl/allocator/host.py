"""Host-memory backend with CUDA-VMM semantics.

The reservation is ``mmap(PROT_NONE, MAP_NORESERVE)``: address space only,
no memory, and touching it faults (SIGSEGV), exactly like touching an
unmapped VMM range on a GPU. Mapping a chunk is ``mprotect(READ|WRITE)``;
unmapping is ``madvise(MADV_DONTNEED)`` (the pages really go back to the
kernel) then ``mprotect(PROT_READ)``: the chunk is *retired*, so writes fault
and reads see the kernel's zero page, which costs no memory. A peer holding a
NIXL key to the chunk from before (a read that arrives after its lease
expired) reads zeros instead of killing this process: deregistering memory
does not revoke those keys (see :class:`~elastic_nixl.allocator.backend.MemoryBackend`).
This lets CPU-only machines run the allocator and NIXL's DRAM path for real.

Python's ``mmap`` module cannot map ``PROT_NONE`` or expose a raw address,
so the calls go through libc with ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from typing import TYPE_CHECKING

from elastic_nixl.allocator.backend import MemoryBackend
from elastic_nixl.allocator.dlpack import DL_CPU, dlpack_tensor
from elastic_nixl.capabilities import ExportKind, KVMemoryError, MemoryKind

if TYPE_CHECKING:
    import torch

PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    for fn in (libc.munmap, libc.mprotect, libc.madvise, libc.mincore):
        fn.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_ubyte),
    ]
    return libc


class HostBackend(MemoryBackend):
    """Anonymous private host memory, reserved ``PROT_NONE``, mapped by chunk."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise KVMemoryError(
                "HostBackend needs Linux mmap/madvise semantics; "
                f"this is {sys.platform}"
            )
        self._libc = _libc()
        self._page = mmap.PAGESIZE
        self._base = 0
        self._nbytes = 0

    @property
    def granularity(self) -> int:
        return self._page

    @property
    def memory_kind(self) -> MemoryKind:
        return MemoryKind.HOST

    @property
    def device(self) -> int:
        return 0

    @property
    def export_kinds(self) -> frozenset[ExportKind]:
        return frozenset({ExportKind.HOST})

    @property
    def base(self) -> int:
        return self._base

    def _fail(self, call: str) -> KVMemoryError:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.ENOMEM and call.startswith("mprotect"):
            hint = (
                " (each mapped/unmapped boundary splits a kernel mapping; with "
                "many scattered chunks vm.max_map_count may be exhausted: use "
                "larger chunk_bytes or raise vm.max_map_count)"
            )
        return KVMemoryError(f"{call} failed: {os.strerror(err)} [errno {err}]{hint}")

    def _range(self, offset: int, nbytes: int) -> int:
        if not self._base:
            raise KVMemoryError("HostBackend: nothing reserved (call reserve first)")
        if offset < 0 or nbytes <= 0 or offset + nbytes > self._nbytes:
            raise KVMemoryError(
                f"HostBackend: range [{offset}, {offset + nbytes}) is outside the "
                f"reservation of {self._nbytes} bytes"
            )
        if offset % self._page or nbytes % self._page:
            raise KVMemoryError(
                f"HostBackend: range [{offset}, +{nbytes}) is not aligned to the "
                f"{self._page}-byte page"
            )
        return self._base + offset

    def reserve(self, nbytes: int) -> int:
        if self._base:
            raise KVMemoryError("HostBackend: already holds a reservation")
        if nbytes <= 0 or nbytes % self._page:
            raise KVMemoryError(
                f"HostBackend: reservation size {nbytes} is not a positive multiple "
                f"of the {self._page}-byte page"
            )
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
        addr = self._libc.mmap(None, nbytes, PROT_NONE, flags, -1, 0)
        if addr is None or addr == _MAP_FAILED:
            raise self._fail(f"mmap({nbytes}, PROT_NONE, MAP_NORESERVE)")
        self._base = int(addr)
        self._nbytes = nbytes
        return self._base

    def map(self, offset: int, nbytes: int) -> None:
        addr = self._range(offset, nbytes)
        if self._libc.mprotect(addr, nbytes, PROT_READ | PROT_WRITE):
            raise self._fail(f"mprotect(0x{addr:x}, {nbytes}, PROT_READ|PROT_WRITE)")

    def unmap(self, offset: int, nbytes: int) -> None:
        addr = self._range(offset, nbytes)
        if self._libc.madvise(addr, nbytes, MADV_DONTNEED):
            raise self._fail(f"madvise(0x{addr:x}, {nbytes}, MADV_DONTNEED)")
        if self._libc.mprotect(addr, nbytes, PROT_READ):
            raise self._fail(f"mprotect(0x{addr:x}, {nbytes}, PROT_READ)")

    def resident_bytes(self, offset: int = 0, nbytes: int | None = None) -> int:
        """Bytes of ``[offset, +nbytes)`` resident in RAM (``mincore``)."""
        if nbytes is None:
            nbytes = self._nbytes - offset
        addr = self._range(offset, nbytes)
        pages = -(-nbytes // self._page)
        vec = (ctypes.c_ubyte * pages)()
        if self._libc.mincore(addr, nbytes, vec):
            raise self._fail(f"mincore(0x{addr:x}, {nbytes})")
        return sum(v & 1 for v in vec) * self._page

    def free(self) -> None:
        if not self._base:
            return
        addr, n = self._base, self._nbytes
        if self._libc.munmap(addr, n):
            raise self._fail(f"munmap(0x{addr:x}, {n})")
        self._base = 0
        self._nbytes = 0

    def tensor(self, nbytes: int, keepalive: object = None) -> torch.Tensor:
        if not self._base or not 0 < nbytes <= self._nbytes:
            raise KVMemoryError(
                f"HostBackend: cannot view {nbytes} bytes of a {self._nbytes}-byte "
                "reservation"
            )
        return dlpack_tensor(self._base, nbytes, DL_CPU, 0, keepalive)

    def __repr__(self) -> str:
        return f"HostBackend(base=0x{self._base:x}, nbytes={self._nbytes})"
