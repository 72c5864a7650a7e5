"""Tests of the NIXL mock (tests/mock_nixl.py) and its parity with real NIXL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mock_nixl import (
    INIT_AGENT,
    MockDescList,
    MockNixlAgent,
    MockNixlFabric,
    nixlBackendError,
    nixlInvalidParamError,
    nixlMismatchError,
    nixlNoTelemetryError,
    nixlNotFoundError,
    nixlNotPostedError,
    nixlRepostActiveError,
)
from waiting import wait_until

CONF = SimpleNamespace(backends=["UCX"], capture_telemetry=True)


def addr(buf: np.ndarray, off: int = 0) -> int:
    return int(buf.ctypes.data) + off


class Pair:
    """Agent A (initiator, 4 KiB `dst`) and agent B (remote, 4 KiB `src`)."""

    def __init__(self, fabric: MockNixlFabric) -> None:
        self.a = MockNixlAgent("A", CONF, fabric=fabric)
        self.b = MockNixlAgent("B", CONF, fabric=fabric)
        self.dst = np.zeros(4096, np.uint8)
        self.src = (np.arange(4096) % 251).astype(np.uint8)
        self.a.register_memory([(addr(self.dst), 4096, 0, "")], "DRAM")
        self.b_reg = self.b.register_memory([(addr(self.src), 4096, 0, "")], "DRAM")
        self.name = self.a.add_remote_agent(self.b.get_agent_metadata())

    def loc(self, off: int, n: int) -> MockDescList:
        d = self.a.get_xfer_descs([(addr(self.dst, off), n, 0)], "DRAM")
        assert d is not None
        return d

    def rem(self, off: int, n: int, buf: np.ndarray | None = None) -> MockDescList:
        b = self.src if buf is None else buf
        d = self.a.get_xfer_descs([(addr(b, off), n, 0)], "DRAM")
        assert d is not None
        return d


@pytest.fixture
def fabric() -> MockNixlFabric:
    return MockNixlFabric()


@pytest.fixture
def pair(fabric: MockNixlFabric) -> Iterator[Pair]:
    p = Pair(fabric)
    yield p
    p.a.close()
    p.b.close()


# ---- registration -------------------------------------------------------------


def test_register_deregister_and_stats(fabric: MockNixlFabric) -> None:
    ag = MockNixlAgent("X", fabric=fabric)
    buf = np.zeros(8192, np.uint8)
    r1 = ag.register_memory([(addr(buf), 4096, 0, "meta")], "DRAM")
    arr = np.array([[addr(buf, 4096), 4096, 0]], dtype=np.uint64)
    r2 = ag.register_memory(arr, "DRAM")  # Nx3 numpy, adjacent: fine
    assert r1.descCount() == 1 and r1.getType() == "DRAM"
    s = ag.stats()
    assert (s.register_calls, s.registered_regions, s.registered_bytes) == (2, 2, 8192)
    sub = MockDescList("DRAM", [(addr(buf), 1024, 0)], reg=True)
    with pytest.raises(nixlNotFoundError):  # sub-range of a registration
        ag.deregister_memory(sub)
    ag.deregister_memory(r1)
    with pytest.raises(nixlNotFoundError):  # twice
        ag.deregister_memory(r1)
    ag.deregister_memory(r2)
    s = ag.stats()
    assert (s.deregister_calls, s.registered_regions, s.registered_bytes) == (2, 0, 0)
    with pytest.raises(TypeError):  # 3-tuples are not a registration list (NIXL)
        ag.register_memory([(addr(buf), 10, 0)], "DRAM")


def test_register_torch_tensor(fabric: MockNixlFabric) -> None:
    torch = pytest.importorskip("torch")
    ag = MockNixlAgent("X", fabric=fabric)
    t = torch.zeros(256, dtype=torch.float32)
    reg = ag.register_memory(t)
    assert reg.getType() == "DRAM" and reg.descs == [(t.data_ptr(), 1024, 0)]
    xd = ag.get_xfer_descs([t[:128], t[128:]])
    assert xd is not None and xd.descCount() == 2


def test_overlapping_registration_rejected(fabric: MockNixlFabric) -> None:
    ag = MockNixlAgent("X", fabric=fabric)
    buf = np.zeros(8192, np.uint8)
    ag.register_memory([(addr(buf), 4096, 0, "")], "DRAM")
    for off, n in [(0, 4096), (1024, 1024), (4000, 1000), (-100, 200)]:
        with pytest.raises(nixlInvalidParamError, match="exactly once"):
            ag.register_memory([(addr(buf) + off, n, 0, "")], "DRAM")
    with pytest.raises(nixlInvalidParamError):  # overlap inside one call
        ag.register_memory(
            [(addr(buf, 4096), 2048, 0, ""), (addr(buf, 5000), 100, 0, "")], "DRAM"
        )
    assert ag.stats().registered_regions == 1  # failed calls registered nothing
    ag.register_memory([(addr(buf), 4096, 1, "")], "DRAM")  # other device id: ok
    ag.register_memory([(addr(buf), 4096, 0, "")], "VRAM")  # other mem type: ok


# ---- transfers ----------------------------------------------------------------


def test_read_moves_bytes_and_notifies(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert pair.name == b"B"
    h = a.initialize_xfer("READ", pair.loc(0, 256), pair.rem(512, 256), "B", b"n1")
    with pytest.raises(nixlNotPostedError):
        a.check_xfer_state(h)
    assert a.transfer(h) == "DONE" and a.check_xfer_state(h) == "DONE"
    assert (pair.dst[:256] == pair.src[512:768]).all()
    assert not pair.dst[256:].any()
    assert b.get_new_notifs() == {"A": [b"n1"]} and b.get_new_notifs() == {}
    tel = a.get_xfer_telemetry(h)
    assert (tel.totalBytes, tel.descCount) == (256, 1)
    s = a.stats()
    assert (s.transfers_posted, s.transfers_done, s.bytes_moved) == (1, 1, 256)
    pair.dst[:] = 0
    assert a.transfer(h, notif_msg="again") == "DONE"  # repost after DONE is fine
    assert (pair.dst[:256] == pair.src[512:768]).all()
    assert b.get_new_notifs() == {"A": [b"again"]}
    a.release_xfer_handle(h)
    with pytest.raises(nixlInvalidParamError):  # stricter than NIXL: double release
        a.release_xfer_handle(h)
    with pytest.raises(nixlInvalidParamError):
        a.check_xfer_state(h)


def test_write_moves_bytes_torch(fabric: MockNixlFabric) -> None:
    torch = pytest.importorskip("torch")
    a = MockNixlAgent("A", fabric=fabric)
    b = MockNixlAgent("B", fabric=fabric)
    src = torch.arange(64, dtype=torch.float32)
    dst = torch.zeros(64, dtype=torch.float32)
    a.register_memory(src)
    b.register_memory(dst)
    a.add_remote_agent(b.get_agent_metadata())
    loc = a.get_xfer_descs(src[16:32])
    rem = a.get_xfer_descs(dst[:16])
    assert loc is not None and rem is not None
    assert a.transfer(a.initialize_xfer("WRITE", loc, rem, b"B")) == "DONE"
    assert torch.equal(dst[:16], src[16:32]) and not dst[16:].any()
    assert b.get_new_notifs() == {}  # no notif_msg -> no notification
    with pytest.raises(nixlNoTelemetryError):  # capture_telemetry off by default
        a.get_xfer_telemetry(a.initialize_xfer("WRITE", loc, rem, "B"))


def test_loopback_transfer(fabric: MockNixlFabric) -> None:
    ag = MockNixlAgent("L", fabric=fabric)
    buf = (np.arange(1024) % 7).astype(np.uint8)
    ag.register_memory([(addr(buf), 1024, 0, "")], "DRAM")
    d = ag.get_xfer_descs([(addr(buf, 512), 256, 0)], "DRAM")
    s = ag.get_xfer_descs([(addr(buf), 256, 0)], "DRAM")
    assert d is not None and s is not None
    assert ag.transfer(ag.initialize_xfer("READ", d, s, "L", b"x")) == "DONE"
    assert (buf[512:768] == buf[:256]).all()
    assert ag.get_new_notifs() == {"L": [b"x"]}


def test_descriptors_outside_registration_not_found(pair: Pair) -> None:
    a = pair.a
    buf2 = np.zeros(4096, np.uint8)  # adjacent-region case: split B's memory
    pair.b.deregister_memory(pair.b_reg)
    pair.b.register_memory(
        [(addr(pair.src), 2048, 0, ""), (addr(pair.src, 2048), 2048, 0, "")], "DRAM"
    )
    a.remove_remote_agent("B")
    a.add_remote_agent(pair.b.get_agent_metadata())
    bad_remote = {
        "outside": pair.rem(0, 256, buf2),
        "straddle_end": pair.rem(4096 - 128, 256),
        "spans_two_regions": pair.rem(2048 - 128, 256),
        "before_start": a.get_xfer_descs([(addr(pair.src) - 64, 256, 0)], "DRAM"),
        "wrong_dev": a.get_xfer_descs([(addr(pair.src), 256, 1)], "DRAM"),
        "wrong_mem_type": a.get_xfer_descs([(addr(pair.src), 256, 0)], "VRAM"),
    }
    for rem in bad_remote.values():
        assert rem is not None
        with pytest.raises(nixlNotFoundError):
            a.initialize_xfer("READ", pair.loc(0, 256), rem, "B")
        with pytest.raises(nixlNotFoundError):
            a.prep_xfer_dlist("B", rem)
        assert not a.check_remote_metadata("B", rem)
    assert a.check_remote_metadata("B", pair.rem(0, 256))
    with pytest.raises(nixlNotFoundError):  # local side straddles A's region
        a.initialize_xfer("READ", pair.loc(4096 - 128, 256), pair.rem(0, 256), "B")
    with pytest.raises(nixlNotFoundError):
        a.prep_xfer_dlist(INIT_AGENT, pair.loc(4096 - 128, 256))
    with pytest.raises(nixlNotFoundError):  # unknown agent
        a.initialize_xfer("READ", pair.loc(0, 256), pair.rem(0, 256), "Z")
    with pytest.raises(nixlInvalidParamError):  # list sizes differ
        two = MockDescList("DRAM", [(addr(pair.dst), 8, 0)] * 2, reg=False)
        a.initialize_xfer("READ", two, pair.rem(0, 8), "B")
    with pytest.raises(nixlInvalidParamError):  # pair lengths differ
        a.initialize_xfer("READ", pair.loc(0, 128), pair.rem(0, 256), "B")


# ---- metadata -----------------------------------------------------------------


def test_stale_metadata_hides_new_registrations(pair: Pair) -> None:
    a, b = pair.a, pair.b
    extra = np.full(1024, 7, np.uint8)
    b.register_memory([(addr(extra), 1024, 0, "")], "DRAM")
    with pytest.raises(nixlNotFoundError):  # A still holds the old snapshot
        a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64, extra), "B")
    assert a.add_remote_agent(b.get_agent_metadata()) == b"B"  # refresh
    h = a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64, extra), "B")
    assert a.transfer(h) == "DONE" and (pair.dst[:64] == 7).all()
    # refresh is additive like NIXL; remove_remote_agent forgets everything
    a.remove_remote_agent("B")
    assert not a.check_remote_metadata("B")
    with pytest.raises(nixlNotFoundError):
        a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64), "B")
    a.remove_remote_agent("B")  # unknown: no-op, like NIXL


def test_remove_remote_invalidates_old_handles(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pl = a.prep_xfer_dlist("", pair.loc(0, 64))
    pr = a.prep_xfer_dlist("B", pair.rem(0, 64))
    a.add_remote_agent(b.get_agent_metadata())  # plain refresh keeps handles valid
    h = a.make_prepped_xfer("READ", pl, [0], pr, [0])
    a.remove_remote_agent("B")
    a.add_remote_agent(b.get_agent_metadata())
    with pytest.raises(nixlNotFoundError):
        a.make_prepped_xfer("READ", pl, [0], pr, [0])
    with pytest.raises(nixlNotFoundError):
        a.transfer(h)
    pr2 = a.prep_xfer_dlist("B", pair.rem(0, 64))
    assert a.transfer(a.make_prepped_xfer("READ", pl, [0], pr2, [0])) == "DONE"


def test_bad_metadata(pair: Pair, fabric: MockNixlFabric) -> None:
    with pytest.raises(nixlMismatchError):
        pair.a.add_remote_agent(b"garbage")
    with pytest.raises(nixlInvalidParamError):
        pair.a.add_remote_agent(pair.a.get_agent_metadata())
    other = MockNixlAgent("B", fabric=MockNixlFabric())  # same name, other fabric
    with pytest.raises(nixlMismatchError):
        pair.a.add_remote_agent(other.get_agent_metadata())
    with pytest.raises(ValueError):
        MockNixlAgent("A", fabric=fabric)


def test_use_after_deregister_fails_transfer(pair: Pair) -> None:
    a, b = pair.a, pair.b
    h = a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64), "B", b"n")
    b.deregister_memory(pair.b_reg)
    assert a.transfer(h) == "ERR" and a.check_xfer_state(h) == "ERR"
    assert not pair.dst.any() and b.get_new_notifs() == {}
    assert a.stats().transfers_failed == 1


# ---- notifications ------------------------------------------------------------


def test_send_notif(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.send_notif("B", b"hello")
    a.send_notif(b"B", "str-too")
    assert b.get_new_notifs() == {"A": [b"hello", b"str-too"]}
    with pytest.raises(nixlNotFoundError):  # B never loaded A's metadata
        b.send_notif("A", b"x")
    with pytest.raises(nixlNotFoundError):
        a.send_notif("Z", b"x")
    b.add_remote_agent(a.get_agent_metadata())
    b.send_notif("A", b"back")
    assert a.get_new_notifs() == {"B": [b"back"]}
    assert a.stats().notifs_sent == 2


# ---- prepped dlists -----------------------------------------------------------


def test_prepped_dlists_by_index(pair: Pair) -> None:
    a = pair.a
    blocks = [(addr(pair.dst, i * 256), 256, 0) for i in range(8)]
    pl = a.prep_xfer_dlist("NIXL_INIT_AGENT", blocks, "DRAM")
    rows = np.array([[addr(pair.src, i * 256), 256, 0] for i in range(8)], np.uint64)
    pr = a.prep_xfer_dlist(b"B", rows, "DRAM")
    assert a.stats().prepped_descs == 16 and a.stats().prepped_dlists == 2
    h = a.make_prepped_xfer(
        "READ", pl, np.array([0, 3], np.int32), pr, [5, 1], notif_msg=b"p"
    )
    assert a.transfer(h) == "DONE"
    assert (pair.dst[:256] == pair.src[1280:1536]).all()
    assert (pair.dst[768:1024] == pair.src[256:512]).all()
    assert not pair.dst[256:768].any()
    for li, ri in [([0, 8], [0, 1]), ([0, 1], [0]), ([-1], [0])]:
        with pytest.raises(nixlInvalidParamError):
            a.make_prepped_xfer("READ", pl, li, pr, ri)
    with pytest.raises(nixlInvalidParamError):  # local handle as remote side
        a.make_prepped_xfer("READ", pl, [0], pl, [0])
    with pytest.raises(KeyError):
        a.make_prepped_xfer("COPY", pl, [0], pr, [0])
    a.release_dlist_handle(pr)
    assert a.stats().prepped_descs == 8
    with pytest.raises(nixlInvalidParamError):
        a.release_dlist_handle(pr)
    with pytest.raises(nixlInvalidParamError):
        a.make_prepped_xfer("READ", pl, [0], pr, [0])


def test_strided_prep(pair: Pair) -> None:
    a = pair.a
    pl = a.prep_xfer_dlist("", np.array([[addr(pair.dst), 64, 0, 128, 4]]), "DRAM")
    pr = a.prep_xfer_dlist("B", np.array([[addr(pair.src), 64, 0, 64, 4]]), "DRAM")
    assert len(pl.entries) == 4
    a.transfer(a.make_prepped_xfer("READ", pl, [3], pr, [2]))
    assert (pair.dst[384:448] == pair.src[128:192]).all()


# ---- test hooks ---------------------------------------------------------------


def test_hold_and_complete(pair: Pair) -> None:
    a, b = pair.a, pair.b
    a.hold_transfers = True
    h = a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64), "B", b"n")
    assert a.transfer(h) == "PROC" and a.check_xfer_state(h) == "PROC"
    assert not pair.dst.any() and b.get_new_notifs() == {}
    with pytest.raises(nixlRepostActiveError):
        a.transfer(h)
    with pytest.raises(nixlNotPostedError):
        a.get_xfer_telemetry(h)
    assert a.complete_held() == 1
    assert a.check_xfer_state(h) == "DONE" and (pair.dst[:64] == pair.src[:64]).all()
    assert b.get_new_notifs() == {"A": [b"n"]}


def test_fail_hooks(pair: Pair) -> None:
    a = pair.a
    h = a.initialize_xfer("READ", pair.loc(0, 64), pair.rem(0, 64), "B")
    a.fail_next_transfer()
    assert a.transfer(h) == "ERR" and a.check_xfer_state(h) == "ERR"
    assert not pair.dst.any()
    a.fail_next_transfer(exc=nixlBackendError("boom"))
    with pytest.raises(nixlBackendError):
        a.transfer(h)
    assert a.transfer(h) == "DONE"  # hooks consumed
    a.hold_transfers = True
    h2 = a.initialize_xfer("READ", pair.loc(64, 64), pair.rem(64, 64), "B")
    a.transfer(h2)
    assert a.fail_held(h2) == 1 and a.check_xfer_state(h2) == "ERR"
    # releasing an in-flight transfer cancels it; cancel failure is injectable
    h3 = a.initialize_xfer("READ", pair.loc(128, 64), pair.rem(128, 64), "B")
    a.transfer(h3)
    a.cancel_fails = True
    with pytest.raises(nixlBackendError):
        a.release_xfer_handle(h3)
    a.cancel_fails = False
    a.release_xfer_handle(h3)
    assert a.complete_held() == 0 and not pair.dst[128:192].any()
    s = a.stats()
    assert (s.transfers_posted, s.transfers_done, s.transfers_failed) == (5, 1, 2)


def test_vram_is_bookkeeping_only(fabric: MockNixlFabric) -> None:
    a = MockNixlAgent("A", fabric=fabric)
    b = MockNixlAgent("B", fabric=fabric)
    base = 0x7F00_0000_0000  # fake device pointers: never dereferenced
    a.register_memory([(base, 1 << 20, 0, "")], "VRAM")
    b.register_memory([(base, 1 << 20, 0, "")], "VRAM")
    a.add_remote_agent(b.get_agent_metadata())
    d = a.get_xfer_descs([(base, 4096, 0)], "VRAM")
    assert d is not None
    h = a.make_prepped_xfer(
        "READ", a.prep_xfer_dlist("", d), [0], a.prep_xfer_dlist("B", d), [0]
    )
    with pytest.raises(NotImplementedError, match="DRAM"):
        a.transfer(h)


# ---- parity with real NIXL ----------------------------------------------------


def _scenario(make: Callable[[str], Any]) -> dict[str, object]:
    """Same steps for real and mock agents; returns observable outcomes."""
    a, b = make("A"), make("B")
    src = (np.arange(4096) % 251).astype(np.uint8)
    dst = np.zeros(4096, np.uint8)
    extra = np.full(1024, 9, np.uint8)
    a.register_memory([(addr(dst), 4096, 0, "")], "DRAM")
    b.register_memory([(addr(src), 2048, 0, "")], "DRAM")
    out: dict[str, object] = {"name": a.add_remote_agent(b.get_agent_metadata())}

    def x(off: int, n: int, buf: np.ndarray) -> Any:
        return a.get_xfer_descs([(addr(buf, off), n, 0)], "DRAM")

    def attempt(what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            out[what] = "ok"
        except Exception as e:  # record the class name only
            out[what] = type(e).__name__

    def finish(h: Any) -> str:
        wait_until(lambda: a.check_xfer_state(h) != "PROC", what="the transfer")
        return str(a.check_xfer_state(h))

    def notifs_of(agent: Any, count: int) -> dict[str, list[bytes]]:
        """Drain ``agent``'s notifications until ``count`` have arrived."""
        got: dict[str, list[bytes]] = {}

        def drained() -> bool:
            for peer, msgs in agent.get_new_notifs().items():
                got.setdefault(peer, []).extend(msgs)
            return sum(map(len, got.values())) >= count

        wait_until(drained, what=f"{count} notification(s)")
        return got

    h = a.initialize_xfer("READ", x(0, 256, dst), x(256, 256, src), "B", b"n1")
    a.transfer(h)
    finish(h)
    out["state"] = a.check_xfer_state(h)
    out["moved"] = bool((dst[:256] == src[256:512]).all()) and not dst[256:].any()
    out["notifs"] = notifs_of(b, 1)
    a.release_xfer_handle(h)
    # WRITE: A's bytes land in B's memory, and B is told with the message.
    dst[:128] = 77
    h = a.initialize_xfer("WRITE", x(0, 128, dst), x(1024, 128, src), "B", b"w1")
    a.transfer(h)
    out["write_state"] = finish(h)
    out["written"] = bool((src[1024:1152] == 77).all() and src[1152] == 1152 % 251)
    out["write_notifs"] = notifs_of(b, 1)
    a.release_xfer_handle(h)
    attempt(
        "write_outside",
        lambda: a.initialize_xfer("WRITE", x(0, 256, dst), x(2048, 256, src), "B"),
    )
    # Notifications alone, both ways, in order, and drained once read.
    a.send_notif("B", b"m1")
    a.send_notif("B", b"m2")
    out["sent_notifs"] = notifs_of(b, 2)
    out["drained"] = b.get_new_notifs()
    b.add_remote_agent(a.get_agent_metadata())
    b.send_notif("A", b"back")
    out["reply_notifs"] = notifs_of(a, 1)
    for what, off in [("outside", 2048), ("straddle", 2048 - 128)]:
        rem = x(off, 256, src)

        def init(r: Any = rem) -> Any:
            return a.initialize_xfer("READ", x(0, 256, dst), r, "B")

        def prep(r: Any = rem) -> Any:
            return a.prep_xfer_dlist("B", r)

        attempt(f"init_{what}", init)
        attempt(f"prep_{what}", prep)
    attempt("local_straddle", lambda: a.prep_xfer_dlist("", x(4096 - 128, 256, dst)))
    attempt("unknown_agent", lambda: a.prep_xfer_dlist("Z", x(0, 256, src)))
    attempt(
        "size_mismatch",
        lambda: a.initialize_xfer("READ", x(0, 128, dst), x(0, 256, src), "B"),
    )
    b.register_memory([(addr(extra), 1024, 0, "")], "DRAM")
    attempt("stale", lambda: a.prep_xfer_dlist("B", x(0, 256, extra)))
    a.add_remote_agent(b.get_agent_metadata())
    attempt("refreshed", lambda: a.prep_xfer_dlist("B", x(0, 256, extra)))
    attempt("notif_unknown", lambda: b.send_notif("Z", b"x"))
    return out


@pytest.mark.integration
def test_mock_matches_real_nixl(fabric: MockNixlFabric) -> None:
    api = pytest.importorskip("nixl._api")
    try:
        real = _scenario(lambda n: api.nixl_agent(n, api.nixl_agent_config()))
    except RuntimeError as e:  # e.g. no UCX plugin on this machine
        pytest.skip(f"real NIXL agents unavailable: {e}")
    mock = _scenario(lambda n: MockNixlAgent(n, fabric=fabric))
    assert real == mock
    assert mock["state"] == "DONE" and mock["moved"] is True
    assert mock["init_straddle"] == mock["prep_outside"] == "nixlNotFoundError"
    assert mock["stale"] == "nixlNotFoundError" and mock["refreshed"] == "ok"
    assert mock["write_state"] == "DONE" and mock["written"] is True
    assert mock["write_notifs"] == {"A": [b"w1"]}
    assert mock["sent_notifs"] == {"A": [b"m1", b"m2"]} and mock["drained"] == {}
    assert mock["reply_notifs"] == {"B": [b"back"]}
