"""``elastic-nixl doctor``: what is installed, and a live self-check.

The self-check does for real what the connector does at start-up, without
vLLM (whose import takes ~20 s): reserve elastic host memory, map part of it
with a hole, register exactly the mapped extents with a real NIXL agent (the
connector's own planning code decides what), read blocks into a second agent
over UCX and compare bytes, and show a read of an unmapped block refused
before it reaches NIXL.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from elastic_nixl.compat import SUPPORTED_VLLM, installed_vllm


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def info(self, key: str, value: object) -> None:
        self.lines.append(f"  {key:<28} {value}")

    def check(self, ok: bool, key: str, detail: str) -> None:
        mark = "ok  " if ok else "FAIL"
        self.lines.append(f"  [{mark}] {key:<21} {detail}")
        if not ok:
            self.failures.append(f"{key}: {detail}")

    def section(self, title: str) -> None:
        self.lines.append(f"\n{title}")


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions_section(rep: Report) -> None:
    rep.section("Versions")
    rep.info("python", platform.python_version())
    rep.info("elastic-nixl", _pkg("elastic-nixl"))
    vllm = installed_vllm()
    rep.info("vllm", vllm.version if vllm else "not installed")
    rep.info("vllm build", vllm.distribution if vllm else "none")
    rep.info("nixl", _pkg("nixl"))
    rep.info("cuda-bindings", _pkg("cuda-bindings"))
    try:
        import torch

        rep.info("torch", torch.__version__)
        rep.info("torch CUDA", torch.version.cuda or "none (CPU build)")
        rep.info(
            "CUDA devices",
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )
    except ImportError:
        rep.check(False, "torch", "not importable")
    lo, hi = SUPPORTED_VLLM
    rep.check(
        vllm is not None and vllm.supported,
        "vLLM supported",
        f"{vllm or 'none'} (supported: >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]})",
    )


def nixl_section(rep: Report) -> Any:
    rep.section("NIXL")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        rep.check(False, "nixl import", str(e))
        return None
    agent = nixl_agent("elastic-nixl-doctor-a", nixl_agent_config(backends=["UCX"]))
    plugins = agent.get_plugin_list()
    rep.info("backends available", ", ".join(sorted(plugins)))
    rep.check(
        "UCX" in plugins, "UCX backend", "present" if "UCX" in plugins else "missing"
    )
    return agent


def self_check(rep: Report, agent_a: Any) -> None:
    """Register a host-VMM reservation's mapped extents and read through UCX."""
    from nixl._api import nixl_agent, nixl_agent_config

    from elastic_nixl.allocator import BlockGeometry, VmmKVAllocator
    from elastic_nixl.allocator.host import HostBackend
    from elastic_nixl.connector.planning import (
        DescriptorPlanError,
        ExtentIndex,
        RegionGeometry,
        plan_read,
    )
    from elastic_nixl.connector.registration import ExtentRegistrar

    rep.section("Self-check: host VMM memory through a real NIXL agent")
    page, layers, virtual = 4096, 2, 1_000_000
    geometry = BlockGeometry.layer_outermost(page, layers, virtual)
    alloc = VmmKVAllocator(HostBackend(), geometry, virtual, 1 << 16, name="doctor")
    try:
        alloc.grow_to(256)
        alloc.map_blocks(range(500_000, 500_016))  # a hole between the two
        extents = alloc.mapped_extents()
        # What the connector's worker does at register_kv_caches.
        plan = ExtentRegistrar(agent_a).sync(alloc)
        registered = sum(n for _, n in plan.register)
        rep.info("reservation", f"{alloc.reservation.nbytes / 2**30:.1f} GiB virtual")
        rep.info(
            "mapped", f"{alloc.mapped_bytes / 2**20:.2f} MiB in {len(extents)} chunks"
        )
        rep.check(
            registered == alloc.mapped_bytes,
            "registered",
            f"{len(plan.register)} extents, {registered / 2**20:.2f} MiB "
            "(exactly the mapped memory)",
        )
        for e in extents[:3]:
            rep.info("  extent", f"{e.base:#x} +{e.nbytes}")
        if len(extents) > 3:
            rep.info("  ...", f"{len(extents) - 3} more")

        # Fill two blocks of every layer, read them into agent B.
        tensor = alloc.tensor()
        block_ids = [7, 500_003]
        starts, _ = geometry.byte_ranges(block_ids)
        base = alloc.reservation.base
        for row in starts:
            for s in row:
                off = int(s)
                tensor[off : off + page] = (off // page) % 127
        dst = np.zeros(page * layers * len(block_ids), dtype=np.int8)
        agent_b = nixl_agent(
            "elastic-nixl-doctor-b", nixl_agent_config(backends=["UCX"])
        )
        agent_b.register_memory(
            agent_b.get_reg_descs([(dst.ctypes.data, dst.nbytes, 0, "")], "DRAM")
        )
        name = agent_b.add_remote_agent(agent_a.get_agent_metadata())
        local = [
            RegionGeometry(dst.ctypes.data + i * page, page, page * layers)
            for i in range(layers)
        ]
        remote = [
            RegionGeometry(base + int(o), page, geometry.block_stride)
            for o in geometry.piece_offsets()
        ]
        local_idx = ExtentIndex.build([(dst.ctypes.data, dst.nbytes)])
        remote_idx = ExtentIndex.build([(e.base, e.nbytes) for e in extents])
        rp = plan_read(
            local,
            remote,
            [[0, 1]] * layers,
            [block_ids] * layers,
            local_idx,
            remote_idx,
        )
        handle = agent_b.initialize_xfer(
            "READ",
            agent_b.get_xfer_descs(rp.local, "DRAM"),
            agent_b.get_xfer_descs(rp.remote, "DRAM"),
            name,
            b"doctor",
        )
        state = agent_b.transfer(handle)
        while state == "PROC":
            state = agent_b.check_xfer_state(handle)
        agent_b.release_xfer_handle(handle)
        expect = np.concatenate(
            [
                np.full(page, (int(starts[b][layer]) // page) % 127, dtype=np.int8)
                for b in range(len(block_ids))
                for layer in range(layers)
            ]
        )
        # Local block j of layer i sits at dst + (j * layers + i) * page.
        same = state == "DONE" and bool((dst == expect).all())
        rep.check(
            same,
            "UCX READ",
            f"{rp.nbytes} bytes of blocks {block_ids} ({rp.num_descs} descriptors): "
            + ("bytes match" if same else f"state {state}, bytes differ"),
        )
        try:
            plan_read(
                local,
                remote,
                [[0]] * layers,
                [[300_000]] * layers,
                local_idx,
                remote_idx,
            )
            rep.check(
                False, "unmapped block", "a read of unmapped block 300000 was planned"
            )
        except DescriptorPlanError as e:
            rep.check(True, "unmapped block", f"refused before NIXL: {e}")
    finally:
        alloc.close()


def gpu_section(rep: Report, probes: bool = True) -> None:
    """Which path GPU KV memory would take, from the memory itself, and a live
    two-process probe of what UCX really does for READ and for WRITE."""
    import torch

    rep.section("GPU memory and the transfer path")
    if not torch.cuda.is_available():
        rep.info("GPU", "none: nothing to check")
        return
    from elastic_nixl.allocator import BlockGeometry, CudaBackend, VmmKVAllocator
    from elastic_nixl.capabilities import MemoryKind
    from elastic_nixl.config import TransferPath
    from elastic_nixl.connector.planning import choose_transfer_path
    from elastic_nixl.memory.cuda import (
        active_nvlinks,
        describe_cuda_pointer,
        export_kinds_of,
    )

    n = torch.cuda.device_count()
    links = active_nvlinks(0)
    rep.info("GPUs", f"{n} x {torch.cuda.get_device_name(0)}")
    rep.info("active NVLinks (GPU 0)", "unknown" if links is None else links)
    read_fast = None if links is None else links > 0
    plain = torch.empty(1 << 21, dtype=torch.uint8, device="cuda")
    backend = CudaBackend(torch.cuda.current_device())
    geometry = BlockGeometry.layer_outermost(1 << 16, 1, 64)
    with VmmKVAllocator(backend, geometry, 64, backend.granularity) as alloc:
        alloc.grow_to(1)
        for label, ptr in (
            ("cudaMalloc", plain.data_ptr()),
            ("VMM", alloc.reservation.base),
        ):
            info = describe_cuda_pointer(ptr)
            kinds = export_kinds_of(info)
            choice = choose_transfer_path(
                info.memory_kind or MemoryKind.CUDA, kinds, TransferPath.AUTO, read_fast
            )
            rep.info(
                f"{label} memory",
                f"legacy IPC {info.legacy_ipc_capable}, exports "
                f"{sorted(k.value for k in kinds)} -> {choice.path.value}",
            )
            rep.info("", f"  {choice.reason}")
    if not probes:
        return
    from elastic_nixl.tools.probe import probe

    rep.section("Live probe: two processes, 256 MiB in 2 MiB descriptors")
    pairs = [("cudaMalloc", (0, 0)), ("vmm", (0, 0))]
    if n > 1:
        pairs += [("cudaMalloc", (0, 1)), ("vmm", (0, 1))]
    for memory, devs in pairs:
        where = "same GPU" if devs[0] == devs[1] else f"GPU {devs[0]} -> {devs[1]}"
        try:
            r = probe(memory, devs)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            rep.check(False, f"{memory}, {where}", f"{type(e).__name__}: {e}")
            continue
        rep.info(f"{memory}, {where}", r.verdict())
        for op in (r.read, r.write):
            for line in op.protocols[:3]:
                rep.info(f"  UCX {op.op}", line)


def main_doctor(argv: list[str] | None = None) -> int:
    rep = Report()
    rep.lines.append("elastic-nixl doctor")
    versions_section(rep)
    try:
        agent = nixl_section(rep)
        if agent is not None:
            self_check(rep, agent)
        gpu_section(rep, probes="--no-probe" not in (argv or []))
    except Exception as e:  # noqa: BLE001 - every failure is a reported check
        rep.check(False, "self-check", f"{type(e).__name__}: {e}")
    print("\n".join(rep.lines))
    if rep.failures:
        print(f"\n{len(rep.failures)} check(s) failed:", file=sys.stderr)
        for f in rep.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0
