"""``elastic-nixl bench vmm``: an elastic KV cache in real ``vllm serve``.

Starts two P/D pairs at once on the same model: one with vLLM's static KV
cache (``allocator: static``) and one with ``allocator: vmm``, and sends both
the same workload in phases separated by idle gaps (one request at a time,
waves of concurrent requests, a burst that needs more blocks than the cap).
Reports, from the servers' own logs:

- mapped memory over time, at peak and at idle, for each vmm engine, against
  the static engines' KV allocation (``--kv-cache-memory-bytes``, all of it
  allocated and zero-filled at start);
- start-up time of every server (all four start together, so they share the
  machine alike);
- the worker's per-step cost of mapping on demand (``Avg mapping time (ms)``
  in vLLM's KV Transfer metrics line), and the scheduler's per-step policy
  cost measured on vLLM's real ``BlockPool`` at the same geometry;
- prefix hits after an idle shrink: both prefills serve the same prompts,
  idle (the vmm one shrinks to ``idle_mapped_bytes``), then serve them
  extended, newest first; the tokens each served from vLLM's prefix cache
  (``vllm:prefix_cache_hits``), the static prefill's being the ceiling.

Every completion of both pairs is compared with the prompt served whole by
the static decode. With ``--plot PATH`` (needs matplotlib: the ``plot``
extra) it draws mapped memory against time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from elastic_nixl.tools.serve.client import PDClient
from elastic_nixl.tools.serve.metrics import (
    mapped_bytes_lines,
    prefix_cache_hits,
    transfer_log_lines,
)
from elastic_nixl.tools.serve.model import DEFAULT_SPEC, ensure_model
from elastic_nixl.tools.serve.server import (
    CONSUMER,
    PRODUCER,
    ServerGroup,
    ServerSpec,
)
from elastic_nixl.tools.serve.workload import Comparison, make_prompts

BLOCK_SIZE = 32
KV_BYTES = 256 << 20
CHUNK_BYTES = 128 << 10
CAP = 64 << 20
IDLE_PREFILL = 8 << 20
# Prefix phase: prompts of ~36 blocks against the vmm prefill's 8 MiB idle
# target (64 blocks of 128 KiB): more than it keeps, less than the static.
PREFIX_PROMPTS = 5
PREFIX_LEN = (1100, 1200)


# NIXL's progress thread spins a core per engine; four engines on a small
# machine would measure that, not the allocator (docs/demo.md, "Slow
# transfers"). All four engines turn it off alike.
NO_SPIN: dict[str, Any] = {"nixl_progress_thread": False}
# vLLM's 30 s KV lease is shorter than a burst of long prompts takes on two
# loaded cores: the producer frees the blocks before the decode reads them
# (and with the progress thread off, such a late read then waits for the
# producer's next request: a stall seen in this bench's first run).
LONG_LEASE: dict[str, Any] = {"kv_lease_duration": 600}


def vmm_extra(idle_bytes: int) -> dict[str, Any]:
    return {
        **NO_SPIN,
        "allocator": "vmm",
        "chunk_bytes": CHUNK_BYTES,
        "max_mapped_bytes": CAP,
        "idle_mapped_bytes": idle_bytes,
    }


def specs(model: Path) -> list[ServerSpec]:
    common: dict[str, Any] = dict(
        model=model, block_size=BLOCK_SIZE, kv_cache_bytes=f"{KV_BYTES >> 20}M"
    )
    fail = {"kv_load_failure_policy": "fail"}
    return [
        ServerSpec(
            "static-prefill",
            role=PRODUCER,
            extra_config={**NO_SPIN, **LONG_LEASE},
            prefix_caching=True,
            **common,
        ),
        ServerSpec(
            "static-decode",
            role=CONSUMER,
            extra_config=NO_SPIN,
            kv_options=fail,
            prefix_caching=True,
            **common,
        ),
        ServerSpec(
            "vmm-prefill",
            role=PRODUCER,
            extra_config={**vmm_extra(IDLE_PREFILL), **LONG_LEASE},
            prefix_caching=True,
            **common,
        ),
        ServerSpec(
            "vmm-decode",
            role=CONSUMER,
            extra_config=vmm_extra(0),
            kv_options=fail,
            prefix_caching=True,
            **common,
        ),
    ]


PHASES: list[tuple[str, int, int, int, int]] = [
    # name, prompts, concurrency, min bytes, max bytes
    ("one at a time", 6, 1, 300, 1500),
    ("waves of 8", 24, 8, 300, 1500),
    ("burst of 16 long", 16, 16, 1400, 1900),
]


def run_workload(
    group: ServerGroup, model: Path, idle_s: float, t_start: float, out: Any
) -> tuple[list[dict[str, Any]], int, int]:
    """Both pairs, phase by phase; returns the phase timeline and the
    (identical, total) completion counts."""
    whole = group["static-decode"].base_url
    pairs = {
        "static": PDClient(
            group["static-prefill"].base_url, whole, str(model), timeout=600
        ),
        "vmm": PDClient(
            group["vmm-prefill"].base_url,
            group["vmm-decode"].base_url,
            str(model),
            timeout=600,
        ),
    }
    timeline: list[dict[str, Any]] = []
    identical = total = 0
    for i, (name, n, conc, lo, hi) in enumerate(PHASES):
        prompts = make_prompts(n, seed=100 + i, min_len=lo, max_len=hi)
        waves = [conc] * (n // conc)
        start = time.time()
        for pair, client in pairs.items():
            comparison = Comparison(client, 16, whole_url=whole)
            comparison.run(prompts, waves)
            ok = sum(o.identical for o in comparison.outcomes)
            identical += ok
            total += len(comparison.outcomes)
            out(f"  {name} ({pair}): {ok}/{len(comparison.outcomes)} identical")
            for o in [o for o in comparison.outcomes if not o.identical][:3]:
                out(f"    {o.describe_mismatch()}")
        timeline.append(
            {"phase": name, "start": start - t_start, "end": time.time() - t_start}
        )
        out(f"  idle {idle_s:.0f} s")
        time.sleep(idle_s)
    return timeline, identical, total


def prefix_after_shrink(
    group: ServerGroup, model: Path, idle_s: float, out: Any
) -> tuple[dict[str, Any], int, int]:
    """Tokens each prefill serves from its prefix cache for the same
    prompts extended after an idle gap (newest first: walked oldest first,
    an LRU cache smaller than the prompts evicts each just before its turn).
    Every completion must equal the static decode's."""
    whole = group["static-decode"].base_url
    client = PDClient(whole, whole, str(model), timeout=600)
    prompts = make_prompts(
        PREFIX_PROMPTS, seed=200, min_len=PREFIX_LEN[0], max_len=PREFIX_LEN[1]
    )
    extended = [p + " and then some more words at the end" for p in reversed(prompts)]
    expected = [client.whole(p, 16, url=whole).token_ids for p in prompts + extended]
    result: dict[str, Any] = {
        "full_block_tokens": [len(p) // BLOCK_SIZE * BLOCK_SIZE for p in extended]
    }
    identical = 0
    for name in ("static-prefill", "vmm-prefill"):
        server = group[name]
        got = [client.whole(p, 16, url=server.base_url).token_ids for p in prompts]
        time.sleep(idle_s)
        hits = []
        for p in extended:
            before = prefix_cache_hits(server.metrics_text())
            got.append(client.whole(p, 16, url=server.base_url).token_ids)
            hits.append(int(prefix_cache_hits(server.metrics_text()) - before))
        identical += sum(g == e for g, e in zip(got, expected, strict=True))
        result[name] = hits
        out(f"  prefix hits after idle ({name}), newest first: {hits}")
    return result, identical, 2 * len(expected)


def _log_time(stamp: str, year: int) -> float:
    return dt.datetime.strptime(f"{year}-{stamp}", "%Y-%m-%d %H:%M:%S").timestamp()


def policy_step_cost(
    num_blocks: int, per_group: int, steps: int = 200
) -> dict[str, float]:
    """Median milliseconds of the scheduler-side policy, on vLLM's BlockPool
    with half the pool in use: a busy step that checks the groups of one
    finished 32-block request, and an idle step's scan of every mapped group."""
    from vllm.v1.core.block_pool import BlockPool

    from elastic_nixl.connector.pool import PoolPolicy, pool_geometry

    geometry = pool_geometry(num_blocks, 4096, 4 * 4096, per_group * 4096)
    pool = BlockPool(num_blocks, enable_caching=True, hash_block_size=16)
    policy = PoolPolicy(geometry, release_every=1)
    policy.bind(pool)
    used = pool.get_new_blocks(num_blocks // 2)
    ids = [b.block_id for b in used]
    policy.step(ids, idle=False, now=0.0)
    busy, idle = [], []
    for i in range(steps):
        request = ids[(32 * i) % (len(ids) - 32) :][:32]
        policy.note_freed(request)
        t0 = time.perf_counter()
        policy.step(request[:1], idle=False, now=float(i))
        busy.append(time.perf_counter() - t0)
    for i in range(20):
        policy.needs_idle_pass = True
        t0 = time.perf_counter()
        policy.step([], idle=True, now=1e6 + i)
        idle.append(time.perf_counter() - t0)
    return {
        "busy_step_ms": round(1e3 * statistics.median(busy), 4),
        "idle_scan_ms": round(1e3 * statistics.median(idle), 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elastic-nixl bench vmm", description=__doc__)
    p.add_argument("--idle", type=float, default=20.0, help="idle gap (s)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="PNG of mapped memory over time")
    p.add_argument("--log-dir", type=Path)
    args = p.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="elastic-nixl-vmm-"))

    def out(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model = ensure_model()
    year = dt.date.today().year
    t_start = time.time()
    with ServerGroup(specs(model), log_dir, start_timeout=900) as group:
        startup = {s.name: round(s.ready_s or 0.0, 1) for s in group.servers.values()}
        out(f"servers ready (s): {startup}; logs in {log_dir}")
        time.sleep(args.idle)
        timeline, identical, total = run_workload(group, model, args.idle, t_start, out)
        prefix, same, n = prefix_after_shrink(group, model, args.idle, out)
        identical += same
        total += n
        logs = {name: s.log_text() for name, s in group.servers.items()}
    result: dict[str, Any] = {
        "model": DEFAULT_SPEC.name,
        "kv_cache_bytes_static": KV_BYTES,
        "cap_bytes": CAP,
        "startup_s": startup,
        "completions_identical": f"{identical}/{total}",
        "timeline": timeline,
        "prefix_hits_after_idle": prefix,
        "engines": {},
    }
    for name in ("vmm-prefill", "vmm-decode"):
        series = [
            (_log_time(stamp, year) - t_start, b)
            for stamp, b in mapped_bytes_lines(logs[name])
        ]
        stats = [ln for ln in transfer_log_lines(logs[name]) if "Mapped MiB" in ln]
        peak = max(
            [b for _, b in series]
            + [int(ln["Peak mapped MiB"] * (1 << 20)) for ln in stats],
            default=0,
        )
        map_ms = [ln["Avg mapping time (ms)"] for ln in stats]
        result["engines"][name] = {
            "peak_mapped_bytes": peak,
            "idle_mapped_bytes": series[-1][1] if series else None,
            "peak_vs_static": round(peak / KV_BYTES, 4),
            "avg_mapping_ms_per_changing_step": (
                round(statistics.mean(map_ms), 3) if map_ms else None
            ),
            "series": series,
        }
    result["policy_ms"] = {f"V={v}": policy_step_cost(v, 4) for v in (2048, 65536)}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "engines"}
    summary["engines"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "series"}
        for k, v in result["engines"].items()
    }
    print(json.dumps(summary, indent=2))
    if args.plot:
        plot(result, args.plot)
    return 0 if identical == total else 1


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'elastic-nixl[plot]'")
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    mib = 1 << 20
    for name, eng in result["engines"].items():
        xs = [t for t, _ in eng["series"]]
        ys = [b / mib for _, b in eng["series"]]
        ax.step(xs, ys, where="post", label=f"{name} (allocator: vmm)")
    ax.axhline(
        result["kv_cache_bytes_static"] / mib,
        color="grey",
        linestyle="--",
        label="static KV cache (allocator: static), each engine",
    )
    ax.axhline(result["cap_bytes"] / mib, color="red", linestyle=":", label="cap")
    for ph in result["timeline"]:
        ax.axvspan(ph["start"], ph["end"], alpha=0.08)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("KV memory mapped (MiB)")
    ax.set_yscale("log")
    ax.set_ylim(0.25, 2 * result["kv_cache_bytes_static"] / mib)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
