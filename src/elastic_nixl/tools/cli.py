"""``elastic-nixl``: the P/D transfer demo, benchmarks and an environment check."""

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
        help="real prefill->decode transfers between two processes",
        add_help=False,
    )
    bench = sub.add_parser(
        "bench", help="benchmarks (ratios against vanilla, same run)"
    )
    bench.add_argument(
        "which",
        choices=["registration", "transfer"],
        help="registration: connectors on V >> P tensors; transfer: two-process "
        "NIXL reads, vanilla descriptors vs ours (--device cuda|cpu)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "doctor":
        from elastic_nixl.tools.doctor import main_doctor

        return main_doctor(rest)
    if args.command == "demo":
        from elastic_nixl.tools.demo import main_demo

        return main_demo(rest)
    if args.which == "registration":
        from elastic_nixl.tools.bench.registration import main_registration

        return main_registration(rest)
    from elastic_nixl.tools.bench.transfer import main as main_transfer

    return main_transfer(rest)


if __name__ == "__main__":
    raise SystemExit(main())
