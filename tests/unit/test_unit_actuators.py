"""Actuators: allowlist refusals, real subprocesses (timeouts, process groups, output), callbacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path

import psutil
import pytest

from edge_agent.decide.actuators import (
    KILL_GRACE_S,
    OUTPUT_LIMIT_BYTES,
    ActionResult,
    Actuators,
    Recorder,
)
from edge_agent.sense.sensors import Sampler, SimSensor
from edgefleet.errors import ConfigError, TransientError
from edgefleet.policy.profiles import ActuatorSpec, SimSpec, load_profile

TIMEOUT_S = 5.0  # for actions expected to finish: generous on a loaded CI machine
SHORT_S = 0.3  # for actions expected to overrun
GONE_WAIT_S = 3.0  # the kernel tears a killed process down asynchronously

SPEC = ActuatorSpec(
    allowed=["command", "systemd_restart", "set_rate", "alert", "record"],
    commands=[["/bin/echo"], ["/bin/sh", "-c"], ["/bin/false"], ["/nonexistent/tool"]],
    units=["edge-sensor.service"],
)


class Hook:
    """A started hook that counts what it saw; async, like an audit write."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    async def __call__(self, kind: str, args: Mapping[str, object]) -> None:
        self.seen.append((kind, dict(args)))


class Alerts:
    def __init__(self, error: Exception | None = None, delay: float = 0.0) -> None:
        self.raised: list[tuple[str, str]] = []
        self._error = error
        self._delay = delay

    async def __call__(self, message: str, severity: str) -> None:
        await asyncio.sleep(self._delay)
        if self._error is not None:
            raise self._error
        self.raised.append((message, severity))


def make(spec: ActuatorSpec = SPEC, **kwargs: object) -> tuple[Actuators, Hook]:
    hook = Hook()
    rates: list[tuple[str, float]] = []
    defaults: dict[str, object] = {
        "set_rate": lambda name, seconds: rates.append((name, seconds)),
        "alert": Alerts(),
        "started": hook,
    }
    defaults.update(kwargs)
    return Actuators(spec, **defaults), hook  # type: ignore[arg-type]  # test-only kwargs mix


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for a reaper that is not us (PID 1)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < deadline:  # no event says a process died; poll, bounded
        if all(gone(pid) for pid in pids):
            break
        await asyncio.sleep(0.02)
    assert [pid for pid in pids if not gone(pid)] == []


async def read_pids(path: Path, count: int) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(line) for line in path.read_text().split()]
            if len(pids) == count:
                return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never listed {count} pids")


# --- refusals ---------------------------------------------------------------------------


async def test_a_kind_the_profile_does_not_allow_is_refused_and_never_started() -> None:
    actuators, hook = make(ActuatorSpec(allowed=["record"]))
    result = await actuators.run("command", {"argv": ["/bin/echo", "hi"]}, timeout=TIMEOUT_S)
    assert result == ActionResult(
        ok=False, kind="command", refused=True, duration_s=0.0,
        detail="actuator kind 'command' is not allowed by this profile; it allows: record.",
    )
    assert (await actuators.run("reboot", {}, timeout=TIMEOUT_S)).refused
    assert hook.seen == []


@pytest.mark.parametrize("argv", [
    ["/bin/rm", "-rf", "/tmp/x"],
    ["/bin/sh"],  # shorter than the allowed prefix ['/bin/sh', '-c']
    ["/bin/sh", "-ce", "true"],  # prefixes match element by element, not as text
    ["/bin/echoes"],
    ["echo", "hi"],  # the allowed prefix names /bin/echo; PATH lookup is not a loophole
])
async def test_a_command_outside_the_allowed_prefixes_is_refused(argv: list[str]) -> None:
    actuators, hook = make()
    result = await actuators.run("command", {"argv": argv}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused, result.exit_code) == (False, True, None)
    assert "does not start with an allowed prefix: /bin/echo; /bin/sh -c;" in result.detail
    assert hook.seen == []


@pytest.mark.parametrize("argv", [
    "/bin/echo hi; rm -rf /",  # a shell command line is never split, never run
    "/bin/echo",
    ["/bin/echo", 1],
    [],
    ("/bin/echo", b"hi"),
])
async def test_argv_must_be_a_list_of_strings(argv: object) -> None:
    actuators, hook = make()
    result = await actuators.run("command", {"argv": argv}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused) == (False, True)
    assert "a shell command line is never run" in result.detail
    assert hook.seen == []


async def test_a_unit_not_listed_is_refused() -> None:
    actuators, hook = make()
    result = await actuators.run("systemd_restart", {"unit": "sshd.service"}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused) == (False, True)
    assert "allowed units: edge-sensor.service" in result.detail
    assert hook.seen == []


@pytest.mark.parametrize(("kind", "args", "message"), [
    ("command", {}, "argument 'argv' is missing"),
    ("command", {"argv": ["/bin/echo"], "shell": True}, "command does not take shell"),
    ("set_rate", {"sensor": "sim", "interval_s": True}, "must be a finite number >= 0"),
    ("set_rate", {"sensor": "", "interval_s": 1}, "must be a non-empty string"),
    ("alert", {"message": "hot", "severity": "apocalyptic"}, "is not one of info, warning, critical"),
    ("record", {"fail": "yes"}, "must be true or false"),
    ("record", {"sleep_s": float("inf")}, "must be a finite number >= 0"),
])
async def test_malformed_arguments_fail_before_the_action_starts(
    kind: str, args: dict[str, object], message: str
) -> None:
    actuators, hook = make()
    result = await actuators.run(kind, args, timeout=TIMEOUT_S)
    assert (result.ok, result.refused) == (False, False)
    assert message in result.detail
    assert hook.seen == []


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_meaningless_timeout_is_a_programming_error(timeout: float) -> None:
    actuators, _ = make()
    with pytest.raises(ValueError, match="timeout must be"):
        await actuators.run("record", {}, timeout=timeout)


@pytest.mark.parametrize(("allowed", "missing"), [(["set_rate"], "set_rate"), (["alert"], "alert")])
def test_an_allowed_kind_without_its_callback_is_a_config_error(allowed: list[str], missing: str) -> None:
    with pytest.raises(ConfigError, match=f"the profile allows {missing}"):
        Actuators(ActuatorSpec(allowed=allowed))  # type: ignore[arg-type]  # built from strings on purpose


# --- commands ---------------------------------------------------------------------------


async def test_a_command_runs_from_argv_and_its_output_is_captured() -> None:
    actuators, hook = make()
    args = {"argv": ["/bin/echo", "hello", "$HOME;", "*"]}  # no shell: nothing is expanded
    result = await actuators.run("command", args, timeout=TIMEOUT_S)
    assert (result.ok, result.exit_code, result.output) == (True, 0, "hello $HOME; *\n")
    assert (result.refused, result.timed_out) == (False, False)
    assert 0 < result.duration_s < TIMEOUT_S
    assert hook.seen == [("command", args)]


async def test_a_non_zero_exit_fails_with_its_code_and_stderr() -> None:
    actuators, _ = make()
    result = await actuators.run("command", {"argv": ["/bin/false"]}, timeout=TIMEOUT_S)
    assert (result.ok, result.exit_code, result.refused) == (False, 1, False)
    assert result.detail == "/bin/false exited with code 1."
    result = await actuators.run("command", {"argv": ["/bin/sh", "-c", "echo oops >&2; exit 3"]}, timeout=TIMEOUT_S)
    assert (result.ok, result.exit_code, result.output) == (False, 3, "oops\n")


async def test_the_command_gets_no_stdin() -> None:
    actuators, _ = make()
    result = await actuators.run("command", {"argv": ["/bin/sh", "-c", "cat; echo done"]}, timeout=TIMEOUT_S)
    assert (result.ok, result.output) == (True, "done\n")


async def test_a_missing_executable_fails_without_raising() -> None:
    actuators, hook = make()
    result = await actuators.run("command", {"argv": ["/nonexistent/tool"]}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused, result.exit_code) == (False, False, None)
    assert result.detail.startswith("could not start /nonexistent/tool: No such file or directory")
    assert len(hook.seen) == 1  # it was allowed, so it started (and failed)


async def test_output_is_truncated_with_a_marker_saying_how_much_was_cut() -> None:
    actuators, _ = make()
    ten_mb = 10_000_000
    argv = ["/bin/sh", "-c", f"head -c {ten_mb} /dev/zero | tr '\\0' x; echo tail >&2"]
    result = await actuators.run("command", {"argv": argv}, timeout=TIMEOUT_S)
    assert (result.ok, result.exit_code) == (True, 0)
    kept, marker = result.output.split("\n", 1)
    assert kept == "x" * OUTPUT_LIMIT_BYTES
    cut = ten_mb + len("tail\n") - OUTPUT_LIMIT_BYTES
    assert marker == f"[output truncated: {cut} more bytes not kept]"


async def test_an_overrunning_command_and_its_grandchild_are_killed(tmp_path: Path) -> None:
    actuators, _ = make()
    pids = tmp_path / "pids"
    script = f"echo $$ > {pids}; sleep 30 & echo $! >> {pids}; wait"
    began = time.monotonic()
    result = await actuators.run("command", {"argv": ["/bin/sh", "-c", script]}, timeout=SHORT_S)
    elapsed = time.monotonic() - began
    assert (result.ok, result.timed_out, result.refused) == (False, True, False)
    assert result.detail == f"/bin/sh did not finish within {SHORT_S:g} s and was killed."
    assert elapsed < SHORT_S + KILL_GRACE_S  # SIGTERM was enough: no wait for the SIGKILL grace
    await wait_gone(await read_pids(pids, 2))


async def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    actuators, _ = make()
    pids = tmp_path / "pids"
    # Ignored signals stay ignored across fork and exec: the grandchild ignores SIGTERM too.
    script = f"trap '' TERM; echo $$ > {pids}; sleep 30 & echo $! >> {pids}; wait"
    began = time.monotonic()
    result = await actuators.run("command", {"argv": ["/bin/sh", "-c", script]}, timeout=SHORT_S)
    elapsed = time.monotonic() - began
    assert (result.ok, result.timed_out) == (False, True)
    assert SHORT_S + KILL_GRACE_S <= elapsed < SHORT_S + 2 * KILL_GRACE_S + 1.0
    await wait_gone(await read_pids(pids, 2))


async def test_a_grandchild_holding_the_output_open_counts_as_still_running(tmp_path: Path) -> None:
    actuators, _ = make()
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo started"  # sh exits at once, sleep keeps stdout
    result = await actuators.run("command", {"argv": ["/bin/sh", "-c", script]}, timeout=SHORT_S)
    assert (result.ok, result.timed_out, result.output) == (False, True, "started\n")
    await wait_gone(await read_pids(pids, 1))


async def test_cancelling_the_run_kills_the_process_group(tmp_path: Path) -> None:
    actuators, _ = make()
    pids = tmp_path / "pids"
    script = f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; wait"
    task = asyncio.create_task(actuators.run("command", {"argv": ["/bin/sh", "-c", script]}, timeout=60.0))
    found = await read_pids(pids, 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(found)


# --- systemd ----------------------------------------------------------------------------


async def test_restart_runs_systemctl_restart_for_an_allowed_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "systemctl"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr("edge_agent.decide.actuators.shutil.which",
                        lambda name: str(fake) if name == "systemctl" else None)
    actuators, hook = make()
    result = await actuators.run("systemd_restart", {"unit": "edge-sensor.service"}, timeout=TIMEOUT_S)
    assert (result.ok, result.exit_code) == (True, 0)
    assert result.output == "--no-ask-password restart edge-sensor.service\n"
    assert hook.seen == [("systemd_restart", {"unit": "edge-sensor.service"})]


async def test_restart_without_systemctl_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edge_agent.decide.actuators.shutil.which", lambda name: None)
    actuators, _ = make()
    result = await actuators.run("systemd_restart", {"unit": "edge-sensor.service"}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused, result.exit_code) == (False, False, None)
    assert result.detail == "cannot restart edge-sensor.service: systemctl is not installed on this host."


# --- set_rate, alert, record ------------------------------------------------------------


async def test_set_rate_changes_a_real_samplers_interval_and_reports_its_errors() -> None:
    sensor = SimSensor(SimSpec(), seed=1, interval=1.0)
    sampler = Sampler([sensor], lambda batch: None)
    actuators, _ = make(set_rate=sampler.set_interval)
    result = await actuators.run("set_rate", {"sensor": "sim", "interval_s": 0.25}, timeout=TIMEOUT_S)
    assert (result.ok, result.detail, sensor.interval) == (True, "sensor 'sim' now reads every 0.25 s.", 0.25)
    result = await actuators.run("set_rate", {"sensor": "gps", "interval_s": 2}, timeout=TIMEOUT_S)
    assert (result.ok, result.refused) == (False, False)
    assert result.detail == "could not change the rate: no sensor named 'gps'; sensors: sim"
    result = await actuators.run("set_rate", {"sensor": "sim", "interval_s": 0}, timeout=TIMEOUT_S)
    assert not result.ok
    assert "must be > 0" in result.detail
    assert sensor.interval == 0.25


async def test_alert_reaches_the_hub_callback_with_a_default_severity() -> None:
    alerts = Alerts()
    actuators, hook = make(alert=alerts)
    assert (await actuators.run("alert", {"message": "too hot"}, timeout=TIMEOUT_S)).ok
    assert (await actuators.run("alert", {"message": "on fire", "severity": "critical"}, timeout=TIMEOUT_S)).ok
    assert alerts.raised == [("too hot", "warning"), ("on fire", "critical")]
    assert len(hook.seen) == 2


async def test_an_alert_that_cannot_be_delivered_fails_without_raising() -> None:
    actuators, _ = make(alert=Alerts(error=TransientError("hub unreachable")))
    result = await actuators.run("alert", {"message": "too hot"}, timeout=TIMEOUT_S)
    assert (result.ok, result.detail) == (False, "the alert could not be raised: hub unreachable")
    actuators, _ = make(alert=Alerts(delay=30.0))
    result = await actuators.run("alert", {"message": "too hot"}, timeout=SHORT_S)
    assert (result.ok, result.timed_out) == (False, True)


async def test_record_keeps_each_invocation_and_can_fail_or_overrun_on_request() -> None:
    clock = iter(range(100, 200))
    recorder = Recorder(clock=lambda: float(next(clock)))
    actuators, hook = make(recorder=recorder)
    assert (await actuators.run("record", {"rule": "hot", "value": 81.5}, timeout=TIMEOUT_S)).ok
    failed = await actuators.run("record", {"fail": True}, timeout=TIMEOUT_S)
    assert (failed.ok, failed.refused, failed.detail) == (
        False, False, "the recording failed because its arguments asked it to."
    )
    slept = await actuators.run("record", {"sleep_s": 0.05}, timeout=TIMEOUT_S)
    assert slept.ok
    assert slept.duration_s >= 0.05
    overran = await actuators.run("record", {"sleep_s": 30}, timeout=SHORT_S)
    assert (overran.ok, overran.timed_out) == (False, True)
    assert overran.duration_s < 30
    assert recorder.calls == [
        (100.0, {"rule": "hot", "value": 81.5}), (101.0, {"fail": True}),
        (102.0, {"sleep_s": 0.05}), (103.0, {"sleep_s": 30}),
    ]
    assert len(hook.seen) == 4


async def test_the_recorder_is_bounded() -> None:
    actuators, _ = make(recorder=Recorder(limit=3))
    for n in range(5):
        await actuators.run("record", {"n": n}, timeout=TIMEOUT_S)
    assert [args for _, args in actuators.recorder.calls] == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert actuators.recorder.dropped == 2


async def test_the_sim_profile_records_and_refuses_commands() -> None:
    profile = load_profile("sim")
    actuators, hook = make(profile.actuators)
    assert (await actuators.run("record", {"x": 1}, timeout=TIMEOUT_S)).ok
    assert (await actuators.run("command", {"argv": ["/bin/echo"]}, timeout=TIMEOUT_S)).refused
    assert [args for _, args in actuators.recorder.calls] == [{"x": 1}]
    assert [kind for kind, _ in hook.seen] == ["record"]


# --- the started hook -------------------------------------------------------------------


async def test_the_started_hook_runs_once_before_each_started_action() -> None:
    order: list[str] = []

    def sync_hook(kind: str, args: Mapping[str, object]) -> None:
        order.append(f"started {kind}")

    async def alert(message: str, severity: str) -> None:
        order.append(f"alert {message}")

    actuators, _ = make(started=sync_hook, alert=alert)
    await actuators.run("alert", {"message": "a"}, timeout=TIMEOUT_S)
    await actuators.run("command", {"argv": ["/bin/rm"]}, timeout=TIMEOUT_S)  # refused
    await actuators.run("command", {"argv": ["/bin/false"]}, timeout=TIMEOUT_S)  # started, fails
    assert order == ["started alert", "alert a", "started command"]


async def test_a_hook_given_to_run_replaces_the_default_for_that_call() -> None:
    actuators, default = make()
    own = Hook()
    await actuators.run("record", {}, timeout=TIMEOUT_S, started=own)
    assert (own.seen, default.seen) == ([("record", {})], [])


async def test_a_failing_hook_stops_the_action() -> None:
    def broken(kind: str, args: Mapping[str, object]) -> Awaitable[None] | None:
        raise OSError("audit disk full")

    actuators, _ = make(started=broken)
    with pytest.raises(OSError, match="audit disk full"):
        await actuators.run("record", {}, timeout=TIMEOUT_S)
    assert actuators.recorder.calls == []

