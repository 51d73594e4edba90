"""The rule expression language: what conditions mean, and every way a bad one is refused with its place."""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Sequence

import pytest

from edgefleet.policy.expr import MAX_EXPR_CHARS, MAX_NESTING, Expr, ExprError, parse
from edgefleet.runtime.durations import parse_duration

NOW = 1_700_000_000.0


class FakeEnv:
    """Readings per metric, oldest first, and a fixed clock."""

    def __init__(self, series: dict[str, list[tuple[float, float]]] | None = None, now: float = NOW) -> None:
        self.series = {metric: sorted(points) for metric, points in (series or {}).items()}
        self.clock = now

    def latest(self, metric: str) -> tuple[float, float] | None:
        points = self.series.get(metric)
        return points[-1] if points else None

    def window(self, metric: str, seconds: float) -> Sequence[tuple[float, float]]:
        points = self.series.get(metric, [])
        start = bisect.bisect_left(points, (self.clock - seconds, float("-inf")))
        end = bisect.bisect_right(points, (self.clock, float("inf")))
        return points[start:end]

    def now(self) -> float:
        return self.clock


def ago(*pairs: tuple[float, float]) -> list[tuple[float, float]]:
    """(seconds ago, value) → (ts, value)."""
    return [(NOW - age, value) for age, value in pairs]


def value(source: str, env: FakeEnv | None = None) -> float | bool | None:
    return parse(source).evaluate(env or FakeEnv())


# --- meaning --------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("1 - 2 - 3", -4),
    ("8 / 4 / 2", 1),
    ("-2 * 3", -6),
    ("-(2 + 3) * 2", -10),
    ("- -2", 2),
    ("2 - -3", 5),
    ("2--3", 5),
    ("10 / 4", 2.5),
    ("0.5 * 4", 2),
    ("1e3 / 10", 100),
    ("1 + 2 > 2", True),
    ("-1 < 0", True),
    ("not 1 > 2 and 2 > 1", True),  # (not F) and T
    ("1 > 2 or 2 > 1 and 0 > 1", False),  # F or (T and F): and binds tighter than or
    ("not (1 > 2 or 2 > 1)", False),
    ("2 >= 2 and 2 <= 2 and 2 == 2 and 1 != 2", True),
    ("(1 > 2) == (3 > 4)", True),
])
def test_precedence_and_arithmetic(source: str, expected: float | bool) -> None:
    assert value(source) == expected


def test_a_bare_metric_is_its_latest_value_and_minus_between_names_is_subtraction() -> None:
    env = FakeEnv({"a": ago((10, 1.0), (1, 7.0)), "b": ago((1, 2.0)), "disk.root": ago((1, 40.0))})
    assert value("a", env) == 7.0
    assert value("a-b", env) == 5.0  # '-' is never part of a name
    assert value("disk.root / 2", env) == 20.0  # '.' is
    assert value("last(a)", env) == 7.0
    assert value("age(a)", env) == pytest.approx(1.0)


def test_window_functions_see_only_readings_inside_the_window() -> None:
    env = FakeEnv({"t": ago((120, 1000.0), (25, 70.0), (15, 80.0), (5, 90.0), (0, 60.0))})
    assert value("avg(t, 30s)", env) == 75.0
    assert value("min(t, 30s)", env) == 60.0
    assert value("max(t, 30s)", env) == 90.0
    assert value("count(t, 30s)", env) == 4
    assert value("delta(t, 30s)", env) == -10.0  # last minus first
    assert value("count(t, 10s)", env) == 2
    assert value("count(t, 500ms)", env) == 1
    assert value("max(t, 5m)", env) == 1000.0
    assert value("abs(delta(t, 30s))", env) == 10.0
    assert value("avg(t, 30s) > 74 and count(t, 1h) == 5", env) is True


def test_durations_become_the_windows_the_engine_must_keep() -> None:
    expr = parse("avg(a, 500ms) > 1 or max(a, 5m) > 2 or count(b, 1h) > 3 or delta(c, 1.5s) > 0 or last(d) > 0")
    assert expr.windows == {("a", 0.5), ("a", 300.0), ("b", 3600.0), ("c", 1.5)}
    assert expr.longest_window == 3600.0
    assert expr.metrics == {"a", "b", "c", "d"}
    assert expr.is_condition
    assert parse("age(x)").windows == frozenset()
    assert parse("age(x)").longest_window == 0.0
    assert [parse_duration(text) for text in ("500ms", "30s", "5m", "1h", "2.5s")] == [0.5, 30, 300, 3600, 2.5]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("5 minutes")


def test_an_expr_is_immutable_and_equal_by_its_source() -> None:
    expr = parse("a > 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        expr.source = "b > 1"  # type: ignore[misc]  # the point: assigning must fail
    assert expr == parse("a > 1")
    assert expr.source == "a > 1"


# --- missing data ---------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("ghost", None),
    ("ghost + 1", None),
    ("-ghost", None),
    ("abs(ghost)", None),
    ("ghost > 1", None),
    ("ghost == ghost", None),
    ("not ghost > 1", None),
    ("avg(ghost, 30s)", None),
    ("min(ghost, 30s)", None),
    ("delta(ghost, 30s)", None),
    ("age(ghost)", None),
    ("last(ghost)", None),
    ("count(ghost, 30s)", 0),
    ("avg(stale, 30s) > 1", None),  # readings exist, none inside the window
    ("ghost > 1 and 2 > 1", False),  # and/or treat an unknown side as false...
    ("2 > 1 and ghost > 1", False),
    ("ghost > 1 or 2 > 1", True),
    ("ghost > 1 or ghost < 1", False),
    ("not (ghost > 1 and 2 > 1)", True),  # ...so negating their result is not unknown
    ("1 / 0", None),
    ("x / (x - x)", None),
    ("0 / 1", 0),
])
def test_missing_data_gives_none_and_never_raises(source: str, expected: float | bool | None) -> None:
    env = FakeEnv({"x": ago((1, 3.0)), "stale": ago((3600, 5.0))})
    result = value(source, env)
    assert result is None if expected is None else result == expected


def test_odd_values_from_the_environment_give_none_instead_of_raising() -> None:
    env = FakeEnv()
    env.series["s"] = [(NOW, "hot")]  # type: ignore[list-item]  # the point: not a float
    assert parse("s * 2 > 1").evaluate(env) is None
    assert parse("avg(s, 1m) > 1").evaluate(env) is None


# --- refusals, each with its place ----------------------------------------------------------


@pytest.mark.parametrize(("source", "col", "message"), [
    # an expression cannot reach Python
    ("__import__('os')", 1, "'__' is not allowed"),
    ("cpu.__class__", 5, "'__' is not allowed"),
    ("open('x')", 1, "unknown function 'open'"),
    ("os.system(1)", 1, "unknown function 'os.system'"),
    ("[1][0]", 1, "no lists or indexing"),
    ("'a'", 1, "strings are not allowed"),
    ('x > "a"', 5, "strings are not allowed"),
    ("lambda: 1", 1, "'lambda' is a Python keyword"),
    ("import os", 1, "'import' is a Python keyword"),
    ("x if y else z", 3, "'if' is a Python keyword"),
    ("True", 1, "Python keyword"),
    ("x ** 2", 3, "no power operator"),
    ("avg(x, 30s).real", 12, "no attribute access"),
    ("(avg)(x)", 2, "'avg' is a function"),
    ("avg(x, 30s)(1)", 12, "only a function name can be called"),
    ("(x)(1)", 4, "only a function name can be called"),
    ("x, y", 2, "',' is only allowed between a function's arguments"),
    ("x = 1", 3, "compare with '=='"),
    ("x && y", 3, "use 'and'"),
    ("{1: 2}", 1, "no dicts"),
    ("x @ y", 3, "unexpected character '@'"),
    # arity and argument kinds
    ("avg(x)", 1, "avg() takes 2 arguments, got 1"),
    ("last(x, 30s)", 1, "last() takes 1 argument, got 2"),
    ("abs()", 1, "abs() takes 1 argument, got 0"),
    ("avg(x + 1, 30s)", 5, "first argument must be a metric name"),
    ("avg(x, 30)", 8, "window must be a duration like 30s or 5m, not a number"),
    ("avg(x, 0s)", 8, "must be longer than 0"),
    ("avg(x, 48h)", 8, "at most 24h"),
    ("avg(x, 30s,)", 12, "unexpected ')'"),
    ("x > 30s", 5, "only allowed as a window argument"),
    ("5m", 1, "only allowed as a window argument"),
    ("abs(30s)", 5, "only allowed as a window argument"),
    ("5q > 1", 1, "durations end in ms, s, m or h"),
    # types
    ("x and y > 1", 1, "'and' needs a condition"),
    ("not x", 5, "'not' needs a condition"),
    ("(x > 1) + 1", 2, "'+' needs a number"),
    ("(x > 1) < 2", 2, "'<' needs a number"),
    ("1 < x < 3", 7, "comparisons cannot be chained"),
    # structure
    ("", 1, "empty expression"),
    ("   ", 1, "empty expression"),
    ("x y", 3, "unexpected 'y'"),
    ("x )", 3, "unmatched ')'"),
    ("(x", 3, "ends too early: expected ')'"),
    ("x >", 4, "ends too early"),
    ("x.", 2, "cannot end with '.'"),
    ("a..b", 2, "contain '..'"),
    ("avg > 1", 1, "'avg' is a function"),
])
def test_refusals_say_what_and_where(source: str, col: int, message: str) -> None:
    with pytest.raises(ExprError) as caught:
        parse(source)
    assert message in caught.value.message
    assert (caught.value.line, caught.value.col) == (1, col)
    assert str(caught.value) == f"line 1, column {col}: {caught.value.message}"
    assert isinstance(caught.value, ValueError)


def test_positions_are_relative_to_the_policy_file() -> None:
    with pytest.raises(ExprError) as caught:
        parse("x > 1 and y ** 2", line=7, col=9)
    assert (caught.value.line, caught.value.col) == (7, 9 + 12)
    with pytest.raises(ExprError) as caught:  # a multi-line TOML string: columns restart on each line
        parse("x > 1\n  and open(1)", line=7, col=9)
    assert (caught.value.line, caught.value.col) == (8, 7)


def test_unknown_metrics_are_refused_only_when_the_known_ones_are_given() -> None:
    with pytest.raises(ExprError, match="unknown metric 'cpu_tmp'; did you mean 'cpu_temp'") as caught:
        parse("load1 > 2 and avg(cpu_tmp, 30s) > 75", metrics={"cpu_temp", "load1"})
    assert caught.value.col == 19
    assert parse("anything > 1", metrics=None).metrics == {"anything"}


def test_limits_on_length_and_nesting() -> None:
    with pytest.raises(ExprError, match=f"the limit is {MAX_EXPR_CHARS}"):
        parse("x + " * MAX_EXPR_CHARS + "x")
    with pytest.raises(ExprError, match=f"deeper than {MAX_NESTING}"):
        parse("(" * (MAX_NESTING + 1) + "x" + ")" * (MAX_NESTING + 1))
    with pytest.raises(ExprError, match=f"deeper than {MAX_NESTING}"):
        parse(" + ".join(["x"] * (MAX_NESTING + 2)))
    with pytest.raises(ExprError, match=f"deeper than {MAX_NESTING}"):
        parse("-" * (MAX_NESTING + 1) + "x")
    assert value("(" * 10 + "1" + ")" * 10) == 1


# --- speed ----------------------------------------------------------------------------------


def test_a_typical_condition_evaluates_in_microseconds(capsys: pytest.CaptureFixture[str]) -> None:
    env = FakeEnv({"cpu_temp": [(NOW - 30 + i, 70.0 + i % 10) for i in range(31)], "load1": ago((1, 3.0))})
    expr: Expr = parse("avg(cpu_temp, 30s) > 75 and load1 > 2")
    assert expr.evaluate(env) is False or expr.evaluate(env) is True
    rounds = 20_000
    best = float("inf")
    for _ in range(5):  # best of five: the figure is the code's cost, not the machine's other load
        start = time.perf_counter()
        for _ in range(rounds):
            expr.evaluate(env)
        best = min(best, (time.perf_counter() - start) / rounds)
    with capsys.disabled():
        print(f"\n  evaluate {expr.source!r} with a 31-reading window: {best * 1e6:.2f} µs")
    assert best < 20e-6
