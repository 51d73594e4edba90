"""Sensor and actuator kinds that installed packages add in-process, through Python entry points.

A package declares, in its own pyproject.toml:

    [project.entry-points."edgefleet.sensors"]
    weather_station = "acme_ws.edge:build_sensor"

    [project.entry-points."edgefleet.actuators"]
    siren = "acme_ws.edge:build_actuator"

and an agent.toml names the entry point: `[[sensors]] kind = "plugin", plugin = "weather_station",
name = "roof", options = {...}`. A sensor builder is called as `build(name, options)` and returns a
`PluginSensor` (polled every interval_s) or a `PluginSource` (pushes its readings); an actuator
builder returns a `PluginActuator`. The plugin checks `options` and raises ValueError with a
sentence saying what is wrong. Nothing is imported until a configured sensor needs it; a plugin
runs under the same supervisor and health as the built-in kinds, and a reading whose metric is not
`<name>.<point>` is rejected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final, Protocol, runtime_checkable

from edge_agent.sense.field.base import FieldContext, FieldSensor, Reject, SensorHealth, first_batch, run_polled
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.errors import ConfigError
from edgefleet.policy.field import ACTUATOR_ENTRY_POINTS, POINT_NAME, SENSOR_ENTRY_POINTS, PluginSensorSpec

log = logging.getLogger("edge_agent.sense.entrypoints")

SENSOR_GROUP: Final = SENSOR_ENTRY_POINTS
ACTUATOR_GROUP: Final = ACTUATOR_ENTRY_POINTS


@runtime_checkable
class PluginSensor(Protocol):
    """Polled like the built-in sensors: `read` is quick and synchronous (it runs on the loop)."""

    name: str
    interval: float

    def read(self, now: float) -> list[Reading]: ...


@runtime_checkable
class PluginSource(Protocol):
    """Pushes readings to `sink` as they come, until cancelled."""

    name: str

    def run(self, sink: Callable[[list[Reading]], None]) -> Awaitable[None]: ...


@runtime_checkable
class PluginActuator(Protocol):
    """Does one write; returns a sentence saying what it did, raises to say it failed."""

    def write(self, args: Mapping[str, object]) -> Awaitable[str]: ...


Builder = Callable[[str, Mapping[str, Any]], object]


def available(group: str) -> dict[str, EntryPoint]:
    """The kinds installed packages offer in `group` (nothing is imported); the first of a name wins."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=group):
        if point.name in found:
            log.warning("two packages offer %s kind %r (%s and %s); using the first",
                        group, point.name, found[point.name].value, point.value)
            continue
        found[point.name] = point
    return found


def _builder(group: str, kind: str, where: str) -> Builder:
    offered = available(group)
    point = offered.get(kind)
    if point is None:
        names = ", ".join(sorted(offered)) or "none"
        raise ConfigError(f"kind {kind!r} is neither built in nor offered by an installed package "
                          f"(entry point group {group}: {names}); install the package that provides it", where)
    try:
        builder = point.load()
    except Exception as exc:  # noqa: BLE001  # a plugin's import may fail in any way; say which and why
        raise ConfigError(f"kind {kind!r}: loading {point.value} failed: {type(exc).__name__}: {exc}", where) from None
    if not callable(builder):
        raise ConfigError(f"kind {kind!r}: {point.value} is not callable; it must be build(name, options)", where)
    return builder  # type: ignore[no-any-return]  # checked callable; its signature is the plugin's contract


def _build(group: str, kind: str, name: str, options: Mapping[str, Any], where: str) -> object:
    builder = _builder(group, kind, where)
    try:
        return builder(name, options)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{name} (kind {kind!r}): {exc}", where) from None


def build_sensor(kind: str, name: str, options: Mapping[str, Any], where: str) -> PluginSensor | PluginSource:
    """The plugin sensor for one `[[sensors]]` table; ConfigError names the file and the fix."""
    sensor = _build(SENSOR_GROUP, kind, name, options, where)
    if isinstance(sensor, PluginSensor | PluginSource):
        return sensor
    raise ConfigError(f"{name} (kind {kind!r}): the plugin returned {type(sensor).__name__}, which has neither "
                      "read(now) and interval nor run(sink)", where)


def build_actuator(kind: str, name: str, options: Mapping[str, Any], where: str) -> PluginActuator:
    actuator = _build(ACTUATOR_GROUP, kind, name, options, where)
    if isinstance(actuator, PluginActuator):
        return actuator
    raise ConfigError(f"{name} (kind {kind!r}): the plugin returned {type(actuator).__name__}, "
                      "which has no async write(args)", where)


# --- plugin sensors under the field runtime ----------------------------------------------------------


class PluginFieldSensor:
    """A plugin's sensor or source, run and health-checked like a built-in field sensor."""

    kind = "plugin"

    def __init__(self, name: str, plugin: PluginSensor | PluginSource, interval: float,
                 clock: Callable[[], float]) -> None:
        self.name = name
        self._plugin = plugin
        self._interval = interval
        self._clock = clock

    def _checked(self, readings: list[Reading], reject: Reject) -> list[Reading]:
        good = []
        for reading in readings:
            sensor, dot, point = reading.metric.partition(".")
            if sensor != self.name or not dot or not POINT_NAME.fullmatch(point):
                reject(f"the plugin gave metric {reading.metric[:80]!r}, not {self.name}.<point>")
            elif not math.isfinite(reading.value):
                reject(f"the plugin gave {reading.metric} = {reading.value}")
            else:
                good.append(reading)
        return good

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        plugin = self._plugin
        if isinstance(plugin, PluginSensor):
            def read(now: float, reject: Reject) -> list[Reading]:
                return self._checked(plugin.read(now), reject)

            await run_polled(read, self._interval, health, emit, self._clock)
            return

        def pushed(readings: list[Reading]) -> None:
            good = self._checked(readings, health.reject)
            if good:
                emit(good)
                health.ok()

        await plugin.run(pushed)

    async def probe(self) -> list[Reading]:
        problems: list[str] = []
        plugin = self._plugin
        if isinstance(plugin, PluginSensor):
            readings = self._checked(plugin.read(self._clock()), problems.append)
        else:
            batch, _ = await first_batch(plugin.run)
            readings = self._checked(batch or [], problems.append)
        if problems and not readings:
            raise SensorError(f"the plugin's readings were refused: {'; '.join(problems[:3])}")
        return readings


def build(specs: Sequence[PluginSensorSpec], context: FieldContext) -> list[FieldSensor]:
    """Plugin sensors; a plugin that cannot be loaded or refuses its options stops the start (ConfigError)."""
    where = "[[sensors]] of kind plugin"
    return [PluginFieldSensor(spec.name, build_sensor(spec.plugin, spec.name, spec.options, where),
                              spec.interval_s, context.clock) for spec in specs]
