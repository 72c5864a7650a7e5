"""The registration bench measures what it says, on small sizes."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

V, P, LAYERS = 20_000, 64, 2
MiB = 1 << 20


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    from elastic_nixl.tools.bench.registration import run_registration

    return run_registration(
        virtual_blocks=V,
        physical_blocks=P,
        layers=LAYERS,
        chunk_bytes=2 * MiB,
        repeats=1,
        vanilla_elastic=False,  # child processes: see the slow test
    )


def _row(report: dict[str, Any], connector: str, static: bool) -> dict[str, Any]:
    rows = [
        r
        for r in report["rows"]
        if r["connector"] == connector and r["memory"].startswith("static") == static
    ]
    assert len(rows) == 1, report["rows"]
    return rows[0]


def test_report_structure(report: dict[str, Any]) -> None:
    from elastic_nixl.tools.bench.registration import ELASTIC, VANILLA, format_table

    assert report["sizes"]["virtual_blocks"] == V
    assert [(r["connector"], r["memory"].split()[0]) for r in report["rows"]] == [
        (ELASTIC, "elastic"),
        (VANILLA, "static"),
        (ELASTIC, "static"),
    ]
    for r in report["rows"]:
        assert r["outcome"] == "ok", r
        assert len(r["times_ms"]) == 1 and r["time_ms"] > 0
        assert r["peak_traced_bytes"] > 0
        assert r["handshake_bytes"] > 0
        assert r["registered_after_shutdown"] == 0  # shutdown deregistered all
    table = format_table(report)
    assert table.count("\n| ") == len(report["rows"])  # one line per row
    assert "Ratios:" in table
    assert report["ratios"]["elastic_static/vanilla_static time_ms"] is not None


def test_elastic_registers_mapped_not_virtual(report: dict[str, Any]) -> None:
    from elastic_nixl.tools.bench.registration import ELASTIC

    r = _row(report, ELASTIC, static=False)
    assert r["virtual_blocks"] >= V and r["physical_blocks"] == P
    # P blocks of 4 KiB per layer fit one 2 MiB chunk per layer.
    assert r["mapped_bytes"] == LAYERS * 2 * MiB
    assert r["registered_bytes"] == r["mapped_bytes"] == r["stats_registered_bytes"]
    assert r["registered_bytes"] < r["reserved_bytes"] // 10
    assert r["registrations"] == LAYERS
    assert r["prepped_descs"] == 0  # described per request


def test_static_baseline_matches_vanilla(report: dict[str, Any]) -> None:
    from elastic_nixl.tools.bench.registration import ELASTIC, VANILLA

    vanilla = _row(report, VANILLA, static=True)
    elastic = _row(report, ELASTIC, static=True)
    assert vanilla["registered_bytes"] == vanilla["mapped_bytes"]
    assert vanilla["prepped_descs"] == P * LAYERS
    for key in ("registered_bytes", "prepped_descs", "handshake_bytes", "regions"):
        assert elastic[key] == vanilla[key], key


def test_divisible_virtual_blocks() -> None:
    from elastic_nixl.tools.bench.registration import Sizes, divisible_virtual_blocks

    sizes = Sizes(1_000_000, 1_000, 4, 2 * MiB)
    v = divisible_virtual_blocks(sizes, page_bytes=4096)
    assert v == 1_024_000 and v % 1_000 == 0 and v % 512 == 0


@pytest.mark.slow
def test_vanilla_on_elastic_failure_is_an_outcome() -> None:
    """vLLM refuses a reservation that is no whole number of P-block segments;
    the child reports the assertion instead of ending the bench."""
    from elastic_nixl.tools.bench.registration import Sizes, vanilla_on_elastic_child

    res = vanilla_on_elastic_child(Sizes(20_000, 100, 2, 2 * MiB), repeats=1)
    assert res.virtual_blocks == 20_480  # rounded to whole 2 MiB chunks
    assert res.outcome.startswith("failed: AssertionError"), (res.outcome, res.detail)
    assert res.time_ms is None
