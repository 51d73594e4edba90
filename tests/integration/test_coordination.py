"""Regional coordination end to end: leases with fencing tokens, tasks by bidding, approvals.

Real hub (`edge-hub -v run` with its Mosquitto), real agents over mutual TLS; what happened
is read where an operator reads it: the audit events at the hub (`edge-hub events --json`),
`edge-hub leases|tasks|approvals --json`, and the hub's log. The fifty-device contention
runs fifty complete agents in the test process (tests/support/inprocess.py); everything that is
killed, stopped or partitioned is a real agent process.

Rules that need the hub are pushed (`edge-hub policy push`) only once their agents are
online: a rule that fires before its agent has connected follows its `offline` setting
instead. Each such rule fires once per policy: `when` holds for every sim reading, `clear`
never does, and there is no cooldown.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.test_rules_integration import local_events
from tests.integration.test_store_forward_faults import kill_9, wait_until
from tests.support.exactly_once import wait_drained
from tests.support.faultproxy import FaultProxy
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli, start_hub
from tests.support.inprocess import InProcessFleet

pytestmark = pytest.mark.integration

T = TypeVar("T")

HUB_ID = "hub.test"  # hub_dir's region is "test"
# Status at once after a policy and every second; readings often enough that a new policy's
# rules are evaluated at once; a broker that went away noticed in seconds.
AGENT_SETS = ("sim.rate_hz=5", "uplink.status_interval=1", "uplink.ack_timeout=3", "broker.connect_timeout=3")
HOLD_S = 45.0  # dev-q1's action in test_a_queued_device_that_reconnects_keeps_its_place
FAST_KEEPALIVE = "broker.keepalive=2"  # a partitioned device is dropped by the broker after 3 s
ONLINE_TIMEOUT = 30.0  # several agents starting at once on a loaded 2-core machine
APPLY_TIMEOUT = 20.0  # a push to every agent's "applied"
DELIVERY_TIMEOUT = 20.0  # an audit record committed on a device to the hub's events table
POLL = 0.25
ONCE = 'when = "sig0 > -1000"\nclear = "sig0 < -2000"'  # fires once when the policy starts
RECORD_TIMEOUT_S = 30.0  # edge_agent.decide.rules.ACTION_TIMEOUT: the record action's own timeout
LEASE_TTL_S = RECORD_TIMEOUT_S + 30.0  # + edge_agent.decide.coordination.LEASE_TTL_MARGIN_S
GRANTED = re.compile(r"lease (\S+): granted to (\S+), token (\d+)")


# --- policies ---------------------------------------------------------------------------------


def rule(name: str, *, args: str = "{}", offline: str = "skip", **extra: str) -> str:
    """A record rule that fires once; `extra` are TOML lines (key = literal)."""
    lines = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return f'\n[[rules]]\nname = "{name}"\n{ONCE}\naction = "record"\nargs = {args}\noffline = "{offline}"\n{lines}'


async def push_policy(hub_dir: HubDir, hub: Proc, *rules: str, target: str | None = None,
                      timeout: float = 20.0) -> int:
    """Push the rules; return the version once its rollout is complete (no health gate watches
    it any more: a device killed or partitioned later must not roll it back)."""
    path = hub_dir.dir.parent / f"policy-{time.monotonic_ns()}.toml"
    path.write_text("".join(rules))
    argv = ["policy", "push", str(path), *(("--target", target) if target else ())]
    deadline = time.monotonic() + timeout
    mark = hub.mark()
    while True:  # the previous push's rollout may still be finishing
        code, out, err = await run_cli(HUB, *argv, "--dir", str(hub_dir.dir))
        if code == 0 or "still in progress" not in err or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL)
    assert code == 0, f"policy push exited {code}: {err}{out}"
    found = re.search(r"version (\d+) \(rollout (\d+)\)", out)
    assert found, out
    await hub.wait_for(rf"rollout {found[2]}: version {found[1]} reached all", after=mark, timeout=timeout)
    return int(found[1])


# --- the operator's CLI -----------------------------------------------------------------------


async def cli(hub_dir: HubDir, *argv: str) -> str:
    code, out, err = await run_cli(HUB, *argv, "--dir", str(hub_dir.dir))
    assert code == 0, f"edge-hub {' '.join(argv)} exited {code}: {err}{out}"
    return out


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def events(hub_dir: HubDir, device: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    argv = ["events", "--json", *(("--device", device) if device else ()), *(("--kind", kind) if kind else ())]
    return json_lines(await cli(hub_dir, *argv))


async def leases(hub_dir: HubDir) -> dict[str, dict[str, Any]]:
    return {entry["lease"]: entry for entry in json_lines(await cli(hub_dir, "leases", "--json"))}


async def tasks(hub_dir: HubDir) -> dict[int, dict[str, Any]]:
    return {entry["task"]: entry for entry in json_lines(await cli(hub_dir, "tasks", "--json"))}


async def poll(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float, every: float = POLL) -> T:
    """Ask `probe()` (a CLI read) until it answers something, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last answer: {found!r})")
        await asyncio.sleep(every)


def hub_db(hub_dir: HubDir, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only look into hub.db, for waits too short for a CLI round trip."""
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def of_rule(evts: list[dict[str, Any]], rule_name: str, *kinds: str) -> list[dict[str, Any]]:
    return [e for e in evts if e["rule"] == rule_name and (not kinds or e["kind"] in kinds)]


# --- agents as processes ------------------------------------------------------------------------


def agent_argv(bundle: Path, *overrides: str) -> list[str]:
    # Info, not debug: at debug aiosqlite logs every SQL call of the outbox (tests/conftest.py).
    sets = [a for o in (*AGENT_SETS, *overrides) for a in ("--set", o)]
    return [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "info", *sets]


@asynccontextmanager
async def agent_procs(hub: Proc, bundles: Path, devices: dict[str, tuple[str, ...]]) -> AsyncIterator[dict[str, Proc]]:
    """One agent process per device (with its own overrides), each online at the hub."""
    mark = hub.mark()
    procs: dict[str, Proc] = {}
    try:
        for device, overrides in devices.items():
            procs[device] = await Proc(device, agent_argv(bundles / device, *overrides)).start()
        for device, proc in procs.items():
            await proc.wait_for(rf"{device} online", timeout=ONLINE_TIMEOUT)
            await hub.wait_for(rf"device {device} is online", after=mark, timeout=ONLINE_TIMEOUT)
        yield procs
    finally:
        await asyncio.gather(*(proc.stop() for proc in procs.values()))


# --- what the audit says -----------------------------------------------------------------------


def action_spans(evts: list[dict[str, Any]], rule_name: str) -> list[tuple[float, float, str, int | None]]:
    """(start, end, device, lease token) of every action of the rule: its action_started and the
    action_succeeded/failed that ends it (the device's next outcome record of the rule)."""
    spans = []
    open_: dict[str, dict[str, Any]] = {}
    for e in sorted(of_rule(evts, rule_name), key=lambda e: (e["device"], e["seq"])):
        if e["kind"] == "action_started":
            assert e["device"] not in open_, f"{e['device']} started twice without an outcome"
            open_[e["device"]] = e
        elif e["kind"] in ("action_succeeded", "action_failed"):
            start = open_.pop(e["device"])
            spans.append((start["ts"], e["ts"], e["device"], start["body"].get("lease_token")))
    assert not open_, f"actions without an outcome: {sorted(open_)}"
    return spans


def most_at_once(spans: list[tuple[float, float, str, int | None]]) -> int:
    """The most actions running at the same time (an end at the same instant as a start counts first)."""
    points = sorted([(s, 1) for s, _, _, _ in spans] + [(e, -1) for _, e, _, _ in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def asked(lease: str, device: str) -> str:
    """The hub's log line for a cycle's lease requests ("lease L: d1, d2 ask")."""
    return rf"lease {lease}: (.*, )?{device}(, .*)? asks?\b"


def grants(hub: Proc, after: int = 0) -> list[tuple[str, str, int]]:
    """(lease, device, token) of every grant in the hub's log, in the order granted."""
    return [(m[1], m[2], int(m[3])) for line in hub.lines[after:] if (m := GRANTED.search(line))]


# --- 1. fifty devices, one lease of limit 2 ---------------------------------------------------------

FLEET = 50
FLEET_SETS = ("uplink.status_interval=5", "uplink.ack_timeout=5", "outbox.synchronous=normal")


@pytest.mark.timeout(240)
async def test_fifty_devices_contend_for_a_lease_of_limit_two(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """Fifty complete agents (in this process) fire the same rule at once; the lease lets two
    act at a time. The audit shows never more than two actions running, every action carries
    its own fencing token, the tokens grow in the order the hub granted them, and every device
    acts in the end."""
    devices = [f"dev-{i:02d}" for i in range(FLEET)]
    await hub_dir.provision(bundles, *devices)
    mark = hub.mark()
    async with InProcessFleet([bundles / d for d in devices], FLEET_SETS) as fleet:
        await fleet.wait_online(timeout=60)
        for device in devices:
            await hub.wait_for(rf"device {device} is online", after=mark, timeout=30)
        mark = hub.mark()
        began = time.monotonic()
        version = await push_policy(hub_dir, hub, rule(
            "contend", args="{ sleep_s = 0.3 }", lease='{ name = "pump", limit = 2, wait_s = 300 }'), timeout=60)
        await fleet.wait_policy(version, timeout=30)

        def not_done() -> list[str]:
            done = {d for (d,) in hub_db(hub_dir, "SELECT device FROM events WHERE kind = 'action_succeeded'")}
            return [d for d in devices if d not in done]

        # 25 turns of 0.3 s, each with a release and a grant through the hub.
        await fleet.wait_until("every device acted and its audit reached the hub", not_done, timeout=120, every=0.5)
        elapsed = time.monotonic() - began

    evts = await events(hub_dir)
    spans = action_spans(evts, "contend")
    assert sorted(d for _, _, d, _ in spans) == devices, "one action per device"
    assert most_at_once(spans) <= 2, "more than `limit` devices acted at once"
    assert most_at_once(spans) == 2, "the lease was never shared: limit 2 means two at a time"
    started = of_rule(evts, "contend", "action_started")
    assert all(e["body"]["lease"] == "pump" for e in started)
    tokens = {e["device"]: e["body"]["lease_token"] for e in started}
    assert sorted(tokens.values()) == list(range(1, FLEET + 1)), "tokens: distinct, one per action, none lost"
    assert all(e["body"]["args"]["lease_token"] == tokens[e["device"]] for e in started)  # the action got it
    assert not of_rule(evts, "contend", "action_refused", "action_skipped", "action_failed")

    granted = grants(hub, mark)
    assert [t for _, _, t in granted] == list(range(1, FLEET + 1)), "tokens grow strictly in grant order"
    assert {d: t for _, d, t in granted} == tokens, "each device acted with the token the hub granted it"
    # Started in grant order, give or take the two that share a turn.
    by_start = [tokens[d] for _, _, d, _ in sorted(spans)]
    assert all(abs(t - i) <= 2 for i, t in enumerate(by_start, start=1)), by_start

    state = (await leases(hub_dir))["pump"]
    assert (state["last_token"], state["holders"], state["queue"]) == (FLEET, [], [])
    assert not await events(hub_dir, HUB_ID, "lease_expired")
    print(f"50 devices through a lease of 2 in {elapsed:.1f} s")


@pytest.mark.timeout(90)
async def test_the_audit_never_shows_more_holders_than_the_limit_when_an_outbox_commit_is_slow(
        hub_dir: HubDir, hub: Proc, bundles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Limit 1: dev-s1 holds (a 6 s action), dev-s2 waits. dev-s1's outbox is slow to commit the
    action's outcome (1 s: an SD card's fsync behind a batch of readings, made deterministic).
    The audit must still show one action at a time: the outcome committed, then the release."""
    await hub_dir.provision(bundles, "dev-s1", extra=("--tag", "turn=first"))
    await hub_dir.provision(bundles, "dev-s2", extra=("--tag", "turn=second"))
    single = rule("single", args="{ sleep_s = 6 }", lease='{ name = "single", limit = 1, wait_s = 60 }')
    mark = hub.mark()
    async with InProcessFleet([bundles / "dev-s1", bundles / "dev-s2"], FLEET_SETS) as fleet:
        await fleet.wait_online(timeout=30)
        for device in fleet.agents:
            await hub.wait_for(rf"device {device} is online", after=mark, timeout=30)
        outbox = fleet.agents["dev-s1"].outbox
        commit = outbox.add_events

        async def slow_outcomes(records: list[tuple[str, dict[str, object]]], **options: Any) -> list[int]:
            if any(kind in ("action_succeeded", "action_failed") for kind, _ in records):
                await asyncio.sleep(1.0)
            return await commit(records, **options)  # options: `otherwise`, for a disk that refuses writes

        monkeypatch.setattr(outbox, "add_events", slow_outcomes)
        await push_policy(hub_dir, hub, single, target="turn=first")
        await hub.wait_for(r"lease single: granted to dev-s1, token 1", after=mark, timeout=APPLY_TIMEOUT)
        await push_policy(hub_dir, hub, single, target="turn=second")
        await hub.wait_for(asked("single", "dev-s2"), after=mark, timeout=APPLY_TIMEOUT)
        await hub.wait_for(r"lease single: granted to dev-s2, token 2", after=mark, timeout=15)
        await fleet.wait_until("both outcomes at the hub", lambda: {"dev-s1", "dev-s2"} - {
            d for (d,) in hub_db(hub_dir, "SELECT device FROM events WHERE kind = 'action_succeeded'")},
            timeout=DELIVERY_TIMEOUT + 6)

    spans = action_spans(await events(hub_dir), "single")
    assert sorted((d, t) for _, _, d, t in spans) == [("dev-s1", 1), ("dev-s2", 2)]
    assert most_at_once(spans) == 1, f"the audit shows two holders of a lease of limit 1: {sorted(spans)}"


# --- 2. a holder killed with kill -9 ------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_holder_killed_with_kill_9_loses_its_lease_at_its_ttl(hub_dir: HubDir, hub: Proc,
                                                                      bundles: Path) -> None:
    """Limit 1, a 30 s action: one device holds, two wait. The holder is killed with kill -9
    mid-action and never releases; the hub keeps the lease for its TTL (60 s: the action's
    timeout + 30 s; a dead holder looks like a slow one), then records lease_expired. The
    next in line was killed too while it waited: its request is dropped when its turn comes,
    and the one after it gets the lease, with the next token."""
    devices = ("dev-k1", "dev-k2", "dev-k3")
    await hub_dir.provision(bundles, *devices)
    async with agent_procs(hub, bundles, dict.fromkeys(devices, ())) as procs:
        await push_policy(hub_dir, hub, rule(
            "slow", args="{ sleep_s = 30 }", lease='{ name = "solo", limit = 1, wait_s = 120 }'))

        async def one_holds_two_wait() -> dict[str, Any] | None:
            entry = (await leases(hub_dir)).get("solo")
            return entry if entry and len(entry["holders"]) == 1 and len(entry["queue"]) == 2 else None

        state = await poll(one_holds_two_wait, "one holder and two queued", APPLY_TIMEOUT)
        holder = state["holders"][0]
        victim, dropout, heir = holder["device"], *(q["device"] for q in state["queue"])
        assert (holder["token"], state["last_token"]) == (1, 1)
        assert LEASE_TTL_S - 10 < holder["expires_in_s"] <= LEASE_TTL_S
        await poll(lambda: events(hub_dir, victim, "action_started"), f"{victim}'s action_started", DELIVERY_TIMEOUT)

        mark = hub.mark()
        await kill_9(procs[victim])
        await kill_9(procs[dropout])
        for device in (victim, dropout):
            await hub.wait_for(rf"device {device} is offline", after=mark)  # their Last Wills
        state = (await leases(hub_dir))["solo"]
        assert [h["device"] for h in state["holders"]] == [victim], "the lease stays with the vanished holder"
        assert [q["device"] for q in state["queue"]] == [dropout, heir]
        left = state["holders"][0]["expires_in_s"]

        await hub.wait_for(rf"lease solo: token 1 of {victim} expired", after=mark, timeout=left + 10)
        await hub.wait_for(rf"lease solo: granted to {heir}, token 2", after=mark, timeout=5)
        started = await poll(lambda: events(hub_dir, heir, "action_started"), f"{heir}'s action", DELIVERY_TIMEOUT)

    assert [(e["body"]["lease"], e["body"]["lease_token"]) for e in started] == [("solo", 2)]
    expired = await events(hub_dir, HUB_ID, "lease_expired")
    assert [e["body"] for e in expired] == [{"lease": "solo", "device": victim, "token": 1}]
    assert expired[0]["ts"] - holder["granted_at"] >= LEASE_TTL_S - 0.5, "taken back before its TTL"
    assert started[0]["ts"] >= expired[0]["ts"] - 0.5
    victims = await events(hub_dir, victim)
    assert [e["body"]["lease_token"] for e in of_rule(victims, "slow", "action_started")] == [1]
    assert not of_rule(victims, "slow", "action_succeeded", "action_failed")  # it never finished
    assert not of_rule(await events(hub_dir, dropout), "slow", "action_started")
    assert not [g for g in grants(hub) if g[1] == dropout]
    state = (await leases(hub_dir))["solo"]
    assert ([(h["device"], h["token"]) for h in state["holders"]], state["queue"]) == ([(heir, 2)], [])


# --- 3. the hub killed with kill -9 mid-leasing -----------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_hub_killed_mid_leasing_grants_nothing_twice_and_serves_its_queue(
        hub_dir: HubDir, bundles: Path) -> None:
    """Four devices, limit 2, 8 s actions: two hold and two are queued when the hub is killed
    with kill -9. The new hub (which stops the orphaned broker: every agent reconnects and
    asks again for what it still waits for) finds holders, tokens and the queue in its
    database: the holders keep their tokens, the queued devices get the next ones after the
    restart, no token is handed out twice and never more than two act at once."""
    devices = [f"dev-r{i}" for i in range(1, 5)]
    await hub_dir.provision(bundles, *devices)
    hub = await start_hub(hub_dir)
    try:
        async with agent_procs(hub, bundles, dict.fromkeys(devices, ())) as procs:
            await push_policy(hub_dir, hub, rule(
                "turns", args="{ sleep_s = 8 }", lease='{ name = "turns", limit = 2, wait_s = 150 }'))

            async def two_hold_two_wait() -> dict[str, Any] | None:
                entry = (await leases(hub_dir)).get("turns")
                return entry if entry and len(entry["holders"]) == 2 and len(entry["queue"]) == 2 else None

            state = await poll(two_hold_two_wait, "two holders and two queued", APPLY_TIMEOUT)
            held = {h["device"]: h["token"] for h in state["holders"]}
            queued = [q["device"] for q in state["queue"]]
            assert sorted(held.values()) == [1, 2]

            await kill_9(hub)
            killed_at = time.time()
            await hub.stop()
            marks = {d: p.mark() for d, p in procs.items()}
            hub = await start_hub(hub_dir)
            for device, proc in procs.items():
                await proc.wait_for(rf"{device} online", after=marks[device], timeout=ONLINE_TIMEOUT)

            def not_done() -> list[str]:
                done = {d for (d,) in hub_db(hub_dir, "SELECT device FROM events WHERE kind = 'action_succeeded'")}
                return [d for d in devices if d not in done]

            # 8 s turns; a release lost with the orphaned broker costs the lease's TTL (60 s).
            await wait_until(lambda: not not_done(), "every device acted after the restart",
                             timeout=2 * 8 + LEASE_TTL_S + 20, every=0.5)

        evts = await events(hub_dir)
        spans = action_spans(evts, "turns")
        assert sorted(d for _, _, d, _ in spans) == devices, "one action per device"
        assert most_at_once(spans) <= 2
        tokens = {d: t or 0 for _, _, d, t in spans}  # 0: acted without a token
        assert sorted(tokens.values()) == [1, 2, 3, 4], "no token repeated or skipped"
        assert {d: tokens[d] for d in held} == held, "the holders kept the tokens granted before the kill"
        assert sorted(tokens[d] for d in queued) == [3, 4]
        queued_starts = [s for s, _, d, _ in spans if d in queued]
        assert min(queued_starts) > killed_at, "the queued devices acted only after the restart"
        # The new hub granted only the queue: a holder asking again would have had its old grant back.
        assert sorted((d, t) for _, d, t in grants(hub)) == sorted((d, tokens[d]) for d in queued)
        expired = await events(hub_dir, HUB_ID, "lease_expired")
        assert {e["body"]["device"] for e in expired} <= set(held), "only a release lost in the restart expires"
        state = (await leases(hub_dir))["turns"]
        assert (state["last_token"], state["queue"]) == (4, [])
    finally:
        await hub.stop()


# --- 4. a partition: offline = "act" | "skip" -------------------------------------------------------


async def test_a_partitioned_device_follows_offline_act_or_skip(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """The agent starts with the cable pulled (a fault proxy) and its local policy fires at
    once: the lease rule with offline = "act" acts without a lease and audits
    coordination_skipped first; the one with offline = "skip" does not act and audits
    action_skipped; so does an approval rule with offline = "act". After the heal the records
    reach the hub once, and the hub never saw a lease or approval request."""
    device = "dev-part"
    await hub_dir.provision(bundles, device)
    bundle = bundles / device
    door = '{ name = "door", limit = 1 }'
    (bundle / "policy.toml").write_text("version = 1\n" + "".join((
        rule("acts", args='{ rule = "acts" }', offline="act", lease=door),
        rule("skips", args='{ rule = "skips" }', offline="skip", lease=door),
        rule("asks", args='{ rule = "asks" }', offline="act", approval="true"),
    )))
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        proxy.partition()
        port = f"broker.port={proxy.port}"
        agent = await Proc(device, agent_argv(bundle, port, 'policy="policy.toml"', FAST_KEEPALIVE)).start()
        try:
            def decided() -> bool:
                kinds = {(body.get("rule"), kind) for _, kind, body in local_events(bundle)}
                return {("acts", "action_succeeded"), ("skips", "action_skipped"),
                        ("asks", "action_succeeded")} <= kinds

            await wait_until(decided, "every rule decided while partitioned", 15)
            assert proxy.stats().bytes_to_target == 0
            mark = agent.mark()
            proxy.heal()
            await agent.wait_for(rf"{device} online", after=mark, timeout=30)
            await wait_drained(hub_dir.dir, bundle, timeout=30)
        finally:
            await agent.stop()

    evts = await events(hub_dir, device)
    assert [e["kind"] for e in of_rule(evts, "acts")] == [
        "coordination_skipped", "rule_fired", "action_started", "action_succeeded"]
    assert [e["kind"] for e in of_rule(evts, "asks")] == [
        "coordination_skipped", "rule_fired", "action_started", "action_succeeded"]
    assert [e["kind"] for e in of_rule(evts, "skips")] == ["rule_fired", "action_skipped"]
    skipped = {e["rule"]: e["body"]["detail"] for e in evts if e["kind"] == "coordination_skipped"}
    assert skipped["acts"].endswith("acting without a lease"), skipped
    assert skipped["asks"].endswith("acting without an approval"), skipped
    assert 'offline = "act"' in skipped["acts"]
    assert 'offline = "skip"' in of_rule(evts, "skips", "action_skipped")[0]["body"]["detail"]
    for name in ("acts", "asks"):  # no token, nobody approved: it acted alone, and says so
        body = of_rule(evts, name, "action_started")[0]["body"]
        assert {"lease", "lease_token", "approved_by"}.isdisjoint(body), body
        assert "lease_token" not in body["args"]
    assert await cli(hub_dir, "leases", "--json") == ""
    assert await cli(hub_dir, "approvals", "list", "--all", "--json") == ""


# --- 5. tasks by bidding ---------------------------------------------------------------------------


def bids_of(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["device"]: b for b in task["bids"]}


async def finished_task(hub_dir: HubDir, task: int, timeout: float = 20.0) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        entry = (await tasks(hub_dir)).get(task)
        return entry if entry and entry["state"] in ("done", "failed") else None

    return await poll(final, f"task {task} done or failed", timeout)


async def offer(hub_dir: HubDir, kind: str, *argv: str) -> int:
    out = await cli(hub_dir, "task", "offer", "--kind", kind, *argv)
    found = re.match(r"task (\d+) ", out)
    assert found, out
    return int(found[1])


async def test_a_task_goes_to_the_best_bidder_then_the_next_and_fails_with_a_reason(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """Three able bidders (sim batteries 0.95, 0.4, 0.1) and a fourth device that is frozen
    (SIGSTOP) and never bids, so the bid window runs its full 2 s. The best bidder is frozen
    once its bid is in: its award times out (--timeout 3s) and the task goes to the next,
    which does it; its late answer changes nothing. A task whose action fails everywhere
    passes through every bidder in order and fails; a task nobody may run (command on sim)
    and one for no online device fail at once; each says why."""
    # Far enough apart that no CPU load can reorder them (score = battery x (0.4 idle + 0.3 free disk + 0.3 quiet)).
    batteries = {"dev-a": 0.95, "dev-b": 0.4, "dev-c": 0.1, "dev-mute": 0.02}
    await hub_dir.provision(bundles, *batteries)
    async with agent_procs(hub, bundles, {d: (f"sim.battery={b}",) for d, b in batteries.items()}) as procs:
        procs["dev-mute"].signal(signal.SIGSTOP)
        best = procs["dev-a"]
        mark = best.mark()
        first = await offer(hub_dir, "record", "--args", '{"job": "first"}', "--timeout", "3s")
        # Freeze the best bidder once the hub has its bid, long before the 2 s window closes.
        await wait_until(lambda: bool(hub_db(hub_dir, "SELECT 1 FROM bids WHERE task = ? AND device = 'dev-a'",
                                             (first,))), "dev-a's bid at the hub", 10, every=0.02)
        best.signal(signal.SIGSTOP)
        assert not hub_db(hub_dir, "SELECT 1 FROM tasks WHERE id = ? AND state != 'bidding'", (first,)), \
            "awarded before the bid window closed"
        done = await finished_task(hub_dir, first)
        best.signal(signal.SIGCONT)
        procs["dev-mute"].signal(signal.SIGCONT)
        assert (done["state"], done["device"], done["attempts"]) == ("done", "dev-b", 2), done
        bids = bids_of(done)
        assert set(bids) == {"dev-a", "dev-b", "dev-c"}, "the frozen device never bid"
        assert max(bids, key=lambda d: bids[d]["score"]) == "dev-a"
        assert bids["dev-a"]["score"] > bids["dev-b"]["score"] > bids["dev-c"]["score"]
        assert all("battery" in b["detail"] for b in bids.values())
        assert (bids["dev-a"]["outcome"], bids["dev-a"]["result"]) == ("timeout", "no answer in time")
        assert bids["dev-b"]["outcome"] == "succeeded"
        assert bids["dev-c"]["outcome"] is None
        assert done["result"]["device"] == "dev-b"
        # Thawed, dev-a runs its stale award and answers for attempt 1: the hub ignores it.
        await best.wait_for(rf"task {first}: done", after=mark, timeout=15)

        failing = await offer(hub_dir, "record", "--args", '{"fail": true}', "--timeout", "5s")
        nobody = await offer(hub_dir, "command", "--args", '{"argv": ["/usr/bin/true"]}')
        elsewhere = await offer(hub_dir, "record", "--target", "profile=rpi-4")
        failed = {t: await finished_task(hub_dir, t) for t in (failing, nobody, elsewhere)}
        after = await finished_task(hub_dir, first)

    assert (after["state"], after["device"], after["attempts"]) == ("done", "dev-b", 2), "a late answer changed it"

    task = failed[failing]
    assert task["state"] == "failed"
    assert task["attempts"] == 4, "every able bidder had its turn"
    assert {b["outcome"] for b in task["bids"]} == {"failed"}
    assert task["reason"].startswith("every bidder failed: ")
    assert task["reason"].count("failed because its arguments asked it to") == 4
    ranked = sorted(task["bids"], key=lambda b: -b["score"])
    assert [b["device"] for b in ranked][:3] == ["dev-a", "dev-b", "dev-c"]

    task = failed[nobody]
    assert (task["state"], task["attempts"]) == ("failed", 0)
    assert task["reason"].startswith("no device can do it (")
    assert all(not b["able"] for b in task["bids"])
    assert len(task["bids"]) == 4
    assert all(f"{d}: " in task["reason"] for d in batteries)
    assert "command" in task["reason"]

    task = failed[elsewhere]
    assert (task["state"], task["reason"], task["bids"]) == ("failed", "no online device matches the target", [])

    hub_events = await events(hub_dir, HUB_ID)
    assert [e["body"]["task"] for e in hub_events if e["kind"] == "task_offered"] == [first, failing, nobody,
                                                                                       elsewhere]
    assert [(e["body"]["task"], e["body"]["device"]) for e in hub_events if e["kind"] == "task_done"] == [
        (first, "dev-b")]
    assert {e["body"]["task"]: e["body"]["reason"] for e in hub_events if e["kind"] == "task_failed"} == {
        t: failed[t]["reason"] for t in failed}
    # The devices' own audit: dev-b did the first task; every able device tried the failing one.
    assert [(e["body"]["task"], e["body"]["ok"]) for e in await events(hub_dir, "dev-b", "task_done")] == [
        (first, True), (failing, False)]


# --- 6. approvals ---------------------------------------------------------------------------------


async def test_approvals_expire_as_denied_and_decisions_are_audited_with_who(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """Three rules ask before they act. Nobody answers the first in its 2 s: it expires,
    which is a denial; the second is approved and the third denied with the CLI. The hub
    audits each decision with `by`; the device acts only on the approval (action_started
    with approved_by, and the lease it asks for after the approval), and refuses the others."""
    device = "dev-ask"
    me = getpass.getuser()
    await hub_dir.provision(bundles, device)
    async with agent_procs(hub, bundles, {device: ()}):
        await push_policy(hub_dir, hub,
                          rule("lapses", approval="true", approval_timeout='"2s"'),
                          rule("granted", args='{ what = "approved" }', approval="true", approval_timeout='"60s"',
                               lease='{ name = "gate", limit = 1 }'),
                          rule("refused", approval="true", approval_timeout='"60s"'))

        async def pending() -> dict[str, dict[str, Any]] | None:
            rows = {r["rule"]: r for r in json_lines(await cli(hub_dir, "approvals", "list", "--json"))}
            return rows if {"granted", "refused"} <= set(rows) else None

        rows = await poll(pending, "the approval requests at the hub", APPLY_TIMEOUT)
        assert rows["granted"]["args"] == {"what": "approved"}
        assert rows["granted"]["device"] == device
        assert all(r["state"] == "pending" for r in rows.values())
        out = await cli(hub_dir, "approvals", "approve", str(rows["granted"]["id"]), "--reason", "looks fine")
        assert f"approved by {me}" in out
        out = await cli(hub_dir, "approvals", "deny", str(rows["refused"]["id"]), "--reason", "not today")
        assert f"denied by {me}" in out
        code, _, err = await run_cli(HUB, "approvals", "deny", str(rows["granted"]["id"]), "--dir", str(hub_dir.dir))
        assert (code, "already approved" in err) == (1, True), err

        async def decided() -> list[dict[str, Any]] | None:
            evts = await events(hub_dir, device)
            outcomes = [e for e in evts if e["kind"] in ("action_succeeded", "action_refused")]
            return evts if len(outcomes) == 3 else None

        evts = await poll(decided, "three outcomes audited on the device", 20)

    assert [e["kind"] for e in of_rule(evts, "granted")] == ["rule_fired", "action_started", "action_succeeded"]
    body = of_rule(evts, "granted", "action_started")[0]["body"]
    assert (body["approved_by"], body["lease"], body["lease_token"]) == (me, "gate", 1)
    refusals = {e["rule"]: e["body"]["detail"] for e in evts if e["kind"] == "action_refused"}
    assert refusals == {"lapses": "no approval: nobody decided in time (expired)",
                        "refused": f"no approval: not today ({me})"}
    for name in ("lapses", "refused"):
        assert [e["kind"] for e in of_rule(evts, name)] == ["rule_fired", "action_refused"]

    decisions = {e["kind"]: e for e in await events(hub_dir, HUB_ID) if e["kind"].startswith("approval_")}
    assert set(decisions) == {"approval_expired", "approval_approved", "approval_denied"}
    assert decisions["approval_expired"]["body"]["by"] == "expired"
    assert decisions["approval_expired"]["body"]["device"] == device
    approved, denied = decisions["approval_approved"], decisions["approval_denied"]
    assert (approved["rule"], approved["body"]["by"], approved["body"]["reason"]) == ("granted", me, "looks fine")
    assert (denied["rule"], denied["body"]["by"], denied["body"]["reason"]) == ("refused", me, "not today")
    listed = {r["rule"]: r for r in json_lines(await cli(hub_dir, "approvals", "list", "--all", "--json"))}
    assert {n: (r["state"], r["decided_by"]) for n, r in listed.items()} == {
        "lapses": ("expired", "expired"), "granted": ("approved", me), "refused": ("denied", me)}
    lapsed = listed["lapses"]
    assert 1.5 <= lapsed["decided_at"] - lapsed["requested_at"] <= 4, "expired at its approval_timeout"
    assert await cli(hub_dir, "approvals", "list", "--json") == ""


# --- a queued device that reconnects while the hub is busy ----------------------------------------


@contextmanager
def write_locked(hub_dir: HubDir) -> Iterator[None]:
    """Hold hub.db's write lock, as an operator's command in a transaction does: the hub's
    ingest cycle in progress waits (SQLite's busy timeout) while more messages arrive."""
    db = sqlite3.connect(hub_dir.dir / "hub.db", timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


@pytest.mark.timeout(120)
async def test_a_queued_device_that_reconnects_keeps_its_place(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """dev-q1 holds a lease of limit 1 (a 45 s action); dev-q2 waits behind a fault proxy.
    The cable is pulled: the broker drops dev-q2 (keepalive 2 s) and the hub marks it offline.
    The cable comes back while the hub is in the middle of an ingest cycle (dev-q1's status,
    held up by an operator's transaction on hub.db): dev-q2 reconnects, says it is online and
    asks again (the same request id); both wait for the next cycle together. dev-q2 is online
    and still waiting, so it must keep its place and get the lease when dev-q1 is done.
    (Regression: the hub used to handle the cycle's requests before its presence messages,
    and dropped the request as one from an offline device.)"""
    await hub_dir.provision(bundles, "dev-q1", extra=("--tag", "turn=first"))
    await hub_dir.provision(bundles, "dev-q2", extra=("--tag", "turn=second"))
    # The action outlasts all that happens before the check (a push, a partition noticed, a held
    # cycle, a reconnect after backoff: about 20 s on a loaded machine). With 15 s, dev-q1 could
    # release first, and dev-q2, asking again, was granted the lease at once: no queue to check.
    line = rule("line", args=f"{{ sleep_s = {HOLD_S:g} }}", lease='{ name = "line", limit = 1, wait_s = 120 }')
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        via_proxy = (f"broker.port={proxy.port}", FAST_KEEPALIVE)
        async with agent_procs(hub, bundles, {"dev-q1": (), "dev-q2": via_proxy}) as procs:
            await push_policy(hub_dir, hub, line, target="turn=first")
            await hub.wait_for(r"lease line: granted to dev-q1, token 1", timeout=APPLY_TIMEOUT)
            mark = hub.mark()
            await push_policy(hub_dir, hub, line, target="turn=second")
            await hub.wait_for(asked("line", "dev-q2"), after=mark, timeout=APPLY_TIMEOUT)
            assert [q["device"] for q in (await leases(hub_dir))["line"]["queue"]] == ["dev-q2"]

            mark = hub.mark()
            proxy.partition()
            await hub.wait_for(r"device dev-q2 is offline", after=mark, timeout=15)
            q2 = procs["dev-q2"]
            with write_locked(hub_dir):
                await asyncio.sleep(1.5)  # dev-q1's next status (every second) starts a cycle that waits
                reconnected = q2.mark()
                proxy.heal()
                await q2.wait_for(r"dev-q2 online", after=reconnected, timeout=20)
                await asyncio.sleep(0.5)  # its request follows its presence at once
            await hub.wait_for(r"device dev-q2 is online", after=mark, timeout=15)
            assert not [x for x in hub.lines if "lease line: dev-q1 released" in x], \
                f"the setup outlasted dev-q1's {HOLD_S:g} s action: the queue cannot be checked"
            assert [q["device"] for q in (await leases(hub_dir))["line"]["queue"]] == ["dev-q2"], \
                "dev-q2 lost its place in the queue"
            await hub.wait_for(r"lease line: granted to dev-q2, token 2", after=mark, timeout=HOLD_S + 15)
