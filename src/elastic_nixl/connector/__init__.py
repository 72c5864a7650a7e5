"""How vLLM drives elastic KV memory: ``ElasticNixlConnector`` and its parts.

As vLLM's ``nixl/`` package: a thin facade (``connector``) that picks the
``scheduler`` and ``worker`` subclasses; ``metadata`` is the wire format;
``peers`` is what the worker knows of remote engines; ``staged`` is the
staged path the worker owns; ``registration`` keeps NIXL's registrations
equal to the mapped memory. ``planning`` and ``regions`` are pure functions
over plain data (what to register, which descriptors a read needs, which
layout to ask for), tested without vLLM.

Importing this package imports vLLM.
"""

from elastic_nixl.connector.connector import ElasticNixlConnector
from elastic_nixl.connector.scheduler import ElasticNixlConnectorScheduler
from elastic_nixl.connector.worker import ElasticNixlConnectorWorker, ElasticStats

__all__ = [
    "ElasticNixlConnector",
    "ElasticNixlConnectorScheduler",
    "ElasticNixlConnectorWorker",
    "ElasticStats",
]
