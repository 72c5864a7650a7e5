"""``elastic-nixl stress``: randomized grow/shrink transfers over real NIXL.

The project's own engine loop (``tools/harness``), not vLLM's: ``elastic-nixl
demo`` is the real-engine run. Starts a prefill (kv_producer) and a decode
(kv_consumer) process, each with an ElasticNixlConnector over an elastic host
KV cache (a large ``PROT_NONE`` reservation, memory mapped on demand), and
proxies a few hundred requests
between them while both sides grow and shrink their mapped memory. Every
received block is compared with what the producer wrote; the run passes only
if every block verified, no request failed and no process touched unmapped
memory. Most of the wall time is the two processes importing vLLM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from elastic_nixl.tools.harness.child import ChildDied, ChildError, describe_exitcode
from elastic_nixl.tools.harness.coordinator import Coordinator
from elastic_nixl.tools.harness.workload import RunStats, Workload, run_workload

LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


def _block_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-nixl stress",
        description="Stress run of the connector in the project's own engine "
        "loop (not vLLM's): prefill/decode over real NIXL between two processes "
        "with elastic KV caches that grow and shrink mid-run; verifies every "
        "block. Exit 0 only if every block verified.",
    )
    p.add_argument("--requests", type=int, default=300, help="requests to transfer")
    p.add_argument(
        "--blocks-per-request",
        type=_block_range,
        default=(1, 8),
        metavar="LO-HI",
        help="blocks per request, drawn uniformly (default 1-8)",
    )
    p.add_argument(
        "--physical-blocks",
        type=int,
        default=256,
        help="blocks mapped at start (vLLM's budget)",
    )
    p.add_argument(
        "--virtual-blocks",
        type=int,
        default=65536,
        help="blocks reserved (address space only)",
    )
    p.add_argument("--grow-blocks", type=int, default=256, help="blocks per grow")
    p.add_argument("--window", type=int, default=8, help="requests in flight")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds blocks, grow/shrink points"
    )
    p.add_argument(
        "--layout", choices=LAYOUTS, default="LBHNC", help="KV layout, both engines"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="overall bound (s)")
    p.add_argument("--json", metavar="PATH", help="also write the counters as JSON")
    p.add_argument("--verbose", action="store_true", help="show the children's logs")
    p.add_argument("--quiet", action="store_true", help="only the summary table")
    return p


class _Progress:
    """An updating line on a terminal, else a line every tenth of the run."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.next_mark = 0

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def __call__(self, done: int, total: int, st: RunStats) -> None:
        if self.quiet:
            return
        line = (
            f"  {done}/{total} requests  ok={st.ok} failed={st.failed} "
            f"corrupted={st.corrupted_blocks}  grows P/D={st.p_grows}/{st.d_grows} "
            f"shrinks P/D={st.p_shrinks}/{st.d_shrinks}"
        )
        if self.tty:
            end = "\n" if done == total else ""
            sys.stderr.write("\r" + line + "   " + end)
            sys.stderr.flush()
        elif done >= self.next_mark or done == total:
            print(line, file=sys.stderr, flush=True)
            self.next_mark = done + max(1, total // 10)


def main_stress(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.physical_blocks < 2 or args.virtual_blocks <= args.physical_blocks:
        print("need 2 <= --physical-blocks < --virtual-blocks", file=sys.stderr)
        return 2
    out = _Progress(args.quiet)
    env = (
        {}
        if args.verbose
        else {"VLLM_LOGGING_LEVEL": "ERROR", "UCX_LOG_LEVEL": "error"}
    )
    t_start = time.monotonic()
    coord = Coordinator()
    stats: RunStats | None = None
    exit_codes: dict[str, int | None] = {}
    # SIGTERM ends the run like Ctrl-C: the finally below stops the children.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        out.say("starting prefill and decode processes (each imports vLLM) ...")
        prefill, decode = coord.start(["prefill", "decode"], env=env)
        common: dict[str, Any] = {
            "physical_blocks": args.physical_blocks,
            "virtual_blocks": args.virtual_blocks,
            "layout": args.layout,
            "memory": "vmm",
            "connector": "ElasticNixlConnector",
        }
        p, d = coord.add_engines(
            [
                (
                    prefill,
                    "p",
                    dict(
                        common,
                        role="kv_producer",
                        engine_id="stress-prefill",
                        seed=args.seed,
                    ),
                ),
                (
                    decode,
                    "d",
                    dict(
                        common,
                        role="kv_consumer",
                        engine_id="stress-decode",
                        seed=args.seed + 1,
                    ),
                ),
            ]
        )
        ready_s = time.monotonic() - t_start
        bb = p.info["block_bytes"]
        out.say(
            f"engines ready in {ready_s:.1f} s: layout {args.layout}, "
            f"{args.physical_blocks} of {args.virtual_blocks} blocks mapped "
            f"({bb} B/block, {bb * args.virtual_blocks / 2**20:.0f} MiB reserved "
            "per engine), host VMM, real NIXL/UCX"
        )
        wl = Workload(
            requests=args.requests,
            blocks=args.blocks_per_request,
            seed=args.seed,
            window=args.window,
            grow_blocks=args.grow_blocks,
            timeout_s=args.timeout,
        )
        stats = run_workload(coord, p, d, wl, progress=out, prefix="stress")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ChildDied, ChildError, TimeoutError) as e:
        print(f"stress run failed before the run: {e}", file=sys.stderr)
        if isinstance(e, ChildError) and args.verbose:
            print(e.remote_traceback, file=sys.stderr)
        return 1
    finally:
        exit_codes = coord.close()
    for name, code in exit_codes.items():
        if code not in (0, None) and stats is not None:
            stats.errors.append(f"{name} process: {describe_exitcode(code)}")
            if code == -signal.SIGSEGV:
                stats.unmapped_reads += 1
    assert stats is not None
    total_s = time.monotonic() - t_start
    print(stats.table())
    print(f"total wall time (incl. process start): {total_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stats.to_dict(), total_wall_s=total_s), f, indent=2)
    return 0 if stats.passed else 1


if __name__ == "__main__":
    sys.exit(main_stress())
