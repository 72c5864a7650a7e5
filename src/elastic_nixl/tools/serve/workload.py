"""Prompts, the disaggregated-vs-whole comparison, and its figures.

:func:`make_prompts` draws seeded ASCII prompts (the byte tokenizer makes
the token count the byte count). :class:`Comparison` sends each prompt
through the P/D flow (:class:`~elastic_nixl.tools.serve.client.PDClient`)
and the same prompt served whole, in waves of a given concurrency (the
baseline wave runs alone, after its P/D wave, at the same concurrency, so
the two TTFTs see the same load), and compares the greedy token ids.
:class:`Summary` turns the outcomes and vLLM's metrics into the figures the
demo prints and the benchmark records.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from elastic_nixl.tools.serve.client import (
    Completion,
    PDClient,
    PDResult,
    RequestFailed,
)
from elastic_nixl.tools.serve.metrics import NixlMetrics, transfer_log_lines

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her it an "
    "were are which this be or has had not but they their have one all new "
    "more been two would who will first after other also its into some time "
    "cache block prefill decode token layer memory page transfer engine"
)
_WORDS = _VOCABULARY.split()


def make_prompts(
    n: int, seed: int, min_len: int, max_len: int, unique: bool = True
) -> list[str]:
    """``n`` seeded word-salad prompts of ``min_len``..``max_len`` bytes.

    With ``unique`` each prompt starts with its own index, so no two share a
    first block (prefix caching is off anyway; this keeps it so if it is on).
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        words = [f"#{i}:" if unique else rng.choice(_WORDS)]
        while sum(len(w) + 1 for w in words) < length:
            w = rng.choice(_WORDS)
            if rng.random() < 0.1:
                w = w.capitalize() + rng.choice(",.;:!?")
            if rng.random() < 0.05:
                w = "".join(rng.choice(string.digits) for _ in range(3))
            words.append(w)
        prompts.append(" ".join(words)[:length])
    return prompts


@dataclass
class Outcome:
    """One prompt: its P/D run, its whole run, and whether they agree."""

    index: int
    prompt: str
    wave: int
    concurrency: int
    pd: PDResult | None = None
    whole: Completion | None = None
    pd_error: str | None = None
    whole_error: str | None = None

    @property
    def prompt_bytes(self) -> int:
        return len(self.prompt.encode())

    @property
    def identical(self) -> bool:
        return (
            self.pd is not None
            and self.whole is not None
            and self.pd.completion.token_ids == self.whole.token_ids
            and len(self.whole.token_ids) > 0
        )

    @property
    def first_difference(self) -> int | None:
        """Index of the first differing token (None when identical or failed)."""
        if self.pd is None or self.whole is None or self.identical:
            return None
        a, b = self.pd.completion.token_ids, self.whole.token_ids
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return i
        return min(len(a), len(b))

    def describe_mismatch(self) -> str:
        if self.pd_error or self.whole_error:
            return f"request {self.index}: " + (self.pd_error or self.whole_error or "")
        assert self.pd is not None and self.whole is not None
        i = self.first_difference
        return (
            f"request {self.index} ({self.prompt_bytes} prompt bytes): first "
            f"difference at token {i}: disaggregated "
            f"{self.pd.completion.token_ids[: i + 4] if i is not None else []} vs "
            f"whole {self.whole.token_ids[: i + 4] if i is not None else []}"
        )


Progress = Callable[[str], None]


class Comparison:
    """Run prompts through P/D and whole, wave by wave, and keep outcomes."""

    def __init__(
        self,
        client: PDClient,
        max_tokens: int,
        whole_url: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.whole_url = whole_url
        self.progress = progress or (lambda _msg: None)
        self.outcomes: list[Outcome] = []

    def _pd(self, o: Outcome) -> None:
        try:
            o.pd = self.client.disaggregated(o.prompt, self.max_tokens)
        except RequestFailed as e:
            o.pd_error = str(e)

    def _whole(self, o: Outcome) -> None:
        try:
            o.whole = self.client.whole(o.prompt, self.max_tokens, url=self.whole_url)
        except RequestFailed as e:
            o.whole_error = str(e)

    def run_wave(self, prompts: Sequence[str], start_index: int = 0) -> list[Outcome]:
        """All ``prompts`` at once through P/D, then all at once whole."""
        wave = 1 + (max((o.wave for o in self.outcomes), default=0))
        batch = [
            Outcome(start_index + i, p, wave, len(prompts))
            for i, p in enumerate(prompts)
        ]
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            list(pool.map(self._pd, batch))
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            list(pool.map(self._whole, batch))
        self.outcomes.extend(batch)
        return batch

    def run(self, prompts: Sequence[str], waves: Sequence[int]) -> list[Outcome]:
        """``waves`` gives each wave's concurrency (1 = one request alone);
        the prompts are consumed in order."""
        i = 0
        for size in waves:
            if i >= len(prompts):
                break
            chunk = prompts[i : i + size]
            batch = self.run_wave(chunk, start_index=len(self.outcomes))
            i += len(chunk)
            ok = sum(o.identical for o in batch)
            self.progress(
                f"  {i}/{len(prompts)} requests  wave of {len(chunk)}: "
                f"{ok} identical, {len(chunk) - ok} not"
            )
        return self.outcomes


def waves_for(requests: int, sequential: int, concurrency: int) -> list[int]:
    """``sequential`` waves of 1, then waves of ``concurrency``."""
    out = [1] * min(sequential, requests)
    left = requests - len(out)
    while left > 0:
        out.append(min(concurrency, left))
        left -= out[-1]
    return out


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Summary:
    """The figures of one comparison run."""

    requests: int = 0
    identical: int = 0
    mismatched: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    kv_blocks: int = 0
    expected_kv_bytes: int = 0
    nixl_transfers: int = 0
    nixl_bytes: float = 0.0
    nixl_failed: int = 0
    nixl_xfer_ms_mean: float = math.nan
    nixl_xfer_ms_p50: float = math.nan
    nixl_xfer_ms_p99: float = math.nan
    nixl_post_ms_mean: float = math.nan
    nixl_descriptors_mean: float = math.nan
    nixl_counters: dict[str, float] = field(default_factory=dict)
    log_lines: int = 0
    log_max_p90_xfer_ms: float = math.nan
    ttft_pd_ms_p50: float = math.nan
    ttft_pd_ms_p99: float = math.nan
    ttft_whole_ms_p50: float = math.nan
    ttft_whole_ms_p99: float = math.nan
    prefill_ms_p50: float = math.nan
    total_pd_ms_p50: float = math.nan
    total_whole_ms_p50: float = math.nan
    mismatches: list[str] = field(default_factory=list)
    extra_rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.requests > 0 and self.identical == self.requests

    @classmethod
    def build(
        cls,
        outcomes: Sequence[Outcome],
        block_bytes: int,
        nixl: NixlMetrics | None = None,
        decode_log: str = "",
    ) -> Summary:
        s = cls(requests=len(outcomes))
        for o in outcomes:
            if o.identical:
                s.identical += 1
            elif o.pd_error or o.whole_error:
                s.failed += 1
                s.mismatches.append(o.describe_mismatch())
            else:
                s.mismatched += 1
                s.mismatches.append(o.describe_mismatch())
            if o.pd is not None:
                s.prompt_tokens += o.pd.prompt_tokens
                s.kv_blocks += o.pd.remote_blocks
        s.expected_kv_bytes = s.kv_blocks * block_bytes
        pd = [o.pd for o in outcomes if o.pd is not None]
        whole = [o.whole for o in outcomes if o.whole is not None]
        ms = 1e3
        s.ttft_pd_ms_p50 = percentile([p.completion.ttft_s * ms for p in pd], 50)
        s.ttft_pd_ms_p99 = percentile([p.completion.ttft_s * ms for p in pd], 99)
        s.ttft_whole_ms_p50 = percentile([w.ttft_s * ms for w in whole], 50)
        s.ttft_whole_ms_p99 = percentile([w.ttft_s * ms for w in whole], 99)
        s.prefill_ms_p50 = percentile([p.prefill_s * ms for p in pd], 50)
        s.total_pd_ms_p50 = percentile([p.completion.total_s * ms for p in pd], 50)
        s.total_whole_ms_p50 = percentile([w.total_s * ms for w in whole], 50)
        if nixl is not None:
            s.nixl_transfers = nixl.transfers
            s.nixl_bytes = nixl.bytes.total
            s.nixl_failed = nixl.failed
            s.nixl_xfer_ms_mean = nixl.xfer_time.mean * ms
            s.nixl_xfer_ms_p50 = nixl.xfer_time.quantile(0.5) * ms
            s.nixl_xfer_ms_p99 = nixl.xfer_time.quantile(0.99) * ms
            s.nixl_post_ms_mean = nixl.post_time.mean * ms
            s.nixl_descriptors_mean = nixl.descriptors.mean
            s.nixl_counters = dict(nixl.counters)
        lines = transfer_log_lines(decode_log)
        s.log_lines = len(lines)
        p90 = [ln.get("P90 xfer time (ms)", math.nan) for ln in lines]
        p90 = [x for x in p90 if not math.isnan(x)]
        s.log_max_p90_xfer_ms = max(p90) if p90 else math.nan
        return s

    def table(self) -> str:
        def f(x: float, unit: str = "") -> str:
            if math.isinf(x):
                return f"> top bucket{unit}"
            return "-" if math.isnan(x) else f"{x:,.1f}{unit}"

        rows = [
            (
                "requests (identical / mismatched / failed)",
                f"{self.requests} ({self.identical} / {self.mismatched} / "
                f"{self.failed})",
            ),
            ("prompt tokens", f"{self.prompt_tokens:,}"),
            ("KV blocks read by the decode", f"{self.kv_blocks:,}"),
            ("KV bytes (blocks x block bytes)", f"{self.expected_kv_bytes:,}"),
            (
                "NIXL transfers / bytes (vLLM metrics)",
                f"{self.nixl_transfers} / {self.nixl_bytes:,.0f}",
            ),
            ("NIXL failed transfers", f"{self.nixl_failed}"),
            (
                "NIXL xfer time mean / p50 / p99",
                f"{f(self.nixl_xfer_ms_mean)} / {f(self.nixl_xfer_ms_p50)} / "
                f"{f(self.nixl_xfer_ms_p99)} ms",
            ),
            ("NIXL post time mean", f(self.nixl_post_ms_mean, " ms")),
            ("NIXL descriptors per transfer (mean)", f(self.nixl_descriptors_mean)),
            (
                "KV Transfer log lines / max P90 xfer",
                f"{self.log_lines} / {f(self.log_max_p90_xfer_ms, ' ms')}",
            ),
            (
                "TTFT disaggregated p50 / p99",
                f"{f(self.ttft_pd_ms_p50)} / {f(self.ttft_pd_ms_p99)} ms",
            ),
            (
                "TTFT served whole p50 / p99",
                f"{f(self.ttft_whole_ms_p50)} / {f(self.ttft_whole_ms_p99)} ms",
            ),
            ("prefill round trip p50", f(self.prefill_ms_p50, " ms")),
            (
                "request time disaggregated / whole p50",
                f"{f(self.total_pd_ms_p50)} / {f(self.total_whole_ms_p50)} ms",
            ),
        ]
        for k, v in sorted(self.nixl_counters.items()):
            rows.append((k.replace("vllm:", ""), f"{v:.0f}"))
        rows += self.extra_rows
        w = max(len(k) for k, _ in rows)
        lines = [f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 30}"]
        lines += [f"{k:<{w}}  {v}" for k, v in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d
