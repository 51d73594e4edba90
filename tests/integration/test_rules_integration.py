"""The rule engine in a real agent: a policy file, a real hub and Mosquitto, partitions
(FaultProxy) and kill -9. Decisions are read where an operator reads them: the audit
events at the hub (`edge-hub events --json`), and every test that runs an agent ends with
the exactly-once check over readings and events together.

The sim profile's `record` actuator runs in-process, so what it did is known from the
audit trail only: action_started is committed before it runs, action_succeeded after.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_store_forward_faults import kill_9, stop_cleanly, wait_until
from tests.integration.test_store_forward_faults import settle as settle_quietly
from tests.support.exactly_once import QUIET, OutboxState, wait_drained
from tests.support.faultproxy import FaultProxy
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli

pytestmark = pytest.mark.integration

# A few readings a second (every one reported), and faults noticed in seconds.
FAST = (
    "sim.rate_hz=5",
    "report.default_deadband=0",
    "uplink.ack_timeout=3",
    "uplink.status_interval=1",
    "broker.keepalive=2",
    "broker.connect_timeout=3",
)
POLICY = 'policy="policy.toml"'
NO_RULES = 'policy="no-rules.toml"'
DRAIN_TIMEOUT = 60.0
RECONNECT_TIMEOUT = 30.0
DECISION_TIMEOUT = 15.0  # agent start-up plus its first samples

# Holds for every sim reading (they are tens, never below -1e6), and never clears.
ALWAYS = 'when = "sig0 > -1000000"\nclear = "sig0 < -2000000"'


def write_policy(bundle: Path, *rules: str, version: int = 3) -> None:
    text = f"version = {version}\n" + "".join(f"\n[[rules]]\n{r.strip()}\n" for r in rules)
    (bundle / "policy.toml").write_text(text)
    (bundle / "no-rules.toml").write_text("version = 1\n")


def agent_argv(bundle: Path, *overrides: str, level: str = "info") -> list[str]:
    sets = [a for o in (*FAST, *overrides) for a in ("--set", o)]
    return [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", level, *sets]


def local_events(bundle: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """Events still in the agent's outbox (committed, not yet acknowledged)."""
    if not (bundle / "state" / "outbox.db").exists():
        return []
    db = sqlite3.connect(f"file:{bundle / 'state' / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT seq, kind, body FROM records WHERE kind IS NOT NULL ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()
    return [(seq, kind, json.loads(body)) for seq, kind, body in rows]


def hub_events_db(hub_dir: HubDir, device: str) -> list[tuple[int, str]]:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT seq, kind FROM events WHERE device = ? ORDER BY seq", (device,)).fetchall()
    finally:
        db.close()


async def hub_events(hub_dir: HubDir, device: str) -> list[dict[str, Any]]:
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--device", device, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def kinds_of(events: list[dict[str, Any]], rule: str) -> list[str]:
    return [e["kind"] for e in events if e["rule"] == rule]


async def settle(hub_dir: HubDir, bundle: Path, *extra: str) -> OutboxState:
    """A quiet run of the stopped device with no rules: it sends what is left (what a clean
    stop committed, or what a killed agent had not yet delivered), drains and stops cleanly;
    then the hub must hold every seq 1..N exactly once, less what the agent shed."""
    return await settle_quietly(hub_dir, bundle, agent_argv(bundle, *QUIET, NO_RULES, *extra),
                                online_timeout=RECONNECT_TIMEOUT)


# --- offline = "act" / "skip" during a partition ------------------------------------------------


async def test_offline_act_and_skip_during_a_partition(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """The agent starts with the cable pulled, so the hub is unreachable when the rules fire:
    the "act" rule acts, the "skip" rule does not; both decisions are audited locally, and
    after the heal they reach the hub exactly once."""
    await hub_dir.provision(bundles, "dev-off")
    bundle = bundles / "dev-off"
    write_policy(bundle,
                 f'name = "acts"\n{ALWAYS}\naction = "record"\nargs = {{ rule = "acts" }}\noffline = "act"',
                 f'name = "skips"\n{ALWAYS}\naction = "record"\nargs = {{ rule = "skips" }}\noffline = "skip"')
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        port = f"broker.port={proxy.port}"
        proxy.partition()
        agent = await Proc("agent", agent_argv(bundle, POLICY, port)).start()
        try:
            def decided() -> bool:
                kinds = {(e[2].get("rule"), e[1]) for e in local_events(bundle)}
                return {("acts", "action_succeeded"), ("skips", "action_skipped")} <= kinds

            await wait_until(decided, "both rules decided while partitioned", DECISION_TIMEOUT)
            local = local_events(bundle)
            assert [k for _, k, b in local if b["rule"] == "acts"] == ["rule_fired", "action_started",
                                                                       "action_succeeded"]
            assert [k for _, k, b in local if b["rule"] == "skips"] == ["rule_fired", "action_skipped"]
            assert hub_events_db(hub_dir, "dev-off") == []  # nothing got through the partition
            assert proxy.stats().bytes_to_target == 0

            mark = agent.mark()
            proxy.heal()
            await agent.wait_for(r"dev-off online", after=mark, timeout=RECONNECT_TIMEOUT)
            await wait_drained(hub_dir.dir, bundle, timeout=DRAIN_TIMEOUT)
            events = await hub_events(hub_dir, "dev-off")
            # Connected now, but both rules are still active (they never clear): no new decisions.
            assert kinds_of(events, "acts") == ["rule_fired", "action_started", "action_succeeded"]
            assert kinds_of(events, "skips") == ["rule_fired", "action_skipped"]
            skipped = next(e for e in events if e["kind"] == "action_skipped")
            assert skipped["policy_version"] == 3
            assert skipped["body"]["detail"] == 'the hub is unreachable and the rule says offline = "skip"'
            started = next(e for e in events if e["kind"] == "action_started")
            assert started["body"]["args"] == {"rule": "acts"}
            fired = next(e for e in events if e["kind"] == "rule_fired" and e["rule"] == "acts")
            assert set(fired["body"]["readings"]) == {"sig0"}
            assert [e["seq"] for e in events] == [seq for seq, _, _ in local]  # the same records, once
            await stop_cleanly(agent)
        finally:
            await agent.stop()
        await settle(hub_dir, bundle, port)
    assert [e["seq"] for e in await hub_events(hub_dir, "dev-off")] == [seq for seq, _, _ in local]


async def test_offline_act_and_skip_when_the_link_drops_mid_run(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """Online first, then the cable is pulled; the rules fire only later (after 120 samples
    of sig0, 12 s at 10 Hz), once the agent has noticed the partition (keepalive 2 s)."""
    await hub_dir.provision(bundles, "dev-mid")
    bundle = bundles / "dev-mid"
    later = 'when = "count(sig0, 1h) > 120"\nclear = "count(sig0, 1h) < 0"'
    write_policy(bundle,
                 f'name = "acts"\n{later}\naction = "record"\nargs = {{ rule = "acts" }}\noffline = "act"',
                 f'name = "skips"\n{later}\naction = "record"\nargs = {{ rule = "skips" }}\noffline = "skip"')
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        port = f"broker.port={proxy.port}"
        agent = await Proc("agent", agent_argv(bundle, POLICY, port, "sim.rate_hz=10")).start()
        try:
            await agent.wait_for(r"dev-mid online", timeout=RECONNECT_TIMEOUT)
            mark = agent.mark()
            proxy.partition()
            await agent.wait_for(r"agent dev-mid: .*retrying in", after=mark, timeout=8)
            assert local_events(bundle) == [], "the rules fired before the agent noticed the partition"
            await wait_until(lambda: {e[1] for e in local_events(bundle)} >= {"action_succeeded", "action_skipped"},
                             "both rules decided while partitioned", DECISION_TIMEOUT + 12)
            assert hub_events_db(hub_dir, "dev-mid") == []  # nothing got through the partition
            mark = agent.mark()
            proxy.heal()
            await agent.wait_for(r"dev-mid online", after=mark, timeout=RECONNECT_TIMEOUT)
            await wait_drained(hub_dir.dir, bundle, timeout=DRAIN_TIMEOUT)
            events = await hub_events(hub_dir, "dev-mid")
            assert kinds_of(events, "acts") == ["rule_fired", "action_started", "action_succeeded"]
            assert kinds_of(events, "skips") == ["rule_fired", "action_skipped"]
            skipped = next(e for e in events if e["kind"] == "action_skipped")
            assert skipped["body"]["detail"] == 'the hub is unreachable and the rule says offline = "skip"'
            await stop_cleanly(agent)
        finally:
            await agent.stop()
        await settle(hub_dir, bundle, port)


# --- kill -9 between decision and action -----------------------------------------------------------


@pytest.mark.parametrize("partitioned", [True, False], ids=["partitioned", "online"])
async def test_audit_record_survives_kill_9_between_decision_and_action(
    hub_dir: HubDir, hub: Proc, bundles: Path, partitioned: bool,
) -> None:
    """The record actuator sleeps 30 s inside the action, after action_started was committed;
    kill -9 lands there. Restarted, the agent delivers that record: the hub has it exactly
    once, and no outcome for it (the action never finished). Partitioned, the record cannot
    have left the device before the kill; online, it may have been sent, or even acked."""
    device = f"dev-k9{'p' if partitioned else 'o'}"
    await hub_dir.provision(bundles, device)
    bundle = bundles / device
    write_policy(bundle, f'name = "slow"\n{ALWAYS}\naction = "record"\nargs = {{ sleep_s = 30 }}\noffline = "act"')
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        port = f"broker.port={proxy.port}"
        if partitioned:
            proxy.partition()
        agent = await Proc("agent", agent_argv(bundle, POLICY, port)).start()
        try:
            started: list[int] = []

            def action_started() -> bool:
                local = [seq for seq, kind, _ in local_events(bundle) if kind == "action_started"]
                remote = [seq for seq, kind in hub_events_db(hub_dir, device) if kind == "action_started"]
                started[:] = local or remote
                return bool(started)

            await wait_until(action_started, "action_started committed", DECISION_TIMEOUT)
            await kill_9(agent)
        finally:
            await agent.stop()
        assert len(started) == 1
        seq = started[0]
        local = local_events(bundle)
        assert all(kind not in ("action_succeeded", "action_failed") for _, kind, _ in local)
        if partitioned:
            assert [(s, k) for s, k, _ in local][-2:] == [(seq - 1, "rule_fired"), (seq, "action_started")]
            assert hub_events_db(hub_dir, device) == []
            proxy.heal()
        await settle(hub_dir, bundle, port)

    events = await hub_events(hub_dir, device)
    assert [(e["seq"], e["kind"]) for e in events] == [(seq - 1, "rule_fired"), (seq, "action_started")]
    assert events[1]["rule"] == "slow"
    assert events[1]["policy_version"] == 3
    assert events[1]["body"]["args"] == {"sleep_s": 30}


# --- malformed rules at start ----------------------------------------------------------------------

RULE_HEAD = 'name = "r"\nclear = "sig0 < 1"\naction = "record"\noffline = "act"\n'
# (the policy text, what the error must say). The `when` line is line 5, its string starts at column 9.
BROKEN = {
    "syntax": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "sig0 > 1\n' + RULE_HEAD[11:],
               ["line 5, column", "not valid TOML"]),
    "expression": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "sig0 > > 3"\n' + RULE_HEAD[11:],
                   ["line 5, column 16", "unexpected '>'"]),
    "attribute": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "sig0.__class__ > 1"\n' + RULE_HEAD[11:],
                  ["line 5, column 14", "cannot reach Python"]),
    "import": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "__import__(\'os\') > 1"\n' + RULE_HEAD[11:],
               ["line 5, column 9", "cannot reach Python"]),
    "call": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "open(sig0) > 1"\n' + RULE_HEAD[11:],
             ["line 5, column 9", "unknown function 'open'"]),
    "action": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "sig0 > 1"\nclear = "sig0 < 1"\naction = "command"\n'
               'args = { argv = ["/bin/true"] }\noffline = "act"\n',
               ["line 7, column 1", "action 'command' is not allowed by this device's profile"]),
    "metric": ('version = 1\n\n[[rules]]\nname = "r"\nwhen = "cpu_temp > 75"\n' + RULE_HEAD[11:],
               ["line 5, column 9", "cpu_temp", "'sim'"]),
}


async def start_with_policy(hub_dir: HubDir, bundles: Path, text: str) -> tuple[int | None, str, Path]:
    """`edge-agent run` with the policy; (exit code, all its output, bundle). The broker is not
    running: an agent that got past its policy would keep retrying, and is stopped at the bound."""
    await hub_dir.provision(bundles, "dev-bad")
    bundle = bundles / "dev-bad"
    (bundle / "policy.toml").write_text(text)
    proc = await Proc("agent", agent_argv(bundle, POLICY)).start()
    try:
        # Its output ends when it exits (Proc reads it to EOF).
        await wait_until(proc._exited, "the agent exited", timeout=15)
    finally:
        code = await proc.stop()
    return code, "\n".join(proc.lines), bundle


@pytest.mark.parametrize("case", list(BROKEN))
async def test_malformed_policy_is_refused_at_start_with_line_and_column(
    hub_dir: HubDir, bundles: Path, case: str,
) -> None:
    text, expected = BROKEN[case]
    code, output, bundle = await start_with_policy(hub_dir, bundles, text)
    assert code not in (0, None), output
    assert "policy.toml" in output
    for needle in expected:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert local_events(bundle) == []  # it never ran a rule


@pytest.mark.parametrize("case", ["expression", "metric"])
async def test_malformed_policy_is_a_configuration_error(hub_dir: HubDir, bundles: Path, case: str) -> None:
    text, expected = BROKEN[case]
    code, output, _ = await start_with_policy(hub_dir, bundles, text)
    assert "edge-agent: configuration error:" in output
    assert "Traceback" not in output
    for needle in expected:
        assert needle in output, f"{needle!r} not in:\n{output}"
    assert code == 2, output
