"""Sets of integers as sorted runs: the one interval type of the package.

Block ids, chunk indices and byte addresses all come in runs: a million-block
reservation with a few mapped regions is a few runs, not a million ids. The
allocator keeps its state this way, the connector merges registered extents
into coverage with it, and host-memory discovery merges ``/proc/self/maps``
ranges with it. Plain numpy, no vLLM, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
Span = tuple[int, int]  # (start, length): an extent of bytes or of ids

_INT64_MAX = np.iinfo(np.int64).max


def as_ids(values: Iterable[int] | npt.ArrayLike) -> IntArray:
    """Integers as a 1-D int64 array, refusing non-integers and values that do
    not fit in int64 (rather than letting them wrap)."""
    if isinstance(values, np.ndarray):
        arr = values
    elif isinstance(values, range):
        arr = np.arange(values.start, values.stop, values.step, np.int64)
    else:
        items = list(values)  # type: ignore[arg-type]
        if any(isinstance(v, bool) for v in items):
            raise TypeError("ids must be integers, got a bool")
        arr = np.asarray(items)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind == "O":
        raise TypeError("ids must be integers that fit in int64")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
        raise OverflowError(f"id {int(arr.max())} does not fit in int64")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


class Runs:
    """A set of integers as sorted, disjoint, non-touching runs ``[start, end)``.

    Block ids and chunk indices are kept this way so that ``grow_to(V)``, the
    mapped-block count and the chunk <-> block math cost O(runs).
    """

    __slots__ = ("ends", "starts")

    def __init__(self, starts: IntArray, ends: IntArray) -> None:
        # Internal: callers pass normalised runs (use the classmethods).
        self.starts = starts
        self.ends = ends

    @classmethod
    def empty(cls) -> Runs:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def range(cls, start: int, end: int) -> Runs:
        if end <= start:
            return cls.empty()
        return cls(np.array([start], np.int64), np.array([end], np.int64))

    @classmethod
    def from_ids(cls, ids: Iterable[int] | npt.ArrayLike) -> Runs:
        """The set of ``ids`` (any order, duplicates allowed)."""
        u = np.unique(as_ids(ids))
        if u.size == 0:
            return cls.empty()
        brk = np.flatnonzero(np.diff(u) != 1) + 1
        starts = u[np.concatenate(([0], brk))]
        ends = u[np.concatenate((brk - 1, [u.size - 1]))] + 1
        return cls(starts, ends)

    @classmethod
    def from_intervals(cls, starts: npt.ArrayLike, ends: npt.ArrayLike) -> Runs:
        """Union of arbitrary (overlapping, unsorted, maybe empty) intervals."""
        return coverage(np.asarray(starts, np.int64), np.asarray(ends, np.int64), 1)

    @classmethod
    def from_spans(cls, spans: Iterable[Span]) -> Runs:
        """Union of ``(start, length)`` spans; overlapping and abutting ones merge."""
        arr = np.asarray(spans if isinstance(spans, list) else list(spans), np.int64)
        if arr.size == 0:
            return cls.empty()
        return cls.from_intervals(arr[:, 0], arr[:, 0] + arr[:, 1])

    def __len__(self) -> int:
        return int(self.starts.size)

    @property
    def count(self) -> int:
        """How many integers the set holds."""
        return int((self.ends - self.starts).sum())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts.tolist(), self.ends.tolist(), strict=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Runs):
            return NotImplemented
        return bool(
            np.array_equal(self.starts, other.starts)
            and np.array_equal(self.ends, other.ends)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"[{s}, {e})" for s, e in list(self)[:8])
        more = f", ... ({len(self)} runs)" if len(self) > 8 else ""
        return f"Runs({shown}{more})"

    def ids(self) -> IntArray:
        """Every integer in the set, ascending (vectorised)."""
        lens = self.ends - self.starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        offsets = np.repeat(self.starts - (np.cumsum(lens) - lens), lens)
        return np.arange(total, dtype=np.int64) + offsets

    def spans(self) -> list[Span]:
        """The runs as ``(start, length)``."""
        return [(s, e - s) for s, e in self]

    def covers(self, starts: npt.ArrayLike, length: int) -> npt.NDArray[np.bool_]:
        """Elementwise: whether ``[start, start + length)`` lies inside one run."""
        arr = np.asarray(starts, np.int64)
        if self.starts.size == 0:
            return np.zeros(arr.shape, bool)
        i = np.searchsorted(self.starts, arr, "right") - 1
        safe = np.maximum(i, 0)
        return (i >= 0) & (arr + length <= self.ends[safe])

    def covers_ranges(
        self, starts: npt.ArrayLike, ends: npt.ArrayLike
    ) -> npt.NDArray[np.bool_]:
        """Elementwise: whether ``[start, end)`` lies inside one run (any shape;
        an empty range is covered)."""
        lo = np.asarray(starts, np.int64)
        hi = np.asarray(ends, np.int64)
        if self.starts.size == 0:
            return hi <= lo
        i = np.searchsorted(self.starts, lo, "right") - 1
        safe = np.maximum(i, 0)
        return (hi <= lo) | ((i >= 0) & (hi <= self.ends[safe]))

    def contains(self, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Elementwise membership of ``ids``."""
        arr = np.asarray(ids, np.int64)
        if self.starts.size == 0:
            return np.zeros(arr.shape, bool)
        i = np.searchsorted(self.starts, arr, "right") - 1
        return (i >= 0) & (arr < self.ends[np.maximum(i, 0)])

    def union(self, other: Runs) -> Runs:
        """Integers in either set."""
        if not other:
            return self
        if not self:
            return other
        return _combine(self, other, np.logical_or)

    def intersection(self, other: Runs) -> Runs:
        """Integers in both sets."""
        if not self or not other:
            return Runs.empty()
        return _combine(self, other, np.logical_and)

    def difference(self, other: Runs) -> Runs:
        """Integers in this set and not in ``other``."""
        if not self or not other:
            return self
        return _combine(self, other, lambda a, b: a & ~b)


def _runs_from_mask(xs: IntArray, selected: npt.NDArray[np.bool_]) -> Runs:
    """Runs from the elementary segments ``[xs[i], xs[i+1])`` marked selected."""
    if not selected.any():
        return Runs.empty()
    edges = np.diff(np.concatenate(([False], selected, [False])).astype(np.int8))
    return Runs(xs[np.flatnonzero(edges == 1)], xs[np.flatnonzero(edges == -1)])


def coverage(starts: IntArray, ends: IntArray, min_count: int) -> Runs:
    """Integers covered by at least ``min_count`` of the ``[start, end)`` intervals."""
    keep = starts < ends
    s = np.sort(starts[keep])
    e = np.sort(ends[keep])
    if s.size == 0:
        return Runs.empty()
    xs = np.unique(np.concatenate((s, e)))
    count = np.searchsorted(s, xs, "right") - np.searchsorted(e, xs, "right")
    return _runs_from_mask(xs, count[:-1] >= min_count)


def _combine(
    a: Runs,
    b: Runs,
    op: Callable[[npt.NDArray[np.bool_], npt.NDArray[np.bool_]], Any],
) -> Runs:
    xs = np.unique(np.concatenate((a.starts, a.ends, b.starts, b.ends)))
    in_a = np.searchsorted(a.starts, xs, "right") > np.searchsorted(a.ends, xs, "right")
    in_b = np.searchsorted(b.starts, xs, "right") > np.searchsorted(b.ends, xs, "right")
    return _runs_from_mask(xs, np.asarray(op(in_a, in_b))[:-1])
