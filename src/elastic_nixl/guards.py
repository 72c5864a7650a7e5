"""Environment checks that vLLM makes only in part."""

from __future__ import annotations

import os
from collections.abc import Mapping

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def parse_alloc_conf(value: str) -> dict[str, str]:
    """Parse PyTorch's ``key:value,key:value`` allocator settings."""
    settings: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition(":")
        if key and sep:
            settings[key.strip()] = val.strip()
    return settings


def expandable_segments_source(environ: Mapping[str, str] | None = None) -> str | None:
    """The variable that turns expandable_segments on, or None.

    vLLM 0.32 checks only ``PYTORCH_CUDA_ALLOC_CONF`` and by substring;
    PyTorch reads ``PYTORCH_ALLOC_CONF`` too.
    """
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
