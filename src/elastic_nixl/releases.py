"""What differs between the vLLM releases elastic_nixl supports, found by feature.

The connector subclasses vLLM's NIXL internals; where those differ between
supported releases (see ``compat.SUPPORTED_VLLM``), the difference is detected
here, once, by what the installed vLLM has, never by its version string:

* ``get_kv_cache_config_from_groups`` (vLLM's KV placement) lives in
  ``vllm.v1.core.kv_cache_utils`` up to 0.32 and in
  ``vllm.v1.core.kv_cache_planning`` from 0.33;
* ``registration_generation`` (0.33, NIXL connector version 15): a producer
  stamps ``remote_registration_generation`` into ``kv_transfer_params`` and a
  consumer that sees a newer one tears the peer down and handshakes again.
  vLLM's scheduler bumps it whenever the served handshake payload changes;
  ours serves a new payload on every mapping epoch, which elastic consumers
  follow without a re-handshake (``elastic_nixl_epoch``), so it must not bump
  the generation (see :func:`registration_generation_param`);
* NIXL descriptors (0.33): vLLM preps a peer's blocks as Nx5 strided rows,
  one per region over its advertised blocks, and NIXL (1.5) prepares a
  strided row only inside *one* registration of the peer; 0.32 preps one
  descriptor per block, each inside any registration. What an elastic
  producer may advertise to a vanilla consumer follows
  (:func:`vanilla_peer_coverage`);
* sleep-mode hooks (0.33: ``supports_sleep_mode``, ``unregister_kv_caches``,
  ``restore_kv_caches``): vLLM's ``restore`` re-encodes a plain
  ``NixlAgentMetadata`` and so would drop our fields (staging offer, extents,
  epoch); ``ElasticNixlConnector`` refuses sleep mode.

Everything here imports vLLM; nothing here patches it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import (
    metadata as _nixl_metadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker import (
    NixlBaseConnectorWorker,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import RemoteMeta

from elastic_nixl.runs import Runs, Span

# Where vLLM's KV placement lives: 0.33 moved it out of kv_cache_utils.
PLANNER_MODULES = ("vllm.v1.core.kv_cache_planning", "vllm.v1.core.kv_cache_utils")


def _find_planner() -> Callable[..., Any]:
    for module in PLANNER_MODULES:
        try:
            found = getattr(
                importlib.import_module(module), "get_kv_cache_config_from_groups", None
            )
        except ImportError:
            continue
        if callable(found):
            return found  # type: ignore[no-any-return]
    raise ImportError(
        "vLLM's get_kv_cache_config_from_groups is in none of "
        f"{', '.join(PLANNER_MODULES)}: this vLLM is not one elastic_nixl supports "
        "(compat.SUPPORTED_VLLM); install a supported release"
    )


get_kv_cache_config_from_groups: Callable[..., Any] = _find_planner()
"""vLLM's KV placement of cache groups in ``available_memory`` bytes."""

#: ``NIXL_CONNECTOR_VERSION`` of the installed vLLM: engines of different
#: versions refuse each other's handshakes.
NIXL_CONNECTOR_VERSION: int = _nixl_metadata.NIXL_CONNECTOR_VERSION

#: The ``kv_transfer_params`` key of the producer's registration generation,
#: present from NIXL connector version 15.
REGISTRATION_GENERATION_PARAM = "remote_registration_generation"

#: Whether this vLLM's consumers re-handshake on a newer registration
#: generation (``RemoteMeta.registration_generation``).
HAS_REGISTRATION_GENERATION: bool = "registration_generation" in {
    f.name for f in dataclasses.fields(RemoteMeta)
}

#: Whether this vLLM asks connectors about sleep mode (and calls
#: ``unregister_kv_caches`` / ``restore_kv_caches`` around it).
HAS_SLEEP_MODE_HOOKS: bool = hasattr(KVConnectorBase_V1, "supports_sleep_mode")


def registration_generation_param(params: dict[str, Any] | None) -> int | None:
    """The registration generation a producer put in ``kv_transfer_params``,
    or None where this vLLM has none."""
    if not HAS_REGISTRATION_GENERATION or params is None:
        return None
    value = params.get(REGISTRATION_GENERATION_PARAM)
    return value if isinstance(value, int) else None


#: Whether this vLLM preps a peer's blocks as strided rows (Nx5: address,
#: length, device, stride, count), each of which NIXL accepts only inside one
#: registration.
PREPS_STRIDED_DESCS: bool = hasattr(NixlBaseConnectorWorker, "_pack_strided_descs")


def vanilla_peer_coverage(registrations: list[Span]) -> list[Span]:
    """The address ranges in which a vanilla consumer of this vLLM can prep
    descriptors of ours, given our NIXL registrations ``(base, nbytes)``:
    each registration alone where it preps strided rows (a row may not cross
    from one registration into the next, adjacent or not), their union where
    it preps one descriptor per block."""
    if PREPS_STRIDED_DESCS:
        return sorted(registrations)
    return Runs.from_spans(registrations).spans()


SLEEP_MODE_REFUSAL = (
    "ElasticNixlConnector does not support sleep mode: vLLM's restore_kv_caches "
    "re-publishes a plain NixlAgentMetadata, dropping the elastic fields peers "
    "need (registered extents, mapping epoch, staging offer), and elastic KV "
    "memory is released and mapped by the connector, not by sleep. Remove "
    "--enable-sleep-mode (model_config.enable_sleep_mode), or use vLLM's "
    "NixlConnector for an engine that sleeps."
)
