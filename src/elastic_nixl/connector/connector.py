"""ElasticNixlConnector: vLLM's NixlConnector for elastic KV memory.

A thin facade, like vLLM's own: it picks the scheduler and worker classes and
forwards; the work is in :mod:`.worker`, :mod:`.scheduler` and :mod:`.planning`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
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
from elastic_nixl.connector.worker import ElasticNixlConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

check_vllm_version()
logger = init_logger(__name__)


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
