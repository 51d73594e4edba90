"""The agent's side of coordination, unit level: HubCoordinator with a fake `send` on a real
event loop, bid scores, the rule engine with a fake Coordinator (tokens into the action and the
audit, releases, offline behaviour), and the policy fields that drive them.

Waits are short (tens of milliseconds) where a timeout is the point, and bounded everywhere.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from edge_agent.buffer.outbox import Outbox
from edge_agent.decide import coordination
from edge_agent.decide.actuators import Actuators, Recorder
from edge_agent.decide.coordination import APPROVAL_MARGIN_S, LEASE_TTL_MARGIN_S, HubCoordinator, bid_score
from edge_agent.decide.rules import RuleEngine
from edge_agent.decide.windows import ReadingWindows
from edge_agent.sense.sensors import Reading
from edgefleet.errors import ConnectionLost
from edgefleet.policy.document import DEFAULT_APPROVAL_TIMEOUT_S, PolicyError, Rule, validate_policy
from edgefleet.policy.profiles import ActuatorSpec, load_profile
from edgefleet.wire.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    CoordUp,
    LeaseGrant,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    TaskOffer,
    pack_coord,
    unpack_up,
)

BOUND = 5.0  # no single wait below takes more than milliseconds unless it times out on purpose
T0 = 1_700_000_000.0


def policy_text(*rules: str) -> str:
    return "version = 7\n" + "".join(f"\n[[rules]]\n{r.strip()}\n" for r in rules)


def rule_text(name: str = "r", *, action: str = "record", args: str = "{ n = 1 }", offline: str = "skip",
              extra: str = "") -> str:
    return (f'name = "{name}"\nwhen = "temp > 75"\nclear = "temp < 70"\naction = "{action}"\n'
            f'args = {args}\noffline = "{offline}"\n{extra}')


def make_rule(extra: str = 'lease = { name = "L", limit = 2, wait_s = 5 }', **kw: Any) -> Rule:
    [rule] = validate_policy(policy_text(rule_text(extra=extra, **kw)), metrics=None, actuators_allowed=None).rules
    return rule


class FakeSend:
    """The up/coord publisher: records what was sent; raises ConnectionLost while `down`."""

    def __init__(self) -> None:
        self.sent: list[CoordUp] = []
        self.down = False
        self.attempts = 0
        self._changed = asyncio.Event()

    async def __call__(self, message: CoordUp) -> None:
        self.attempts += 1
        self._changed.set()
        if self.down:
            raise ConnectionLost("not connected to the hub")
        assert unpack_up(pack_coord(message)) == message  # it survives the wire format
        self.sent.append(message)

    async def wait(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(BOUND):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def request(self, kind: type, n: int = 1) -> Any:
        """The n-th message of `kind` sent (waiting for it)."""
        await self.wait(lambda: len(self.of(kind)) >= n)
        return self.of(kind)[n - 1]

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


@pytest.fixture
def send() -> FakeSend:
    return FakeSend()


async def bounded(task: asyncio.Task[Any]) -> Any:
    async with asyncio.timeout(BOUND):
        return await task


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- leases --------------------------------------------------------------------------------------


async def test_a_granted_lease_returns_its_token(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule()
    task = asyncio.create_task(coord.lease(rule))
    request: LeaseRequest = await send.request(LeaseRequest)
    # The TTL covers the action's own timeout (record: 30 s) and the margin for the release.
    assert (request.name, request.limit, request.ttl_s, request.rule) == ("L", 2, 30.0 + LEASE_TTL_MARGIN_S, "r")
    await coord.on_message(LeaseGrant(id=request.id, name="L", token=17, expires_in_s=60.0))
    assert await bounded(task) == (True, "17")
    assert send.of(LeaseRelease) == []
    # A command's own timeout sets its TTL.
    cmd = make_rule(action="command", args='{ argv = ["true"], timeout_s = 90 }')
    task = asyncio.create_task(coord.lease(cmd))
    request = await send.request(LeaseRequest, 2)
    assert request.ttl_s == 90.0 + LEASE_TTL_MARGIN_S
    await cancel(task)


async def test_queued_then_granted(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    task = asyncio.create_task(coord.lease(make_rule()))
    request = await send.request(LeaseRequest)
    await coord.on_message(LeaseQueued(id=request.id, name="L", position=3))
    assert coord.positions == {request.id: 3}
    await coord.on_message(LeaseQueued(id=request.id, name="L", position=1))
    assert not task.done()
    await coord.on_message(LeaseGrant(id=request.id, name="L", token=4, expires_in_s=60.0))
    assert await bounded(task) == (True, "4")
    assert coord.positions == {}  # forgotten once granted


async def test_a_lease_wait_times_out_with_the_queue_place_and_leaves_the_queue(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule('lease = { name = "L", limit = 1, wait_s = 0.05 }')
    task = asyncio.create_task(coord.lease(rule))
    request = await send.request(LeaseRequest)
    await coord.on_message(LeaseQueued(id=request.id, name="L", position=7))
    assert await bounded(task) == (False, "no place within 0.05 s (place 7 in the queue)")
    assert send.of(LeaseRelease) == [LeaseRelease(id=request.id, name="L", token=0)]
    assert coord.positions == {}
    # Without a place heard from the hub, the reason says just the wait.
    assert await bounded(asyncio.create_task(coord.lease(rule))) == (False, "no place within 0.05 s")
    assert len(send.of(LeaseRelease)) == 2


async def test_release_sends_the_token_and_the_request_id_once(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule()
    task = asyncio.create_task(coord.lease(rule))
    request = await send.request(LeaseRequest)
    await coord.on_message(LeaseGrant(id=request.id, name="L", token=9, expires_in_s=60.0))
    _, token = await bounded(task)
    await coord.release(rule, token)
    assert send.of(LeaseRelease) == [LeaseRelease(id=request.id, name="L", token=9)]
    await coord.release(rule, token)  # released already: nothing more
    await coord.release(rule, "")  # no token (acted without a lease)
    await coord.release(rule, "123")  # a token never held
    await coord.release(make_rule(extra=""), "9")  # a rule without a lease
    assert len(send.of(LeaseRelease)) == 1


async def test_a_grant_that_comes_after_giving_up_is_handed_back_at_once(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule('lease = { name = "L", limit = 1, wait_s = 0.02 }')
    task = asyncio.create_task(coord.lease(rule))
    request = await send.request(LeaseRequest)
    assert (await bounded(task))[0] is False
    await coord.on_message(LeaseGrant(id=request.id, name="L", token=5, expires_in_s=60.0))
    assert send.of(LeaseRelease) == [LeaseRelease(id=request.id, name="L", token=0),
                                     LeaseRelease(id=request.id, name="L", token=5)]


async def test_a_repeated_grant_of_a_held_lease_is_not_handed_back(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule()
    task = asyncio.create_task(coord.lease(rule))
    request = await send.request(LeaseRequest)
    grant = LeaseGrant(id=request.id, name="L", token=3, expires_in_s=60.0)
    await coord.on_message(grant)
    await coord.on_message(grant)  # the hub answered a repeat (after a reconnect) the same
    assert await bounded(task) == (True, "3")
    await coord.on_message(grant)
    assert send.of(LeaseRelease) == []


async def test_on_connected_sends_again_only_the_open_requests(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    done_rule = make_rule()
    first = asyncio.create_task(coord.lease(done_rule))
    granted = await send.request(LeaseRequest)
    await coord.on_message(LeaseGrant(id=granted.id, name="L", token=1, expires_in_s=60.0))
    await bounded(first)
    lease = asyncio.create_task(coord.lease(make_rule(name="waits")))
    waiting = await send.request(LeaseRequest, 2)
    approval = asyncio.create_task(coord.approve(make_rule(extra="approval = true", name="asks")))
    asked = await send.request(ApprovalRequest)
    before = len(send.sent)
    await coord.on_connected()
    assert sorted(send.sent[before:], key=lambda m: type(m).__name__) == [asked, waiting]  # the same ids
    # Answered, they are not sent again.
    await coord.on_message(LeaseGrant(id=waiting.id, name="L", token=2, expires_in_s=60.0))
    await coord.on_message(ApprovalDecision(id=asked.id, approved=True, by="alice"))
    await bounded(lease)
    await bounded(approval)
    before = len(send.sent)
    await coord.on_connected()
    assert send.sent[before:] == []


async def test_a_send_that_fails_while_disconnected_does_not_fail_the_wait(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    send.down = True
    task = asyncio.create_task(coord.lease(make_rule()))
    await send.wait(lambda: send.attempts == 1)
    await asyncio.sleep(0.01)
    assert not task.done()
    assert send.sent == []
    # On reconnect the open request goes out (the same id), and the answer ends the wait.
    send.down = False
    await coord.on_connected()
    request = await send.request(LeaseRequest)
    await coord.on_message(LeaseGrant(id=request.id, name="L", token=2, expires_in_s=60.0))
    assert await bounded(task) == (True, "2")
    # A release while disconnected does not raise either (the hub takes it back at its TTL).
    send.down = True
    await coord.release(make_rule(), "2")
    # Nor does leaving the queue on a timeout.
    assert (await bounded(asyncio.create_task(
        coord.lease(make_rule('lease = { name = "L", limit = 1, wait_s = 0.02 }')))))[0] is False


async def test_a_late_queue_place_is_not_kept(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule('lease = { name = "L", limit = 1, wait_s = 0.02 }')
    task = asyncio.create_task(coord.lease(rule))
    request = await send.request(LeaseRequest)
    assert (await bounded(task))[0] is False
    # The hub's answer to a repeat that crossed the give-up (or a redelivery) arrives late.
    await coord.on_message(LeaseQueued(id=request.id, name="L", position=4))
    assert coord.positions == {}


async def test_messages_that_are_not_for_the_rule_engine_are_ignored(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    await coord.on_message(TaskOffer(task=1, kind="record", bid_by=T0))
    await coord.on_message(ApprovalDecision(id="nobody-asked", approved=True, by="alice"))
    assert send.sent == []


# --- approvals -------------------------------------------------------------------------------------


def approval_rule(timeout: str = "") -> Rule:
    extra = "approval = true" + (f"\napproval_timeout = {timeout}" if timeout else "")
    return make_rule(extra=extra, action="command", args='{ argv = ["/usr/bin/reflash", "--verify"] }')


@pytest.mark.parametrize(("decision", "expected"), [
    (ApprovalDecision(id="", approved=True, by="alice", reason="looks fine"), (True, "alice")),
    (ApprovalDecision(id="", approved=False, by="bob", reason="not now"), (False, "not now (bob)")),
    (ApprovalDecision(id="", approved=False, by="expired", reason="nobody decided in time"),
     (False, "nobody decided in time (expired)")),
])
async def test_approve_returns_the_decision(send: FakeSend, decision: ApprovalDecision,
                                            expected: tuple[bool, str]) -> None:
    coord = HubCoordinator(send)
    task = asyncio.create_task(coord.approve(approval_rule('"90s"')))
    request: ApprovalRequest = await send.request(ApprovalRequest)
    assert (request.rule, request.action, request.expires_s) == ("r", "command", 90.0)
    assert json.loads(request.args) == {"argv": ["/usr/bin/reflash", "--verify"]}
    await coord.on_message(LeaseQueued(id=request.id, name="L", position=1))  # not an answer
    assert not task.done()
    await coord.on_message(msgspec.structs.replace(decision, id=request.id))
    assert await bounded(task) == expected


async def test_an_unanswered_approval_is_a_denial_after_its_timeout_and_margin(
        send: FakeSend, monkeypatch: pytest.MonkeyPatch) -> None:
    assert APPROVAL_MARGIN_S > 0  # the hub's own "expired" is meant to arrive first
    monkeypatch.setattr(coordination, "APPROVAL_MARGIN_S", 0.03)
    coord = HubCoordinator(send)
    rule = msgspec.structs.replace(approval_rule(), approval_timeout_s=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await bounded(asyncio.create_task(coord.approve(rule))) == (
        False, "no decision within 0.02 s (treated as denied)")
    assert loop.time() - started >= 0.05 - 0.005
    # A decision that arrives later is ignored (nothing waits for it, nothing is sent).
    [request] = send.of(ApprovalRequest)
    await coord.on_message(ApprovalDecision(id=request.id, approved=True, by="alice"))
    assert send.sent == [request]


async def test_long_approval_arguments_are_cut_for_the_operator(send: FakeSend) -> None:
    coord = HubCoordinator(send)
    rule = make_rule(extra="approval = true", args="{ text = \"" + "x" * 5000 + "\" }")
    task = asyncio.create_task(coord.approve(rule))
    request = await send.request(ApprovalRequest)
    assert len(request.args) <= 2000
    assert json.loads(request.args)["truncated"].startswith('{"text": "xxx')
    await cancel(task)


# --- bid scores ------------------------------------------------------------------------------------


@dataclass
class Usage:
    total: int
    used: int
    free: int


def fixed_host(monkeypatch: pytest.MonkeyPatch, cpu: float, free: float) -> None:
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: cpu)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1000, int(1000 * (1 - free)),
                                                                              int(1000 * free)))


def test_bid_score_is_between_0_and_1_on_this_host(tmp_path: Path) -> None:
    for profile in (load_profile("sim"), load_profile("generic-linux")):
        for backlog in (0, 1000, 10**9):
            score, detail = bid_score(profile, "dev-1", tmp_path, backlog)
            assert 0.0 <= score <= 1.0
            assert f"backlog {backlog}" in detail
    # A state directory that does not exist yet: its parent's disk.
    score, _ = bid_score(load_profile("generic-linux"), "dev-1", tmp_path / "not-yet", 0)
    assert 0.0 <= score <= 1.0


def test_bid_score_weighs_idle_cpu_free_disk_and_the_backlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_profile("generic-linux")
    fixed_host(monkeypatch, cpu=0.0, free=1.0)
    assert bid_score(plain, "d", tmp_path, 0) == (1.0, "idle cpu 1.00, free disk 1.00, backlog 0")
    fixed_host(monkeypatch, cpu=100.0, free=0.0)
    assert bid_score(plain, "d", tmp_path, 0)[0] == pytest.approx(0.3)
    fixed_host(monkeypatch, cpu=50.0, free=0.5)
    assert bid_score(plain, "d", tmp_path, 1000)[0] == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3 * 0.5)
    # Busier outboxes bid lower.
    scores = [bid_score(plain, "d", tmp_path, b)[0] for b in (0, 10, 1000, 100_000)]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == 4


def test_the_sim_battery_scales_the_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_host(monkeypatch, cpu=0.0, free=1.0)
    sim = load_profile("sim")
    half = msgspec.structs.replace(sim, sim=msgspec.structs.replace(sim.sim, battery=0.5))
    flat = msgspec.structs.replace(sim, sim=msgspec.structs.replace(sim.sim, battery=0.0))
    assert bid_score(half, "d", tmp_path, 0) == (0.5, "idle cpu 1.00, free disk 1.00, backlog 0, battery 0.50")
    assert bid_score(flat, "d", tmp_path, 0)[0] == 0.0
    # Unset: one level per device, from its id, in [0.2, 1], the same every time.
    levels = {d: bid_score(sim, d, tmp_path, 0)[0] for d in (f"dev-{i}" for i in range(50))}
    assert all(0.2 <= s <= 1.0 for s in levels.values())
    assert len(set(levels.values())) > 10
    assert levels["dev-3"] == bid_score(sim, "dev-3", tmp_path, 0)[0]
    # A profile without a sim sensor has no battery.
    assert "battery" not in bid_score(load_profile("generic-linux"), "d", tmp_path, 0)[1]


# --- the rule engine with a Coordinator -------------------------------------------------------------


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeCoordinator:
    lease_answer: tuple[bool, str] = (True, "42")
    approve_answer: tuple[bool, str] = (True, "alice")
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (what, rule, token)

    async def lease(self, rule: Rule) -> tuple[bool, str]:
        self.calls.append(("lease", rule.name, ""))
        return self.lease_answer

    async def approve(self, rule: Rule) -> tuple[bool, str]:
        self.calls.append(("approve", rule.name, ""))
        return self.approve_answer

    async def release(self, rule: Rule, token: str) -> None:
        self.calls.append(("release", rule.name, token))


@dataclass
class Rig:
    engine: RuleEngine
    outbox: Outbox
    actuators: Actuators
    clock: Clock
    reachable: list[bool]

    async def fire(self, metric: str = "temp", value: float = 80.0) -> None:
        self.engine.on_readings([Reading(metric, self.clock(), value)])
        async with asyncio.timeout(BOUND):
            await self.engine.drain()

    async def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for record in await self.outbox.read_after(0, 1_000_000):
            if record.kind is not None and (kind is None or record.kind == kind):
                assert record.body is not None
                out.append({"kind": record.kind, **json.loads(record.body)})
        return out

    async def kinds(self) -> list[str]:
        return [e["kind"] for e in await self.events()]

    @property
    def calls(self) -> list[dict[str, object]]:
        return [args for _, args in self.actuators.recorder.calls]


SPEC = ActuatorSpec(allowed=["record", "command"], commands=[[sys.executable]])
RigFactory = Callable[..., Any]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    outboxes: list[Outbox] = []

    async def make(*rules: str, coordinator: Any = None, online: bool = True) -> Rig:
        policy = validate_policy(policy_text(*rules), metrics=None, actuators_allowed=None)
        clock = Clock()
        outbox = await Outbox.open(tmp_path / f"state-{len(outboxes)}", 50_000_000, "normal")
        outboxes.append(outbox)
        actuators = Actuators(SPEC, recorder=Recorder(clock=clock))
        reachable = [online]
        engine = RuleEngine(policy, ReadingWindows({"temp": 0.0}, clock), actuators, outbox,
                            hub_reachable=lambda: reachable[0], coordinator=coordinator, clock=clock)
        return Rig(engine, outbox, actuators, clock, reachable)

    yield make
    for outbox in outboxes:
        await outbox.close()


LEASED = 'lease = { name = "L", limit = 1 }'


async def test_the_fencing_token_reaches_a_record_and_the_audit(rig: RigFactory) -> None:
    coord = FakeCoordinator()
    r: Rig = await rig(rule_text(extra=f"{LEASED}\napproval = true"), coordinator=coord)
    await r.fire()
    # Approval first, then the lease; released after the action.
    assert coord.calls == [("approve", "r", ""), ("lease", "r", ""), ("release", "r", "42")]
    assert r.calls == [{"n": 1, "lease_token": 42}]
    assert await r.kinds() == ["rule_fired", "action_started", "action_succeeded"]
    [started] = await r.events("action_started")
    assert started["lease"] == "L"
    assert started["lease_token"] == 42
    assert isinstance(started["lease_token"], int)
    assert started["approved_by"] == "alice"
    assert started["args"] == {"n": 1, "lease_token": 42}


async def test_the_fencing_token_is_in_a_commands_environment(rig: RigFactory) -> None:
    coord = FakeCoordinator(lease_answer=(True, "7"))
    argv = json.dumps([sys.executable, "-c", "import os; print('token=' + os.environ['EDGEFLEET_LEASE_TOKEN'])"])
    r: Rig = await rig(rule_text(action="command", args=f"{{ argv = {argv} }}", extra=LEASED), coordinator=coord)
    await r.fire()
    [succeeded] = await r.events("action_succeeded")
    assert succeeded["output"].strip() == "token=7"
    [started] = await r.events("action_started")
    assert (started["lease"], started["lease_token"], started["args"]) == ("L", 7, {"argv": json.loads(argv)})
    assert "approved_by" not in started
    assert coord.calls[-1] == ("release", "r", "7")


async def test_an_approval_alone_carries_who_approved_and_no_token(rig: RigFactory) -> None:
    coord = FakeCoordinator()
    r: Rig = await rig(rule_text(extra="approval = true"), coordinator=coord)
    await r.fire()
    assert coord.calls == [("approve", "r", "")]
    assert r.calls == [{"n": 1}]
    [started] = await r.events("action_started")
    assert started["approved_by"] == "alice"
    assert "lease" not in started
    assert "lease_token" not in started


async def test_the_lease_is_released_after_a_failing_action_too(rig: RigFactory) -> None:
    coord = FakeCoordinator()
    r: Rig = await rig(rule_text(args="{ fail = true }", extra=LEASED), coordinator=coord)
    await r.fire()
    assert await r.kinds() == ["rule_fired", "action_started", "action_failed"]
    assert coord.calls == [("lease", "r", ""), ("release", "r", "42")]
    # Also after an action the allowlist refused (nothing ran).
    coord2 = FakeCoordinator()
    r2: Rig = await rig(rule_text(action="command", args='{ argv = ["/bin/not-allowed"] }', extra=LEASED),
                        coordinator=coord2)
    await r2.fire()
    assert await r2.kinds() == ["rule_fired", "action_refused"]
    assert coord2.calls == [("lease", "r", ""), ("release", "r", "42")]


async def test_no_lease_or_no_approval_refuses_the_action(rig: RigFactory) -> None:
    coord = FakeCoordinator(lease_answer=(False, "no place within 5 s (place 2 in the queue)"))
    r: Rig = await rig(rule_text(extra=LEASED), coordinator=coord)
    await r.fire()
    assert r.calls == []
    [refused] = await r.events("action_refused")
    assert refused["detail"] == "no lease 'L': no place within 5 s (place 2 in the queue)"
    assert coord.calls == [("lease", "r", "")]  # nothing to release
    coord = FakeCoordinator(approve_answer=(False, "not now (bob)"))
    r = await rig(rule_text(extra=f"{LEASED}\napproval = true"), coordinator=coord)
    await r.fire()
    assert r.calls == []
    assert [e["detail"] for e in await r.events("action_refused")] == ["no approval: not now (bob)"]
    assert coord.calls == [("approve", "r", "")]  # no lease asked for without the approval


async def test_offline_act_skips_coordination_audited_and_acts_without_a_token(rig: RigFactory) -> None:
    coord = FakeCoordinator()
    r: Rig = await rig(rule_text(offline="act", extra=f"{LEASED}\napproval = true"), coordinator=coord, online=False)
    await r.fire()
    assert coord.calls == []
    assert r.calls == [{"n": 1}]
    assert await r.kinds() == ["coordination_skipped", "rule_fired", "action_started", "action_succeeded"]
    [skipped] = await r.events("coordination_skipped")
    assert skipped["detail"] == ('the hub is unreachable and the rule says offline = "act": acting without '
                                 "a lease and an approval")
    [started] = await r.events("action_started")
    assert not {"lease", "lease_token", "approved_by"} & started.keys()


async def test_offline_skip_does_not_act_and_is_audited(rig: RigFactory) -> None:
    coord = FakeCoordinator()
    r: Rig = await rig(rule_text(offline="skip", extra=LEASED), coordinator=coord, online=False)
    await r.fire()
    assert coord.calls == []
    assert r.calls == []
    assert await r.kinds() == ["rule_fired", "action_skipped"]
    [skipped] = await r.events("action_skipped")
    assert "unreachable" in skipped["detail"]
    assert 'offline = "skip"' in skipped["detail"]


async def test_the_engine_with_a_hub_coordinator_end_to_end(rig: RigFactory) -> None:
    """The real HubCoordinator between the engine and a fake hub that grants at once."""
    released: list[LeaseRelease] = []
    holder: list[HubCoordinator] = []

    async def hub(message: CoordUp) -> None:
        if isinstance(message, LeaseRequest):
            grant = LeaseGrant(id=message.id, name=message.name, token=11, expires_in_s=message.ttl_s)
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, holder[0].on_message(grant))
        elif isinstance(message, LeaseRelease):
            released.append(message)

    coord = HubCoordinator(hub)
    holder.append(coord)
    r: Rig = await rig(rule_text(extra=LEASED), coordinator=coord)
    await r.fire()
    assert r.calls == [{"n": 1, "lease_token": 11}]
    assert [(m.name, m.token) for m in released] == [("L", 11)]


# --- policy fields --------------------------------------------------------------------------------


def check(extra: str) -> Rule:
    [rule] = validate_policy(policy_text(rule_text(extra=extra)), metrics=None, actuators_allowed=None).rules
    return rule


def problems(extra: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        check(extra)
    return [p.message for p in info.value.problems]


def test_approval_timeout_is_a_duration_that_needs_approval() -> None:
    assert check("approval = true").approval_timeout_s == DEFAULT_APPROVAL_TIMEOUT_S
    assert check('approval = true\napproval_timeout = "30m"').approval_timeout_s == 1800.0
    assert check("approval = true\napproval_timeout = 45").approval_timeout_s == 45.0
    assert check('approval = true\napproval_timeout = "24h"').approval_timeout_s == 86400.0
    assert problems('approval_timeout = "30m"') == ["rule 'r': `approval_timeout` needs `approval = true`"]
    assert problems('approval = false\napproval_timeout = "30m"') == [
        "rule 'r': `approval_timeout` needs `approval = true`"]
    for bad in ('"0s"', "0", '"25h"', "86401", "inf"):
        assert problems(f"approval = true\napproval_timeout = {bad}") == [
            "rule 'r': `approval_timeout` must be more than 0 and at most 24 hours"], bad
    [message] = problems('approval = true\napproval_timeout = "soon"')
    assert "is not a duration" in message
    assert problems("approval = true\napproval_timeout = -5")  # negative: refused by the schema
    assert problems('approval = "yes"')


def test_lease_fields_are_checked() -> None:
    rule = check('lease = { name = "collector-restart", limit = 2 }')
    assert rule.lease is not None
    assert (rule.lease.name, rule.lease.limit, rule.lease.wait_s) == ("collector-restart", 2, 300.0)
    assert check('lease = { name = "L", limit = 1, wait_s = 86400 }').lease.wait_s == 86400.0  # type: ignore[union-attr]
    assert check('lease = { name = "L", limit = 1, wait_s = 0.5 }').lease.wait_s == 0.5  # type: ignore[union-attr]
    for bad in ("wait_s = 0", "wait_s = -1", "wait_s = 86401", 'wait_s = "2m"', "limit = 0", "limit = 100001"):
        extra = 'lease = { name = "L", limit = 1, ' + bad + " }" if "limit" not in bad else \
            'lease = { name = "L", ' + bad + " }"
        assert problems(extra), bad
    assert problems('lease = { name = "L" }')  # limit is required
    assert problems('lease = { name = "has space", limit = 1 }')
    assert problems('lease = { name = "L", limit = 1, ttl = 5 }')  # unknown key

