"""The parent side of the two-process harness: children, engines, the proxy.

:class:`Coordinator` starts :mod:`~elastic_nixl.tools.harness.child` processes,
builds engines in them, routes their events and acts as the P/D proxy
(prefill on the producer, forward ``kv_transfer_params``, receive on the
consumer). The parent never imports vLLM or torch (``import vllm`` costs
~20 s a process); every wait is bounded and children are always terminated.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from elastic_nixl.tools.harness.child import (
    CHILD_ENV_DEFAULTS,
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_START_TIMEOUT_S,
    ChildDied,
    ChildError,
    child_main,
)


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
            target=child_main,
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
