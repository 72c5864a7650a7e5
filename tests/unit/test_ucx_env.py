"""UCX_TLS for the test session (tests/ucx_env.py)."""

from __future__ import annotations

from pathlib import Path

from ucx_env import GPU_TRANSPORTS, HOST_TRANSPORTS, ucx_tls


def driver_listing(tmp_path: Path, gpus: int) -> Path:
    listing = tmp_path / "gpus"
    listing.mkdir()
    for i in range(gpus):
        (listing / f"0000:{i:02x}:00.0").mkdir()
    return listing


def test_cpu_machine_gets_host_transports(tmp_path: Path) -> None:
    assert ucx_tls({}, tmp_path / "absent") == HOST_TRANSPORTS
    assert ucx_tls({}, driver_listing(tmp_path, 0)) == HOST_TRANSPORTS


def test_gpu_machine_adds_cuda_copy_and_keeps_tcp(tmp_path: Path) -> None:
    tls = ucx_tls({}, driver_listing(tmp_path, 2))
    assert tls == GPU_TRANSPORTS
    assert {"tcp", "cuda_copy"} <= set(tls.split(","))


def test_hidden_gpus_count_as_none(tmp_path: Path) -> None:
    listing = driver_listing(tmp_path, 1)
    assert ucx_tls({"CUDA_VISIBLE_DEVICES": ""}, listing) == HOST_TRANSPORTS
    assert ucx_tls({"CUDA_VISIBLE_DEVICES": "0"}, listing) == GPU_TRANSPORTS


def test_a_users_setting_is_kept(tmp_path: Path) -> None:
    listing = driver_listing(tmp_path, 1)
    assert ucx_tls({"UCX_TLS": "tcp,cuda_copy,cuda_ipc"}, listing) == (
        "tcp,cuda_copy,cuda_ipc"
    )
