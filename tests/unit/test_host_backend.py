"""The host backend really reserves, faults, and gives memory back."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import elastic_nixl
from elastic_nixl.allocator import BlockGeometry, HostBackend, VmmKVAllocator
from elastic_nixl.capabilities import KVMemoryError

PAGE = 4096
MiB = 1 << 20
SRC = str(Path(elastic_nixl.__file__).resolve().parents[1])


def smaps_rss(lo: int, hi: int) -> int:
    """Resident bytes of this process's mappings overlapping ``[lo, hi)``.

    A neighbouring mapping with identical flags may merge with ours, so
    callers allow some slack; ``resident_bytes`` (mincore) is exact.
    """
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and lo < end
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def rollup_rss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss in smaps_rollup")


def protections(lo: int, hi: int) -> list[tuple[int, int, str]]:
    """(start, end, perms) of /proc/self/maps entries, clipped to ``[lo, hi)``."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            start, end = (int(x, 16) for x in rng.split("-"))
            if start < hi and lo < end:
                out.append((max(start, lo) - lo, min(end, hi) - lo, perms))
    return out


def test_reservation_is_prot_none_and_chunks_become_rw() -> None:
    with VmmKVAllocator(
        HostBackend(), BlockGeometry.layer_outermost(PAGE, 1, 16), 16, 2 * PAGE
    ) as a:
        lo, hi = a.reservation.base, a.reservation.end
        assert protections(lo, hi) == [(0, 16 * PAGE, "---p")]
        a.map_blocks([4, 5])
        assert protections(lo, hi) == [
            (0, 4 * PAGE, "---p"),
            (4 * PAGE, 6 * PAGE, "rw-p"),
            (6 * PAGE, 16 * PAGE, "---p"),
        ]
        a.shrink_to(0)
        # Never mapped: no access. Mapped once: retired, read-only zeros.
        assert protections(lo, hi) == [
            (0, 4 * PAGE, "---p"),
            (4 * PAGE, 6 * PAGE, "r--p"),
            (6 * PAGE, 16 * PAGE, "---p"),
        ]


def test_shrink_gives_memory_back() -> None:
    chunk = 1 * MiB
    g = BlockGeometry.layer_outermost(64 * 1024, 1, 512)  # 32 MiB
    with VmmKVAllocator(HostBackend(), g, 512, chunk, name="rss") as a:
        backend = a.backend
        assert isinstance(backend, HostBackend)
        lo, hi = a.reservation.base, a.reservation.end
        before = rollup_rss()
        a.grow_to(512)
        assert backend.resident_bytes() == 0  # mapped but untouched: no memory yet
        assert smaps_rss(lo, hi) < MiB
        ctypes.memset(lo, 1, 32 * MiB)
        assert backend.resident_bytes() == 32 * MiB
        assert abs(smaps_rss(lo, hi) - 32 * MiB) < MiB
        assert rollup_rss() - before >= 30 * MiB
        a.shrink_to(128)  # keep 8 MiB
        assert backend.resident_bytes() == 8 * MiB
        assert abs(smaps_rss(lo, hi) - 8 * MiB) < MiB
        assert rollup_rss() - before <= 10 * MiB


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import ctypes, sys
        from elastic_nixl.allocator import BlockGeometry, VmmKVAllocator
        from elastic_nixl.allocator.host import HostBackend
        a = VmmKVAllocator(HostBackend(), BlockGeometry.layer_outermost(4096, 1, 8), 8)
        base = a.reservation.base
        """
    ) + textwrap.dedent(body)
    env = dict(
        os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("PYTHONFAULTHANDLER", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_touching_unmapped_memory_segfaults() -> None:
    proc = run_child(
        """
        a.grow_to(1)
        ctypes.c_int8.from_address(base).value = 1
        print("mapped ok", flush=True)
        ctypes.c_int8.from_address(base + 4096).value = 1
        print("no fault", flush=True)
        """
    )
    assert proc.stdout == "mapped ok\n", proc.stderr
    assert proc.returncode == -signal.SIGSEGV, proc.stderr


def test_unmapped_memory_is_retired_zero_reads_and_faulting_writes() -> None:
    """After unmap the bytes are gone (reads see zeros) and a write faults."""
    proc = run_child(
        """
        a.grow_to(2)
        ctypes.c_int8.from_address(base + 4096).value = 7
        a.shrink_to(1)
        print(ctypes.c_int8.from_address(base).value, flush=True)
        print(ctypes.c_int8.from_address(base + 4096).value, flush=True)
        ctypes.c_int8.from_address(base + 4096).value = 1
        print("no fault", flush=True)
        """
    )
    assert proc.stdout == "0\n0\n", proc.stderr
    assert proc.returncode == -signal.SIGSEGV, proc.stderr


def test_backend_refuses_bad_ranges() -> None:
    b = HostBackend()
    assert b.granularity == os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(KVMemoryError, match="nothing reserved"):
        b.map(0, PAGE)
    with pytest.raises(KVMemoryError, match="not a positive multiple"):
        b.reserve(PAGE + 1)
    b.reserve(4 * PAGE)
    try:
        with pytest.raises(KVMemoryError, match="already holds"):
            b.reserve(PAGE)
        with pytest.raises(KVMemoryError, match="outside the reservation"):
            b.map(3 * PAGE, 2 * PAGE)
        with pytest.raises(KVMemoryError, match="not aligned"):
            b.map(100, PAGE)
        b.map(PAGE, PAGE)
        assert b.resident_bytes() == 0
        ctypes.c_int8.from_address(b.base + PAGE).value = 1
        assert b.resident_bytes() == PAGE
        b.unmap(PAGE, PAGE)
        assert b.resident_bytes() == 0
    finally:
        b.free()
    b.free()  # idempotent
    assert b.base == 0
