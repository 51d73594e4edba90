"""Firmware profiles: one TOML file per board family (sensors, sampling, budgets, actuators)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from edge_agent.errors import ConfigError
from edge_agent.protocol import NAME_PATTERN
from edge_agent.settings import apply_override, read_toml, to_struct

# Installed wheels carry the profiles inside the package; a source checkout has them at
# the top level, beside the package.
_PACKAGE_DIR: Final = Path(__file__).resolve().parent
PROFILE_DIRS: Final = (_PACKAGE_DIR / "firmware_profiles", _PACKAGE_DIR.parent / "firmware_profiles")

SYSTEM_METRICS: Final = frozenset({
    "cpu_percent", "load1", "load5", "load15", "mem_used_percent", "mem_available_mb",
    "disk_used_percent", "disk_free_mb", "net_bytes_sent", "net_bytes_recv", "cpu_temp",
})
ActuatorKind = Literal["command", "systemd_restart", "set_rate", "alert", "record"]


class Budgets(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    disk_mb: Annotated[float, Meta(gt=0)]  # outbox quota on disk
    memory_mb: Annotated[int, Meta(gt=0)] = 40  # what the agent is expected to stay under


class SensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["system", "thermal", "sim"]
    interval_s: Annotated[float, Meta(gt=0, le=86400)] = 5.0
    metrics: list[str] = []  # for kind="system": a subset of SYSTEM_METRICS; empty = all


class SimSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    signals: Annotated[int, Meta(ge=1, le=10_000)] = 4
    rate_hz: Annotated[float, Meta(gt=0, le=10_000)] = 1.0


class ActuatorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allowed: list[ActuatorKind] = []
    commands: list[list[str]] = []  # argv prefixes the "command" actuator may run
    units: list[str] = []  # systemd units the "systemd_restart" actuator may restart


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    description: str
    budgets: Budgets
    sensors: list[SensorSpec]
    board: str = ""
    sim: SimSpec = SimSpec()
    actuators: ActuatorSpec = ActuatorSpec()


PROFILE_KEYS: Final = frozenset(Profile.__struct_fields__)


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
    profile = to_struct(raw, Profile, str(path))
    check_profile(profile, path)
    return profile


def check_profile(profile: Profile, path: Path) -> None:
    """Rules a type cannot express; each error names the key and the fix."""
    where = str(path)
    if profile.name != path.stem:
        raise ConfigError(f"name = {profile.name!r} but the file is {path.name}: make them agree", where)
    if not profile.sensors:
        raise ConfigError("no sensors: add at least one [[sensors]] table", where)
    for index, sensor in enumerate(profile.sensors):
        unknown = sorted(set(sensor.metrics) - SYSTEM_METRICS)
        if sensor.kind != "system" and sensor.metrics:
            raise ConfigError(f"sensors[{index}].metrics is only for kind = \"system\"", where)
        if unknown:
            raise ConfigError(
                f"sensors[{index}].metrics: unknown {', '.join(unknown)}; "
                f"known: {', '.join(sorted(SYSTEM_METRICS))}", where,
            )
    if "command" in profile.actuators.allowed and not profile.actuators.commands:
        raise ConfigError("actuators allow \"command\" but list no actuators.commands", where)
    if "systemd_restart" in profile.actuators.allowed and not profile.actuators.units:
        raise ConfigError("actuators allow \"systemd_restart\" but list no actuators.units", where)
    if any(not argv for argv in profile.actuators.commands):
        raise ConfigError("actuators.commands has an empty argv", where)
