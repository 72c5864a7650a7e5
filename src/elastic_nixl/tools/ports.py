"""TCP ports for the servers and engines the tools start.

A port taken with ``bind(0)`` comes from the kernel's ephemeral range, and a
``vllm serve`` binds its NIXL side channel only after loading the model,
minutes later; by then any outgoing connection or ``bind(0)`` on the
machine (UCX, ZMQ, another server) may have been given the same port, and
vLLM's listener dies with "Address already in use" (seen in CI: the six
servers never became ready). Ports handed out here lie below the ephemeral
range, which the kernel never assigns on its own, and each is handed out
once per process.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where unreadable)."""
    try:
        low, high = map(int, _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, outside the ephemeral range where
    it can (see the module docstring), never the same twice in a process."""
    low, _ = ephemeral_range()
    first, span = _LOWEST, low - _LOWEST
    with _lock:
        if span > 0:
            # Start where the pid says, so concurrent processes rarely meet.
            start = (os.getpid() * 7919) % span
            for i in range(span):
                port = first + (start + i) % span
                if port not in _handed_out and _bindable(port):
                    _handed_out.add(port)
                    return port
        # No room below the ephemeral range: the kernel's choice.
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
