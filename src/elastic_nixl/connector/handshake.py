"""How the worker learns about peers: vLLM's NIXL handshake plus our fields.

vLLM's handshake decodes only its own metadata; an elastic peer also tells
what it registered, its mapping epoch and its staging offer
(:class:`~elastic_nixl.connector.metadata.ElasticAgentMetadata`). This layer of
the worker fetches the same payload first, lets vLLM run its checks, and
keeps a :class:`~elastic_nixl.connector.peers.PeerView` per remote rank. Peers
whose reads are planned per request (either side elastic) skip vLLM's
per-block prepped descriptor lists.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import zmq
from vllm.distributed.kv_transfer.kv_connector.utils import (
    EngineId,
    EngineTransferInfo,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlAgentMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
    NixlPullConnectorWorker,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.tp_mapping import (
    compute_tp_mapping,
)
from vllm.logger import init_logger

from elastic_nixl.connector.metadata import (
    ElasticAgentMetadata,
    decode_agent_metadata,
)
from elastic_nixl.connector.peers import (
    HANDSHAKE_TIMEOUT_MS,
    PeerTable,
    PeerView,
    fetch_handshake_timed,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger(__name__)

T = TypeVar("T")

# Backoff between side-channel attempts to a producer that answered late.
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0


def _retry_on_timeout(call: Callable[[], T], deadline: float, source: str) -> T:
    """``call()``, again after a side-channel receive timeout (``zmq.Again``)
    until ``deadline``; then an error naming the peer and the wait."""
    delay = _RETRY_FIRST_S
    attempts = 0
    start = time.monotonic()
    while True:
        attempts += 1
        try:
            return call()
        except zmq.Again as e:
            if time.monotonic() + delay >= deadline:
                raise TimeoutError(
                    f"the NIXL side channel of {source} did not answer in "
                    f"{time.monotonic() - start:.1f} s ({attempts} attempts of "
                    f"{HANDSHAKE_TIMEOUT_MS / 1000:g} s each); the producer engine is "
                    "overloaded or gone. The wait "
                    "is bounded by kv_lease_duration in kv_connector_extra_config"
                ) from e
            logger.info(
                "ElasticNixlConnector: side channel %s answered late (attempt %d); "
                "retrying",
                source,
                attempts,
            )
            time.sleep(delay)
            delay = min(2 * delay, _RETRY_MAX_S)


# Stands in the handle tables vLLM indexes for peers whose descriptors we
# build per request: nothing is prepped, so nothing is released.
PER_REQUEST_HANDLE = -1


class HandshakeWorker(NixlPullConnectorWorker):
    """vLLM's pull worker that also reads what elastic peers advertise."""

    def __init__(
        self, vllm_config: VllmConfig, engine_id: str, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self.peers = PeerTable()
        ktc = vllm_config.kv_transfer_config
        # How long a handshake or a refresh may keep retrying a producer that
        # answers late: the time it holds a finished request's KV.
        self._handshake_deadline_s = float(
            ktc.get_from_extra_config("kv_lease_duration", 30)
            if ktc is not None
            else 30
        )
        # Whether this engine's own memory is elastic (set at registration).
        self.elastic = False

    def _nixl_handshake(
        self,
        host: str,
        port: int,
        remote_tp_size: int,
        expected_engine_id: str,
        remote_dcp_size: int = 1,
        remote_pp_size: int = 1,
        notif_agents_only: bool = False,
    ) -> tuple[dict[tuple[int, int], str], float]:
        # vLLM decodes only its own metadata fields; read ours from the same
        # payload first, then let vLLM run its handshake (version and hash
        # checks, clock offset) which calls add_remote_agent below. On a busy
        # host the producer's side channel may miss the 5 s receive timeout:
        # retry, as long as the producer may still hold the request's KV.
        assert self.transfer_topo is not None
        deadline = time.monotonic() + self._handshake_deadline_s
        for rank in self.transfer_topo.handshake_target_ranks(
            remote_tp_size, remote_dcp_size
        ):
            payload, clock = _retry_on_timeout(
                functools.partial(fetch_handshake_timed, host, port, 0, rank),
                deadline,
                f"{host}:{port}",
            )
            _, meta = decode_agent_metadata(payload, f"{host}:{port}")
            self.peers.note_clock(expected_engine_id, clock)
            self.peers.stash((expected_engine_id, rank), meta, host, port)
        vllm_handshake = super()._nixl_handshake

        def handshake() -> tuple[dict[tuple[int, int], str], float]:
            return vllm_handshake(
                host,
                port,
                remote_tp_size,
                expected_engine_id,
                remote_dcp_size,
                remote_pp_size,
                notif_agents_only,
            )

        return _retry_on_timeout(handshake, deadline, f"{host}:{port}")

    def add_remote_agent(
        self,
        nixl_agent_meta: NixlAgentMetadata,
        remote_tp_rank: int = 0,
        remote_tp_size: int = 1,
        remote_dcp_size: int = 1,
    ) -> str:
        """vLLM's ``add_remote_agent`` for static pairs; per-request
        descriptors when either side is elastic. Keeps the peer's view."""
        engine_id = nixl_agent_meta.engine_id
        fetched = self.peers.claim((engine_id, remote_tp_rank))
        ext_meta, host, port = fetched or (nixl_agent_meta, "", 0)
        remote_elastic = (
            isinstance(ext_meta, ElasticAgentMetadata)
            and ext_meta.registered_extents is not None
        )
        try:
            if not (self.elastic or remote_elastic or self._uses_slots_of(ext_meta)):
                name = super().add_remote_agent(
                    nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size
                )
            else:
                name = self._add_per_request_agent(
                    nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size
                )
        except RuntimeError as e:
            if "kv_cache_layout" not in str(e):
                raise
            # vLLM names the layouts but not the engines; a user with several
            # engines needs both to find the one to change.
            raise RuntimeError(
                f"KV layout mismatch: local engine {self.engine_id} uses "
                f"{self.kv_cache_layout}, remote engine {engine_id} uses "
                f"{nixl_agent_meta.kv_cache_layout}. Run both with the same "
                "layout (the same kv_connector_extra_config 'allocator' gives the "
                'same layout), or set "enable_permute_local_kv": true in the '
                "consumer's --kv-transfer-config to receive LBHNC into a local "
                "LBNHC cache."
            ) from e
        view = PeerView.from_metadata(ext_meta, name, host, port)
        self.peers.put((engine_id, remote_tp_rank), view)
        return name

    def _add_per_request_agent(
        self,
        meta: NixlAgentMetadata,
        remote_tp_rank: int,
        remote_tp_size: int,
        remote_dcp_size: int,
    ) -> str:
        """vLLM's add_remote_agent minus the per-block prepped descriptor lists,
        for peers whose reads we describe per request."""
        engine_id = meta.engine_id
        existing = self._remote_agents.get(engine_id, {}).get((0, remote_tp_rank))
        if existing is not None:
            return existing
        assert self.transfer_topo is not None
        if (
            meta.block_size != self.block_size
            or remote_tp_size != self.transfer_topo.tp_size
            or meta.physical_blocks_per_logical_kv_block != 1
        ):
            raise NotImplementedError(
                f"ElasticNixlConnector with elastic memory needs equal block size and "
                f"TP on both engines: local engine {self.engine_id} block_size="
                f"{self.block_size} tp={self.transfer_topo.tp_size}, remote engine "
                f"{engine_id} block_size={meta.block_size} tp={remote_tp_size}"
            )
        self.transfer_topo.register_remote_engine(
            engine_id,
            EngineTransferInfo(
                remote_tp_size=remote_tp_size,
                remote_block_size=meta.block_size,
                remote_block_len=meta.block_lens[0],
                remote_physical_blocks_per_logical=1,
                remote_dcp_size=remote_dcp_size,
            ),
        )
        self.tp_mappings[engine_id] = compute_tp_mapping(
            transfer_topology=self.transfer_topo,
            remote_tp_size=remote_tp_size,
            group_spec_types=self._group_spec_types,
            remote_dcp_size=remote_dcp_size,
        )
        name = self.nixl_wrapper.add_remote_agent(meta.agent_metadata)
        num_regions = len(meta.kv_caches_base_addr)
        if engine_id not in self.dst_num_blocks:
            self.dst_num_blocks[engine_id] = meta.num_blocks
            self.dst_region_num_blocks[engine_id] = (
                meta.region_num_blocks or [meta.num_blocks] * num_regions
            )
            self.dst_region_group_ids[engine_id] = (
                meta.region_group_ids or [0] * num_regions
            )
            self.dst_uses_region_group_mapping[engine_id] = (
                len(set(self.dst_region_group_ids[engine_id])) > 1
            )
            self.dst_region_mem_types[engine_id] = (
                meta.region_mem_types or [self.nixl_memory_type] * num_regions
            )
        self.kv_caches_base_addr[engine_id][remote_tp_rank] = meta.kv_caches_base_addr
        self._validate_remote_agent_handshake(meta, remote_tp_size, remote_dcp_size)
        self.dst_xfer_side_handles[engine_id][remote_tp_rank] = PER_REQUEST_HANDLE
        return name

    def _uses_slots_of(self, meta: NixlAgentMetadata) -> bool:
        """Whether reads from this peer go through the slots it offers (then
        they are planned per request, not by vLLM's prepped lists)."""
        return False

    def _fetch_peer(self, engine_id: EngineId, rank: int) -> ElasticAgentMetadata:
        """A peer's current metadata, fetched and validated (handshake thread:
        it waits on the network; NIXL is not touched)."""
        view = self.peers.get((engine_id, rank))
        source = f"{view.host}:{view.port}"
        payload, clock = fetch_handshake_timed(view.host, view.port, 0, rank)
        _, meta = decode_agent_metadata(payload, source)
        if meta.engine_id != engine_id:
            raise RuntimeError(
                f"peer at {source} is now engine {meta.engine_id}, expected {engine_id}"
            )
        self.peers.note_clock(engine_id, clock)
        return meta

    def _apply_peer(
        self, engine_id: EngineId, rank: int, meta: ElasticAgentMetadata, *, idle: bool
    ) -> PeerView:
        """Hand NIXL a peer's new registrations and keep its new view (engine
        thread, so no read is posted meanwhile).

        NIXL adds a known agent's new regions to its old ones, so registrations
        the peer dropped would stay usable here; when no read to the peer is in
        flight (``idle``) the old agent is removed first.
        """
        view = self.peers.get((engine_id, rank))
        if idle:
            self.nixl_wrapper.remove_remote_agent(view.agent_name)
        self.nixl_wrapper.add_remote_agent(meta.agent_metadata)
        fresh = PeerView.from_metadata(meta, view.agent_name, view.host, view.port)
        self.peers.put((engine_id, rank), fresh)
        logger.info(
            "ElasticNixlConnector: refreshed engine %s rank %d: epoch %d -> %d%s",
            engine_id,
            rank,
            view.epoch,
            fresh.epoch,
            "" if idle else " (old registrations kept: reads in flight)",
        )
        return fresh

    def _cleanup_remote_engine(
        self, engine_id: EngineId, *args: Any, **kwargs: Any
    ) -> None:
        handles = self.dst_xfer_side_handles.get(engine_id, {})
        for rank in [r for r, h in handles.items() if h == PER_REQUEST_HANDLE]:
            del handles[rank]
        self.peers.forget(engine_id)
        super()._cleanup_remote_engine(engine_id, *args, **kwargs)
