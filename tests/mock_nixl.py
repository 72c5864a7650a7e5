"""In-process mock of ``nixl._api.nixl_agent`` (vLLM's ``NixlWrapper``) for unit tests.

Agents living in one :class:`MockNixlFabric` exchange metadata bytes and move REAL
bytes between each other's registered host ("DRAM") memory with ``ctypes.memmove``.
Semantics mirror nixl 1.5.1 (UCX) where it matters, measured on the real library:

* a descriptor must lie fully inside ONE region registered with the same mem type and
  device id (local side: by this agent; remote side: as known from the metadata last
  loaded), else ``nixlNotFoundError``; list sizes / pair lengths / indices that do
  not match raise ``nixlInvalidParamError``; unknown remote agent -> not found;
* ``add_remote_agent`` returns the name as bytes; loading newer metadata of a known
  agent ADDS its regions (like NIXL; a stale region overlapping a new one is dropped);
  ``remove_remote_agent`` forgets the agent and invalidates dlists / transfer
  handles created before (``make_prepped_xfer`` / ``transfer`` -> not found);
* notifications are keyed by the sender's name (str) and carry bytes.

Deliberately STRICTER than NIXL (to catch bugs): registering a range that overlaps one
this agent already registered raises ``nixlInvalidParamError``; releasing a handle
twice, or using a released one, raises ``nixlInvalidParamError``; a transfer touching
a region its owner has deregistered since (use after deregister) ends in "ERR" and
moves nothing (NIXL would still move the bytes). "VRAM" regions are bookkeeping only:
posting a transfer over them raises ``NotImplementedError``.

Test hooks: ``agent.hold_transfers`` (posted transfers stay "PROC" until
``complete_held()`` / ``fail_held()``), ``agent.fail_next_transfer(count, exc)``,
``agent.cancel_fails`` (releasing an in-flight handle raises), ``agent.stats()``.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import importlib
import itertools
import json
import sys
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INIT_AGENT = "NIXL_INIT_AGENT"
_MEM = {m: m for m in ("DRAM", "VRAM", "FILE", "BLOCK", "OBJ")}
_MEM |= {"cpu": "DRAM", "cuda": "VRAM"}  # deprecated aliases, as in NIXL
_MD_TAG = "mock-nixl-md/1"
_ERROR_NAMES = [
    f"nixl{n}Error"
    for n in ("NotFound", "InvalidParam", "NotPosted", "NoTelemetry", "Mismatch")
    + ("RepostActive", "Backend", "RemoteDisconnect")
]


def _load_errors() -> tuple[dict[str, type[Exception]], bool]:
    try:
        _bindings = importlib.import_module("nixl._bindings")
        return {n: getattr(_bindings, n) for n in _ERROR_NAMES}, True
    except Exception:  # nixl missing / broken: same-named stand-ins
        return {n: type(n, (RuntimeError,), {}) for n in _ERROR_NAMES}, False


_ERR, REAL_NIXL_ERRORS = _load_errors()
nixlNotFoundError: type[Exception] = _ERR["nixlNotFoundError"]
nixlInvalidParamError: type[Exception] = _ERR["nixlInvalidParamError"]
nixlNotPostedError: type[Exception] = _ERR["nixlNotPostedError"]
nixlNoTelemetryError: type[Exception] = _ERR["nixlNoTelemetryError"]
nixlMismatchError: type[Exception] = _ERR["nixlMismatchError"]
nixlRepostActiveError: type[Exception] = _ERR["nixlRepostActiveError"]
nixlBackendError: type[Exception] = _ERR["nixlBackendError"]
nixlRemoteDisconnectError: type[Exception] = _ERR["nixlRemoteDisconnectError"]


def _not_found(msg: str) -> Exception:
    return nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: {msg}")


def _invalid(msg: str) -> Exception:
    return nixlInvalidParamError(f"NIXL_ERR_INVALID_PARAM: {msg}")


Key = tuple[str, int, int, int]  # registered region: (mem_type, dev_id, addr, len)
Entry = tuple[int, int, int, Key]  # resolved descriptor: (addr, len, dev_id, region)
_ids = itertools.count(0x1000)


class _RegionIndex:
    """Non-overlapping regions per (mem_type, dev_id), sorted for bisect lookups."""

    def __init__(self) -> None:
        self._by: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)

    def overlapping(self, k: Key) -> list[Key]:
        mem, dev, s, n = k
        lst, out = self._by[(mem, dev)], []
        i = bisect.bisect_left(lst, (s, s))
        if i > 0 and lst[i - 1][1] > s:
            out.append(lst[i - 1])
        while i < len(lst) and lst[i][0] < s + n:
            out.append(lst[i])
            i += 1
        return [(mem, dev, a, e - a) for a, e in out]

    def add(self, k: Key) -> None:
        bisect.insort(self._by[(k[0], k[1])], (k[2], k[2] + k[3]))

    def remove(self, k: Key) -> None:
        self._by[(k[0], k[1])].remove((k[2], k[2] + k[3]))

    def find(self, mem: str, addr: int, length: int, dev: int) -> Key | None:
        lst = self._by.get((mem, dev), [])
        i = bisect.bisect_right(lst, (addr, sys.maxsize)) - 1
        if i >= 0 and lst[i][0] <= addr and addr + length <= lst[i][1]:
            return (mem, dev, lst[i][0], lst[i][1] - lst[i][0])
        return None

    def __contains__(self, k: Key) -> bool:
        return self.find(k[0], k[2], k[3], k[1]) == k

    def keys(self) -> list[Key]:
        return [(m, d, a, e - a) for (m, d), lst in self._by.items() for a, e in lst]


class MockDescList:
    """Stand-in for nixlXferDList (reg=False) / nixlRegDList (reg=True)."""

    def __init__(self, mem_type: str, descs: Iterable[Sequence[Any]], *, reg: bool):
        self.mem_type = _MEM[mem_type]
        self.reg = reg
        self.descs = [(int(d[0]), int(d[1]), int(d[2])) for d in descs]

    def descCount(self) -> int:  # noqa: N802 (NIXL naming)
        return len(self.descs)

    def getType(self) -> str:  # noqa: N802
        return self.mem_type

    def isEmpty(self) -> bool:  # noqa: N802
        return not self.descs

    def __len__(self) -> int:
        return len(self.descs)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self.descs)

    def __repr__(self) -> str:
        kind = "Reg" if self.reg else "Xfer"
        return f"MockDescList({kind}, {self.mem_type}, n={len(self.descs)})"


@dataclass
class MockXferTelemetry:
    """Fields of nixlXferTelemetry (times in microseconds)."""

    startTime: int = 0  # noqa: N815
    postDuration: int = 0  # noqa: N815
    xferDuration: int = 0  # noqa: N815
    totalBytes: int = 0  # noqa: N815
    descCount: int = 0  # noqa: N815


@dataclass(frozen=True)
class MockNixlStats:
    register_calls: int
    deregister_calls: int
    registered_regions: int
    registered_bytes: int
    prepped_dlists: int
    prepped_descs: int  # summed over live (unreleased) dlist handles
    live_xfer_handles: int
    transfers_posted: int
    transfers_done: int
    transfers_failed: int
    bytes_moved: int
    notifs_sent: int


class MockDlistHandle:
    """Stand-in for nixl_prepped_dlist_handle."""

    def __init__(
        self, agent: MockNixlAgent, target: str, entries: list[Entry], gen: int
    ):
        self._agent, self._handle, self._released = agent, next(_ids), False
        self.target, self.entries, self.gen = target, entries, gen

    def release(self) -> None:
        self._agent.release_dlist_handle(self)

    def __repr__(self) -> str:
        return f"MockDlistHandle(0x{self._handle:x}, {self.target!r})"


class MockXferHandle:
    """Stand-in for nixl_xfer_handle. state: INIT (never posted), PROC, DONE, ERR."""

    def __init__(
        self,
        agent: MockNixlAgent,
        op: str,
        remote: str,
        pairs: list[tuple[Entry, Entry]],
        notif: bytes,
        gen: int,
    ):
        self._agent, self._handle, self._released = agent, next(_ids), False
        self.op, self.remote, self.pairs, self.notif, self.gen = (
            op,
            remote,
            pairs,
            notif,
            gen,
        )
        self.state = "INIT"
        self.telemetry: MockXferTelemetry | None = None
        self._t_post = 0.0

    def release(self) -> None:
        self._agent.release_xfer_handle(self)

    def __repr__(self) -> str:
        return f"MockXferHandle(0x{self._handle:x}, {self.op}, {self.state})"


class MockNixlFabric:
    """In-process registry of mock agents by name (weakly held)."""

    def __init__(self) -> None:
        self.uid = f"fabric-{next(_ids):x}"
        self.lock = threading.RLock()
        self._agents: weakref.WeakValueDictionary[str, MockNixlAgent] = (
            weakref.WeakValueDictionary()
        )

    def get(self, name: str) -> MockNixlAgent | None:
        return self._agents.get(name)

    def _add(self, agent: MockNixlAgent) -> None:
        with self.lock:
            if agent.name in self._agents:
                raise ValueError(
                    f"mock NIXL agent {agent.name!r} already in this fabric"
                )
            self._agents[agent.name] = agent

    def _drop(self, agent: MockNixlAgent) -> None:
        with self.lock:
            if self._agents.get(agent.name) is agent:
                del self._agents[agent.name]

    def agent_factory(self) -> Callable[..., MockNixlAgent]:
        """Drop-in for ``nixl_agent`` / vLLM's ``NixlWrapper`` bound to this fabric."""
        return functools.partial(MockNixlAgent, fabric=self)


DEFAULT_FABRIC = MockNixlFabric()


def _name(n: str | bytes) -> str:
    return n.decode() if isinstance(n, bytes) else str(n)


def _bytes(m: str | bytes) -> bytes:
    return m.encode() if isinstance(m, str) else bytes(m)


def _build(descs: Any, mem_type: str | None, *, reg: bool) -> MockDescList | None:
    """Mirror of nixl_agent.get_xfer_descs / get_reg_descs input dispatch."""
    if isinstance(descs, MockDescList):
        return descs if descs.reg == reg else None
    torch = sys.modules.get("torch")

    def is_tensor(o: object) -> bool:
        return torch is not None and isinstance(o, torch.Tensor)

    if is_tensor(descs):
        descs = [descs]
    elif isinstance(descs[0], tuple):  # IndexError on [] like NIXL
        ok = mem_type is not None and len(descs[0]) == (4 if reg else 3)
        return MockDescList(mem_type, descs, reg=reg) if ok and mem_type else None
    elif isinstance(descs, np.ndarray):
        if mem_type is None or descs.ndim != 2 or descs.shape[1] != 3:
            return None
        return MockDescList(mem_type, descs.astype(np.uint64).tolist(), reg=reg)
    if not is_tensor(descs[0]):
        return None
    if any(t.device != descs[0].device or not t.is_contiguous() for t in descs):
        return None
    mem = "DRAM" if descs[0].get_device() == -1 else "VRAM"
    rows = [
        (t.data_ptr(), t.numel() * t.element_size(), max(t.get_device(), 0))
        for t in descs
    ]
    return MockDescList(mem, rows, reg=reg)


class MockNixlAgent:
    """Mock of ``nixl._api.nixl_agent``; see module docstring."""

    def __init__(
        self,
        agent_name: str,
        nixl_conf: Any = None,
        instantiate_all: bool = False,
        *,
        fabric: MockNixlFabric | None = None,
    ) -> None:
        self.name = _name(agent_name)
        self.fabric = fabric if fabric is not None else DEFAULT_FABRIC
        self.nixl_conf = nixl_conf
        names = list(getattr(nixl_conf, "backends", None) or ["UCX"])
        self.backends: dict[str, int] = {b: i + 1 for i, b in enumerate(names)}
        self.capture_telemetry = bool(getattr(nixl_conf, "capture_telemetry", False))
        self.hold_transfers = False
        self.cancel_fails = False
        self._fail_next: list[BaseException | None] = []
        self._local = _RegionIndex()
        self._remotes: dict[str, _RegionIndex] = {}
        self._gen: dict[str, int] = {}
        self._notifs: dict[str, list[bytes]] = defaultdict(list)
        self._dlists: dict[int, MockDlistHandle] = {}
        self._xfers: dict[int, MockXferHandle] = {}
        self._n: Counter[str] = Counter()
        self._lock = self.fabric.lock
        self.fabric._add(self)

    # ---- misc / backend API -------------------------------------------------
    def close(self) -> None:
        """Leave the fabric (the name becomes free again)."""
        self.fabric._drop(self)

    def get_backend_mem_types(self, backend: str) -> list[str]:
        return ["DRAM_SEG", "VRAM_SEG"] if backend in self.backends else []

    def _check_backends(self, backends: Sequence[str]) -> None:
        for b in backends:
            if b not in self.backends:
                raise KeyError(b)  # like NIXL's self.backends[name]

    # ---- descriptors & registration -----------------------------------------
    def get_xfer_descs(
        self, descs: Any, mem_type: str | None = None
    ) -> MockDescList | None:
        return _build(descs, mem_type, reg=False)

    def get_reg_descs(
        self, descs: Any, mem_type: str | None = None
    ) -> MockDescList | None:
        return _build(descs, mem_type, reg=True)

    def register_memory(
        self, reg_list: Any, mem_type: str | None = None, backends: Sequence[str] = ()
    ) -> MockDescList:
        self._check_backends(backends)
        dl = self.get_reg_descs(reg_list, mem_type)
        if dl is None:
            raise TypeError(
                "registerMem(): incompatible arguments (bad descriptor list)"
            )
        with self._lock:
            batch = _RegionIndex()
            for a, n, d in dl.descs:
                k = (dl.mem_type, d, a, n)
                if n <= 0:
                    raise _invalid(f"mock: empty registration {k}")
                clash = self._local.overlapping(k) + batch.overlapping(k)
                if clash:
                    raise _invalid(
                        f"mock: registration {k} overlaps registered {clash[0]}; "
                        "each extent must be registered exactly once"
                    )
                batch.add(k)
            for k in batch.keys():  # noqa: SIM118
                self._local.add(k)
            self._n["register_calls"] += 1
        return dl

    def deregister_memory(
        self, dereg_list: MockDescList, backends: Sequence[str] = ()
    ) -> None:
        self._check_backends(backends)
        if not isinstance(dereg_list, MockDescList):
            raise TypeError("deregisterMem(): expected a descriptor list")
        keys = [(dereg_list.mem_type, d, a, n) for a, n, d in dereg_list.descs]
        with self._lock:
            bad = [k for k in keys if k not in self._local]
            if bad or len(set(keys)) != len(keys):
                raise _not_found(f"not registered: {bad[:3]}")
            for k in keys:
                self._local.remove(k)
            self._n["deregister_calls"] += 1

    # ---- metadata -------------------------------------------------------------
    def get_agent_metadata(self) -> bytes:
        with self._lock:
            regions = sorted(self._local.keys())
        md = {
            "tag": _MD_TAG,
            "fabric": self.fabric.uid,
            "name": self.name,
            "regions": regions,
        }
        return json.dumps(md).encode()

    def add_remote_agent(self, metadata: bytes) -> bytes:
        try:
            md = json.loads(metadata)
            assert md["tag"] == _MD_TAG
        except Exception as e:
            raise nixlMismatchError("NIXL_ERR_MISMATCH: bad metadata") from e
        if md["fabric"] != self.fabric.uid:
            raise nixlMismatchError("NIXL_ERR_MISMATCH: another mock fabric")
        name = str(md["name"])
        if name == self.name:
            raise _invalid("own metadata")
        with self._lock:
            idx = self._remotes.setdefault(name, _RegionIndex())
            self._gen.setdefault(name, 0)
            for m, d, a, n in md["regions"]:
                k = (m, d, a, n)
                for old in idx.overlapping(k):
                    idx.remove(old)
                idx.add(k)
        return name.encode()

    def remove_remote_agent(self, agent: str | bytes) -> None:
        name = _name(agent)
        with self._lock:
            if self._remotes.pop(name, None) is not None:
                self._gen[name] += 1

    def check_remote_metadata(
        self, agent: str | bytes, descs: MockDescList | None = None
    ) -> bool:
        name = _name(agent)
        if name not in self._remotes:
            return False
        try:
            if descs is not None:
                self._resolve(name, descs)
        except Exception:
            return False
        return True

    # ---- transfer preparation ---------------------------------------------------
    def _resolve(self, target: str, dl: MockDescList) -> list[Entry]:
        idx = (
            self._local
            if target in (INIT_AGENT, self.name)
            else self._remotes.get(target)
        )
        if idx is None:
            raise _not_found(f"metadata for {target!r} not found")
        out: list[Entry] = []
        for i, (a, n, d) in enumerate(dl.descs):
            k = idx.find(dl.mem_type, a, n, d)
            if k is None:
                who = "local agent" if idx is self._local else f"remote {target!r}"
                raise _not_found(
                    f"desc {i} ({a:#x}, len {n}, dev {d}, {dl.mem_type}) "
                    f"is not inside one region registered by {who}"
                )
            out.append((a, n, d, k))
        return out

    def _gen_ok(self, target: str, gen: int) -> bool:
        if target in (INIT_AGENT, self.name):
            return True
        return target in self._remotes and self._gen.get(target) == gen

    def prep_xfer_dlist(
        self,
        agent_name: str | bytes,
        xfer_list: Any,
        mem_type: str | None = None,
        backends: Sequence[str] = (),
    ) -> MockDlistHandle:
        self._check_backends(backends)
        name = _name(agent_name)
        target = INIT_AGENT if name in ("", INIT_AGENT) else name
        if (
            isinstance(xfer_list, np.ndarray)
            and xfer_list.ndim == 2
            and xfer_list.shape[1] == 5
        ):
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            rows = [
                (a + k * s, n, d)
                for a, n, d, s, c in xfer_list.astype(np.uint64).tolist()
                for k in range(c)
            ]
            dl: MockDescList | None = MockDescList(mem_type, rows, reg=False)
        else:
            dl = self.get_xfer_descs(xfer_list, mem_type)
        if dl is None:
            raise TypeError(
                "prepXferDlist(): incompatible arguments (bad descriptor list)"
            )
        with self._lock:
            h = MockDlistHandle(
                self, target, self._resolve(target, dl), self._gen.get(target, 0)
            )
            self._dlists[h._handle] = h
        return h

    def _op(self, operation: str) -> str:
        return {"READ": "READ", "WRITE": "WRITE"}[operation]  # KeyError like NIXL

    def _new_xfer(
        self,
        op: str,
        remote: str,
        pairs: list[tuple[Entry, Entry]],
        notif: str | bytes,
        gen: int,
    ) -> MockXferHandle:
        for i, (loc, rem) in enumerate(pairs):
            if loc[1] != rem[1]:
                raise _invalid(f"length mismatch at {i}")
        h = MockXferHandle(self, op, remote, pairs, _bytes(notif), gen)
        self._xfers[h._handle] = h
        return h

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: MockDlistHandle,
        local_indices: Sequence[int] | np.ndarray,
        remote_xfer_side: MockDlistHandle,
        remote_indices: Sequence[int] | np.ndarray,
        notif_msg: str | bytes = b"",
        backends: Sequence[str] = (),
        skip_desc_merge: bool = False,
    ) -> MockXferHandle:
        op = self._op(operation)
        self._check_backends(backends)
        loc, rem = local_xfer_side, remote_xfer_side
        with self._lock:
            if (
                any(
                    h._released or self._dlists.get(h._handle) is not h
                    for h in (loc, rem)
                )
                or loc.target != INIT_AGENT
                or rem.target == INIT_AGENT
            ):
                raise _invalid("invalid sides")
            li, ri = [int(i) for i in local_indices], [int(i) for i in remote_indices]
            if len(li) != len(ri):
                raise _invalid("index count mismatch")
            if not self._gen_ok(rem.target, rem.gen):
                raise _not_found(f"{rem.target!r} invalidated")
            for side, ids, h in (("local", li, loc), ("remote", ri, rem)):
                bad = [i for i in ids if not 0 <= i < len(h.entries)]
                if bad:
                    raise _invalid(f"{side} idx {bad[0]}")
            pairs = [
                (loc.entries[i], rem.entries[j]) for i, j in zip(li, ri, strict=True)
            ]
            return self._new_xfer(op, rem.target, pairs, notif_msg, rem.gen)

    def initialize_xfer(
        self,
        operation: str,
        local_descs: MockDescList,
        remote_descs: MockDescList,
        remote_agent: str | bytes,
        notif_msg: str | bytes = b"",
        backends: Sequence[str] = (),
    ) -> MockXferHandle:
        op = self._op(operation)
        self._check_backends(backends)
        if not (
            isinstance(local_descs, MockDescList)
            and isinstance(remote_descs, MockDescList)
        ):
            raise TypeError("createXferReq(): expected descriptor lists")
        if len(local_descs) != len(remote_descs):
            raise _invalid("different list sizes")
        for i, (a, b) in enumerate(zip(local_descs, remote_descs, strict=True)):
            if a[1] != b[1]:
                raise _invalid(f"length mismatch at {i}")
        name = _name(remote_agent)
        with self._lock:
            if name != self.name and name not in self._remotes:
                raise _not_found(f"metadata for {name!r} not found")
            pairs = list(
                zip(
                    self._resolve(INIT_AGENT, local_descs),
                    self._resolve(name, remote_descs),
                    strict=True,
                )
            )
            return self._new_xfer(op, name, pairs, notif_msg, self._gen.get(name, 0))

    # ---- transfers ------------------------------------------------------------
    def _live(self, handle: MockXferHandle) -> MockXferHandle:
        if handle._released or self._xfers.get(handle._handle) is not handle:
            raise _invalid(f"mock: {handle!r} released or not owned by {self.name}")
        return handle

    def transfer(self, handle: MockXferHandle, notif_msg: str | bytes = b"") -> str:
        with self._lock:
            h = self._live(handle)
            if h.state == "PROC":
                raise nixlRepostActiveError("NIXL_ERR_REPOST_ACTIVE")
            if not self._gen_ok(h.remote, h.gen):
                raise _not_found(f"{h.remote!r} invalidated")
            if any(p[3][0] != "DRAM" for pair in h.pairs for p in pair):
                raise NotImplementedError(
                    "mock NIXL moves host (DRAM) memory only; "
                    "VRAM regions are registration bookkeeping"
                )
            if notif_msg:
                h.notif = _bytes(notif_msg)
            self._n["transfers_posted"] += 1
            h._t_post = time.time()
            if self._fail_next:
                exc = self._fail_next.pop(0)
                if exc is not None:
                    raise exc
                return self._finish(h, ok=False)
            h.state = "PROC"
            return "PROC" if self.hold_transfers else self._complete(h)

    def _finish(self, h: MockXferHandle, ok: bool, moved: int = 0) -> str:
        h.state = "DONE" if ok else "ERR"
        self._n["transfers_done" if ok else "transfers_failed"] += 1
        self._n["bytes_moved"] += moved
        dur = int((time.time() - h._t_post) * 1e6)
        h.telemetry = MockXferTelemetry(
            int(h._t_post * 1e6), 1, dur, moved, len(h.pairs)
        )
        return h.state

    def _complete(self, h: MockXferHandle) -> str:
        peer = self if h.remote == self.name else self.fabric.get(h.remote)
        if peer is None or any(
            loc[3] not in self._local or rem[3] not in peer._local
            for loc, rem in h.pairs
        ):
            return self._finish(h, ok=False)  # peer gone / use after deregister
        for loc, rem in h.pairs:
            dst, src = (loc, rem) if h.op == "READ" else (rem, loc)
            if loc[1]:
                ctypes.memmove(dst[0], src[0], loc[1])
        if h.notif:
            peer._notifs[self.name].append(h.notif)
        return self._finish(h, ok=True, moved=sum(loc[1] for loc, _ in h.pairs))

    def check_xfer_state(self, handle: MockXferHandle) -> str:
        with self._lock:
            h = self._live(handle)
            if h.state == "INIT":
                raise nixlNotPostedError("NIXL_ERR_NOT_POSTED")
            return h.state

    def get_xfer_telemetry(self, handle: MockXferHandle) -> MockXferTelemetry:
        if not self.capture_telemetry:
            raise nixlNoTelemetryError("NIXL_ERR_NO_TELEMETRY")
        h = self._live(handle)
        if h.telemetry is None or h.state == "PROC":
            raise nixlNotPostedError("NIXL_ERR_NOT_POSTED: transfer not complete")
        return h.telemetry

    def release_xfer_handle(self, handle: MockXferHandle) -> None:
        with self._lock:
            h = self._live(handle)
            if h.state == "PROC" and self.cancel_fails:
                raise nixlBackendError("NIXL_ERR_BACKEND: mock cancel failed")
            h._released = True  # an in-flight (held) transfer is cancelled: no bytes
            del self._xfers[h._handle]

    def release_dlist_handle(self, handle: MockDlistHandle) -> None:
        with self._lock:
            if handle._released or self._dlists.get(handle._handle) is not handle:
                raise _invalid(f"mock: {handle!r} released or not owned")
            handle._released = True
            del self._dlists[handle._handle]

    # ---- notifications --------------------------------------------------------
    def get_new_notifs(self, backends: Sequence[str] = ()) -> dict[str, list[bytes]]:
        with self._lock:
            out = {k: v for k, v in self._notifs.items() if v}
            self._notifs = defaultdict(list)
        return out

    def send_notif(
        self,
        remote_agent_name: str | bytes,
        notif_msg: str | bytes,
        backend: str | None = None,
    ) -> None:
        name = _name(remote_agent_name)
        with self._lock:
            if name != self.name and name not in self._remotes:
                raise _not_found(f"no metadata for {name!r}")
            peer = self if name == self.name else self.fabric.get(name)
            if peer is None:
                raise nixlRemoteDisconnectError(f"mock: agent {name!r} is gone")
            peer._notifs[self.name].append(_bytes(notif_msg))
            self._n["notifs_sent"] += 1

    # ---- test hooks -------------------------------------------------------------
    def fail_next_transfer(
        self, count: int = 1, exc: BaseException | None = None
    ) -> None:
        """The next ``count`` transfer() calls end in "ERR" (or raise ``exc``)."""
        self._fail_next.extend([exc] * count)

    def _held(self, handle: MockXferHandle | None) -> list[MockXferHandle]:
        hs = list(self._xfers.values()) if handle is None else [self._live(handle)]
        return [h for h in hs if h.state == "PROC"]

    def complete_held(self, handle: MockXferHandle | None = None) -> int:
        """Complete held (PROC) transfers, moving bytes now; returns how many."""
        with self._lock:
            held = self._held(handle)
            for h in held:
                self._complete(h)
            return len(held)

    def fail_held(self, handle: MockXferHandle | None = None) -> int:
        """Make held (PROC) transfers end in "ERR" without moving bytes."""
        with self._lock:
            held = self._held(handle)
            for h in held:
                self._finish(h, ok=False)
            return len(held)

    def stats(self) -> MockNixlStats:
        with self._lock:
            keys = self._local.keys()
            return MockNixlStats(
                register_calls=self._n["register_calls"],
                deregister_calls=self._n["deregister_calls"],
                registered_regions=len(keys),
                registered_bytes=sum(k[3] for k in keys),
                prepped_dlists=len(self._dlists),
                prepped_descs=sum(len(h.entries) for h in self._dlists.values()),
                live_xfer_handles=len(self._xfers),
                transfers_posted=self._n["transfers_posted"],
                transfers_done=self._n["transfers_done"],
                transfers_failed=self._n["transfers_failed"],
                bytes_moved=self._n["bytes_moved"],
                notifs_sent=self._n["notifs_sent"],
            )
