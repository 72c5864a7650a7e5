"""ElasticNixlConnector: vLLM's NixlConnector for elastic KV memory.

A thin facade, like vLLM's own: it picks the scheduler and worker classes and
forwards; the work is in :mod:`.worker`, :mod:`.scheduler` and :mod:`.planning`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlBaseConnector,
    NixlPullConnector,
)
from vllm.logger import init_logger

from elastic_nixl.allocator.core import VmmKVAllocator
from elastic_nixl.compat import check_vllm_version
from elastic_nixl.config import AllocatorChoice, settings_from_vllm_config
from elastic_nixl.connector.planning import choose_kv_layout
from elastic_nixl.connector.scheduler import ElasticNixlConnectorScheduler
from elastic_nixl.connector.stats import ElasticKVConnectorStats, ElasticPromMetrics
from elastic_nixl.connector.worker import ElasticNixlConnectorWorker
from elastic_nixl.releases import SLEEP_MODE_REFUSAL

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorStats,
    )
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.kv_cache_interface import KVCacheConfig

check_vllm_version()
logger = init_logger(__name__)


def share_vllm_log_handlers() -> None:
    """Send the package's log lines (``elastic_nixl.*``) where vLLM's go,
    at vLLM's level: vLLM configures only its own ``vllm`` logger, so
    otherwise everything below WARNING from us would be dropped."""
    ours, theirs = logging.getLogger("elastic_nixl"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


class ElasticNixlConnector(NixlPullConnector):
    """Pull (READ) NIXL connector that registers only mapped KV memory."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
        nixl_agent: Any | None = None,
        staging_agent_factory: Callable[[str], Any] | None = None,
    ) -> None:
        share_vllm_log_handlers()
        self.settings = settings_from_vllm_config(vllm_config)
        # NixlPullConnector.__init__ would build vLLM's scheduler/worker (and a
        # NIXL agent); build ours instead on top of the shared base.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = ElasticNixlConnectorScheduler(
                vllm_config, self.engine_id, kv_cache_config
            )
        elif role == KVConnectorRole.WORKER:
            self.connector_worker = ElasticNixlConnectorWorker(
                vllm_config,
                self.engine_id,
                kv_cache_config,
                self.settings,
                nixl_agent=nixl_agent,
                staging_agent_factory=staging_agent_factory,
            )

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """The layout the configured allocator can produce (see
        :func:`~elastic_nixl.connector.planning.choose_kv_layout`); peers must
        agree or one of them permutes after receive."""
        if vllm_config.model_config is None:
            return None
        settings = settings_from_vllm_config(vllm_config)
        caps = (
            VmmKVAllocator.CAPABILITIES
            if settings.allocator is AllocatorChoice.VMM
            else None
        )
        layout = choose_kv_layout(
            settings.allocator, vllm_config.model_config.use_mla, caps
        )
        logger.info_once(
            "ElasticNixlConnector: KV cache layout %s for allocator=%s",
            layout,
            settings.allocator.value,
        )
        return layout

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """A new handshake payload after a mapping change, for the scheduler to
        serve; None when nothing changed."""
        worker = self.connector_worker
        if isinstance(worker, ElasticNixlConnectorWorker):
            return worker.build_worker_meta()
        return None

    # ------------------------------------------------------ sleep mode (0.33+)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: KVTransferConfig) -> bool:
        """No: vLLM (>= 0.33) then refuses ``enable_sleep_mode`` with this
        connector at config time (see :data:`~elastic_nixl.releases.SLEEP_MODE_REFUSAL`
        for why). Older vLLM never asks."""
        return False

    def unregister_kv_caches(self) -> None:
        """Never reached (sleep mode is refused); fails loudly if it is."""
        raise NotImplementedError(SLEEP_MODE_REFUSAL)

    def restore_kv_caches(self) -> None:
        """Never reached (sleep mode is refused); fails loudly if it is."""
        raise NotImplementedError(SLEEP_MODE_REFUSAL)

    # ------------------------------------------------------ allocator: vmm

    def get_mem_pool_context(self) -> AbstractContextManager[Any] | None:
        """With ``allocator: vmm``, vLLM's KV cache goes into our reservation
        (:func:`elastic_nixl.vllm_seam.elastic_kv_allocation`)."""
        if self.settings.allocator is not AllocatorChoice.VMM:
            return None
        from elastic_nixl.vllm_seam import elastic_kv_allocation

        return elastic_kv_allocation(self._vllm_config)

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        if isinstance(self.connector_scheduler, ElasticNixlConnectorScheduler):
            self.connector_scheduler.bind_block_pool(gpu_block_pool)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Map and release KV memory as the scheduler decided, before anything
        in this step (forward pass, NIXL reads) touches it."""
        super().bind_connector_metadata(connector_metadata)
        worker = self.connector_worker
        if isinstance(worker, ElasticNixlConnectorWorker):
            worker.apply_pool_changes(connector_metadata)

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        if data is not None:
            return ElasticKVConnectorStats(data=data)
        return ElasticKVConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> ElasticPromMetrics:
        return ElasticPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )
