"""Policy documents (TOML): the schema and the validator both the agent and the hub import.

Stdlib and msgspec only, so the hub can check a policy before signing it. Every problem is
reported with its line and column in the TOML file; expression errors point inside the
`when`/`clear` string (exactly for strings without escapes, else at the string's start).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from edgefleet.errors import ConfigError
from edgefleet.policy.expr import Expr, ExprError, parse
from edgefleet.runtime.durations import POLICY_UNITS, parse_duration

EXAMPLE_POLICY: Final = '''\
# A worked example: cool down a hot board, keep a service alive, tell the hub.
version = 1

[target]
profile = "rpi-4"
tags = { site = "plant-a" }

[limits]
max_actions_per_hour = 20                # every rule together, on this device
escalate_after_fires_without_clear = 4   # fired 4 times and `clear` never held: suspend, tell the hub
escalate_after_failures = 3              # the action failed 3 times in a row: suspend, tell the hub

[[rules]]
name = "hot-cpu"
when = "avg(cpu_temp, 30s) > 75 and load1 > 2"
clear = "avg(cpu_temp, 1m) < 70"         # hysteresis: re-arms only once it has cooled to 70
action = "set_rate"
args = { sensor = "system", interval_s = 10 }
cooldown = "5m"
max_actions = 3
per = "1h"
offline = "act"                          # a hot board must not wait for the network

[[rules]]
name = "collector-stuck"
when = "age(mem_available_mb) > 120"
clear = "age(mem_available_mb) < 30"
action = "systemd_restart"
args = { unit = "edge-app.service" }
cooldown = 600
offline = "skip"
lease = { name = "restart-collector", limit = 1 }   # at most one device of the region at a time
approval = true

[[rules]]
name = "disk-filling"
when = "disk_used_percent > 90 or delta(disk_free_mb, 10m) < -500"
clear = "disk_used_percent < 85"
action = "alert"
args = { message = "disk almost full", severity = "critical" }
offline = "act"
'''

ActionKind = Literal["command", "systemd_restart", "set_rate", "alert", "record", "modbus_write",
                     "mqtt_publish", "gpio_set", "gpio_pulse", "plugin"]
ACTIONS: Final[tuple[ActionKind, ...]] = ("command", "systemd_restart", "set_rate", "alert", "record", "modbus_write",
                                          "mqtt_publish", "gpio_set", "gpio_pulse", "plugin")
RULE_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# No leading '-': a unit must never be read as an option by systemctl.
SYSTEMD_UNIT: Final = re.compile(r"[A-Za-z0-9_.@:\\][A-Za-z0-9_.@:\\-]{0,255}")
MAX_BUDGET_WINDOW_S: Final = 7 * 86400.0  # action times are kept for the window; a week is plenty
MAX_COMMAND_TIMEOUT_S: Final = 3600.0  # a command that needs longer is a job, not a reaction
DEFAULT_COMMAND_TIMEOUT_S: Final = 10.0
DEFAULT_APPROVAL_TIMEOUT_S: Final = 600.0  # an unanswered approval request counts as denied after this
MAX_APPROVAL_TIMEOUT_S: Final = 86400.0
DEFAULT_PER_S: Final = 3600.0  # max_actions without `per` counts per hour, like the device budget
_REQUIRED: Final = {
    "name": "a unique name, 1 to 64 of A-Z a-z 0-9 _ -",
    "when": "the condition that fires the rule, e.g. \"avg(cpu_temp, 30s) > 75\"",
    "clear": "the condition that re-arms it (hysteresis), e.g. \"avg(cpu_temp, 1m) < 70\"",
    "action": f"one of {', '.join(ACTIONS)}",
    "offline": "\"act\" or \"skip\": what to do while the hub is unreachable",
}

Section = tuple[int, int]  # 0-based [start, end) line range in the policy text
NonEmpty = Annotated[str, Meta(min_length=1, max_length=256)]
Count = Annotated[int, Meta(ge=1, le=100_000)]


# --- the validated document ---------------------------------------------------------------


class CommandArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    argv: Annotated[tuple[NonEmpty, ...], Meta(min_length=1)]  # run without a shell
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_COMMAND_TIMEOUT_S)] = DEFAULT_COMMAND_TIMEOUT_S


class SystemdRestartArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    unit: str  # checked against SYSTEMD_UNIT in the validator, for a readable message


class SetRateArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sensor: NonEmpty
    interval_s: Annotated[float, Meta(gt=0, le=86400)]


class AlertArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    message: Annotated[str, Meta(min_length=1, max_length=1024)]
    severity: Literal["info", "warning", "critical"] = "warning"


class RecordArgs(msgspec.Struct, frozen=True):
    values: dict[str, Any] = {}  # the `record` actuator keeps whatever it is given


class ModbusWriteArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    point: NonEmpty  # <sensor>.<point> of a coil or holding register the profile's actuators.modbus lists
    value: float | bool  # a coil takes 0/1 (or false/true); a register its scaled value


# Field actuators: a topic on a local broker, a GPIO output line (each listed in the profile's allowlists).
MAX_PAYLOAD_CHARS: Final = 4096  # a command to a plug or a valve, not a file transfer
MAX_PULSE_S: Final = 3600.0  # a relay pulse longer than an hour is a "set", not a pulse


class MqttPublishArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sensor: NonEmpty  # the kind = "mqtt" sensor whose broker the message goes to
    topic: NonEmpty
    payload: Annotated[str, Meta(max_length=MAX_PAYLOAD_CHARS)]
    retain: bool = False
    qos: Literal[0, 1] = 1


class GpioSetArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    output: NonEmpty  # a name from the profile's actuators.gpio_outputs
    value: bool  # true: active


class GpioPulseArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    output: NonEmpty
    seconds: Annotated[float, Meta(gt=0, le=MAX_PULSE_S)]  # away from its idle level, then back


class PluginArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    actuator: NonEmpty  # a name from the profile's [[actuators.plugins]]
    values: dict[str, Any] = {}  # handed to the plugin's write(args) as they are


ActionArgs = (CommandArgs | SystemdRestartArgs | SetRateArgs | AlertArgs | RecordArgs | ModbusWriteArgs
              | MqttPublishArgs | GpioSetArgs | GpioPulseArgs | PluginArgs)
_ARGS: Final[dict[str, type[msgspec.Struct]]] = {
    "command": CommandArgs, "systemd_restart": SystemdRestartArgs, "set_rate": SetRateArgs, "alert": AlertArgs,
    "modbus_write": ModbusWriteArgs,
    "mqtt_publish": MqttPublishArgs, "gpio_set": GpioSetArgs, "gpio_pulse": GpioPulseArgs, "plugin": PluginArgs,
}


class Lease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    limit: Count  # how many devices of the region may hold it at once
    wait_s: Annotated[float, Meta(gt=0, le=86400)] = 300.0  # queued longer than this: give up (audited)


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str | None = None
    region: str | None = None
    tags: dict[str, str] = {}


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_actions_per_hour: Count = 60  # one a minute on average across all rules
    escalate_after_fires_without_clear: Count = 5
    escalate_after_failures: Count = 3


class Rule(msgspec.Struct, frozen=True):
    name: str
    when: Expr
    clear: Expr
    action: ActionKind
    args: ActionArgs
    offline: Literal["act", "skip"]
    cooldown_s: float = 0.0
    max_actions: int | None = None  # None: only the device-wide budget applies
    per_s: float = DEFAULT_PER_S
    lease: Lease | None = None
    approval: bool = False
    approval_timeout_s: float = DEFAULT_APPROVAL_TIMEOUT_S
    line: int = 0  # where the rule starts in the policy text, for messages and audit


class Policy(msgspec.Struct, frozen=True):
    version: int  # as signed by the hub; a local file's own number; 0 when it has none
    rules: tuple[Rule, ...]
    limits: Limits = Limits()
    target: Target | None = None
    signed: bool = False  # from the hub (verified); False: a local policy file

    def targets(self, profile: str, region: str, tags: dict[str, str]) -> str | None:
        """Why a device with these properties is not this policy's target (None: it is)."""
        t = self.target
        if t is None:
            return None
        if t.profile is not None and t.profile != profile:
            return f"the policy targets profile {t.profile!r}, this device is {profile!r}"
        if t.region is not None and t.region != region:
            return f"the policy targets region {t.region!r}, this device is in {region!r}"
        for key, value in sorted(t.tags.items()):
            if tags.get(key) != value:
                return f"the policy targets {key}={value}, this device has {key}={tags.get(key, '(none)')}"
        return None

    @property
    def windows(self) -> frozenset[tuple[str, float]]:
        """Every (metric, seconds) window the engine must keep for these rules."""
        return frozenset().union(*(r.when.windows | r.clear.windows for r in self.rules))


@dataclass(frozen=True)
class Problem:
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.col}: {self.message}"


class PolicyError(ConfigError, ValueError):
    """A policy that cannot be used; `problems` lists every one found, in file order."""

    def __init__(self, problems: list[Problem], path: str | None = None) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line, p.col))
        super().__init__("invalid policy:\n  " + "\n  ".join(map(str, self.problems)), path)


# --- raw shapes, before expressions and durations are checked -------------------------------

DurationValue = str | Annotated[float, Meta(ge=0)]


class _RuleHead(msgspec.Struct, frozen=True):
    name: str
    when: str
    clear: str


class _RawRule(msgspec.Struct, frozen=True):
    action: str
    offline: Literal["act", "skip"]
    args: dict[str, Any] = {}
    cooldown: DurationValue = 0.0
    max_actions: Count | None = None
    per: DurationValue | None = None
    lease: Lease | None = None
    approval: bool = False
    approval_timeout: DurationValue | None = None


_RULE_KEYS: Final = frozenset(_RuleHead.__struct_fields__ + _RawRule.__struct_fields__)
_S = TypeVar("_S", bound=msgspec.Struct)


class _RawPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Optional: `edge-hub policy push` numbers policies itself (a number here must be higher
    # than every earlier push); a local policy file's number only labels its audit records.
    version: Annotated[int, Meta(ge=1)] | None = None
    rules: list[dict[str, Any]] = []
    limits: Limits = Limits()
    target: Target | None = None


_TOO_DEEP: Final = "arrays or tables nested beyond what can be read; flatten them"


def validate_policy(
    text: str, *, metrics: Iterable[str] | None, actuators_allowed: Iterable[str] | None
) -> Policy:
    """Validate a whole policy document; `None` skips the metric or actuator check."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line, col = (int(where[1]), int(where[2])) if where else (text.count("\n") + 1, 1)  # "at end of document"
        raise PolicyError([Problem(line, col, f"not valid TOML: {str(exc).split(' (at ')[0]}")]) from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise PolicyError([Problem(1, 1, _TOO_DEEP)]) from None
    locate = _Locator(text)
    problems: list[Problem] = []
    try:
        doc = msgspec.convert(raw, type=_RawPolicy, strict=True)
    except msgspec.ValidationError as exc:
        raise PolicyError([locate.schema_problem(str(exc), None)]) from None
    except RecursionError:
        raise PolicyError([Problem(1, 1, _TOO_DEEP)]) from None
    checker = _RuleChecker(
        locate, problems,
        None if metrics is None else frozenset(metrics),
        None if actuators_allowed is None else frozenset(actuators_allowed),
    )
    rules = [rule for index, raw_rule in enumerate(doc.rules) if (rule := checker.check(index, raw_rule))]
    if problems:
        raise PolicyError(problems)
    return Policy(version=doc.version or 0, rules=tuple(rules), limits=doc.limits, target=doc.target)


class _RuleChecker:
    """Validates one [[rules]] entry at a time, adding to `problems` instead of stopping."""

    def __init__(self, locate: _Locator, problems: list[Problem], metrics: frozenset[str] | None,
                 allowed: frozenset[str] | None) -> None:
        self.locate = locate
        self.problems = problems
        self.metrics = metrics
        self.allowed = allowed
        self.seen: dict[str, int] = {}

    def check(self, index: int, raw: dict[str, Any]) -> Rule | None:
        section = self.locate.rule_section(index)
        name = raw.get("name")
        label = f"rule {name!r}" if isinstance(name, str) else f"rule {index + 1}"
        before = len(self.problems)
        for key in sorted(set(raw) - _RULE_KEYS):
            self.add(section, key, f"{label}: unknown key `{key}`; rule keys are: {', '.join(sorted(_RULE_KEYS))}")
        for key in sorted(_REQUIRED.keys() - raw.keys()):
            self.add(section, None, f"{label}: missing `{key}`: {_REQUIRED[key]}")
        # The name and both expressions are checked even when other keys are wrong: one pass, every problem.
        head = self.convert(section, label, raw, _RuleHead)
        when = clear = None
        if head is not None:
            self.check_name(section, head.name)
            when = self.expression(section, label, "when", head.when)
            clear = self.expression(section, label, "clear", head.clear)
        rule = self.convert(section, label, raw, _RawRule)
        if rule is None:
            return None
        args = self.args(section, label, rule)
        cooldown = self.duration(section, "cooldown", rule.cooldown, label)
        per = DEFAULT_PER_S if rule.per is None else self.duration(section, "per", rule.per, label)
        if rule.per is not None and rule.max_actions is None:
            self.add(section, "per", f"{label}: `per` needs `max_actions` (at most max_actions per window)")
        approval_timeout = DEFAULT_APPROVAL_TIMEOUT_S if rule.approval_timeout is None else \
            self.duration(section, "approval_timeout", rule.approval_timeout, label)
        if rule.approval_timeout is not None and not rule.approval:
            self.add(section, "approval_timeout", f"{label}: `approval_timeout` needs `approval = true`")
        if approval_timeout is not None and not 0 < approval_timeout <= MAX_APPROVAL_TIMEOUT_S:
            self.add(section, "approval_timeout", f"{label}: `approval_timeout` must be more than 0 and at most "
                                                  f"{MAX_APPROVAL_TIMEOUT_S / 3600:g} hours")
        if per is not None and per > MAX_BUDGET_WINDOW_S:
            self.add(section, "per", f"{label}: `per` is longer than the limit of {MAX_BUDGET_WINDOW_S / 86400:g} days")
        if len(self.problems) > before or head is None or when is None or clear is None or args is None \
                or cooldown is None or per is None or approval_timeout is None:
            return None
        return Rule(
            name=head.name, when=when, clear=clear, action=rule.action, args=args,  # type: ignore[arg-type]  # checked in args()
            offline=rule.offline, cooldown_s=cooldown, max_actions=rule.max_actions, per_s=per,
            lease=rule.lease, approval=rule.approval, approval_timeout_s=approval_timeout, line=section[0] + 1,
        )

    def convert(self, section: Section, label: str, raw: dict[str, Any], kind: type[_S]) -> _S | None:
        fields = kind.__struct_fields__
        if not raw.keys() >= _REQUIRED.keys() & set(fields):
            return None  # already reported, once, with a hint
        try:
            return msgspec.convert({k: v for k, v in raw.items() if k in fields}, type=kind, strict=True)
        except msgspec.ValidationError as exc:
            self.problems.append(self.locate.schema_problem(str(exc), section, label))
            return None

    def add(self, section: Section, key: str | None, message: str) -> None:
        line, col = self.locate.key(section, key)
        self.problems.append(Problem(line, col, message))

    def check_name(self, section: Section, name: str) -> None:
        if not RULE_NAME.fullmatch(name):
            self.add(section, "name", f"rule name {name!r} is not allowed: use 1 to 64 of A-Z a-z 0-9 _ -")
        elif name in self.seen:
            self.add(section, "name", f"duplicate rule name {name!r} (first defined at line {self.seen[name]})")
        else:
            self.seen[name] = self.locate.key(section, "name")[0]

    def expression(self, section: Section, label: str, key: str, source: str) -> Expr | None:
        line, col, exact = self.locate.string_start(section, key, source)
        try:
            expr = parse(source, metrics=self.metrics, line=line, col=col)
        except ExprError as exc:
            # With escapes in the TOML string, offsets inside it do not match the file: point at its start.
            where = (exc.line, exc.col) if exact else (line, col)
            self.problems.append(Problem(*where, f"{label}: `{key}`: {exc.message}"))
            return None
        if not expr.is_condition:
            hint = f"a condition (a comparison, and, or, not), not a number: e.g. \"{source} > 0\""
            self.problems.append(Problem(line, col, f"{label}: `{key}` must be {hint}"))
            return None
        return expr

    def args(self, section: Section, label: str, rule: _RawRule) -> ActionArgs | None:
        if rule.action not in ACTIONS:
            self.add(section, "action", f"{label}: unknown action {rule.action!r}: use one of {', '.join(ACTIONS)}")
            return None
        if self.allowed is not None and rule.action not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "none"
            self.add(section, "action", f"{label}: action {rule.action!r} is not allowed by this device's profile; "
                                        f"allowed: {allowed}")
            return None
        if rule.action == "record":
            return RecordArgs(values=rule.args)
        try:
            args: ActionArgs = msgspec.convert(rule.args, type=_ARGS[rule.action], strict=True)  # type: ignore[assignment]  # _ARGS maps each action to its args struct
        except msgspec.ValidationError as exc:
            detail = _reword(str(exc), root="args")[1]
            self.add(section, "args", f"{label}: bad args for {rule.action}: {detail}")
            return None
        if isinstance(args, SystemdRestartArgs) and not SYSTEMD_UNIT.fullmatch(args.unit):
            self.add(section, "args", f"{label}: {args.unit!r} is not a systemd unit name "
                                      "(letters, digits and _ . @ : - \\, not starting with '-')")
            return None
        return args

    def duration(self, section: Section, key: str, value: str | float, label: str) -> float | None:
        if isinstance(value, str):
            try:
                seconds = parse_duration(value, POLICY_UNITS)
            except ValueError as exc:
                self.add(section, key, f"{label}: `{key}`: {exc}")
                return None
        else:
            seconds = float(value)  # a number of seconds; the same checks as a written duration
        if key == "per" and seconds <= 0:
            self.add(section, key, f"{label}: `per` must be longer than 0")
            return None
        return seconds


# --- where things are in the text ---------------------------------------------------------

_HEADER: Final = re.compile(r"^\s*\[")
_RULES_HEADER: Final = re.compile(r"^\s*\[\[\s*rules\s*\]\]")
_QUOTES: Final = ('"""', "'''", '"', "'")
_MSGSPEC_PATH: Final = re.compile(r" - at `\$((?:\.\w+|\[\d+\])*)`")
_MSGSPEC_FIELD: Final = re.compile(r"Object (contains unknown|missing required) field `(\w+)`")


class _Locator:
    """Finds lines and columns in the policy text; tomllib does not report them."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.headers = [i for i, line in enumerate(self.lines) if _HEADER.match(line)]
        self.rule_headers = [i for i, line in enumerate(self.lines) if _RULES_HEADER.match(line)]
        self.top: Section = (0, self.headers[0] if self.headers else len(self.lines))

    def rule_section(self, index: int) -> Section:
        if index >= len(self.rule_headers):  # e.g. `rules = [{...}]`: fall back to that key
            key = self.find(self.top, "rules")
            return (key[0] - 1 if key else 0), len(self.lines)
        start = self.rule_headers[index]
        return start, next((h for h in self.headers if h > start), len(self.lines))

    def find(self, section: Section, key: str) -> tuple[int, int] | None:
        """1-based (line, column) of `key =` inside the section."""
        pattern = re.compile(rf"^(\s*)[\"']?{re.escape(key)}[\"']?\s*=")
        for i in range(*section):
            if match := pattern.match(self.lines[i]):
                return i + 1, len(match[1]) + 1
        return None

    def key(self, section: Section, key: str | None) -> tuple[int, int]:
        return (self.find(section, key) if key else None) or (section[0] + 1, 1)

    def path(self, section: Section, keys: list[str]) -> tuple[int, int]:
        """The deepest of `keys` (a msgspec path) found, else the section."""
        if not keys:
            return section[0] + 1, 1
        if found := self.find(section, keys[0]):
            return found
        table = next((h for h in self.headers if re.match(rf"\s*\[\s*{re.escape(keys[0])}\s*\]", self.lines[h])),
                     None)
        if section != self.top or table is None:
            return section[0] + 1, 1
        sub = (table, next((h for h in self.headers if h > table), len(self.lines)))
        return (self.find(sub, keys[1]) if len(keys) > 1 else None) or (table + 1, 1)

    def string_start(self, section: Section, key: str, value: str) -> tuple[int, int, bool]:
        """Where a string value's characters start, and whether offsets in `value` map 1:1 to the file."""
        line, col = self.key(section, key)
        rest = self.lines[line - 1] if line <= len(self.lines) else ""
        eq = rest.find("=", col - 1)
        if eq < 0:
            return line, col, False
        offset = eq + 1 + len(rest[eq + 1:]) - len(rest[eq + 1:].lstrip(" \t"))
        quote = next((q for q in _QUOTES if rest.startswith(q, offset)), None)
        if quote is None:
            return line, offset + 1, False
        offset += len(quote)
        if len(quote) == 3 and rest[offset:offset + 2] in ("\n", "\r\n"):  # TOML drops this newline
            line, offset = line + 1, 0
        begin = self.starts[line - 1] + offset
        return line, offset + 1, self.text.startswith(value, begin)

    def schema_problem(self, error: str, section: Section | None, label: str = "") -> Problem:
        keys, message = _reword(error)
        line, col = self.path(section or self.top, keys)
        return Problem(line, col, f"{label}: {message}" if label else message)


def _reword(error: str, root: str = "") -> tuple[list[str], str]:
    """A msgspec error ('Expected ... - at `$.a[1]`', 'unknown field `x`') → (keys to locate, message)."""
    where = _MSGSPEC_PATH.search(error)
    path = where[1] if where else ""
    message = _MSGSPEC_PATH.sub("", error)
    keys = re.findall(r"\.(\w+)", path)
    shown = (root + path) if root else path.lstrip(".")
    if field := _MSGSPEC_FIELD.search(message):
        unknown = field[1].startswith("contains")
        key = f"{shown}.{field[2]}" if shown else field[2]
        return keys + [field[2]] * unknown, f"{'unknown' if unknown else 'missing required'} key `{key}`"
    message = message[0].lower() + message[1:]
    return keys, f"`{shown}`: {message}" if shown else message
