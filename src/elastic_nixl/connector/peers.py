"""What an engine knows of its peers' KV memory, and how it learns it.

A peer's handshake payload (vLLM's ``NixlAgentMetadata``, plus our optional
fields in :class:`~elastic_nixl.connector.metadata.ElasticAgentMetadata`) is
fetched over vLLM's NIXL side channel. From it a :class:`PeerView` keeps what
reads are planned against: the peer's regions, the extents it registered, its
mapping epoch and its staging offer. A vanilla peer registered whole storages:
the blocks it advertised are what it promises to be readable.

:class:`PeerTable` holds the views of every remote rank; the handshake thread
writes it and the engine thread reads it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq
from vllm.distributed.kv_transfer.kv_connector.utils import EngineId
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    GET_META_MSG,
    NixlAgentMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.utils import zmq_ctx
from vllm.utils.network_utils import make_zmq_path

from elastic_nixl.connector.metadata import ElasticAgentMetadata
from elastic_nixl.connector.planning import ExtentIndex, RegionGeometry
from elastic_nixl.runs import Runs
from elastic_nixl.staging.protocol import StagingOffer

HANDSHAKE_TIMEOUT_MS = 5000

PeerKey = tuple[EngineId, int]  # (engine id, remote tp rank)


@dataclass
class PeerView:
    """What we know of one remote rank's memory."""

    agent_name: str
    regions: list[RegionGeometry]
    device_id: int
    elastic: bool
    epoch: int
    extents: ExtentIndex
    host: str = ""
    port: int = 0
    staging: StagingOffer | None = None

    @classmethod
    def from_metadata(
        cls, meta: NixlAgentMetadata, agent_name: str, host: str, port: int
    ) -> PeerView:
        """The view a handshake payload describes."""
        ext = meta if isinstance(meta, ElasticAgentMetadata) else None
        counts = meta.region_num_blocks or [meta.num_blocks] * len(
            meta.kv_caches_base_addr
        )
        capacity = ext.virtual_num_blocks if ext is not None else None
        regions = [
            RegionGeometry(base, block_len, stride, capacity or count)
            for base, block_len, stride, count in zip(
                meta.kv_caches_base_addr,
                meta.block_lens,
                meta.block_strides,
                counts,
                strict=True,
            )
        ]
        if ext is not None and ext.registered_extents is not None:
            spans = [(int(b), int(n)) for b, n in ext.registered_extents]
            elastic = True
            epoch = ext.elastic_epoch or 0
        else:
            spans = [
                (g.base, n * g.block_stride)
                for g, n in zip(regions, counts, strict=True)
                if n
            ]
            elastic = False
            epoch = 0
        return cls(
            agent_name=agent_name,
            regions=regions,
            device_id=meta.device_id,
            elastic=elastic,
            epoch=epoch,
            # An elastic peer's spans are its NIXL registrations: a descriptor
            # must not cross from one into the next, so they stay apart. A
            # static peer's overlapping spans (regions sharing a storage) merge.
            extents=ExtentIndex.build(
                sorted(spans) if elastic else Runs.from_spans(spans).spans()
            ),
            host=host,
            port=port,
            staging=ext.staging if ext is not None else None,
        )


@dataclass(frozen=True)
class ClockBounds:
    """Where a peer's clock stands against ours: at our ``perf_counter`` t its
    ``perf_counter`` lies in ``[t + lo, t + hi]`` (one side-channel round
    trip: the peer read its clock between our send and our receive)."""

    lo: float
    hi: float

    @property
    def width(self) -> float:
        return self.hi - self.lo


def fetch_handshake_timed(
    host: str, port: int, pp_rank: int, tp_rank: int
) -> tuple[bytes, ClockBounds | None]:
    """One ``GET_META`` round trip on vLLM's NIXL side channel: the payload,
    and the peer's clock against ours if it sent it (vLLM's listener does)."""
    path = make_zmq_path("tcp", host, port)
    with zmq_ctx(zmq.REQ, path) as sock:
        sock.setsockopt(zmq.RCVTIMEO, HANDSHAKE_TIMEOUT_MS)
        sent = time.perf_counter()
        sock.send(msgspec.msgpack.encode((GET_META_MSG, pp_rank, tp_rank)))
        parts = sock.recv_multipart()
        received = time.perf_counter()
    if len(parts) != 2:
        raise ValueError(
            f"NIXL side channel {host}:{port} answered {len(parts)} frames, expected 2"
        )
    bounds = None
    try:
        remote = msgspec.msgpack.decode(parts[1])
    except msgspec.DecodeError:
        remote = None
    if isinstance(remote, float) and math.isfinite(remote):
        bounds = ClockBounds(remote - received, remote - sent)
    return bytes(parts[0]), bounds


class PeerTable:
    """Peer views by ``(engine id, remote rank)``, safe across threads.

    ``stash`` keeps the payload our handshake fetched until vLLM's handshake
    calls ``add_remote_agent`` for the same rank, which ``claim`` s it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[PeerKey, PeerView] = {}
        self._fetched: dict[PeerKey, tuple[ElasticAgentMetadata, str, int]] = {}
        self._clocks: dict[EngineId, ClockBounds] = {}

    def note_clock(self, engine_id: EngineId, bounds: ClockBounds | None) -> None:
        """Keep the tightest bounds seen on ``engine_id``'s clock."""
        if bounds is None:
            return
        with self._lock:
            known = self._clocks.get(engine_id)
            if known is None or bounds.width < known.width:
                self._clocks[engine_id] = bounds

    def clock(self, engine_id: EngineId) -> ClockBounds | None:
        """Bounds on ``engine_id``'s clock against ours, if measured."""
        with self._lock:
            return self._clocks.get(engine_id)

    def stash(
        self, key: PeerKey, meta: ElasticAgentMetadata, host: str, port: int
    ) -> None:
        """Keep a fetched payload until vLLM's handshake adds the agent."""
        with self._lock:
            self._fetched[key] = (meta, host, port)

    def claim(self, key: PeerKey) -> tuple[ElasticAgentMetadata, str, int] | None:
        """The stashed payload for ``key`` (and where it came from), once."""
        with self._lock:
            return self._fetched.pop(key, None)

    def put(self, key: PeerKey, view: PeerView) -> None:
        with self._lock:
            self._views[key] = view

    def get(self, key: PeerKey) -> PeerView:
        with self._lock:
            return self._views[key]

    def any_rank(self, engine_id: EngineId) -> PeerView | None:
        """A view of some rank of ``engine_id`` (all ranks share its kind)."""
        with self._lock:
            for (eid, _), view in self._views.items():
                if eid == engine_id:
                    return view
        return None

    def ranks(self, engine_id: EngineId) -> list[int]:
        """Remote ranks of ``engine_id`` we hold views of."""
        with self._lock:
            return [rank for (eid, rank) in self._views if eid == engine_id]

    def forget(self, engine_id: EngineId) -> None:
        """Drop every view of ``engine_id`` (vLLM cleaned the engine up)."""
        with self._lock:
            for key in [k for k in self._views if k[0] == engine_id]:
                del self._views[key]
            self._clocks.pop(engine_id, None)
