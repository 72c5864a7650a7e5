"""Child processes that host engines, and the command protocol to them.

Two NIXL agents in one process talk over TCP loopback; real P/D runs them in
separate processes. A child (started with ``spawn``) hosts one or more
``PDEngine`` s with a real NIXL agent and is driven over a
``multiprocessing`` pipe:

* parent -> child: ``("call", call_id, op, kwargs)``;
* child -> parent: ``("reply", call_id, ok, value)`` for each call, and
  ``("event", kind, payload)`` when an engine step finishes a request.

Between commands a child steps its engines (as vLLM's engine loop would) and
reports ``finished_sending`` / ``finished_recving``. A consumer verifies every
received block against the pattern the producer wrote before reporting, and
both sides return block ids to their own pools (the producer only after
``finished_sending``: until then the connector leases them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing.connection as mpc
import os
import random
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any

DEFAULT_CALL_TIMEOUT_S = 60.0
DEFAULT_START_TIMEOUT_S = 240.0
# The environment children need before they import vLLM / UCX.
CHILD_ENV_DEFAULTS = {
    "VLLM_TARGET_DEVICE": "cpu",
    # Loopback-friendly UCX transports; tcp must stay in the list.
    "UCX_TLS": "tcp,self,sm",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


class ChildError(RuntimeError):
    """A command failed inside a child; ``kind`` is the exception's type name."""

    def __init__(self, child: str, op: str, kind: str, message: str, tb: str) -> None:
        super().__init__(f"{child}: {op} failed: {kind}: {message}")
        self.kind = kind
        self.message = message
        self.remote_traceback = tb


class ChildDied(RuntimeError):
    """A child exited (or was killed) while the parent waited on it."""

    def __init__(self, child: str, exitcode: int | None) -> None:
        what = describe_exitcode(exitcode)
        super().__init__(f"child {child} died ({what})")
        self.exitcode = exitcode


def describe_exitcode(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class _LogCapture(logging.Handler):
    """Keeps WARNING+ records so the parent can show what a failure logged."""

    def __init__(self, maxlen: int = 2000) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[tuple[int, str]] = collections.deque(
            maxlen=maxlen
        )
        self.count = 0
        self._last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:
            return  # seen through both the "vllm" and the root logger
        self._last = record
        try:
            msg = record.getMessage().splitlines()[0] if record.msg else ""
        except Exception:  # noqa: BLE001 - a bad record must not break the loop
            msg = str(record.msg)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            # vLLM logs transfer failures with exc_info: keep the cause.
            text = str(exc).splitlines()[0] if str(exc) else ""
            msg += f" | {type(exc).__name__}: {text}"
        self.lines.append((self.count, f"{record.levelname} {record.name}: {msg}"))
        self.count += 1


class _Hosted:
    """One engine in a child plus the block pool a scheduler would keep."""

    def __init__(self, name: str, engine: Any, seed: int) -> None:
        self.name = name
        self.engine = engine
        self.rng = random.Random(seed)
        self.alloc = engine.allocator  # None for static memory
        spec = engine.spec
        self.physical = int(spec.physical_blocks)
        self.virtual = (
            int(self.alloc.num_virtual_blocks)
            if self.alloc is not None
            else self.physical
        )
        # Block 0 is vLLM's null block: never handed to a request.
        self.wanted: set[int] = set(range(1, self.physical))
        self.free: set[int] = set(self.wanted)
        self.busy: dict[str, list[int]] = {}
        self.sending: dict[str, float] = {}
        self.recving: dict[str, float] = {}
        self.regions: list[tuple[int, int]] = []
        first = engine.kv_caches[engine.layer_names[0]]
        self.block_bytes = sum(
            engine.kv_caches[name][0].numel() * first.element_size()
            for name in engine.layer_names
        )
        self.completed_recv = 0
        self.completed_send = 0
        self.last_step = 0.0
        self.step_errors = 0

    # -- pool -----------------------------------------------------------------

    def take(
        self,
        req: str,
        n: int | None,
        ids: Sequence[int] | None,
        max_id: int | None = None,
    ) -> list[int] | None:
        """Block ids for ``req``: given (tests forge them) or sampled from the
        free pool (below ``max_id`` if set); ``None`` when the pool is short."""
        if req in self.busy:
            raise ValueError(f"{self.name}: request {req} already holds blocks")
        if ids is not None:
            chosen = [int(b) for b in ids]
        else:
            assert n is not None and n > 0
            pool = sorted(b for b in self.free if max_id is None or b < max_id)
            if len(pool) < n:
                return None
            chosen = self.rng.sample(pool, n)
        self.free.difference_update(chosen)
        self.busy[req] = chosen
        return chosen

    def release(self, req: str) -> list[int]:
        ids = self.busy.pop(req, [])
        self.free.update(b for b in ids if b in self.wanted)
        return ids

    def live_blocks(self) -> set[int]:
        return {b for ids in self.busy.values() for b in ids}

    def is_busy(self, now: float) -> bool:
        # Sends the consumer never reads (failed requests) wait for vLLM's
        # abort timeout; do not spin for them.
        return bool(self.recving) or any(now - t < 10.0 for t in self.sending.values())


class _ChildServer:
    def __init__(self, conn: mpc.Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.engines: dict[str, _Hosted] = {}
        self.capture = _LogCapture()
        for lg in (logging.getLogger(), logging.getLogger("vllm")):
            lg.addHandler(self.capture)
        self.running = True

    # -- loop -----------------------------------------------------------------

    def serve(self) -> None:
        while self.running:
            now = time.monotonic()
            busy = any(h.is_busy(now) for h in self.engines.values())
            try:
                if self.conn.poll(0.0005 if busy else 0.02):
                    msg = self.conn.recv()
                    self._dispatch(msg)
                    continue  # drain commands before stepping again
            except (EOFError, OSError):
                return  # the parent is gone
            for h in list(self.engines.values()):
                # Idle engines step now and then (notifications, expiries).
                if h.is_busy(now) or now - h.last_step > 0.25:
                    self._step(h)

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        _, call_id, op, kwargs = msg
        try:
            fn = getattr(self, f"op_{op}")
            value = fn(**kwargs)
            self.conn.send(("reply", call_id, True, value))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            self.conn.send(
                (
                    "reply",
                    call_id,
                    False,
                    (type(e).__name__, str(e), traceback.format_exc()),
                )
            )

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.conn.send(("event", kind, payload))

    def _step(self, h: _Hosted) -> None:
        h.last_step = time.monotonic()
        try:
            sending, recving = h.engine.step()
        except Exception as e:  # noqa: BLE001 - vLLM's engine would die here
            # Report and keep serving: the parent decides what it means.
            h.step_errors += 1
            if h.step_errors <= 20:
                self._emit(
                    "error",
                    {
                        "engine": h.name,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    },
                )
            return
        for req in sorted(sending):
            if req in h.sending:
                t0 = h.sending.pop(req)
                ids = h.release(req)
                h.completed_send += 1
                self._emit(
                    "sent",
                    {
                        "engine": h.name,
                        "req": req,
                        "blocks": len(ids),
                        "latency_s": time.monotonic() - t0,
                    },
                )
        for req in sorted(recving):
            if req in h.recving:
                self._emit("recv", self._complete_recv(h, req))

    def _complete_recv(self, h: _Hosted, req: str) -> dict[str, Any]:
        t0 = h.recving.pop(req)
        ids = h.busy.get(req, [])
        eng = h.engine
        failed = sorted(set(ids) & eng.failed_blocks)
        eng.failed_blocks.difference_update(ids)
        bad: list[int] = []
        if not failed:
            # Local memory the pool handed out is mapped; touching it is the
            # check that it still is (a SIGSEGV here is a harness bug).
            bad = eng.verify(req, ids)
        with contextlib.suppress(Exception):
            if h.alloc is None or not h.alloc.unmapped_blocks(ids):
                eng.clear_blocks(ids)  # stale bytes must not pass a later check
        h.release(req)
        h.completed_recv += 1
        return {
            "engine": h.name,
            "req": req,
            "ok": not failed and not bad,
            "failed_ids": failed,
            "bad_positions": bad,
            "block_ids": ids,
            "blocks": len(ids),
            "bytes": len(ids) * h.block_bytes,
            "latency_s": time.monotonic() - t0,
        }

    # -- ops ------------------------------------------------------------------

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "engines": sorted(self.engines)}

    def op_quit(self) -> None:
        self.running = False
        for h in self.engines.values():
            with contextlib.suppress(Exception):
                h.engine.shutdown()

    def op_add_engine(
        self,
        name: str,
        spec: dict[str, Any],
        seed: int = 0,
        permute_local_kv: bool = False,
    ) -> dict[str, Any]:
        """Build a PDEngine with a real NIXL agent (``spec`` as EngineSpec)."""
        from elastic_nixl.tools.harness.engine import EngineSpec, PDEngine
        from elastic_nixl.tools.harness.vllm_objects import TinyModel, free_port

        if name in self.engines:
            raise ValueError(f"engine {name} already exists in {self.name}")
        spec = dict(spec)
        if not spec.get("side_channel_port"):
            spec["side_channel_port"] = free_port()
        if isinstance(spec.get("model"), dict):
            spec["model"] = TinyModel(**spec["model"])
        t0 = time.monotonic()
        engine = PDEngine(EngineSpec(**spec), nixl_agent=None)
        if permute_local_kv:
            # vLLM reads this KVTransferConfig field (not an extra-config key)
            # at handshake time.
            engine.vllm_config.kv_transfer_config.enable_permute_local_kv = True
        h = _Hosted(name, engine, seed)
        self.engines[name] = h
        return {
            "name": name,
            "engine_id": engine.spec.engine_id,
            "side_channel_port": engine.spec.side_channel_port,
            "physical_blocks": h.physical,
            "virtual_blocks": h.virtual,
            "block_bytes": h.block_bytes,
            "elastic": h.alloc is not None,
            "layout": engine.spec.layout,
            "build_s": time.monotonic() - t0,
            "shapes": {
                n: [list(t.shape), list(t.stride())]
                for n, t in engine.kv_caches.items()
            },
        }

    def op_remove_engine(self, name: str) -> None:
        h = self.engines.pop(name)
        h.engine.shutdown()

    def op_prefill(
        self,
        engine: str,
        req: str,
        n: int | None = None,
        block_ids: Sequence[int] | None = None,
        max_id: int | None = None,
    ) -> dict[str, Any] | None:
        """Write the pattern into blocks from the pool; the params to forward."""
        h = self.engines[engine]
        ids = h.take(req, n, block_ids, max_id)
        if ids is None:
            return None
        try:
            params = h.engine.prefill(req, ids)
        except BaseException:
            h.release(req)
            raise
        h.sending[req] = time.monotonic()
        # The step after request_finished pins (leases) the blocks: do it now
        # so a shrink command arriving next cannot beat it.
        self._step(h)
        return {"params": params, "block_ids": ids}

    def op_submit(
        self,
        engine: str,
        req: str,
        params: dict[str, Any],
        n: int | None = None,
        block_ids: Sequence[int] | None = None,
        max_id: int | None = None,
    ) -> dict[str, Any] | None:
        """Admit a request whose KV is on a producer, into pool blocks."""
        h = self.engines[engine]
        ids = h.take(req, n, block_ids, max_id)
        if ids is None:
            return None
        try:
            count = h.engine.submit(req, params, ids)
        except BaseException:
            h.release(req)
            raise
        h.recving[req] = time.monotonic()
        return {"block_ids": ids, "matched_tokens": count}

    def op_grow(
        self,
        engine: str,
        n: int | None = None,
        start: int | None = None,
        block_ids: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Map more blocks (``n`` from ``start``, or ``block_ids``) and add them
        to the pool; steps once so the new handshake payload is published."""
        h = self._elastic(engine)
        if block_ids is None:
            assert n is not None and start is not None
            block_ids = range(start, start + n)
            h.regions.append((start, start + n))
        ids = [int(b) for b in block_ids]
        before = h.alloc.num_mapped_chunks
        extents = h.alloc.map_blocks(ids)
        new = [b for b in ids if b not in h.wanted]
        h.wanted.update(new)
        live = h.live_blocks()
        h.free.update(b for b in new if b not in live)
        self._step(h)
        return {
            "new_blocks": len(new),
            "mapped_extents": len(extents),
            "chunks_before": before,
            "chunks_after": h.alloc.num_mapped_chunks,
            "epoch": h.alloc.epoch,
            "max_id": max(ids) if ids else None,
        }

    def op_shrink(
        self,
        engine: str,
        block_ids: Sequence[int] | None = None,
        include_live: bool = False,
        region: bool = True,
        n: int = 0,
    ) -> dict[str, Any]:
        """Unmap blocks: ``block_ids``, or a grown region (its free blocks, and
        with ``include_live`` those of in-flight requests too, which the
        connector's leases keep mapped until their reads finish)."""
        h = self._elastic(engine)
        live = h.live_blocks()
        if block_ids is None:
            if region and h.regions:
                pick = h.rng.randrange(len(h.regions))
                if include_live:
                    # The region most in use: exercises the leases.
                    pick = max(
                        range(len(h.regions)),
                        key=lambda i: sum(b in live for b in range(*h.regions[i])),
                    )
                lo, hi = h.regions.pop(pick)
                cand = [b for b in range(lo, hi) if b in h.wanted]
            else:
                # No grown region left: give back up to half the free pool.
                cand = h.rng.sample(sorted(h.free), min(n, len(h.free) // 2))
            block_ids = [b for b in cand if include_live or b not in live]
        ids = sorted(int(b) for b in block_ids)
        live_ids = [b for b in ids if b in live]
        before = h.alloc.num_mapped_chunks
        extents = h.alloc.unmap_blocks(ids) if ids else ()
        h.wanted.difference_update(ids)
        h.free.difference_update(ids)
        still = set(ids) - set(h.alloc.unmapped_blocks(ids)) if ids else set()
        self._step(h)
        return {
            "blocks": len(ids),
            "live_blocks": len(live_ids),
            "live_still_mapped": len(still & set(live_ids)),
            "unmapped_extents": len(extents),
            "chunks_before": before,
            "chunks_after": h.alloc.num_mapped_chunks,
            "epoch": h.alloc.epoch,
        }

    def op_query(self, engine: str, block_ids: Sequence[int]) -> dict[str, Any]:
        """Which of ``block_ids`` are unmapped and which leased now."""
        h = self._elastic(engine)
        ids = [int(b) for b in block_ids]
        leased = h.alloc.leased_blocks()
        return {
            "unmapped": h.alloc.unmapped_blocks(ids),
            "leased": sorted(b for b in ids if leased.get(b)),
        }

    def op_stats(self, engine: str) -> dict[str, Any]:
        h = self.engines[engine]
        w = h.engine.worker.connector_worker
        out: dict[str, Any] = {
            "engine_id": h.engine.spec.engine_id,
            "free": len(h.free),
            "busy": len(h.busy),
            "sending": len(h.sending),
            "recving": len(h.recving),
            "completed_recv": h.completed_recv,
            "completed_send": h.completed_send,
            "block_bytes": h.block_bytes,
            "physical_blocks": h.physical,
            "virtual_blocks": h.virtual,
        }
        es = getattr(w, "elastic_stats", None)
        if es is not None:
            out.update(dataclasses.asdict(es))
        link = getattr(w, "staged", None)
        for key, side in (
            ("staging_server", getattr(link, "server", None)),
            ("staged_reader", getattr(link, "reader", None)),
        ):
            if side is not None:
                out[key] = dataclasses.asdict(side.stats)
        if h.alloc is not None:
            out.update(
                epoch=h.alloc.epoch,
                mapped_chunks=h.alloc.num_mapped_chunks,
                mapped_bytes=h.alloc.mapped_bytes,
                mapped_blocks=h.alloc.num_mapped_blocks,
                leased_blocks=len(h.alloc.leased_blocks()),
                wanted=len(h.wanted),
            )
        return out

    def op_logs(self, since: int = 0) -> dict[str, Any]:
        """WARNING+ log lines from index ``since`` (first line of each)."""
        lines = [line for i, line in self.capture.lines if i >= since]
        return {"next": self.capture.count, "lines": lines}

    def op_step(self, engine: str, times: int = 1) -> None:
        h = self.engines[engine]
        for _ in range(times):
            self._step(h)

    def _elastic(self, engine: str) -> _Hosted:
        h = self.engines[engine]
        if h.alloc is None:
            raise ValueError(f"engine {engine} has static memory: no grow/shrink")
        return h


def child_main(conn: mpc.Connection, name: str, env: dict[str, str]) -> None:
    """Spawn target: set the environment, then serve commands until told to quit."""
    os.environ.update(env)
    import faulthandler

    faulthandler.enable()  # a SIGSEGV (read of unmapped memory) leaves a trace
    # Ctrl-C goes to the whole process group; the parent ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = _ChildServer(conn, name)
    try:
        server.serve()
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        os._exit(0)  # skip atexit hooks of UCX/torch that may hang on exit
