"""Scheduler side of ElasticNixlConnector.

Adds three things to vLLM's ``NixlPullConnectorScheduler``:

* the side channel serves the worker's *current* handshake payload, which
  changes when the elastic memory grows or shrinks;
* producer requests carry the producer's mapping epoch in
  ``kv_transfer_params`` so a consumer can tell its metadata is stale;
* the blocks of requests a consumer will read are sent to the worker to be
  pinned (leased) until the read is done.
"""

from __future__ import annotations

import threading
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

from elastic_nixl.connector.metadata import (
    EPOCH_PARAM,
    ElasticConnectorMetadata,
    ElasticWorkerMetadata,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class ElasticNixlConnectorScheduler(NixlPullConnectorScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Served by the side-channel thread; updated in place on new epochs.
        self._served_payloads: dict[tuple[int, int], bytes] = {}
        self._producer_epoch = 0
        self._blocks_to_lease: dict[str, list[int]] = {}

    def set_xfer_handshake_metadata(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        """Serve ``metadata`` on the side channel, replaceable later.

        vLLM's version hands its listener a private copy; ours serves a dict
        we keep so later payloads (after growth or shrink) replace earlier ones.
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
            self._nixl_handshake_listener_t = threading.Thread(
                target=self._nixl_handshake_listener,
                args=(
                    self._served_payloads,
                    ready,
                    self._stop_event,
                    self.side_channel_host,
                    self.side_channel_port,
                ),
                daemon=True,
                name="elastic_nixl_handshake_listener",
            )
            self._nixl_handshake_listener_t.start()
            ready.wait()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """vLLM's bookkeeping, then the worker's new payload and epoch."""
        super().update_connector_output(connector_output)
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, ElasticWorkerMetadata):
            self._served_payloads.update(worker_meta.payloads)
            self._producer_epoch = max(self._producer_epoch, worker_meta.epoch)

    @property
    def producer_epoch(self) -> int:
        """The newest mapping epoch this engine's worker reported."""
        return self._producer_epoch

    def request_finished(
        self, request: Request, block_ids: Any
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's answer, plus our epoch in ``kv_transfer_params`` and the
        request's blocks queued for the worker to pin until they are read."""
        delay_free, params = super().request_finished(request, block_ids)
        if delay_free and params is not None:
            params[EPOCH_PARAM] = self._producer_epoch
            self._blocks_to_lease[request.request_id] = sorted(
                {b for group in block_ids for b in group}
            )
        return delay_free, params

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> KVConnectorMetadata:
        """vLLM's metadata plus the epochs reads need and the blocks to pin."""
        epochs = {
            req_id: int(req.kv_transfer_params[EPOCH_PARAM])
            for req_id, (req, *_rest) in self._reqs_need_recv.items()
            if req.kv_transfer_params and EPOCH_PARAM in req.kv_transfer_params
        }
        base = super().build_connector_meta(scheduler_output)
        assert isinstance(base, NixlConnectorMetadata)
        meta = ElasticConnectorMetadata.extend(base)
        meta.required_epochs = epochs
        meta.blocks_to_lease = self._blocks_to_lease
        self._blocks_to_lease = {}
        return meta
