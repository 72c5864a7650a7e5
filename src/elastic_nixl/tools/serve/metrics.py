"""vLLM's own KV-transfer metrics, read from a server.

vLLM 0.32's NIXL connector (``nixl/stats.py``) records, on the side that
posts the reads (the decode), per transfer: ``transfer_duration`` (NIXL
telemetry: post to completion seen), ``post_duration``, bytes and
descriptors, plus failure counters. They reach two places:

- the ``/metrics`` Prometheus page: histograms
  ``vllm:nixl_xfer_time_seconds``, ``vllm:nixl_post_time_seconds``,
  ``vllm:nixl_bytes_transferred``, ``vllm:nixl_num_descriptors`` and
  counters ``vllm:nixl_num_failed_transfers``,
  ``vllm:nixl_num_failed_notifications``, ``vllm:nixl_num_kv_expired_reqs``
  (a producer's), ``vllm:nixl_num_notifications_after_expiry``;
- a log line every logging interval: ``KV Transfer metrics: Num successful
  transfers=3, Avg xfer time (ms)=..., P90 xfer time (ms)=..., ...``.

:class:`NixlMetrics` is a snapshot of the first; deltas between two
snapshots describe a run. :func:`transfer_log_lines` reads the second.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')

XFER_TIME = "vllm:nixl_xfer_time_seconds"
POST_TIME = "vllm:nixl_post_time_seconds"
BYTES = "vllm:nixl_bytes_transferred"
DESCRIPTORS = "vllm:nixl_num_descriptors"
COUNTERS = (
    "vllm:nixl_num_failed_transfers",
    "vllm:nixl_num_failed_notifications",
    "vllm:nixl_num_kv_expired_reqs",
    "vllm:nixl_num_notifications_after_expiry",
)


@dataclass
class Histogram:
    """One Prometheus histogram, summed over label sets."""

    count: float = 0.0
    total: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative

    def minus(self, other: Histogram) -> Histogram:
        return Histogram(
            self.count - other.count,
            self.total - other.total,
            {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding quantile ``q``;
        ``inf`` when it lies beyond the last finite bucket (vLLM's transfer
        time histogram ends at 5 s), NaN when empty."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        prev_le, prev_n = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return math.inf
                if n == prev_n:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
            prev_le, prev_n = le, n
        return prev_le

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else math.nan


@dataclass
class NixlMetrics:
    """The NIXL connector's Prometheus series of one server."""

    xfer_time: Histogram = field(default_factory=Histogram)
    post_time: Histogram = field(default_factory=Histogram)
    bytes: Histogram = field(default_factory=Histogram)
    descriptors: Histogram = field(default_factory=Histogram)
    counters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NixlMetrics:
        sums: dict[str, float] = defaultdict(float)
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m or not m.group(1).startswith("vllm:nixl_"):
                continue
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            if name.endswith("_bucket"):
                le = _LE.search(labels)
                if le:
                    buckets[name[: -len("_bucket")]][float(le.group(1))] += value
            else:
                sums[name] += value

        def hist(base: str) -> Histogram:
            return Histogram(
                sums.get(f"{base}_count", 0.0),
                sums.get(f"{base}_sum", 0.0),
                dict(buckets.get(base, {})),
            )

        counters = {c: sums.get(f"{c}_total", sums.get(c, 0.0)) for c in COUNTERS}
        return cls(
            hist(XFER_TIME), hist(POST_TIME), hist(BYTES), hist(DESCRIPTORS), counters
        )

    def minus(self, before: NixlMetrics) -> NixlMetrics:
        """What happened between ``before`` and this snapshot."""
        return NixlMetrics(
            self.xfer_time.minus(before.xfer_time),
            self.post_time.minus(before.post_time),
            self.bytes.minus(before.bytes),
            self.descriptors.minus(before.descriptors),
            {k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
        )

    @property
    def transfers(self) -> int:
        return int(self.xfer_time.count)

    @property
    def failed(self) -> int:
        return int(self.counters.get("vllm:nixl_num_failed_transfers", 0.0))


_LOG_LINE = re.compile(r"KV Transfer metrics: (.*)$")
_FIELD = re.compile(r"([A-Za-z0-9 ()/]+?)=([-0-9.eE+na]+)(?:,\s*|$)")


def transfer_log_lines(log_text: str) -> list[dict[str, float]]:
    """vLLM's periodic ``KV Transfer metrics: ...`` lines, as dicts
    (``{"Num successful transfers": 3.0, "Avg xfer time (ms)": 1.2, ...}``)."""
    out: list[dict[str, float]] = []
    for line in log_text.splitlines():
        m = _LOG_LINE.search(line)
        if not m:
            continue
        fields = {k.strip(): float(v) for k, v in _FIELD.findall(m.group(1))}
        if fields:
            out.append(fields)
    return out


_MAPPED_LINE = re.compile(
    r"(\d\d-\d\d \d\d:\d\d:\d\d).*ElasticNixlConnector: (\d+) bytes mapped"
)


def mapped_bytes_lines(log_text: str) -> list[tuple[str, int]]:
    """The elastic pool's ``... N bytes mapped ...`` lines (``allocator:
    vmm``): (vLLM's timestamp ``MM-DD HH:MM:SS``, bytes mapped after it)."""
    return [
        (m.group(1), int(m.group(2)))
        for m in map(_MAPPED_LINE.search, log_text.splitlines())
        if m
    ]


def metric_value(metrics_text: str, name: str) -> float | None:
    """Sample ``name`` of a ``/metrics`` page, summed over its label sets
    (engines); None when the page has no such sample."""
    values = [
        float(line.split()[-1])
        for line in metrics_text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
    ]
    return sum(values) if values else None


def prefix_cache_hits(metrics_text: str) -> float:
    """Tokens vLLM served from its prefix cache (``vllm:prefix_cache_hits``)."""
    return metric_value(metrics_text, "vllm:prefix_cache_hits_total") or 0.0
