"""The profile's actuator allowlists, checked against an action's kind and arguments: the same
check refuses an action when its rule fires on the device and a policy before the hub signs it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from edgefleet.policy.document import CommandArgs, GpioPulseArgs, PluginArgs, RecordArgs, Rule
from edgefleet.policy.profiles import ActuatorSpec

ACTION_TIMEOUT: Final = 30.0  # systemctl, set_rate, alert and record: none should take longer


class Refused(Exception):
    """The allowlist says no; the message says what is allowed."""


class BadArgs(Exception):
    """The action's arguments are malformed; the message says which and how."""


def allowlist_refusal(spec: ActuatorSpec, kind: str, args: Mapping[str, object]) -> str | None:
    """Why the profile's allowlists refuse this action (its kind, a command's argv, a systemd
    unit), or None. The same check refuses an action when its rule fires (`Actuators.run`) and
    a policy before it is accepted (`config.check_policy`, which `edge-hub policy` runs)."""
    try:
        allowlisted(spec, kind, args)
    except (Refused, BadArgs) as exc:
        return str(exc)
    return None


def allowlisted(spec: ActuatorSpec, kind: str, args: Mapping[str, object]) -> list[str]:
    """The argv a command may run, [unit] for a restart, [topic] for an MQTT publish, [output] for a
    GPIO write ([] otherwise); Refused if the lists say no."""
    if kind not in spec.allowed:
        allowed = ", ".join(spec.allowed) or "nothing"
        raise Refused(f"actuator kind {kind!r} is not allowed by this profile; it allows: {allowed}.")
    if kind == "command":
        only_args(args, kind, {"argv"})
        argv = required_arg(args, "argv")
        if not isinstance(argv, list | tuple) or not argv or not all(isinstance(a, str) for a in argv):
            raise Refused("argv must be a non-empty list of strings; a shell command line is never run.")
        words = [str(a) for a in argv]
        if not any(words[: len(prefix)] == list(prefix) for prefix in spec.commands):
            allowed = "; ".join(" ".join(prefix) for prefix in spec.commands) or "none"
            raise Refused(f"command {words[:3]!r} does not start with an allowed prefix: {allowed}.")
        return words
    if kind == "systemd_restart":
        only_args(args, kind, {"unit"})
        unit = required_arg(args, "unit")
        if not isinstance(unit, str) or unit not in spec.units:
            allowed = ", ".join(spec.units) or "none"
            raise Refused(f"systemd unit {unit!r} is not allowed by this profile; allowed units: {allowed}.")
        return [unit]
    if kind == "modbus_write":
        only_args(args, kind, {"point", "value"})
        point = required_arg(args, "point")
        if not isinstance(point, str) or point not in spec.modbus:
            allowed = ", ".join(spec.modbus) or "none"
            raise Refused(f"Modbus point {point!r} may not be written on this device; writable: {allowed}.")
        value = required_arg(args, "value")
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise BadArgs(f"argument 'value' must be a finite number (or true/false for a coil), not {value!r}.")
        return [point]
    if kind == "mqtt_publish":
        topic = args.get("topic")
        if not isinstance(topic, str) or topic not in spec.mqtt_topics:
            allowed = ", ".join(spec.mqtt_topics) or "none"
            raise Refused(f"MQTT topic {topic!r} is not allowed by this profile; allowed topics: {allowed}.")
        return [topic]
    if kind in ("gpio_set", "gpio_pulse"):
        output = args.get("output")
        names = [o.name for o in spec.gpio_outputs]
        if not isinstance(output, str) or output not in names:
            raise Refused(f"GPIO output {output!r} is not allowed by this profile; allowed outputs: "
                          f"{', '.join(names) or 'none'}.")
        return [output]
    if kind == "plugin":
        only_args(args, kind, {"actuator", "values"})
        actuator = args.get("actuator")
        names = [p.name for p in spec.plugins]
        if not isinstance(actuator, str) or actuator not in names:
            raise Refused(f"plugin actuator {actuator!r} is not allowed by this profile; allowed: "
                          f"{', '.join(names) or 'none'}.")
        return [actuator]
    return []


def actuator_call(rule: Rule) -> tuple[str, dict[str, Any], float]:
    """The actuator's own argument shape for a validated rule: (kind, args, timeout)."""
    args = rule.args
    if isinstance(args, CommandArgs):
        return "command", {"argv": list(args.argv)}, args.timeout_s
    if isinstance(args, RecordArgs):
        return "record", dict(args.values), ACTION_TIMEOUT
    if isinstance(args, PluginArgs):
        return "plugin", {"actuator": args.actuator, "values": dict(args.values)}, ACTION_TIMEOUT
    if isinstance(args, GpioPulseArgs):  # the pulse itself, then the usual margin to put the line back
        return "gpio_pulse", msgspec.to_builtins(args), args.seconds + ACTION_TIMEOUT
    return rule.action, msgspec.to_builtins(args), ACTION_TIMEOUT


# --- argument checks --------------------------------------------------------------------


def only_args(args: Mapping[str, object], kind: str, known: set[str]) -> None:
    unknown = sorted(set(args) - known)
    if unknown:
        raise BadArgs(f"{kind} does not take {', '.join(unknown)}; it takes {', '.join(sorted(known))}.")


def required_arg(args: Mapping[str, object], key: str) -> object:
    if key not in args:
        raise BadArgs(f"argument {key!r} is missing.")
    return args[key]


def text_arg(args: Mapping[str, object], key: str) -> str:
    value = required_arg(args, key)
    if not isinstance(value, str) or not value:
        raise BadArgs(f"argument {key!r} must be a non-empty string, not {value!r}.")
    return value


def number_arg(args: Mapping[str, object], key: str) -> float:
    value = required_arg(args, key)
    # bool is an int in Python; `true` as a number is a policy mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadArgs(f"argument {key!r} must be a finite number >= 0, not {value!r}.")
    return float(value)
