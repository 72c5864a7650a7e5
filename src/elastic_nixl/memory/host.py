"""Host KV memory of unknown origin, described from ``/proc/self/maps``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from elastic_nixl.capabilities import (
    ExportKind,
    KVMemoryCapabilities,
    MappingStability,
    MemoryExtent,
    MemoryKind,
)
from elastic_nixl.memory.discovered import BlockSpans, DiscoveredMemory
from elastic_nixl.runs import Runs


@dataclass(frozen=True)
class MapsEntry:
    start: int
    end: int
    perms: str

    @property
    def accessible(self) -> bool:
        return self.perms[:2] == "rw"


def parse_proc_maps(text: str) -> list[MapsEntry]:
    """Parse ``/proc/<pid>/maps`` lines (``start-end perms ...``)."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        start_s, _, end_s = parts[0].partition("-")
        entries.append(MapsEntry(int(start_s, 16), int(end_s, 16), parts[1]))
    return entries


def accessible_extents(
    entries: Iterable[MapsEntry], lo: int, hi: int
) -> list[tuple[int, int]]:
    """Read-write ranges ``(start, end)`` of ``[lo, hi)``, merged."""
    rw = Runs.from_intervals(
        [e.start for e in entries if e.accessible],
        [e.end for e in entries if e.accessible],
    ).intersection(Runs.range(lo, hi))
    return list(rw)


class DiscoveredHostMemory(DiscoveredMemory):
    """Host KV memory of unknown origin, described from ``/proc/self/maps``."""

    def __init__(
        self,
        span: MemoryExtent,
        block_spans: BlockSpans,
        num_virtual_blocks: int,
        maps_reader: Callable[[], str] | None = None,
    ) -> None:
        self._read_maps = maps_reader or read_self_maps
        super().__init__(span, block_spans, num_virtual_blocks)

    def _read_extents(self) -> tuple[MemoryExtent, ...]:
        spans = accessible_extents(
            parse_proc_maps(self._read_maps()), self._span.base, self._span.end
        )
        return tuple(MemoryExtent(b, e - b, 0, MemoryKind.HOST) for b, e in spans)

    @property
    def capabilities(self) -> KVMemoryCapabilities:
        return KVMemoryCapabilities(
            name="discovered-host",
            memory_kind=MemoryKind.HOST,
            layouts=frozenset({"LBNHC"}),
            can_restride=False,
            stability=MappingStability.ELASTIC,
            export_kinds=frozenset({ExportKind.HOST}),
        )


def read_self_maps() -> str:
    with open("/proc/self/maps") as f:
        return f.read()
