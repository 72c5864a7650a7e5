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


@dataclass(frozen=True)
class IntRange:
    """The values an integer key accepts, both ends included."""

    lowest: int
    highest: int

    def __contains__(self, value: object) -> bool:
        # bool is an int subclass; `true` is never a size.
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.lowest <= value <= self.highest
        )


# The range of each integer key. Upper bounds are far beyond any real
# deployment and low enough that sizes computed from them stay exact (no
# overflow anywhere); the README's configuration table states the same
# ranges (tests/unit/test_docs.py holds them together).
INT_RANGES: dict[str, IntRange] = {
    "chunk_bytes": IntRange(4096, 1 << 30),  # and a multiple of 4096
    "staging_slots": IntRange(1, 64),
    "staging_slot_bytes": IntRange(1, 16 << 30),
    "staging_timeout_s": IntRange(1, 3600),
    "max_mapped_bytes": IntRange(1, 1 << 50),
    # 0, the default, is valid: an idle engine keeps no cached blocks.
    "idle_mapped_bytes": IntRange(0, 1 << 50),
}

# Every key of ours that kv_connector_extra_config accepts.
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "allocator",
        "chunk_bytes",
        "transfer_path",
        "staging_slots",
        "staging_slot_bytes",
        "staging_timeout_s",
        "max_mapped_bytes",
        "idle_mapped_bytes",
        "nixl_progress_thread",
    }
)

# Keys once documented that nothing reads, each refused with the reason:
# accepting one silently would let a deployment believe it took effect.
REFUSED_KEYS: dict[str, str] = {
    "virtual_blocks": (
        "kv_connector_extra_config['virtual_blocks'] is not read: with "
        "allocator 'vmm' in vllm serve the virtual capacity V is the block count "
        "vLLM's scheduler sees, so set V with --num-gpu-blocks-override and cap "
        "physical memory with max_mapped_bytes"
    ),
}


@dataclass(frozen=True)
class ElasticNixlSettings:
    allocator: AllocatorChoice = AllocatorChoice.AUTO
    # Not a key (REFUSED_KEYS says why): always None from
    # kv_connector_extra_config. Kept while vllm_seam.allocate_elastic_kv_cache
    # reads it for its default V (4x the physical budget when None).
    virtual_blocks: int | None = None
    # Physical allocation unit: also the NIXL registration unit.
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES
    transfer_path: TransferPath = TransferPath.AUTO
    # Staged path: bounce slots per side, and the bytes of one slot (all
    # regions); a slot holds at least one block.
    staging_slots: int = _DEFAULT_STAGING_SLOTS
    staging_slot_bytes: int = _DEFAULT_STAGING_SLOT_BYTES
    # Staged path: a producer ends a transfer (and releases its KV lease) that
    # got no slot grant from its consumer for this long; a consumer fails a
    # transfer whose chunks have not all arrived this long after it asked.
    staging_timeout_s: int = 60
    # allocator 'vmm' in vllm serve: the physical cap (None: V blocks may all
    # be mapped) and what an idle engine keeps mapped of its prefix cache.
    max_mapped_bytes: int | None = None
    idle_mapped_bytes: int = 0
    # NIXL's progress thread (vLLM leaves it on): it polls without sleeping,
    # a core per engine; off, UCX progresses when vLLM polls NIXL each step.
    nixl_progress_thread: bool = True

    def staging_slot_blocks(self, bytes_per_block: int) -> int:
        """How many blocks one staging slot holds.

        Args:
            bytes_per_block: bytes of one block, all KV regions together.

        Returns:
            ``staging_slot_bytes // bytes_per_block``, at least one: a slot
            smaller than a block still carries one.
        """
        return max(1, self.staging_slot_bytes // max(1, bytes_per_block))

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ElasticNixlSettings:
        """Validate ``kv_connector_extra_config``.

        Args:
            extra: the whole dict, vLLM's NIXL keys included (they are passed
                over, for vLLM's code to read); ``None`` is an empty dict.

        Returns:
            The settings, defaults for every key not given.

        Raises:
            ValueError: naming the first bad key and the valid choices.
        """
        extra = dict(extra or {})
        ours = {k: v for k, v in extra.items() if k not in VLLM_NIXL_KEYS}
        refused = sorted(set(ours) & set(REFUSED_KEYS))
        if refused:
            raise ValueError(REFUSED_KEYS[refused[0]])
        unknown = sorted(set(ours) - KNOWN_KEYS)
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config: unknown key(s) {unknown} for "
                f"ElasticNixlConnector; valid keys are {sorted(KNOWN_KEYS)} plus "
                f"vLLM's NIXL keys {sorted(VLLM_NIXL_KEYS)}"
            )
        kwargs: dict[str, Any] = {}
        if "allocator" in ours:
            kwargs["allocator"] = _enum_value(AllocatorChoice, "allocator", ours)
        if "transfer_path" in ours:
            kwargs["transfer_path"] = _enum_value(TransferPath, "transfer_path", ours)
        if "nixl_progress_thread" in ours:
            flag = ours["nixl_progress_thread"]
            if not isinstance(flag, bool):
                raise ValueError(
                    "kv_connector_extra_config['nixl_progress_thread'] must be true "
                    f"or false, got {flag!r}"
                )
            kwargs["nixl_progress_thread"] = flag
        for key in INT_RANGES:
            # None written out is the default of max_mapped_bytes (no cap).
            if key in ours and not (key == "max_mapped_bytes" and ours[key] is None):
                kwargs[key] = _bounded_int(key, ours)
        if kwargs.get("chunk_bytes", 0) % 4096:
            raise ValueError(
                "kv_connector_extra_config['chunk_bytes'] must be a multiple of "
                f"4096 (the host page size), got {kwargs['chunk_bytes']}"
            )
        return cls(**kwargs)


def settings_from_vllm_config(vllm_config: VllmConfig) -> ElasticNixlSettings:
    """Our settings from ``--kv-transfer-config``: the one place they are read.

    Args:
        vllm_config: the engine's config; no ``kv_transfer_config`` means
            every default.

    Returns:
        :meth:`ElasticNixlSettings.from_extra_config` of its
        ``kv_connector_extra_config``.
    """
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


def _bounded_int(key: str, ours: Mapping[str, Any]) -> int:
    raw = ours[key]
    allowed = INT_RANGES[key]
    if raw not in allowed:
        raise ValueError(
            f"kv_connector_extra_config[{key!r}] must be an integer from "
            f"{allowed.lowest} to {allowed.highest}, got {raw!r}"
        )
    return int(raw)
