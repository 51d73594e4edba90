"""Sensors against fake sysfs trees and controlled time; the Sampler on a real event loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from edge_agent.sense.sensors import (
    SIM_MAX_CATCHUP_S,
    SLOW_READ_S,
    Reading,
    Sampler,
    SensorError,
    SimSensor,
    SystemSensor,
    ThermalSensor,
    build_sensors,
    device_seed,
)
from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import SYSTEM_METRICS, SimSpec, load_profile

T0 = 1_700_000_000.0  # a fixed "now", so sim timestamps are reproducible
WAIT_S = 5.0  # bound on every wait for the sampler; a loaded CI machine is slow, not stuck


def fake_sysfs(root: Path, zones: dict[int, tuple[str | None, str]]) -> Path:
    """zones: number -> (type file content or None for no file, temp file content)."""
    for number, (kind, temp) in zones.items():
        zone = root / f"thermal_zone{number}"
        zone.mkdir(parents=True)
        if kind is not None:
            (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    (root / "cooling_device0").mkdir(parents=True)  # not a zone: ignored
    return root


# --- thermal ----------------------------------------------------------------------------


def test_thermal_zones_are_read_in_degrees_and_named_by_type(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {
        0: ("cpu-thermal", "47250"), 1: ("gpu thermal!", "-5000"), 10: (None, "30000"), 2: ("acpitz", "41000"),
        3: ("acpitz", "42000"),
    })
    readings = ThermalSensor(5.0, root).read(T0)
    assert readings == [
        Reading("thermal_cpu_thermal", T0, 47.25),
        Reading("thermal_gpu_thermal_", T0, -5.0),
        Reading("thermal_acpitz", T0, 41.0),
        Reading("thermal_acpitz_3", T0, 42.0),  # a second zone of one type keeps its own name
        Reading("thermal_zone10", T0, 30.0),  # no type file: named by its number
    ]


def test_a_very_long_zone_type_is_cut_to_a_valid_metric_name(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("x" * 100, "1000"), 1: ("x" * 100, "2000")})
    names = [r.metric for r in ThermalSensor(5.0, root).read(T0)]
    assert [len(n) for n in names] == [64, 64]
    assert names[0] != names[1]


def test_an_unreadable_zone_is_skipped_while_others_report(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("cpu", "garbage"), 1: ("gpu", "40000")})
    assert ThermalSensor(5.0, root).read(T0) == [Reading("thermal_gpu", T0, 40.0)]


def test_no_readable_zone_at_all_is_a_sensor_error(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("cpu", "garbage")})
    with pytest.raises(SensorError, match="no thermal zone could be read"):
        ThermalSensor(5.0, root).read(T0)


def test_a_board_without_thermal_zones_reports_nothing_quietly(tmp_path: Path) -> None:
    assert ThermalSensor(5.0, tmp_path / "absent").read(T0) == []


def test_a_zone_that_appears_after_start_is_picked_up(tmp_path: Path) -> None:
    sensor = ThermalSensor(5.0, tmp_path / "thermal")
    assert sensor.read(T0) == []
    fake_sysfs(tmp_path / "thermal", {0: ("cpu", "40000")})
    assert sensor.read(T0 + 5) == [Reading("thermal_cpu", T0 + 5, 40.0)]


def test_thermal_values_follow_the_files(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("cpu", "40000")})
    sensor = ThermalSensor(5.0, root)
    sensor.read(T0)
    (root / "thermal_zone0" / "temp").write_text("55500\n")
    assert sensor.read(T0 + 5) == [Reading("thermal_cpu", T0 + 5, 55.5)]


# --- system -----------------------------------------------------------------------------


def test_system_metrics_are_present_and_numeric(tmp_path: Path) -> None:
    readings = SystemSensor([], tmp_path / "state-not-created-yet", 5.0).read(T0)
    by_metric = {r.metric: r for r in readings}
    # cpu_temp depends on the board; everything else is always there on Linux.
    assert SYSTEM_METRICS - {"cpu_temp"} <= set(by_metric) <= SYSTEM_METRICS
    for reading in readings:
        assert isinstance(reading.value, float)
        assert math.isfinite(reading.value)
        assert reading.ts == T0
    assert 0 <= by_metric["cpu_percent"].value <= 100 * (psutil.cpu_count() or 1)
    assert 0 < by_metric["mem_used_percent"].value < 100
    assert by_metric["disk_free_mb"].value > 0
    assert by_metric["net_bytes_recv"].value >= 0


def test_system_sensor_reports_only_the_profile_metrics(tmp_path: Path) -> None:
    readings = SystemSensor(["load1", "disk_free_mb"], tmp_path, 5.0).read(T0)
    assert [r.metric for r in readings] == ["load1", "disk_free_mb"]


def test_cpu_temp_is_skipped_silently_without_a_sensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    assert [r.metric for r in SystemSensor(["cpu_temp", "load1"], tmp_path, 5.0).read(T0)] == ["load1"]


def test_cpu_temp_prefers_the_cpu_zone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zones = {"nvme": [SimpleNamespace(current=35.0)], "cpu_thermal": [SimpleNamespace(current=61.5)]}
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: zones, raising=False)
    assert SystemSensor(["cpu_temp"], tmp_path, 5.0).read(T0) == [Reading("cpu_temp", T0, 61.5)]
    del zones["cpu_thermal"]
    assert SystemSensor(["cpu_temp"], tmp_path, 5.0).read(T0) == [Reading("cpu_temp", T0, 35.0)]


def test_an_unknown_system_metric_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="load2"):
        SystemSensor(["load2"], tmp_path, 5.0)


# --- sim --------------------------------------------------------------------------------


def sim(signals: int = 4, rate_hz: float = 10.0, seed: int = 7, interval: float = 0.1) -> SimSensor:
    return SimSensor(SimSpec(signals=signals, rate_hz=rate_hz), seed, interval)


def test_sim_returns_every_sample_due_with_exact_spacing() -> None:
    sensor = sim(signals=4, rate_hz=1000.0, interval=0.1)
    sensor.read(T0)
    readings = sensor.read(T0 + 0.1)
    assert len(readings) == 400
    assert [r.metric for r in readings[:5]] == ["sig0", "sig1", "sig2", "sig3", "sig0"]
    stamps = sorted({r.ts for r in readings})
    assert len(stamps) == 100
    assert all(b - a == pytest.approx(0.001, abs=1e-6) for a, b in itertools.pairwise(stamps))
    assert stamps[-1] <= T0 + 0.1


@pytest.mark.parametrize(("rate_hz", "seconds", "expected"), [(1.0, 10.0, 10), (10.0, 1.0, 10), (0.5, 10.0, 5)])
def test_sim_counts_follow_the_rate(rate_hz: float, seconds: float, expected: int) -> None:
    sensor = sim(signals=3, rate_hz=rate_hz, interval=1.0)
    sensor.read(T0)
    total = sum(len(sensor.read(T0 + step * 0.25)) for step in range(1, int(seconds * 4) + 1))
    assert total == expected * 3


def test_sim_has_nothing_new_until_the_next_sample_is_due() -> None:
    sensor = sim(rate_hz=1.0)
    assert len(sensor.read(T0 + 0.5)) == 4
    assert sensor.read(T0 + 0.9) == []
    assert len(sensor.read(T0 + 1.0)) == 4


def test_sim_is_deterministic_for_a_seed_whatever_the_read_pattern() -> None:
    a, b = sim(seed=device_seed("dev-1"), interval=10.0), sim(seed=device_seed("dev-1"))
    a.read(T0)
    b.read(T0)
    in_one = a.read(T0 + 10)
    in_many = [r for step in range(1, 101) for r in b.read(T0 + step * 0.1)]
    assert in_one == in_many
    other = sim(seed=device_seed("dev-2"), interval=10.0)
    other.read(T0)
    assert [r.value for r in other.read(T0 + 10)] != [r.value for r in in_one]


def test_sim_signals_vary_slowly_and_differ_from_each_other() -> None:
    sensor = sim(signals=4, rate_hz=10.0, interval=600.0)
    sensor.read(T0)
    readings = sensor.read(T0 + 600)
    series = {f"sig{i}": [r.value for r in readings if r.metric == f"sig{i}"] for i in range(4)}
    for values in series.values():
        assert len(values) == 6000
        assert max(values) - min(values) > 1.0  # it moves...
        jumps = [abs(b - a) for a, b in itertools.pairwise(values)]
        assert sum(j < 0.2 for j in jumps) > 0.99 * len(jumps)  # ...slowly, but for an occasional step
    assert len({round(v[0], 6) for v in series.values()}) == 4


def test_sim_catch_up_after_a_long_stall_is_bounded_and_counted() -> None:
    sensor = sim(signals=4, rate_hz=1000.0, interval=0.1)
    sensor.read(T0)
    readings = sensor.read(T0 + 3600)  # an hour suspended
    bound = math.ceil((0.1 + SIM_MAX_CATCHUP_S) * 1000) * 4
    assert len(readings) == bound
    assert readings[-1].ts == pytest.approx(T0 + 3600)  # the newest samples are kept
    assert sensor.skipped == 3600 * 1000 * 4 - bound
    assert len(sensor.read(T0 + 3600.1)) == 400  # and it is back to normal


def test_sim_restarts_after_the_clock_steps_far_back() -> None:
    sensor = sim(rate_hz=10.0)
    sensor.read(T0)
    assert len(sensor.read(T0 - 3600)) == 4
    assert len(sensor.read(T0 - 3600 + 1)) == 40


# --- build_sensors ----------------------------------------------------------------------


def test_build_sensors_for_the_sim_profile(tmp_path: Path) -> None:
    profile = load_profile("sim", [(["sim", "signals"], 3), (["sim", "rate_hz"], 10.0)])
    (sensor,) = build_sensors(profile, "dev-1", tmp_path)
    assert isinstance(sensor, SimSensor)
    assert sensor.name == "sim"
    sensor.read(T0)
    assert {r.metric for r in sensor.read(T0 + 1)} == {"sig0", "sig1", "sig2"}


def test_build_sensors_for_a_board_profile(tmp_path: Path) -> None:
    sensors = build_sensors(load_profile("rpi-zero-2w"), "dev-1", tmp_path)
    assert [(type(s).__name__, s.name, s.interval) for s in sensors] == [
        ("SystemSensor", "system", 10.0), ("ThermalSensor", "thermal", 10.0),
    ]
    assert {r.metric for r in sensors[0].read(T0)} == {
        "cpu_percent", "load1", "mem_used_percent", "disk_used_percent", "net_bytes_sent", "net_bytes_recv",
    }


def test_two_system_sensors_get_distinct_names(tmp_path: Path) -> None:
    text = (
        'name = "board-x"\ndescription = "d"\n[budgets]\ndisk_mb = 1\n'
        '[[sensors]]\nkind = "system"\nmetrics = ["load1"]\ninterval_s = 1.0\n'
        '[[sensors]]\nkind = "system"\nmetrics = ["disk_free_mb"]\ninterval_s = 60.0\n'
    )
    (tmp_path / "board-x.toml").write_text(text)
    sensors = build_sensors(load_profile("board-x", search=[tmp_path]), "dev-1", tmp_path)
    assert [(s.name, s.interval) for s in sensors] == [("system", 1.0), ("system-2", 60.0)]


@pytest.mark.parametrize(
    ("sensors", "message"),
    [
        ('[[sensors]]\nkind = "sim"\n[[sensors]]\nkind = "sim"\n', 'second kind = "sim"'),
        ('[[sensors]]\nkind = "thermal"\n[[sensors]]\nkind = "thermal"\n', 'second kind = "thermal"'),
        ('[[sensors]]\nkind = "system"\n[[sensors]]\nkind = "system"\nmetrics = ["load1"]\n', "both report load1"),
    ],
)
def test_sensors_that_would_report_one_metric_twice_are_refused(
    tmp_path: Path, sensors: str, message: str
) -> None:
    (tmp_path / "board-x.toml").write_text('name = "board-x"\ndescription = "d"\n[budgets]\ndisk_mb = 1\n' + sensors)
    with pytest.raises(ConfigError, match=message):
        load_profile("board-x", search=[tmp_path])


# --- the sampler ------------------------------------------------------------------------


class Progress:
    """Set on every read and every batch, so a test waits for an outcome without polling."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    def sink(self, into: Callable[[list[Reading]], object]) -> Callable[[list[Reading]], None]:
        def sink(batch: list[Reading]) -> None:
            into(batch)
            self.poke()
        return sink

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._event.clear()
                await self._event.wait()


class CountingSensor:
    def __init__(self, name: str, interval: float, progress: Progress | None = None, fail: bool = False) -> None:
        self.name = name
        self.interval = interval
        self.fail = fail
        self.reads = 0
        self._progress = progress

    def read(self, now: float) -> list[Reading]:
        self.reads += 1
        if self._progress is not None:
            self._progress.poke()
        if self.fail:
            raise OSError(5, "Input/output error")
        return [Reading(f"{self.name}_value", now, float(self.reads))]


async def test_sampler_feeds_the_sink_and_stops_cleanly_on_cancel() -> None:
    batches: list[list[Reading]] = []
    progress = Progress()
    sensor = CountingSensor("a", 0.01)
    task = asyncio.create_task(Sampler([sensor], progress.sink(batches.append)).run())
    await progress.until(lambda: len(batches) >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reads = sensor.reads
    await asyncio.sleep(0.05)
    assert sensor.reads == reads  # nothing runs after cancellation
    assert [b[0].value for b in batches[:5]] == [1.0, 2.0, 3.0, 4.0, 5.0]


async def test_sampler_survives_a_failing_sensor_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.sensors")
    seen: list[str] = []
    progress = Progress()
    good, bad = CountingSensor("good", 0.01, progress), CountingSensor("bad", 0.01, progress, fail=True)
    sampler = Sampler([bad, good], lambda batch: seen.extend(r.metric for r in batch))
    task = asyncio.create_task(sampler.run())
    await progress.until(lambda: sampler.failures["bad"] >= 5 and seen.count("good_value") >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert set(seen) == {"good_value"}
    assert sampler.failures["good"] == 0
    about_bad = [r for r in caplog.records if "sensor bad" in r.getMessage()]
    warnings = [r for r in about_bad if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Input/output error" in warnings[0].getMessage()
    assert len(about_bad) == sampler.failures["bad"]
    assert all(r.levelno == logging.DEBUG for r in about_bad if r is not warnings[0])


async def test_a_sensor_that_recovers_reports_again() -> None:
    seen: list[Reading] = []
    progress = Progress()
    flaky = CountingSensor("flaky", 0.01, progress, fail=True)
    sampler = Sampler([flaky], progress.sink(seen.extend))
    task = asyncio.create_task(sampler.run())
    await progress.until(lambda: sampler.failures["flaky"] >= 2)
    flaky.fail = False
    await progress.until(lambda: len(seen) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_set_interval_takes_effect_while_running() -> None:
    progress = Progress()
    slow, steady = CountingSensor("slow", 3600.0, progress), CountingSensor("steady", 0.01, progress)
    sampler = Sampler([slow, steady], lambda batch: None)
    task = asyncio.create_task(sampler.run())
    await progress.until(lambda: slow.reads == 1 and steady.reads >= 3)
    await asyncio.sleep(0.05)
    assert slow.reads == 1  # an hour away
    sampler.set_interval("slow", 0.01)
    await progress.until(lambda: slow.reads >= 10)
    sampler.set_interval("slow", 3600.0)
    await asyncio.sleep(0.02)
    reads = slow.reads
    await asyncio.sleep(0.1)
    assert slow.reads == reads
    assert slow.interval == 3600.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("name", "seconds", "message"), [
    ("nope", 1.0, "no sensor named 'nope'; sensors: a"),
    ("a", 0.0, "must be > 0"),
    ("a", -1.0, "must be > 0"),
    ("a", math.nan, "must be > 0"),
    ("a", 86401.0, "<= 86400"),
])
def test_set_interval_refuses_bad_values(name: str, seconds: float, message: str) -> None:
    sensor = CountingSensor("a", 1.0)
    with pytest.raises(SensorError, match=message):
        Sampler([sensor], lambda batch: None).set_interval(name, seconds)
    assert sensor.interval == 1.0


async def test_a_slow_sensor_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    class Slow(CountingSensor):
        def read(self, now: float) -> list[Reading]:
            time.sleep(SLOW_READ_S + 0.01)  # blocking on purpose: that is what the warning is about
            return super().read(now)

    progress = Progress()
    sensor = Slow("slow", 0.01, progress)
    task = asyncio.create_task(Sampler([sensor], lambda batch: None).run())
    await progress.until(lambda: sensor.reads >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slow = [r for r in caplog.records if "took" in r.getMessage()]
    assert [r.levelno for r in slow] == [logging.WARNING]
    assert "sensor slow took" in slow[0].getMessage()


def test_sensor_names_must_be_unique() -> None:
    with pytest.raises(SensorError, match="unique"):
        Sampler([CountingSensor("a", 1.0), CountingSensor("a", 2.0)], lambda batch: None)


async def test_sampler_runs_the_real_sim_sensor_at_its_rate() -> None:
    readings: list[Reading] = []
    sensor = SimSensor(SimSpec(signals=4, rate_hz=200.0), 1, 0.02)
    progress = Progress()
    task = asyncio.create_task(Sampler([sensor], progress.sink(readings.extend)).run())
    await progress.until(lambda: len(readings) >= 400)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stamps = sorted({r.ts for r in readings})
    assert all(b - a == pytest.approx(0.005, abs=1e-6) for a, b in itertools.pairwise(stamps))
