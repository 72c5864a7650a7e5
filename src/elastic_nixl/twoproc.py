"""Prefill and decode engines in two processes, with a coordinator as proxy.

Two NIXL agents in one process talk over TCP loopback; real P/D runs them in
separate processes. This module starts child processes (``spawn``), each
hosting one or more ``PDEngine`` s with a real NIXL agent, and drives them
over ``multiprocessing`` pipes with a small command protocol:

* parent -> child: ``("call", call_id, op, kwargs)``;
* child -> parent: ``("reply", call_id, ok, value)`` for each call, and
  ``("event", kind, payload)`` when an engine step finishes a request.

Between commands a child steps its engines (as vLLM's engine loop would) and
reports ``finished_sending`` / ``finished_recving``. A consumer verifies every
received block against the pattern the producer wrote before reporting, and
both sides return block ids to their own pools (the producer only after
``finished_sending``: until then the connector leases them).

The parent never imports vLLM or torch (``import vllm`` costs ~20 s a
process); every wait is bounded and children are always terminated.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------


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
        from elastic_nixl.harness import TinyModel, free_port
        from elastic_nixl.pd import EngineSpec, PDEngine

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
        for side in ("staging_server", "staged_reader"):
            staging = getattr(w, side, None)
            if staging is not None:
                out[side] = dataclasses.asdict(staging.stats)
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


def _child_main(conn: mpc.Connection, name: str, env: dict[str, str]) -> None:
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


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


class Child:
    """Parent's handle on one child process."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        full_env = dict(CHILD_ENV_DEFAULTS)
        full_env.update(
            {k: v for k, v in os.environ.items() if k in CHILD_ENV_DEFAULTS}
        )
        full_env.update(env or {})
        self.proc = ctx.Process(
            target=_child_main,
            args=(child_conn, name, full_env),
            name=f"elastic-nixl-{name}",
            daemon=True,
        )
        self._child_conn = child_conn
        self._next_id = 0
        self.replies: dict[int, tuple[bool, Any]] = {}
        self.dead = False

    def start(self) -> None:
        self.proc.start()
        self._child_conn.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def send(self, op: str, **kwargs: Any) -> int:
        """Queue a command; the reply comes through ``Coordinator.pump``."""
        if self.dead or not self.proc.is_alive():
            self.dead = True
            raise ChildDied(self.name, self.proc.exitcode)
        self._next_id += 1
        try:
            self.conn.send(("call", self._next_id, op, kwargs))
        except (BrokenPipeError, OSError) as e:
            self.dead = True
            raise ChildDied(self.name, self.proc.exitcode) from e
        return self._next_id

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            os.kill(self.proc.pid, sig)
        self.proc.join(10)
        self.dead = True

    def close(self, timeout: float = 10.0) -> int | None:
        """Ask the child to quit; terminate, then kill, if it does not."""
        if self.proc.pid is None:
            return None
        if self.proc.is_alive() and not self.dead:
            with contextlib.suppress(Exception):
                self.conn.send(("call", -1, "quit", {}))
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.dead = True
        with contextlib.suppress(Exception):
            self.conn.close()
        return self.proc.exitcode


@dataclass(frozen=True)
class EngineRef:
    """An engine hosted by a child."""

    child: Child
    name: str
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def engine_id(self) -> str:
        return str(self.info.get("engine_id", self.name))


@dataclass
class Outcome:
    """What happened to one request."""

    req: str
    ok: bool
    failed_ids: list[int]
    bad_positions: list[int]
    producer_ids: list[int]
    consumer_ids: list[int]
    nbytes: int
    latency_s: float


class Coordinator:
    """Owns the children; routes events; acts as the P/D proxy."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}
        self.events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.recv_done: dict[str, dict[str, Any]] = {}
        self.sent_done: dict[str, dict[str, Any]] = {}
        # Exceptions raised by an engine step (vLLM's engine would die).
        self.engine_errors: list[dict[str, Any]] = []

    # -- lifecycle ------------------------------------------------------------

    def start(
        self,
        names: Iterable[str],
        env: dict[str, str] | None = None,
        timeout: float = DEFAULT_START_TIMEOUT_S,
    ) -> list[Child]:
        """Start children in parallel and wait until each answers a ping."""
        started = []
        for name in names:
            child = Child(name, env)
            self.children[name] = child
            child.start()
            started.append(child)
        self.call_all([(c, "ping", {}) for c in started], timeout=timeout)
        return started

    def close(self) -> dict[str, int | None]:
        """Stop every child; their exit codes (negative: killed by a signal)."""
        codes: dict[str, int | None] = {}
        for name, child in self.children.items():
            try:
                codes[name] = child.close()
            except Exception:  # noqa: BLE001 - keep closing the others
                codes[name] = child.proc.exitcode
        return codes

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messaging ------------------------------------------------------------

    def pump(self, timeout: float) -> int:
        """Receive what children sent within ``timeout``; messages handled."""
        live = [c for c in self.children.values() if not c.dead]
        if not live:
            time.sleep(min(timeout, 0.05))
            return 0
        objs: list[Any] = [c.conn for c in live] + [c.proc.sentinel for c in live]
        ready = mpc.wait(objs, timeout)
        handled = 0
        for child in live:
            if child.conn in ready:
                handled += self._drain_child(child)
            if child.proc.sentinel in ready and not child.conn.poll():
                child.dead = True  # exited and nothing left to read
        return handled

    def _drain_child(self, child: Child) -> int:
        handled = 0
        while True:
            try:
                if not child.conn.poll():
                    return handled
                msg = child.conn.recv()
            except (EOFError, OSError):
                child.dead = True
                return handled
            handled += 1
            if msg[0] == "reply":
                child.replies[msg[1]] = (msg[2], msg[3])
            else:
                self._on_event(msg[1], msg[2])

    def _on_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "recv":
            self.recv_done[payload["req"]] = payload
        elif kind == "sent":
            self.sent_done[payload["req"]] = payload
        elif kind == "error":
            self.engine_errors.append(payload)
        self.events.append((kind, payload))

    def _wait_reply(self, child: Child, call_id: int, op: str, deadline: float) -> Any:
        while call_id not in child.replies:
            if child.dead:
                child.proc.join(5)
                raise ChildDied(child.name, child.proc.exitcode)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{child.name}: no reply to {op} in time")
            self.pump(min(left, 0.5))
        return self.take_reply(child, call_id, op)

    def take_reply(self, child: Child, call_id: int, op: str) -> Any:
        """Pop the (arrived) reply to ``call_id``; raises ``ChildError`` for a
        command that failed in the child."""
        ok, value = child.replies.pop(call_id)
        if not ok:
            kind, message, tb = value
            raise ChildError(child.name, op, kind, message, tb)
        return value

    def call(
        self,
        child: Child,
        op: str,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
        **kwargs: Any,
    ) -> Any:
        """Run ``op`` in ``child`` and return its value (events are queued)."""
        call_id = child.send(op, **kwargs)
        return self._wait_reply(child, call_id, op, time.monotonic() + timeout)

    def call_all(
        self,
        calls: Sequence[tuple[Child, str, dict[str, Any]]],
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> list[Any]:
        """Run commands in several children at once (e.g. building engines)."""
        deadline = time.monotonic() + timeout
        ids = [(c, c.send(op, **kw), op) for c, op, kw in calls]
        return [self._wait_reply(c, i, op, deadline) for c, i, op in ids]

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.pump(min(left, 0.2))

    # -- engines --------------------------------------------------------------

    def add_engine(
        self,
        child: Child,
        name: str,
        timeout: float = DEFAULT_START_TIMEOUT_S,
        seed: int = 0,
        permute_local_kv: bool = False,
        **spec: Any,
    ) -> EngineRef:
        info = self.call(
            child,
            "add_engine",
            timeout=timeout,
            name=name,
            spec=spec,
            seed=seed,
            permute_local_kv=permute_local_kv,
        )
        return EngineRef(child, name, info)

    def add_engines(
        self,
        specs: Sequence[tuple[Child, str, dict[str, Any]]],
        timeout: float = DEFAULT_START_TIMEOUT_S,
    ) -> list[EngineRef]:
        """Build engines in several children in parallel.

        Each spec dict may carry ``seed`` and ``permute_local_kv``; the rest is
        ``EngineSpec``.
        """
        calls = []
        for child, name, spec in specs:
            spec = dict(spec)
            seed = spec.pop("seed", 0)
            permute = spec.pop("permute_local_kv", False)
            calls.append(
                (
                    child,
                    "add_engine",
                    {
                        "name": name,
                        "spec": spec,
                        "seed": seed,
                        "permute_local_kv": permute,
                    },
                )
            )
        infos = self.call_all(calls, timeout=timeout)
        return [EngineRef(c, n, i) for (c, n, _), i in zip(specs, infos, strict=True)]

    def op(
        self,
        ref: EngineRef,
        op: str,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
        **kwargs: Any,
    ) -> Any:
        return self.call(ref.child, op, timeout=timeout, engine=ref.name, **kwargs)

    def stats(self, ref: EngineRef) -> dict[str, Any]:
        return dict(self.op(ref, "stats"))

    def logs(self, ref_or_child: EngineRef | Child, since: int = 0) -> dict[str, Any]:
        child = (
            ref_or_child.child if isinstance(ref_or_child, EngineRef) else ref_or_child
        )
        return dict(self.call(child, "logs", since=since))

    # -- proxy ----------------------------------------------------------------

    def prefill(
        self, p: EngineRef, req: str, n: int | None = None, **kw: Any
    ) -> dict[str, Any] | None:
        """Producer fills ``n`` pool blocks (or ``block_ids=``); ``None`` when
        its pool is short. Returns ``{"params", "block_ids"}``."""
        return self.op(p, "prefill", req=req, n=n, **kw)

    def submit(
        self,
        d: EngineRef,
        req: str,
        params: dict[str, Any],
        n: int | None = None,
        **kw: Any,
    ) -> dict[str, Any] | None:
        """Consumer admits ``req`` into ``n`` pool blocks (or ``block_ids=``)."""
        return self.op(d, "submit", req=req, params=params, n=n, **kw)

    def wait_recv(self, req: str, timeout: float = 60.0) -> dict[str, Any]:
        """The consumer's verdict on ``req`` (after finished_recving)."""
        self.wait_for(lambda: req in self.recv_done, timeout, f"{req} to be received")
        return self.recv_done.pop(req)

    def wait_sent(self, req: str, timeout: float = 30.0) -> dict[str, Any]:
        """The producer's finished_sending of ``req``."""
        self.wait_for(lambda: req in self.sent_done, timeout, f"{req} to be sent")
        return self.sent_done.pop(req)

    def receive(
        self,
        d: EngineRef,
        req: str,
        params: dict[str, Any],
        n: int | None,
        timeout: float = 60.0,
        **kw: Any,
    ) -> Outcome:
        """Forward ``params`` to the consumer and wait for its verdict."""
        sub = self.submit(d, req, params, n=n, **kw)
        if sub is None:
            raise RuntimeError(f"{d.name}: pool has fewer than {n} free blocks")
        res = self.wait_recv(req, timeout)
        return Outcome(
            req,
            res["ok"],
            res["failed_ids"],
            res["bad_positions"],
            list(params.get("remote_block_ids", [[]])[0]),
            res["block_ids"],
            res["bytes"],
            res["latency_s"],
        )

    def transfer(
        self,
        p: EngineRef,
        d: EngineRef,
        req: str,
        n: int,
        timeout: float = 60.0,
        wait_sent: bool = True,
        producer_ids: Sequence[int] | None = None,
        consumer_ids: Sequence[int] | None = None,
        max_id: int | None = None,
    ) -> Outcome:
        """One request end to end: prefill, forward, receive, verify; with
        ``wait_sent`` also the producer's finished_sending (its blocks free)."""
        pre = self.prefill(
            p,
            req,
            n=None if producer_ids else n,
            block_ids=producer_ids,
            max_id=max_id,
        )
        if pre is None:
            raise RuntimeError(f"{p.name}: pool has fewer than {n} free blocks")
        out = self.receive(
            d,
            req,
            pre["params"],
            n=None if consumer_ids else n,
            timeout=timeout,
            block_ids=consumer_ids,
        )
        out.producer_ids = pre["block_ids"]
        if wait_sent and out.ok:
            self.wait_sent(req, timeout)
        return out


# ---------------------------------------------------------------------------
# Workload: many requests with growth and shrink on both sides
# ---------------------------------------------------------------------------


@dataclass
class Workload:
    """A seeded stream of requests with grow/shrink interleaved."""

    requests: int = 300
    blocks: tuple[int, int] = (1, 8)
    seed: int = 0
    window: int = 8  # requests in flight at once
    p_grow: float = 0.02  # per issued request, per side
    p_shrink: float = 0.02
    grow_blocks: int = 256
    # Producer shrinks may name blocks of requests still being read: the
    # connector's leases must keep them mapped until the read is done.
    shrink_live: bool = True
    timeout_s: float = 300.0
    # After the last verification, how long to wait for the producer's
    # finished_sending of every request (its blocks and leases are freed then).
    send_grace_s: float = 10.0


@dataclass
class RunStats:
    """Per-run counters (deltas over the run unless named otherwise)."""

    requests: int = 0
    ok: int = 0
    failed: int = 0
    blocks: int = 0
    blocks_verified: int = 0
    corrupted_blocks: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    throughput_mb_s: float = 0.0
    p_registrations: int = 0
    p_deregistrations: int = 0
    d_registrations: int = 0
    d_deregistrations: int = 0
    p_epoch: int = 0
    d_epoch: int = 0
    refreshes: int = 0
    refused_reads: int = 0
    p_grows: int = 0
    p_demand_grows: int = 0
    p_shrinks: int = 0
    d_grows: int = 0
    d_demand_grows: int = 0
    d_shrinks: int = 0
    deferred_by_lease: int = 0
    sends_confirmed: int = 0
    sends_unconfirmed: int = 0
    p_physical: int = 0
    d_physical: int = 0
    p_max_block_id: int = 0
    d_max_block_id: int = 0
    p_blocks_beyond_physical: int = 0
    d_blocks_beyond_physical: int = 0
    p_mapped_chunks: tuple[int, int] = (0, 0)  # min, max seen
    d_mapped_chunks: tuple[int, int] = (0, 0)
    unmapped_reads: int = 0  # children killed by SIGSEGV
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.failed == 0
            and self.corrupted_blocks == 0
            and self.unmapped_reads == 0
            and self.sends_unconfirmed == 0
            and not self.errors
            and self.ok == self.requests > 0
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("requests (ok / failed)", f"{self.requests} ({self.ok} / {self.failed})"),
            (
                "blocks transferred / verified",
                f"{self.blocks} / {self.blocks_verified}",
            ),
            ("corrupted blocks", str(self.corrupted_blocks)),
            ("reads of unmapped memory (SIGSEGV)", str(self.unmapped_reads)),
            ("bytes transferred", f"{self.bytes / 1e6:.2f} MB"),
            ("throughput", f"{self.throughput_mb_s:.2f} MB/s"),
            (
                "latency p50 / p99",
                f"{self.latency_p50_ms:.1f} / {self.latency_p99_ms:.1f} ms",
            ),
            ("wall time (transfers)", f"{self.wall_s:.2f} s"),
            (
                "prefill grows (on demand) / shrinks",
                f"{self.p_grows} ({self.p_demand_grows}) / {self.p_shrinks}",
            ),
            (
                "decode grows (on demand) / shrinks",
                f"{self.d_grows} ({self.d_demand_grows}) / {self.d_shrinks}",
            ),
            (
                "prefill NIXL registrations / deregistrations",
                f"{self.p_registrations} / {self.p_deregistrations}",
            ),
            (
                "decode NIXL registrations / deregistrations",
                f"{self.d_registrations} / {self.d_deregistrations}",
            ),
            ("prefill / decode mapping epoch", f"{self.p_epoch} / {self.d_epoch}"),
            ("consumer metadata refreshes", str(self.refreshes)),
            ("unmaps deferred by leases (blocks)", str(self.deferred_by_lease)),
            (
                "finished_sending confirmed / missing",
                f"{self.sends_confirmed} / {self.sends_unconfirmed}",
            ),
            ("reads refused by the connector", str(self.refused_reads)),
            (
                "max block id P / D (physical budget)",
                f"{self.p_max_block_id} / {self.d_max_block_id} "
                f"({self.p_physical} / {self.d_physical})",
            ),
            (
                "blocks at ids >= physical budget P / D",
                f"{self.p_blocks_beyond_physical} / {self.d_blocks_beyond_physical}",
            ),
            (
                "mapped chunks min-max P / D",
                f"{self.p_mapped_chunks[0]}-{self.p_mapped_chunks[1]} / "
                f"{self.d_mapped_chunks[0]}-{self.d_mapped_chunks[1]}",
            ),
        ]

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 28}"]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        if self.errors:
            lines += [f"errors ({len(self.errors)}):"] + [
                f"  {e}" for e in self.errors[:20]
            ]
        lines.append("RESULT: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def _percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class _Side:
    """Parent's view of one engine, for choosing where to grow."""

    def __init__(self, ref: EngineRef, rng: random.Random, grow_blocks: int) -> None:
        self.ref = ref
        self.physical = int(ref.info["physical_blocks"])
        self.virtual = int(ref.info["virtual_blocks"])
        self.elastic = bool(ref.info["elastic"])
        # Regions of grow_blocks beyond the physical budget, used in a random
        # order so the mapped memory has holes.
        self.slots = list(range(max(0, (self.virtual - self.physical) // grow_blocks)))
        rng.shuffle(self.slots)
        self.grow_blocks = grow_blocks
        self.chunks = (10**9, 0)

    def next_region(self) -> int | None:
        return (
            self.physical + self.slots.pop() * self.grow_blocks if self.slots else None
        )

    def seen(self, chunks: int) -> None:
        self.chunks = (min(self.chunks[0], chunks), max(self.chunks[1], chunks))


def run_workload(
    coord: Coordinator,
    p: EngineRef,
    d: EngineRef,
    wl: Workload,
    progress: Callable[[int, int, RunStats], None] | None = None,
    prefix: str = "req",
) -> RunStats:
    """Send ``wl.requests`` requests from ``p`` to ``d``, up to ``wl.window`` in
    flight, growing and shrinking both sides at seeded random points (and at
    least once each); every block is verified on the consumer.

    The producer grows on demand when its pool is short. Errors end the run
    and are recorded in ``RunStats.errors``; it never raises for them.
    """
    rng = random.Random(wl.seed)
    st = RunStats(
        p_physical=int(p.info["physical_blocks"]),
        d_physical=int(d.info["physical_blocks"]),
    )
    sides = {
        "p": _Side(p, random.Random(rng.random()), wl.grow_blocks),
        "d": _Side(d, random.Random(rng.random()), wl.grow_blocks),
    }
    n = wl.requests
    # Forced points so every run grows and shrinks each elastic side.
    forced: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for frac, side, what in (
        (0.15, "p", "grow"),
        (0.25, "d", "grow"),
        (0.35, "p", "grow"),
        (0.45, "d", "grow"),
        (0.55, "p", "shrink"),
        (0.65, "d", "shrink"),
    ):
        forced[int(frac * n)].append((side, what))
    inflight: dict[str, dict[str, Any]] = {}
    awaiting_sent: set[str] = set()
    sent_early: set[str] = set()  # finished_sending seen before the verdict
    latencies: list[float] = []
    issued = 0

    def mutate(side: str, what: str, demand: bool = False) -> bool:
        s = sides[side]
        if not s.elastic:
            return False
        if what == "grow":
            start = s.next_region()
            if start is None:
                return False
            r = coord.op(s.ref, "grow", n=wl.grow_blocks, start=start)
            if side == "p":
                st.p_grows += 1
                st.p_demand_grows += demand
            else:
                st.d_grows += 1
                st.d_demand_grows += demand
        else:
            r = coord.op(
                s.ref,
                "shrink",
                include_live=(side == "p" and wl.shrink_live),
                region=True,
                n=wl.grow_blocks,
            )
            st.deferred_by_lease += r["live_still_mapped"]
            if side == "p":
                st.p_shrinks += 1
            else:
                st.d_shrinks += 1
        s.seen(r["chunks_after"])
        return True

    # A request moves: prefill sent (at_p) -> submit sent (at_d) -> in flight
    # -> verdict. Commands are pipelined; each child answers in order, so a
    # shrink sent after a prefill sees that prefill's blocks in use.
    at_p: dict[int, tuple[str, int]] = {}
    at_d: dict[int, tuple[str, int, dict[str, Any]]] = {}
    # Requests a pool had no room for, retried when something was freed.
    p_short: collections.deque[tuple[str, int]] = collections.deque()
    d_short: collections.deque[tuple[str, int, dict[str, Any]]] = collections.deque()
    issued_at: dict[str, float] = {}
    mine: set[str] = set()  # every request this run issued

    def send_prefill(req: str, nb: int) -> None:
        at_p[p.child.send("prefill", engine=p.name, req=req, n=nb)] = (req, nb)

    def send_submit(req: str, nb: int, pre: dict[str, Any]) -> None:
        cid = d.child.send("submit", engine=d.name, req=req, params=pre["params"], n=nb)
        at_d[cid] = (req, nb, pre)

    def collect_replies() -> None:
        for cid in [c for c in at_p if c in p.child.replies]:
            req, nb = at_p.pop(cid)
            pre = coord.take_reply(p.child, cid, "prefill")
            if pre is None:
                p_short.append((req, nb))
            else:
                send_submit(req, nb, pre)
        for cid in [c for c in at_d if c in d.child.replies]:
            req, nb, pre = at_d.pop(cid)
            if coord.take_reply(d.child, cid, "submit") is None:
                d_short.append((req, nb, pre))
            else:
                inflight[req] = {"t": issued_at.pop(req), "p_ids": pre["block_ids"]}

    def retry_short(last: dict[str, int]) -> None:
        """Resend what a pool refused once a request finished (which frees
        blocks); grow the pool on demand when nothing else can free it."""
        progress = st.requests + st.sends_confirmed
        if p_short and not at_p:
            idle = not (at_d or inflight or d_short)
            if progress != last["p"] or idle:
                if progress == last["p"] and not mutate("p", "grow", demand=True):
                    raise RuntimeError(f"{p.name}: pool cannot hold a request")
                last["p"] = progress
                while p_short:
                    send_prefill(*p_short.popleft())
        if d_short and not at_d:
            idle = not (inflight or at_p)
            if progress != last["d"] or idle:
                if progress == last["d"] and not mutate("d", "grow", demand=True):
                    raise RuntimeError(f"{d.name}: pool cannot hold a request")
                last["d"] = progress
                while d_short:
                    send_submit(*d_short.popleft())

    def complete(res: dict[str, Any]) -> None:
        req = res["req"]
        info = inflight.pop(req)
        st.requests += 1
        st.blocks += res["blocks"]
        latencies.append(time.monotonic() - info["t"])
        if res["ok"]:
            st.ok += 1
            st.blocks_verified += res["blocks"]
            st.bytes += res["bytes"]
            if req in sent_early:
                sent_early.discard(req)
            else:
                awaiting_sent.add(req)
        elif res["failed_ids"]:
            st.failed += 1
            st.errors.append(f"{req}: failed, local blocks {res['failed_ids']}")
        else:
            st.corrupted_blocks += len(res["bad_positions"])
            st.errors.append(f"{req}: corrupted positions {res['bad_positions']}")
        for pid in info["p_ids"]:
            st.p_max_block_id = max(st.p_max_block_id, pid)
            st.p_blocks_beyond_physical += pid >= st.p_physical
        for did in res["block_ids"]:
            st.d_max_block_id = max(st.d_max_block_id, did)
            st.d_blocks_beyond_physical += did >= st.d_physical
        if progress is not None:
            progress(st.requests, n, st)

    def drain() -> None:
        for req in [r for r in coord.recv_done if r in inflight]:
            complete(coord.recv_done.pop(req))
        for req in [r for r in coord.sent_done if r in mine]:
            coord.sent_done.pop(req)
            st.sends_confirmed += 1
            if req in awaiting_sent:
                awaiting_sent.discard(req)
            else:
                sent_early.add(req)

    before: dict[str, dict[str, Any]] = {}
    errors_before = len(coord.engine_errors)
    t0 = time.monotonic()
    deadline = t0 + wl.timeout_s
    try:
        before = {k: coord.stats(s.ref) for k, s in sides.items()}
        for k, s in sides.items():
            if "mapped_chunks" in before[k]:
                s.seen(before[k]["mapped_chunks"])
        t0 = time.monotonic()
        last_retry = {"p": -1, "d": -1}
        while st.requests < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workload did not finish in {wl.timeout_s:.0f}s "
                    f"({st.requests}/{n} done, {len(inflight)} in flight)"
                )
            active = len(at_p) + len(at_d) + len(inflight) + len(p_short) + len(d_short)
            while issued < n and active < wl.window and not (p_short or d_short):
                for side, what in forced.pop(issued, []):
                    mutate(side, what)
                for side in ("p", "d"):
                    if rng.random() < wl.p_grow:
                        mutate(side, "grow")
                    if rng.random() < wl.p_shrink:
                        mutate(side, "shrink")
                req = f"{prefix}-{wl.seed}-{issued}"
                issued_at[req] = time.monotonic()
                mine.add(req)
                send_prefill(req, rng.randint(*wl.blocks))
                issued += 1
                active += 1
            for child in (p.child, d.child):
                if child.dead:
                    raise ChildDied(child.name, child.proc.exitcode)
            coord.pump(0.05)
            collect_replies()
            drain()
            retry_short(last_retry)
        st.wall_s = time.monotonic() - t0
        grace = time.monotonic() + wl.send_grace_s
        while awaiting_sent and time.monotonic() < grace:
            coord.pump(0.1)
            drain()
    except (ChildDied, ChildError, TimeoutError, RuntimeError) as e:
        st.errors.append(f"{type(e).__name__}: {e}")
    st.wall_s = st.wall_s or time.monotonic() - t0
    st.sends_unconfirmed = len(awaiting_sent)
    for err in coord.engine_errors[errors_before:]:
        st.errors.append(f"engine {err['engine']} step raised {err['error']}")
    st.throughput_mb_s = st.bytes / 1e6 / st.wall_s if st.wall_s > 0 else 0.0
    st.latency_p50_ms = _percentile(latencies, 0.5) * 1e3
    st.latency_p99_ms = _percentile(latencies, 0.99) * 1e3
    _collect(coord, sides, before, st)
    return st


def _collect(
    coord: Coordinator,
    sides: dict[str, _Side],
    before: dict[str, dict[str, Any]],
    st: RunStats,
) -> None:
    """Fill the per-engine counters of ``st`` (deltas against ``before``)."""
    for k, s in sides.items():
        child = s.ref.child
        if child.dead or not child.proc.is_alive():
            child.proc.join(5)
            if child.proc.exitcode == -signal.SIGSEGV:
                st.unmapped_reads += 1
            st.errors.append(f"{child.name}: {describe_exitcode(child.proc.exitcode)}")
            continue
        if k not in before:
            continue
        try:
            after = coord.stats(s.ref)
        except (ChildDied, ChildError, TimeoutError) as e:
            st.errors.append(f"stats of {s.ref.name}: {e}")
            continue
        b = before[k]
        regs = after.get("registrations", 0) - b.get("registrations", 0)
        deregs = after.get("deregistrations", 0) - b.get("deregistrations", 0)
        if "mapped_chunks" in after:
            s.seen(after["mapped_chunks"])
        chunks = s.chunks if s.elastic else (0, 0)
        if k == "p":
            st.p_registrations, st.p_deregistrations = regs, deregs
            st.p_epoch, st.p_mapped_chunks = after.get("epoch", 0), chunks
        else:
            st.d_registrations, st.d_deregistrations = regs, deregs
            st.d_epoch, st.d_mapped_chunks = after.get("epoch", 0), chunks
            st.refreshes = after.get("refreshes", 0) - b.get("refreshes", 0)
            st.refused_reads = after.get("refused_reads", 0) - b.get("refused_reads", 0)


def segv_count(coord: Coordinator) -> int:
    """Children that died of SIGSEGV (a read or write of unmapped memory)."""
    return sum(1 for c in coord.children.values() if c.proc.exitcode == -signal.SIGSEGV)


__all__ = [
    "Child",
    "ChildDied",
    "ChildError",
    "Coordinator",
    "EngineRef",
    "Outcome",
    "RunStats",
    "Workload",
    "describe_exitcode",
    "run_workload",
    "segv_count",
]
