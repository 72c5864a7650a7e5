"""What differs between supported vLLM releases (elastic_nixl.releases).

Each test runs on whichever release is installed and checks the behaviour
that release calls for, found by feature, so the same file passes on every
supported release and fails when one moves underneath.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import run_until
from elastic_nixl import compat, releases
from elastic_nixl.connector.metadata import EPOCH_PARAM, parse_consumer_params

V = 20_000
P = 64


def test_installed_release_is_supported_and_detected() -> None:
    found = compat.installed_vllm()
    assert found is not None and found.supported, found
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        NIXL_CONNECTOR_VERSION,
    )

    assert releases.NIXL_CONNECTOR_VERSION == NIXL_CONNECTOR_VERSION
    # Version 15 introduced the registration generation, with sleep mode.
    assert (NIXL_CONNECTOR_VERSION >= 15) == releases.HAS_REGISTRATION_GENERATION
    assert (NIXL_CONNECTOR_VERSION >= 15) == releases.HAS_SLEEP_MODE_HOOKS


def test_connector_refuses_sleep_mode() -> None:
    from vllm.config.kv_transfer import KVTransferConfig

    from elastic_nixl.connector.connector import ElasticNixlConnector

    ktc = KVTransferConfig(kv_connector="ElasticNixlConnector", kv_role="kv_both")
    assert ElasticNixlConnector.supports_sleep_mode(ktc) is False
    conn = object.__new__(ElasticNixlConnector)
    for hook in (conn.unregister_kv_caches, conn.restore_kv_caches):
        with pytest.raises(NotImplementedError, match="--enable-sleep-mode"):
            hook()


@pytest.mark.skipif(
    not releases.HAS_SLEEP_MODE_HOOKS, reason="this vLLM has no sleep-mode hooks"
)
def test_vllm_refuses_sleep_mode_with_our_connector() -> None:
    """vLLM's own config check asks the connector class (0.33+)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from elastic_nixl.plugin import register
    from elastic_nixl.tools.harness.vllm_objects import make_vllm_config

    register()
    vc = make_vllm_config("kv_producer")
    assert vc.kv_transfer_config.kv_connector == "ElasticNixlConnector"
    cls = KVConnectorFactory.get_connector_class(vc.kv_transfer_config)
    assert not cls.supports_sleep_mode(vc.kv_transfer_config)
    # The harness shares one ModelConfig between configs: put it back.
    vc.model_config.enable_sleep_mode = True
    try:
        with pytest.raises(ValueError, match="does not support sleep mode"):
            vc._verify_kv_transfer_compat()
    finally:
        vc.model_config.enable_sleep_mode = False


def test_mapping_epochs_do_not_bump_registration_generation(
    make_engine: Callable[..., Any],
) -> None:
    """A new mapping epoch is followed by a refresh, not a re-handshake: the
    generation a consumer compares stays put while the epoch moves."""
    prod = make_engine("kv_producer", "p-gen", virtual_blocks=V, physical_blocks=P)
    cons = make_engine("kv_consumer", "d-gen", virtual_blocks=V, physical_blocks=P)
    first = prod.prefill("r1", [1, 2, 3])
    prod.step()
    cons.submit("r1", first, [10, 11, 12])
    run_until(prod, cons, "r1")
    w = cons.worker.connector_worker
    agent = w.peers.any_rank("p-gen").agent_name

    prod.allocator.map_blocks(range(12_000, 12_004))
    prod.step()
    second = prod.prefill("r2", list(range(12_000, 12_004)))
    prod.step()
    assert second[EPOCH_PARAM] > first[EPOCH_PARAM]
    gen = releases.registration_generation_param(second)
    assert gen == releases.registration_generation_param(first)
    if releases.HAS_REGISTRATION_GENERATION:
        assert gen is not None
    else:
        assert releases.REGISTRATION_GENERATION_PARAM not in second

    cons.submit("r2", second, [20, 21, 22, 23])
    run_until(prod, cons, "r2")
    assert cons.verify("r2", [20, 21, 22, 23]) == []
    assert w.elastic_stats.refreshes == 1
    # The same peer, refreshed in place: not torn down and handshaken again.
    assert w.peers.any_rank("p-gen").agent_name == agent
    assert "p-gen" in w._remote_agents


@pytest.mark.skipif(
    not releases.HAS_REGISTRATION_GENERATION,
    reason="this vLLM has no registration generation",
)
@pytest.mark.parametrize("bad", [-1, "2", 1.5])
def test_bad_registration_generation_is_refused_at_the_boundary(bad: object) -> None:
    params = {
        "remote_engine_id": "p",
        "remote_request_id": "r",
        "remote_host": "h",
        "remote_port": 1234,
        "remote_block_ids": [[1]],
        releases.REGISTRATION_GENERATION_PARAM: bad,
    }
    with pytest.raises(ValueError, match="remote_registration_generation"):
        parse_consumer_params(params, "req")
    params[releases.REGISTRATION_GENERATION_PARAM] = 3
    assert parse_consumer_params(params, "req").remote_registration_generation == 3


def test_vanilla_peers_are_offered_what_they_can_prep() -> None:
    """Two adjacent registrations: vLLM 0.32 preps a descriptor per block and
    may address both; 0.33 preps one strided row per region, which NIXL only
    accepts inside one registration, so only the first is offered."""
    spans = [(1 << 20, 1 << 16), (1 << 20 | 1 << 16, 1 << 16)]
    coverage = releases.vanilla_peer_coverage(list(reversed(spans)))
    if releases.PREPS_STRIDED_DESCS:
        assert coverage == spans
    else:
        assert coverage == [(1 << 20, 1 << 17)]


def test_strided_descriptor_detection_matches_the_connector_version() -> None:
    assert (releases.NIXL_CONNECTOR_VERSION >= 15) == releases.PREPS_STRIDED_DESCS
