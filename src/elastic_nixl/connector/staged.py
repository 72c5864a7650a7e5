"""The staged path as the connector's worker owns it.

A producer whose KV a peer cannot READ at speed (memory UCX cannot export, or
any GPU memory without active NVLink) runs a
:class:`~elastic_nixl.staging.server.StagingServer` and advertises its offer in
the handshake; a consumer of such a producer hands the request to a
:class:`~elastic_nixl.staging.reader.StagedReader`, which grants slots that the
server fills by WRITE and scatters what arrives. Each runs on a NIXL agent of
its own, made here. :class:`StagedLink` keeps them, and the staged transfers
in flight, so the worker only decides *whether* a read is staged and feeds
finished ones back into vLLM's bookkeeping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from elastic_nixl.capabilities import KVMemory
from elastic_nixl.config import ElasticNixlSettings
from elastic_nixl.connector.regions import Region
from elastic_nixl.staging.protocol import StagingOffer
from elastic_nixl.staging.reader import StagedRead, StagedReader
from elastic_nixl.staging.server import StagingServer

logger = init_logger(__name__)

AgentFactory = Callable[[str], Any]


@dataclass(frozen=True)
class StagedResult:
    """A staged read that ended: ``error`` is None when the blocks arrived."""

    req_id: str
    producer_agent: str  # the producer's vLLM agent, for the completion notif
    notif_id: bytes
    error: str | None


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (host: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_staging_memory(
    settings: ElasticNixlSettings, slot_blocks: int, bytes_per_block: int, free: int
) -> int:
    """The bytes one side's slots take; ``ValueError`` naming the settings when
    they do not fit in ``free`` bytes of the device."""
    total = settings.staging_slots * slot_blocks * bytes_per_block
    if total > free:
        raise ValueError(
            f"kv_connector_extra_config staging_slots={settings.staging_slots} x "
            f"staging_slot_bytes={settings.staging_slot_bytes} needs {total} bytes "
            f"of bounce slots ({slot_blocks} block(s) of {bytes_per_block} bytes a "
            f"slot), but the device has {free} bytes free; lower staging_slots or "
            "staging_slot_bytes"
        )
    return total


def region_views(
    regions: Sequence[Region], kv_caches: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Each region as ``[num_blocks, block_len]`` bytes over the KV memory."""
    if len({r.group_id for r in regions}) > 1:
        raise NotImplementedError(
            "ElasticNixlConnector: staged transfers need one KV cache group; "
            "this model has several (hybrid attention). Use "
            "kv_connector_extra_config {'transfer_path': 'direct'}."
        )
    views = []
    for r in regions:
        cache = kv_caches[r.name]
        storage = cache.untyped_storage()
        views.append(
            torch.empty(0, dtype=torch.uint8, device=cache.device).set_(
                storage,
                r.geometry.base - storage.data_ptr(),
                (r.num_blocks, r.geometry.block_len),
                (r.geometry.block_stride, 1),
            )
        )
    return views


class StagedLink:
    """An engine's staging agents, its server or reader, and reads in flight."""

    def __init__(
        self,
        engine_id: str,
        tp_rank: int,
        settings: ElasticNixlSettings,
        backends: list[str],
        agent_factory: AgentFactory | None = None,
    ) -> None:
        self._engine_id = engine_id
        self._tp_rank = tp_rank
        self._settings = settings
        self._backends = backends
        self._agent_factory = agent_factory
        self._agents: list[Any] = []
        self.server: StagingServer | None = None
        self.reader: StagedReader | None = None
        # req_id -> (producer's vLLM agent, completion notification)
        self._pending: dict[str, tuple[str, bytes]] = {}

    def _new_agent(self, side: str) -> Any:
        name = (
            f"{self._engine_id}-staging-{side}-{self._tp_rank}-{uuid.uuid4().hex[:8]}"
        )
        if self._agent_factory is not None:
            agent = self._agent_factory(name)
        else:
            from vllm.distributed.nixl_utils import NixlWrapper, nixl_agent_config

            agent = NixlWrapper(name, nixl_agent_config(backends=self._backends))
        self._agents.append(agent)
        return agent

    def _slot_blocks(self, views: Sequence[torch.Tensor]) -> int:
        """Blocks a slot holds; refuses slots the device has no room for."""
        per_block = sum(int(v.shape[1]) for v in views)
        blocks = self._settings.staging_slot_blocks(per_block)
        check_staging_memory(
            self._settings, blocks, per_block, free_memory(views[0].device)
        )
        return blocks

    @property
    def offer(self) -> StagingOffer | None:
        """What this engine advertises in its handshake (producers only)."""
        return self.server.offer if self.server is not None else None

    def serve(self, views: Sequence[torch.Tensor], memory: KVMemory) -> None:
        """Start serving this engine's blocks through bounce slots."""
        self.server = StagingServer(
            self._new_agent("server"),
            views,
            memory.lease,
            self._slot_blocks(views),
            self._settings.staging_slots,
            memory.capabilities.memory_kind.nixl_mem_type,
            slot_timeout_s=self._settings.staging_timeout_s,
        )
        logger.info(
            "ElasticNixlConnector: staging server up, %d slot(s) of %d block(s) "
            "(%d bytes registered)",
            self.server.slots,
            self.server.slot_blocks,
            self.server.buffer.nbytes,
        )

    def _reader(self, views: Sequence[torch.Tensor], mem_type: str) -> StagedReader:
        if self.reader is None:
            self.reader = StagedReader(
                self._new_agent("reader"),
                views,
                self._slot_blocks(views),
                self._settings.staging_slots,
                mem_type,
                timeout_s=self._settings.staging_timeout_s,
            )
            logger.info(
                "ElasticNixlConnector: staged reader up, %d slot(s) of %d block(s)",
                self.reader.slots,
                self.reader.slot_blocks,
            )
        return self.reader

    def read(
        self,
        views: Sequence[torch.Tensor],
        mem_type: str,
        read: StagedRead,
        producer_agent: str,
        notif_id: bytes,
    ) -> None:
        """Submit a read; its result comes back from :meth:`poll`. Raises if
        the read cannot be staged at all."""
        self._reader(views, mem_type).submit(read)
        self._pending[read.req_id] = (producer_agent, notif_id)

    def is_pending(self, req_id: str) -> bool:
        """Whether ``req_id`` is being read through the slots."""
        return req_id in self._pending

    @property
    def pending(self) -> set[str]:
        """Requests being read through the slots."""
        return set(self._pending)

    def poll(self) -> list[StagedResult]:
        """Reads that ended since the last poll."""
        if self.reader is None:
            return []
        out = []
        for req_id, error in self.reader.poll_results():
            pending = self._pending.pop(req_id, None)
            if pending is None:
                logger.warning("ElasticNixlConnector: stray staged result %s", req_id)
                continue
            out.append(StagedResult(req_id, pending[0], pending[1], error))
        return out

    def close(self) -> None:
        """Stop the reader and server threads and close their agents."""
        for side in (self.reader, self.server):
            if side is not None:
                side.close()
        self.reader = self.server = None
        for agent in self._agents:
            close = getattr(agent, "close", None)
            if close is not None:
                close()
        self._agents.clear()
