"""Scheduler side of ElasticNixlConnector.

Adds four things to vLLM's ``NixlPullConnectorScheduler``:

* a consumer request's ``kv_transfer_params`` are validated when the request
  arrives, before vLLM's code reads them; a bad one fails that request alone
  (through the worker and vLLM's ``kv_load_failure_policy``), never the engine;

* the side channel serves the worker's *current* handshake payload, which
  changes when the elastic memory grows or shrinks;
* producer requests carry the producer's mapping epoch in
  ``kv_transfer_params`` so a consumer can tell its metadata is stale;
* the blocks of requests a consumer will read are sent to the worker to be
  pinned (leased) until the read is done.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlConnectorMetadata,
    NixlHandshakePayload,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import (
    NixlPullConnectorScheduler,
)
from vllm.logger import init_logger

from elastic_nixl.config import AllocatorChoice, settings_from_vllm_config
from elastic_nixl.connector.leases import LeaseVerdicts
from elastic_nixl.connector.metadata import (
    EPOCH_PARAM,
    LEASE_EXPIRY_PARAM,
    LEASE_EXTENSION_PARAM,
    LEASE_VERDICTS_PARAM,
    ElasticConnectorMetadata,
    ElasticWorkerMetadata,
    parse_consumer_params,
)
from elastic_nixl.connector.pool import (
    PoolPolicy,
    pool_geometry,
    step_block_ids,
)
from elastic_nixl.connector.side_channel import serve_side_channel

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


logger = init_logger(__name__)

# vLLM waits for its side-channel listener without a bound; a listener that
# cannot bind its port (taken) would hang the engine's start-up forever.
LISTENER_START_TIMEOUT_S = 60.0

# What a refused request's kv_transfer_params become: enough for vLLM to park
# it waiting for KV (so its failure is reported as a failed receive), nothing
# that vLLM would act on (no engine to contact, no heartbeat).
_REFUSED_PARAMS: dict[str, Any] = {
    "do_remote_prefill": True,
    "remote_engine_id": None,
    "remote_request_id": None,
    "remote_host": None,
    "remote_port": None,
    "remote_block_ids": [[]],
}


def _reads_remote_kv(params: dict[str, Any]) -> bool:
    """Whether vLLM would pull KV for a request with these params."""
    return bool(params.get("do_remote_prefill")) or bool(
        params.get("do_remote_decode") and params.get("remote_block_ids")
    )


class ElasticNixlConnectorScheduler(NixlPullConnectorScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Served by the side-channel thread; updated in place on new epochs.
        self._served_payloads: dict[tuple[int, int], bytes] = {}
        self._producer_epoch = 0
        self._blocks_to_lease: dict[str, list[int]] = {}
        # Consumer: validated producer epoch per request, and refusals.
        self._epochs: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._read_leases: dict[str, tuple[str, str, float, float, bool]] = {}
        # Producer: whether consumers read released requests in time.
        self._lease_verdicts = LeaseVerdicts()
        # allocator 'vmm': what is mapped, decided here (see connector/pool.py).
        self.pool_policy: PoolPolicy | None = None

    def bind_block_pool(self, block_pool: BlockPool) -> None:
        """With ``allocator: vmm``, keep vLLM's pool inside mapped memory."""
        settings = settings_from_vllm_config(self.vllm_config)
        if settings.allocator is not AllocatorChoice.VMM:
            return
        config = self.kv_cache_config
        tensors = config.kv_cache_tensors
        if len(tensors) != 1:
            raise NotImplementedError(
                "kv_connector_extra_config['allocator'] = 'vmm' supports one KV "
                f"cache tensor (one layer shape); this model has {len(tensors)}"
            )
        t = tensors[0]
        geometry = pool_geometry(
            num_blocks=config.num_blocks,
            unit_bytes=t.block_stride,
            bytes_per_block=len(t.layers) * t.block_stride,
            chunk_bytes=settings.chunk_bytes,
        )
        policy = PoolPolicy(
            geometry,
            max_mapped_bytes=settings.max_mapped_bytes,
            idle_mapped_bytes=settings.idle_mapped_bytes,
        )
        policy.bind(block_pool)
        self.pool_policy = policy
        logger.info(
            "ElasticNixlConnector: elastic KV pool of %d blocks in %d groups of %d "
            "(%d bytes each); at most %d bytes mapped%s",
            geometry.num_blocks,
            geometry.num_groups,
            geometry.blocks_per_group,
            geometry.group_bytes,
            policy.max_mapped_bytes,
            f", {len(policy.balloon)} groups held out of vLLM's pool"
            if policy.balloon
            else "",
        )

    def has_pending_push_work(self) -> bool:
        """Also keep the engine stepping until memory freed by the last
        requests has been released (an idle engine does not step)."""
        policy = self.pool_policy
        return super().has_pending_push_work() or (
            policy is not None and policy.needs_idle_pass
        )

    def on_new_request(self, request: Request) -> None:
        """Validate ``kv_transfer_params`` before vLLM reads them."""
        params = request.kv_transfer_params
        if isinstance(params, dict) and _reads_remote_kv(params):
            try:
                parsed = parse_consumer_params(params, request.request_id)
            except ValueError as e:
                logger.error("ElasticNixlConnector: %s; the request fails alone", e)
                self._refused[request.request_id] = str(e)
                request.kv_transfer_params = dict(_REFUSED_PARAMS)
            else:
                if parsed.elastic_nixl_epoch is not None:
                    self._epochs[request.request_id] = parsed.elastic_nixl_epoch
                expiry = parsed.elastic_nixl_lease_expiry
                extension = parsed.elastic_nixl_lease_extension
                if expiry is not None and extension is not None:
                    # Sent to the worker at once: heartbeats go out while the
                    # request waits, before it is scheduled.
                    self._read_leases[request.request_id] = (
                        parsed.remote_engine_id,
                        parsed.remote_request_id,
                        expiry,
                        extension,
                        parsed.elastic_nixl_lease_verdicts,
                    )
        elif params is not None and not isinstance(params, dict):
            logger.error(
                "ElasticNixlConnector: request %s: kv_transfer_params must be an "
                "object, got %s; ignored",
                request.request_id,
                type(params).__name__,
            )
            request.kv_transfer_params = None
        super().on_new_request(request)

    def set_xfer_handshake_metadata(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        """Serve ``metadata`` on the side channel, replaceable later.

        vLLM's version hands its listener a private copy; ours serves a dict
        we keep so later payloads (after growth or shrink) replace earlier ones,
        and answers lease questions too (:mod:`.side_channel`).
        """
        for key, rank_meta in metadata.items():
            if not isinstance(rank_meta, NixlHandshakePayload):
                raise ValueError(
                    "ElasticNixlConnectorScheduler expects NixlHandshakePayload "
                    f"handshake metadata, got {type(rank_meta).__name__} for {key}"
                )
            self._served_payloads[key] = msgspec.msgpack.encode(rank_meta)
        if self._nixl_handshake_listener_t is None:
            ready = threading.Event()
            failed: list[Exception] = []
            host, port = self.side_channel_host, self.side_channel_port

            def listen() -> None:
                try:
                    serve_side_channel(
                        self._served_payloads,
                        self._lease_verdicts,
                        ready,
                        self._stop_event,
                        host,
                        port,
                    )
                except Exception as e:  # noqa: BLE001 - raised by the caller below
                    failed.append(e)
                    ready.set()  # a listener that cannot bind must not hang us

            self._nixl_handshake_listener_t = threading.Thread(
                target=listen, daemon=True, name="elastic_nixl_handshake_listener"
            )
            self._nixl_handshake_listener_t.start()
            if not ready.wait(LISTENER_START_TIMEOUT_S) or failed:
                why = repr(failed[0]) if failed else "no answer"
                raise RuntimeError(
                    f"ElasticNixlConnector: the NIXL side channel could not listen "
                    f"on {host}:{port} ({why}); is VLLM_NIXL_SIDE_CHANNEL_PORT "
                    "taken by another process?"
                )

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """vLLM's bookkeeping, then the worker's new payload and epoch."""
        super().update_connector_output(connector_output)
        if self.pool_policy is not None:
            for req_id in connector_output.finished_sending or ():
                self.pool_policy.unpin(req_id)
            if connector_output.finished_recving:
                self.pool_policy.needs_idle_pass = True
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, ElasticWorkerMetadata):
            self._served_payloads.update(worker_meta.payloads)
            self._producer_epoch = max(self._producer_epoch, worker_meta.epoch)
            for rank, verdicts in worker_meta.lease_verdicts.items():
                self._lease_verdicts.record(rank, verdicts)

    @property
    def producer_epoch(self) -> int:
        """The newest mapping epoch this engine's worker reported."""
        return self._producer_epoch

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> KVConnectorMetadata:
        """vLLM's metadata plus the epochs reads need, the blocks to pin and
        the requests refused at the boundary."""
        # Refused requests still go through vLLM's bookkeeping (their params
        # are harmless now), so that the worker can fail them as reads.
        refused: dict[str, str] = {}
        for req_id in self._reqs_need_recv:
            why = self._refused.pop(req_id, None)
            if why is not None:
                refused[req_id] = why
        epochs = {
            req_id: self._epochs.pop(req_id)
            for req_id in self._reqs_need_recv
            if req_id in self._epochs
        }
        receiving = [entry[1] for entry in self._reqs_need_recv.values()]
        base = super().build_connector_meta(scheduler_output)
        assert isinstance(base, NixlConnectorMetadata)
        meta = ElasticConnectorMetadata.extend(base)
        meta.required_epochs = epochs
        meta.read_leases = self._read_leases
        self._read_leases = {}
        meta.blocks_to_lease = self._blocks_to_lease
        meta.invalid_params = refused
        self._blocks_to_lease = {}
        if self.pool_policy is not None:
            changes = self.pool_policy.step(
                step_block_ids(scheduler_output, receiving),
                idle=scheduler_output.total_num_scheduled_tokens == 0,
                now=time.monotonic(),
            )
            meta.map_groups = changes.map_groups
            meta.unmap_groups = changes.unmap_groups
            meta.blocks_per_group = self.pool_policy.geometry.blocks_per_group
        return meta

    def request_finished(
        self, request: Request, block_ids: Any
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's answer, plus our epoch in ``kv_transfer_params`` and the
        request's blocks queued for the worker to pin until they are read."""
        self._epochs.pop(request.request_id, None)
        self._refused.pop(request.request_id, None)
        self._read_leases.pop(request.request_id, None)
        if self.pool_policy is not None:
            self.pool_policy.note_freed(b for group in block_ids for b in group)
        delay_free, params = super().request_finished(request, block_ids)
        if delay_free and params is not None:
            params[EPOCH_PARAM] = self._producer_epoch
            expiry = self._reqs_need_send.get(request.request_id)
            if expiry is not None:
                # vLLM's hold on the blocks, in this process's clock (the one
                # its side channel reports to a consumer's handshake).
                params[LEASE_EXPIRY_PARAM] = expiry
                params[LEASE_EXTENSION_PARAM] = self._kv_lease_duration * 2 // 3
                # Our side channel says whether the read came in time.
                params[LEASE_VERDICTS_PARAM] = True
            self._blocks_to_lease[request.request_id] = sorted(
                {b for group in block_ids for b in group}
            )
            if self.pool_policy is not None:
                self.pool_policy.pin(
                    request.request_id, self._blocks_to_lease[request.request_id]
                )
        return delay_free, params
