from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mock_nixl import MockNixlAgent, MockNixlFabric
from waiting import wait_until


@pytest.fixture
def fabric() -> MockNixlFabric:
    return MockNixlFabric()


def mock_agent(name: str, fabric: MockNixlFabric) -> MockNixlAgent:
    from nixl._api import nixl_agent_config

    # What vLLM's worker asks of a real agent.
    return MockNixlAgent(
        name, nixl_agent_config(num_threads=4, capture_telemetry=True), fabric=fabric
    )


@pytest.fixture
def make_engine(fabric: MockNixlFabric) -> Iterator[Callable[..., object]]:
    from elastic_nixl.tools.harness.engine import EngineSpec, PDEngine
    from elastic_nixl.tools.harness.vllm_objects import free_port

    engines: list[PDEngine] = []

    def make(role: str, engine_id: str, **kw: object) -> PDEngine:
        spec = EngineSpec(role, engine_id, free_port(), **kw)  # type: ignore[arg-type]
        eng = PDEngine(
            spec,
            nixl_agent=mock_agent(engine_id, fabric),
            staging_agent_factory=lambda name: mock_agent(name, fabric),
        )
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()


def run_until(producer, consumer, req_id: str, timeout_s: float = 30.0) -> set[str]:
    """Step both engines until the consumer reports ``req_id`` received;
    returns the ids it reported received in that step."""

    def received() -> set[str] | None:
        _, recving = consumer.step()
        producer.step()
        return recving if req_id in recving else None

    return wait_until(
        received, timeout_s, interval_s=0.005, what=f"{req_id} to finish receiving"
    )


@pytest.fixture
def cuda_torch() -> Any:
    """torch with CUDA initialised; the GPU tests skip without a device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    torch.cuda.init()
    return torch
