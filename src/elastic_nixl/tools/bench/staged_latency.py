"""Where one staged request spends its time: a timeline across two processes.

``python -m elastic_nixl.tools.bench.staged_latency`` runs the connector's
``StagingServer`` and ``StagedReader`` on GPU 0 in two processes (Llama-3-8B
shaped: 32 layers x 64 KiB), sends 1-, 8- and 32-block requests one at a
time, prints each request's wall time, then the timeline of the last one:
when each side saw each message, and when gathers, WRITEs and scatters
finished (``time.perf_counter``: one clock for both processes on Linux).
It also times a gather alone in one process. Needs a CUDA GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import torch

Event = tuple[str, float]


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


class _NoLease:
    def __init__(self, ids: Any) -> None:
        self.block_ids = tuple(ids)

    def release(self) -> None:
        return None


def _producer(conn: Any) -> None:
    from elastic_nixl.staging import StagingServer

    torch.cuda.set_device(0)
    kv = torch.randint(0, 255, (32, 512, 64 << 10), dtype=torch.uint8, device="cuda")
    log: list[Event] = []

    class Timed(StagingServer):
        def handle(self, peer: str, msg: Any) -> None:
            log.append((type(msg).__name__, time.perf_counter()))
            super().handle(peer, msg)

        def write(self, *a: Any, **k: Any) -> Any:
            log.append(("write posted", time.perf_counter()))
            return super().write(*a, **k)

        def _finish_writes(self) -> None:
            n = len(self._writing)
            super()._finish_writes()
            if len(self._writing) < n:
                log.append(("write done", time.perf_counter()))

    server = Timed(_agent("lat-srv"), list(kv), _NoLease, 64, 4, "VRAM")
    for n in (8, 32):
        times = []
        for _ in range(11):
            t0 = time.perf_counter()
            event = server.copy_async(server.buffer.gather, list(range(n)), 3)
            assert event is not None
            event.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"gather of {n} blocks alone: {1e3 * sorted(times)[5]:.3f} ms wall")
    conn.send(server.offer)
    conn.recv()
    conn.send(log)
    server.close()


def _consumer(conn: Any, sizes: list[int]) -> None:
    from elastic_nixl.staging import StagedRead, StagedReader

    torch.cuda.set_device(0)
    kv = torch.zeros((32, 512, 64 << 10), dtype=torch.uint8, device="cuda")
    log: list[Event] = []

    class Timed(StagedReader):
        def handle(self, peer: str, msg: Any) -> None:
            log.append((type(msg).__name__, time.perf_counter()))
            super().handle(peer, msg)

        def _check_scatters(self) -> None:
            n = len(self._scatters)
            super()._check_scatters()
            if len(self._scatters) < n:
                log.append(("scatter done", time.perf_counter()))

    offer = conn.recv()
    reader = Timed(_agent("lat-rd"), list(kv), 64, 4, "VRAM")
    out = []
    for n in sizes:
        for i in range(6):
            ids = list(range(i * 8, i * 8 + n))
            t0 = time.perf_counter()
            log.append(("submit", t0))
            reader.submit(StagedRead(f"r{n}-{i}", offer, ids, ids))
            _, error = reader.next_result(30)
            out.append((n, (time.perf_counter() - t0) * 1e3, error))
            log.append(("result", time.perf_counter()))
    conn.send((out, log))
    reader.close()


def main() -> int:
    ctx = mp.get_context("spawn")
    p_end, p_child = ctx.Pipe()
    c_end, c_child = ctx.Pipe()
    procs = [
        ctx.Process(target=_producer, args=(p_child,)),
        ctx.Process(target=_consumer, args=(c_child, [1, 8, 32])),
    ]
    for p in procs:
        p.start()
    try:
        c_end.send(p_end.recv())
        out, c_log = c_end.recv()
        p_end.send("stop")
        p_log = p_end.recv()
    finally:
        for p in procs:
            p.join(10)
    for n, ms, error in out:
        print(f"{n} block(s): {ms:.3f} ms {error or ''}")
    events = sorted(c_log + p_log, key=lambda e: e[1])
    start = [t for k, t in events if k == "submit"][-1]
    print("timeline of the last request:")
    for what, t in events:
        if t >= start:
            print(f"  {1e3 * (t - start):8.3f} ms  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
