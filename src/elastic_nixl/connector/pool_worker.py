"""The worker's side of the elastic pool (``allocator: vmm`` in vllm serve).

Each step the scheduler's :class:`~elastic_nixl.connector.pool.PoolPolicy`
names block groups to release and to map; :class:`PoolApplier` applies them
to the VMM allocator before the forward pass, records what changed in
vLLM's KV-connector stats and logs the mapped size (at most once a second
while memory grows, and after every pure release, so the size an idle engine
shrinks to is always in the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from elastic_nixl.allocator.core import VmmKVAllocator
from elastic_nixl.capabilities import KVMemory, KVMemoryError
from elastic_nixl.connector.pool import apply_group_changes, check_pool_geometry
from elastic_nixl.connector.stats import ElasticKVConnectorStats

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 1.0


class PoolApplier:
    def __init__(
        self, kv_cache_config: Any, chunk_bytes: int, stats: ElasticKVConnectorStats
    ) -> None:
        self._kv_cache_config = kv_cache_config
        self._chunk_bytes = chunk_bytes
        self._stats = stats
        self._checked = False
        self._logged_at = 0.0
        self._since_log = [0, 0]

    def apply(
        self,
        memory: KVMemory | None,
        blocks_per_group: int,
        map_groups: Sequence[int],
        unmap_groups: Sequence[int],
    ) -> None:
        if not (map_groups or unmap_groups):
            return
        if not isinstance(memory, VmmKVAllocator):
            raise KVMemoryError(
                "the elastic pool asked to map KV memory that is not the "
                "elastic_nixl VMM allocator's"
            )
        if not self._checked:
            # Once: the scheduler's groups are this allocator's chunks.
            check_pool_geometry(memory, self._kv_cache_config, self._chunk_bytes)
            self._checked = True
        t0 = time.perf_counter()
        apply_group_changes(memory, blocks_per_group, map_groups, unmap_groups)
        self._stats.record_mapping(
            memory.mapped_bytes,
            len(map_groups),
            len(unmap_groups),
            memory.epoch,
            time.perf_counter() - t0,
        )
        self._since_log[0] += len(map_groups)
        self._since_log[1] += len(unmap_groups)
        now = time.monotonic()
        released_only = bool(unmap_groups) and not map_groups
        if released_only or now - self._logged_at >= LOG_INTERVAL_S:
            self._logged_at = now
            grows, shrinks = self._since_log
            self._since_log = [0, 0]
            logger.info(
                "ElasticNixlConnector: %d bytes mapped (%d groups mapped, %d "
                "released since the last line), epoch %d",
                memory.mapped_bytes,
                grows,
                shrinks,
                memory.epoch,
            )


def agent_without_progress_thread(
    ktc: Any, backends: list[str], wrapper_cls: Any, config_cls: Any
) -> Any:
    """vLLM's NIXL agent, rebuilt with NIXL's progress thread off (before
    anything is registered on it). That thread polls UCX with a zero timeout,
    a whole core per engine (docs/demo.md, "Slow transfers"); without it UCX
    progresses when vLLM polls NIXL, every engine step."""
    import uuid

    config = config_cls(
        enable_prog_thread=False,
        num_threads=ktc.get_from_extra_config("num_threads", 4),
        capture_telemetry=True,
        backends=list(backends),
    )
    logger.info("ElasticNixlConnector: NIXL progress thread off")
    return wrapper_cls(str(uuid.uuid4()), config)
