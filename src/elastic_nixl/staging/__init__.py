"""How bytes move when the transport cannot export the KV memory.

VMM memory is not legacy-CUDA-IPC capable, so UCX moves it by software
emulation over TCP. The staged path gathers the blocks of a request into
registered, exportable bounce slots on the producer, moves whole slots, and
scatters them into the consumer's blocks. Nothing here imports vLLM: the
connector and the GPU benchmark run the same classes.

Files: ``buffer`` (slots and gather / scatter), ``protocol`` (the offer and
the control messages), ``endpoint`` (one side: agent, slots, thread),
``server`` (producer), ``reader`` (consumer).
"""

from elastic_nixl.staging.buffer import SlotGeometry, StagingBuffer, chunk_ids
from elastic_nixl.staging.endpoint import StagingEndpoint, StagingStats
from elastic_nixl.staging.protocol import Message, StagingOffer
from elastic_nixl.staging.reader import StagedRead, StagedReader
from elastic_nixl.staging.server import StagingServer

__all__ = [
    "Message",
    "SlotGeometry",
    "StagedRead",
    "StagedReader",
    "StagingBuffer",
    "StagingEndpoint",
    "StagingOffer",
    "StagingServer",
    "StagingStats",
    "chunk_ids",
]
