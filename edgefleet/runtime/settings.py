"""Load TOML files into frozen, validated structs, with `--set KEY=VALUE` overrides.

Validation happens once, here, at the edge; code inside only sees typed structs.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from edgefleet.errors import ConfigError
from edgefleet.runtime.durations import parse_duration

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", str(path)) from None


def to_struct(raw: dict[str, Any], kind: type[T], source: str) -> T:
    """Validate `raw` into `kind`; the error names the offending key path."""
    try:
        return msgspec.convert(raw, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc).replace("`$.", "`"), source) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=3' → (['a', 'b'], 3). Values are TOML (numbers, booleans, strings, arrays);
    anything that is not valid TOML is taken as a plain string."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. sim.rate_hz=10")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def apply_override(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part} is a value, not a table")
        node = child
    node[parts[-1]] = value


def split_overrides(
    items: Iterable[str], targets: dict[str, set[str]]
) -> dict[str, list[tuple[list[str], Any]]]:
    """Route each override to the document whose top-level keys include its first part."""
    routed: dict[str, list[tuple[list[str], Any]]] = {name: [] for name in targets}
    for item in items:
        parts, value = parse_override(item)
        owner = next((name for name, keys in targets.items() if parts[0] in keys), None)
        if owner is None:
            known = ", ".join(sorted(set().union(*targets.values())))
            raise ConfigError(f"--set {item!r}: unknown setting {parts[0]!r}; settings are: {known}")
        routed[owner].append((parts, value))
    return routed


def struct_fields(kind: type[msgspec.Struct]) -> set[str]:
    return set(kind.__struct_fields__)


def toml_value(value: Any) -> str:
    """Render a scalar, list or flat table as TOML (for the files we write with comments)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def duration_arg(text: str) -> float:
    """An argparse type: seconds, or a duration (edgefleet.runtime.durations: 500ms, 30s, 5m, 1h, 7d)."""
    try:
        return parse_duration(text, bare_seconds=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
