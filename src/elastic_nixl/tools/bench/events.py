"""Mapping-event benchmark: what one grow or shrink costs the connector.

``elastic-nixl bench events`` builds ElasticNixlConnector's worker over an
elastic host KV cache with a real NIXL agent, maps ``N`` chunks, then times
single-chunk map and unmap calls (the allocator, its event, the connector's
listener and NIXL's register/deregister together) and the once-per-step
rebuild of the handshake payload peers read. Per-event cost must not grow
with ``N``; the payload rebuild does (it describes every extent) and runs at
most once per engine step. Medians of ``--repeats`` events, each size in the
same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


def measure(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    from nixl._api import nixl_agent, nixl_agent_config

    from elastic_nixl.tools.harness.engine import EngineSpec, PDEngine
    from elastic_nixl.tools.harness.vllm_objects import free_port

    top = max(sizes)
    # 4 KiB pages (2 layers): one block per chunk per layer, so N blocks are
    # 2N chunks; mapped as one contiguous range (vm.max_map_count allows it).
    spec = EngineSpec(
        "kv_producer",
        "bench-events",
        free_port(),
        physical_blocks=16,
        virtual_blocks=top + 4 * repeats + 64,
        chunk_bytes=4096,
    )
    agent = nixl_agent("bench-events", nixl_agent_config(backends=["UCX"]))
    engine = PDEngine(spec, nixl_agent=agent)
    alloc = engine.allocator
    assert alloc is not None
    worker = engine.worker.connector_worker
    rows = []
    try:
        done = 0
        for n in sizes:
            alloc.map_blocks(range(done, n))
            done = n
            worker.build_worker_meta()
            maps, unmaps = [], []
            for k in range(repeats):
                b = top + 2 * k + 1
                t0 = time.perf_counter()
                alloc.map_blocks([b])
                maps.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                alloc.unmap_blocks([b])
                unmaps.append(time.perf_counter() - t0)
            alloc.map_blocks([top + 1])
            t0 = time.perf_counter()
            worker.build_worker_meta()
            rebuild = time.perf_counter() - t0
            alloc.unmap_blocks([top + 1])
            rows.append(
                {
                    "mapped_chunks": alloc.num_mapped_chunks,
                    "map_event_ms": statistics.median(maps) * 1e3,
                    "unmap_event_ms": statistics.median(unmaps) * 1e3,
                    "payload_rebuild_ms": rebuild * 1e3,
                }
            )
    finally:
        engine.shutdown()
    return rows


def main_events(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elastic-nixl bench events")
    p.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=[500, 2_500, 25_000],
        help="mapped blocks before timing (2 chunks each): 1k, 5k, 50k chunks",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = measure(sorted(args.blocks), args.repeats)
    print("| mapped chunks | map event ms | unmap event ms | payload rebuild ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mapped_chunks']} | {r['map_event_ms']:.3f} | "
            f"{r['unmap_event_ms']:.3f} | {r['payload_rebuild_ms']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main_events())
