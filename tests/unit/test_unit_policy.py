"""Policy documents: a good one becomes frozen structs; every bad one is refused with its line and column."""

from __future__ import annotations

import msgspec
import pytest

from edgefleet.errors import ConfigError
from edgefleet.policy.document import (
    ACTIONS,
    EXAMPLE_POLICY,
    AlertArgs,
    CommandArgs,
    Lease,
    Limits,
    PolicyError,
    RecordArgs,
    SetRateArgs,
    SystemdRestartArgs,
    validate_policy,
)
from edgefleet.policy.profiles import SYSTEM_METRICS

METRICS = SYSTEM_METRICS | {"sig0", "sig1"}

RULE = """\
[[rules]]
name = "{name}"
when = "cpu_temp > 75"
clear = "cpu_temp < 70"
action = "alert"
args = {{ message = "hot" }}
offline = "act"
"""


def rule(name: str = "hot", **replace: str) -> str:
    """One [[rules]] table; `replace` swaps a key's whole line (`key=""` drops it)."""
    lines = RULE.format(name=name).splitlines()
    for key, line in replace.items():
        index = next((i for i, text in enumerate(lines) if text.startswith(f"{key} =")), None)
        if index is None:
            lines.append(line)
        elif line:
            lines[index] = line
        else:
            del lines[index]
    return "\n".join(lines) + "\n"


def problems(text: str, *, allowed: list[str] | None = None) -> list[tuple[int, int, str]]:
    with pytest.raises(PolicyError) as caught:
        validate_policy(text, metrics=METRICS, actuators_allowed=allowed)
    return [(p.line, p.col, p.message) for p in caught.value.problems]


def only_problem(text: str, *, allowed: list[str] | None = None) -> tuple[int, int, str]:
    found = problems(text, allowed=allowed)
    assert len(found) == 1, found
    return found[0]


# --- good documents -------------------------------------------------------------------------


def test_the_example_policy_validates_into_typed_rules() -> None:
    policy = validate_policy(EXAMPLE_POLICY, metrics=SYSTEM_METRICS, actuators_allowed=ACTIONS)
    assert policy.version == 1
    assert policy.target is not None
    assert policy.target.profile == "rpi-4"
    assert policy.limits == Limits(max_actions_per_hour=20, escalate_after_fires_without_clear=4,
                                   escalate_after_failures=3)
    hot, stuck, disk = policy.rules
    assert hot.name == "hot-cpu"
    assert hot.when.windows == {("cpu_temp", 30.0)}
    assert hot.clear.source == "avg(cpu_temp, 1m) < 70"
    assert hot.args == SetRateArgs(sensor="system", interval_s=10.0)
    assert (hot.cooldown_s, hot.max_actions, hot.per_s, hot.offline) == (300.0, 3, 3600.0, "act")
    assert stuck.args == SystemdRestartArgs(unit="edge-app.service")
    assert (stuck.cooldown_s, stuck.lease, stuck.approval) == (600.0, Lease(name="restart-collector", limit=1), True)
    assert disk.args == AlertArgs(message="disk almost full", severity="critical")
    assert ("disk_free_mb", 600.0) in policy.windows
    assert [r.line for r in policy.rules] == [
        i + 1 for i, line in enumerate(EXAMPLE_POLICY.splitlines()) if line == "[[rules]]"
    ]
    with pytest.raises(AttributeError):
        hot.name = "other"  # type: ignore[misc]  # the point: validated rules are frozen


def test_defaults_for_a_minimal_policy() -> None:
    policy = validate_policy("version = 1\n" + rule(), metrics=None, actuators_allowed=None)
    (only,) = policy.rules
    assert policy.limits == Limits()
    assert policy.limits.max_actions_per_hour >= 1
    assert (only.cooldown_s, only.max_actions, only.lease, only.approval, only.line) == (0.0, None, None, False, 2)
    assert validate_policy("version = 2\n", metrics=None, actuators_allowed=None).rules == ()


@pytest.mark.parametrize(("line", "seconds"), [
    ("cooldown = 90", 90.0), ("cooldown = 2.5", 2.5), ('cooldown = "500ms"', 0.5), ('cooldown = "1h"', 3600.0),
    ('cooldown = "0s"', 0.0),
])
def test_cooldown_is_a_duration_string_or_seconds(line: str, seconds: float) -> None:
    policy = validate_policy("version = 1\n" + rule(cooldown=line), metrics=METRICS, actuators_allowed=None)
    assert policy.rules[0].cooldown_s == seconds


def test_each_action_gets_its_own_args() -> None:
    text = "version = 1\n" + "".join([
        rule("cmd", action='action = "command"', args='args = { argv = ["/usr/bin/logger", "hot"], timeout_s = 5 }'),
        rule("rate", action='action = "set_rate"', args='args = { sensor = "sim", interval_s = 0.5 }'),
        rule("rec", action='action = "record"', args='args = { anything = [1, "two"], nested = { a = 1 } }'),
        rule("plain", args='args = { message = "m" }'),
    ])
    cmd, rate, rec, plain = validate_policy(text, metrics=METRICS, actuators_allowed=None).rules
    assert cmd.args == CommandArgs(argv=("/usr/bin/logger", "hot"), timeout_s=5.0)
    assert rate.args == SetRateArgs(sensor="sim", interval_s=0.5)
    assert rec.args == RecordArgs(values={"anything": [1, "two"], "nested": {"a": 1}})
    assert plain.args == AlertArgs(message="m", severity="warning")


# --- bad documents, each problem at its place -----------------------------------------------


def test_duplicate_names_point_at_the_second_and_name_the_first() -> None:
    text = "version = 1\n" + rule("a") + rule("a")
    assert only_problem(text) == (10, 1, "duplicate rule name 'a' (first defined at line 3)")


@pytest.mark.parametrize(("line", "message"), [
    ('cooldown = "5 minutes"', "'5 minutes' is not a duration"),
    ('cooldown = "5d"', "not a duration"),
    ("cooldown = -1", "`cooldown`: expected `float` >= 0.0"),
    ("cooldown = true", "`cooldown`: expected `float | str`, got `bool`"),
])
def test_bad_cooldowns(line: str, message: str) -> None:
    found = only_problem("version = 1\n" + rule(cooldown=line))
    assert found[:2] == (9, 1)
    assert message in found[2]


def test_bad_budgets() -> None:
    assert "`per` must be longer than 0" in only_problem(
        "version = 1\n" + rule(max_actions="max_actions = 3", per='per = "0s"'))[2]
    assert "`per` needs `max_actions`" in only_problem("version = 1\n" + rule(per='per = "1h"'))[2]
    assert "longer than the limit of 7 days" in only_problem(
        "version = 1\n" + rule(max_actions="max_actions = 3", per='per = "200h"'))[2]
    assert only_problem("version = 1\n" + rule(max_actions="max_actions = 0"))[:2] == (9, 1)


def test_unknown_action_lists_the_known_ones() -> None:
    line, col, message = only_problem("version = 1\n" + rule(action='action = "reboot"'))
    assert (line, col) == (6, 1)
    assert "unknown action 'reboot'" in message
    assert "command, systemd_restart, set_rate, alert, record" in message


def test_an_action_the_profile_does_not_allow_is_refused_naming_the_allowed_ones() -> None:
    text = "version = 1\n" + rule(action='action = "command"', args='args = { argv = ["reboot"] }')
    line, col, message = only_problem(text, allowed=["record", "alert", "set_rate"])
    assert (line, col) == (6, 1)
    assert message == ("rule 'hot': action 'command' is not allowed by this device's profile; "
                       "allowed: alert, record, set_rate")
    assert "allowed: none" in only_problem(text, allowed=[])[2]


def test_offline_is_required_and_checked() -> None:
    line, col, message = only_problem("version = 1\n" + rule(offline=""))
    assert (line, col) == (2, 1)  # the rule's table: the key is not there to point at
    assert "missing `offline`" in message
    assert '"act" or "skip"' in message
    line, col, message = only_problem("version = 1\n" + rule(offline='offline = "sometimes"'))
    assert (line, col) == (8, 1)
    assert "invalid enum value 'sometimes'" in message


@pytest.mark.parametrize(("action", "args", "message"), [
    ("command", "args = { argv = [] }", "`args.argv`"),
    ("command", 'args = { argv = "rm -rf /" }', "`args.argv`: expected `array`, got `str`"),
    ("command", 'args = { argv = ["ls", ""] }', "`args.argv[1]`: expected `str` of length >= 1"),
    ("command", 'args = { argv = ["ls"], shell = true }', "unknown key `args.shell`"),
    ("command", 'args = { argv = ["ls"], timeout_s = 0 }', "`args.timeout_s`"),
    ("systemd_restart", 'args = { unit = "--force" }', "'--force' is not a systemd unit name"),
    ("systemd_restart", "args = {}", "missing required key `args.unit`"),
    ("set_rate", 'args = { sensor = "sim", interval_s = 0 }', "`args.interval_s`"),
    ("set_rate", "args = { interval_s = 1 }", "missing required key `args.sensor`"),
    ("alert", "args = {}", "missing required key `args.message`"),
    ("alert", 'args = { message = "m", severity = "panic" }', "`args.severity`: invalid enum value 'panic'"),
])
def test_bad_args_per_action(action: str, args: str, message: str) -> None:
    line, col, found = only_problem("version = 1\n" + rule(action=f'action = "{action}"', args=args))
    assert (line, col) == (7, 1)
    assert f"bad args for {action}" in found or "not a systemd unit name" in found
    assert message in found


def test_expression_errors_point_into_the_toml_file() -> None:
    text = "version = 1\n" + rule(when='when   =  "load1 > 2 and avg(cpu_tmp, 30s) > 75"')
    assert only_problem(text) == (
        4, 30, "rule 'hot': `when`: unknown metric 'cpu_tmp'; did you mean 'cpu_temp'?")
    text = "version = 1\n" + rule(clear="clear = '''\n  cpu_temp < 70 and\n  __import__(1)\n'''")
    assert only_problem(text)[:2] == (7, 3)  # a multi-line string: the line after the quotes
    text = "version = 1\n" + rule(clear="clear = '''cpu_temp < 70 or\n  cpu.__class__ > 1'''")
    assert only_problem(text)[:2] == (6, 7)


def test_an_expression_with_toml_escapes_is_reported_at_the_start_of_its_string() -> None:
    text = "version = 1\n" + rule(when='when = "cpu_temp\\t> \\u0031 and x ** 2"')
    line, col, message = only_problem(text)
    assert (line, col) == (4, 9)
    assert "no power operator" in message


def test_when_and_clear_must_be_conditions() -> None:
    line, col, message = only_problem("version = 1\n" + rule(when='when = "avg(cpu_temp, 30s)"'))
    assert (line, col) == (4, 9)
    assert "`when` must be a condition" in message


def test_an_expression_cannot_reach_python_from_a_policy() -> None:
    text = "version = 1\n" + rule(when="when = \"__import__('os').system('reboot')\"")
    line, col, message = only_problem(text)
    assert (line, col) == (4, 9)
    assert "an expression cannot reach Python" in message


def test_schema_problems_name_the_key_and_its_line() -> None:
    assert only_problem("version = 0\n")[:2] == (1, 1)
    assert validate_policy("[limits]\n", metrics=None, actuators_allowed=None).version == 0  # the hub numbers it
    assert only_problem("version = 1\nsigned = true\n") == (2, 1, "unknown key `signed`")
    text = "version = 1\n[limits]\nmax_actions_per_hour = 10\nescalate_after_failures = 0\n"
    assert only_problem(text)[:2] == (4, 1)
    assert "`limits.escalate_after_failures`" in only_problem(text)[2]
    line, col, message = only_problem("version = 1\n" + rule(approval="  approve = true"))
    assert (line, col) == (9, 3)
    assert "unknown key `approve`" in message
    assert "rule keys are: action, approval, approval_timeout, args" in message
    line, col, message = only_problem("version = 1\n" + rule("has space"))
    assert (line, col) == (3, 1)
    assert "rule name 'has space' is not allowed" in message


def test_not_toml_is_reported_at_its_line() -> None:
    line, _, message = only_problem("version = 1\n[[rules]]\nname = \n")
    assert line == 3
    assert message.startswith("not valid TOML")


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = "version = 1\n" + rule("a", when='when = "cpu_temp >"') + rule("a", action='action = "nope"') + rule(
        "b", offline="")
    found = problems(text)
    assert [line for line, _, _ in found] == [4, 10, 13, 16]
    with pytest.raises(PolicyError) as caught:
        validate_policy(text, metrics=METRICS, actuators_allowed=None)
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).splitlines()[1].strip().startswith("line 4, column ")


def test_a_validated_policy_is_not_meant_for_the_wire() -> None:
    policy = validate_policy(EXAMPLE_POLICY, metrics=None, actuators_allowed=None)
    # The hub signs the text; the structs hold compiled expressions and stay in the process.
    with pytest.raises(TypeError):
        msgspec.json.encode(policy)


@pytest.mark.parametrize("per", ["0", "0.0", '"0s"'])
def test_a_zero_budget_window_is_refused_however_it_is_written(per: str) -> None:
    text = ('version = 1\n[[rules]]\nname = "r"\nwhen = "x > 1"\nclear = "x < 0"\naction = "record"\n'
            f'args = {{}}\noffline = "act"\nmax_actions = 2\nper = {per}\n')
    with pytest.raises(PolicyError) as refused:
        validate_policy(text, metrics=None, actuators_allowed=None)
    assert "`per` must be longer than 0" in str(refused.value)
