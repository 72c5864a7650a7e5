"""A seeded stream of requests with growth and shrink on both sides.

The stress workload of ``elastic-nixl stress``: many requests between a
producer and a consumer engine of the two-process harness while both map
and unmap memory; every block is verified and every counter reported.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from elastic_nixl.tools.harness.child import ChildDied, ChildError, describe_exitcode
from elastic_nixl.tools.harness.coordinator import Coordinator, EngineRef


@dataclass
class Workload:
    """A seeded stream of requests with grow/shrink interleaved."""

    requests: int = 300
    blocks: tuple[int, int] = (1, 8)
    seed: int = 0
    window: int = 8  # requests in flight at once
    p_grow: float = 0.02  # per issued request, per side
    p_shrink: float = 0.02
    grow_blocks: int = 256
    # Producer shrinks may name blocks of requests still being read: the
    # connector's leases must keep them mapped until the read is done.
    shrink_live: bool = True
    timeout_s: float = 300.0
    # After the last verification, how long to wait for the producer's
    # finished_sending of every request (its blocks and leases are freed then).
    send_grace_s: float = 10.0


@dataclass
class RunStats:
    """Per-run counters (deltas over the run unless named otherwise)."""

    requests: int = 0
    ok: int = 0
    failed: int = 0
    blocks: int = 0
    blocks_verified: int = 0
    corrupted_blocks: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    throughput_mb_s: float = 0.0
    p_registrations: int = 0
    p_deregistrations: int = 0
    d_registrations: int = 0
    d_deregistrations: int = 0
    p_epoch: int = 0
    d_epoch: int = 0
    refreshes: int = 0
    refused_reads: int = 0
    p_grows: int = 0
    p_demand_grows: int = 0
    p_shrinks: int = 0
    d_grows: int = 0
    d_demand_grows: int = 0
    d_shrinks: int = 0
    deferred_by_lease: int = 0
    sends_confirmed: int = 0
    sends_unconfirmed: int = 0
    p_physical: int = 0
    d_physical: int = 0
    p_max_block_id: int = 0
    d_max_block_id: int = 0
    p_blocks_beyond_physical: int = 0
    d_blocks_beyond_physical: int = 0
    p_mapped_chunks: tuple[int, int] = (0, 0)  # min, max seen
    d_mapped_chunks: tuple[int, int] = (0, 0)
    unmapped_reads: int = 0  # children killed by SIGSEGV
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.failed == 0
            and self.corrupted_blocks == 0
            and self.unmapped_reads == 0
            and self.sends_unconfirmed == 0
            and not self.errors
            and self.ok == self.requests > 0
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("requests (ok / failed)", f"{self.requests} ({self.ok} / {self.failed})"),
            (
                "blocks transferred / verified",
                f"{self.blocks} / {self.blocks_verified}",
            ),
            ("corrupted blocks", str(self.corrupted_blocks)),
            ("reads of unmapped memory (SIGSEGV)", str(self.unmapped_reads)),
            ("bytes transferred", f"{self.bytes / 1e6:.2f} MB"),
            ("throughput", f"{self.throughput_mb_s:.2f} MB/s"),
            (
                "latency p50 / p99",
                f"{self.latency_p50_ms:.1f} / {self.latency_p99_ms:.1f} ms",
            ),
            ("wall time (transfers)", f"{self.wall_s:.2f} s"),
            (
                "prefill grows (on demand) / shrinks",
                f"{self.p_grows} ({self.p_demand_grows}) / {self.p_shrinks}",
            ),
            (
                "decode grows (on demand) / shrinks",
                f"{self.d_grows} ({self.d_demand_grows}) / {self.d_shrinks}",
            ),
            (
                "prefill NIXL registrations / deregistrations",
                f"{self.p_registrations} / {self.p_deregistrations}",
            ),
            (
                "decode NIXL registrations / deregistrations",
                f"{self.d_registrations} / {self.d_deregistrations}",
            ),
            ("prefill / decode mapping epoch", f"{self.p_epoch} / {self.d_epoch}"),
            ("consumer metadata refreshes", str(self.refreshes)),
            ("unmaps deferred by leases (blocks)", str(self.deferred_by_lease)),
            (
                "finished_sending confirmed / missing",
                f"{self.sends_confirmed} / {self.sends_unconfirmed}",
            ),
            ("reads refused by the connector", str(self.refused_reads)),
            (
                "max block id P / D (physical budget)",
                f"{self.p_max_block_id} / {self.d_max_block_id} "
                f"({self.p_physical} / {self.d_physical})",
            ),
            (
                "blocks at ids >= physical budget P / D",
                f"{self.p_blocks_beyond_physical} / {self.d_blocks_beyond_physical}",
            ),
            (
                "mapped chunks min-max P / D",
                f"{self.p_mapped_chunks[0]}-{self.p_mapped_chunks[1]} / "
                f"{self.d_mapped_chunks[0]}-{self.d_mapped_chunks[1]}",
            ),
        ]

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 28}"]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        if self.errors:
            lines += [f"errors ({len(self.errors)}):"] + [
                f"  {e}" for e in self.errors[:20]
            ]
        lines.append("RESULT: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def _percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class _GrowthPlan:
    """Where one engine grows next: regions beyond its physical budget, in a
    seeded random order so the mapped memory has holes."""

    def __init__(self, ref: EngineRef, rng: random.Random, grow_blocks: int) -> None:
        self.ref = ref
        self.physical = int(ref.info["physical_blocks"])
        self.virtual = int(ref.info["virtual_blocks"])
        self.elastic = bool(ref.info["elastic"])
        # Regions of grow_blocks beyond the physical budget, used in a random
        # order so the mapped memory has holes.
        self.slots = list(range(max(0, (self.virtual - self.physical) // grow_blocks)))
        rng.shuffle(self.slots)
        self.grow_blocks = grow_blocks
        self.chunks = (10**9, 0)

    def next_region(self) -> int | None:
        return (
            self.physical + self.slots.pop() * self.grow_blocks if self.slots else None
        )

    def seen(self, chunks: int) -> None:
        self.chunks = (min(self.chunks[0], chunks), max(self.chunks[1], chunks))


class WorkloadRun:
    """One seeded run of :class:`Workload` between a producer and a consumer.

    Sends ``wl.requests`` requests from ``p`` to ``d``, up to ``wl.window`` in
    flight, growing and shrinking both sides at seeded random points (and at
    least once each); every block is verified on the consumer. The producer
    grows on demand when its pool is short. Errors end the run and are
    recorded in ``RunStats.errors``; :meth:`run` never raises for them.

    A request moves: prefill sent (``at_p``) -> submit sent (``at_d``) -> in
    flight -> verdict. Commands are pipelined; each child answers in order,
    so a shrink sent after a prefill sees that prefill's blocks in use.
    """

    # Forced points so every run grows and shrinks each elastic side.
    FORCED = (
        (0.15, "p", "grow"),
        (0.25, "d", "grow"),
        (0.35, "p", "grow"),
        (0.45, "d", "grow"),
        (0.55, "p", "shrink"),
        (0.65, "d", "shrink"),
    )

    def __init__(
        self,
        coord: Coordinator,
        p: EngineRef,
        d: EngineRef,
        wl: Workload,
        progress: Callable[[int, int, RunStats], None] | None = None,
        prefix: str = "req",
    ) -> None:
        self.coord, self.p, self.d, self.wl = coord, p, d, wl
        self.progress = progress
        self.prefix = prefix
        self.rng = random.Random(wl.seed)
        self.st = RunStats(
            p_physical=int(p.info["physical_blocks"]),
            d_physical=int(d.info["physical_blocks"]),
        )
        self.sides = {
            "p": _GrowthPlan(p, random.Random(self.rng.random()), wl.grow_blocks),
            "d": _GrowthPlan(d, random.Random(self.rng.random()), wl.grow_blocks),
        }
        self.forced: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
        for frac, side, what in self.FORCED:
            self.forced[int(frac * wl.requests)].append((side, what))
        self.inflight: dict[str, dict[str, Any]] = {}
        self.awaiting_sent: set[str] = set()
        self.sent_early: set[str] = set()  # finished_sending before the verdict
        self.latencies: list[float] = []
        self.issued = 0
        self.at_p: dict[int, tuple[str, int]] = {}
        self.at_d: dict[int, tuple[str, int, dict[str, Any]]] = {}
        # Requests a pool had no room for, retried when something was freed.
        self.p_short: collections.deque[tuple[str, int]] = collections.deque()
        self.d_short: collections.deque[tuple[str, int, dict[str, Any]]] = (
            collections.deque()
        )
        self.issued_at: dict[str, float] = {}
        self.mine: set[str] = set()  # every request this run issued
        self.last_retry = {"p": -1, "d": -1}

    # -- growth -----------------------------------------------------------

    def mutate(self, side: str, what: str, demand: bool = False) -> bool:
        """Grow or shrink one elastic side; False when there is nothing to do."""
        s, st = self.sides[side], self.st
        if not s.elastic:
            return False
        if what == "grow":
            start = s.next_region()
            if start is None:
                return False
            r = self.coord.op(s.ref, "grow", n=self.wl.grow_blocks, start=start)
            if side == "p":
                st.p_grows += 1
                st.p_demand_grows += demand
            else:
                st.d_grows += 1
                st.d_demand_grows += demand
        else:
            r = self.coord.op(
                s.ref,
                "shrink",
                include_live=(side == "p" and self.wl.shrink_live),
                region=True,
                n=self.wl.grow_blocks,
            )
            st.deferred_by_lease += r["live_still_mapped"]
            if side == "p":
                st.p_shrinks += 1
            else:
                st.d_shrinks += 1
        s.seen(r["chunks_after"])
        return True

    # -- requests ---------------------------------------------------------

    def send_prefill(self, req: str, nb: int) -> None:
        p = self.p
        self.at_p[p.child.send("prefill", engine=p.name, req=req, n=nb)] = (req, nb)

    def send_submit(self, req: str, nb: int, pre: dict[str, Any]) -> None:
        d = self.d
        cid = d.child.send("submit", engine=d.name, req=req, params=pre["params"], n=nb)
        self.at_d[cid] = (req, nb, pre)

    def collect_replies(self) -> None:
        p, d, coord = self.p, self.d, self.coord
        for cid in [c for c in self.at_p if c in p.child.replies]:
            req, nb = self.at_p.pop(cid)
            pre = coord.take_reply(p.child, cid, "prefill")
            if pre is None:
                self.p_short.append((req, nb))
            else:
                self.send_submit(req, nb, pre)
        for cid in [c for c in self.at_d if c in d.child.replies]:
            req, nb, pre = self.at_d.pop(cid)
            if coord.take_reply(d.child, cid, "submit") is None:
                self.d_short.append((req, nb, pre))
            else:
                self.inflight[req] = {
                    "t": self.issued_at.pop(req),
                    "p_ids": pre["block_ids"],
                }

    def retry_short(self) -> None:
        """Resend what a pool refused once a request finished (which frees
        blocks); grow the pool on demand when nothing else can free it."""
        st, last = self.st, self.last_retry
        done = st.requests + st.sends_confirmed
        if self.p_short and not self.at_p:
            idle = not (self.at_d or self.inflight or self.d_short)
            if done != last["p"] or idle:
                if done == last["p"] and not self.mutate("p", "grow", demand=True):
                    raise RuntimeError(f"{self.p.name}: pool cannot hold a request")
                last["p"] = done
                while self.p_short:
                    self.send_prefill(*self.p_short.popleft())
        if self.d_short and not self.at_d:
            idle = not (self.inflight or self.at_p)
            if done != last["d"] or idle:
                if done == last["d"] and not self.mutate("d", "grow", demand=True):
                    raise RuntimeError(f"{self.d.name}: pool cannot hold a request")
                last["d"] = done
                while self.d_short:
                    self.send_submit(*self.d_short.popleft())

    def complete(self, res: dict[str, Any]) -> None:
        """Count one verdict from the consumer."""
        st = self.st
        req = res["req"]
        info = self.inflight.pop(req)
        st.requests += 1
        st.blocks += res["blocks"]
        self.latencies.append(time.monotonic() - info["t"])
        if res["ok"]:
            st.ok += 1
            st.blocks_verified += res["blocks"]
            st.bytes += res["bytes"]
            if req in self.sent_early:
                self.sent_early.discard(req)
            else:
                self.awaiting_sent.add(req)
        elif res["failed_ids"]:
            st.failed += 1
            st.errors.append(f"{req}: failed, local blocks {res['failed_ids']}")
        else:
            st.corrupted_blocks += len(res["bad_positions"])
            st.errors.append(f"{req}: corrupted positions {res['bad_positions']}")
        for pid in info["p_ids"]:
            st.p_max_block_id = max(st.p_max_block_id, pid)
            st.p_blocks_beyond_physical += pid >= st.p_physical
        for did in res["block_ids"]:
            st.d_max_block_id = max(st.d_max_block_id, did)
            st.d_blocks_beyond_physical += did >= st.d_physical
        if self.progress is not None:
            self.progress(st.requests, self.wl.requests, st)

    def drain(self) -> None:
        coord = self.coord
        for req in [r for r in coord.recv_done if r in self.inflight]:
            self.complete(coord.recv_done.pop(req))
        for req in [r for r in coord.sent_done if r in self.mine]:
            coord.sent_done.pop(req)
            self.st.sends_confirmed += 1
            if req in self.awaiting_sent:
                self.awaiting_sent.discard(req)
            else:
                self.sent_early.add(req)

    def issue(self) -> None:
        """Issue requests up to the window (with the growth due before each)."""
        wl = self.wl
        active = (
            len(self.at_p)
            + len(self.at_d)
            + len(self.inflight)
            + len(self.p_short)
            + len(self.d_short)
        )
        while (
            self.issued < wl.requests
            and active < wl.window
            and not (self.p_short or self.d_short)
        ):
            for side, what in self.forced.pop(self.issued, []):
                self.mutate(side, what)
            for side in ("p", "d"):
                if self.rng.random() < wl.p_grow:
                    self.mutate(side, "grow")
                if self.rng.random() < wl.p_shrink:
                    self.mutate(side, "shrink")
            req = f"{self.prefix}-{wl.seed}-{self.issued}"
            self.issued_at[req] = time.monotonic()
            self.mine.add(req)
            self.send_prefill(req, self.rng.randint(*wl.blocks))
            self.issued += 1
            active += 1

    # -- the run ----------------------------------------------------------

    def run(self) -> RunStats:
        coord, wl, st = self.coord, self.wl, self.st
        before: dict[str, dict[str, Any]] = {}
        errors_before = len(coord.engine_errors)
        t0 = time.monotonic()
        deadline = t0 + wl.timeout_s
        try:
            before = {k: coord.stats(s.ref) for k, s in self.sides.items()}
            for k, s in self.sides.items():
                if "mapped_chunks" in before[k]:
                    s.seen(before[k]["mapped_chunks"])
            t0 = time.monotonic()
            while st.requests < wl.requests:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"workload did not finish in {wl.timeout_s:.0f}s "
                        f"({st.requests}/{wl.requests} done, "
                        f"{len(self.inflight)} in flight)"
                    )
                self.issue()
                for child in (self.p.child, self.d.child):
                    if child.dead:
                        raise ChildDied(child.name, child.proc.exitcode)
                coord.pump(0.05)
                self.collect_replies()
                self.drain()
                self.retry_short()
            st.wall_s = time.monotonic() - t0
            grace = time.monotonic() + wl.send_grace_s
            while self.awaiting_sent and time.monotonic() < grace:
                coord.pump(0.1)
                self.drain()
        except (ChildDied, ChildError, TimeoutError, RuntimeError) as e:
            st.errors.append(f"{type(e).__name__}: {e}")
        st.wall_s = st.wall_s or time.monotonic() - t0
        st.sends_unconfirmed = len(self.awaiting_sent)
        for err in coord.engine_errors[errors_before:]:
            st.errors.append(f"engine {err['engine']} step raised {err['error']}")
        st.throughput_mb_s = st.bytes / 1e6 / st.wall_s if st.wall_s > 0 else 0.0
        st.latency_p50_ms = _percentile(self.latencies, 0.5) * 1e3
        st.latency_p99_ms = _percentile(self.latencies, 0.99) * 1e3
        _collect(coord, self.sides, before, st)
        return st


def run_workload(
    coord: Coordinator,
    p: EngineRef,
    d: EngineRef,
    wl: Workload,
    progress: Callable[[int, int, RunStats], None] | None = None,
    prefix: str = "req",
) -> RunStats:
    """Run ``wl`` from ``p`` to ``d`` (see :class:`WorkloadRun`)."""
    return WorkloadRun(coord, p, d, wl, progress, prefix).run()


def _collect(
    coord: Coordinator,
    sides: dict[str, _GrowthPlan],
    before: dict[str, dict[str, Any]],
    st: RunStats,
) -> None:
    """Fill the per-engine counters of ``st`` (deltas against ``before``)."""
    for k, s in sides.items():
        child = s.ref.child
        if child.dead or not child.proc.is_alive():
            child.proc.join(5)
            if child.proc.exitcode == -signal.SIGSEGV:
                st.unmapped_reads += 1
            st.errors.append(f"{child.name}: {describe_exitcode(child.proc.exitcode)}")
            continue
        if k not in before:
            continue
        try:
            after = coord.stats(s.ref)
        except (ChildDied, ChildError, TimeoutError) as e:
            st.errors.append(f"stats of {s.ref.name}: {e}")
            continue
        b = before[k]
        regs = after.get("registrations", 0) - b.get("registrations", 0)
        deregs = after.get("deregistrations", 0) - b.get("deregistrations", 0)
        if "mapped_chunks" in after:
            s.seen(after["mapped_chunks"])
        chunks = s.chunks if s.elastic else (0, 0)
        if k == "p":
            st.p_registrations, st.p_deregistrations = regs, deregs
            st.p_epoch, st.p_mapped_chunks = after.get("epoch", 0), chunks
        else:
            st.d_registrations, st.d_deregistrations = regs, deregs
            st.d_epoch, st.d_mapped_chunks = after.get("epoch", 0), chunks
            st.refreshes = after.get("refreshes", 0) - b.get("refreshes", 0)
            st.refused_reads = after.get("refused_reads", 0) - b.get("refused_reads", 0)


def segv_count(coord: Coordinator) -> int:
    """Children that died of SIGSEGV (a read or write of unmapped memory)."""
    return sum(1 for c in coord.children.values() if c.proc.exitcode == -signal.SIGSEGV)
