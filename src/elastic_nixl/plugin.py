"""vLLM ``general_plugins`` entry point: registers ElasticNixlConnector."""

from __future__ import annotations

CONNECTOR_NAME = "ElasticNixlConnector"
CONNECTOR_MODULE = "elastic_nixl.connector.connector"


def register() -> None:
    """Make ``kv_connector="ElasticNixlConnector"`` resolve; safe to call twice."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # vLLM may load plugins more than once per process; its factory refuses
    # a second registration of a name with ValueError and nothing else.
    try:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME
        )
    except ValueError:
        if KVConnectorFactory.get_connector_class_by_name(
            CONNECTOR_NAME
        ).__module__ != (CONNECTOR_MODULE):
            raise
