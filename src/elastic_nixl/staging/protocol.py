"""The staged path's wire format: the offers and the control messages.

Staged transfers move KV blocks through exportable bounce slots. VMM memory
cannot be exported to UCX's ``cuda_ipc`` lane, and without NVLink UCX also
turns ``cuda_ipc`` READ off for any memory ("cuda-ipc get zcopy disabled as
no nvlinks detected"): a peer reading directly gets TCP emulation (~0.4 GB/s
against ~190 GB/s for a WRITE on one H100). So the producer *pushes*: it
gathers the blocks a consumer asks for into one of its slots and WRITEs the
slot into a slot the consumer granted; the consumer scatters it into its
blocks and grants the slot again. Slots are bounded and reused, and chunks
are pipelined over them. A chunk of ``n`` blocks is packed, so one
descriptor moves it.

Each side drives a NIXL agent of its own from one thread (``StagingServer``
on the producer, ``StagedReader`` on the consumer); vLLM's agent stays with
vLLM's threads. Control messages are NIXL notifications between the two
staging agents, so no port beyond NIXL's is needed:

====================  =========================================================
consumer -> producer  ``Stage(xfer, block_ids, max_blocks, reader, grants)``:
                      the blocks, the consumer's slots (``reader``, on first
                      contact) and slots for the first chunks (``grants``)
consumer -> producer  ``Grant(xfer, chunk, slot)``: consumer slot ``slot`` may
                      receive chunk ``chunk``
producer WRITE        producer slot -> granted consumer slot, carrying the
                      notification ``Written(xfer, chunk, slot, num_blocks)``,
                      which NIXL delivers once the bytes are there
producer -> consumer  ``Failed(xfer, reason)``: the transfer is over; also the
                      answer to ``Cancel`` once no WRITE of it is in flight,
                      and at once to a ``Cancel`` of a transfer not running
consumer -> producer  ``Cancel(xfer)`` when it gives up on a transfer
====================  =========================================================

Every failure ends its transfer alone and returns what it held: a ``Stage``
is checked (block count against the producer's bound, ids against its rows)
before a lease or slot is taken, and a gather or WRITE that raises gives its
slot back and answers ``Failed`` naming the reason. The consumer grants a
new transfer at most its fair share of its slots, and one producer never
holds all of them, so a producer that falls silent cannot starve the others.

The producer leases the blocks of a transfer until no gather of it can run,
so they stay mapped while they are gathered, and refuses blocks that are not
mapped before touching them (a gather from unmapped VMM memory would fault
the GPU). The consumer never reuses a slot it granted until the WRITE into it
has been announced, or the producer has said the transfer is over.

**Every message is untrusted.** It is decoded against the schema below
(types, ranges, size and nesting: a message that does not fit is dropped,
alone, as ``ValueError``; the others of its batch are handled as usual) and then
checked against the state it names: a transfer is ``(sender, xfer)``, a chunk
is its index, a slot is named with the chunk granted it. So a duplicated,
forged or out-of-order message matches nothing and is ignored, or fails its
transfer; it never completes one. A transfer succeeds only when every one of
its chunks, by index, has arrived once.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from elastic_nixl.staging.buffer import SlotGeometry

# Bounds on what a peer may send; generous for real engines, and small enough
# that no arithmetic on them overflows int64.
MAX_BLOCK_ID = 1 << 40
MAX_BLOCKS_PER_TRANSFER = 1 << 20
MAX_SLOTS = 1024
MAX_REGIONS = 1 << 12
MAX_BLOCK_LEN = 1 << 32
MAX_NAME = 512
MAX_REASON = 4096
MAX_METADATA_BYTES = 64 << 20
# The largest message: a Stage with every id at 9 bytes, the consumer's offer
# (metadata and all) and its grants, with room for field names.
MAX_MESSAGE_BYTES = MAX_METADATA_BYTES + 9 * MAX_BLOCKS_PER_TRANSFER + (64 << 10)
_ADDRESS_LIMIT = (1 << 63) - 1

BlockId = Annotated[int, msgspec.Meta(ge=0, lt=MAX_BLOCK_ID)]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCKS_PER_TRANSFER)]
Index = Annotated[int, msgspec.Meta(ge=0, lt=MAX_BLOCKS_PER_TRANSFER)]
SlotIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_SLOTS)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
Address = Annotated[int, msgspec.Meta(ge=0, le=_ADDRESS_LIMIT)]


class StagingOffer(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Where a side's slots are: what a producer advertises in its handshake,
    and what a consumer sends with its first ``Stage``.

    Decoding checks each field's type and range; :meth:`validate` checks that
    the slots fit in the address space, naming the field that does not.
    """

    agent_name: Name
    agent_metadata: Annotated[bytes, msgspec.Meta(max_length=MAX_METADATA_BYTES)]
    base: Address
    slots: Annotated[int, msgspec.Meta(ge=1, le=MAX_SLOTS)]
    slot_blocks: Count
    num_regions: Annotated[int, msgspec.Meta(ge=1, le=MAX_REGIONS)]
    block_len: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_LEN)]
    device_id: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    mem_type: Literal["DRAM", "VRAM"]

    @property
    def geometry(self) -> SlotGeometry:
        return SlotGeometry(
            self.base, self.num_regions, self.slot_blocks, self.block_len, self.slots
        )

    def validate(self) -> StagingOffer:
        """``self``, or ``ValueError`` naming the field that is out of range or
        the slots that overflow the address space. (Decoding checks ranges;
        an offer built in Python is checked here.)"""
        try:
            msgspec.convert(msgspec.to_builtins(self), type=StagingOffer)
        except msgspec.ValidationError as e:
            raise ValueError(
                f"staging offer of agent {self.agent_name!r}: {e}"
            ) from None
        end = self.base + self.geometry.slot_bytes * self.slots
        if end > _ADDRESS_LIMIT:
            raise ValueError(
                f"staging offer of agent {self.agent_name!r}: base {self.base:#x} "
                f"+ {self.slots} slots of {self.geometry.slot_bytes} bytes "
                "overflows the address space"
            )
        return self


class Stage(msgspec.Struct, tag="stage", frozen=True):
    xfer: Name
    block_ids: Annotated[
        list[BlockId], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS_PER_TRANSFER)
    ]
    # Largest chunk the consumer's own slots hold.
    max_blocks: Count
    # The consumer's slots (and agent metadata), on its first message to a
    # producer agent, so the producer can write to them.
    reader: StagingOffer | None = None
    # Consumer slots granted to chunks 0, 1, ...: the producer may start at once.
    grants: Annotated[list[SlotIndex], msgspec.Meta(max_length=MAX_SLOTS)] = []


class Grant(msgspec.Struct, tag="grant", frozen=True):
    xfer: Name
    chunk: Index
    slot: SlotIndex


class Written(msgspec.Struct, tag="written", frozen=True):
    xfer: Name
    chunk: Index
    slot: SlotIndex
    num_blocks: Count


class Failed(msgspec.Struct, tag="failed", frozen=True):
    xfer: Name
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON)]


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    xfer: Name


Message = Stage | Grant | Written | Failed | Cancel
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """A control message as notification bytes."""
    return _encoder.encode(msg)


def decode(raw: bytes, peer: str | None = None) -> Message:
    """The message in notification bytes.

    Raises ``ValueError`` (naming ``peer`` when given) for anything else:
    what does not fit the schema (field, type or range), more than
    ``MAX_MESSAGE_BYTES``, or nesting deeper than the decoder recurses (an
    unknown field nested ~1,000 arrays deep made msgspec raise
    ``RecursionError``). Nothing a peer sends raises anything but
    ``ValueError``.
    """
    who = f" from {peer}" if peer is not None else ""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"malformed staging message{who}: {len(raw)} bytes, more than the "
            f"{MAX_MESSAGE_BYTES} any message can need; dropped"
        )
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(
            f"malformed staging message{who} ({len(raw)} bytes): {e}"
        ) from e
    except RecursionError:
        raise ValueError(
            f"malformed staging message{who} ({len(raw)} bytes): nested too "
            "deeply to decode"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever msgspec raises is the peer's
        raise ValueError(
            f"malformed staging message{who} ({len(raw)} bytes): "
            f"{type(e).__name__}: {e}"
        ) from e
