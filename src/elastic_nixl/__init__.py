"""elastic_nixl: vLLM's NIXL KV connector for elastic (VMM) KV caches.

``ElasticNixlConnector`` is importable from the package top so that
``kv_connector_module_path="elastic_nixl"`` resolves it; it is loaded lazily
because importing it imports vLLM.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ElasticNixlConnector", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "ElasticNixlConnector":
        from elastic_nixl.connector.connector import ElasticNixlConnector

        return ElasticNixlConnector
    raise AttributeError(f"module 'elastic_nixl' has no attribute {name!r}")
