"""How vLLM drives elastic KV memory: ``ElasticNixlConnector`` and its parts.

As vLLM's ``nixl/`` package: a thin facade (``connector``) that picks the
``scheduler`` and ``worker`` subclasses; ``metadata`` is the wire format;
``handshake`` and ``peers`` are what the worker learns of remote engines;
``staged`` is the staged path the worker owns; ``registration`` keeps NIXL's
registrations equal to the mapped memory. ``planning`` and ``regions`` are
pure functions over plain data (what to register, which descriptors a read
needs, which layout to ask for), tested without vLLM.

The re-exported classes are loaded on first use, so ``planning``,
``regions`` and ``registration`` import without vLLM (the GPU benchmark and
``doctor`` run where vLLM is not installed).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ElasticNixlConnector",
    "ElasticNixlConnectorScheduler",
    "ElasticNixlConnectorWorker",
    "ElasticStats",
]

_HOMES = {
    "ElasticNixlConnector": "elastic_nixl.connector.connector",
    "ElasticNixlConnectorScheduler": "elastic_nixl.connector.scheduler",
    "ElasticNixlConnectorWorker": "elastic_nixl.connector.worker",
    "ElasticStats": "elastic_nixl.connector.stats",
}


def __getattr__(name: str) -> Any:
    import importlib

    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(
            f"module 'elastic_nixl.connector' has no attribute {name!r}"
        )
    return getattr(importlib.import_module(home), name)
