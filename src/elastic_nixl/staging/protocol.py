"""The staged path's wire format: the producer's offer and the control messages.

Staged reads: KV blocks moved through exportable bounce slots.

VMM memory cannot be exported to UCX's ``cuda_ipc`` lane, so a peer reading
it directly gets TCP emulation (~0.4 GB/s on H200, ``docs/gpu.md``). On the
staged path the producer gathers the blocks a consumer asks for into a slot
of a registered, exportable buffer; the consumer READs the whole slot into a
slot of its own (one descriptor per region) and scatters it into its blocks.
Slots are bounded and reused, and chunks are pipelined over them.

Each side drives a NIXL agent of its own from one thread (``StagingServer``
on the producer, ``StagedReader`` on the consumer); vLLM's agent stays with
vLLM's threads. Control messages are NIXL notifications between the two
staging agents, so no port beyond NIXL's is needed:

====================  =========================================================
consumer -> producer  ``Stage(xfer, block_ids, max_blocks, reply_metadata)``
producer -> consumer  ``Ready(xfer, chunk, slot, num_blocks)`` per chunk, as
                      slots free up; or ``Failed(xfer, reason)``
consumer READ         remote slot -> local slot; once it completes,
consumer -> producer  ``Done(xfer, slot)``: the producer reuses the slot
consumer -> producer  ``Cancel(xfer)`` when it gives up on a transfer
====================  =========================================================

The producer leases the blocks of a transfer for its whole life, so they
stay mapped while they are gathered, and refuses blocks that are not mapped
before touching them (a gather from unmapped VMM memory would fault the GPU).

Nothing here imports vLLM: the same classes run in the connector and in the
GPU benchmark.
"""

from __future__ import annotations

import msgspec

from elastic_nixl.staging.buffer import SlotGeometry


class StagingOffer(msgspec.Struct, frozen=True):
    """What a producer advertises in its handshake: where its slots are."""

    agent_name: str
    agent_metadata: bytes
    base: int
    slots: int
    slot_blocks: int
    num_regions: int
    block_len: int
    device_id: int
    mem_type: str

    @property
    def geometry(self) -> SlotGeometry:
        return SlotGeometry(
            self.base, self.num_regions, self.slot_blocks, self.block_len, self.slots
        )


class Stage(msgspec.Struct, tag="stage", frozen=True):
    xfer: str
    block_ids: list[int]
    # Largest chunk the consumer's own slots hold.
    max_blocks: int
    # The consumer's staging agent metadata, on its first message to a
    # producer agent, so the producer can answer.
    reply_metadata: bytes | None = None


class Ready(msgspec.Struct, tag="ready", frozen=True):
    xfer: str
    chunk: int
    slot: int
    num_blocks: int


class Failed(msgspec.Struct, tag="failed", frozen=True):
    xfer: str
    reason: str


class Done(msgspec.Struct, tag="done", frozen=True):
    xfer: str
    slot: int


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    xfer: str


Message = Stage | Ready | Failed | Done | Cancel
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """A control message as notification bytes."""
    return _encoder.encode(msg)


def decode(raw: bytes) -> Message | None:
    """The message in notification bytes; None for anything else."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
