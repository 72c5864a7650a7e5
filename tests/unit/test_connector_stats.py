"""The elastic pool's samples in vLLM's KV-connector stats: the periodic log
line (``reduce``), aggregation across workers, and ``/metrics``
(``ElasticPromMetrics``, on vLLM's real NIXL metrics class)."""

from __future__ import annotations

import functools
from typing import Any

import pytest

pytest.importorskip("vllm", reason="needs vLLM (./dev.sh installs the cpu build)")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402

from elastic_nixl.connector import ElasticNixlConnector  # noqa: E402
from elastic_nixl.connector.stats import (  # noqa: E402
    ElasticKVConnectorStats,
    ElasticPromMetrics,
)

MIB = 1 << 20


def two_workers() -> ElasticKVConnectorStats:
    a = ElasticKVConnectorStats()
    a.record_mapping(4 * MIB, grows=8, shrinks=0, epoch=3, seconds=0.002)
    b = ElasticKVConnectorStats()
    b.record_mapping(10 * MIB, grows=12, shrinks=0, epoch=5, seconds=0.004)
    b.record_mapping(2 * MIB, grows=0, shrinks=16, epoch=6, seconds=0.003)
    return a.aggregate(b)


def test_the_log_line_has_mapped_peak_grows_shrinks_epoch_and_time() -> None:
    out = two_workers().reduce()
    assert out["Mapped MiB"] == 2.0
    assert out["Peak mapped MiB"] == 10.0
    assert (out["Grows"], out["Shrinks"], out["Mapping epoch"]) == (20, 16, 6)
    assert out["Avg mapping time (ms)"] == 3.0
    # vLLM's own NIXL fields are still there.
    assert "Num successful transfers" in out


def test_no_mapping_no_elastic_fields_and_empty() -> None:
    stats = ElasticKVConnectorStats()
    assert stats.is_empty()
    assert "Mapped MiB" not in stats.reduce()
    stats.record_mapping(MIB, 1, 0, 1, 0.001)
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"engine": "0", "model_name": "m", **labels})


def test_prometheus_gets_the_same_samples_per_engine() -> None:
    registry = CollectorRegistry()
    types: dict[Any, Any] = {
        cls: functools.partial(cls, registry=registry)
        for cls in (Gauge, Counter, Histogram)
    }
    labels = {0: ["m", "0"], 1: ["m", "1"]}
    # Built as vLLM's KVConnectorProm builds it, through the connector class.
    prom = ElasticNixlConnector.build_prom_metrics(
        _Config(), types, ["model_name", "engine"], labels
    )
    assert isinstance(prom, ElasticPromMetrics)
    prom.observe(two_workers().data, engine_idx=0)
    prom.observe(ElasticKVConnectorStats().data, engine_idx=1)  # nothing mapped
    assert value(registry, "vllm:elastic_kv_mapped_bytes") == 2 * MIB
    assert value(registry, "vllm:elastic_kv_mapping_epoch") == 6
    assert value(registry, "vllm:elastic_kv_groups_mapped_total") == 20
    assert value(registry, "vllm:elastic_kv_groups_released_total") == 16
    assert value(registry, "vllm:elastic_kv_mapping_time_seconds_count") == 3
    assert value(registry, "vllm:elastic_kv_mapping_time_seconds_sum") == (
        pytest.approx(0.009)
    )
    # A second interval adds to the counters and moves the gauges.
    later = ElasticKVConnectorStats()
    later.record_mapping(6 * MIB, grows=8, shrinks=0, epoch=7, seconds=0.001)
    prom.observe(later.data, engine_idx=0)
    assert value(registry, "vllm:elastic_kv_mapped_bytes") == 6 * MIB
    assert value(registry, "vllm:elastic_kv_groups_mapped_total") == 28
    # vLLM's NIXL metrics are registered beside ours, and engine 1 is untouched.
    assert value(registry, "vllm:nixl_xfer_time_seconds_count") == 0
    assert (
        registry.get_sample_value(
            "vllm:elastic_kv_groups_mapped_total", {"engine": "1", "model_name": "m"}
        )
        == 0
    )


class _Config:
    """What KVConnectorPromMetrics reads from a VllmConfig."""

    kv_transfer_config = None
