"""Report by exception: deadbands, heartbeats, aggregation, the P7 ratio, and [report] validation."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest

from edge_agent.sense.report import ReportFilter
from edge_agent.sense.sensors import Reading, SimSensor, device_seed
from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import ReportSpec, load_profile

T0 = 1_700_000_000.0


def spec(**fields: object) -> ReportSpec:
    return ReportSpec(**fields)  # type: ignore[arg-type]  # test shorthand over the struct's keywords


def values(readings: list[Reading]) -> list[float]:
    return [r.value for r in readings]


def series(metric: str, points: list[tuple[float, float]]) -> list[Reading]:
    return [Reading(metric, T0 + ts, value) for ts, value in points]


# --- deadband and heartbeat -------------------------------------------------------------


def test_with_nothing_configured_the_list_comes_back_unchanged() -> None:
    readings = series("a", [(0, 1.0), (1, 1.0), (2, 1.0)])
    report = ReportFilter(ReportSpec())
    assert report.filter(readings) is readings
    assert (report.received, report.passed) == (3, 3)


def test_the_first_reading_of_each_metric_passes() -> None:
    report = ReportFilter(spec(default_deadband=10.0, heartbeat_s=0.0))
    out = report.filter([Reading("a", T0, 1.0), Reading("b", T0, 1.0), Reading("a", T0 + 1, 2.0)])
    assert [r.metric for r in out] == ["a", "b"]


def test_changes_inside_the_deadband_are_suppressed_measured_from_the_last_sent_value() -> None:
    report = ReportFilter(spec(default_deadband=0.5, heartbeat_s=0.0))
    raw = series("a", [(0, 10.0), (1, 10.3), (2, 10.5), (3, 10.6), (4, 10.2), (5, 11.2), (6, 10.8)])
    # 10.3, 10.5 (exactly the band) stay quiet; 10.6 moved 0.6 from the 10.0 sent; then 11.2 from 10.6.
    assert values(report.filter(raw)) == [10.0, 10.6, 11.2]


def test_slow_drift_is_caught_once_it_adds_up() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=0.0))
    raw = [Reading("a", T0 + i, 0.1 * i) for i in range(100)]
    out = report.filter(raw)
    assert len(out) == 10  # a reading each time the drift since the last one sent exceeds 1.0
    assert all(1.0 < b.value - a.value <= 1.1 + 1e-9 for a, b in itertools.pairwise(out))


def test_a_heartbeat_sends_an_unchanged_metric_at_least_that_often() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=60.0))
    raw = [Reading("a", T0 + i, 5.0) for i in range(0, 301, 10)]
    assert [r.ts - T0 for r in report.filter(raw)] == [0, 60, 120, 180, 240, 300]


def test_a_change_restarts_the_heartbeat() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=60.0))
    raw = series("a", [(0, 5.0), (30, 7.0), (60, 7.0), (89, 7.0), (90, 7.0)])
    assert [r.ts - T0 for r in report.filter(raw)] == [0, 30, 90]


def test_state_carries_across_batches() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=0.0))
    assert values(report.filter(series("a", [(0, 1.0)]))) == [1.0]
    assert report.filter(series("a", [(1, 1.5)])) == []
    assert values(report.filter(series("a", [(2, 2.5)]))) == [2.5]


def test_a_per_metric_deadband_overrides_the_default() -> None:
    report = ReportFilter(spec(default_deadband=5.0, deadband={"fine": 0.1, "raw": 0.0}, heartbeat_s=0.0))
    raw = [
        *series("fine", [(0, 1.0), (1, 1.05), (2, 1.2)]),
        *series("coarse", [(0, 1.0), (1, 4.0), (2, 7.0)]),
        *series("raw", [(0, 1.0), (1, 1.0), (2, 1.0)]),  # deadband 0: the filter is off for it
    ]
    out = report.filter(raw)
    assert [(r.metric, r.value) for r in out] == [
        ("fine", 1.0), ("fine", 1.2), ("coarse", 1.0), ("coarse", 7.0), ("raw", 1.0), ("raw", 1.0), ("raw", 1.0),
    ]


def test_a_per_metric_deadband_alone_turns_filtering_on() -> None:
    report = ReportFilter(spec(deadband={"a": 1.0}, heartbeat_s=0.0))
    out = report.filter([*series("a", [(0, 1.0), (1, 1.5)]), *series("b", [(0, 1.0), (1, 1.0)])])
    assert [(r.metric, r.value) for r in out] == [("a", 1.0), ("b", 1.0), ("b", 1.0)]


def test_nan_always_passes_and_so_does_the_value_after_it() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=0.0))
    out = report.filter(series("a", [(0, 1.0), (1, math.nan), (2, 1.0), (3, 1.2)]))
    assert len(out) == 3
    assert math.isnan(out[1].value)
    assert out[2].value == 1.0


def test_a_clock_step_backwards_sends_one_reading_and_rebases_the_heartbeat() -> None:
    report = ReportFilter(spec(default_deadband=1.0, heartbeat_s=60.0))
    out = report.filter(series("a", [(0, 1.0), (-3600, 1.0), (-3590, 1.0), (-3540, 1.0)]))
    assert [r.ts - T0 for r in out] == [0, -3600, -3540]


# --- aggregation ------------------------------------------------------------------------


def test_aggregation_emits_the_mean_of_each_window_at_its_end() -> None:
    report = ReportFilter(spec(aggregate_s=10.0))
    raw = series("a", [(0, 1.0), (3, 2.0), (9.9, 3.0), (10, 10.0), (15, 20.0), (31, 5.0)])
    out = report.filter(raw)
    # T0 is a multiple of 10, so windows are [T0, T0+10), [T0+10, T0+20), ...; an empty one sends nothing.
    assert out == [Reading("a", T0 + 10, 2.0), Reading("a", T0 + 20, 15.0)]
    assert report.flush(T0 + 39.9) == []  # the window [30, 40) is still open
    assert report.flush(T0 + 40) == [Reading("a", T0 + 40, 5.0)]
    assert report.flush() == []


def test_aggregation_keeps_metrics_apart_and_flush_without_a_time_closes_everything() -> None:
    report = ReportFilter(spec(aggregate_s=60.0))
    start = T0 + 40  # a multiple of 60
    raw = [Reading(m, start + i, v + i) for i in range(60) for m, v in (("a", 0.0), ("b", 100.0))]
    assert report.filter(raw) == []
    assert report.flush() == [Reading("a", start + 60, 29.5), Reading("b", start + 60, 129.5)]


def test_aggregation_comes_before_the_deadband() -> None:
    report = ReportFilter(spec(aggregate_s=10.0, default_deadband=1.0, heartbeat_s=0.0))
    # Noise of +-5 inside each window averages to 20, then 20.5, then 22: only the first and last are news.
    raw = [Reading("a", T0 + w * 10 + i, base + (5.0 if i % 2 else -5.0)) for w, base in
           enumerate((20.0, 20.5, 22.0, 0.0)) for i in range(10)]
    assert values(report.filter(raw)) == [20.0, 22.0]


# --- speed and the P7 ratio -------------------------------------------------------------


def test_filter_throughput() -> None:
    batch = [Reading(f"sig{i % 4}", T0 + i * 0.1, 20.0 + math.sin(i / 100)) for i in range(100_000)]
    rates = {}
    for name, report_spec in (("off", ReportSpec()), ("deadband", spec(default_deadband=0.5, heartbeat_s=60.0))):
        report = ReportFilter(report_spec)
        started = time.perf_counter()
        for _ in range(10):
            report.filter(batch)
        rates[name] = 10 * len(batch) / (time.perf_counter() - started)
    print(f"\nReportFilter throughput: off {rates['off']:,.0f}/s, deadband 0.5 {rates['deadband']:,.0f}/s")
    assert rates["off"] > 1_000_000
    assert rates["deadband"] > 300_000  # about 2-4 M/s when the machine is quiet


def test_p7_the_sim_profile_sends_ten_times_fewer_readings_within_its_deadband() -> None:
    profile = load_profile("sim", [(["sim", "rate_hz"], 10.0)])
    sensor = SimSensor(profile.sim, device_seed("dev-p7"), 1.0)
    report = ReportFilter(profile.report)
    sensor.read(T0)
    raw: list[Reading] = []
    sent: list[Reading] = []
    for second in range(1, 601):  # ten simulated minutes, read once a second
        batch = sensor.read(T0 + second)
        raw.extend(batch)
        sent.extend(report.filter(batch))
    ratio = len(raw) / len(sent)
    print(f"\nP7: {len(raw)} raw readings, {len(sent)} sent, {ratio:.1f}x fewer")
    assert len(raw) == 600 * 10 * profile.sim.signals
    assert ratio >= 10
    # What the hub holds (the last value sent) is never further from the truth than the deadband.
    held: dict[str, float] = {}
    sent_at = {(r.metric, r.ts) for r in sent}
    for reading in raw:
        if (reading.metric, reading.ts) in sent_at:
            held[reading.metric] = reading.value
        assert abs(reading.value - held[reading.metric]) <= profile.report.default_deadband


# --- [report] in a profile --------------------------------------------------------------

PROFILE = """\
name = "board-x"
description = "a test board"

[budgets]
disk_mb = 32

[[sensors]]
kind = "system"
metrics = ["cpu_percent", "load1"]

[[sensors]]
kind = "thermal"

[[sensors]]
kind = "sim"

[report]
"""


def load(tmp_path: Path, report: str) -> ReportSpec:
    (tmp_path / "board-x.toml").write_text(PROFILE + report, encoding="utf-8")
    return load_profile("board-x", search=[tmp_path]).report


def refused(tmp_path: Path, report: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, report)
    assert info.value.path == str(tmp_path / "board-x.toml")
    return str(info.value)


def test_a_full_report_table_loads(tmp_path: Path) -> None:
    report = load(tmp_path, (
        "default_deadband = 0.5\nheartbeat_s = 120\naggregate_s = 10\n"
        "deadband = { cpu_percent = 5, sig3 = 0.25, thermal_cpu_thermal = 1, load1 = 0 }\n"
    ))
    assert report == ReportSpec(
        default_deadband=0.5, heartbeat_s=120.0, aggregate_s=10.0,
        deadband={"cpu_percent": 5.0, "sig3": 0.25, "thermal_cpu_thermal": 1.0, "load1": 0.0},
    )


def test_a_profile_without_a_report_table_sends_everything(tmp_path: Path) -> None:
    (tmp_path / "board-x.toml").write_text(PROFILE.removesuffix("[report]\n"), encoding="utf-8")
    assert ReportFilter(load_profile("board-x", search=[tmp_path]).report).passthrough


@pytest.mark.parametrize("name", ["generic-linux", "rpi-4", "rpi-5", "rpi-zero-2w", "sim"])
def test_every_shipped_profile_filters(name: str) -> None:
    report = load_profile(name).report
    assert not ReportFilter(report).passthrough
    assert report.heartbeat_s > report.aggregate_s


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("default_deadband = -1", "report.default_deadband"),
        ("default_deadband = nan", "report.default_deadband"),
        ("default_deadband = inf", "report.default_deadband must be a finite number"),
        ('default_deadband = "small"', "report.default_deadband"),
        ("heartbeat_s = -5", "report.heartbeat_s"),
        ("heartbeat_s = inf", "report.heartbeat_s"),
        ("aggregate_s = -1", "report.aggregate_s"),
        ("aggregate_s = 100000", "report.aggregate_s"),
        ("deadband = { sig0 = -0.5 }", "report.deadband.sig0 = -0.5: must be a finite number >= 0"),
        ("deadband = { sig0 = nan }", "report.deadband.sig0 = nan"),
        ('deadband = { sig0 = "wide" }', "report.deadband"),
        ('deadband = { "cpu-percent" = 1 }', "'cpu-percent' is not a metric name"),
        ('deadband = { "" = 1 }', "'' is not a metric name"),
        ("deadband = { mem_used_percent = 1 }", "report.deadband.mem_used_percent: no sensor of this profile"),
        ("deadband = { cpu_prcent = 1 }", "no sensor of this profile reports 'cpu_prcent'"),
        ("deadband = { signal0 = 1 }", "signal0"),
        ("deadbands = { sig0 = 1 }", "deadbands"),
        ("default_deadband = 1\nheartbeat_s = 10\naggregate_s = 10", "heartbeat_s = 10.0 is not longer than"),
    ],
)
def test_bad_report_settings_are_refused_with_the_key_named(tmp_path: Path, report: str, expected: str) -> None:
    assert expected in refused(tmp_path, report + "\n")


def test_aggregation_without_a_deadband_may_have_any_heartbeat(tmp_path: Path) -> None:
    assert load(tmp_path, "heartbeat_s = 10\naggregate_s = 60\n").aggregate_s == 60.0


def test_a_report_override_reaches_the_profile_and_is_validated() -> None:
    assert ReportFilter(load_profile("sim", [(["report", "default_deadband"], 0.0)]).report).passthrough
    with pytest.raises(ConfigError, match=r"report\.heartbeat_s"):
        load_profile("sim", [(["report", "heartbeat_s"], -1)])
