"""Wire additions to vLLM's NIXL metadata.

Every addition is optional with a default, so vanilla NixlConnector peers
decode our payloads (msgspec ignores fields a dataclass does not declare)
and we decode theirs (the fields take their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlAgentMetadata,
    NixlConnectorMetadata,
    NixlHandshakePayload,
)

from elastic_nixl.staging.protocol import StagingOffer

# kv_transfer_params key: the producer's mapping epoch when it finished the
# request. A consumer holding older metadata for that producer refreshes it.
EPOCH_PARAM = "elastic_nixl_epoch"


@dataclass
class ElasticAgentMetadata(NixlAgentMetadata):
    """NixlAgentMetadata plus what an elastic producer has registered."""

    # Mapping epoch of the memory described; None from vanilla peers.
    elastic_epoch: int | None = None
    # Registered extents (base, nbytes), one per NIXL registration.
    registered_extents: list[tuple[int, int]] | None = None
    # Blocks per region that exist in the address space (virtual capacity).
    virtual_num_blocks: int | None = None
    # Bounce slots to read through when this engine's memory cannot be
    # exported to the transport (connector/staged.py); None: read directly.
    staging: StagingOffer | None = None


def decode_agent_metadata(payload_bytes: bytes) -> tuple[str, ElasticAgentMetadata]:
    """Decode a handshake payload; raises ``ValueError`` naming what is wrong."""
    try:
        payload = msgspec.msgpack.decode(payload_bytes, type=NixlHandshakePayload)
        meta = msgspec.msgpack.decode(
            payload.agent_metadata_bytes, type=ElasticAgentMetadata
        )
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(
            f"malformed NIXL handshake payload ({len(payload_bytes)} bytes): {e}"
        ) from e
    return payload.compatibility_hash, meta


@dataclass
class ElasticWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: a new handshake payload after a mapping change."""

    epoch: int
    # (pp_rank, tp_rank) -> encoded NixlHandshakePayload
    payloads: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> ElasticWorkerMetadata:
        assert isinstance(other, ElasticWorkerMetadata)
        merged = dict(self.payloads)
        merged.update(other.payloads)
        return ElasticWorkerMetadata(max(self.epoch, other.epoch), merged)


class ElasticConnectorMetadata(NixlConnectorMetadata):
    """Scheduler -> worker: vLLM's metadata plus epochs and blocks to pin."""

    def __init__(self) -> None:
        super().__init__()
        # Consumer: the producer epoch each request to receive needs.
        self.required_epochs: dict[str, int] = {}
        # Producer: blocks of requests a consumer will read; pinned mapped.
        self.blocks_to_lease: dict[str, list[int]] = {}

    @classmethod
    def extend(cls, base: NixlConnectorMetadata) -> ElasticConnectorMetadata:
        """Carry over everything vLLM's scheduler put in ``base``."""
        meta = cls()
        state: dict[str, Any] = dict(vars(base))
        state.update(required_epochs={}, blocks_to_lease={})
        meta.__dict__.update(state)
        return meta
