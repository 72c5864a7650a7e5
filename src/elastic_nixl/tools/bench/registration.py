"""Registration benchmark: ElasticNixlConnector vs vLLM's NixlConnector.

``elastic-nixl bench registration`` (or ``python -m
elastic_nixl.tools.bench.registration``) measures ``register_kv_caches`` with a
real NIXL agent, in one run:

* ElasticNixlConnector on an elastic KV cache: ``V`` virtual blocks reserved
  (``HostBackend``: ``mmap(PROT_NONE)``), ``P`` mapped;
* vanilla NixlConnector on the *same* tensors, in a child process so that an
  assertion, an error or a crash (SIGSEGV) is reported as an outcome; once
  with ``V`` as given and once with ``V`` rounded up to a multiple of ``P``
  (which passes vLLM's segment check and registers the whole reservation);
* both connectors on vLLM's own static buffer of ``P`` blocks (the baseline
  vanilla can do), for elastic/vanilla ratios measured in the same process.

Per connector: median wall time of ``register_kv_caches`` over fresh
connectors, peak Python heap (``tracemalloc``, one extra traced run so the
timing runs are not slowed by tracing), peak RSS growth (``VmHWM``), bytes
handed to NIXL ``register_memory``, descriptors handed to ``prep_xfer_dlist``
and the size of the handshake payload peers download.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
ELASTIC = "ElasticNixlConnector"
VANILLA = "NixlConnector (vanilla)"
_CHILD_TIMEOUT_S = 600


@dataclass
class RegistrationResult:
    """One connector registering one set of KV tensors."""

    connector: str
    memory: str
    virtual_blocks: int
    physical_blocks: int
    outcome: str = "ok"
    times_ms: list[float] = field(default_factory=list)
    peak_traced_bytes: int | None = None
    peak_rss_delta_bytes: int | None = None
    registered_bytes: int | None = None
    registrations: int | None = None
    prepped_descs: int | None = None
    advertised_descs: int | None = None
    handshake_bytes: int | None = None
    stats_registered_bytes: int | None = None  # ElasticStats, elastic path only
    shutdown_ms: list[float] = field(default_factory=list)
    registered_after_shutdown: int | None = None  # bytes NIXL still holds
    mapped_bytes: int | None = None
    reserved_bytes: int | None = None
    regions: int | None = None
    child_wall_s: float | None = None  # the whole child process, imports included
    detail: str = ""

    @property
    def time_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time_ms"] = self.time_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegistrationResult:
        d = dict(d)
        d.pop("time_ms", None)
        return cls(**d)


# ----------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------


class NixlCounter:
    """Counts what a connector hands its NIXL agent, by wrapping the agent's
    ``register_memory`` / ``deregister_memory`` / ``prep_xfer_dlist``."""

    def __init__(self, agent: Any) -> None:
        self.registered_bytes = 0
        self.registrations = 0
        self.prepped_descs = 0
        reg, dereg, prep = (
            agent.register_memory,
            agent.deregister_memory,
            agent.prep_xfer_dlist,
        )

        def register_memory(*a: Any, **kw: Any) -> Any:
            descs = reg(*a, **kw)
            self.registered_bytes += _desc_bytes(descs)
            self.registrations += _desc_count(descs)
            return descs

        def deregister_memory(descs: Any, *a: Any, **kw: Any) -> Any:
            out = dereg(descs, *a, **kw)
            self.registered_bytes -= _desc_bytes(descs)
            self.registrations -= _desc_count(descs)
            return out

        def prep_xfer_dlist(agent_name: Any, xfer_list: Any, *a: Any, **kw: Any) -> Any:
            self.prepped_descs += _desc_count(xfer_list)
            return prep(agent_name, xfer_list, *a, **kw)

        agent.register_memory = register_memory
        agent.deregister_memory = deregister_memory
        agent.prep_xfer_dlist = prep_xfer_dlist


def _desc_count(descs: Any) -> int:
    """Descriptors in a NIXL list, a list of tuples, or an array of rows;
    strided rows (vLLM >= 0.33: addr, len, dev, stride, count) count each
    block they describe, so releases compare like for like."""
    count = getattr(descs, "descCount", None)
    if count is not None:
        return int(count())
    shape = getattr(descs, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] == 5:
        return int(descs[:, 4].sum())
    return len(descs)


def _desc_bytes(descs: Any) -> int:
    return sum(int(descs[i][1]) for i in range(_desc_count(descs)))


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _outcome(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}: {first[0] if first else ''}"


def measure_registration(
    make_connector: Callable[[], Any],
    kv_caches: dict[str, Any],
    repeats: int,
    result: RegistrationResult,
) -> RegistrationResult:
    """``repeats`` timed registrations plus one traced one (tracemalloc slows
    Python down, so that run is not timed), each on a fresh connector that is
    shut down afterwards; fills ``result``. The first failure ends it."""
    for i in range(repeats + 1):
        connector = make_connector()
        counter = NixlCounter(connector.connector_worker.nixl_wrapper)
        traced = i == repeats
        try:
            _register_once(connector, kv_caches, traced, counter, result)
        finally:
            t0 = time.perf_counter()
            connector.shutdown()
            if result.ok and not traced:
                result.shutdown_ms.append((time.perf_counter() - t0) * 1e3)
            result.registered_after_shutdown = counter.registered_bytes
        if not result.ok:
            break
    return result


def _register_once(
    connector: Any,
    kv_caches: dict[str, Any],
    traced: bool,
    counter: NixlCounter,
    result: RegistrationResult,
) -> None:
    import msgspec

    worker = connector.connector_worker
    rss0 = _proc_status_kib("VmRSS")
    hwm_ok = _reset_peak_rss()
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        connector.register_kv_caches(kv_caches)
    except Exception as e:  # noqa: BLE001 - an outcome, reported
        result.outcome = _outcome(e)
        result.detail = f"{type(e).__name__}: {e}"
        return
    finally:
        dt = time.perf_counter() - t0
        if traced:
            result.peak_traced_bytes = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    hwm = _proc_status_kib("VmHWM")
    if not traced:
        result.times_ms.append(dt * 1e3)
        if hwm_ok and hwm is not None and rss0 is not None:
            delta = max(hwm - rss0, 0)
            result.peak_rss_delta_bytes = max(result.peak_rss_delta_bytes or 0, delta)
    result.registered_bytes = counter.registered_bytes
    result.registrations = counter.registrations
    result.prepped_descs = counter.prepped_descs
    result.advertised_descs = int(getattr(worker, "num_descs", 0) or 0)
    result.regions = int(getattr(worker, "num_regions", 0) or 0)
    payload = worker.xfer_handshake_metadata
    result.handshake_bytes = (
        len(msgspec.msgpack.encode(payload)) if payload is not None else 0
    )
    stats = getattr(worker, "elastic_stats", None)
    if stats is not None and getattr(worker, "elastic", False):
        result.stats_registered_bytes = stats.registered_bytes


# ----------------------------------------------------------------------
# The set-ups
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    virtual_blocks: int
    physical_blocks: int
    layers: int
    chunk_bytes: int
    block_size: int = 32


def _configs(sizes: Sizes, connector: str, allocator: str | None) -> tuple[Any, Any]:
    from elastic_nixl.tools.harness.vllm_objects import (
        TinyModel,
        init_distributed,
        make_kv_cache_config,
        make_vllm_config,
    )

    vc = make_vllm_config(
        "kv_producer",
        connector=connector,
        extra={"allocator": allocator} if allocator else None,
        layout="LBHNC",
        block_size=sizes.block_size,
        model=TinyModel(num_layers=sizes.layers),
    )
    init_distributed(vc)
    return vc, make_kv_cache_config(vc, sizes.physical_blocks)


def _maker(connector: str, vc: Any, kcc: Any) -> Callable[[], Any]:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    if connector == ELASTIC:
        from elastic_nixl.connector.connector import ElasticNixlConnector

        return lambda: ElasticNixlConnector(vc, KVConnectorRole.WORKER, kcc)
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

    return lambda: NixlConnector(vc, KVConnectorRole.WORKER, kcc)


@contextlib.contextmanager
def elastic_kv_cache(sizes: Sizes, vc: Any, kcc: Any) -> Iterator[Any]:
    """The elastic KV cache: ``V`` blocks reserved, ``P`` mapped."""
    from elastic_nixl.allocator.host import HostBackend
    from elastic_nixl.vllm_seam import allocate_elastic_kv_cache

    ekv = allocate_elastic_kv_cache(
        vc, kcc, HostBackend(), sizes.virtual_blocks, sizes.chunk_bytes
    )
    try:
        ekv.allocator.grow_to(sizes.physical_blocks)
        yield ekv
    finally:
        ekv.allocator.close()


def bench_elastic(sizes: Sizes, repeats: int) -> RegistrationResult:
    """ElasticNixlConnector on an elastic KV cache of ``V`` virtual blocks."""
    vc, kcc = _configs(sizes, "ElasticNixlConnector", "vmm")
    with elastic_kv_cache(sizes, vc, kcc) as ekv:
        alloc = ekv.allocator
        res = RegistrationResult(
            ELASTIC,
            "elastic host (VMM)",
            alloc.num_virtual_blocks,
            sizes.physical_blocks,
            mapped_bytes=alloc.mapped_bytes,
            reserved_bytes=alloc.reservation.nbytes,
        )
        return measure_registration(
            _maker(ELASTIC, vc, kcc), ekv.kv_caches, repeats, res
        )


def bench_static(sizes: Sizes, repeats: int) -> list[RegistrationResult]:
    """Vanilla and Elastic (``allocator='static'``) on vLLM's own static
    buffer of ``P`` blocks: the baseline vanilla can do."""
    import torch
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    vc_v, kcc = _configs(sizes, "NixlConnector", None)
    vc_e, _ = _configs(sizes, "ElasticNixlConnector", "static")
    kv = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout.LBHNC)
    nbytes = next(iter(kv.values())).untyped_storage().nbytes()
    out = []
    for name, vc in ((VANILLA, vc_v), (ELASTIC, vc_e)):
        res = RegistrationResult(
            name,
            "static (vLLM allocate_kv_cache)",
            sizes.physical_blocks,
            sizes.physical_blocks,
            mapped_bytes=nbytes,
            reserved_bytes=nbytes,
        )
        out.append(measure_registration(_maker(name, vc, kcc), kv, repeats, res))
    return out


def vanilla_on_elastic(sizes: Sizes, repeats: int) -> RegistrationResult:
    """Vanilla NixlConnector on the elastic tensors, in this process."""
    vc, kcc = _configs(sizes, "NixlConnector", None)
    with elastic_kv_cache(sizes, vc, kcc) as ekv:
        alloc = ekv.allocator
        res = RegistrationResult(
            VANILLA,
            "elastic host (VMM)",
            alloc.num_virtual_blocks,
            sizes.physical_blocks,
            mapped_bytes=alloc.mapped_bytes,
            reserved_bytes=alloc.reservation.nbytes,
        )
        return measure_registration(
            _maker(VANILLA, vc, kcc), ekv.kv_caches, repeats, res
        )


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def vanilla_on_elastic_child(
    sizes: Sizes, repeats: int, timeout_s: float = _CHILD_TIMEOUT_S
) -> RegistrationResult:
    """:func:`vanilla_on_elastic` in a child process: an exception, a crash or
    a hang becomes the outcome instead of ending the bench."""
    fallback = RegistrationResult(
        VANILLA, "elastic host (VMM)", sizes.virtual_blocks, sizes.physical_blocks
    )
    with tempfile.TemporaryDirectory(prefix="elastic-nixl-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "elastic_nixl.tools.bench.registration",
            "--vanilla-child",
            "--virtual-blocks", str(sizes.virtual_blocks),
            "--physical-blocks", str(sizes.physical_blocks),
            "--layers", str(sizes.layers),
            "--chunk-bytes", str(sizes.chunk_bytes),
            "--repeats", str(repeats),
            "--json", str(out),
        ]  # fmt: skip
        env = dict(
            os.environ, VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu")
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            fallback.outcome = f"timed out after {timeout_s:.0f} s"
            return fallback
        wall = time.perf_counter() - t0
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        if out.exists():
            res = RegistrationResult.from_dict(json.loads(out.read_text()))
            res.child_wall_s = wall
            if proc.returncode != 0 and res.ok:
                res.outcome = f"exit code {proc.returncode} after registering"
                res.detail = tail
            return res
        if proc.returncode < 0:
            fallback.outcome = f"killed by {_signal_name(proc.returncode)}"
        else:
            fallback.outcome = f"failed: child exit code {proc.returncode}"
        fallback.detail = tail
        fallback.child_wall_s = wall
        return fallback


def divisible_virtual_blocks(sizes: Sizes, page_bytes: int) -> int:
    """The smallest V' >= V that is a multiple of P and keeps layers on chunk
    boundaries: the reservation vLLM's segment check accepts."""
    per_chunk = max(sizes.chunk_bytes // page_bytes, 1)
    step = math.lcm(sizes.physical_blocks, per_chunk)
    return math.ceil(sizes.virtual_blocks / step) * step


def run_registration(
    virtual_blocks: int = 1_000_000,
    physical_blocks: int = 1_000,
    layers: int = 4,
    chunk_bytes: int = 2 * MiB,
    repeats: int = 3,
    vanilla_elastic: bool = True,
    vanilla_divisible: bool = True,
    child_timeout_s: float = _CHILD_TIMEOUT_S,
) -> dict[str, Any]:
    """All measurements of one run, as plain data (``rows``: result dicts)."""
    sizes = Sizes(virtual_blocks, physical_blocks, layers, chunk_bytes)
    rows: list[RegistrationResult] = [bench_elastic(sizes, repeats)]
    if vanilla_elastic:
        rows.append(vanilla_on_elastic_child(sizes, repeats, child_timeout_s))
        page = _page_bytes(sizes)
        v2 = divisible_virtual_blocks(sizes, page)
        if vanilla_divisible and v2 != rows[0].virtual_blocks:
            sizes2 = Sizes(v2, physical_blocks, layers, chunk_bytes)
            rows.append(vanilla_on_elastic_child(sizes2, repeats, child_timeout_s))
    rows.extend(bench_static(sizes, repeats))
    return {
        "sizes": asdict(sizes),
        "repeats": repeats,
        "rows": [r.to_dict() for r in rows],
        "ratios": _ratios(rows),
    }


def _page_bytes(sizes: Sizes) -> int:
    _, kcc = _configs(sizes, "ElasticNixlConnector", "vmm")
    t = kcc.kv_cache_tensors[0]
    return int(t.size // (kcc.num_blocks * len(t.layers)))


def _ratios(rows: list[RegistrationResult]) -> dict[str, float | None]:
    """Elastic over vanilla-on-static: time and peak traced heap."""

    def find(connector: str, static: bool) -> RegistrationResult | None:
        for r in rows:
            if r.connector == connector and r.memory.startswith("static") == static:
                return r
        return None

    base = find(VANILLA, True)
    out: dict[str, float | None] = {}
    for key, other in (
        ("elastic_static", find(ELASTIC, True)),
        ("elastic_elastic", find(ELASTIC, False)),
    ):
        for metric in ("time_ms", "peak_traced_bytes"):
            a = getattr(other, metric, None) if other is not None and other.ok else None
            b = getattr(base, metric, None) if base is not None and base.ok else None
            out[f"{key}/vanilla_static {metric}"] = a / b if a and b else None
    return out


# ----------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------


def _fmt(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) or scale != 1.0:
        return f"{v / scale:,.{digits}f}"
    return f"{v:,}"


def format_table(report: dict[str, Any]) -> str:
    """The rows of :func:`run_registration` as a markdown table."""
    head = (
        "| connector | memory | V | P | outcome | time ms (median) | peak traced MB "
        "| peak RSS Δ MB | registered MB | prepped descs | handshake B |"
    )
    lines = [head, "|" + "---|" * head.count(" |")]
    for d in report["rows"]:
        r = RegistrationResult.from_dict(d)
        outcome = r.outcome.replace("|", "\\|")
        if len(outcome) > 90:
            outcome = outcome[:87] + "..."
        lines.append(
            f"| {r.connector} | {r.memory} | {r.virtual_blocks:,} | "
            f"{r.physical_blocks:,} | {outcome} | {_fmt(r.time_ms)} | "
            f"{_fmt(r.peak_traced_bytes, 1e6, 3)} | "
            f"{_fmt(r.peak_rss_delta_bytes, 1e6, 1)} | "
            f"{_fmt(r.registered_bytes, 1e6, 2)} | {_fmt(r.prepped_descs)} | "
            f"{_fmt(r.handshake_bytes)} |"
        )
    ratios = [
        f"{k}: {v:.2f}x" for k, v in report.get("ratios", {}).items() if v is not None
    ]
    if ratios:
        lines += ["", "Ratios: " + "; ".join(ratios)]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-nixl bench registration",
        description="Time and memory of KV registration: Elastic vs vanilla NIXL.",
    )
    p.add_argument("--virtual-blocks", type=int, default=1_000_000)
    p.add_argument("--physical-blocks", type=int, default=1_000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk-bytes", type=int, default=2 * MiB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--no-vanilla-elastic",
        action="store_true",
        help="skip vanilla NixlConnector on the elastic tensors (child processes)",
    )
    p.add_argument(
        "--no-divisible",
        action="store_true",
        help="skip vanilla on a reservation rounded to a multiple of P",
    )
    p.add_argument("--child-timeout", type=float, default=_CHILD_TIMEOUT_S)
    p.add_argument("--vanilla-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main_registration(argv: list[str] | None = None) -> int:
    """``elastic-nixl bench registration``."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO to stdout
    if args.vanilla_child:
        import faulthandler

        faulthandler.enable()
        sizes = Sizes(
            args.virtual_blocks, args.physical_blocks, args.layers, args.chunk_bytes
        )
        res = vanilla_on_elastic(sizes, args.repeats)
        if args.json is not None:
            args.json.write_text(json.dumps(res.to_dict()))
        return 0
    report = run_registration(
        args.virtual_blocks,
        args.physical_blocks,
        args.layers,
        args.chunk_bytes,
        args.repeats,
        vanilla_elastic=not args.no_vanilla_elastic,
        vanilla_divisible=not args.no_divisible,
        child_timeout_s=args.child_timeout,
    )
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["rows"][0]["outcome"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main_registration())
