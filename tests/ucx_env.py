"""Which UCX transports the tests ask for."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# Loopback-friendly transports; tcp must stay in the list (NIXL's UCX backend
# wires agents of one host over it here).
HOST_TRANSPORTS = "tcp,self,sm"
# Where a GPU is present, UCX needs a CUDA memory domain for NIXL to register
# VRAM at all: without cuda_copy the same command fails on a GPU machine.
GPU_TRANSPORTS = HOST_TRANSPORTS + ",cuda_copy"


def gpu_present(env: Mapping[str, str], nvidia_gpus: Path) -> bool:
    """Whether the NVIDIA driver lists a GPU this process may use, asked
    without initialising CUDA (forked test workers must not inherit it)."""
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return nvidia_gpus.is_dir() and any(nvidia_gpus.iterdir())


def ucx_tls(
    env: Mapping[str, str] = os.environ,
    nvidia_gpus: Path = Path("/proc/driver/nvidia/gpus"),
) -> str:
    """``UCX_TLS`` for the test session: the user's own setting if any,
    else the host transports, with ``cuda_copy`` where a GPU is present."""
    if env.get("UCX_TLS"):
        return env["UCX_TLS"]
    return GPU_TRANSPORTS if gpu_present(env, nvidia_gpus) else HOST_TRANSPORTS
