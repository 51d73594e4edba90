"""Firmware profiles: one TOML file per board family (sensors, sampling, budgets, actuators)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from edgefleet.errors import ConfigError
from edgefleet.policy.field import (
    ACTUATOR_ENTRY_POINTS,
    FIELD_KINDS,
    FieldSensorSpec,
    ModbusSensorSpec,
    check_gpio_lines,
    check_names,
    field_metric,
    offered_plugins,
    parse_field_sensor,
)
from edgefleet.runtime.settings import apply_override, read_toml, to_struct
from edgefleet.wire.protocol import NAME_PATTERN

# Installed wheels carry the profiles inside the edge_agent package (a folder beside this one,
# never imported from here); a source checkout has them at the top level.
_SITE_DIR: Final = Path(__file__).resolve().parents[2]
BUILTIN_PROFILE_DIRS: Final = (_SITE_DIR / "edge_agent" / "firmware_profiles", _SITE_DIR / "firmware_profiles")
# A site's own profiles, searched before the built-in ones (a file there with a built-in's name
# replaces it), so that no installed file is ever edited; agent.toml's profiles_dir comes first.
SITE_PROFILE_DIR: Final = Path("/etc/edge-agent/profiles")
PROFILE_DIRS: Final = (SITE_PROFILE_DIR, *BUILTIN_PROFILE_DIRS)

SYSTEM_METRICS: Final = frozenset({
    "cpu_percent", "load1", "load5", "load15", "mem_used_percent", "mem_available_mb",
    "disk_used_percent", "disk_free_mb", "net_bytes_sent", "net_bytes_recv", "cpu_temp",
})
# Metric names travel in JSON and hub columns; keep them plain identifiers, as short as an id.
# A field sensor's are `<sensor>.<point>` (edgefleet.policy.field).
METRIC_PATTERN: Final = re.compile(r"(?=.{1,64}$)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?")
SIM_METRIC: Final = re.compile(r"sig[0-9]+")  # sim signals are sig0 .. sig<signals-1>
THERMAL_PREFIX: Final = "thermal_"  # thermal zone metrics are named at run time from sysfs
BUILTIN_SENSOR_KINDS: Final = ("system", "thermal", "sim")
ActuatorKind = Literal["command", "systemd_restart", "set_rate", "alert", "record", "modbus_write",
                       "mqtt_publish", "gpio_set", "gpio_pulse", "plugin"]


class Budgets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    disk_mb: Annotated[float, Meta(gt=0)]  # outbox quota on disk
    memory_mb: Annotated[int, Meta(gt=0)] = 40  # what the agent is expected to stay under


class SensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["system", "thermal", "sim"]
    interval_s: Annotated[float, Meta(gt=0, le=86400)] = 5.0
    metrics: list[str] = []  # for kind="system": a subset of SYSTEM_METRICS; empty = all
    # For kind="thermal": the folder holding the thermal_zone* entries; unset = /sys/class/thermal.
    # A container or a test points it at a tree of its own.
    root: str | None = None


class SimSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    signals: Annotated[int, Meta(ge=1, le=10_000)] = 4
    rate_hz: Annotated[float, Meta(gt=0, le=10_000)] = 1.0
    # The simulated battery level (0..1) that task bids weigh in; unset: one per device,
    # from a hash of its id (a fleet with a spread of levels).
    battery: Annotated[float, Meta(ge=0, le=1)] | None = None


class GpioOutputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A GPIO line the gpio_set and gpio_pulse actuators may drive, by the name rules use."""

    name: str
    chip: str  # gpiochip0 or /dev/gpiochip0
    line: int | str  # its offset on the chip, or its name
    idle: bool = False  # its level at start, after a pulse and when the agent stops
    active_low: bool = False


class PluginActuatorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An actuator kind an installed package adds (entry point group edgefleet.actuators)."""

    name: str  # what rules name in `args.actuator`
    plugin: str  # the entry point's name
    options: dict[str, Any] = {}  # handed to the plugin's builder as they are


class ActuatorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allowed: list[ActuatorKind] = []
    commands: list[list[str]] = []  # argv prefixes the "command" actuator may run
    units: list[str] = []  # systemd units the "systemd_restart" actuator may restart
    mqtt_topics: list[str] = []  # topics the "mqtt_publish" actuator may publish to (exact, no wildcards)
    gpio_outputs: list[GpioOutputSpec] = []  # lines the "gpio_set" and "gpio_pulse" actuators may drive
    plugins: list[PluginActuatorSpec] = []  # the actuators from installed packages the "plugin" action may use
    # <sensor>.<point> of Modbus coils and holding registers the "modbus_write" actuator may write.
    modbus: list[str] = []


class ReportSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Report by exception (edge_agent/sense/report.py has the exact semantics)."""

    default_deadband: Annotated[float, Meta(ge=0)] = 0.0  # 0 = send every reading
    deadband: dict[str, float] = {}  # per-metric overrides, e.g. { sig0 = 0.5 }
    # A metric that stays inside its deadband is still sent this often, so the hub can tell
    # "steady" from "stale"; 0 = never.
    heartbeat_s: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    aggregate_s: Annotated[float, Meta(ge=0, le=86400)] = 0.0  # 0 = off; else one mean per window


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    description: str
    budgets: Budgets
    sensors: list[SensorSpec]
    board: str = ""
    sim: SimSpec = SimSpec()
    actuators: ActuatorSpec = ActuatorSpec()
    report: ReportSpec = ReportSpec()
    # The [[sensors]] tables of a field kind (FIELD_KINDS), in file order; load_profile sorts them
    # out of `sensors`, and agent.toml's are added after the profile's.
    field_sensors: tuple[FieldSensorSpec, ...] = ()


PROFILE_KEYS: Final = frozenset(Profile.__struct_fields__) - {"field_sensors"}


def split_sensors(raw: dict[str, Any], where: str, *, field_only: bool = False) -> list[FieldSensorSpec]:
    """Take the field sensors out of raw["sensors"] (validated, errors naming their index in the
    file) and leave the built-in kinds there for the struct."""
    if "field_sensors" in raw:
        raise ConfigError("unknown key field_sensors: declare field sensors as [[sensors]] tables", where)
    items = raw.get("sensors")
    if not isinstance(items, list):
        return []
    builtin: list[Any] = []
    field: list[FieldSensorSpec] = []
    for index, item in enumerate(items):
        kind = item.get("kind") if isinstance(item, dict) else None
        key = f"sensors[{index}]"
        if kind in FIELD_KINDS:
            field.append(parse_field_sensor(item, key, where))
        elif field_only or kind not in BUILTIN_SENSOR_KINDS:
            known = FIELD_KINDS if field_only else (*BUILTIN_SENSOR_KINDS, *FIELD_KINDS)
            extra = "; the board's own sensors belong in its firmware profile" if kind in BUILTIN_SENSOR_KINDS else ""
            raise ConfigError(f"{key}.kind = {kind!r} is not a sensor kind here: use one of "
                              f"{', '.join(known)}{extra}", where)
        else:
            builtin.append(item)
    raw["sensors"] = builtin
    return field


def with_field_sensors(profile: Profile, extra: Iterable[FieldSensorSpec], where: str) -> Profile:
    """`profile` with agent.toml's field sensors added after its own; names must stay unique."""
    added = tuple(extra)
    if not added:
        return profile
    combined = msgspec.structs.replace(profile, field_sensors=(*profile.field_sensors, *added))
    _check_field_names(combined, where, first_added=len(profile.field_sensors))
    return combined


def with_field_actuators(profile: Profile, modbus: list[str], where: str) -> Profile:
    """`profile` with agent.toml's writable Modbus points added to its allowlist; every listed
    point, the profile's and these, must be a coil or holding register of a declared Modbus sensor."""
    writable = set().union(*(s.writable() for s in profile.field_sensors if isinstance(s, ModbusSensorSpec)))
    listed = [(f"the profile's actuators.modbus entry {p!r}", p) for p in profile.actuators.modbus]
    listed += [(f"actuators.modbus[{i}] = {p!r}", p) for i, p in enumerate(modbus)]
    for key, point in listed:
        if point not in writable:
            raise ConfigError(f"{key} is not a coil or holding register of a modbus sensor: list one of "
                              f"{', '.join(sorted(writable)) or 'none (declare the sensor first)'}", where)
    if not modbus:
        return profile
    spec = profile.actuators
    allowed = spec.allowed if "modbus_write" in spec.allowed else [*spec.allowed, "modbus_write"]
    actuators = msgspec.structs.replace(spec, allowed=allowed, modbus=[*spec.modbus, *modbus])
    return msgspec.structs.replace(profile, actuators=actuators)


def with_local_writes(profile: Profile, mqtt_topics: list[str], gpio_outputs: list[GpioOutputSpec],
                      where: str) -> Profile:
    """`profile` with agent.toml's local MQTT topics and GPIO outputs added to its allowlists (and
    their action kinds allowed), checked together with the profile's own."""
    if not mqtt_topics and not gpio_outputs:
        return profile
    spec = profile.actuators
    allowed = list(spec.allowed)
    kinds: list[ActuatorKind] = []
    if mqtt_topics:
        kinds.append("mqtt_publish")
    if gpio_outputs:
        kinds += ["gpio_set", "gpio_pulse"]
    allowed += [kind for kind in kinds if kind not in allowed]
    actuators = msgspec.structs.replace(spec, allowed=allowed, mqtt_topics=[*spec.mqtt_topics, *mqtt_topics],
                                        gpio_outputs=[*spec.gpio_outputs, *gpio_outputs])
    _check_field_actuators(actuators, where)
    return msgspec.structs.replace(profile, actuators=actuators)


def _check_field_names(profile: Profile, where: str, first_added: int = 0) -> None:
    """Field sensor names are unique, and no built-in sensor (named by its kind) is taken."""
    taken = {s.kind for s in profile.sensors}
    seen: set[str] = set()
    for index, spec in enumerate(profile.field_sensors):
        if spec.name in seen or spec.name in taken:
            key = f"sensors[{index - first_added}]" if index >= first_added else f"the field sensor {spec.name!r}"
            raise ConfigError(f"{key}.name = {spec.name!r} is taken by another sensor: give each sensor its own "
                              "name", where)
        seen.add(spec.name)


def find_profile(name: str, search: Iterable[Path] = PROFILE_DIRS) -> Path:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"profile name {name!r} is not valid: use A-Z a-z 0-9 _ -")
    dirs = list(search)
    for directory in dirs:
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(f"no firmware profile {name!r}; available: {', '.join(available) or 'none'}")


def available_profiles(search: Iterable[Path] = PROFILE_DIRS) -> list[str]:
    return sorted({p.stem for d in search if d.is_dir() for p in d.glob("*.toml")})


def load_profile(
    name: str, overrides: Iterable[tuple[list[str], Any]] = (), search: Iterable[Path] = PROFILE_DIRS
) -> Profile:
    path = find_profile(name, search)
    raw = read_toml(path)
    for parts, value in overrides:
        apply_override(raw, parts, value)
    field = split_sensors(raw, str(path))
    _flatten_deadbands(raw)
    profile = to_struct(raw, Profile, str(path))
    if field:
        profile = msgspec.structs.replace(profile, field_sensors=tuple(field))
    check_profile(profile, path)
    return profile


def _flatten_deadbands(raw: dict[str, Any]) -> None:
    """TOML reads `deadband = { meter.voltage = 0.5 }` as a nested table: it means the metric meter.voltage."""
    report = raw.get("report")
    if not isinstance(report, dict) or not isinstance(report.get("deadband"), dict):
        return
    bands: dict[str, Any] = report["deadband"]
    flat: dict[str, Any] = {}
    for name, value in bands.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{point}": band for point, band in value.items()})
        else:
            flat[name] = value
    report["deadband"] = flat


def check_profile(profile: Profile, path: Path) -> None:
    """Rules a type cannot express; each error names the key and the fix."""
    where = str(path)
    if profile.name != path.stem:
        raise ConfigError(f"name = {profile.name!r} but the file is {path.name}: make them agree", where)
    if not profile.sensors and not profile.field_sensors:
        raise ConfigError("no sensors: add at least one [[sensors]] table", where)
    _check_field_names(profile, where)
    for index, sensor in enumerate(profile.sensors):
        unknown = sorted(set(sensor.metrics) - SYSTEM_METRICS)
        if sensor.kind != "system" and sensor.metrics:
            raise ConfigError(f"sensors[{index}].metrics is only for kind = \"system\"", where)
        if sensor.kind != "thermal" and sensor.root is not None:
            raise ConfigError(f"sensors[{index}].root is only for kind = \"thermal\"", where)
        if unknown:
            raise ConfigError(
                f"sensors[{index}].metrics: unknown {', '.join(unknown)}; "
                f"known: {', '.join(sorted(SYSTEM_METRICS))}", where,
            )
    _check_sensor_overlap(profile, where)
    _check_report(profile, where)
    if "command" in profile.actuators.allowed and not profile.actuators.commands:
        raise ConfigError("actuators allow \"command\" but list no actuators.commands", where)
    if "systemd_restart" in profile.actuators.allowed and not profile.actuators.units:
        raise ConfigError("actuators allow \"systemd_restart\" but list no actuators.units", where)
    if any(not argv for argv in profile.actuators.commands):
        raise ConfigError("actuators.commands has an empty argv", where)
    _check_field_actuators(profile.actuators, where)


def _check_field_actuators(spec: ActuatorSpec, where: str) -> None:
    """The local MQTT topics and GPIO lines the field actuators may write."""
    if "mqtt_publish" in spec.allowed and not spec.mqtt_topics:
        raise ConfigError("actuators allow \"mqtt_publish\" but list no actuators.mqtt_topics", where)
    for topic in spec.mqtt_topics:
        if not topic or "+" in topic or "#" in topic:
            raise ConfigError(f"actuators.mqtt_topics: {topic!r} is not a topic to publish to: write it in full, "
                              "without + or #", where)
    if {"gpio_set", "gpio_pulse"} & set(spec.allowed) and not spec.gpio_outputs:
        raise ConfigError("actuators allow gpio_set or gpio_pulse but list no [[actuators.gpio_outputs]]", where)
    names: set[str] = set()
    lines: set[tuple[str, int | str]] = set()
    for index, output in enumerate(spec.gpio_outputs):
        key = f"actuators.gpio_outputs[{index}]"
        check_names(output.name, [], key, where)
        if output.name in names:
            raise ConfigError(f"{key}.name = {output.name!r} is listed twice: give each output its own name", where)
        chip = output.chip.removeprefix("/dev/")
        if (chip, output.line) in lines:
            raise ConfigError(f"{key}: line {output.line!r} of {output.chip} is listed twice: a line has one use",
                              where)
        check_gpio_lines(output.chip, [output.line], key, where)
        names.add(output.name)
        lines.add((chip, output.line))
    if "plugin" in spec.allowed and not spec.plugins:
        raise ConfigError("actuators allow \"plugin\" but list no [[actuators.plugins]]", where)
    offered = offered_plugins(ACTUATOR_ENTRY_POINTS) if spec.plugins else []
    for index, plugin in enumerate(spec.plugins):
        key = f"actuators.plugins[{index}]"
        check_names(plugin.name, [], key, where)
        if plugin.plugin not in offered:
            raise ConfigError(f"{key}.plugin = {plugin.plugin!r} is offered by no installed package (entry point "
                              f"group {ACTUATOR_ENTRY_POINTS}: {', '.join(offered) or 'none'}); install the package "
                              "that provides it", where)
    if "modbus_write" in spec.allowed and not spec.modbus:
        raise ConfigError("actuators allow \"modbus_write\" but list no actuators.modbus points", where)


def _check_sensor_overlap(profile: Profile, where: str) -> None:
    """Two sensors producing one metric would interleave two series under one name."""
    first_of: dict[str, int] = {}
    for index, sensor in enumerate(profile.sensors):
        if sensor.kind != "system":
            if sensor.kind in first_of:
                raise ConfigError(
                    f"sensors[{index}] is a second kind = \"{sensor.kind}\" sensor: it would report the "
                    f"same metrics as sensors[{first_of[sensor.kind]}]; keep one", where,
                )
            first_of[sensor.kind] = index
            continue
        for metric in sorted(set(sensor.metrics) or SYSTEM_METRICS):
            if metric in first_of:
                raise ConfigError(
                    f"sensors[{index}] and sensors[{first_of[metric]}] both report {metric}: "
                    "give each system sensor its own metrics", where,
                )
            first_of[metric] = index


def produced_metric(profile: Profile, metric: str) -> bool:
    """Whether some sensor of `profile` can report `metric` (thermal names are only known at run time)."""
    for sensor in profile.sensors:
        if sensor.kind == "system" and metric in (set(sensor.metrics) or SYSTEM_METRICS):
            return True
        if sensor.kind == "thermal" and metric.startswith(THERMAL_PREFIX):
            return True
        # Any sigN, not just N < signals: `--set sim.signals=2` must not break a profile's deadbands.
        if sensor.kind == "sim" and SIM_METRIC.fullmatch(metric):
            return True
    return any(field_metric(spec, metric) for spec in profile.field_sensors)


def _check_report(profile: Profile, where: str) -> None:
    report = profile.report
    if not math.isfinite(report.default_deadband):
        raise ConfigError("report.default_deadband must be a finite number >= 0", where)
    for metric, band in report.deadband.items():
        if not METRIC_PATTERN.fullmatch(metric):
            raise ConfigError(
                f"report.deadband: {metric!r} is not a metric name (1 to 64 of A-Z a-z 0-9 _, "
                "or sensor.point for a field sensor)", where
            )
        if not produced_metric(profile, metric):
            raise ConfigError(
                f"report.deadband.{metric}: no sensor of this profile reports {metric!r}; "
                "check the spelling or the sensors' metrics", where,
            )
        if not (math.isfinite(band) and band >= 0):
            raise ConfigError(f"report.deadband.{metric} = {band}: must be a finite number >= 0", where)
    banded = report.default_deadband > 0 or any(band > 0 for band in report.deadband.values())
    if banded and 0 < report.heartbeat_s <= report.aggregate_s:
        raise ConfigError(
            f"report.heartbeat_s = {report.heartbeat_s} is not longer than report.aggregate_s = "
            f"{report.aggregate_s}: every window would be sent and the deadband would do nothing; "
            "raise heartbeat_s or set it to 0", where,
        )
