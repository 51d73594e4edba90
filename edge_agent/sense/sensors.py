"""Sensors (psutil system metrics, sysfs thermal zones, synthetic signals) and the Sampler.

A sensor's `read(now)` is synchronous and quick (a few procfs or sysfs reads): it runs on
the event loop, where a slow read would delay every local decision behind it (P4).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, NamedTuple, Protocol

import psutil

from edge_agent.errors import AgentError
from edgefleet.policy.profiles import SYSTEM_METRICS, THERMAL_PREFIX, Profile, SensorSpec, SimSpec

log = logging.getLogger("edge_agent.sensors")

MIB: Final = 1024 * 1024
THERMAL_ROOT: Final = Path("/sys/class/thermal")
MILLIDEGREES: Final = 1000.0  # sysfs thermal zones report millidegrees Celsius
MAX_METRIC_LEN: Final = 64  # profiles.METRIC_PATTERN
# Boards name their CPU temperature sensor differently; the first present wins, else any.
CPU_TEMP_SOURCES: Final = ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "soc_thermal", "acpitz")
# A stall longer than this (a suspended board, a blocked loop) becomes a gap in the sim data,
# as on real hardware whose sample FIFO holds seconds, not hours; replaying hours of samples
# would flood the outbox and the agent's memory (P3).
SIM_MAX_CATCHUP_S: Final = 2.0
# Synthetic signal shape: a slow sine (minutes), small noise, and now and then a step.
SIM_PERIOD_S: Final = (300.0, 1200.0)
SIM_AMPLITUDE: Final = (2.0, 8.0)
SIM_BASE: Final = (10.0, 50.0)
SIM_NOISE: Final = 0.05  # peak noise, well inside the sim profile's deadband (P7)
SIM_STEP_EVERY_S: Final = 60.0  # each minute-long segment may sit on a step
SIM_STEP_ODDS: Final = 8  # one segment in this many is stepped
SIM_STEP: Final = 3.0
# Longest interval a rule may set: a day, like SensorSpec.interval_s.
MAX_INTERVAL_S: Final = 86400.0
# The sampler turns at least this often, also between slow sensors: the watchdog sees it alive.
TURN_MAX_S: Final = 1.0
# A read slower than this holds up decisions on the loop (P4 wants p99 <= 5 ms end to end).
SLOW_READ_S: Final = 0.05

_MASK64: Final = (1 << 64) - 1
_UNIT: Final = float(1 << 64)
_NON_METRIC: Final = re.compile(r"[^A-Za-z0-9_]")


class SensorError(AgentError):
    """A sensor that cannot be read or configured; the message says which and why."""


class Reading(NamedTuple):
    metric: str
    ts: float  # seconds since the epoch when the value was sampled
    value: float


class Sensor(Protocol):
    name: str
    interval: float  # seconds between reads

    def read(self, now: float) -> list[Reading]: ...


Sink = Callable[[list[Reading]], None]

# --- system metrics ---------------------------------------------------------------------

_ORDER: Final = (
    "cpu_percent", "load1", "load5", "load15", "mem_used_percent", "mem_available_mb",
    "disk_used_percent", "disk_free_mb", "net_bytes_sent", "net_bytes_recv", "cpu_temp",
)


class SystemSensor:
    """psutil metrics; `metrics` empty means all of SYSTEM_METRICS."""

    def __init__(self, metrics: Iterable[str], state_dir: Path, interval: float, name: str = "system") -> None:
        wanted = frozenset(metrics) or SYSTEM_METRICS
        if wanted - SYSTEM_METRICS:
            raise SensorError(f"unknown system metrics: {', '.join(sorted(wanted - SYSTEM_METRICS))}")
        self.name = name
        self.interval = interval
        self._wanted = tuple(m for m in _ORDER if m in wanted)
        self._state_dir = state_dir
        self._cpu = "cpu_percent" in wanted
        self._load = bool(wanted & {"load1", "load5", "load15"})
        self._mem = bool(wanted & {"mem_used_percent", "mem_available_mb"})
        self._disk = bool(wanted & {"disk_used_percent", "disk_free_mb"})
        self._net = bool(wanted & {"net_bytes_sent", "net_bytes_recv"})
        self._temp = "cpu_temp" in wanted
        if self._cpu:
            psutil.cpu_percent(interval=None)  # sets the baseline; the first call always says 0.0

    def read(self, now: float) -> list[Reading]:
        values: dict[str, float] = {}
        if self._cpu:
            values["cpu_percent"] = psutil.cpu_percent(interval=None)
        if self._load:
            values["load1"], values["load5"], values["load15"] = os.getloadavg()
        if self._mem:
            memory = psutil.virtual_memory()
            values["mem_used_percent"] = memory.percent
            values["mem_available_mb"] = memory.available / MIB
        if self._disk:
            disk = psutil.disk_usage(str(_existing(self._state_dir)))
            values["disk_used_percent"] = disk.percent
            values["disk_free_mb"] = disk.free / MIB
        if self._net:
            net = psutil.net_io_counters()
            if net is not None:  # None on a host without interfaces
                values["net_bytes_sent"] = net.bytes_sent
                values["net_bytes_recv"] = net.bytes_recv
        if self._temp:
            temp = _cpu_temp()
            if temp is not None:  # many VMs and some boards have no temperature sensor
                values["cpu_temp"] = temp
        return [Reading(m, now, float(values[m])) for m in self._wanted if m in values]


def _existing(path: Path) -> Path:
    """The state dir, or its nearest existing ancestor (same filesystem) before it is created."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _cpu_temp() -> float | None:
    probe = getattr(psutil, "sensors_temperatures", None)  # psutil has it on Linux and BSD only
    if probe is None:
        return None
    zones = probe()
    for source in (*CPU_TEMP_SOURCES, *zones):
        entries = zones.get(source)
        if entries:
            return float(entries[0].current)
    return None


# --- sysfs thermal zones ----------------------------------------------------------------


class ThermalSensor:
    """Every /sys/class/thermal/thermal_zone*, in °C, named thermal_<zone type>."""

    def __init__(self, interval: float, root: Path = THERMAL_ROOT, name: str = "thermal") -> None:
        self.name = name
        self.interval = interval
        self._root = root
        self._zones: list[tuple[str, Path]] = []

    def read(self, now: float) -> list[Reading]:
        if not self._zones:  # looked for again while there are none: a driver may load after boot
            self._zones = thermal_zones(self._root)
        readings: list[Reading] = []
        errors: list[str] = []
        for metric, path in self._zones:
            try:
                readings.append(Reading(metric, now, int(path.read_bytes()) / MILLIDEGREES))
            except (OSError, ValueError) as exc:  # some zones answer EINVAL while their sensor is off
                errors.append(f"{path}: {exc}")
        if errors and not readings:
            raise SensorError(f"no thermal zone could be read: {'; '.join(errors)}")
        return readings


def thermal_root(spec: SensorSpec) -> Path:
    """Where a thermal sensor of the profile looks for its zones."""
    return THERMAL_ROOT if spec.root is None else Path(spec.root)


def thermal_zones(root: Path) -> list[tuple[str, Path]]:
    """(metric, temp file) per zone under `root`, in zone order; none is not an error."""
    numbered = []
    for zone in root.glob("thermal_zone*"):
        suffix = zone.name.removeprefix("thermal_zone")
        if suffix.isdigit() and (zone / "temp").exists():
            numbered.append((int(suffix), zone))
    zones: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for number, zone in sorted(numbered):
        try:
            kind = (zone / "type").read_text(encoding="utf-8").strip()
        except OSError:
            kind = ""
        metric = (THERMAL_PREFIX + _NON_METRIC.sub("_", kind))[:MAX_METRIC_LEN] if kind else f"thermal_zone{number}"
        if metric in seen:  # two zones of one type (e.g. acpitz) keep apart by zone number
            tag = f"_{number}"
            metric = metric[: MAX_METRIC_LEN - len(tag)] + tag
        seen.add(metric)
        zones.append((metric, zone / "temp"))
    return zones


# --- synthetic signals ------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash for deterministic noise."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def device_seed(device_id: str) -> int:
    """A stable seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "big")


class _Signal:
    """One synthetic signal: a pure function of (seed, signal index, sample tick)."""

    def __init__(self, seed: int, index: int) -> None:
        self.metric = f"sig{index}"
        self._key = _mix(seed ^ _mix(index + 1))
        u = [_mix(self._key + k) / _UNIT for k in range(4)]
        self._base = SIM_BASE[0] + u[0] * (SIM_BASE[1] - SIM_BASE[0])
        self._amplitude = SIM_AMPLITUDE[0] + u[1] * (SIM_AMPLITUDE[1] - SIM_AMPLITUDE[0])
        self._omega = 2 * math.pi / (SIM_PERIOD_S[0] + u[2] * (SIM_PERIOD_S[1] - SIM_PERIOD_S[0]))
        self._phase = 2 * math.pi * u[3]

    def value(self, tick: int, ts: float) -> float:
        noise = (_mix(self._key ^ tick) / _UNIT - 0.5) * 2 * SIM_NOISE
        segment = _mix(self._key ^ (~int(ts // SIM_STEP_EVERY_S) & _MASK64))
        step = 0.0 if segment % SIM_STEP_ODDS else (SIM_STEP if segment & (1 << 32) else -SIM_STEP)
        return self._base + self._amplitude * math.sin(self._omega * ts + self._phase) + noise + step


class SimSensor:
    """`spec.signals` signals sig0.. at `spec.rate_hz`; each read returns every sample due since the last."""

    def __init__(self, spec: SimSpec, seed: int, interval: float, name: str = "sim") -> None:
        self.name = name
        self.interval = interval
        self.skipped = 0  # samples never produced because a stall exceeded SIM_MAX_CATCHUP_S
        self._rate = spec.rate_hz
        self._signals = [_Signal(seed, index) for index in range(spec.signals)]
        self._next_tick: int | None = None  # tick k is sampled at k / rate_hz

    def read(self, now: float) -> list[Reading]:
        rate = self._rate
        last = math.floor(now * rate)
        bound = math.ceil((self.interval + SIM_MAX_CATCHUP_S) * rate)
        first = self._next_tick
        if first is None or last < first - bound:  # the first read, or the clock stepped back far
            first = last
        elif last - first >= bound:
            self.skipped += (last - bound + 1 - first) * len(self._signals)
            first = last - bound + 1
        if last < first:
            return []
        self._next_tick = last + 1
        readings: list[Reading] = []
        append = readings.append
        for tick in range(first, last + 1):
            ts = tick / rate
            for signal in self._signals:
                append(Reading(signal.metric, ts, signal.value(tick, ts)))
        return readings


def build_sensors(profile: Profile, device_id: str, state_dir: Path) -> list[Sensor]:
    """The profile's sensors; names are the kind, then kind-2, kind-3 for repeats."""
    sensors: list[Sensor] = []
    count: dict[str, int] = {}
    for spec in profile.sensors:
        count[spec.kind] = count.get(spec.kind, 0) + 1
        name = spec.kind if count[spec.kind] == 1 else f"{spec.kind}-{count[spec.kind]}"
        if spec.kind == "system":
            sensors.append(SystemSensor(spec.metrics, state_dir, spec.interval_s, name))
        elif spec.kind == "thermal":
            sensors.append(ThermalSensor(spec.interval_s, thermal_root(spec), name=name))
        else:
            sensors.append(SimSensor(profile.sim, device_seed(device_id), spec.interval_s, name))
    return sensors


# --- the sampler ------------------------------------------------------------------------


class Sampler:
    """Reads each sensor every `interval` seconds on the running loop and hands each batch to `sink`.

    One task for all sensors. A sensor that raises is logged (WARNING the first time, DEBUG
    after), counted in `failures` and tried again at its next interval. `sink` must not raise:
    if it does, run() ends with that exception.
    """

    def __init__(self, sensors: Sequence[Sensor], sink: Sink, *, clock: Callable[[], float] = time.time) -> None:
        names = [sensor.name for sensor in sensors]
        if len(set(names)) != len(names):
            raise SensorError(f"sensor names must be unique: {', '.join(names)}")
        self._sensors = {sensor.name: sensor for sensor in sensors}
        self._sink = sink
        self._clock = clock  # timestamps readings; scheduling uses the loop's monotonic clock
        self.failures: dict[str, int] = dict.fromkeys(names, 0)
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._slow: set[str] = set()

    @property
    def sensors(self) -> dict[str, Sensor]:
        return dict(self._sensors)

    def set_interval(self, name: str, seconds: float) -> None:
        """Read `name` every `seconds` from now on; the next read is its last one plus `seconds`."""
        sensor = self._sensors.get(name)
        if sensor is None:
            raise SensorError(f"no sensor named {name!r}; sensors: {', '.join(self._sensors)}")
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_INTERVAL_S):
            raise SensorError(f"interval for {name!r} must be > 0 and <= {MAX_INTERVAL_S:g} s, not {seconds}")
        if name in self._due:
            self._due[name] += seconds - sensor.interval
        sensor.interval = seconds
        self._wake.set()

    async def run(self, beat: Callable[[], None] = lambda: None) -> None:
        """Sample until cancelled; `beat` at every turn (at least every TURN_MAX_S)."""
        loop = asyncio.get_running_loop()
        self._due = dict.fromkeys(self._sensors, loop.time())
        try:
            while True:
                beat()
                deadline = min(self._due.values())
                if deadline > loop.time():
                    self._wake.clear()
                    try:
                        async with asyncio.timeout_at(min(deadline, loop.time() + TURN_MAX_S)):
                            await self._wake.wait()  # set_interval may move the deadline
                    except TimeoutError:
                        pass
                    continue
                self._read_due(loop.time)
        finally:
            self._due = {}

    def _read_due(self, monotonic: Callable[[], float]) -> None:
        now = monotonic()
        for name, due in self._due.items():
            if due > now:
                continue
            sensor = self._sensors[name]
            self._read(sensor)
            # Keep the cadence without drift, but after a stall (or a read slower than its
            # interval) skip the missed reads rather than burst: the next is always in the
            # future, so the loop gets to run everything else in between.
            after = monotonic()
            following = due + sensor.interval
            self._due[name] = following if following > after else after + sensor.interval

    def _read(self, sensor: Sensor) -> None:
        started = time.perf_counter()
        try:
            readings = sensor.read(self._clock())
        except Exception as exc:  # noqa: BLE001 - one broken sensor must stop neither the others nor the agent
            self._failed(sensor, exc)
            return
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_READ_S and sensor.name not in self._slow:
            self._slow.add(sensor.name)
            log.warning("sensor %s took %.0f ms to read; it delays local decisions", sensor.name, elapsed * 1e3)
        if readings:
            self._sink(readings)

    def _failed(self, sensor: Sensor, exc: Exception) -> None:
        self.failures[sensor.name] += 1
        if self.failures[sensor.name] == 1:
            log.warning(
                "sensor %s failed: %s: %s; retrying every %g s (repeats are logged at DEBUG)",
                sensor.name, type(exc).__name__, exc, sensor.interval,
            )
        else:
            log.debug("sensor %s failed again (%d times): %s", sensor.name, self.failures[sensor.name], exc)
