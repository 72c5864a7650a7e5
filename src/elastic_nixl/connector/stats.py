"""vLLM's NIXL transfer stats plus the elastic KV cache's own.

vLLM aggregates a connector's ``KVConnectorStats`` from the workers and logs
``reduce()`` every logging interval (``KV Transfer metrics: ...``). With
``allocator: vmm`` the worker also records, per change: the bytes mapped
after it, the groups mapped (grows) and released (shrinks) and the mapping
epoch. The log line then ends with ``Mapped MiB``, ``Peak mapped MiB``,
``Grows``, ``Shrinks``, ``Mapping epoch`` and ``Avg mapping time (ms)`` (per
step that changed the mapping).

:class:`ElasticPromMetrics` puts the same samples on vLLM's ``/metrics``
(each with vLLM's ``engine`` and ``model_name`` labels), beside vLLM's own
NIXL metrics: ``vllm:elastic_kv_mapped_bytes`` and
``vllm:elastic_kv_mapping_epoch`` (gauges, the last value of an interval),
``vllm:elastic_kv_groups_mapped_total`` and
``vllm:elastic_kv_groups_released_total`` (counters) and
``vllm:elastic_kv_mapping_time_seconds`` (a histogram, one sample per step
that changed the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import (
    NixlKVConnectorStats,
    NixlPromMetrics,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from elastic_nixl.connector.registration import RegistrationStats


@dataclass
class ElasticStats(RegistrationStats):
    """The worker's own counters (the demo, the bench and the tests read)."""

    refreshes: int = 0
    reads_posted: int = 0
    descriptors_posted: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    refused_reads: int = 0
    staged_reads: int = 0
    # Reads that completed after the producer's hold on the blocks ended.
    late_reads: int = 0


ELASTIC_KEYS = ("mapped_bytes", "grows", "shrinks", "mapping_epoch", "mapping_s")


class ElasticKVConnectorStats(NixlKVConnectorStats):
    """``NixlKVConnectorStats`` with the elastic pool's samples."""

    def reset(self) -> None:
        super().reset()
        for key in ELASTIC_KEYS:
            self.data[key] = []

    def record_mapping(
        self, mapped_bytes: int, grows: int, shrinks: int, epoch: int, seconds: float
    ) -> None:
        """One step's change: bytes mapped after it, groups mapped and
        released, the epoch, and the time the worker spent on it (mapping,
        NIXL (de)registration)."""
        self.data["mapping_s"].append(seconds)
        self.data["mapped_bytes"].append(mapped_bytes)
        self.data["grows"].append(grows)
        self.data["shrinks"].append(shrinks)
        self.data["mapping_epoch"].append(epoch)

    def is_empty(self) -> bool:
        return super().is_empty() and not self.data.get("mapped_bytes")

    def aggregate(self, other: Any) -> ElasticKVConnectorStats:
        if not other.is_empty():
            for key, values in other.data.items():
                self.data.setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = super().reduce()
        mapped = self.data.get("mapped_bytes") or []
        if mapped:
            mib = 1 << 20
            out["Mapped MiB"] = round(mapped[-1] / mib, 3)
            out["Peak mapped MiB"] = round(max(mapped) / mib, 3)
            out["Grows"] = int(sum(self.data["grows"]))
            out["Shrinks"] = int(sum(self.data["shrinks"]))
            out["Mapping epoch"] = int(self.data["mapping_epoch"][-1])
            out["Avg mapping time (ms)"] = round(
                1e3 * sum(self.data["mapping_s"]) / len(mapped), 3
            )
        return out


class ElasticPromMetrics(NixlPromMetrics):
    """vLLM's NIXL Prometheus metrics plus the elastic pool's (above)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: Any) -> dict[int, Any]:
            return create_metric_per_engine(metric, self.per_engine_labelvalues)

        # vLLM types these as a union of the three; each is the one it names.
        gauge: Any = self._gauge_cls
        counter: Any = self._counter_cls
        histogram: Any = self._histogram_cls

        self.mapped_bytes = per_engine(
            gauge(
                name="vllm:elastic_kv_mapped_bytes",
                documentation="KV cache memory mapped now (allocator: vmm).",
                multiprocess_mode="mostrecent",
                labelnames=labelnames,
            )
        )
        self.mapping_epoch = per_engine(
            gauge(
                name="vllm:elastic_kv_mapping_epoch",
                documentation="The KV memory's mapping epoch (one per change "
                "a peer must see; allocator: vmm).",
                multiprocess_mode="mostrecent",
                labelnames=labelnames,
            )
        )
        self.groups_mapped = per_engine(
            counter(
                name="vllm:elastic_kv_groups_mapped",
                documentation="Block groups mapped on demand (allocator: vmm).",
                labelnames=labelnames,
            )
        )
        self.groups_released = per_engine(
            counter(
                name="vllm:elastic_kv_groups_released",
                documentation="Block groups released (allocator: vmm).",
                labelnames=labelnames,
            )
        )
        self.mapping_time = per_engine(
            histogram(
                name="vllm:elastic_kv_mapping_time_seconds",
                documentation="Worker time per step that changed the KV "
                "mapping: mapping, release and NIXL (de)registration.",
                buckets=[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5],
                labelnames=labelnames,
            )
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        super().observe(transfer_stats_data, engine_idx)
        mapped = transfer_stats_data.get("mapped_bytes") or []
        if not mapped:
            return
        self.mapped_bytes[engine_idx].set(mapped[-1])
        self.mapping_epoch[engine_idx].set(transfer_stats_data["mapping_epoch"][-1])
        self.groups_mapped[engine_idx].inc(sum(transfer_stats_data["grows"]))
        self.groups_released[engine_idx].inc(sum(transfer_stats_data["shrinks"]))
        for seconds in transfer_stats_data["mapping_s"]:
            self.mapping_time[engine_idx].observe(seconds)
