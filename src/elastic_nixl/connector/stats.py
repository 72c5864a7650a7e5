"""vLLM's NIXL transfer stats plus the elastic KV cache's own.

vLLM aggregates a connector's ``KVConnectorStats`` from the workers and logs
``reduce()`` every logging interval (``KV Transfer metrics: ...``). With
``allocator: vmm`` the worker also records, per change: the bytes mapped
after it, the groups mapped (grows) and released (shrinks) and the mapping
epoch. The log line then ends with ``Mapped MiB``, ``Peak mapped MiB``,
``Grows``, ``Shrinks``, ``Mapping epoch`` and ``Avg mapping time (ms)`` (per
step that changed the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import (
    NixlKVConnectorStats,
)

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
