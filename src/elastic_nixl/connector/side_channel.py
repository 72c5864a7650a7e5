"""The NIXL side channel an elastic engine serves, and the one question it
adds to vLLM's.

vLLM's side channel (one ZMQ ROUTER per engine, in the scheduler's process)
answers one message. Ours answers it the same way, byte for byte, so a
vanilla consumer cannot tell, and answers a second that only our consumers
send, to producers that advertised it (``kv_transfer_params``
``elastic_nixl_lease_verdicts``):

* ``(GET_META_MSG, pp_rank, tp_rank)`` -> frames ``[payload, clock]``: the
  rank's handshake payload and this process's ``perf_counter`` (vLLM's
  handshake estimates the clock offset from it);
* ``(LEASE_VERDICTS_MSG, pp_rank, tp_rank, [request ids])`` -> frames
  ``[{request id: held}, clock]`` (msgpack): for each request that rank has
  released, whether every read notification arrived while it still held the
  blocks (:class:`~elastic_nixl.connector.leases.LeaseVerdicts`); requests it
  still holds are absent.

A message it cannot decode, or a rank it does not serve, is answered with an
empty payload and logged: unlike vLLM's listener, which raises and stops
serving, one bad client cannot take the side channel down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import GET_META_MSG
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.utils import zmq_ctx
from vllm.logger import init_logger
from vllm.utils.network_utils import make_zmq_path

from elastic_nixl.connector.leases import LeaseVerdicts
from elastic_nixl.connector.peers import HANDSHAKE_TIMEOUT_MS

logger = init_logger(__name__)

LEASE_VERDICTS_MSG = b"elastic_nixl_lease_verdicts"
# Request ids per question: a consumer asks about the reads it waits on.
MAX_QUERY_IDS = 4096


def _answer(
    msg: bytes, payloads: Mapping[tuple[int, int], bytes], verdicts: LeaseVerdicts
) -> bytes:
    """The payload frame for one client message; ``b""`` when it is bad."""
    try:
        decoded = msgspec.msgpack.decode(msg)
    except msgspec.DecodeError:
        logger.warning("ElasticNixlConnector: side channel got undecodable bytes")
        return b""
    if not isinstance(decoded, list) or len(decoded) not in (3, 4):
        logger.warning("ElasticNixlConnector: side channel got %r", decoded)
        return b""
    kind, pp_rank, tp_rank = decoded[0], decoded[1], decoded[2]
    if isinstance(kind, str):
        kind = kind.encode()
    if kind == GET_META_MSG and len(decoded) == 3:
        payload = payloads.get((pp_rank, tp_rank))
        if payload is None:
            logger.warning(
                "ElasticNixlConnector: side channel asked for rank (%s, %s), "
                "which this engine does not serve",
                pp_rank,
                tp_rank,
            )
            return b""
        return payload
    ids = decoded[3] if len(decoded) == 4 else None
    if (
        kind == LEASE_VERDICTS_MSG
        and isinstance(tp_rank, int)
        and isinstance(ids, list)
        and len(ids) <= MAX_QUERY_IDS
        and all(isinstance(i, str) for i in ids)
    ):
        return msgspec.msgpack.encode(verdicts.answer(tp_rank, ids))
    logger.warning("ElasticNixlConnector: side channel got message %r", kind)
    return b""


def serve_side_channel(
    payloads: Mapping[tuple[int, int], bytes],
    verdicts: LeaseVerdicts,
    ready: threading.Event,
    stop: threading.Event,
    host: str,
    port: int,
) -> None:
    """Serve until ``stop`` is set (checked every second); ``ready`` once
    bound. ``payloads`` is read at each question, so replacing an entry
    publishes a new payload."""
    with zmq_ctx(zmq.ROUTER, make_zmq_path("tcp", host, port)) as sock:
        sock.setsockopt(zmq.RCVTIMEO, 1000)
        ready.set()
        while not stop.is_set():
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                continue
            if len(frames) != 3:
                logger.warning(
                    "ElasticNixlConnector: side channel got %d frames", len(frames)
                )
                continue
            identity, _, msg = frames
            payload = _answer(msg, payloads, verdicts)
            # Our clock, as vLLM's listener sends it: the handshake reads the
            # offset of the process that stamps the lease (this one).
            clock = msgspec.msgpack.encode(time.perf_counter())
            sock.send_multipart((identity, b"", payload, clock))


def fetch_lease_verdicts(
    host: str, port: int, tp_rank: int, req_ids: Sequence[str]
) -> dict[str, bool]:
    """Ask rank ``tp_rank`` of the producer at ``host:port`` which of
    ``req_ids`` it released, and whether each was read while held. Raises
    ``zmq.Again`` when it does not answer in time, ``ValueError`` when the
    answer is not one."""
    path = make_zmq_path("tcp", host, port)
    with zmq_ctx(zmq.REQ, path) as sock:
        sock.setsockopt(zmq.RCVTIMEO, HANDSHAKE_TIMEOUT_MS)
        sock.send(
            msgspec.msgpack.encode(
                (LEASE_VERDICTS_MSG, 0, tp_rank, list(req_ids)[:MAX_QUERY_IDS])
            )
        )
        parts = sock.recv_multipart()
    answer: Any = None
    if len(parts) == 2 and parts[0]:
        try:
            answer = msgspec.msgpack.decode(parts[0], type=dict[str, bool])
        except (msgspec.DecodeError, msgspec.ValidationError):
            answer = None
    if answer is None:
        raise ValueError(
            f"the NIXL side channel at {host}:{port} did not answer the lease "
            f"question for rank {tp_rank} (is it an older elastic_nixl?)"
        )
    return dict(answer)
