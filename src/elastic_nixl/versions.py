"""Which vLLM this package supports, checked before touching its internals."""

from __future__ import annotations


SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lower, upper)


def _release(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def vllm_version() -> str | None:
    try:
        from vllm.version import __version__
    except ImportError:
        return None
    return str(__version__)


def vllm_supported(v: str | None) -> bool:
    if v is None:
        return False
    lo, hi = SUPPORTED_VLLM
    return lo <= _release(v) < hi


def check_vllm_version() -> None:
    """Refuse an unsupported vLLM before subclassing its NIXL internals."""
    v = vllm_version()
    if not vllm_supported(v):
        lo, hi = SUPPORTED_VLLM
        raise ImportError(
            f"elastic_nixl supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; "
            f"found {v or 'no vLLM'}. Its NixlConnector internals differ between "
            "releases; install vllm==0.32.*"
        )
