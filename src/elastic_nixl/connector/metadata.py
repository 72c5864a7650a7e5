"""What crosses a process boundary: handshake additions, params, worker meta.

Every handshake addition is optional with a default, so vanilla
NixlConnector peers decode our payloads (msgspec ignores fields a dataclass
does not declare) and we decode theirs (the fields take their defaults).

Everything that comes from a peer or a client is validated here, where it
enters, before any state changes: a handshake payload against its schema and
then for geometry that fits the address space (:func:`decode_agent_metadata`),
a consumer request's ``kv_transfer_params`` against theirs
(:func:`parse_consumer_params`). A bad value raises ``ValueError`` naming the
field and where it came from; code past these functions trusts its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
    NixlAgentMetadata,
    NixlConnectorMetadata,
    NixlHandshakePayload,
)

from elastic_nixl.staging.protocol import (
    MAX_BLOCK_ID,
    MAX_BLOCKS_PER_TRANSFER,
    StagingOffer,
)

# kv_transfer_params key: the producer's mapping epoch when it finished the
# request. A consumer holding older metadata for that producer refreshes it.
EPOCH_PARAM = "elastic_nixl_epoch"
# kv_transfer_params keys: when the producer's hold on the request's blocks
# ends unless a heartbeat extends it (its clock), and how far a heartbeat
# extends it. A consumer reports a read successful only if it completed
# while the hold lasted (connector/leases.py).
LEASE_EXPIRY_PARAM = "elastic_nixl_lease_expiry"
LEASE_EXTENSION_PARAM = "elastic_nixl_lease_extension"
# The producer answers lease questions on its side channel (side_channel.py).
LEASE_VERDICTS_PARAM = "elastic_nixl_lease_verdicts"


# Bounds: generous for real engines, small enough that address arithmetic
# (base + block * stride) cannot overflow int64.
ADDRESS_LIMIT = (1 << 63) - 1
MAX_REGIONS = 1 << 12
MAX_EXTENTS = 1 << 22
Epoch = Annotated[int, msgspec.Meta(ge=0, le=ADDRESS_LIMIT)]
Address = Annotated[int, msgspec.Meta(ge=0, le=ADDRESS_LIMIT)]
Length = Annotated[int, msgspec.Meta(ge=1, le=ADDRESS_LIMIT)]
BlockCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_ID)]


@dataclass
class ElasticAgentMetadata(NixlAgentMetadata):
    """NixlAgentMetadata plus what an elastic producer has registered."""

    # Mapping epoch of the memory described; None from vanilla peers.
    elastic_epoch: Epoch | None = None
    # Registered extents (base, nbytes), one per NIXL registration.
    registered_extents: (
        Annotated[list[tuple[Address, Length]], msgspec.Meta(max_length=MAX_EXTENTS)]
        | None
    ) = None
    # Blocks per region that exist in the address space (virtual capacity).
    virtual_num_blocks: BlockCount | None = None
    # Bounce slots to read through when this engine's memory cannot be
    # exported to the transport (connector/staged.py); None: read directly.
    staging: StagingOffer | None = None


def decode_agent_metadata(
    payload_bytes: bytes, source: str = "peer"
) -> tuple[str, ElasticAgentMetadata]:
    """Decode and validate a handshake payload from ``source`` (e.g.
    ``host:port``); raises ``ValueError`` naming what is wrong."""
    try:
        payload = msgspec.msgpack.decode(payload_bytes, type=NixlHandshakePayload)
        meta = msgspec.msgpack.decode(
            payload.agent_metadata_bytes, type=ElasticAgentMetadata
        )
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(
            f"malformed NIXL handshake payload from {source} "
            f"({len(payload_bytes)} bytes): {e}"
        ) from e
    validate_agent_metadata(meta, source)
    return payload.compatibility_hash, meta


def validate_agent_metadata(meta: ElasticAgentMetadata, source: str) -> None:
    """Check the geometry a peer advertises before anything is planned on it:
    regions that fit the address space, extents that do not overlap, an
    offer whose slots fit. ``ValueError`` names the field, engine and source."""

    def bad(field_name: str, why: str) -> ValueError:
        return ValueError(
            f"handshake from engine {meta.engine_id!r} at {source}: {field_name} {why}"
        )

    n = len(meta.kv_caches_base_addr)
    if not 0 < n <= MAX_REGIONS:
        raise bad("kv_caches_base_addr", f"has {n} regions (1 to {MAX_REGIONS})")
    for name in ("block_lens", "block_strides"):
        if len(getattr(meta, name)) != n:
            raise bad(name, f"has {len(getattr(meta, name))} entries for {n} regions")
    for name in ("region_num_blocks", "region_group_ids", "region_mem_types"):
        value = getattr(meta, name)
        if value is not None and len(value) != n:
            raise bad(name, f"has {len(value)} entries for {n} regions")
    if not 0 <= meta.num_blocks < MAX_BLOCK_ID:
        raise bad("num_blocks", f"= {meta.num_blocks} is out of range")
    capacity = meta.virtual_num_blocks or max(
        [meta.num_blocks, *(meta.region_num_blocks or [])]
    )
    for i, (base, length, stride) in enumerate(
        zip(meta.kv_caches_base_addr, meta.block_lens, meta.block_strides, strict=True)
    ):
        if not 0 <= base <= ADDRESS_LIMIT:
            raise bad("kv_caches_base_addr", f"[{i}] = {base} is not an address")
        if length < 1 or stride < length:
            raise bad(
                "block_lens/block_strides",
                f"[{i}] = {length}/{stride}: a block must be at least one byte "
                "and the stride at least the block",
            )
        if base + capacity * stride > ADDRESS_LIMIT:
            raise bad(
                "kv_caches_base_addr",
                f"[{i}]: {capacity} blocks of stride {stride} from {base:#x} "
                "overflow the address space",
            )
    if meta.registered_extents is not None:
        end = -1
        for base, nbytes in sorted(meta.registered_extents):
            if base < end:
                raise bad("registered_extents", f"overlap at {base:#x}: each byte once")
            if base + nbytes > ADDRESS_LIMIT:
                raise bad("registered_extents", f"[{base:#x}, +{nbytes}) overflows")
            end = base + nbytes
    if meta.staging is not None:
        try:
            meta.staging.validate()
        except ValueError as e:
            raise bad("staging", str(e)) from None


# --------------------------------------------------------------------------
# kv_transfer_params of a request a consumer reads from a producer
# --------------------------------------------------------------------------

PARAM_BLOCK_IDS = Annotated[
    list[
        Annotated[
            list[Annotated[int, msgspec.Meta(ge=0, lt=MAX_BLOCK_ID)]],
            msgspec.Meta(max_length=MAX_BLOCKS_PER_TRANSFER),
        ]
    ],
    msgspec.Meta(min_length=1, max_length=MAX_REGIONS),
]
_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
_Size = Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
# A perf_counter reading or a duration, in seconds (finite: NaN and inf fail).
_Clock = Annotated[float, msgspec.Meta(ge=0, le=1e12)]


class ConsumerParams(msgspec.Struct, forbid_unknown_fields=False):
    """The ``kv_transfer_params`` fields a consumer acts on (a proxy forwards
    them from the producer's response; any client can set them)."""

    remote_engine_id: _Text
    remote_request_id: _Text
    remote_host: _Text
    remote_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    remote_block_ids: PARAM_BLOCK_IDS
    tp_size: _Size = 1
    dcp_size: _Size = 1
    pp_size: _Size = 1
    remote_num_tokens: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] | None = None
    remote_blocks_expiry_time: float | None = None
    # vLLM >= 0.33 (NIXL connector version 15): compared with ``<`` by vLLM's
    # consumer, so anything but a non-negative integer would fail there.
    remote_registration_generation: Epoch | None = None
    elastic_nixl_epoch: Epoch | None = None
    elastic_nixl_lease_expiry: _Clock | None = None
    elastic_nixl_lease_extension: _Clock | None = None
    elastic_nixl_lease_verdicts: bool = False


def parse_consumer_params(params: dict[str, Any], req_id: str) -> ConsumerParams:
    """Validate a remote-prefill request's params; ``ValueError`` names the
    field, the request and (when it is a string) the producer engine."""
    try:
        return msgspec.convert(params, type=ConsumerParams, strict=True)
    except msgspec.ValidationError as e:
        engine = params.get("remote_engine_id")
        who = f" from engine {engine!r}" if isinstance(engine, str) else ""
        raise ValueError(
            f"request {req_id}: invalid kv_transfer_params{who}: {e}"
        ) from None


@dataclass
class ElasticWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: a new handshake payload after a mapping change,
    and whether the requests a rank released were read in time."""

    epoch: int
    # (pp_rank, tp_rank) -> encoded NixlHandshakePayload
    payloads: dict[tuple[int, int], bytes] = field(default_factory=dict)
    # tp_rank -> {request id: every read notified while held} (leases.py)
    lease_verdicts: dict[int, dict[str, bool]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> ElasticWorkerMetadata:
        assert isinstance(other, ElasticWorkerMetadata)
        merged = dict(self.payloads)
        merged.update(other.payloads)
        verdicts = {r: dict(v) for r, v in self.lease_verdicts.items()}
        for rank, answers in other.lease_verdicts.items():
            verdicts.setdefault(rank, {}).update(answers)
        return ElasticWorkerMetadata(max(self.epoch, other.epoch), merged, verdicts)


class ElasticConnectorMetadata(NixlConnectorMetadata):
    """Scheduler -> worker: vLLM's metadata plus epochs and blocks to pin."""

    def __init__(self) -> None:
        super().__init__()
        # Consumer: the producer epoch each request to receive needs.
        self.required_epochs: dict[str, int] = {}
        # Consumer: (producer engine, its request id, lease end, heartbeat
        # extension, both in the producer's clock; whether it answers lease
        # questions) of requests that arrived since the last step (leases.py).
        self.read_leases: dict[str, tuple[str, str, float, float, bool]] = {}
        # Producer: blocks of requests a consumer will read; pinned mapped.
        self.blocks_to_lease: dict[str, list[int]] = {}
        # Consumer: requests whose kv_transfer_params were refused, and why;
        # the worker fails each through vLLM's failed-receive path.
        self.invalid_params: dict[str, str] = {}
        # allocator 'vmm' (connector/pool.py): block groups to release, then
        # to map, before this step's forward pass.
        self.map_groups: list[int] = []
        self.unmap_groups: list[int] = []
        self.blocks_per_group = 0

    @classmethod
    def extend(cls, base: NixlConnectorMetadata) -> ElasticConnectorMetadata:
        """Carry over everything vLLM's scheduler put in ``base``."""
        meta = cls()
        state: dict[str, Any] = dict(vars(base))
        state.update(
            required_epochs={},
            read_leases={},
            blocks_to_lease={},
            invalid_params={},
            map_groups=[],
            unmap_groups=[],
            blocks_per_group=0,
        )
        meta.__dict__.update(state)
        return meta
