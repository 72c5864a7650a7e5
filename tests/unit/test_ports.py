"""Ports for the servers the tools start (tools/ports.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from elastic_nixl.tools import ports


def test_ports_lie_below_the_ephemeral_range_and_are_never_repeated() -> None:
    low, _ = ports.ephemeral_range()
    got = [ports.free_port() for _ in range(50)]
    assert len(set(got)) == len(got)
    if low > ports._LOWEST:
        assert all(ports._LOWEST <= p < low for p in got), got
    for p in got:  # each was free when handed out, and nothing holds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        # Two candidates, `taken` and the next: wherever the search starts,
        # the held one is refused.
        monkeypatch.setattr(ports, "_LOWEST", taken)
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (taken + 2, 65535))
        monkeypatch.setattr(ports, "_handed_out", set())
        assert ports.free_port() == taken + 1


def test_no_room_below_the_range_falls_back_to_the_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "ip_local_port_range"
    fake.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_RANGE_FILE", fake)
    assert ports.ephemeral_range() == (1024, 65535)
    first, second = ports.free_port(), ports.free_port()
    assert first != second and first >= 1024
