"""``elastic-nixl``: the P/D demo on real ``vllm serve`` engines, the stress run,
benchmarks and an environment check."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="elastic-nixl",
        description="vLLM NIXL KV transfer for elastic (VMM) KV caches",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, NIXL backends and a live self-check")
    sub.add_parser(
        "demo",
        help="two real `vllm serve` engines, prefill -> decode; every completion "
        "compared with the prompt served whole",
        add_help=False,
    )
    sub.add_parser(
        "stress",
        help="randomized grow/shrink transfers in the project's own engine loop "
        "(two processes, real NIXL), every block verified",
        add_help=False,
    )
    bench = sub.add_parser(
        "bench", help="benchmarks (ratios against vanilla, same run)"
    )
    bench.add_argument(
        "which",
        choices=["registration", "transfer", "events", "vmm"],
        help="registration: connectors on V >> P tensors; transfer: two-process "
        "NIXL transfers, vanilla descriptors vs ours (--device cuda|cpu); "
        "events: what one grow or shrink costs at 1k-50k mapped chunks; "
        "vmm: allocator 'vmm' in real vllm serve against static, memory over time",
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "doctor":
        from elastic_nixl.tools.doctor import main_doctor

        return main_doctor(rest)
    if args.command == "demo":
        from elastic_nixl.tools.demo import main_demo

        return main_demo(rest)
    if args.command == "stress":
        from elastic_nixl.tools.stress import main_stress

        return main_stress(rest)
    if args.which == "registration":
        from elastic_nixl.tools.bench.registration import main_registration

        return main_registration(rest)
    if args.which == "vmm":
        from elastic_nixl.tools.bench.vmm_serve import main as main_vmm

        return main_vmm(rest)
    if args.which == "events":
        from elastic_nixl.tools.bench.events import main_events

        return main_events(rest)
    from elastic_nixl.tools.bench.transfer import main as main_transfer

    return main_transfer(rest)


if __name__ == "__main__":
    raise SystemExit(main())
