"""Kernel sensors through sysfs: 1-Wire thermometers (w1_therm), hwmon and IIO devices.

The kernel's drivers do the bus work (I2C, SPI, 1-Wire); we only read the files they expose, in
the units their ABI documents, and convert to the units docs/sensors.md lists. A device is chosen
by its name (hwmon and IIO `name`, a 1-Wire slave id), never by its number, which changes with
probe order. Reads are a few small file reads: quick enough for the event loop.

One channel that cannot be read (EINVAL while the chip converts, a CRC error on the 1-Wire bus)
is a rejected value (counted and logged once by the sensor's health) and the other channels still
report; only a device none of whose channels can be read is a failed poll.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_agent.sense.field.base import FieldContext, FieldSensor, Reject, SensorHealth, run_polled
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.policy.field import SysfsSensorSpec
from edgefleet.policy.field import SysfsSource as Source

SYSFS_ROOT: Final = Path("/sys")
W1_DIR: Final = "bus/w1/devices"
HWMON_DIR: Final = "class/hwmon"
IIO_DIR: Final = "bus/iio/devices"
# A sysfs attribute is at most a page; anything longer is not a kernel file.
ATTR_LIMIT: Final = 4096
_NON_POINT: Final = re.compile(r"[^A-Za-z0-9_]+")
MAX_POINT_LEN: Final = 32  # point names join the sensor name in a 64-character metric name

# hwmon (Documentation/hwmon/sysfs-interface): attribute prefix -> factor to our unit.
HWMON_FACTORS: Final = {
    "temp": 1e-3,  # millidegree Celsius -> °C
    "humidity": 1e-3,  # milli-percent relative humidity -> %RH
    "pressure": 1.0,  # not in the hwmon ABI: passed on as the driver reports it
    "in": 1e-3,  # millivolt -> V
    "curr": 1e-3,  # milliampere -> A
    "power": 1e-6,  # microwatt -> W
    "energy": 1e-6,  # microjoule -> J
    "fan": 1.0,  # revolutions per minute
}
HWMON_INPUT: Final = re.compile(r"(temp|humidity|pressure|in|curr|power|energy|fan)([0-9]+)_input")
# IIO (Documentation/ABI/testing/sysfs-bus-iio): channel type -> factor from the ABI's unit to ours.
IIO_FACTORS: Final = {
    "temp": 1e-3,  # millidegree Celsius -> °C
    "humidityrelative": 1e-3,  # milli-percent -> %RH
    "pressure": 10.0,  # kilopascal -> hPa
    "voltage": 1e-3,  # millivolt -> V
    "current": 1e-3,  # milliampere -> A
    "power": 1e-3,  # milliwatt -> W
}
# in_<type>[<index>][_<modifier>]_(input|raw); differential channels (voltage0-voltage1) are skipped.
IIO_CHANNEL: Final = re.compile(r"in_([a-z]+?)([0-9]*)((?:_[a-z0-9]+)?)_(input|raw)")
W1_CRC: Final = re.compile(rb"crc=[0-9a-f]{2} (YES|NO)")
W1_T: Final = re.compile(rb"t=(-?[0-9]+)")


class BadRead(SensorError):
    """One channel's file could not be read or did not hold a number; the message says which."""


def _attr(path: Path) -> bytes:
    """One sysfs attribute; OSError (EINVAL, EIO, ENOENT) as the kernel gives it."""
    with path.open("rb", buffering=0) as handle:
        return handle.read(ATTR_LIMIT).strip()


def _number(path: Path) -> float:
    raw = _attr(path)
    try:
        return float(raw)
    except ValueError:
        raise BadRead(f"it holds {raw[:40]!r}, not a number") from None


def point_name(text: str) -> str:
    """A label (`Core 0`, `in0-vdd`) as a point name (`Core_0`, `in0_vdd`)."""
    return _NON_POINT.sub("_", text).strip("_")[:MAX_POINT_LEN] or "x"


@dataclass(frozen=True, slots=True)
class Channel:
    point: str
    path: Path
    value: Callable[[], float]


# --- 1-Wire -------------------------------------------------------------------------------


def _w1_slave(path: Path) -> float:
    """w1_slave: line one ends in `crc=xx YES` (or NO: a bad read), line two in `t=<m°C>`."""
    text = _attr(path)
    crc, temp = W1_CRC.search(text), W1_T.search(text)
    if crc is None or temp is None:
        raise BadRead(f"not in the w1_therm format: {text[:80]!r}")
    if crc.group(1) != b"YES":
        raise BadRead("the 1-Wire CRC check failed (crc ... NO)")
    return int(temp.group(1)) * 1e-3


def w1_channels(root: Path, device: str) -> list[Channel]:
    folder = root / W1_DIR / device
    if not folder.is_dir():
        found = sorted(p.name for p in (root / W1_DIR).glob("*-*")) if (root / W1_DIR).is_dir() else []
        raise SensorError(f"no 1-Wire device {device!r} under {root / W1_DIR}; found: {', '.join(found) or 'none'}")
    temperature = folder / "temperature"  # kernels since 5.9: millidegrees, no CRC line
    if temperature.exists():
        return [Channel("temperature", temperature, lambda: _number(temperature) * 1e-3)]
    slave = folder / "w1_slave"
    return [Channel("temperature", slave, lambda: _w1_slave(slave))]


# --- hwmon --------------------------------------------------------------------------------


def _named(folders: Sequence[Path], name: str, what: str, where: Path) -> Path:
    names: list[str] = []
    for folder in sorted(folders, key=lambda p: (len(p.name), p.name)):
        try:
            found = _attr(folder / "name").decode("utf-8", "replace")
        except OSError:
            continue
        if found == name:
            return folder
        names.append(found)
    raise SensorError(f"no {what} device named {name!r} under {where}; found: {', '.join(names) or 'none'}")


def hwmon_channels(root: Path, device: str) -> list[Channel]:
    base = root / HWMON_DIR
    folder = _named(list(base.glob("hwmon*")), device, "hwmon", base)
    # Old drivers keep their attributes one level down, in the parent device's folder.
    attrs = folder if any(folder.glob("*_input")) else folder / "device"
    channels: list[Channel] = []
    for path in sorted(attrs.glob("*_input"), key=lambda p: _natural(p.name)):
        match = HWMON_INPUT.fullmatch(path.name)
        if match is None:
            continue
        kind, index = match.groups()
        point = f"{kind}{index}"
        label = attrs / f"{kind}{index}_label"
        if label.exists():
            with contextlib.suppress(OSError):
                point = point_name(_attr(label).decode("utf-8", "replace"))
        channels.append(Channel(point, path, _scaled(path, HWMON_FACTORS[kind])))
    return _unique(channels)


def _scaled(path: Path, factor: float) -> Callable[[], float]:
    return lambda: _number(path) * factor


# --- IIO ----------------------------------------------------------------------------------


def iio_channels(root: Path, device: str) -> list[Channel]:
    base = root / IIO_DIR
    folder = _named(list(base.glob("iio:device*")), device, "IIO", base)
    chosen: dict[str, Path] = {}
    for path in sorted(folder.glob("in_*"), key=lambda p: _natural(p.name)):
        match = IIO_CHANNEL.fullmatch(path.name)
        if match is None:
            continue
        kind, index, modifier, form = match.groups()
        stem = f"{kind}{index}{modifier}"
        if form == "input" or stem not in chosen:  # the kernel's processed value wins over raw
            chosen[stem] = path
    channels: list[Channel] = []
    for stem, path in chosen.items():
        match = IIO_CHANNEL.fullmatch(path.name)
        assert match is not None
        kind, index, modifier, form = match.groups()
        factor = IIO_FACTORS.get(kind, 1.0)
        if form == "input":
            channels.append(Channel(point_name(stem), path, _scaled(path, factor)))
        else:
            scale = _shared(folder, kind, index, modifier, "scale")
            offset = _shared(folder, kind, index, modifier, "offset")
            channels.append(Channel(point_name(stem), path, _raw_value(path, scale, offset, factor)))
    return channels


def _shared(folder: Path, kind: str, index: str, modifier: str, what: str) -> Path | None:
    """A channel's own _scale/_offset, else the one its type shares (in_voltage_scale)."""
    for name in (f"in_{kind}{index}{modifier}_{what}", f"in_{kind}{modifier}_{what}", f"in_{kind}_{what}"):
        if (folder / name).exists():
            return folder / name
    return None


def _raw_value(raw: Path, scale: Path | None, offset: Path | None, factor: float) -> Callable[[], float]:
    def value() -> float:
        # (raw + offset) * scale is in the ABI's unit for the type; factor takes it to ours.
        total = _number(raw) + (_number(offset) if offset is not None else 0.0)
        return total * (_number(scale) if scale is not None else 1.0) * factor

    return value


def _natural(name: str) -> list[object]:
    """temp2 before temp10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"([0-9]+)", name)]


def _unique(channels: list[Channel]) -> list[Channel]:
    """Two channels with one label (two `Core 0` on a two-socket board) keep apart by file."""
    seen: set[str] = set()
    out: list[Channel] = []
    for channel in channels:
        point = channel.point
        if point in seen:
            point = point_name(f"{point}_{channel.path.name.removesuffix('_input')}")
        seen.add(point)
        out.append(Channel(point, channel.path, channel.value))
    return out


FINDERS: Final[dict[Source, Callable[[Path, str], list[Channel]]]] = {
    "w1": w1_channels, "hwmon": hwmon_channels, "iio": iio_channels,
}


# --- the sensor ---------------------------------------------------------------------------


class SysfsSensor:
    """One kernel device's channels as `<name>.<point>` metrics.

    `points` keeps only the named channels (all when empty). The channels are looked up at the
    first read and again after a read in which none could be read (the driver was reloaded and
    the device renumbered).
    """

    kind = "sysfs"

    def __init__(self, name: str, source: Source, device: str, *, root: Path = SYSFS_ROOT,
                 points: Sequence[str] = (), interval: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.interval = interval
        self.source = source
        self.device = device
        self._root = root
        self._points = frozenset(points)
        self._channels: list[Channel] | None = None
        self._clock = clock

    def channels(self) -> list[Channel]:
        """The device's channels (looked up now if not yet); SensorError when the device is absent."""
        if self._channels is None:
            found = FINDERS[self.source](self._root, self.device)
            if self._points:
                missing = sorted(self._points - {c.point for c in found})
                if missing:
                    have = ", ".join(c.point for c in found) or "none"
                    raise SensorError(f"{self.source} device {self.device!r} has no channel {', '.join(missing)}; "
                                      f"it has: {have}")
                found = [c for c in found if c.point in self._points]
            if not found:
                raise SensorError(f"{self.source} device {self.device!r} has no channel we can read")
            self._channels = found
        return self._channels

    def read(self, now: float, reject: Reject) -> list[Reading]:
        """Every channel that can be read; one that cannot goes to `reject` with the reason."""
        channels = self.channels()
        readings: list[Reading] = []
        errors: list[str] = []
        for channel in channels:
            try:
                value = channel.value()
            except (OSError, SensorError) as exc:
                why = f"{channel.path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                errors.append(why)
                reject(f"bad read of {why}")
                continue
            readings.append(Reading(f"{self.name}.{channel.point}", now, value))
        if not readings:
            self._channels = None  # look the device up again next time
            raise SensorError(f"no channel of {self.source} device {self.device!r} could be read: {'; '.join(errors)}")
        return readings

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        await run_polled(self.read, self.interval, health, emit, self._clock)

    async def probe(self) -> list[Reading]:
        problems: list[str] = []
        readings = self.read(self._clock(), problems.append)
        if problems:
            raise SensorError(f"{len(problems)} channel(s) could not be read: {'; '.join(problems[:3])}")
        return readings


def build(specs: Sequence[SysfsSensorSpec], context: FieldContext) -> list[FieldSensor]:
    return [SysfsSensor(spec.name, spec.source, spec.device, root=Path(spec.root), points=spec.channels,
                        interval=spec.interval_s, clock=context.clock) for spec in specs]
