"""``elastic-nixl demo``: two real ``vllm serve`` engines, disaggregated.

Starts a prefill (``kv_producer``) and a decode (``kv_consumer``) ``vllm
serve`` with ``ElasticNixlConnector`` (or vLLM's ``NixlConnector`` on either
side, for interop) on a small random-weight Llama made on first use
(:mod:`elastic_nixl.tools.serve.model`), sends prompts through vLLM's
toy-proxy flow (prefill with ``max_tokens: 1``, its ``kv_transfer_params``
to the decode), one at a time and then in concurrent waves, and compares
every greedy completion token for token with the same prompt served whole
by the decode server. Prints vLLM's own KV-transfer metrics and the time to
first token of both paths. Exit status 0 only when every completion is
identical.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from elastic_nixl.tools.serve.client import PDClient, RequestFailed
from elastic_nixl.tools.serve.metrics import NixlMetrics, mapped_bytes_lines
from elastic_nixl.tools.serve.model import DEFAULT_SPEC, ensure_model
from elastic_nixl.tools.serve.server import (
    CONSUMER,
    ELASTIC,
    PRODUCER,
    VANILLA,
    ServerError,
    ServerGroup,
    ServerSpec,
)
from elastic_nixl.tools.serve.workload import (
    Comparison,
    Summary,
    make_prompts,
    waves_for,
)

CONNECTORS = {"elastic": ELASTIC, "vanilla": VANILLA}
VMM_EXTRA = {"allocator": "vmm", "chunk_bytes": 131072, "max_mapped_bytes": 64 << 20}
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-nixl demo",
        description="Prefill/decode disaggregation between two real `vllm serve` "
        "engines with ElasticNixlConnector: every greedy completion is compared "
        "token for token with the prompt served whole. Exit 0 only if all are "
        "identical. Start-up of the two servers takes 1-3 minutes on 2 cores.",
    )
    p.add_argument("--requests", type=int, default=24, help="prompts (default 24)")
    p.add_argument(
        "--sequential",
        type=int,
        default=8,
        help="how many of them go one at a time first (default 8)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="size of the concurrent waves that follow (default 8)",
    )
    p.add_argument(
        "--min-bytes",
        type=int,
        default=40,
        help="shortest prompt; bytes = tokens (default 40)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=1500,
        help=f"longest prompt, at most {MAX_MODEL_LEN} - max tokens (default 1500)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=32, help="tokens generated (default 32)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts")
    p.add_argument(
        "--prefill-connector",
        choices=sorted(CONNECTORS),
        default="elastic",
        help="elastic: ElasticNixlConnector; vanilla: vLLM's NixlConnector",
    )
    p.add_argument(
        "--decode-connector",
        choices=sorted(CONNECTORS),
        default="elastic",
        help="the decode server's connector (default elastic)",
    )
    p.add_argument(
        "--allocator",
        choices=["static", "vmm"],
        default="static",
        help="vmm: both servers keep vLLM's KV cache in an elastic reservation "
        f"(kv_connector_extra_config {VMM_EXTRA}; the prefill caches prefixes) "
        "and the summary shows the memory mapped",
    )
    p.add_argument(
        "--extra-config",
        type=_json_object,
        default={},
        metavar="JSON",
        help="kv_connector_extra_config keys for both servers, e.g. "
        "'{\"num_threads\": 4}'",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        help="where the servers' logs go (default: a new temporary directory)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="bound on the servers' start-up (s)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="only the summary table")
    return p


class _Out:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> str | None:
    if args.requests < 1 or args.sequential < 0 or args.concurrency < 1:
        return "need --requests >= 1, --sequential >= 0, --concurrency >= 1"
    if not 1 <= args.min_bytes <= args.max_bytes:
        return "need 1 <= --min-bytes <= --max-bytes"
    if args.max_bytes + args.max_tokens > MAX_MODEL_LEN:
        return (
            f"--max-bytes + --max-tokens must stay within the servers' "
            f"--max-model-len {MAX_MODEL_LEN}"
        )
    if args.max_tokens < 1:
        return "need --max-tokens >= 1"
    if args.allocator == "vmm" and "vanilla" in (
        args.prefill_connector,
        args.decode_connector,
    ):
        return "--allocator vmm needs ElasticNixlConnector on both servers"
    return None


def main_demo(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"elastic-nixl demo: {problem}", file=sys.stderr)
        return 2
    out = _Out(args.quiet)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="elastic-nixl-demo-"))
    t_start = time.monotonic()
    # SIGTERM ends the run like Ctrl-C: the finally below stops the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    model = ensure_model()
    block_bytes = DEFAULT_SPEC.kv_bytes_per_token() * BLOCK_SIZE
    vmm = args.allocator == "vmm"
    extra = dict(VMM_EXTRA, **args.extra_config) if vmm else args.extra_config
    common: dict[str, Any] = dict(
        model=model,
        block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN,
        extra_config=extra,
    )
    specs = [
        ServerSpec(
            "prefill",
            role=PRODUCER,
            connector=CONNECTORS[args.prefill_connector],
            # The decode serves the whole baseline, so only the prefill caches.
            prefix_caching=vmm,
            **common,
        ),
        ServerSpec(
            "decode",
            role=CONSUMER,
            connector=CONNECTORS[args.decode_connector],
            **common,
        ),
    ]
    group = ServerGroup(specs, log_dir, start_timeout=args.start_timeout)
    summary: Summary | None = None
    try:
        out(
            f"starting prefill ({specs[0].connector}) and decode "
            f"({specs[1].connector}) vllm serve; logs in {log_dir} ..."
        )
        ready = group.start()
        prefill, decode = group["prefill"], group["decode"]
        out(
            "servers ready in "
            + ", ".join(f"{k} {v:.0f} s" for k, v in ready.items())
            + f"; model {model.name} ({DEFAULT_SPEC.num_layers} layers, "
            f"{DEFAULT_SPEC.dtype}), {block_bytes:,} KV bytes per "
            f"{BLOCK_SIZE}-token block"
        )
        client = PDClient(prefill.base_url, decode.base_url, str(model))
        # One request first: the decode's NIXL handshake with the prefill.
        warm = client.disaggregated("warm-up " * 16, 4)
        out(f"warm-up request done (handshake) in {warm.completion.total_s:.2f} s")
        before = NixlMetrics.parse(decode.metrics_text())
        prompts = make_prompts(args.requests, args.seed, args.min_bytes, args.max_bytes)
        waves = waves_for(args.requests, args.sequential, args.concurrency)
        out(
            f"{args.requests} prompts of {args.min_bytes}-{args.max_bytes} bytes, "
            f"waves {waves}, {args.max_tokens} greedy tokens each, "
            "disaggregated then whole"
        )
        comparison = Comparison(client, args.max_tokens, progress=out)
        comparison.run(prompts, waves)
        nixl = NixlMetrics.parse(decode.metrics_text()).minus(before)
        summary = Summary.build(
            comparison.outcomes, block_bytes, nixl, decode.log_text()
        )
        if vmm:
            time.sleep(3)  # let both engines go idle and release
            for name in ("prefill", "decode"):
                mapped = [b for _, b in mapped_bytes_lines(group[name].log_text())]
                if mapped:
                    summary.extra_rows.append(
                        (
                            f"{name} KV mapped peak / now (allocator: vmm)",
                            f"{max(mapped) / 2**20:.1f} / {mapped[-1] / 2**20:.1f} "
                            f"MiB of {specs[0].kv_cache_bytes} virtual",
                        )
                    )
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ServerError, RequestFailed) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        group.stop()
    total_s = time.monotonic() - t_start
    print(summary.table())
    for line in summary.mismatches:
        print(f"MISMATCH {line}")
    print(f"RESULT: {'PASS' if summary.passed else 'FAIL'}")
    print(f"total wall time (incl. server start): {total_s:.1f} s; logs: {log_dir}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(summary.to_dict(), total_wall_s=total_s, log_dir=str(log_dir)),
                f,
                indent=2,
            )
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main_demo())
