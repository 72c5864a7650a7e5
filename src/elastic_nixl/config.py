"""Settings read from ``kv_connector_extra_config``.

Our keys are validated strictly: a key that is neither ours nor one vLLM's
NIXL connector reads is an error naming the key and the valid choices. vLLM's
keys pass through untouched for its NixlConnector code to read.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Keys vLLM 0.32's NIXL connector reads from kv_connector_extra_config
# (grep get_from_extra_config in vllm/distributed/kv_transfer/kv_connector/v1/nixl).
VLLM_NIXL_KEYS: frozenset[str] = frozenset(
    {
        "backends",
        "bidirectional_kv_xfer",
        "decoder_kv_blocks_ttl",
        "enforce_handshake_compat",
        "engine_ttl",
        "kv_lease_duration",
        "kv_recompute_threshold",
        "num_threads",
        "push_registration_timeout",
    }
)


class AllocatorChoice(enum.Enum):
    AUTO = "auto"  # work out from the KV tensors themselves
    VMM = "vmm"  # the project's VMM allocator
    STATIC = "static"  # vLLM's own static buffer: behave exactly like NixlConnector


class TransferPath(enum.Enum):
    AUTO = "auto"  # direct unless the memory cannot be exported to the transport
    DIRECT = "direct"
    STAGED = "staged"


_DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# Staged path: 4 slots of 128 MiB a side (64 Llama-3-8B blocks a slot), the
# setting docs/gpu.md measured on 2xH200: 0.89x (1 GiB) and 0.98x (4 GiB)
# the 2 MiB-descriptor ceiling, medians of three runs.
_DEFAULT_STAGING_SLOTS = 4
_DEFAULT_STAGING_SLOT_BYTES = 128 * 1024 * 1024

# Upper bounds of each integer key: far beyond any real deployment, and low
# enough that sizes computed from them stay exact (no overflow anywhere).
LIMITS: dict[str, int] = {
    "virtual_blocks": 1 << 32,
    "chunk_bytes": 1 << 30,
    "staging_slots": 64,
    "staging_slot_bytes": 16 << 30,
    "staging_timeout_s": 3600,
    "max_mapped_bytes": 1 << 50,
    "idle_mapped_bytes": 1 << 50,
}


@dataclass(frozen=True)
class ElasticNixlSettings:
    allocator: AllocatorChoice = AllocatorChoice.AUTO
    # Virtual capacity in blocks for the VMM allocator; None = 4x the physical
    # budget vLLM computed.
    virtual_blocks: int | None = None
    # Physical allocation unit: also the NIXL registration unit.
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES
    transfer_path: TransferPath = TransferPath.AUTO
    # Staged path: bounce slots per side, and the bytes of one slot (all
    # regions); a slot holds at least one block.
    staging_slots: int = _DEFAULT_STAGING_SLOTS
    staging_slot_bytes: int = _DEFAULT_STAGING_SLOT_BYTES
    # Staged path: how long a consumer may hold a producer's slot (and wait
    # for a producer) before the transfer is failed and the slot reclaimed.
    staging_timeout_s: int = 60
    # allocator 'vmm' in vllm serve: the physical cap (None: V blocks may all
    # be mapped) and what an idle engine keeps mapped of its prefix cache.
    max_mapped_bytes: int | None = None
    idle_mapped_bytes: int = 0
    # NIXL's progress thread (vLLM leaves it on): it polls without sleeping,
    # a core per engine; off, UCX progresses when vLLM polls NIXL each step.
    nixl_progress_thread: bool = True

    def staging_slot_blocks(self, bytes_per_block: int) -> int:
        """Blocks one slot holds (at least one) for blocks of this size."""
        return max(1, self.staging_slot_bytes // max(1, bytes_per_block))

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ElasticNixlSettings:
        """Validate ``kv_connector_extra_config``; ``ValueError`` names the
        first bad key and the valid choices."""
        extra = dict(extra or {})
        ours = {k: v for k, v in extra.items() if k not in VLLM_NIXL_KEYS}
        known = {
            "allocator",
            "virtual_blocks",
            "chunk_bytes",
            "transfer_path",
            "staging_slots",
            "staging_slot_bytes",
            "staging_timeout_s",
            "max_mapped_bytes",
            "idle_mapped_bytes",
            "nixl_progress_thread",
        }
        unknown = sorted(set(ours) - known)
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config: unknown key(s) {unknown} for "
                f"ElasticNixlConnector; valid keys are {sorted(known)} plus "
                f"vLLM's NIXL keys {sorted(VLLM_NIXL_KEYS)}"
            )
        kwargs: dict[str, Any] = {}
        if "allocator" in ours:
            kwargs["allocator"] = _enum_value(AllocatorChoice, "allocator", ours)
        if "transfer_path" in ours:
            kwargs["transfer_path"] = _enum_value(TransferPath, "transfer_path", ours)
        if "virtual_blocks" in ours and ours["virtual_blocks"] is not None:
            kwargs["virtual_blocks"] = _bounded_int("virtual_blocks", ours)
        if "nixl_progress_thread" in ours:
            flag = ours["nixl_progress_thread"]
            if not isinstance(flag, bool):
                raise ValueError(
                    "kv_connector_extra_config['nixl_progress_thread'] must be true "
                    f"or false, got {flag!r}"
                )
            kwargs["nixl_progress_thread"] = flag
        if ours.get("max_mapped_bytes") is not None:
            kwargs["max_mapped_bytes"] = _bounded_int("max_mapped_bytes", ours)
        for key in ("staging_slots", "staging_slot_bytes", "staging_timeout_s"):
            if key in ours:
                kwargs[key] = _bounded_int(key, ours)
        if "idle_mapped_bytes" in ours:
            # 0, the default, is valid: an idle engine keeps no cached blocks.
            kwargs["idle_mapped_bytes"] = _bounded_int(
                "idle_mapped_bytes", ours, lowest=0
            )
        if "chunk_bytes" in ours:
            chunk = _bounded_int("chunk_bytes", ours)
            if chunk % 4096:
                raise ValueError(
                    "kv_connector_extra_config['chunk_bytes'] must be a multiple of "
                    f"4096 (the host page size), got {chunk}"
                )
            kwargs["chunk_bytes"] = chunk
        return cls(**kwargs)


def settings_from_vllm_config(vllm_config: VllmConfig) -> ElasticNixlSettings:
    """Our settings from ``--kv-transfer-config``: the one place they are read."""
    ktc = vllm_config.kv_transfer_config
    return ElasticNixlSettings.from_extra_config(
        ktc.kv_connector_extra_config if ktc is not None else None
    )


def _enum_value(enum_cls: type[enum.Enum], key: str, ours: Mapping[str, Any]) -> Any:
    raw = ours[key]
    choices = [member.value for member in enum_cls]
    if not isinstance(raw, str) or raw.lower() not in choices:
        raise ValueError(
            f"kv_connector_extra_config[{key!r}] = {raw!r} is not valid; "
            f"choose one of {choices}"
        )
    return enum_cls(raw.lower())


def _bounded_int(key: str, ours: Mapping[str, Any], lowest: int = 1) -> int:
    raw = ours[key]
    limit = LIMITS[key]
    if isinstance(raw, bool) or not isinstance(raw, int) or not lowest <= raw <= limit:
        raise ValueError(
            f"kv_connector_extra_config[{key!r}] must be an integer from {lowest} "
            f"to {limit}, got {raw!r}"
        )
    return raw
