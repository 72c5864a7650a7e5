"""Worker side of ElasticNixlConnector.

Subclasses vLLM's ``NixlPullConnectorWorker`` and overrides only where elastic
memory changes the answer:

* ``register_kv_caches``: static memory goes to vLLM unchanged; elastic
  memory registers each mapped extent once and follows mapping events;
* ``_nixl_handshake`` / ``add_remote_agent``: also read what an elastic peer
  registered, and skip prepping one descriptor per remote block;
* ``_read_blocks_for_req`` / ``_read_blocks``: refresh stale peer metadata,
  then build the descriptors of one request from its block ids, coalesced;
* ``start_load_kv`` / ``get_transfer_results``: pin blocks while peers read
  them (leases), release when done;
* staged path (where UCX would serve a READ by software emulation: GPU
  memory it cannot export, e.g. VMM, or any GPU memory without active NVLink;
  ``planning.choose_transfer_path``): the consumer grants bounce slots, the
  producer gathers its blocks into its own slots and WRITEs them into the
  consumer's, which scatters them (:mod:`.staged`); completions re-enter
  vLLM's bookkeeping here;
* a refresh of a producer's registrations waits off the read path
  (:mod:`.refresh`), and a read is reported successful only if it completed
  while the producer still held the blocks (:mod:`.leases`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.utils import (
    EngineId,
    TransferTopology,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlAgentMetadata,
    NixlConnectorMetadata,
    NixlHandshakePayload,
    ReqMeta,
    compute_nixl_compatibility_hash,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.tp_mapping import ReadSpec
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec, MLAAttentionSpec

from elastic_nixl.capabilities import (
    KVMemory,
    KVMemoryError,
    Lease,
    MappingEvent,
    MappingStability,
    MemoryKind,
)
from elastic_nixl.compat import check_expandable_segments
from elastic_nixl.config import ElasticNixlSettings, TransferPath
from elastic_nixl.connector.handshake import PER_REQUEST_HANDLE
from elastic_nixl.connector.leases import ReadLease
from elastic_nixl.connector.metadata import (
    ElasticAgentMetadata,
    ElasticConnectorMetadata,
    ElasticWorkerMetadata,
)
from elastic_nixl.connector.peers import PeerView
from elastic_nixl.connector.planning import (
    ExtentIndex,
    RegionGeometry,
    blocks_beyond,
    choose_transfer_path,
    plan_read,
)
from elastic_nixl.connector.pool_worker import (
    PoolApplier,
    agent_without_progress_thread,
)
from elastic_nixl.connector.reading import ReadingWorker
from elastic_nixl.connector.regions import (
    SHARED_GROUP,
    LayerView,
    Region,
    block_spans,
    mapped_prefix_blocks,
    plan_regions,
)
from elastic_nixl.connector.registration import ExtentRegistrar
from elastic_nixl.connector.staged import AgentFactory, StagedLink, region_views
from elastic_nixl.connector.stats import ElasticKVConnectorStats, ElasticStats
from elastic_nixl.memory.cuda import cuda_ipc_read_available
from elastic_nixl.memory.resolve import resolve_kv_memory
from elastic_nixl.releases import vanilla_peer_coverage  # vllm-release
from elastic_nixl.staging.reader import StagedRead

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = init_logger(__name__)


class ElasticNixlConnectorWorker(ReadingWorker):
    """NixlPullConnectorWorker for KV memory that grows and shrinks."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        engine_id: str,
        kv_cache_config: KVCacheConfig,
        settings: ElasticNixlSettings,
        nixl_agent: Any | None = None,
        staging_agent_factory: AgentFactory | None = None,
    ) -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config)
        if nixl_agent is not None:
            # Tests hand in a mock agent; vLLM made a real one above.
            self.nixl_wrapper = nixl_agent
        elif not settings.nixl_progress_thread:
            from vllm.distributed.nixl_utils import NixlWrapper, nixl_agent_config

            self.nixl_wrapper = agent_without_progress_thread(
                vllm_config.kv_transfer_config,
                self.nixl_backends,
                NixlWrapper,
                nixl_agent_config,
            )
        self.settings = settings
        self.memory: KVMemory | None = None
        # vLLM's transfer stats plus the elastic pool's (connector/stats.py).
        self.xfer_stats = pool_stats = ElasticKVConnectorStats()
        self._pool = PoolApplier(kv_cache_config, settings.chunk_bytes, pool_stats)
        self._regions: list[Region] = []
        self._registrar = ExtentRegistrar(
            self.nixl_wrapper, self.nixl_backends, self.elastic_stats
        )
        self._reg_lock = threading.RLock()
        self._unsubscribe: Callable[[], None] | None = None
        self._reported_epoch = -1
        self._handshake_stale = False
        self._extent_index: tuple[int, ExtentIndex] | None = None
        # Consumer: requests the scheduler refused (bad kv_transfer_params).
        self._refused_reads: dict[str, str] = {}
        self._send_leases: dict[str, Lease] = {}
        self._recv_leases: dict[str, Lease] = {}
        # Staged path: our own NIXL agents, each driven by its own thread.
        self.staged = StagedLink(
            engine_id,
            self.tp_rank,
            settings,
            self.nixl_backends,
            staging_agent_factory,
        )

    # ------------------------------------------------------------------
    # Registration
    # ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Static memory: vLLM's registration, unchanged. Elastic memory: each
        mapped extent once, kept in sync through the memory's events."""
        # Our view of the layers; vLLM's static path needs none (it handles
        # what we do not, e.g. Mamba state), so a refusal waits until needed.
        unsupported: NotImplementedError | None = None
        regions: list[Region] = []
        try:
            views = self._layer_views(kv_caches)
            regions = plan_regions(views)
        except NotImplementedError as e:
            unsupported = e
        memory = resolve_kv_memory(
            kv_caches,
            self.settings.allocator,
            self.num_blocks,
            block_spans=(lambda b: block_spans(regions, b)) if regions else None,
            num_virtual_blocks=min(r.num_blocks for r in regions) if regions else None,
        )
        self.memory = memory
        self._regions = regions
        self._check_transfer_path(memory)
        if memory.capabilities.stability is MappingStability.STATIC:
            if memory.capabilities.memory_kind is MemoryKind.CUDA:
                check_expandable_segments()
            staged = self.transfer_path is TransferPath.STAGED and self._is_producer()
            if staged and unsupported is not None:
                raise unsupported
            logger.info("ElasticNixlConnector: static KV memory, vLLM registration")
            super().register_kv_caches(kv_caches)
            if staged:
                self.staged.serve(region_views(regions, kv_caches), memory)
                self._offer_slots_with_vllm_payload()
            return
        if unsupported is not None:
            raise unsupported
        self._register_elastic(kv_caches, memory, regions)

    def _offer_slots_with_vllm_payload(self) -> None:
        """Static memory on the staged path: vLLM's own handshake payload, plus
        our staging offer (an optional field vanilla peers ignore)."""
        payload = self.xfer_handshake_metadata
        assert isinstance(payload, NixlHandshakePayload)
        meta = msgspec.msgpack.decode(
            payload.agent_metadata_bytes, type=ElasticAgentMetadata
        )
        meta.staging = self.staged.offer
        self.xfer_handshake_metadata = NixlHandshakePayload(
            compatibility_hash=payload.compatibility_hash,
            agent_metadata_bytes=msgspec.msgpack.encode(meta),
        )

    def _check_transfer_path(self, memory: KVMemory) -> None:
        """Decide, and say once, how this memory moves; never slow in silence."""
        caps = memory.capabilities
        read_fast = (
            cuda_ipc_read_available(memory.reservation.device)
            if caps.memory_kind is MemoryKind.CUDA
            else None
        )
        choice = choose_transfer_path(
            caps.memory_kind, caps.export_kinds, self.settings.transfer_path, read_fast
        )
        self.transfer_path = choice.path
        log = logger.warning if "emulation" in choice.reason else logger.info
        log(
            "ElasticNixlConnector: transfer path %s: %s",
            choice.path.value,
            choice.reason,
        )

    def _layer_views(self, kv_caches: dict[str, torch.Tensor]) -> list[LayerView]:
        views = []
        for name, cache in kv_caches.items():
            spec = self._layer_specs.get(name)
            if spec is None:
                continue  # vLLM skips layers that share another layer's cache
            if isinstance(spec, MambaSpec) or not isinstance(spec, AttentionSpec):
                raise NotImplementedError(
                    f"ElasticNixlConnector supports attention KV caches on elastic "
                    f"memory; layer {name} has {type(spec).__name__}. Use "
                    "kv_connector_extra_config {'allocator': 'static'}."
                )
            if cache.ndim < 2:
                raise NotImplementedError(
                    f"layer {name}: flat KV views (shared HMA buffers) are not "
                    "supported on elastic memory"
                )
            page = spec.page_size_bytes // self._physical_blocks_per_logical_kv_block
            if not (_is_dense(cache[0]) and cache[0].nbytes == page):
                # Heads outside layers (BHLNC, LHBNC): a layer's page in a block
                # is several pieces, not one run a descriptor can cover.
                raise NotImplementedError(
                    f"ElasticNixlConnector on elastic memory needs each layer's page "
                    f"of a block to be contiguous; layout {self.kv_cache_layout} "
                    f"splits it (layer {name}). Use LBHNC, LBNHC, BLHNC or BLNHC."
                )
            views.append(
                LayerView(
                    name=name,
                    data_ptr=cache.data_ptr(),
                    num_blocks=int(cache.shape[0]),
                    block_stride=cache.stride(0) * cache.element_size(),
                    page_bytes=spec.page_size_bytes
                    // self._physical_blocks_per_logical_kv_block,
                    group_id=self.kv_cache_config.transfer_group_index_by_layer[name],
                    is_mla=isinstance(spec, MLAAttentionSpec),
                )
            )
        if not views:
            raise KVMemoryError("no attention KV cache layers to register")
        return views

    def _check_elastic_supported(self) -> None:
        ratio = self._physical_blocks_per_logical_kv_block
        unsupported = {
            "kv_buffer_device='cpu' staging on a GPU": self.use_host_buffer,
            "pipeline_parallel_size > 1": self.pp_size > 1,
            "prefill/decode context parallelism": self.pcp_size > 1
            or self.dcp_size > 1,
            "kernel block size != block_size": ratio != 1,
        }
        for what, present in unsupported.items():
            if present:
                raise NotImplementedError(
                    f"ElasticNixlConnector on elastic memory does not support {what}; "
                    "use kv_connector_extra_config {'allocator': 'static'}"
                )

    def _register_elastic(
        self,
        kv_caches: dict[str, torch.Tensor],
        memory: KVMemory,
        regions: list[Region],
    ) -> None:
        self._check_elastic_supported()
        self.elastic = True
        first = next(iter(kv_caches.values()))
        self.transfer_topo = TransferTopology(
            tp_rank=self.transfer_tp_rank,
            tp_size=self.transfer_tp_size,
            block_size=self.block_size,
            engine_id=self.engine_id,
            is_mla=self.use_mla,
            total_num_kv_heads=1
            if self.use_mla
            else self.model_config.get_total_num_kv_heads(),
            attn_backends=self.attn_backends,
            dcp_size=self.dcp_size,
            tensor_shape=first.shape,
            is_mamba=False,
        )
        self.compat_hash = compute_nixl_compatibility_hash(
            self.vllm_config, self.backend_name, transfer_mode=self._TRANSFER_MODE
        )
        mem_type = memory.capabilities.memory_kind.nixl_mem_type
        self.device_id = memory.reservation.device
        self.block_len_per_layer = [r.geometry.block_len for r in regions]
        self.block_stride_per_layer = [r.geometry.block_stride for r in regions]
        self.region_group_ids = [r.group_id for r in regions]
        self.region_names = [r.name for r in regions]
        self._region_is_mla = [r.is_mla for r in regions]
        self.region_mem_types = [mem_type] * len(regions)
        self.num_regions = len(regions)
        self.kv_caches_base_addr[self.engine_id][self.tp_rank] = [
            r.geometry.base for r in regions
        ]
        self._uses_region_group_mapping = len(set(self.region_group_ids)) > 1
        if SHARED_GROUP in self.region_group_ids:
            raise NotImplementedError(
                "ElasticNixlConnector: a KV region shared by several cache groups "
                "is not supported on elastic memory"
            )
        self._mixed_mem_types = False
        self._skip_dram_xfer = False
        self._set_region_layers([])
        self.device_kv_caches = kv_caches
        self.src_xfer_handles_by_block_size[self.block_size] = PER_REQUEST_HANDLE
        self.src_blocks_data = np.empty((0, 3), dtype=np.uint64)
        if self.transfer_path is TransferPath.STAGED and self._is_producer():
            self.staged.serve(region_views(regions, kv_caches), memory)
        with self._reg_lock:
            self._registrar.sync(memory)
            self._unsubscribe = memory.subscribe(self._on_mapping_event)
            self._publish_handshake()
        logger.info(
            "ElasticNixlConnector: %d region(s), %d virtual blocks, "
            "%d extent(s) / %d bytes registered (epoch %d)",
            len(regions),
            memory.num_virtual_blocks,
            len(self._registrar.spans),
            self.elastic_stats.registered_bytes,
            memory.epoch,
        )

    def apply_pool_changes(self, metadata: Any) -> None:
        """Pin what peers will read, then release and map the block groups the
        scheduler decided (before the forward pass and this step's reads)."""
        if not isinstance(metadata, ElasticConnectorMetadata):
            return
        for req_id, block_ids in metadata.blocks_to_lease.items():
            self._lease_for_send(req_id, block_ids)
        metadata.blocks_to_lease = {}
        self._pool.apply(
            self.memory,
            metadata.blocks_per_group,
            metadata.map_groups,
            metadata.unmap_groups,
        )

    def _on_mapping_event(self, event: MappingEvent) -> None:
        """Follow the allocator, O(the change): (de)register what changed; the
        description peers read is rebuilt once per engine step, not per event
        (:meth:`build_worker_meta`)."""
        with self._reg_lock:
            self._registrar.on_event(event)
            self._handshake_stale = True

    def _publish_handshake(self) -> None:
        """Rebuild the handshake payload from what is registered now."""
        assert self.memory is not None and self.compat_hash is not None
        self._handshake_stale = False
        extents = self._registrar.spans
        # vllm-release: what a vanilla peer of this vLLM can address (releases.py)
        prefix = mapped_prefix_blocks(self._regions, vanilla_peer_coverage(extents))
        self.region_num_blocks = [prefix] * self.num_regions
        self.num_descs = prefix * self.num_regions
        self.dst_num_blocks[self.engine_id] = prefix
        self.dst_region_num_blocks[self.engine_id] = self.region_num_blocks
        self.dst_region_group_ids[self.engine_id] = self.region_group_ids
        self.dst_uses_region_group_mapping[self.engine_id] = (
            self._uses_region_group_mapping
        )
        self.dst_region_mem_types[self.engine_id] = self.region_mem_types
        meta = ElasticAgentMetadata(
            engine_id=self.engine_id,
            agent_metadata=self.nixl_wrapper.get_agent_metadata(),
            device_id=self.device_id,
            kv_caches_base_addr=self.kv_caches_base_addr[self.engine_id][self.tp_rank],
            # A vanilla peer preps one descriptor per advertised block: offer
            # it the leading blocks that are registered in every region.
            num_blocks=prefix,
            block_lens=self.block_len_per_layer,
            block_strides=self.block_stride_per_layer,
            kv_cache_layout=self.kv_cache_layout,
            block_size=self.block_size,
            ssm_sizes=self._mamba_ssm_size,
            attn_backend_name=self.backend_name,
            physical_blocks_per_logical_kv_block=self._physical_blocks_per_logical_kv_block,
            region_num_blocks=self.region_num_blocks,
            region_group_ids=self.region_group_ids,
            region_names=self.region_names,
            region_mem_types=self.region_mem_types,
            dcp_size=self.dcp_size,
            pcp_size=self.pcp_size,
            region_members=self.region_members,
            elastic_epoch=self.memory.epoch,
            registered_extents=extents,
            virtual_num_blocks=min(r.num_blocks for r in self._regions),
            staging=self.staged.offer,
        )
        self.xfer_handshake_metadata = NixlHandshakePayload(
            compatibility_hash=self.compat_hash,
            agent_metadata_bytes=msgspec.msgpack.encode(meta),
        )

    def build_worker_meta(self) -> ElasticWorkerMetadata | None:
        """For the scheduler to serve on the side channel: the new handshake
        payload, once per mapping change, and whether the requests released
        this step were read in time (:class:`~.leases.LeaseVerdicts`)."""
        verdicts = self._take_lease_verdicts()
        payloads: dict[tuple[int, int], bytes] = {}
        epoch = 0
        if self.elastic and self.memory is not None:
            with self._reg_lock:
                if self._handshake_stale:
                    self._publish_handshake()
                epoch = self.memory.epoch
                if (
                    epoch != self._reported_epoch
                    and self.xfer_handshake_metadata is not None
                ):
                    self._reported_epoch = epoch
                    payload = msgspec.msgpack.encode(self.xfer_handshake_metadata)
                    payloads[(0, self.tp_rank)] = payload
        if not payloads and not verdicts:
            return None
        by_rank = {self.tp_rank: verdicts} if verdicts else {}
        return ElasticWorkerMetadata(epoch, payloads, by_rank)

    # ------------------------------------------------------------------
    # Staged path
    # ------------------------------------------------------------------

    def _is_producer(self) -> bool:
        ktc = self.vllm_config.kv_transfer_config
        return ktc is not None and ktc.is_kv_producer

    def _uses_slots_of(self, meta: NixlAgentMetadata) -> bool:
        return (
            isinstance(meta, ElasticAgentMetadata)
            and meta.staging is not None
            and self.settings.transfer_path is not TransferPath.DIRECT
        )

    def _reads_staged(self, view: PeerView) -> bool:
        """Whether this peer's blocks reach us through slots (it pushes them
        with WRITE): it offers them and this engine was not told to read
        directly."""
        return (
            view.staging is not None
            and self.settings.transfer_path is not TransferPath.DIRECT
        )

    def _read_staged(
        self,
        view: PeerView,
        request_id: str,
        notif_id: bytes,
        local_ids: Sequence[Sequence[int]],
        remote_ids: Sequence[Sequence[int]],
    ) -> None:
        """Hand the request to the staged link (the producer pushes into our
        slots); completion comes back through get_transfer_results. Raises if
        the request cannot be staged."""
        assert view.staging is not None and self.memory is not None
        flat_local = [int(b) for b in local_ids[0]]
        flat_remote = [int(b) for b in remote_ids[0]]
        self._recv_leases[request_id] = self.memory.lease(sorted(set(flat_local)))
        self.staged.read(
            region_views(self._regions, self.device_kv_caches),
            self.memory.capabilities.memory_kind.nixl_mem_type,
            StagedRead(request_id, view.staging, flat_remote, flat_local),
            view.agent_name,
            notif_id,
        )
        self.elastic_stats.staged_reads += 1

    def _collect_staged(self) -> None:
        """Feed finished staged reads into vLLM's own completion bookkeeping."""
        for result in self.staged.poll():
            req_id = result.req_id
            if result.error is not None:
                self.elastic_stats.refused_reads += 1
                self._log_failure(
                    failure_type="elastic_staged_read_failed",
                    req_id=req_id,
                    msg=result.error,
                )
                self._release_recv_lease(req_id)
                self._failed_recv_reqs.put(req_id)
                continue
            try:
                # The producer frees its blocks on this, as after a direct READ.
                self.nixl_wrapper.send_notif(
                    result.producer_agent, notif_msg=result.notif_id
                )
            except Exception as e:  # noqa: BLE001 - the KV is here; P times out
                self._log_failure(
                    failure_type="notification_failed",
                    msg="P worker blocks will be freed after timeout.",
                    req_id=req_id,
                    error=e,
                )
            # vLLM seeded an empty handle list for the request; now that it is
            # no longer held back below, vLLM reports it done this step.
            self._recving_transfers.setdefault(req_id, [])

    def _pop_done_transfers(
        self, transfers: dict[str, list[int]]
    ) -> tuple[set[str], set[str]]:
        done, failed = super()._pop_done_transfers(transfers)
        if transfers is self._recving_transfers:
            # A staged read has no NIXL handle of vLLM's agent to wait on: hold
            # its (empty) entry until the staged reader reports it.
            reading = done & self.staged.pending
            for req_id in reading:
                transfers[req_id] = []
            done -= reading
            # Never report bytes read after the producer's lease ended.
            for req_id, why in self._vouch_for_reads(done, transfers).items():
                self.elastic_stats.late_reads += 1
                self._log_failure(
                    failure_type="elastic_read_after_lease", req_id=req_id, msg=why
                )
                self._release_recv_lease(req_id)
                failed.add(req_id)  # vLLM: done and failed = failed receive
        return done, failed

    # ------------------------------------------------------------------
    # Reads
    # ------------------------------------------------------------------

    def start_load_kv(self, metadata: NixlConnectorMetadata) -> None:
        """Pin the blocks peers will read and note the epochs reads need,
        then start vLLM's reads."""
        if isinstance(metadata, ElasticConnectorMetadata):
            self._required_epochs.update(metadata.required_epochs)
            self._refused_reads.update(metadata.invalid_params)
            for req_id, block_ids in metadata.blocks_to_lease.items():
                self._lease_for_send(req_id, block_ids)
            for req_id, terms in metadata.read_leases.items():
                eid, remote_id, expiry, ext, answers = terms
                lease = ReadLease(expiry, ext, answers=answers)
                self._read_leases.track(req_id, eid, remote_id, lease)
        # vLLM sends this step's heartbeats to engines it has shaken hands with.
        beating = [
            (eid, list(info.req_ids))
            for eid, info in metadata.heartbeat_by_engine.items()
            if eid in self._remote_agents
        ]
        super().start_load_kv(metadata)
        self._note_heartbeats(beating)

    def _lease_for_send(self, req_id: str, block_ids: list[int]) -> None:
        if self.memory is None or not self.elastic or not block_ids:
            return
        try:
            self._send_leases[req_id] = self.memory.lease(block_ids)
        except KVMemoryError as e:
            # The consumer's read of these blocks will fail and be reported on
            # its side; this engine keeps serving.
            logger.error("ElasticNixlConnector: cannot pin blocks of %s: %s", req_id, e)

    def _read_blocks_for_req(self, req_id: str, meta: ReqMeta) -> None:
        assert meta.remote is not None
        engine_id = meta.remote.engine_id
        self._apply_fetched(engine_id)
        view = (
            self.peers.any_rank(engine_id) if engine_id in self._remote_agents else None
        )
        refused = self._refused_reads.pop(req_id, None)
        if refused is None and view is not None and not view.elastic:
            # Name ids beyond a static peer's capacity (NIXL: INVALID_PARAM).
            refused = blocks_beyond(meta.remote.block_ids, view.regions, engine_id)
        if refused is not None:
            # vLLM tracks the request as a receive: fail it as one, alone.
            self.elastic_stats.refused_reads += 1
            self._log_failure(
                failure_type="invalid_kv_transfer_params", req_id=req_id, msg=refused
            )
            self._failed_recv_reqs.put(req_id)
            return
        if (
            view is not None
            and view.elastic
            and not self._reads_staged(view)  # the producer checks, not us
            and req_id not in self._refreshed_for
        ):
            needed = self._required_epochs.get(req_id, 0)
            if needed > view.epoch or self._remote_blocks_unknown(view, meta):
                self._refreshed_for.add(req_id)
                self._refresh_then_read(req_id, meta, engine_id)
                return
        try:
            super()._read_blocks_for_req(req_id, meta)
        except Exception as e:  # noqa: BLE001 - one request, not the engine
            # vLLM's own code raises on shapes it cannot map (e.g. fewer remote
            # blocks than local ones once block sizes are accounted for).
            self.elastic_stats.refused_reads += 1
            self._log_failure(
                failure_type="invalid_kv_transfer_params",
                req_id=req_id,
                msg=f"{type(e).__name__}: {e}",
                meta=meta,
            )
            self._failed_recv_reqs.put(req_id)

    def _read_blocks(
        self,
        read_spec: ReadSpec,
        dst_engine_id: str,
        request_id: str,
        remote_request_id: str,
        local_xfer_side_handle: int,
        local_dram_handle: int | None,
        remote_xfer_side_handle: int,
        expected_consumers: int,
        awaiting_kvs: bool,
    ) -> bool:
        per_request = (
            local_xfer_side_handle == PER_REQUEST_HANDLE
            or remote_xfer_side_handle == PER_REQUEST_HANDLE
        )
        if not per_request or not any(read_spec.local_block_ids):
            # vLLM's path: static peers, and full prefix hits (notify only).
            return super()._read_blocks(
                read_spec,
                dst_engine_id,
                request_id,
                remote_request_id,
                local_xfer_side_handle,
                local_dram_handle,
                remote_xfer_side_handle,
                expected_consumers,
                awaiting_kvs,
            )
        remote_rank = read_spec.remote_rank
        view = self.peers.get((dst_engine_id, remote_rank))
        local_ids, remote_ids = self._apply_prefix_caching(
            decode_block_ids=read_spec.local_block_ids,
            prefill_block_ids=read_spec.remote_block_ids,
            decode_physical_per_logical=1,
            prefill_physical_per_logical=1,
        )
        notif_id = f"{remote_request_id}:{expected_consumers}".encode()
        handle = None
        try:
            if self._reads_staged(view):
                self._read_staged(view, request_id, notif_id, local_ids, remote_ids)
                return True
            plan = plan_read(
                self._local_geometry(),
                view.regions,
                self._ids_by_region(local_ids, self.region_group_ids),
                self._ids_by_region(
                    remote_ids, self.dst_region_group_ids[dst_engine_id]
                ),
                self._local_extents(),
                view.extents,
                local_device=self.device_id,
                remote_device=view.device_id,
            )
            flat_local = [b for group in local_ids for b in group]
            if self.memory is not None and self.elastic:
                self._recv_leases[request_id] = self.memory.lease(
                    sorted(set(flat_local))
                )
            mem_type = self.nixl_memory_type
            remote_descs = self.nixl_wrapper.get_xfer_descs(
                plan.remote, self._remote_mem_type(dst_engine_id)
            )
            try:
                handle = self.nixl_wrapper.initialize_xfer(
                    "READ",
                    self.nixl_wrapper.get_xfer_descs(plan.local, mem_type),
                    remote_descs,
                    view.agent_name,
                    notif_id,
                )
            except Exception as e:  # noqa: BLE001 - named below, then failed alone
                known = self.nixl_wrapper.check_remote_metadata(
                    view.agent_name, remote_descs
                )
                raise KVMemoryError(
                    f"{e} ({len(plan.remote)} remote descriptors, which NIXL's view "
                    f"of the peer {'has' if known else 'lacks'})"
                ) from e
            self.nixl_wrapper.transfer(handle)
        except Exception as e:  # noqa: BLE001 - NIXL errors derive from Exception
            # As vLLM's _read_blocks: any failure fails this request alone.
            self.elastic_stats.refused_reads += 1
            self._log_failure(
                failure_type="elastic_read_refused",
                req_id=request_id,
                msg=f"{e} (engine {dst_engine_id}, epoch {view.epoch})",
                dst_engine_id=dst_engine_id,
                remote_rank=remote_rank,
            )
            self._release_recv_lease(request_id)
            if not self._handle_failed_transfer(
                request_id, handle, self._recv_failures
            ):
                assert handle is not None
                self._recving_transfers[request_id].append(handle)
            return False
        self._recving_transfers[request_id].append(handle)
        st = self.elastic_stats
        st.reads_posted += 1
        st.descriptors_posted += plan.num_descs
        st.blocks_read += plan.num_blocks
        st.bytes_read += plan.nbytes
        return True

    def _remote_mem_type(self, engine_id: EngineId) -> str:
        types = set(self.dst_region_mem_types.get(engine_id) or [self.nixl_memory_type])
        if len(types) != 1:
            raise NotImplementedError(
                f"engine {engine_id} advertises mixed memory types {sorted(types)}"
            )
        return types.pop()

    def _local_geometry(self) -> list[RegionGeometry]:
        if self.elastic:
            return [r.geometry for r in self._regions]
        bases = self.kv_caches_base_addr[self.engine_id][self.tp_rank]
        return [
            RegionGeometry(b, n, s, self.num_blocks)
            for b, n, s in zip(
                bases,
                self.block_len_per_layer,
                self.block_stride_per_layer,
                strict=True,
            )
        ]

    def _local_extents(self) -> ExtentIndex:
        if self.elastic:
            # Rebuilt only after registrations changed, not on every read.
            with self._reg_lock:
                version = self._registrar.version
                if self._extent_index is None or self._extent_index[0] != version:
                    index = ExtentIndex.build(self._registrar.spans)
                    self._extent_index = (version, index)
                return self._extent_index[1]
        assert self.memory is not None
        return ExtentIndex.build(
            (e.base, e.nbytes) for e in self.memory.mapped_extents()
        )

    @staticmethod
    def _ids_by_region(
        block_ids: Sequence[Sequence[int]], region_groups: Sequence[int]
    ) -> list[Sequence[int]]:
        return [block_ids[g if g >= 0 else 0] for g in region_groups]

    # ------------------------------------------------------------------
    # Completion, leases, shutdown
    # ------------------------------------------------------------------

    def get_transfer_results(self) -> KVConnectorTransferResults:
        """vLLM's results (staged reads fed in first); leases of finished
        requests are released."""
        self._collect_staged()
        results = super().get_transfer_results()
        if len(self._read_leases):
            # Requests aborted before their read: forget their leases.
            clocks = {
                eid: clock[0]
                for eid in self._remote_agents
                if (clock := self._producer_clock(eid)) is not None
            }
            self._read_leases.prune(clocks, older_than_s=600.0)
        for req_id in results.finished_sending:
            lease = self._send_leases.pop(req_id, None)
            if lease is not None:
                lease.release()
        for req_id in results.finished_recving:
            self._release_recv_lease(req_id)
            self._required_epochs.pop(req_id, None)
            self._refreshed_for.discard(req_id)
        return results

    def _release_recv_lease(self, req_id: str) -> None:
        lease = self._recv_leases.pop(req_id, None)
        if lease is not None:
            lease.release()

    def shutdown(self) -> None:
        """Stop following the memory, close the staged path, release leases,
        then vLLM's shutdown and our deregistrations."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._refresher.close()
        self._verdict_waiter.close()
        self.staged.close()
        for leases in (self._send_leases, self._recv_leases):
            for lease in leases.values():
                lease.release()
            leases.clear()
        handles = self.src_xfer_handles_by_block_size
        for size in [s for s, h in handles.items() if h == PER_REQUEST_HANDLE]:
            del handles[size]
        for engine_handles in self.dst_xfer_side_handles.values():
            for rank in [
                r for r, h in engine_handles.items() if h == PER_REQUEST_HANDLE
            ]:
                del engine_handles[rank]
        super().shutdown()
        try:
            self._registrar.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            logger.exception("ElasticNixlConnector: deregistration failed")


def _is_dense(view: torch.Tensor) -> bool:
    """One contiguous run of memory in some dimension order (LBNHC's [H, N, C]
    view is N-major, yet its page is dense)."""
    strides = view.stride()
    order = sorted(range(view.ndim), key=lambda i: -strides[i])
    return view.permute(order).is_contiguous()


__all__ = ["PER_REQUEST_HANDLE", "ElasticNixlConnectorWorker", "ElasticStats"]
