"""Two-process NIXL transfer benchmark: vanilla descriptors vs elastic_nixl.

Runs without vLLM (its wheel is too big to carry to the GPU machine): the
project's allocator, registration planning, per-request descriptor planning
and staging, moved by real NIXL agents in two processes. Rank 0 is the
producer, which answers requests; rank 1 drives every case: it READs the
producer's blocks (pull), WRITEs its own into the producer's (push), or asks
the producer's staging server to push blocks into its slots (staged).

Cases (``CASES``), all but the last at each request size of ``--sizes``, KV
shaped like Llama-3-8B by default (32 layers, 8 KV heads, head dim 128,
block 16, bf16: 64 KiB per layer per block):

* ``ceiling``: raw NIXL READ, 2 MiB descriptors, cudaMalloc -> cudaMalloc,
  a new transfer handle per batch;
* ``ceiling_reused_handle``: the same READ, one handle re-posted;
* ``ceiling_write``: raw NIXL WRITE, 2 MiB descriptors, the consumer's
  cudaMalloc buffer into the producer's (UCX keeps cuda_ipc PUT fast where,
  without NVLink, it turns READ off);
* ``a_vanilla_pull``: vLLM's NixlConnector scheme, one prepped descriptor per
  (layer, block), ``make_prepped_xfer`` READ by index;
* ``a_vanilla_push``: the same descriptors WRITTEN, as vLLM's push mode;
* ``b_project_static_staged``: cudaMalloc memory through the staged path the
  connector runs (``elastic_nixl.staging``: the producer's StagingServer
  gathers blocks into its slots and WRITEs each packed chunk into a slot the
  consumer's StagedReader granted, which scatters it; each on its own NIXL
  agent and thread, control over NIXL notifications);
* ``b_project_static_direct``: cudaMalloc memory READ with per-request
  descriptors from ``plan_read``;
* ``c_project_vmm_staged``: VMM memory on both sides through the staged path;
* ``d_project_vmm_direct``: VMM memory READ directly (what UCX does with it
  when nothing stages: software emulation over TCP), one small batch.

Also: cost of growing registered memory (map + NIXL register per chunk), of
staging (gather / scatter GB/s), and the transfer scenarios (stale metadata,
leases across a shrink, a read of unmapped memory refused). Every case
verifies the bytes it moved.

Usage: ``elastic-nixl bench transfer --device cuda --json out.json``;
``--device cpu`` runs the same code on host memory (small sizes) for CI.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch

from elastic_nixl.allocator import BlockGeometry, VmmKVAllocator
from elastic_nixl.connector.planning import (
    DescriptorPlanError,
    ExtentIndex,
    RegionGeometry,
    plan_read,
)
from elastic_nixl.connector.registration import ExtentRegistrar
from elastic_nixl.staging import (
    StagedRead,
    StagedReader,
    StagingBuffer,
    StagingOffer,
    StagingServer,
)
from elastic_nixl.staging.buffer import BlockRows

TIMEOUT_S = 120.0

# Every case the bench emits, in the order it runs them: the names of
# ``CaseResult.case`` in its output (tests/unit/test_docs.py holds the module
# docstring and the docs to these).
CASES: tuple[str, ...] = (
    "ceiling",
    "ceiling_reused_handle",
    "ceiling_write",
    "a_vanilla_pull",
    "a_vanilla_push",
    "b_project_static_staged",
    "b_project_static_direct",
    "c_project_vmm_staged",
    "d_project_vmm_direct",
)


class _NoLease:
    """Static memory is never unmapped: its lease pins nothing."""

    def __init__(self, block_ids: Any) -> None:
        self.block_ids = tuple(block_ids)

    def release(self) -> None:
        return None


@dataclass
class Shape:
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype_bytes: int = 2

    @property
    def page(self) -> int:
        return 2 * self.kv_heads * self.block_size * self.head_dim * self.dtype_bytes


@dataclass
class CaseResult:
    case: str
    batch_bytes: int
    descriptors: int
    size: str = ""
    seconds: list[float] = field(default_factory=list)
    verified: bool = False
    note: str = ""

    @property
    def gbps(self) -> float:
        return (
            self.batch_bytes / statistics.median(self.seconds) / 1e9
            if self.seconds
            else 0.0
        )


def _fingerprint(t: torch.Tensor) -> tuple[int, int]:
    v = t.contiguous().view(torch.int64)
    return int(v.sum().item()), int(v[::97].sum().item())


class BenchRank:
    """One process: memories registered with its own NIXL agent."""

    def __init__(self, rank: int, args: argparse.Namespace) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.rank = rank
        self.args = args
        self.shape = Shape(layers=args.layers)
        cuda = args.device == "cuda"
        # Any number of GPUs: with one, both processes share it.
        self.ngpus = torch.cuda.device_count() if cuda else 0
        self.dev_id = rank % self.ngpus if cuda else 0
        self.dev = torch.device("cuda", self.dev_id) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.dev)
        self.mem = "VRAM" if cuda else "DRAM"
        self.agent = nixl_agent(
            f"gpu-bench-{rank}", nixl_agent_config(backends=["UCX"])
        )
        L, nb, page = self.shape.layers, args.num_blocks, self.shape.page
        # vLLM's static buffer in a layer-outer layout (LBHNC): [L, NB, page].
        self.static = torch.empty((L, nb, page), dtype=torch.uint8, device=self.dev)
        # Elastic memory, same geometry, virtual capacity beyond what is mapped.
        if cuda:
            from elastic_nixl.allocator.cuda import CudaBackend

            backend: Any = CudaBackend(self.dev_id)
        else:
            from elastic_nixl.allocator.host import HostBackend

            backend = HostBackend()
        self.virtual = nb + args.grow_blocks
        geometry = BlockGeometry.layer_outermost(page, L, self.virtual)
        self.alloc = VmmKVAllocator(
            backend, geometry, self.virtual, args.chunk_bytes, name=f"bench{rank}"
        )
        self.alloc.grow_to(nb)
        self.vmm = (
            self.alloc.tensor()[: L * self.virtual * page]
            .view(torch.uint8)
            .view(L, self.virtual, page)
        )
        self.ceiling = torch.empty(
            args.ceiling_bytes, dtype=torch.uint8, device=self.dev
        )
        if rank == 0:
            g = torch.Generator(device=self.dev).manual_seed(1234)
            for t in (self.static, self.ceiling):
                t.view(torch.int32).copy_(
                    torch.randint(
                        -(2**31),
                        2**31 - 1,
                        t.view(torch.int32).shape,
                        generator=g,
                        device=self.dev,
                        dtype=torch.int32,
                    )
                )
            self.vmm[:, :nb].copy_(self.static)
        self.registered: dict[tuple[int, int], Any] = {}
        for t in (self.static, self.ceiling):
            self._register(t.data_ptr(), t.numel())
        # Elastic memory is registered as the connector does it: each mapped
        # extent once, following the allocator's events.
        self.registrar = ExtentRegistrar(self.agent)
        self.registrar.sync(self.alloc)
        self.register_s = 0.0
        self.alloc.subscribe(self._on_mapping)
        self.lease: Any = None
        self._servers: dict[str, StagingServer] = {}
        self._sync()

    def _on_mapping(self, event: Any) -> None:
        t0 = time.perf_counter()
        self.registrar.on_event(event)
        self.register_s += time.perf_counter() - t0

    def _register(self, base: int, nbytes: int) -> None:
        descs = self.agent.get_reg_descs([(base, nbytes, self.dev_id, "")], self.mem)
        self.agent.register_memory(descs)
        self.registered[(base, nbytes)] = descs

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def extents(self, which: str) -> list[tuple[int, int]]:
        if which == "static":
            return [(self.static.data_ptr(), self.static.numel())]
        return [(e.base, e.nbytes) for e in self.alloc.mapped_extents()]

    def regions(self, which: str) -> list[RegionGeometry]:
        t = self.static if which == "static" else self.vmm
        page = self.shape.page
        return [
            RegionGeometry(t[layer].data_ptr(), page, page)
            for layer in range(t.shape[0])
        ]

    def info(self) -> dict[str, Any]:
        return {
            "meta": self.agent.get_agent_metadata(),
            "static": self.extents("static"),
            "static_regions": [
                (r.base, r.block_len, r.block_stride) for r in self.regions("static")
            ],
            "vmm": self.extents("vmm"),
            "vmm_regions": [
                (r.base, r.block_len, r.block_stride) for r in self.regions("vmm")
            ],
            "ceiling": self.ceiling.data_ptr(),
        }

    def fingerprint(self, which: str, ids: list[int]) -> tuple[int, int]:
        t = self.static if which == "static" else self.vmm
        idx = torch.tensor(ids, device=self.dev)
        return _fingerprint(t.index_select(1, idx))

    @property
    def peer_dev_id(self) -> int:
        """The other rank's device (host memory is device 0)."""
        return (1 - self.rank) % self.ngpus if self.dev.type == "cuda" else 0

    def staging_agent(self, role: str) -> Any:
        from nixl._api import nixl_agent, nixl_agent_config

        return nixl_agent(
            f"gpu-bench-{role}-{self.rank}", nixl_agent_config(backends=["UCX"])
        )

    def staging_server(self, which: str) -> StagingServer:
        """The connector's producer-side staging engine over our static or VMM
        memory (static memory is never unmapped: its lease pins nothing)."""
        if which not in self._servers:
            lease = self.alloc.lease if which == "vmm" else _NoLease
            self._servers[which] = StagingServer(
                self.staging_agent(f"server-{which}"),
                list(self.kv(which)),
                lease,
                self.args.slot_blocks,
                self.args.slots,
                self.mem,
            )
        return self._servers[which]

    def kv(self, which: str) -> torch.Tensor:
        return self.static if which == "static" else self.vmm

    def wait(self, handle: Any) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        state = self.agent.check_xfer_state(handle)
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TimeoutError("NIXL transfer did not finish")
            state = self.agent.check_xfer_state(handle)
        return state


# ---------------------------------------------------------------------------
# Producer (rank 0): answers staging requests.
# ---------------------------------------------------------------------------


def producer_loop(side: BenchRank, conn: Any, peer: str) -> None:
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "fingerprint":
            conn.send(side.fingerprint(msg[1], msg[2]))
        elif kind == "ceiling_fp":
            conn.send(_fingerprint(side.ceiling[: msg[1]]))
        elif kind == "grow":
            conn.send(measure_growth(side, msg[1]))
        elif kind == "meta":
            conn.send(
                {"meta": side.agent.get_agent_metadata(), "vmm": side.extents("vmm")}
            )
        elif kind == "fill":
            idx = torch.tensor(msg[1], device=side.dev)
            fresh = torch.randint(
                0,
                255,
                (side.shape.layers, len(msg[1]), side.shape.page),
                dtype=torch.uint8,
                device=side.dev,
            )
            side.vmm.index_copy_(1, idx, fresh)
            side._sync()
            conn.send("filled")
        elif kind == "lease":
            side.lease = side.alloc.lease(msg[1])
            conn.send("leased")
        elif kind == "unmap":
            before = side.registrar.stats.deregistrations
            side.alloc.unmap_blocks(msg[1])
            conn.send(
                {
                    "deregistered": side.registrar.stats.deregistrations - before,
                    "still_mapped": [
                        b for b in msg[2] if b not in side.alloc.unmapped_blocks(msg[2])
                    ],
                }
            )
        elif kind == "release":
            before = side.registrar.stats.deregistrations
            side.lease.release()
            conn.send(
                {
                    "deregistered": side.registrar.stats.deregistrations - before,
                    "unmapped": side.alloc.unmapped_blocks(msg[1]),
                    "registered_bytes": side.registrar.stats.registered_bytes,
                    "mapped_bytes": side.alloc.mapped_bytes,
                }
            )
        elif kind == "stage_cost":
            conn.send(measure_staging(side, msg[1]))
        elif kind == "staging_server":
            conn.send(msgspec.msgpack.encode(side.staging_server(msg[1]).offer))


def measure_growth(side: BenchRank, blocks: int) -> dict[str, float]:
    """Map more memory and register it, as the connector does on a MAPPED event."""
    nb = side.args.num_blocks
    side.register_s = 0.0
    t0 = time.perf_counter()
    new = side.alloc.map_blocks(range(nb, nb + blocks))  # listener registers
    total = time.perf_counter() - t0
    chunks = max(len(new), 1)
    return {
        "chunks": float(len(new)),
        "map_ms_per_chunk": (total - side.register_s) * 1e3 / chunks,
        "register_ms_per_chunk": side.register_s * 1e3 / chunks,
        "chunk_bytes": float(side.alloc.chunk_bytes),
    }


def measure_staging(side: BenchRank, ids: list[int]) -> dict[str, float]:
    """Payload GB/s of the staging kernels, VMM memory <-> one slot, the ids
    scattered: what the connector's server and reader run per chunk."""
    rows = BlockRows(list(side.vmm))
    buf = StagingBuffer(rows.num_regions, rows.page, side.args.slot_blocks, 1, side.dev)
    chunk = ids[: side.args.slot_blocks]
    idx = torch.from_numpy(rows.index(chunk)).to(side.dev)
    nbytes = buf.geometry.chunk_bytes(len(chunk))
    out: dict[str, float] = {
        "chunk_bytes": float(nbytes),
        "one_kernel": rows.one_kernel,
    }
    for name, fn in (("gather", buf.gather), ("scatter", buf.scatter)):
        fn(rows, idx, 0, len(chunk))
        side._sync()
        t0 = time.perf_counter()
        for _ in range(20):
            fn(rows, idx, 0, len(chunk))
        side._sync()
        out[f"{name}_gbps"] = nbytes * 20 / (time.perf_counter() - t0) / 1e9
    return out


# ---------------------------------------------------------------------------
# Consumer (rank 1): runs the cases.
# ---------------------------------------------------------------------------


def run_ceiling(
    side: BenchRank, peer: str, remote: dict[str, Any], nbytes: int
) -> tuple[CaseResult, CaseResult]:
    d = 2 << 20
    n = nbytes // d
    loc = np.array(
        [[side.ceiling.data_ptr() + i * d, d, side.dev_id] for i in range(n)],
        dtype=np.uint64,
    )
    rem = np.array(
        [
            [
                remote["ceiling"] + i * d,
                d,
                side.peer_dev_id,
            ]
            for i in range(n)
        ],
        dtype=np.uint64,
    )
    res = CaseResult(
        "ceiling", n * d, n, note="new xfer handle per batch, as the cases below"
    )
    reuse = CaseResult(
        "ceiling_reused_handle",
        n * d,
        n,
        note="one handle re-posted, as a probe that reuses its handle",
    )
    ld, rd = (
        side.agent.get_xfer_descs(loc, side.mem),
        side.agent.get_xfer_descs(rem, side.mem),
    )
    for _ in range(side.args.repeats + 1):
        t0 = time.perf_counter()
        h = side.agent.initialize_xfer("READ", ld, rd, peer, b"")
        side.agent.transfer(h)
        state = side.wait(h)
        res.seconds.append(time.perf_counter() - t0)
        side.agent.release_xfer_handle(h)
        assert state == "DONE", state
    res.seconds = res.seconds[1:]
    h = side.agent.initialize_xfer("READ", ld, rd, peer, b"")
    for _ in range(side.args.repeats + 1):
        t0 = time.perf_counter()
        side.agent.transfer(h)
        assert side.wait(h) == "DONE"
        reuse.seconds.append(time.perf_counter() - t0)
    side.agent.release_xfer_handle(h)
    reuse.seconds = reuse.seconds[1:]
    return res, reuse


def run_ceiling_write(
    side: BenchRank, peer: str, remote: dict[str, Any], nbytes: int
) -> CaseResult:
    """The WRITE ceiling: our cudaMalloc buffer into the peer's, 2 MiB
    descriptors (UCX keeps cuda_ipc PUT without NVLink)."""
    d = 2 << 20
    n = nbytes // d
    loc = np.array(
        [[side.ceiling.data_ptr() + i * d, d, side.dev_id] for i in range(n)],
        dtype=np.uint64,
    )
    rem = np.array(
        [[remote["ceiling"] + i * d, d, side.peer_dev_id] for i in range(n)],
        dtype=np.uint64,
    )
    res = CaseResult("ceiling_write", n * d, n, note="WRITE, new handle per batch")
    ld, rd = (
        side.agent.get_xfer_descs(loc, side.mem),
        side.agent.get_xfer_descs(rem, side.mem),
    )
    for _ in range(side.args.repeats + 1):
        t0 = time.perf_counter()
        h = side.agent.initialize_xfer("WRITE", ld, rd, peer, b"")
        side.agent.transfer(h)
        state = side.wait(h)
        res.seconds.append(time.perf_counter() - t0)
        side.agent.release_xfer_handle(h)
        assert state == "DONE", state
    res.seconds = res.seconds[1:]
    return res


def run_vanilla(
    side: BenchRank,
    peer: str,
    remote: dict[str, Any],
    batches: list[tuple[list[int], list[int]]],
    op: str = "READ",
) -> CaseResult:
    """vLLM 0.32's scheme: prepped dlists of every (layer, block), by index:
    READ as NixlConnector (pull), WRITE as NixlPushConnector (push)."""
    L, nb, page = side.shape.layers, side.args.num_blocks, side.shape.page
    rdev = side.peer_dev_id

    def all_blocks(regions: list[tuple[int, int, int]], dev: int) -> np.ndarray:
        rows = np.empty((L * nb, 3), dtype=np.uint64)
        for layer, (base, _, stride) in enumerate(regions):
            rows[layer * nb : (layer + 1) * nb, 0] = (
                base + np.arange(nb, dtype=np.uint64) * stride
            )
        rows[:, 1] = page
        rows[:, 2] = dev
        return rows

    t0 = time.perf_counter()
    local = side.agent.prep_xfer_dlist(
        "NIXL_INIT_AGENT",
        side.agent.get_xfer_descs(
            all_blocks(
                [(r.base, r.block_len, r.block_stride) for r in side.regions("static")],
                side.dev_id,
            ),
            side.mem,
        ),
    )
    remote_h = side.agent.prep_xfer_dlist(
        peer,
        side.agent.get_xfer_descs(all_blocks(remote["static_regions"], rdev), side.mem),
    )
    prep_s = time.perf_counter() - t0
    name = "a_vanilla_pull" if op == "READ" else "a_vanilla_push"
    res = CaseResult(name, 0, 0, note=f"prep {L * nb} descs/side in {prep_s:.2f} s")
    for lids, rids in batches:
        li = [layer * nb + b for layer in range(L) for b in lids]
        ri = [layer * nb + b for layer in range(L) for b in rids]
        t0 = time.perf_counter()
        h = side.agent.make_prepped_xfer(op, local, li, remote_h, ri, b"")
        side.agent.transfer(h)
        state = side.wait(h)
        res.seconds.append(time.perf_counter() - t0)
        side.agent.release_xfer_handle(h)
        assert state == "DONE", state
        res.batch_bytes, res.descriptors = len(li) * page, len(li)
    side.agent.release_dlist_handle(local)
    side.agent.release_dlist_handle(remote_h)
    return res


def run_planned(
    side: BenchRank,
    peer: str,
    remote: dict[str, Any],
    which: str,
    batches: list[tuple[list[int], list[int]]],
    name: str,
) -> CaseResult:
    """The project's direct path: descriptors planned per request, coalesced."""
    lreg = side.regions(which)
    rreg = [RegionGeometry(*r) for r in remote[f"{which}_regions"]]
    lext, rext = (
        ExtentIndex.build(side.extents(which)),
        ExtentIndex.build(remote[which]),
    )
    res = CaseResult(name, 0, 0)
    for lids, rids in batches:
        t0 = time.perf_counter()
        state, plan = _read_planned(side, peer, lreg, rreg, lext, rext, lids, rids)
        res.seconds.append(time.perf_counter() - t0)
        assert state == "DONE", state
        res.batch_bytes, res.descriptors = plan.nbytes, plan.num_descs
    return res


def _read_planned(
    side: BenchRank,
    peer: str,
    lreg: list[RegionGeometry],
    rreg: list[RegionGeometry],
    lext: ExtentIndex,
    rext: ExtentIndex,
    lids: list[int],
    rids: list[int],
) -> tuple[str, Any]:
    """Plan one request's descriptors, READ them, wait: (final state, plan)."""
    rdev = side.peer_dev_id
    plan = plan_read(
        lreg,
        rreg,
        [lids] * len(lreg),
        [rids] * len(rreg),
        lext,
        rext,
        side.dev_id,
        rdev,
    )
    h = side.agent.initialize_xfer(
        "READ",
        side.agent.get_xfer_descs(plan.local, side.mem),
        side.agent.get_xfer_descs(plan.remote, side.mem),
        peer,
        b"",
    )
    side.agent.transfer(h)
    state = side.wait(h)
    side.agent.release_xfer_handle(h)
    return state, plan


def run_connector_staged(
    side: BenchRank,
    ask: Any,
    batches: list[tuple[list[int], list[int]]],
    name: str,
    which: str = "vmm",
) -> CaseResult:
    """Through the connector's own staging engine (StagingServer on the
    producer, StagedReader here, each on its own NIXL agent and thread; the
    producer gathers and WRITEs into slots the reader grants): what
    ElasticNixlConnector runs, on static or VMM memory."""
    offer = msgspec.msgpack.decode(ask(("staging_server", which)), type=StagingOffer)
    reader = StagedReader(
        side.staging_agent(f"reader-{which}-{name}"),
        list(side.kv(which)),
        side.args.slot_blocks,
        side.args.slots,
        side.mem,
        timeout_s=TIMEOUT_S,
    )
    res = CaseResult(name, 0, 0)
    try:
        for i, (lids, rids) in enumerate(batches):
            t0 = time.perf_counter()
            reader.submit(StagedRead(f"{name}-{i}", offer, rids, lids))
            result = reader.next_result(TIMEOUT_S)
            res.seconds.append(time.perf_counter() - t0)
            assert result == (f"{name}-{i}", None), result
            res.batch_bytes = len(lids) * side.shape.layers * side.shape.page
            res.descriptors = -(-len(lids) // side.args.slot_blocks)  # one a chunk
    finally:
        reader.close()
    return res


def read_direct(
    side: BenchRank, peer: str, remote: dict[str, Any], lids: list[int], rids: list[int]
) -> str:
    """One direct READ of VMM blocks, planned against what we know the peer
    registered; raises DescriptorPlanError before posting if it is not."""
    state, _ = _read_planned(
        side,
        peer,
        side.regions("vmm"),
        [RegionGeometry(*r) for r in remote["vmm_regions"]],
        ExtentIndex.build(side.extents("vmm")),
        ExtentIndex.build(remote["vmm"]),
        lids,
        rids,
    )
    return state


def run_scenarios(
    side: BenchRank, peer: str, remote: dict[str, Any], ask: Any
) -> dict[str, Any]:
    """The CPU transfer scenarios on GPU memory: ids beyond the physical budget
    after growth (stale metadata refreshed), shrink deferred by a lease, and a
    read of unmapped memory refused before NIXL."""
    nb, grow = side.args.num_blocks, side.args.grow_blocks
    out: dict[str, Any] = {}
    new_ids = list(range(nb, nb + 8))
    assert ask(("fill", new_ids)) == "filled"
    lids = list(range(8))
    try:
        read_direct(side, peer, remote, lids, new_ids)
        out["stale_metadata_detected"] = False
    except DescriptorPlanError:
        out["stale_metadata_detected"] = True
    fresh = ask(("meta",))
    side.agent.add_remote_agent(fresh["meta"])  # refresh what NIXL knows
    remote = dict(remote, vmm=fresh["vmm"])
    state = read_direct(side, peer, remote, lids, new_ids)
    theirs = tuple(ask(("fingerprint", "vmm", new_ids)))
    out["virtual_ids_after_growth"] = (
        state == "DONE" and side.fingerprint("vmm", lids) == theirs
    )
    # Shrink with a lease: only the leased chunks stay mapped and registered.
    leased = [nb + 1, nb + 2]
    assert ask(("lease", leased)) == "leased"
    shrink = ask(("unmap", list(range(nb, nb + grow)), leased))
    out["shrink_deregistered_unleased_chunks"] = shrink["deregistered"]
    out["leased_blocks_still_mapped"] = shrink["still_mapped"] == leased
    remote = dict(remote, vmm=ask(("meta",))["vmm"])
    state = read_direct(side, peer, remote, [20, 21], leased)
    theirs = tuple(ask(("fingerprint", "vmm", leased)))
    out["read_under_lease"] = (
        state == "DONE" and side.fingerprint("vmm", [20, 21]) == theirs
    )
    released = ask(("release", leased))
    out["deregistered_after_release"] = released["deregistered"]
    out["unmapped_after_release"] = released["unmapped"] == leased
    out["registered_equals_mapped"] = (
        released["registered_bytes"] == released["mapped_bytes"]
    )
    remote = dict(remote, vmm=ask(("meta",))["vmm"])
    try:
        read_direct(side, peer, remote, [30], [nb + 1])
        out["unmapped_read_refused"] = False
    except DescriptorPlanError as e:
        out["unmapped_read_refused"] = True
        out["refusal"] = str(e)
    return out


def consumer_main(
    side: BenchRank, conn: Any, peer: str, remote: dict[str, Any]
) -> dict[str, Any]:
    args = side.args
    rng = np.random.default_rng(args.seed)
    nb = args.num_blocks

    def batches(count: int, n: int) -> list[tuple[list[int], list[int]]]:
        out = []
        for _ in range(count):
            rids = sorted(rng.choice(nb, size=n, replace=False).tolist())
            lids = sorted(rng.choice(nb, size=n, replace=False).tolist())
            out.append((lids, rids))
        return out

    def ask(msg: Any) -> Any:
        conn.send(("to_producer", msg))
        return conn.recv()

    def verify(
        res: CaseResult, which: str, lids: list[int], rids: list[int]
    ) -> CaseResult:
        mine = side.fingerprint(which, lids)
        theirs = ask(("fingerprint", which if which == "static" else "vmm", rids))
        res.verified = mine == tuple(theirs)
        return res

    def verify_pushed(res: CaseResult, lids: list[int], rids: list[int]) -> CaseResult:
        """A WRITE case moved our blocks ``lids`` into the producer's ``rids``."""
        res.verified = side.fingerprint("static", lids) == tuple(
            ask(("fingerprint", "static", rids))
        )
        return res

    block_bytes = side.shape.page * side.shape.layers
    results: list[CaseResult] = []
    bc: list[tuple[list[int], list[int]]] = []
    for size in args.sizes:
        n = max(1, size // block_bytes)
        tag = f"{size >> 20}MiB"
        ceiling_bytes = max(2 << 20, min(size, args.ceiling_bytes))
        res, reuse = run_ceiling(side, peer, remote, ceiling_bytes)
        res.verified = reuse.verified = _fingerprint(
            side.ceiling[:ceiling_bytes]
        ) == tuple(ask(("ceiling_fp", ceiling_bytes)))
        wres = run_ceiling_write(side, peer, remote, ceiling_bytes)
        wres.verified = _fingerprint(side.ceiling[:ceiling_bytes]) == tuple(
            ask(("ceiling_fp", ceiling_bytes))
        )
        group = [res, reuse, wres]
        b = batches(args.repeats, n)
        group.append(verify(run_vanilla(side, peer, remote, b), "static", *b[-1]))
        group.append(verify_pushed(run_vanilla(side, peer, remote, b, "WRITE"), *b[-1]))
        side.static.zero_()
        res = run_connector_staged(side, ask, b, "b_project_static_staged", "static")
        group.append(verify(res, "static", *b[-1]))
        side.static.zero_()
        res = run_planned(side, peer, remote, "static", b, "b_project_static_direct")
        group.append(verify(res, "static", *b[-1]))
        bc = batches(args.repeats, n)
        res = run_connector_staged(side, ask, bc, "c_project_vmm_staged")
        group.append(verify(res, "vmm", *bc[-1]))
        for r in group:
            r.size = tag
        results += group
    small = batches(1, max(1, args.direct_vmm_blocks))
    res = run_planned(side, peer, remote, "vmm", small, "d_project_vmm_direct")
    res.note = "no staging: what UCX does with VMM memory on its own"
    res.size = "small"
    results.append(verify(res, "vmm", *small[-1]))
    growth = ask(("grow", args.grow_blocks))
    stage_cost = ask(("stage_cost", bc[-1][1]))
    scenarios = run_scenarios(side, peer, remote, ask)
    return {
        "results": [asdict(r) | {"gbps": r.gbps} for r in results],
        "growth": growth,
        "staging": stage_cost,
        "scenarios": scenarios,
    }


def child(rank: int, conn: Any, args: argparse.Namespace) -> None:
    try:
        side = BenchRank(rank, args)
        conn.send(side.info())
        peer_info = conn.recv()
        peer = side.agent.add_remote_agent(peer_info["meta"])
        if isinstance(peer, bytes):
            peer = peer.decode()
        # Both agents must know each other before notifications flow.
        conn.send("ready")
        conn.recv()
        if rank == 0:
            producer_loop(side, conn, peer)
        else:
            conn.send(("result", consumer_main(side, conn, peer, peer_info)))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", f"rank {rank}: {e!r}\n{traceback.format_exc()}"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [
        ctx.Process(target=child, args=(r, pipes[r][1], args), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    conns = [p[0] for p in pipes]
    try:
        infos = [_recv(c) for c in conns]
        conns[0].send(infos[1])
        conns[1].send(infos[0])
        for c in conns:
            assert _recv(c) == "ready"
        for c in conns:
            c.send("go")
        while True:
            msg = _recv(conns[1], timeout=600)
            if msg[0] == "to_producer":
                conns[0].send(msg[1])
                conns[1].send(_recv(conns[0], timeout=600))
            elif msg[0] == "result":
                conns[0].send(("stop",))
                return dict(msg[1])
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _recv(conn: Any, timeout: float = 300) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError("benchmark child did not answer")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(msg[1])
    return msg


def table(out: dict[str, Any]) -> str:
    """Markdown: each case against the best ceiling (READ or WRITE) and vanilla
    pull of the same request size, with the median time a request took."""
    rows = out["results"]
    lines = [
        "| size | case | GB/s | ms / request | x best ceiling | x vanilla pull "
        "| descriptors | verified | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        by = {r["case"]: r for r in group}
        ceilings = [by[c]["gbps"] for c in ("ceiling", "ceiling_write") if c in by]
        best = max(ceilings) if ceilings else 0.0
        pull = by.get("a_vanilla_pull", {}).get("gbps", 0.0)
        for r in group:
            ms = statistics.median(r["seconds"]) * 1e3 if r["seconds"] else 0.0
            lines.append(
                f"| {size} | {r['case']} | {r['gbps']:.1f} | {ms:.2f} | "
                f"{r['gbps'] / best if best else 0:.2f} | "
                f"{r['gbps'] / pull if pull else 0:.1f} | {r['descriptors']} | "
                f"{r['verified']} | {r['note']} |"
            )
    g, s = out["growth"], out["staging"]
    lines.append("")
    lines.append(
        f"growth: {g['chunks']:.0f} chunks of {g['chunk_bytes'] / 2**20:.0f} MiB, map "
        f"{g['map_ms_per_chunk']:.3f} ms/chunk, NIXL register "
        f"{g['register_ms_per_chunk']:.3f} ms/chunk"
    )
    lines.append(
        f"staging kernels ({s['chunk_bytes'] / 2**20:.0f} MiB chunk, one kernel: "
        f"{bool(s['one_kernel'])}): gather {s['gather_gbps']:.0f} GB/s, "
        f"scatter {s['scatter_gbps']:.0f} GB/s of payload"
    )
    lines.append("scenarios: " + json.dumps(out["scenarios"], indent=1))
    return "\n".join(lines)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elastic-nixl bench transfer")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=4096)
    p.add_argument(
        "--sizes",
        type=lambda t: [_size(x) for x in t.split(",")],
        default=[16 << 20, 64 << 20, 256 << 20, 1 << 30],
        help="bytes of one request (comma-separated, K/M/G suffixes); each size "
        "runs every case",
    )
    p.add_argument(
        "--batch-bytes", type=_size, default=None, help="one size (as --sizes X)"
    )
    p.add_argument("--ceiling-bytes", type=int, default=1 << 30)
    p.add_argument("--slot-blocks", type=int, default=32)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--chunk-bytes", type=int, default=2 << 20)
    p.add_argument("--grow-blocks", type=int, default=64)
    p.add_argument("--direct-vmm-blocks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.batch_bytes is not None:
        args.sizes = [args.batch_bytes]
    out = run(args)
    out["args"] = vars(args)
    out["env"] = {"UCX_TLS": os.environ.get("UCX_TLS", "(default)")}
    if args.device == "cuda":
        out["env"]["gpus"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    sc = out["scenarios"]
    ok = all(r["verified"] for r in out["results"]) and all(
        sc[k]
        for k in (
            "stale_metadata_detected",
            "virtual_ids_after_growth",
            "leased_blocks_still_mapped",
            "read_under_lease",
            "unmapped_after_release",
            "registered_equals_mapped",
            "unmapped_read_refused",
        )
    )
    if not ok:
        print("VERIFICATION FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
