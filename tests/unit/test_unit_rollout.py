"""Policy rollouts on a real hub database: versions, cohorts, waves, health gates, rollback, drift.

Agents are simulated by what they report (Status rows with policy_version / policy_refused,
presence, events); the hub's side is driven by `tick` at explicit times, so nothing sleeps.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgefleet.policy.document import Policy, validate_policy
from edgefleet.wire.protocol import PolicyRefusal, Presence, Status
from hub.config import RolloutConf
from hub.db.store import HubStore, IngestWork
from hub.errors import UsageError
from hub.rollout import rollouts as rollout
from hub.rollout.rollouts import (
    Health,
    Pushed,
    RolloutError,
    Selector,
    Transition,
    cohort_rank,
    reached_count,
    wave_plan,
)

REGION, HUB = "eu-1", "hub.eu-1"
T0 = 1_700_000_000.0
BAKE = 60.0
# Only one gate can breach in each test below unless it loosens or tightens one on purpose.
CONF = RolloutConf(bake_s=BAKE, waves=(25.0, 50.0), max_apply_failure_pct=0.0, max_action_failure_pct=20.0,
                   min_actions=3, max_offline_pct=20.0, max_escalations=0, drift_grace_s=120.0)
LAB = [f"lab-{i:02d}" for i in range(10)]


def policy_text(rule: str = "r1", version: int | None = None, target: str = "") -> str:
    head = f"version = {version}\n" if version is not None else ""
    return f"""{head}{target}
[[rules]]
name = "{rule}"
when = "sig0 > 5"
clear = "sig0 < 4"
action = "record"
offline = "act"
"""


@dataclass
class Fleet:
    """The hub's store plus what the simulated agents did."""

    store: HubStore
    path: Path
    seqs: dict[str, itertools.count[int]] = field(default_factory=dict)

    async def reopen(self) -> None:
        """A hub restart: close the database, open it again."""
        await self.store.close()
        self.store = await HubStore.open(self.path)

    async def register(self, devices: list[str], profile: str = "sim", *, online: bool = True,
                       **tags: str) -> None:
        for device in devices:
            await self.store.register(device, profile, dict(tags or {"site": "lab"}))
            if online:
                await self.online(device, T0 - 1000)

    async def online(self, device: str, now: float, session: str = "s1") -> None:
        assert await self.store.apply_presence(device, Presence(state="online", session=session), now)

    async def offline(self, device: str, now: float, session: str = "s1") -> None:
        assert await self.store.apply_presence(device, Presence(state="offline", session=session), now)

    async def report(self, devices: list[str], version: int, now: float = T0,
                     refused: PolicyRefusal | None = None) -> None:
        """Each device's Status: `version` in force, and the latest refusal (if any)."""
        statuses = {d: Status(backlog=0, dropped=0, policy_version=version, policy_refused=refused) for d in devices}
        await self.store.commit_ingest(IngestWork(now=now, statuses=statuses))

    async def apply(self, version: int, now: float = T0) -> None:
        """Every device assigned `version` reports it in force."""
        await self.report([d for d, v in (await self.assignments()).items() if v == version], version, now)

    async def refuse(self, device: str, version: int, in_force: int = 0, reason: str = "invalid_policy") -> None:
        refusal = PolicyRefusal(version=version, reason=reason, detail="line 3, column 8: unknown metric", ts=T0)
        await self.report([device], in_force, refused=refusal)

    async def event(self, device: str, kind: str, version: int, ts: float = T0, **body: Any) -> None:
        seq = next(self.seqs.setdefault(device, itertools.count(1)))
        text = json.dumps({"policy_version": version, "rule": "r1", **body})
        await self.store.commit_ingest(IngestWork(now=ts, events=[(device, seq, ts, kind, text)]))

    async def assignments(self) -> dict[str, int]:
        return {d: v for d, v in await self.store.query("SELECT device, version FROM assignments")}

    async def reached(self, rollout_id: int) -> list[str]:
        rows = await self.store.query(
            "SELECT device FROM rollout_members WHERE rollout = ? AND wave IS NOT NULL ORDER BY rank", (rollout_id,))
        return [r[0] for r in rows]

    async def state_of(self, rollout_id: int) -> tuple[str, int, str | None]:
        rows = await self.store.query("SELECT state, wave, reason FROM rollouts WHERE id = ?", (rollout_id,))
        return rows[0][0], rows[0][1], rows[0][2]

    async def policies(self) -> dict[int, tuple[str | None, str]]:
        return {v: (t, o) for v, t, o in await self.store.query("SELECT version, text, origin FROM policies")}

    async def hub_events(self) -> list[tuple[str, dict[str, Any]]]:
        rows = await self.store.query("SELECT kind, body FROM events WHERE device = ? ORDER BY seq", (HUB,))
        return [(k, json.loads(b)) for k, b in rows]

    async def push(self, text: str | None = None, *, canary: float | None = None, bake: float = BAKE,
                   selector: Selector | None = None, conf: RolloutConf = CONF, now: float = T0,
                   checked: set[str] | None = None) -> Pushed:
        text = policy_text() if text is None else text
        return await rollout.push(
            self.store, HUB, REGION, text, parse(text), selector=selector or Selector(), canary_pct=canary,
            bake_s=bake, conf=conf, origin="test.toml", now=now,
            checked_profiles={"sim", "rpi-4"} if checked is None else checked)

    async def tick(self, now: float, conf: RolloutConf = CONF) -> Transition | None:
        """The one rollout these tests run at a time: its transition, if any."""
        transitions = await rollout.tick(self.store, HUB, conf, now)
        assert len(transitions) <= 1, transitions
        return transitions[0] if transitions else None


def parse(text: str) -> Policy:
    return validate_policy(text, metrics=None, actuators_allowed=None)


def canaries(devices: list[str], n: int) -> set[str]:
    return set(sorted(devices, key=cohort_rank)[:n])


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    path = tmp_path / "hub.db"
    f = Fleet(await HubStore.open(path), path)
    try:
        yield f
    finally:
        await f.store.close()


@pytest.fixture
async def lab(fleet: Fleet) -> Fleet:
    await fleet.register(LAB)
    return fleet


# --- pure helpers -----------------------------------------------------------------------------


def test_wave_plan_is_canary_then_configured_waves_then_everyone() -> None:
    assert wave_plan(None, CONF) == [100.0]
    assert wave_plan(100, CONF) == [100.0]
    assert wave_plan(10, CONF) == [10, 25.0, 50.0, 100.0]
    assert wave_plan(30, CONF) == [30, 50.0, 100.0]
    assert wave_plan(60, CONF) == [60, 100.0]
    assert wave_plan(5, RolloutConf(waves=(50.0, 25.0, 25.0, 100.0))) == [5, 25.0, 50.0, 100.0]


@pytest.mark.parametrize(("members", "pct", "expected"), [
    (10, 10, 1), (10, 25, 3), (10, 1, 1), (10, 0.01, 1), (10, 100, 10), (3, 50, 2), (1, 5, 1), (7, 100 / 7 * 2, 2),
    (1000, 0.1, 1), (1000, 33.3, 333),
])
def test_a_wave_reaches_the_rounded_up_share_and_at_least_one(members: int, pct: float, expected: int) -> None:
    assert reached_count(members, pct) == expected


def test_cohort_rank_is_a_stable_hash_of_the_id() -> None:
    assert cohort_rank("lab-00") == cohort_rank("lab-00")
    assert len({cohort_rank(d) for d in LAB}) == len(LAB)
    assert cohort_rank("lab-00") == int.from_bytes(bytes.fromhex(
        hashlib.sha256(b"lab-00").hexdigest())[:8], "big")


def test_selector_parse() -> None:
    assert Selector.parse([]) == Selector()
    assert Selector.parse(["profile=sim", "site = lab", "rack=7"]) == Selector(
        frozenset({"sim"}), {"site": frozenset({"lab"}), "rack": frozenset({"7"})})
    assert Selector.parse(["profile=sim", "profile=sim"]).profiles == {"sim"}
    assert Selector.parse(["site=lab"]).describe() == "site=lab"
    assert Selector().describe() == "every device"
    for bad in (["site"], ["=lab"], ["site="]):
        with pytest.raises(UsageError):
            Selector.parse(bad)
    s = Selector.parse(["profile=sim", "site=lab"])
    assert s.matches("sim", {"site": "lab", "rack": "1"})
    assert not s.matches("rpi-4", {"site": "lab"})
    assert not s.matches("sim", {"site": "plant"})
    assert not s.matches("sim", {})


# --- pushing: versions and the first wave -----------------------------------------------------


async def test_the_first_push_is_version_1_and_reaches_everyone_without_a_canary(lab: Fleet) -> None:
    pushed = await lab.push()
    assert (pushed.version, pushed.targeted, pushed.reached, pushed.waves) == (1, 10, 10, [100.0])
    assert await lab.assignments() == dict.fromkeys(LAB, 1)
    assert (await lab.policies())[1] == (policy_text(), "test.toml")
    assert await lab.state_of(pushed.rollout) == ("baking", 0, None)
    [(kind, body)] = await lab.hub_events()
    assert kind == "rollout_started"
    assert body["policy_version"] == 1
    assert (body["targeted"], body["reached"], body["waves"]) == (10, 10, [100.0])


async def test_versions_only_grow(lab: Fleet) -> None:
    first = await lab.push()
    await rollout.promote(lab.store, HUB, T0 + 1)
    assert (await lab.push(policy_text("r2"), now=T0 + 2)).version == first.version + 1 == 2
    await rollout.promote(lab.store, HUB, T0 + 3)
    for version in (1, 2):
        with pytest.raises(RolloutError, match=f"version = {version}, but version 2 was already pushed"):
            await lab.push(policy_text(version=version), now=T0 + 4)
    jumped = await lab.push(policy_text(version=10), now=T0 + 5)
    assert jumped.version == 10
    await rollout.promote(lab.store, HUB, T0 + 6)
    assert (await lab.push(now=T0 + 7)).version == 11
    assert sorted(await lab.policies()) == [1, 2, 10, 11]


async def test_rollback_versions_count_as_pushed_versions(lab: Fleet) -> None:
    await lab.push()
    await rollout.abort(lab.store, HUB, T0 + 1)  # creates version 2 (back to the local policies)
    with pytest.raises(RolloutError, match="version 2 was already pushed"):
        await lab.push(policy_text(version=2), now=T0 + 2)
    assert (await lab.push(now=T0 + 2)).version == 3


async def test_a_refused_push_records_nothing(lab: Fleet) -> None:
    await lab.push()
    before = (await lab.policies(), await lab.assignments(), await lab.hub_events())
    with pytest.raises(RolloutError, match="still in progress"):
        await lab.push(policy_text("r2"), now=T0 + 1)
    with pytest.raises(RolloutError, match="still in progress"):
        await lab.push(policy_text(version=50), now=T0 + 1)
    assert (await lab.policies(), await lab.assignments(), await lab.hub_events()) == before


@pytest.mark.parametrize(("canary", "expected"), [(10, 1), (25, 3), (1, 1), (0.001, 1), (50, 5), (99, 10)])
async def test_the_first_wave_is_the_canary_cohort(lab: Fleet, canary: float, expected: int) -> None:
    pushed = await lab.push(canary=canary)
    assert pushed.reached == expected
    assert set(await lab.assignments()) == canaries(LAB, expected)
    assert await lab.reached(pushed.rollout) == sorted(canaries(LAB, expected), key=cohort_rank)


async def test_the_canaries_are_the_same_devices_on_every_push(lab: Fleet) -> None:
    first = await lab.push(canary=30)
    chosen = set(await lab.reached(first.rollout))
    await rollout.abort(lab.store, HUB, T0 + 1)
    second = await lab.push(policy_text("r2"), canary=30, now=T0 + 2)
    assert set(await lab.reached(second.rollout)) == chosen == canaries(LAB, 3)
    # a new device ranks into the order by its hash; it does not reshuffle the others
    await rollout.abort(lab.store, HUB, T0 + 3)
    await lab.register(["lab-10"])
    third = await lab.push(policy_text("r3"), canary=100 * 3 / 11, now=T0 + 4)
    assert set(await lab.reached(third.rollout)) == canaries([*LAB, "lab-10"], 3)


async def test_a_push_that_targets_nobody_is_refused(lab: Fleet) -> None:
    with pytest.raises(RolloutError, match="no registered, unrevoked device matches site=plant"):
        await lab.push(selector=Selector.parse(["site=plant"]))
    with pytest.raises(RolloutError, match=r"and the policy's \[target\]"):
        await lab.push(policy_text(target='[target]\nprofile = "rpi-5"\n'))
    assert await lab.policies() == {}


async def test_a_push_with_an_unchecked_profile_is_refused(lab: Fleet) -> None:
    await lab.register(["pi-1"], "rpi-4")
    with pytest.raises(RolloutError, match=r"profile\(s\) rpi-4 were registered while"):
        await lab.push(checked={"sim"})
    assert await lab.policies() == {}
    assert (await lab.push(selector=Selector.parse(["profile=sim"]), checked={"sim"})).targeted == 10


# --- targets --------------------------------------------------------------------------------


async def test_only_targeted_unrevoked_devices_are_assigned(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2", "a-3"], site="a")
    await fleet.register(["b-1"], site="b")
    await fleet.register(["a-pi"], "rpi-4", site="a")
    await fleet.store.revoke_device("a-3")
    pushed = await fleet.push(selector=Selector.parse(["site=a", "profile=sim"]))
    assert pushed.targeted == 2
    assert await fleet.assignments() == {"a-1": 1, "a-2": 1}
    await rollout.promote(fleet.store, HUB, T0 + 1)
    assert await fleet.assignments() == {"a-1": 1, "a-2": 1}


async def test_the_policy_target_narrows_the_selector(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"], site="a")
    await fleet.register(["b-1", "b-2"], site="b")
    await fleet.register(["b-pi"], "rpi-4", site="b")
    text = policy_text(target='[target]\nprofile = "sim"\nregion = "eu-1"\ntags = { site = "b" }\n')
    pushed = await fleet.push(text)
    assert pushed.targeted == 2
    assert await fleet.assignments() == {"b-1": 1, "b-2": 1}
    await rollout.promote(fleet.store, HUB, T0 + 1)
    with pytest.raises(RolloutError, match="no registered"):
        await fleet.push(policy_text(target='[target]\nregion = "us-1"\n'), now=T0 + 2)


async def test_a_readmitted_device_is_a_candidate_again(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"])
    await fleet.store.revoke_device("a-2")
    await fleet.push()
    assert set(await fleet.assignments()) == {"a-1"}
    await rollout.promote(fleet.store, HUB, T0 + 1)
    await fleet.store.register("a-2", "sim", {"site": "lab"}, readmit=True)
    await fleet.push(policy_text("r2"), now=T0 + 2)
    assert await fleet.assignments() == {"a-1": 2, "a-2": 2}


# --- waves ----------------------------------------------------------------------------------


async def test_waves_advance_after_the_bake_once_every_online_reached_device_applied(lab: Fleet) -> None:
    pushed = await lab.push(canary=10)
    assert pushed.waves == [10, 25.0, 50.0, 100.0]
    version = pushed.version
    assert await lab.tick(T0 + BAKE) is None  # baked, but nobody runs it yet
    await lab.apply(version)
    assert await lab.tick(T0 + BAKE - 0.5) is None  # applied, not baked
    step = await lab.tick(T0 + BAKE)
    assert step is not None
    assert step.kind == "wave"
    assert "wave 2 of 4: 25% (3 devices)" in step.message
    assert set(await lab.assignments()) == canaries(LAB, 3)
    assert await lab.state_of(pushed.rollout) == ("baking", 1, None)

    # the new wave bakes from when it started, and waits for its two new devices, which are online
    t1 = T0 + BAKE
    assert await lab.tick(t1 + 10 * BAKE) is None
    h = await rollout.health(lab.store, pushed.rollout, version, CONF)
    assert (h.reached, h.applied, h.waiting) == (3, 1, 2)
    await lab.report(sorted(canaries(LAB, 3) - canaries(LAB, 1))[:1], version)
    assert await lab.tick(t1 + 10 * BAKE) is None  # one is still pending
    await lab.apply(version)
    assert await lab.tick(t1 + BAKE - 1) is None  # all applied, but not baked
    step = await lab.tick(t1 + 10 * BAKE)
    assert step is not None
    assert "wave 3 of 4: 50% (5 devices)" in step.message

    t2 = t1 + 10 * BAKE
    await lab.apply(version)
    step = await lab.tick(t2 + BAKE)
    assert step is not None
    assert "wave 4 of 4: 100% (10 devices)" in step.message
    assert await lab.assignments() == dict.fromkeys(LAB, version)

    t3 = t2 + BAKE
    assert await lab.tick(t3 + BAKE) is None  # five of ten have not applied yet
    await lab.apply(version)
    done = await lab.tick(t3 + BAKE)
    assert done is not None
    assert done.kind == "complete"
    assert "reached all 10 targeted devices" in done.message
    assert await lab.state_of(pushed.rollout) == ("complete", 3, None)
    assert await lab.tick(t3 + 10 * BAKE) is None  # nothing active any more

    events = await lab.hub_events()
    assert [k for k, _ in events] == ["rollout_started", "rollout_wave", "rollout_wave", "rollout_wave",
                                      "rollout_complete"]
    assert [b.get("wave") for k, b in events if k == "rollout_wave"] == [1, 2, 3]
    assert [b.get("reached") for _, b in events] == [1, 3, 5, 10, 10]
    assert {b["policy_version"] for _, b in events} == {version}
    assert {b["rollout"] for _, b in events} == {pushed.rollout}


async def test_a_wave_does_not_advance_while_nobody_reached_runs_it(lab: Fleet) -> None:
    """At least one applied device is needed: reached devices all offline give no evidence."""
    for device in canaries(LAB, 2):
        await lab.offline(device, T0 - 1)  # gone before it was reached: not the policy's doing
    pushed = await lab.push(canary=20)
    assert set(await lab.reached(pushed.rollout)) == canaries(LAB, 2)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.reached, h.applied, h.waiting, h.offline, h.went_offline, h.breach) == (2, 0, 0, 2, 0, None)
    assert not h.ready
    assert await lab.tick(T0 + 100 * BAKE) is None
    assert await lab.state_of(pushed.rollout) == ("baking", 0, None)


async def test_offline_reached_devices_do_not_hold_a_wave_back(fleet: Fleet) -> None:
    await fleet.register(LAB)
    asleep = sorted(canaries(LAB, 3), key=cohort_rank)[1]
    await fleet.offline(asleep, T0 - 10)  # offline before the push: catches up when it reconnects
    pushed = await fleet.push(canary=25)
    await fleet.report([d for d in await fleet.reached(pushed.rollout) if d != asleep], pushed.version)
    step = await fleet.tick(T0 + BAKE)
    assert step is not None
    assert step.kind == "wave"
    h = await rollout.health(fleet.store, pushed.rollout, pushed.version, CONF)
    assert (h.reached, h.offline, h.went_offline) == (5, 1, 0)


async def completed_in_one_wave(fleet: Fleet) -> Pushed:
    """A push of one wave, no bake, applied by everyone: the tick completes it."""
    pushed = await fleet.push(bake=0)
    await fleet.apply(pushed.version)
    step = await fleet.tick(T0)
    assert step is not None
    assert step.kind == "complete"
    return pushed


async def test_a_single_wave_push_completes_after_its_bake(lab: Fleet) -> None:
    await completed_in_one_wave(lab)


# --- health gates ---------------------------------------------------------------------------


async def started(fleet: Fleet, canary: float = 30) -> Pushed:
    """A rollout in its canary wave, with every canary running it."""
    pushed = await fleet.push(canary=canary)
    await fleet.apply(pushed.version)
    return pushed


async def assert_rolled_back(fleet: Fleet, pushed: Pushed, now: float, words: str,
                             conf: RolloutConf = CONF) -> None:
    step = await fleet.tick(now, conf)
    assert step is not None
    assert step.kind == "rolled_back"
    assert words in step.message, step.message
    state, _, reason = await fleet.state_of(pushed.rollout)
    assert state == "rolled_back"
    assert reason is not None
    assert reason.startswith("health gate: ")
    assert words in reason
    kind, body = (await fleet.hub_events())[-1]
    assert kind == "rollout_rolled_back"
    assert body["automatic"] is True
    assert body["policy_version"] == pushed.version
    assert pushed.version not in (await fleet.assignments()).values()


async def test_a_healthy_canary_breaches_nothing(lab: Fleet) -> None:
    pushed = await started(lab)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.reached, h.applied, h.refused, h.waiting, h.offline, h.went_offline) == (3, 3, 0, 0, 0, 0)
    assert h.breach is None
    assert h.ready


async def test_a_refusal_rolls_back(lab: Fleet) -> None:
    pushed = await started(lab)
    canary = (await lab.reached(pushed.rollout))[0]
    await lab.refuse(canary, pushed.version)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.applied, h.refused) == (2, 1)
    assert h.refusal_example == "invalid_policy: line 3, column 8: unknown metric"
    await assert_rolled_back(lab, pushed, T0 + 1, "1 of 3 reached devices refused version 1")


async def test_refusals_under_the_threshold_do_not_roll_back(lab: Fleet) -> None:
    loose = RolloutConf(bake_s=BAKE, max_apply_failure_pct=50.0)
    pushed = await started(lab)
    await lab.refuse((await lab.reached(pushed.rollout))[0], pushed.version)
    assert await lab.tick(T0 + 1, loose) is None
    step = await lab.tick(T0 + BAKE, loose)
    assert step is not None
    assert step.kind == "wave"  # a refused device is not "waiting"


async def test_a_refusal_of_another_version_does_not_count(lab: Fleet) -> None:
    pushed = await started(lab)
    canary = (await lab.reached(pushed.rollout))[0]
    await lab.refuse(canary, pushed.version + 5, in_force=pushed.version)
    await lab.refuse((await lab.reached(pushed.rollout))[1], 0, in_force=pushed.version, reason="malformed")
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.applied, h.refused, h.breach) == (3, 0, None)


async def test_a_device_that_applied_counts_as_applied_whatever_it_refused_before(lab: Fleet) -> None:
    pushed = await started(lab)
    canary = (await lab.reached(pushed.rollout))[0]
    stale = PolicyRefusal(version=pushed.version, reason="store_failed", detail="disk full", ts=T0)
    await lab.report([canary], pushed.version, refused=stale)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.applied, h.refused, h.breach) == (3, 0, None)


async def test_failing_actions_roll_back_once_there_are_enough(lab: Fleet) -> None:
    pushed = await started(lab)
    a, b, _ = await lab.reached(pushed.rollout)
    await lab.event(a, "action_failed", pushed.version)
    await lab.event(b, "action_failed", pushed.version)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.actions, h.action_failures, h.breach) == (2, 2, None)  # below min_actions
    assert await lab.tick(T0 + 1) is None
    await lab.event(a, "action_succeeded", pushed.version)
    await assert_rolled_back(lab, pushed, T0 + 2, "2 of 3 actions under version 1 failed (67% > 20%)")


async def test_a_failure_rate_at_the_threshold_does_not_roll_back(lab: Fleet) -> None:
    pushed = await started(lab)
    a = (await lab.reached(pushed.rollout))[0]
    await lab.event(a, "action_failed", pushed.version)
    for _ in range(4):
        await lab.event(a, "action_succeeded", pushed.version)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.actions, h.action_failures, h.breach) == (5, 1, None)  # 20% is not above 20%


async def test_only_actions_of_reached_devices_under_this_version_count(lab: Fleet) -> None:
    pushed = await started(lab)
    reached = await lab.reached(pushed.rollout)
    unreached = sorted(set(LAB) - set(reached))[0]
    for _ in range(5):
        await lab.event(unreached, "action_failed", pushed.version)  # cannot be running it
        await lab.event(reached[0], "action_failed", pushed.version + 7)
        await lab.event(reached[0], "escalation", 0)
    await lab.store.commit_ingest(IngestWork(now=T0, events=[(reached[1], 99, T0, "action_failed", "not json")]))
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.actions, h.action_failures, h.escalations, h.breach) == (0, 0, 0, None)


async def test_an_escalation_rolls_back(lab: Fleet) -> None:
    pushed = await started(lab)
    await lab.event((await lab.reached(pushed.rollout))[2], "escalation", pushed.version, reason="never cleared")
    await assert_rolled_back(lab, pushed, T0 + 1, "1 rule(s) escalated under version 1 (more than 0)")


async def test_escalations_up_to_the_limit_do_not_roll_back(lab: Fleet) -> None:
    conf = RolloutConf(bake_s=BAKE, max_escalations=1)
    pushed = await started(lab)
    device = (await lab.reached(pushed.rollout))[0]
    await lab.event(device, "escalation", pushed.version)
    assert await lab.tick(T0 + 1, conf) is None
    await lab.event(device, "escalation", pushed.version)
    await assert_rolled_back(lab, pushed, T0 + 2, "2 rule(s) escalated", conf)


async def test_devices_going_offline_roll_back(lab: Fleet) -> None:
    conf = msgspec.structs.replace(CONF, offline_grace_s=1.0)
    pushed = await started(lab, canary=50)  # five reached: one offline is 20%, not above
    first, second = (await lab.reached(pushed.rollout))[:2]
    await lab.offline(first, T0 + 1)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, conf, now=T0 + 2)
    assert (h.offline, h.went_offline, h.breach) == (1, 1, None)
    assert await lab.tick(T0 + 2, conf) is None
    await lab.offline(second, T0 + 3)
    # Offline for less than the grace (a hub restart takes its managed broker down for a moment): not yet.
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, conf, now=T0 + 3.5)
    assert (h.offline, h.went_offline, h.breach) == (2, 1, None)
    await assert_rolled_back(lab, pushed, T0 + 4, "2 of 5 reached devices went offline after version 1 (40% > 20%)",
                             conf)


async def test_a_device_back_online_no_longer_counts_as_gone(lab: Fleet) -> None:
    pushed = await started(lab, canary=10)
    device = (await lab.reached(pushed.rollout))[0]
    await lab.offline(device, T0 + 1)
    await lab.online(device, T0 + 2, session="s2")
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.offline, h.went_offline, h.breach) == (0, 0, None)


async def test_devices_offline_when_reached_are_not_the_policys_doing(fleet: Fleet) -> None:
    await fleet.register(LAB)
    for device in canaries(LAB, 5):
        if device != sorted(canaries(LAB, 5))[0]:
            await fleet.offline(device, T0 - 5)
    pushed = await fleet.push(canary=50)
    await fleet.apply(pushed.version)
    h = await rollout.health(fleet.store, pushed.rollout, pushed.version, CONF)
    assert (h.reached, h.applied, h.offline, h.went_offline, h.breach) == (5, 5, 4, 0, None)


async def test_the_gates_watch_while_baking_not_only_after(lab: Fleet) -> None:
    pushed = await started(lab)
    await lab.event((await lab.reached(pushed.rollout))[0], "escalation", pushed.version)
    await assert_rolled_back(lab, pushed, T0 + 0.5, "escalated")


# --- what a rollback does ------------------------------------------------------------------


async def test_a_rollback_gives_each_reached_device_its_previous_policy_as_a_new_version(fleet: Fleet) -> None:
    """Half the fleet had v1, the other half nothing; v2 goes to all and breaches."""
    old, new = [f"old-{i}" for i in range(4)], [f"new-{i}" for i in range(4)]
    await fleet.register(old, site="a")
    await fleet.register(new, site="b")
    first = await fleet.push(policy_text("v1-rule"), selector=Selector.parse(["site=a"]))
    await rollout.promote(fleet.store, HUB, T0 + 1)
    assert first.version == 1
    bad = await fleet.push(policy_text("v2-rule"), now=T0 + 2)
    assert bad.version == 2
    await fleet.apply(2)
    await fleet.event(new[0], "escalation", 2)
    step = await fleet.tick(T0 + 3)
    assert step is not None
    assert step.kind == "rolled_back"
    assert "on 8 device(s)" in step.message
    policies = await fleet.policies()
    assert sorted(policies) == [1, 2, 3, 4]
    # devices without a hub policy first (text NULL: back to their local file), then version by version
    assert policies[3] == (None, "rollback of version 2 (rollout 2) to the devices' local policies")
    assert policies[4] == (policy_text("v1-rule"), "rollback of version 2 (rollout 2) to version 1")
    assert await fleet.assignments() == {**dict.fromkeys(new, 3), **dict.fromkeys(old, 4)}
    hash_of_empty = (await fleet.store.query("SELECT sha256 FROM policies WHERE version = 3"))[0][0]
    assert hash_of_empty == hashlib.sha256(b"").hexdigest()
    _, body = (await fleet.hub_events())[-1]
    assert body["replaced_by"] == [{"version": 3, "previous": None}, {"version": 4, "previous": 1}]
    assert body["devices"] == 8


async def test_unreached_devices_never_get_the_bad_version(lab: Fleet) -> None:
    await lab.push(policy_text("good"))
    await rollout.promote(lab.store, HUB, T0 + 1)
    await lab.apply(1)
    bad = await lab.push(policy_text("bad"), canary=10, now=T0 + 2)
    [canary] = await lab.reached(bad.rollout)
    await lab.refuse(canary, bad.version, in_force=1)
    step = await lab.tick(T0 + 3)
    assert step is not None
    assert step.kind == "rolled_back"
    assignments = await lab.assignments()
    assert assignments.pop(canary) == 3
    assert assignments == dict.fromkeys(set(LAB) - {canary}, 1)  # untouched: still the good v1, never v2
    assert (await lab.policies())[3][0] == policy_text("good")
    assert await lab.tick(T0 + 1000) is None  # a rolled back rollout is not watched any more


async def test_a_rolled_back_device_goes_back_to_the_version_it_had_before_an_earlier_rollback(lab: Fleet) -> None:
    await lab.push(policy_text("one"))
    await rollout.promote(lab.store, HUB, T0 + 1)
    await lab.push(policy_text("two"), now=T0 + 2)
    await rollout.abort(lab.store, HUB, T0 + 3)  # v3 = "one" again
    await lab.push(policy_text("four"), now=T0 + 4)  # v4, previous v3
    await rollout.rollback(lab.store, HUB, T0 + 5)  # v5 = text of v3 = "one"
    assert await lab.assignments() == dict.fromkeys(LAB, 5)
    assert (await lab.policies())[5][0] == policy_text("one")


# --- the operator's decisions ---------------------------------------------------------------


async def test_promote_reaches_everyone_at_once(lab: Fleet) -> None:
    pushed = await lab.push(canary=10)
    step = await rollout.promote(lab.store, HUB, T0 + 1)
    assert step.kind == "promoted"
    assert "promoted to all 10 targeted devices" in step.message
    assert await lab.assignments() == dict.fromkeys(LAB, pushed.version)
    state, wave, reason = await lab.state_of(pushed.rollout)
    assert (state, wave) == ("complete", 3)
    assert reason is not None
    assert reason.startswith("promoted by ")
    assert (await lab.hub_events())[-1][0] == "rollout_promoted"
    with pytest.raises(RolloutError, match="no rollout is in progress"):
        await rollout.promote(lab.store, HUB, T0 + 2)


async def test_abort_only_while_in_progress(lab: Fleet) -> None:
    with pytest.raises(RolloutError, match="no rollout is in progress"):
        await rollout.abort(lab.store, HUB, T0)
    pushed = await lab.push(canary=30)
    reached = await lab.reached(pushed.rollout)
    step = await rollout.abort(lab.store, HUB, T0 + 1)
    assert step.kind == "aborted"
    assert "version 1 aborted on 3 device(s)" in step.message
    assert (await lab.state_of(pushed.rollout))[0] == "aborted"
    assert await lab.assignments() == dict.fromkeys(reached, 2)
    assert (await lab.policies())[2][0] is None
    kind, body = (await lab.hub_events())[-1]
    assert (kind, body["automatic"]) == ("rollout_aborted", False)
    with pytest.raises(RolloutError, match="no rollout is in progress"):
        await rollout.abort(lab.store, HUB, T0 + 2)
    await lab.push(policy_text("r2"), now=T0 + 3)  # a new push is allowed again
    await rollout.promote(lab.store, HUB, T0 + 4)
    with pytest.raises(RolloutError, match="no rollout is in progress"):
        await rollout.abort(lab.store, HUB, T0 + 5)


async def test_rollback_of_a_complete_rollout(lab: Fleet) -> None:
    with pytest.raises(RolloutError, match="nothing was pushed"):
        await rollout.rollback(lab.store, HUB, T0)
    pushed = await lab.push()
    await lab.apply(pushed.version)
    assert (await lab.tick(T0 + BAKE)) is not None
    assert (await lab.state_of(pushed.rollout))[0] == "complete"
    step = await rollout.rollback(lab.store, HUB, T0 + BAKE + 1)
    assert step.kind == "rolled_back"
    assert (await lab.state_of(pushed.rollout))[0] == "rolled_back"
    assert await lab.assignments() == dict.fromkeys(LAB, 2)
    kind, body = (await lab.hub_events())[-1]
    assert (kind, body["automatic"]) == ("rollout_rolled_back", False)
    with pytest.raises(RolloutError, match="rollout 1 is already rolled back"):
        await rollout.rollback(lab.store, HUB, T0 + BAKE + 2)
    assert sorted(await lab.policies()) == [1, 2]


async def test_rollback_of_a_rollout_in_progress(lab: Fleet) -> None:
    pushed = await lab.push(canary=10)
    [canary] = await lab.reached(pushed.rollout)
    await rollout.rollback(lab.store, HUB, T0 + 1)
    assert await lab.assignments() == {canary: 2}
    assert (await lab.state_of(pushed.rollout))[0] == "rolled_back"


async def test_rollback_after_an_abort_is_refused(lab: Fleet) -> None:
    await lab.push()
    await rollout.abort(lab.store, HUB, T0 + 1)
    with pytest.raises(RolloutError, match="rollout 1 is already aborted"):
        await rollout.rollback(lab.store, HUB, T0 + 2)
    with pytest.raises(RolloutError, match="nothing to undo"):
        await rollout.revert(lab.store, HUB, 1, "rolled_back", "again", T0 + 3)
    with pytest.raises(RolloutError, match="unknown"):
        await rollout.revert(lab.store, HUB, 99, "rolled_back", "what", T0 + 3)


async def test_recent_lists_the_latest_rollouts_first(lab: Fleet) -> None:
    await lab.push(selector=Selector.parse(["site=lab"]), canary=10)
    await rollout.abort(lab.store, HUB, T0 + 1)
    await lab.push(now=T0 + 2)
    rows = await rollout.recent(lab.store)
    assert [(r["rollout"], r["version"], r["state"]) for r in rows] == [(2, 3, "baking"), (1, 1, "aborted")]
    assert rows[1]["target"] == "site=lab"
    assert rows[1]["waves"] == [10, 25.0, 50.0, 100.0]
    assert rows[1]["wave"] == 1
    assert rows[0]["targeted"] == 10
    assert rows[0]["origin"] == "test.toml"


# --- a hub that restarts ---------------------------------------------------------------------


async def test_a_reopened_store_carries_on_from_the_stored_wave(lab: Fleet) -> None:
    pushed = await lab.push(canary=10)
    await lab.apply(pushed.version)
    step = await lab.tick(T0 + BAKE)
    assert step is not None
    assert step.kind == "wave"
    before = await lab.assignments()
    await lab.reopen()
    assert await lab.assignments() == before
    assert await lab.state_of(pushed.rollout) == ("baking", 1, None)
    assert await lab.tick(T0 + BAKE + 1) is None  # the wave's bake started before the restart
    await lab.apply(pushed.version)
    step = await lab.tick(T0 + 2 * BAKE)
    assert step is not None
    assert "wave 3 of 4" in step.message
    assert set(await lab.assignments()) == canaries(LAB, 5)
    with pytest.raises(RolloutError, match="still in progress"):
        await lab.push(policy_text("r2"), now=T0 + 2 * BAKE)


async def test_a_tick_for_a_wave_the_operator_moved_meanwhile_does_nothing(lab: Fleet,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pushed = await lab.push(canary=10)
    await lab.apply(pushed.version)
    real_health = rollout.health

    async def health_then_promote(*args: Any) -> Health:
        h = await real_health(*args)
        await rollout.promote(lab.store, HUB, T0 + BAKE)  # the CLI, between the read and the write
        return h

    monkeypatch.setattr(rollout, "health", health_then_promote)
    assert await lab.tick(T0 + BAKE) is None
    assert [k for k, _ in await lab.hub_events()] == ["rollout_started", "rollout_promoted"]


# --- drift -----------------------------------------------------------------------------------


async def drifted(fleet: Fleet, device: str, now: float) -> bool:
    [row] = await fleet.store.devices(device, drift_grace_s=CONF.drift_grace_s, now=now)
    return row.policy_drifted


async def test_drift_is_flagged_only_past_the_grace_period_while_online(fleet: Fleet) -> None:
    await fleet.register(["a-1"])  # online since T0 - 1000
    assert not await drifted(fleet, "a-1", T0 + 10_000)  # no intended version: no drift
    await fleet.push()
    [row] = await fleet.store.devices("a-1", drift_grace_s=120.0, now=T0)
    assert (row.policy_intended, row.policy_version, row.policy_drifted) == (1, None, False)
    assert not await drifted(fleet, "a-1", T0 + 120)
    assert await drifted(fleet, "a-1", T0 + 121)
    await fleet.report(["a-1"], 1)
    assert not await drifted(fleet, "a-1", T0 + 10_000)


async def test_a_device_on_an_older_version_drifts(fleet: Fleet) -> None:
    await fleet.register(["a-1"])
    await fleet.push()
    await rollout.promote(fleet.store, HUB, T0)
    await fleet.report(["a-1"], 1)
    await fleet.push(policy_text("r2"), now=T0 + 500)
    assert not await drifted(fleet, "a-1", T0 + 600)
    assert await drifted(fleet, "a-1", T0 + 621)


async def test_an_offline_device_does_not_drift_and_gets_a_grace_after_reconnecting(fleet: Fleet) -> None:
    await fleet.register(["a-1"])
    await fleet.push()
    await fleet.offline("a-1", T0 + 10)
    assert not await drifted(fleet, "a-1", T0 + 10_000)
    await fleet.online("a-1", T0 + 10_000, session="s2")
    assert not await drifted(fleet, "a-1", T0 + 10_100)
    assert await drifted(fleet, "a-1", T0 + 10_121)


async def test_a_revoked_device_does_not_drift(fleet: Fleet) -> None:
    await fleet.register(["a-1"])
    await fleet.push()
    await fleet.store.revoke_device("a-1")
    [row] = await fleet.store.devices("a-1", drift_grace_s=120.0, now=T0 + 10_000)
    assert (row.revoked, row.online, row.policy_drifted) == (True, False, False)


async def test_the_refusal_a_device_reported_is_shown(fleet: Fleet) -> None:
    await fleet.register(["a-1"])
    await fleet.push()
    await fleet.refuse("a-1", 1)
    [row] = await fleet.store.devices("a-1", now=T0)
    assert row.policy_refused is not None
    assert (row.policy_refused["version"], row.policy_refused["reason"]) == (1, "invalid_policy")
    await fleet.report(["a-1"], 1)
    [row] = await fleet.store.devices("a-1", now=T0)
    assert (row.policy_version, row.policy_refused) == (1, None)


# --- found by these tests, fixed ------------------------------------------------------------------------------


async def test_events_of_a_local_policy_with_the_same_number_do_not_breach(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"])
    # Before any hub policy, a-1 ran its local policy file, which says `version = 1` (as EXAMPLE_POLICY does):
    # the rule engine labels its audit events policy_version = 1 and policy_local, and one rule escalated.
    await fleet.event("a-1", "escalation", 1, ts=T0 - 86_400, policy_local=True)
    pushed = await fleet.push()  # the hub's first version is 1 too
    assert pushed.version == 1
    await fleet.apply(1, now=T0 + 1)
    h = await rollout.health(fleet.store, pushed.rollout, pushed.version, CONF)
    assert h.escalations == 0
    assert h.breach is None


async def test_a_device_that_cannot_verify_any_policy_counts_as_refusing(lab: Fleet) -> None:
    pushed = await lab.push(canary=30)
    keyless, *others = await lab.reached(pushed.rollout)
    await lab.report(others, pushed.version, now=T0 + 1)
    # its bundle predates policy.pub: every policy is refused before its version can be read
    no_key = PolicyRefusal(version=0, reason="no_policy_key", detail="cannot read the hub's policy key", ts=T0 + 1)
    await lab.report([keyless], 0, now=T0 + 1, refused=no_key)
    h = await rollout.health(lab.store, pushed.rollout, pushed.version, CONF)
    assert (h.applied, h.refused, h.waiting) == (2, 1, 0)


# --- devices registered after a push (rollout.admit) ----------------------------------------


async def admit(fleet: Fleet, *devices: str, now: float = T0 + 10) -> dict[str, rollout.Admission]:
    return {a.device: a for a in await rollout.admit(fleet.store, REGION, list(devices), now)}


async def members(fleet: Fleet, rollout_id: int) -> dict[str, tuple[int, int | None, int | None]]:
    """device -> (rank, wave, previous)"""
    rows = await fleet.store.query(
        "SELECT device, rank, wave, previous FROM rollout_members WHERE rollout = ?", (rollout_id,))
    return {d: (r, w, p) for d, r, w, p in rows}


async def test_a_device_registered_after_a_complete_rollout_gets_its_version_and_its_rollback(lab: Fleet) -> None:
    pushed = await completed_in_one_wave(lab)
    await lab.register(["late-1"])
    assert await admit(lab, "late-1") == {"late-1": rollout.Admission("late-1", pushed.version, pushed.rollout)}
    assert (await lab.assignments())["late-1"] == pushed.version
    assert (await members(lab, pushed.rollout))["late-1"] == (len(LAB), 0, None)  # last, reached, had nothing
    assert await admit(lab, "late-1") == {}  # once: it has an assignment now
    # A rollback of that rollout takes the newcomer back too (to its local policy, as it had none).
    step = await rollout.rollback(lab.store, HUB, T0 + 20)
    assert "on 11 device(s)" in step.message
    local = next(v for v, (text, _) in (await lab.policies()).items() if text is None)
    assert (await lab.assignments())["late-1"] == local


async def test_a_device_the_rollouts_do_not_target_gets_nothing(fleet: Fleet) -> None:
    await fleet.register(LAB, site="lab")
    pushed = await fleet.push(selector=Selector.parse(["site=lab"]), bake=0)
    await rollout.promote(fleet.store, HUB, T0 + 1)
    await fleet.register(["other"], site="field")
    await fleet.register(["gone"], site="lab")
    await fleet.store.revoke_device("gone")
    admitted = await admit(fleet, "other", "gone")
    assert admitted == {"other": rollout.Admission("other")}  # and nothing at all for the revoked one
    assert "gone" not in await fleet.assignments()
    assert "other" not in await fleet.assignments()
    assert "other" not in await members(fleet, pushed.rollout)


async def test_the_latest_complete_rollout_wins_and_a_rolled_back_one_does_not_count(lab: Fleet) -> None:
    first = await lab.push(policy_text("one"), bake=0)
    await rollout.promote(lab.store, HUB, T0 + 1)
    second = await lab.push(policy_text("two"), bake=0, now=T0 + 2)
    await rollout.promote(lab.store, HUB, T0 + 3)
    await lab.register(["late-1"])
    assert (await admit(lab, "late-1"))["late-1"].version == second.version
    await rollout.rollback(lab.store, HUB, T0 + 4)  # the second is undone: the fleet is back on the first
    await lab.register(["late-2"])
    assert (await admit(lab, "late-2"))["late-2"] == rollout.Admission("late-2", first.version, first.rollout)


async def test_a_device_registered_during_a_rollout_joins_it_and_the_last_wave_reaches_it(lab: Fleet) -> None:
    base = await lab.push(policy_text("base"), bake=0)
    await rollout.promote(lab.store, HUB, T0 + 1)
    pushed = await lab.push(policy_text("next"), canary=10, now=T0 + 2)
    await lab.register(["late-1"])
    admitted = (await admit(lab, "late-1"))["late-1"]
    # Its peers' current policy now; a member of the rollout in progress, not yet reached.
    assert admitted == rollout.Admission("late-1", base.version, pushed.rollout, waiting=True)
    assert (await lab.assignments())["late-1"] == base.version
    assert (await members(lab, pushed.rollout))["late-1"] == (len(LAB), None, base.version)
    now = T0 + 2
    for _ in range(10):  # canary, 25 %, 50 %, 100 %, complete
        await lab.apply(pushed.version)
        now += BAKE
        step = await lab.tick(now)
        if step is not None and step.kind == "complete":
            break
    else:
        raise AssertionError("the rollout did not complete")
    assert "reached all 11 targeted devices" in step.message
    assert (await lab.assignments())["late-1"] == pushed.version


async def test_a_device_registered_in_the_final_wave_is_reached_when_the_rollout_completes(lab: Fleet) -> None:
    pushed = await lab.push(bake=0)  # one wave, 100 %, already reached by the push
    await lab.register(["late-1"])
    assert (await admit(lab, "late-1"))["late-1"] == rollout.Admission("late-1", None, pushed.rollout, waiting=True)
    assert "late-1" not in await lab.assignments()
    await lab.apply(pushed.version)
    step = await lab.tick(T0)
    assert step is not None
    assert step.kind == "complete"
    assert (await lab.assignments())["late-1"] == pushed.version
    assert (await members(lab, pushed.rollout))["late-1"][1] == 0


async def test_a_policy_that_does_not_fit_the_new_devices_profile_is_not_given(lab: Fleet) -> None:
    pushed = await lab.push(bake=0)  # a "record" action, which only the sim profile allows
    await rollout.promote(lab.store, HUB, T0 + 1)
    await lab.register(["pi-1"], profile="rpi-4")
    admitted = (await admit(lab, "pi-1"))["pi-1"]
    assert admitted.version is None
    assert admitted.refused is not None
    assert f"version {pushed.version} does not fit profile rpi-4" in admitted.refused
    assert "action 'record' is not allowed by this device's profile" in admitted.refused
    assert "\n" not in admitted.refused
    assert "pi-1" not in await lab.assignments()
    assert "pi-1" not in await members(lab, pushed.rollout)


# --- one key given twice: any of its values; rollouts side by side on disjoint devices ----------


def test_a_key_given_twice_means_any_of_its_values() -> None:
    s = Selector.parse(["site=a", "site=b", "profile=sim"])
    assert s.describe() == "profile=sim, site=a|b"
    assert s.matches("sim", {"site": "a"})
    assert s.matches("sim", {"site": "b", "rack": "1"})
    assert not s.matches("sim", {"site": "c"})
    assert not s.matches("rpi-4", {"site": "a"})  # different keys: all must hold
    assert Selector.parse(["profile=sim", "profile=rpi-4"]).matches("rpi-4", {})
    assert Selector.from_json(s.to_json()) == s
    # A selector stored before "any of" existed (and a task's target) reads as it did.
    old = Selector.from_json('{"profile": "sim", "tags": {"site": "a"}}')
    assert old == Selector.parse(["profile=sim", "site=a"])
    assert json.loads(old.to_json()) == {"profile": "sim", "tags": {"site": "a"}}


async def test_a_push_to_two_sites_reaches_both_not_just_the_last(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"], site="a")
    await fleet.register(["b-1"], site="b")
    await fleet.register(["c-1"], site="c")
    pushed = await fleet.push(selector=Selector.parse(["site=a", "site=b"]))
    assert pushed.targeted == 3
    assert await fleet.assignments() == {"a-1": 1, "a-2": 1, "b-1": 1}


async def test_rollouts_to_disjoint_devices_run_side_by_side(fleet: Fleet) -> None:
    await fleet.register([f"s-{i}" for i in range(4)])
    await fleet.register([f"p-{i}" for i in range(4)], "rpi-4")
    sims = await fleet.push(policy_text("on-sim"), selector=Selector.parse(["profile=sim"]), canary=25)
    pis = await fleet.push(policy_text("on-pi"), selector=Selector.parse(["profile=rpi-4"]), canary=25, now=T0 + 1)
    assert (sims.version, pis.version) == (1, 2)
    assert [r["rollout"] for r in await rollout.in_progress(fleet.store)] == [sims.rollout, pis.rollout]

    # Each advances on its own devices' evidence: the rpi-4 canary applied, the sim one did not.
    await fleet.apply(pis.version)
    [step] = await rollout.tick(fleet.store, HUB, CONF, T0 + 1 + BAKE)
    assert (step.rollout, step.kind) == (pis.rollout, "wave")
    await fleet.apply(sims.version)
    await fleet.apply(pis.version)
    steps = await rollout.tick(fleet.store, HUB, CONF, T0 + 2 + 2 * BAKE)
    assert {(t.rollout, t.kind) for t in steps} == {(sims.rollout, "wave"), (pis.rollout, "wave")}

    # A breach rolls back only the rollout it happened in.
    for n in range(3):
        await fleet.event(next(iter(await fleet.reached(pis.rollout))), "action_failed", pis.version, ts=T0 + 3 + n)
    [breach] = await rollout.tick(fleet.store, HUB, CONF, T0 + 10)
    assert (breach.rollout, breach.kind) == (pis.rollout, "rolled_back")
    assert await fleet.state_of(sims.rollout) == ("baking", 1, None)


async def test_a_push_that_overlaps_a_rollout_in_progress_is_refused_and_records_nothing(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"], site="a")
    await fleet.register(["b-1"], site="b")
    first = await fleet.push(selector=Selector.parse(["site=a"]), canary=50)
    before = (await fleet.policies(), await fleet.assignments(), await fleet.hub_events())
    for selector in (Selector(), Selector.parse(["site=b", "site=a"])):  # a-2 is not reached yet: still a member
        with pytest.raises(RolloutError) as refused:
            await fleet.push(policy_text("r2"), selector=selector, now=T0 + 1)
        assert str(refused.value) == (
            "rollout 1 (version 1) is still in progress on a-1, a-2, which this push also targets: narrow --target "
            "to other devices, or wait for it, or run edge-hub policy promote, abort or rollback --rollout 1")
    assert (await fleet.policies(), await fleet.assignments(), await fleet.hub_events()) == before
    second = await fleet.push(policy_text("r2"), selector=Selector.parse(["site=b"]), now=T0 + 1)
    assert (second.rollout, second.version) == (2, 2)
    assert await fleet.assignments() == {**dict.fromkeys(await fleet.reached(first.rollout), 1), "b-1": 2}


async def test_with_rollouts_side_by_side_a_decision_names_its_rollout(fleet: Fleet) -> None:
    await fleet.register(["a-1", "a-2"], site="a")
    await fleet.register(["b-1", "b-2"], site="b")
    first = await fleet.push(selector=Selector.parse(["site=a"]), canary=50)
    second = await fleet.push(policy_text("r2"), selector=Selector.parse(["site=b"]), canary=50, now=T0 + 1)
    for decide in (rollout.promote, rollout.abort):
        with pytest.raises(UsageError, match=r"rollouts 1, 2 are in progress side by side: name the one to \w+ "
                                             r"with --rollout ID"):
            await decide(fleet.store, HUB, T0 + 2)
    with pytest.raises(RolloutError, match="rollout 7 is not in progress"):
        await rollout.promote(fleet.store, HUB, T0 + 2, 7)
    promoted = await rollout.promote(fleet.store, HUB, T0 + 2, second.rollout)
    assert (promoted.rollout, promoted.kind) == (second.rollout, "promoted")
    assert await fleet.state_of(first.rollout) == ("baking", 0, None)
    aborted = await rollout.abort(fleet.store, HUB, T0 + 3)  # the only one left in progress
    assert (aborted.rollout, aborted.kind) == (first.rollout, "aborted")

    # Rolling back an older rollout is refused while a later one has given its devices another version.
    third = await fleet.push(policy_text("r3"), selector=Selector.parse(["site=b"]), now=T0 + 4)
    await rollout.promote(fleet.store, HUB, T0 + 5)
    with pytest.raises(RolloutError, match=f"rollout {third.rollout} has since given some of rollout "
                                           f"{second.rollout}'s devices another version: roll that one back first"):
        await rollout.rollback(fleet.store, HUB, T0 + 6, second.rollout)
    assert (await rollout.rollback(fleet.store, HUB, T0 + 6)).rollout == third.rollout
    assert (await rollout.rollback(fleet.store, HUB, T0 + 7, second.rollout)).rollout == second.rollout
