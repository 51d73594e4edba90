"""The one duration grammar, wherever a duration is typed: policies, expressions, CLI options, --since."""

from __future__ import annotations

import argparse
import time

import pytest

from edgefleet.policy.expr import ExprError, parse
from edgefleet.runtime.durations import POLICY_UNITS, parse_duration
from edgefleet.runtime.settings import duration_arg
from hub.cli.format import moment as _since

VALID = [  # (text, seconds): valid everywhere a duration is written
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0),
    (" 2m ", 120.0), ("168h", 604800.0),
]
CLI_ONLY = [("7d", 604800.0), ("0.5d", 43200.0)]  # days: on the command line, not in a policy
INVALID = ["", "5", "5 minutes", "5 min", "m", "5q", "5M", "1h30m", "-5s", ".5s", "5s ago", "1e3s"]


@pytest.mark.parametrize(("text", "seconds"), VALID + CLI_ONLY)
def test_the_grammar(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "seconds"), VALID)
def test_a_policy_takes_units_up_to_hours(text: str, seconds: float) -> None:
    assert parse_duration(text, POLICY_UNITS) == seconds


@pytest.mark.parametrize("text", INVALID)
def test_anything_else_is_refused_in_one_sentence(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as caught:
        parse_duration(text)
    assert str(caught.value) == f"{text!r} is not a duration: use a number and a unit, e.g. 500ms, 30s, 5m, 1h or 7d"


@pytest.mark.parametrize(("text", "_seconds"), CLI_ONLY)
def test_days_are_refused_in_a_policy_naming_its_units(text: str, _seconds: float) -> None:
    with pytest.raises(ValueError, match=r"is not a duration: use a number and a unit, e\.g\. 500ms, 30s, 5m or 1h$"):
        parse_duration(text, POLICY_UNITS)


@pytest.mark.parametrize(("text", "seconds"), [*VALID, *CLI_ONLY, ("90", 90.0), ("2.5", 2.5), ("1e3", 1000.0)])
def test_a_cli_option_takes_a_duration_or_seconds(text: str, seconds: float) -> None:
    assert duration_arg(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "1h30m", "soon"])
def test_a_bad_cli_duration_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        duration_arg(text)


@pytest.mark.parametrize(("text", "ago"), [("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("7d", 604800.0),
                                           ("1.5h", 5400.0), ("500ms", 0.5)])
def test_since_takes_an_age_as_a_duration(text: str, ago: float) -> None:
    before = time.time()
    moment = _since(text)
    assert before - ago - 1 <= moment <= time.time() - ago


@pytest.mark.parametrize(("text", "moment"), [("1700000000", 1700000000.0),
                                              ("2026-11-21T16:00:00Z", 1795276800.0),
                                              ("2026-11-21T16:00:00", 1795276800.0)])
def test_since_takes_epoch_seconds_and_iso_times_as_before(text: str, moment: float) -> None:
    assert _since(text) == moment


def test_since_refuses_the_rest_in_one_sentence() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a time: use ISO 8601, epoch seconds, or an age"):
        _since("yesterday")


@pytest.mark.parametrize(("window", "seconds"), [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
                                                 ("1e1s", 10.0)])
def test_an_expression_window_is_a_policy_duration(window: str, seconds: float) -> None:
    assert parse(f"avg(t, {window}) > 1").windows == {("t", seconds)}


def test_an_expression_refuses_days_naming_the_units() -> None:
    with pytest.raises(ExprError, match="'1d' is not a number or a duration: durations end in ms, s, m or h"):
        parse("avg(t, 1d) > 1")
