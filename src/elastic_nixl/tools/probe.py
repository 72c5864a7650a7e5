"""A live two-process probe: what UCX really does for a READ and for a WRITE.

Two processes each register a buffer (cudaMalloc, or VMM memory from our
allocator) with a NIXL agent; one READs from and WRITEs to the other in
2 MiB descriptors and times both. UCX's own account of the protocol it picked
is captured with ``UCX_PROTO_INFO=y`` (a line with "software emulation" or
"tcp" there is the silent slow path). Two agents in one process always talk
over TCP, so the peers are separate processes: on one GPU both use it, on
several the second uses GPU 1. Used by ``elastic-nixl doctor``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Slower than this fraction of the faster op: reported as slow.
SLOW_FRACTION = 0.1
# Below this, whatever UCX says, a GPU transfer is running as software
# emulation over TCP (measured 0.3-0.5 GB/s on H100 and H200).
EMULATION_GBPS = 2.0
_PROTO_WORDS = ("software emulation", "cuda_ipc", "cuda_copy", "tcp", "rc_", "zcopy")


@dataclass
class OpResult:
    op: str
    gbps: float
    protocols: list[str] = field(default_factory=list)

    @property
    def emulated(self) -> bool:
        return any("emulation" in p for p in self.protocols)


@dataclass
class ProbeResult:
    memory: str  # "cudaMalloc" or "vmm"
    devices: tuple[int, int]
    read: OpResult
    write: OpResult

    def verdict(self) -> str:
        fast = max(self.read.gbps, self.write.gbps)
        out = []
        for r in (self.read, self.write):
            slow = (
                r.gbps < SLOW_FRACTION * fast or r.gbps < EMULATION_GBPS or r.emulated
            )
            how = (
                "software emulation | tcp"
                if r.emulated or r.gbps < EMULATION_GBPS
                else "far below the other direction"
            )
            out.append(f"{r.op} {r.gbps:.1f} GB/s" + (f" SLOW ({how})" if slow else ""))
        return ", ".join(out)


def _peer(role: str, memory: str, device: int, nbytes: int) -> None:
    """One side, driven over stdin/stdout with JSON lines."""
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(device)
    keep: Any
    if memory == "vmm":
        from elastic_nixl.allocator import BlockGeometry, CudaBackend, VmmKVAllocator

        backend = CudaBackend(device)
        geometry = BlockGeometry.layer_outermost(1 << 20, 1, nbytes >> 20)
        keep = VmmKVAllocator(backend, geometry, nbytes >> 20, backend.granularity)
        keep.grow_to(nbytes >> 20)
        buf = keep.tensor()[:nbytes]
    else:
        buf = keep = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf.fill_(7 if role == "target" else 1)
    torch.cuda.synchronize()
    agent = nixl_agent(f"probe-{role}", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(
        agent.get_reg_descs([(buf.data_ptr(), nbytes, device, "")], "VRAM")
    )
    _say(
        {"md": agent.get_agent_metadata().hex(), "addr": buf.data_ptr(), "dev": device}
    )
    peer = json.loads(sys.stdin.readline())
    if role == "target":
        sys.stdin.readline()  # until the initiator is done
        return
    name = agent.add_remote_agent(bytes.fromhex(peer["md"]))
    d = 2 << 20
    rows = [(buf.data_ptr() + i * d, d, device) for i in range(nbytes // d)]
    remote = [(peer["addr"] + i * d, d, peer["dev"]) for i in range(nbytes // d)]
    out = {}
    for op in ("READ", "WRITE"):
        best = 0.0
        for _ in range(3):
            h = agent.initialize_xfer(
                op,
                agent.get_xfer_descs(rows, "VRAM"),
                agent.get_xfer_descs(remote, "VRAM"),
                name,
                b"",
            )
            t0 = time.perf_counter()
            state = agent.transfer(h)
            deadline = t0 + 60
            while state == "PROC" and time.perf_counter() < deadline:
                state = agent.check_xfer_state(h)
            dt = time.perf_counter() - t0
            agent.release_xfer_handle(h)
            if state != "DONE":
                raise RuntimeError(f"{op} ended in {state}")
            best = max(best, nbytes / dt / 1e9)
        out[op] = best
    _say({"result": out})


# UCX logs to stdout too: our lines carry a prefix.
_PREFIX = "ELASTIC-NIXL-PROBE "


def _say(obj: dict[str, Any]) -> None:
    print(_PREFIX + json.dumps(obj), flush=True)


def _hear(stream: Any, log: list[str]) -> str:
    """Our next line from a peer's stdout; UCX's lines go to ``log``."""
    for line in stream:
        if line.startswith(_PREFIX):
            return line[len(_PREFIX) :]
        log.append(line)
    return ""


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[^\]]*\]\s*")


def _protocols(text: str, op: str) -> list[str]:
    """UCX's own account (``UCX_PROTO_INFO=y`` tables) of how ``op`` moves GPU
    memory: ``"<operation>: <description> | <transport>"`` per protocol row,
    e.g. ``software emulation | tcp`` or ``zero-copy | cuda_ipc/cuda``."""
    verb = "ucp_get" if op == "READ" else "ucp_put"
    out: list[str] = []
    title = ""
    for raw in text.splitlines():
        line = _LOG_PREFIX.sub("", raw).strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 1:
            title = cells[0] if " by ucp_" in cells[0] else title
            continue
        # The device-to-device rows only: what moves the KV memory itself
        # (host-memory rows are UCX's own bounce buffers and headers).
        if "host memory" in title:
            continue
        row = len(cells) >= 3 and cells[0].lower() != "range"
        if row and verb in title and "cuda" in title:
            out.append(f"{title}: {cells[1]} | {cells[2]}")
    return sorted(set(out))


def probe(
    memory: str = "cudaMalloc",
    devices: tuple[int, int] = (0, 0),
    nbytes: int = 256 << 20,
    timeout: float = 240.0,
) -> ProbeResult:
    """Run the two processes and return what they measured."""
    env = dict(os.environ, UCX_PROTO_INFO="y")
    env.setdefault("UCX_LOG_LEVEL", "info")
    procs = []
    for role, dev in (("target", devices[1]), ("initiator", devices[0])):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "elastic_nixl.tools.probe", role, memory,
                 str(dev), str(nbytes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )  # fmt: skip
    target, init = procs
    try:
        assert target.stdout and init.stdout and target.stdin and init.stdin
        log: list[str] = []
        t_info = _hear(target.stdout, log)
        i_info = _hear(init.stdout, log)
        init.stdin.write(t_info)
        init.stdin.flush()
        target.stdin.write(i_info)
        target.stdin.flush()
        result_line = _hear(init.stdout, log)
        target.stdin.write("done\n")
        target.stdin.flush()
        out, err = init.communicate(timeout=timeout)
        t_out, t_err = target.communicate(timeout=30)
        err = "".join(log) + out + err + t_out + t_err
        if not result_line:
            raise RuntimeError(f"probe failed: {err[-2000:]}")
        measured = json.loads(result_line)["result"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return ProbeResult(
        memory,
        devices,
        OpResult("READ", measured["READ"], _protocols(err, "READ")),
        OpResult("WRITE", measured["WRITE"], _protocols(err, "WRITE")),
    )


if __name__ == "__main__":
    _peer(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
