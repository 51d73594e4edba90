"""The rule engine, unit level: a real Outbox (SQLite in tmp_path), real ReadingWindows on a
clock the test moves, real Actuators; decisions are read back from the audit events the
outbox committed and from the recording actuator's calls.

Every step feeds readings, then awaits `engine.drain()` (bounded), so each decision and its
action are finished before the next reading: the counts below are exact, not "at most".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_agent.buffer.outbox import Outbox, OutboxUnwritable
from edge_agent.decide.actuators import KILL_GRACE_S, Actuators, Recorder
from edge_agent.decide.rules import RuleEngine
from edge_agent.decide.windows import ReadingWindows
from edge_agent.sense.sensors import Reading
from edgefleet.policy.document import validate_policy
from edgefleet.policy.profiles import ActuatorSpec

QUOTA = 50_000_000
DRAIN_TIMEOUT = 10.0  # one step's decisions and actions; each takes milliseconds
SIM_SPEC = ActuatorSpec(allowed=["record"])  # the sim profile's recorder, without alert/set_rate callbacks
T0 = 1_700_000_000.0


class Clock:
    """The engine's and the windows' clock; only the test moves it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Rig:
    engine: RuleEngine
    outbox: Outbox
    actuators: Actuators
    clock: Clock
    online: list[bool]  # [reachable]; the engine's hub_reachable reads it

    @property
    def calls(self) -> list[dict[str, object]]:
        return [args for _, args in self.actuators.recorder.calls]

    async def feed(self, metric: str, value: float, *, drain: bool = True) -> None:
        self.engine.on_readings([Reading(metric, self.clock(), value)])
        if drain:
            await self.drain()

    async def drain(self) -> None:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await self.engine.drain()

    async def events(self, kind: str | None = None, rule: str | None = None) -> list[dict[str, Any]]:
        """Committed audit events, oldest first: {"seq", "kind", **body}."""
        out = []
        for record in await self.outbox.read_after(0, 1_000_000):
            if record.kind is None:
                continue
            assert record.body is not None
            body = json.loads(record.body)
            if (kind is None or record.kind == kind) and (rule is None or body.get("rule") == rule):
                out.append({"seq": record.seq, "kind": record.kind, **body})
        return out

    async def kinds(self, rule: str | None = None) -> list[str]:
        return [e["kind"] for e in await self.events(rule=rule)]


RigFactory = Callable[..., Any]


async def until(predicate: Callable[[], bool], what: str, timeout: float = DRAIN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    outboxes: list[Outbox] = []

    async def make(policy_text: str, *, spec: ActuatorSpec = SIM_SPEC, online: bool = True) -> Rig:
        # actuators_allowed=None: the policy passes whatever the Actuators below allow.
        policy = validate_policy(policy_text, metrics=None, actuators_allowed=None)
        keep = {m: 0.0 for rule in policy.rules for m in rule.when.metrics | rule.clear.metrics}
        for metric, seconds in policy.windows:
            keep[metric] = max(keep[metric], seconds)
        clock = Clock()
        outbox = await Outbox.open(tmp_path / f"state-{len(outboxes)}", QUOTA, "normal")
        outboxes.append(outbox)
        actuators = Actuators(spec, recorder=Recorder(clock=clock))
        reachable = [online]
        engine = RuleEngine(policy, ReadingWindows(keep, clock), actuators, outbox,
                            hub_reachable=lambda: reachable[0], clock=clock)
        return Rig(engine, outbox, actuators, clock, reachable)

    yield make
    for outbox in outboxes:
        await outbox.close()


def policy(*rules: str, limits: str = "") -> str:
    text = "version = 7\n"
    if limits:
        text += f"[limits]\n{limits}\n"
    return text + "".join(f"\n[[rules]]\n{r.strip()}\n" for r in rules)


def rule(name: str, when: str = "temp > 75", clear: str = "temp < 70", *, action: str = "record",
         args: str | None = None, offline: str = "act", extra: str = "") -> str:
    args = args if args is not None else f'{{ rule = "{name}" }}'
    return (f'name = "{name}"\nwhen = "{when}"\nclear = "{clear}"\naction = "{action}"\n'
            f'args = {args}\noffline = "{offline}"\n{extra}')


# --- 1. hysteresis -----------------------------------------------------------------------------


async def test_noisy_input_around_the_threshold_fires_once_until_cleared(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("hot")))
    noise = random.Random(4)
    values = [noise.uniform(74.0, 76.0) for _ in range(200)]
    values[0] = 75.5  # fires on the very first reading, then noise crosses 75 again and again
    crossings = sum(1 for a, b in itertools.pairwise(values) if a <= 75 < b)
    assert crossings >= 20, "the noise must cross the `when` threshold many times"
    for v in values:
        r.clock.advance(0.01)
        await r.feed("temp", v)
    assert r.calls == [{"rule": "hot"}]
    assert await r.kinds() == ["rule_fired", "action_started", "action_succeeded"]
    fired = (await r.events("rule_fired"))[0]
    assert fired["policy_version"] == 7
    assert fired["readings"] == {"temp": 75.5}
    assert r.engine.states["hot"].active

    # Down to 72 (between the two thresholds): still no clear, no second action.
    await r.feed("temp", 72.0)
    await r.feed("temp", 76.0)
    assert len(r.calls) == 1
    # Below the clear threshold: it re-arms (audited), and fires once more on the next crossing.
    await r.feed("temp", 69.0)
    assert not r.engine.states["hot"].active
    for v in values:
        r.clock.advance(0.01)
        await r.feed("temp", v)
    assert r.calls == [{"rule": "hot"}, {"rule": "hot"}]
    assert await r.kinds() == ["rule_fired", "action_started", "action_succeeded", "rule_cleared",
                               "rule_fired", "action_started", "action_succeeded"]
    assert len(r.engine.latencies_ms) == 2


async def test_window_condition_with_hysteresis(rig: RigFactory) -> None:
    """`avg(temp, 30s) > 75` / `avg(temp, 30s) < 70`: a single spike does not fire; a sustained
    rise does, once; the average must fall below 70 before it can fire again."""
    r: Rig = await rig(policy(rule("avg", when="avg(temp, 30s) > 75", clear="avg(temp, 30s) < 70")))
    for _ in range(60):
        r.clock.advance(1.0)
        await r.feed("temp", 60.0)
    await r.feed("temp", 200.0)  # one spike: the 30 s average is ~64.5
    assert r.calls == []
    noise = random.Random(5)
    for _ in range(120):
        r.clock.advance(1.0)
        await r.feed("temp", noise.uniform(78.0, 82.0))
    assert len(r.calls) == 1
    for _ in range(30):  # cooling, but the average stays above 70 for a while
        r.clock.advance(1.0)
        await r.feed("temp", 66.0)
    assert len(r.calls) == 1
    assert await r.kinds() == ["rule_fired", "action_started", "action_succeeded", "rule_cleared"]
    for _ in range(60):
        r.clock.advance(1.0)
        await r.feed("temp", 80.0)
    assert len(r.calls) == 2


async def test_a_lagging_clear_window_does_not_flap_a_rising_signal(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("hot-cpu", when="avg(temp, 30s) > 75", clear="avg(temp, 1m) < 70")))
    for _ in range(60):
        r.clock.advance(1.0)
        await r.feed("temp", 60.0)
    for _ in range(60):  # the board heats up to 80 and stays there: one activation
        r.clock.advance(1.0)
        await r.feed("temp", 80.0)
    assert len(r.calls) == 1
    assert "rule_cleared" not in await r.kinds()


# --- 2. cooldown and budgets under a burst -----------------------------------------------------


async def test_cooldown_holds_across_repeated_activations(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("cool", extra='cooldown = "60s"')))
    for _ in range(100):  # 100 activations (fire, clear, fire, ...) within 10 s
        r.clock.advance(0.05)
        await r.feed("temp", 80.0)
        r.clock.advance(0.05)
        await r.feed("temp", 60.0)
    assert len(r.calls) == 1
    skipped = await r.events("action_skipped")
    assert len(skipped) == 99
    assert all(s["detail"] == "within its cooldown of 60 s" for s in skipped)
    assert all(s["rule"] == "cool" and s["action"] == "record" for s in skipped)
    # Every skip is a decision: a rule_fired record goes with it, committed together.
    assert len(await r.events("rule_fired")) == 100
    assert len(await r.events("action_started")) == 1
    assert r.engine.states["cool"].suspended is None  # it cleared each time: no escalation

    r.clock.advance(60.0)
    await r.feed("temp", 80.0)
    assert len(r.calls) == 2


async def test_rule_budget_caps_a_burst(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("budget", extra='max_actions = 3\nper = "10m"')))
    for _ in range(300):
        r.clock.advance(0.1)
        await r.feed("temp", 80.0)
        await r.feed("temp", 60.0)
    assert len(r.calls) == 3
    skipped = await r.events("action_skipped")
    assert len(skipped) == 297
    assert {s["detail"] for s in skipped} == {"its budget of 3 actions per 600 s is spent"}
    assert len(await r.events("action_succeeded")) == 3

    # The window slides: 10 minutes after the first action, one more is allowed.
    first = r.actuators.recorder.calls[0][0]
    r.clock.t = first + 600.0 + 0.05
    await r.feed("temp", 80.0)
    assert len(r.calls) == 4
    await r.feed("temp", 60.0)
    await r.feed("temp", 80.0)
    assert len(r.calls) == 4


async def test_device_budget_caps_a_burst_across_rules(rig: RigFactory) -> None:
    rules = [rule(f"r{i}", when=f"m{i} > 75", clear=f"m{i} < 70") for i in range(3)]
    r: Rig = await rig(policy(*rules, limits="max_actions_per_hour = 5"))
    for _ in range(200):
        r.clock.advance(1.0)
        for i in range(3):
            await r.feed(f"m{i}", 80.0)
            await r.feed(f"m{i}", 60.0)
    assert len(r.calls) == 5
    skipped = await r.events("action_skipped")
    assert len(skipped) == 600 - 5
    assert {s["detail"] for s in skipped} == {"the device's budget of 5 actions per hour is spent"}
    assert {s["rule"] for s in skipped} == {"r0", "r1", "r2"}

    r.clock.advance(3600.0)
    await r.feed("m1", 80.0)
    assert r.calls[-1] == {"rule": "r1"}
    assert len(r.calls) == 6


async def test_budget_holds_when_readings_outpace_actions(rig: RigFactory) -> None:
    """A burst fed without waiting for the actions (as the sampler does): decisions overlap
    running actions of other rules, and still no more than the budgets act."""
    rules = [rule(f"r{i}", when=f"m{i} > 75", clear=f"m{i} < 70", args=f'{{ rule = "r{i}", sleep_s = 0.005 }}',
                  extra="max_actions = 2") for i in range(4)]
    r: Rig = await rig(policy(*rules, limits="max_actions_per_hour = 5"))
    async with asyncio.timeout(30):
        for n in range(400):
            r.clock.advance(0.01)
            for i in range(4):
                await r.feed(f"m{i}", 80.0 if n % 2 == 0 else 60.0, drain=False)
            await asyncio.sleep(0.002)
    await r.drain()
    counts = {f"r{i}": sum(1 for c in r.calls if c["rule"] == f"r{i}") for i in range(4)}
    assert sum(counts.values()) == 5, counts
    assert max(counts.values()) <= 2, counts
    assert len(await r.events("action_started")) == 5
    assert len(await r.events("action_skipped")) > 50


async def test_a_clear_during_a_running_action_re_arms_the_rule(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("slow", args="{ sleep_s = 0.3 }")))
    await r.feed("temp", 80.0, drain=False)
    await until(lambda: bool(r.calls), "the recorder was entered")  # the action is running
    await r.feed("temp", 60.0, drain=False)  # cooled while the action ran
    await r.drain()
    await r.feed("temp", 72.0)  # between the thresholds
    await r.feed("temp", 80.0)  # a new rise: a new activation
    assert "rule_cleared" in await r.kinds()
    assert len(r.calls) == 2


# --- 3. offline = "act" / "skip" -----------------------------------------------------------------


async def test_offline_act_and_skip(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("acts", offline="act"), rule("skips", offline="skip")), online=False)
    await r.feed("temp", 80.0)
    assert r.calls == [{"rule": "acts"}]
    assert await r.kinds("acts") == ["rule_fired", "action_started", "action_succeeded"]
    assert await r.kinds("skips") == ["rule_fired", "action_skipped"]
    skipped = (await r.events("action_skipped"))[0]
    assert skipped["detail"] == 'the hub is unreachable and the rule says offline = "skip"'
    assert skipped["policy_version"] == 7

    # Back online: the next activation of the skip rule acts.
    r.online[0] = True
    await r.feed("temp", 60.0)
    await r.feed("temp", 80.0)
    assert sorted(c["rule"] for c in r.calls) == ["acts", "acts", "skips"]  # type: ignore[type-var]
    assert (await r.kinds("skips"))[-3:] == ["rule_fired", "action_started", "action_succeeded"]


# --- 4. escalation -----------------------------------------------------------------------------


async def test_escalation_after_firing_without_clear(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("stuck", extra='cooldown = "10s"'),
                              limits="escalate_after_fires_without_clear = 3"))
    for _ in range(100):  # `when` holds throughout; the clear condition never does
        r.clock.advance(2.5)
        await r.feed("temp", 80.0)
    assert r.engine.states["stuck"].suspended == "fires_without_clear"
    escalations = await r.events("escalation")
    assert len(escalations) == 1
    assert escalations[0]["reason"] == "fires_without_clear"
    assert escalations[0]["rule"] == "stuck"
    assert "without its clear condition holding" in escalations[0]["detail"]
    assert len(r.calls) == 3  # the first action, and two more after each cooldown
    last_action = (await r.events("action_succeeded"))[-1]["seq"]
    assert escalations[0]["seq"] > last_action

    # Suspended: nothing more, not even after it clears and fires again.
    before = await r.kinds()
    for v in (60.0, 80.0, 60.0, 80.0):
        r.clock.advance(60.0)
        await r.feed("temp", v)
    assert len(r.calls) == 3
    assert await r.kinds() == before


async def test_escalation_after_repeated_failures(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("broken", args="{ fail = true }"), limits="escalate_after_failures = 3"))
    for _ in range(20):  # every activation acts (no cooldown), and every action fails
        r.clock.advance(1.0)
        await r.feed("temp", 80.0)
        await r.feed("temp", 60.0)
    assert len(r.calls) == 3
    failed = await r.events("action_failed")
    assert len(failed) == 3
    assert all(f["timed_out"] is False and "failed" in f["detail"] for f in failed)
    escalations = await r.events("escalation")
    assert [(e["rule"], e["reason"]) for e in escalations] == [("broken", "repeated_failures")]
    assert "failed 3 times in a row" in escalations[0]["detail"]
    assert r.engine.states["broken"].suspended == "repeated_failures"
    assert (await r.kinds())[-1] == "escalation"


async def test_escalation_after_repeated_command_failures(rig: RigFactory) -> None:
    spec = ActuatorSpec(allowed=["command"], commands=[["/bin/false"]])
    r: Rig = await rig(policy(rule("cmd", action="command", args='{ argv = ["/bin/false"] }'),
                              limits="escalate_after_failures = 2"), spec=spec)
    for _ in range(5):
        r.clock.advance(1.0)
        await r.feed("temp", 80.0)
        await r.feed("temp", 60.0)
    failed = await r.events("action_failed")
    assert [f["exit_code"] for f in failed] == [1, 1]
    assert [e["reason"] for e in await r.events("escalation")] == ["repeated_failures"]


async def test_a_success_resets_the_failure_count(rig: RigFactory, tmp_path: Path) -> None:
    """Failures must be in a row: fail, fail, succeed, fail, fail does not escalate at 3."""
    flag = tmp_path / "fail"
    spec = ActuatorSpec(allowed=["command"], commands=[["/bin/sh", "-c"]])
    args = f'{{ argv = ["/bin/sh", "-c", "test ! -e {flag}"] }}'
    r: Rig = await rig(policy(rule("flaky", action="command", args=args), limits="escalate_after_failures = 3"),
                       spec=spec)
    for fails in (True, True, False, True, True):
        if fails:
            flag.touch()
        else:
            flag.unlink()
        await r.feed("temp", 80.0)
        await r.feed("temp", 60.0)
    assert [e["kind"] for e in await r.events() if e["kind"].startswith("action_")] == [
        "action_started", "action_failed", "action_started", "action_failed", "action_started",
        "action_succeeded", "action_started", "action_failed", "action_started", "action_failed"]
    assert r.engine.states["flaky"].suspended is None
    assert await r.events("escalation") == []
    await r.feed("temp", 80.0)  # the third failure in a row
    assert r.engine.states["flaky"].suspended == "repeated_failures"


# --- 5. allowlist refusal and command timeout ---------------------------------------------------


async def test_disallowed_actuator_is_refused_and_audited(rig: RigFactory) -> None:
    alert = rule("shout", action="alert", args='{ message = "too hot", severity = "critical" }')
    command = rule("run", when="load > 2", clear="load < 1", action="command", args='{ argv = ["/bin/echo", "hi"] }')
    r: Rig = await rig(policy(alert, command))  # the spec allows only record
    await r.feed("temp", 80.0)
    await r.feed("load", 3.0)
    assert r.calls == []
    for name, kind in (("shout", "alert"), ("run", "command")):
        assert await r.kinds(name) == ["rule_fired", "action_refused"]
        refused = (await r.events("action_refused", name))[0]
        assert refused["action"] == kind
        assert f"actuator kind {kind!r} is not allowed by this profile" in refused["detail"]
        assert refused["policy_version"] == 7
    assert await r.events("action_started") == []


async def test_command_outside_the_allowed_prefixes_is_refused(rig: RigFactory) -> None:
    spec = ActuatorSpec(allowed=["command"], commands=[["/bin/echo"]])
    r: Rig = await rig(policy(rule("rm", action="command", args='{ argv = ["/bin/rm", "-rf", "/nonexistent"] }')),
                       spec=spec)
    await r.feed("temp", 80.0)
    refused = await r.events("action_refused")
    assert len(refused) == 1
    assert "does not start with an allowed prefix" in refused[0]["detail"]
    assert await r.events("action_started") == []


async def test_command_overrunning_its_timeout_is_killed_and_reported(rig: RigFactory) -> None:
    spec = ActuatorSpec(allowed=["command"], commands=[["/bin/sh", "-c"]])
    # `echo $$` first: the shell's pid is its process group (the actuator starts a new session).
    r: Rig = await rig(policy(rule("slow", action="command",
                                   args='{ argv = ["/bin/sh", "-c", "echo $$; sleep 30"], timeout_s = 0.5 }')),
                       spec=spec)
    started = time.monotonic()
    await r.feed("temp", 80.0)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + KILL_GRACE_S + 3.0, elapsed
    assert await r.kinds() == ["rule_fired", "action_started", "action_failed"]
    failed = (await r.events("action_failed"))[0]
    assert failed["timed_out"] is True
    assert "did not finish within 0.5 s and was killed" in failed["detail"]
    assert failed["duration_ms"] >= 500
    group = int(failed["output"].split()[0])
    # Neither the shell nor its `sleep` survives: the whole process group was killed.
    deadline = time.monotonic() + 3.0
    while left := [p.pid for p in psutil.process_iter() if _pgid(p.pid) == group]:
        assert time.monotonic() < deadline, f"still running in process group {group}: {left}"
        await asyncio.sleep(0.05)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


# --- audit ordering ------------------------------------------------------------------------------


async def test_the_start_record_is_committed_before_the_action_runs(rig: RigFactory) -> None:
    r: Rig = await rig(policy(rule("slow", args="{ sleep_s = 5 }")))
    await r.feed("temp", 80.0, drain=False)
    await until(lambda: bool(r.calls), "the recorder was entered")  # the recorder has been entered and is sleeping now
    # Read back from the database file by a second connection: committed, not just buffered.
    db = sqlite3.connect(f"file:{r.outbox.path}?mode=ro", uri=True, timeout=10)
    try:
        committed = [row[0] for row in db.execute("SELECT kind FROM records WHERE kind IS NOT NULL ORDER BY seq")]
    finally:
        db.close()
    assert committed == ["rule_fired", "action_started"]
    await r.engine.close()  # the sleeping action is cancelled and awaited


# --- time alone, and skipped repeats -------------------------------------------------------------


async def test_a_silent_metric_fires_an_age_rule_on_the_tick(rig: RigFactory) -> None:
    """`age(m) > N` must fire when m stops arriving: no reading of m will ever trigger it."""
    r: Rig = await rig(policy(rule("silent", when="age(temp) > 120", clear="age(temp) < 30")))
    await r.feed("temp", 20.0)
    r.clock.advance(60.0)
    r.engine.tick()
    await r.drain()
    assert r.calls == []  # 60 s of silence is not enough
    r.clock.advance(90.0)
    r.engine.tick()
    await r.drain()
    assert r.calls == [{"rule": "silent"}]
    await r.feed("temp", 21.0)  # it speaks again: the rule clears
    assert (await r.kinds("silent"))[-1] == "rule_cleared"


async def test_skipped_repeats_are_timed_like_acted_ones(rig: RigFactory) -> None:
    """A repeat skipped (offline, budget) still waits its cooldown: it must not re-fire on every
    reading and be suspended early for "firing without clear"."""
    r: Rig = await rig(policy(rule("repeat", offline="skip", extra='cooldown = "10s"'),
                              limits="escalate_after_fires_without_clear = 4"), online=False)
    for _ in range(5):  # 3 s apart: the cooldown allows one repeat in these 15 s
        r.clock.advance(3.0)
        await r.feed("temp", 80.0)
    assert len(await r.events("rule_fired", "repeat")) == 2
    assert r.engine.states["repeat"].suspended is None
    for _ in range(25):
        r.clock.advance(3.0)
        await r.feed("temp", 80.0)
    fired = await r.events("rule_fired", "repeat")
    assert len(fired) == 4  # first firing, then 3 repeats: 12 s, 24 s, 36 s after it
    assert r.engine.states["repeat"].suspended == "fires_without_clear"
    assert [e["detail"] for e in await r.events("action_skipped")] == [
        'the hub is unreachable and the rule says offline = "skip"'] * 4


# --- a full disk: no action without its audit record -------------------------------------------


async def fill_up(outbox: Outbox) -> None:
    """Readings until a commit fails: the page limit is reached, they wait in memory."""
    for t in range(10_000):
        outbox.add([Reading("other", T0 + t, float(t))] * 20)
        try:
            await outbox.flush()
        except OutboxUnwritable:
            return
    raise AssertionError("the outbox never filled up")


async def test_on_a_full_disk_an_action_whose_audit_cannot_be_written_is_refused_not_run(rig: RigFactory) -> None:
    """SQLite answers SQLITE_FULL (its page limit, as a full disk would) and the outbox holds no
    telemetry to make room with: the start record cannot be committed, so the action does not
    run; the refusal is audited in its place and reaches the disk when space returns; the engine
    goes on deciding, and acts again once the disk takes writes."""
    r: Rig = await rig(policy(rule("hot")))
    pages = (await r.outbox._db.fetchone("PRAGMA page_count"))[0]
    await r.outbox._db.execute(f"PRAGMA max_page_count = {pages}")  # the fault goes in at SQLite
    r.outbox.protect_through = 10**9  # all of it sent: nothing the outbox may shed to make room
    await fill_up(r.outbox)
    await r.feed("temp", 80.0)
    assert r.calls == [], "an action ran without its audit record on disk"
    assert r.engine.outcomes["refused"] == 1
    await r.feed("temp", 60.0)  # cleared: still deciding, the clear waits in memory
    await r.outbox._db.execute("PRAGMA max_page_count = 1073741823")  # space is back
    await r.feed("temp", 81.0)
    assert len(r.calls) == 1
    assert await r.kinds("hot") == ["rule_fired", "action_refused", "rule_cleared", "rule_fired", "action_started",
                                    "action_succeeded"]
    refused = await r.events("action_refused", "hot")
    assert "audit record cannot be written" in refused[0]["detail"]
