"""The shared wait helper (tests/waiting.py)."""

from __future__ import annotations

import itertools

import pytest

from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: [n] if (n := next(calls)) >= 3 else []) == [3]


def test_times_out_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="waiting for the sky to fall"):
        wait_until(lambda: False, timeout_s=0.01, what="the sky to fall")
