"""One engine's KV connector, driven the way vLLM's engine drives it.

``PDEngine`` holds a connector in each role (scheduler, worker) over a KV
cache (elastic host VMM, or vLLM's static buffer) and runs engine steps:
``build_connector_meta`` -> ``bind`` -> ``start_load_kv`` -> ``get_finished``
-> ``build_connector_worker_meta`` -> ``update_connector_output``. Producer
and consumer engines talk through vLLM's real side channel and NIXL; the
``kv_transfer_params`` a producer returns are what a proxy hands the consumer.

No model runs: the producer writes a known pattern into each block "as if
prefilled", and the consumer checks every received block byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic_nixl.allocator.core import VmmKVAllocator
from elastic_nixl.allocator.host import HostBackend
from elastic_nixl.tools.harness.vllm_objects import (
    TinyModel,
    init_distributed,
    make_kv_cache_config,
    make_vllm_config,
)


@dataclass
class EngineSpec:
    role: str  # "kv_producer" | "kv_consumer"
    engine_id: str
    side_channel_port: int
    physical_blocks: int = 64
    virtual_blocks: int = 4096
    chunk_bytes: int = 1 << 16
    layout: str = "LBHNC"
    memory: str = "vmm"  # "vmm": host VMM allocator; "static": vLLM's buffer
    connector: str = "ElasticNixlConnector"
    extra: dict[str, Any] = field(default_factory=dict)
    model: TinyModel = field(default_factory=TinyModel)
    block_size: int = 32
    # vLLM's KVTransferConfig.enable_permute_local_kv: receive a remote LBHNC
    # cache into a local LBNHC one.
    enable_permute_local_kv: bool = False


def block_pattern(seed: str, shape: Sequence[int]) -> torch.Tensor:
    """Deterministic int16 content for one (request, position, layer) block."""
    digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randint(-32768, 32767, tuple(shape), generator=gen, dtype=torch.int16)


class PDEngine:
    def __init__(
        self,
        spec: EngineSpec,
        nixl_agent: Any | None = None,
        staging_agent_factory: Callable[[str], Any] | None = None,
    ) -> None:
        from vllm.distributed.kv_transfer.kv_connector.factory import (
            KVConnectorFactory,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.kv_cache_layout import KVCacheLayout
        from vllm.v1.worker.utils import allocate_kv_cache

        from elastic_nixl.vllm_seam import allocate_elastic_kv_cache

        self.spec = spec
        extra = dict(spec.extra)
        if spec.connector == "ElasticNixlConnector":
            extra.setdefault("allocator", "vmm" if spec.memory == "vmm" else "static")
        self.vllm_config = make_vllm_config(
            spec.role,
            connector=spec.connector,
            extra=extra,
            layout=spec.layout,
            block_size=spec.block_size,
            engine_id=spec.engine_id,
            model=spec.model,
            side_channel_port=spec.side_channel_port,
            enable_permute_local_kv=spec.enable_permute_local_kv,
        )
        init_distributed(self.vllm_config)
        self.kv_cache_config = make_kv_cache_config(
            self.vllm_config, spec.physical_blocks
        )
        self.allocator: VmmKVAllocator | None = None
        if spec.memory == "vmm":
            ekv = allocate_elastic_kv_cache(
                self.vllm_config,
                self.kv_cache_config,
                HostBackend(),
                spec.virtual_blocks,
                spec.chunk_bytes,
                name=spec.engine_id,
            )
            self.allocator = ekv.allocator
            self.allocator.grow_to(spec.physical_blocks)
            self.kv_caches = ekv.kv_caches
        else:
            self.kv_caches = allocate_kv_cache(
                self.kv_cache_config, torch.device("cpu"), KVCacheLayout[spec.layout]
            )
        cls = KVConnectorFactory.get_connector_class(
            self.vllm_config.kv_transfer_config
        )
        self.scheduler: Any = cls(
            self.vllm_config, KVConnectorRole.SCHEDULER, self.kv_cache_config
        )
        from elastic_nixl.connector.connector import ElasticNixlConnector

        self.worker: Any
        if issubclass(cls, ElasticNixlConnector):
            self.worker = cls(
                self.vllm_config,
                KVConnectorRole.WORKER,
                self.kv_cache_config,
                nixl_agent=nixl_agent,
                staging_agent_factory=staging_agent_factory,
            )
        else:
            self.worker = cls(
                self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config
            )
            if nixl_agent is not None:
                # vLLM's own connector takes no agent; tests swap in the mock
                # before anything is registered.
                self.worker.connector_worker.nixl_wrapper = nixl_agent
        self.worker.register_kv_caches(self.kv_caches)
        self.scheduler.set_xfer_handshake_metadata_pp_aware(
            {(0, 0): self.worker.get_handshake_metadata()}
        )
        self.layer_names = sorted(self.kv_caches)
        self.failed_blocks: set[int] = set()

    # -- engine step ------------------------------------------------------

    def step(self) -> tuple[set[str], set[str]]:
        """One engine step; returns (finished_sending, finished_recving)."""
        from vllm.v1.core.sched.output import SchedulerOutput
        from vllm.v1.outputs import KVConnectorOutput

        meta = self.scheduler.build_connector_meta(SchedulerOutput.make_empty())
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        sending, recving = self.worker.get_finished(set())
        invalid = self.worker.get_block_ids_with_load_errors()
        self.failed_blocks |= invalid
        worker_meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
        self.scheduler.update_connector_output(
            KVConnectorOutput(
                finished_sending=sending or set(),
                finished_recving=recving or set(),
                kv_connector_worker_meta=worker_meta,
                invalid_block_ids=invalid,
            )
        )
        return set(sending or ()), set(recving or ())

    # -- producer ---------------------------------------------------------

    def write_blocks(self, req_id: str, block_ids: Sequence[int]) -> None:
        for pos, b in enumerate(block_ids):
            for layer in self.layer_names:
                view = self.kv_caches[layer][b].view(torch.int16)
                view.copy_(block_pattern(f"{req_id}/{pos}/{layer}", view.shape))

    def prefill(self, req_id: str, block_ids: Sequence[int]) -> dict[str, Any]:
        """Fill ``block_ids`` as a finished prefill would; the params a proxy
        forwards to the decode engine."""
        from vllm import SamplingParams
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock
        from vllm.v1.request import Request, RequestStatus

        self.write_blocks(req_id, block_ids)
        n_tokens = len(block_ids) * self.spec.block_size
        req = Request(
            req_id,
            list(range(n_tokens)),
            SamplingParams(max_tokens=1),
            None,
        )
        req.kv_transfer_params = {"do_remote_decode": True}
        self.scheduler.on_new_request(req)  # as vLLM's Scheduler.add_request
        # vLLM's scheduler tells the connector when it schedules the request;
        # the worker only honours a send it was told about.
        blocks = KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],))
        self.scheduler.update_state_after_alloc(req, blocks, 0)
        req.num_computed_tokens = n_tokens
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        delay, params = self.scheduler.request_finished(req, list(block_ids))
        assert delay and params is not None
        return params

    # -- consumer ---------------------------------------------------------

    def submit(
        self, req_id: str, params: dict[str, Any], block_ids: Sequence[int]
    ) -> int:
        """Admit a request whose KV lives on the producer, into ``block_ids``."""
        from vllm import SamplingParams
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks
        from vllm.v1.core.kv_cache_utils import KVCacheBlock
        from vllm.v1.request import Request

        n_tokens = len(block_ids) * self.spec.block_size
        req = Request(req_id, list(range(n_tokens)), SamplingParams(max_tokens=1), None)
        # A client may send anything: forward non-dict params unchanged.
        req.kv_transfer_params = dict(params) if isinstance(params, dict) else params
        self.scheduler.on_new_request(req)  # as vLLM's Scheduler.add_request
        count, is_async = self.scheduler.get_num_new_matched_tokens(req, 0)
        blocks = KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],))
        self.scheduler.update_state_after_alloc(req, blocks, count or 0)
        return int(count or 0)

    def verify(self, req_id: str, block_ids: Sequence[int]) -> list[int]:
        """Positions whose bytes differ from what the producer wrote."""
        bad = []
        for pos, b in enumerate(block_ids):
            for layer in self.layer_names:
                view = self.kv_caches[layer][b].view(torch.int16)
                if not torch.equal(
                    view, block_pattern(f"{req_id}/{pos}/{layer}", view.shape)
                ):
                    bad.append(pos)
                    break
        return bad

    def clear_blocks(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            for layer in self.layer_names:
                self.kv_caches[layer][b].zero_()

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()
