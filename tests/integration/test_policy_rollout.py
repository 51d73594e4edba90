"""Policy rollouts end to end: a real hub (and its Mosquitto), real agents, the operator's CLI.

Canary cohorts, waves, health gates and automatic rollback, offline devices catching up,
a hub killed mid-rollout, and the operator's promote / abort / rollback. Waits follow the
processes' log lines ("policy version N applied", "rollout R: ...") or poll the CLI with a
deadline; what is asserted is read where an operator reads it: `edge-hub policy status
--json`, `edge-hub devices --json`, `edge-hub events --json`, and the agents' own logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_settings
from edge_agent.decide.policy_intake import Outcome
from edgefleet.wire.protocol import PolicyDocument, pack
from hub.pki.authority import load_policy_key
from hub.rollout.rollouts import cohort_rank
from hub.rollout.signing import seal
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli, start_hub

pytestmark = pytest.mark.integration

HUB_ID = "hub.test"  # hub_dir's region is "test"
# A status every second (and at once after a policy change). The sim signals keep their 1 Hz:
# rules need readings, not many of them. The keepalive stays at its 30 s: a killed broker is
# noticed at once anyway (the socket closes), while a 2 s keepalive missed on a loaded machine
# drops the connection for nothing (and the Last Will marks the device offline).
AGENT_SETS = ("uplink.status_interval=1",)
ONLINE_TIMEOUT = 20.0  # several agents starting at once on a loaded 2-core machine
APPLY_TIMEOUT = 15.0  # a push (or a hub decision) to an agent's "applied" line
ROLLBACK_TIMEOUT = 20.0  # a bad canary's failing actions reaching the hub, then the tick
RECONNECT_TIMEOUT = 30.0

# Holds for every sim reading and never clears: with no cooldown it acts once per policy
# installed (a new policy means a new engine), so it proves which rules a version carries.
ALWAYS = 'when = "sig0 > -1000"\nclear = "sig0 < -2000"\noffline = "act"'


def rule(name: str, action: str, args: str, extra: str = "") -> str:
    return f'\n[[rules]]\nname = "{name}"\n{ALWAYS}\naction = "{action}"\nargs = {args}\n{extra}'


def good_policy(name: str) -> str:
    """One rule whose action succeeds, once per activation (no cooldown: no escalation)."""
    return rule(name, "record", '{ note = "x" }')


def bad_policy(name: str) -> str:
    """Its action always fails (no such sensor), again every second: the gates must see it."""
    return rule(name, "set_rate", '{ sensor = "nope", interval_s = 1 }', 'cooldown = "1s"')


# --- the fleet ----------------------------------------------------------------------------


def agent_argv(bundle: Path) -> list[str]:
    # Info, not debug: at debug aiosqlite logs every SQL call of the outbox.
    sets = [a for o in AGENT_SETS for a in ("--set", o)]
    return [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "info", *sets]


@contextlib.asynccontextmanager
async def fleet(bundles: Path, *devices: str) -> AsyncIterator[dict[str, Proc]]:
    """Agents for `devices`, all online; every one of them stopped at the end (also those a
    test restarted: it puts the new Proc into the dict)."""
    agents: dict[str, Proc] = {}
    try:
        for device in devices:
            agents[device] = await Proc(device, agent_argv(bundles / device)).start()
        for device, agent in agents.items():
            await agent.wait_for(rf"{device} online", timeout=ONLINE_TIMEOUT)
        yield agents
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()))


async def stop_agent(hub: Proc, agent: Proc, device: str) -> None:
    """A clean stop, and the hub has seen the device go offline (its Last Will)."""
    mark = hub.mark()
    assert await agent.stop() == 0, "\n".join(agent.lines[-20:])
    await hub.wait_for(rf"device {device} is offline", after=mark)


def configure(hub_dir: HubDir, **values: str) -> None:
    """Set keys of hub.toml's [rollout] (TOML literals) before the hub starts."""
    path = hub_dir.dir / "hub.toml"
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = [^#\n]*", f"{key} = {value}   ", text)
        assert n == 1, f"no {key} in hub.toml"
    path.write_text(text)


def ranked(devices: list[str]) -> list[str]:
    """The order in which a rollout reaches devices (the documented sha256 cohort order)."""
    return sorted(devices, key=cohort_rank)


# --- the operator's CLI ---------------------------------------------------------------------


async def cli(hub_dir: HubDir, *argv: str) -> str:
    code, out, err = await run_cli(HUB, *argv[:2], "--dir", str(hub_dir.dir), *argv[2:])
    assert code == 0, f"edge-hub {' '.join(argv)} exited {code}: {err}{out}"
    return out


async def push(hub_dir: HubDir, workdir: Path, text: str, *args: str) -> tuple[int, int]:
    """Push `text` (written to a file); return (version, rollout)."""
    path = workdir / f"policy-{time.monotonic_ns()}.toml"
    path.write_text(text)
    out = await cli(hub_dir, "policy", "push", str(path), *args)
    found = re.search(r"version (\d+) \(rollout (\d+)\)", out)
    assert found, out
    return int(found[1]), int(found[2])


async def status(hub_dir: HubDir) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await cli(hub_dir, "policy", "status", "--json"))
    return result


async def devices(hub_dir: HubDir) -> dict[str, dict[str, Any]]:
    out = await cli(hub_dir, "devices", "--json")
    return {row["device"]: row for row in map(json.loads, out.splitlines())}


async def events(hub_dir: HubDir, *, device: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    argv = [*(("--device", device) if device else ()), *(("--kind", kind) if kind else ())]
    out = await cli(hub_dir, "events", "--json", *argv)
    return [json.loads(line) for line in out.splitlines()]


async def hub_events(hub_dir: HubDir, kind: str) -> list[dict[str, Any]]:
    return await events(hub_dir, device=HUB_ID, kind=kind)


async def applied_versions(hub_dir: HubDir) -> dict[str, list[int]]:
    """device -> the versions of its policy_applied events at the hub, in order."""
    out: dict[str, list[int]] = {}
    for e in await events(hub_dir, kind="policy_applied"):
        out.setdefault(e["device"], []).append(e["policy_version"])
    return out


async def has_applied(hub_dir: HubDir, devices: list[str], version: int) -> bool:
    """The hub holds a policy_applied event of `version` from each of `devices`."""
    applied = await applied_versions(hub_dir)
    return all(version in applied.get(d, []) for d in devices)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """Poll `probe()` (a CLI read) until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {result!r})")
        await asyncio.sleep(0.5)


def policy_text(hub_dir: HubDir, version: int) -> str | None:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT text FROM policies WHERE version = ?", (version,)).fetchone()
    finally:
        db.close()
    assert row is not None, f"no version {version}"
    text: str | None = row[0]
    return text


def logged_versions(agent: Proc) -> list[str]:
    """The agent's policy lines: 'N applied' / 'N refused', in order."""
    return [f"{m[1]} {m[2]}" for line in agent.lines if (m := re.search(r"policy version (\d+) (applied|refused)",
                                                                         line))]


async def wait_applied(agents: dict[str, Proc], version: int, marks: dict[str, int] | None = None,
                       timeout: float = APPLY_TIMEOUT) -> None:
    await asyncio.gather(*(a.wait_for(rf"policy version {version} applied", timeout=timeout,
                                      after=(marks or {}).get(d, 0)) for d, a in agents.items()))


async def reported(hub_dir: HubDir, want: dict[str, int]) -> None:
    """Wait until the hub's devices table shows each device running the version wanted."""
    async def probe() -> bool:
        rows = await devices(hub_dir)
        return all(rows[d]["policy_version"] == v for d, v in want.items())
    await eventually(probe, f"devices report {want}")


# --- 1. a bad canary is rolled back during its bake; the rest never sees it --------------------


async def test_bad_canary_rolled_back_automatically(hub_dir: HubDir, hub: Proc, bundles: Path,
                                                     workdir: Path) -> None:
    """Five devices run a good v1; a policy whose actions fail goes to a 20 % canary (one
    device) with a 60 s bake. The failure-rate gate breaches within seconds: the canary gets
    v1's text as a new version, and no other device ever hears of the bad one."""
    names = [f"dev-c{i}" for i in range(5)]
    await hub_dir.provision(bundles, *names)
    canary, *rest = ranked(names)
    async with fleet(bundles, *names) as agents:
        v1, r1 = await push(hub_dir, workdir, good_policy("good"))
        await wait_applied(agents, v1)
        await hub.wait_for(rf"rollout {r1}: version {v1} reached all 5 targeted devices")

        marks = {d: a.mark() for d, a in agents.items()}
        hub_mark = hub.mark()
        bad, r2 = await push(hub_dir, workdir, bad_policy("bad"), "--canary", "20", "--bake", "60s")
        assert bad == v1 + 1
        await agents[canary].wait_for(rf"policy version {bad} applied", timeout=APPLY_TIMEOUT, after=marks[canary])
        line = await hub.wait_for(rf"rollout {r2}: version {bad} rolled back", after=hub_mark,
                                  timeout=ROLLBACK_TIMEOUT)
        assert " level=warning " in line, line
        assert "health gate" in line, line
        back = bad + 1
        await agents[canary].wait_for(rf"policy version {back} applied: 1 rule", timeout=APPLY_TIMEOUT,
                                      after=marks[canary])

        # The rollback's reason, in the status and as a hub event.
        st = await status(hub_dir)
        assert st["active"] is None
        latest = st["rollouts"][0]
        assert (latest["rollout"], latest["version"], latest["state"]) == (r2, bad, "rolled_back")
        # The failure-rate gate (3 failures at least: min_actions), before the escalation gate.
        assert re.fullmatch(rf"health gate: (\d+) of \1 actions under version {bad} failed \(100% > 20%\)",
                            latest["reason"]), latest
        [event] = await hub_events(hub_dir, "rollout_rolled_back")
        assert event["policy_version"] == bad
        assert event["body"]["automatic"] is True
        assert event["body"]["reason"] == latest["reason"]
        assert event["body"]["devices"] == 1
        assert event["body"]["replaced_by"] == [{"version": back, "previous": v1}]

        # The canary runs v1's rules again, under the new version.
        assert policy_text(hub_dir, back) == policy_text(hub_dir, v1)

        async def good_again() -> bool:
            return any(e["policy_version"] == back and e["rule"] == "good"
                       for e in await events(hub_dir, device=canary, kind="action_succeeded"))
        await eventually(good_again, f"{canary} acts on rule 'good' under version {back}")
        await reported(hub_dir, {canary: back, **dict.fromkeys(rest, v1)})

        rows = await devices(hub_dir)
        assert (rows[canary]["policy_intended"], rows[canary]["policy_drifted"]) == (back, False)
        for device in rest:
            assert (rows[device]["policy_intended"], rows[device]["policy_version"]) == (v1, v1), rows[device]
        failed = await events(hub_dir, device=canary, kind="action_failed")
        assert failed
        assert {e["policy_version"] for e in failed} == {bad}

    # Nobody but the canary ever saw the bad version: neither in its log nor in its audit trail.
    applied = await applied_versions(hub_dir)
    assert applied[canary] == [v1, bad, back]
    assert logged_versions(agents[canary]) == [f"{v1} applied", f"{bad} applied", f"{back} applied"]
    for device in rest:
        assert applied[device] == [v1], device
        assert logged_versions(agents[device]) == [f"{v1} applied"], device
        assert not [line for line in agents[device].lines if f"version {bad}" in line], device


# --- 2. a good policy goes through the waves to every targeted device, and no further ---------


async def wave_times(hub_dir: HubDir, rollout: int) -> list[float]:
    """When each wave of `rollout` began (hub time): the push, then each rollout_wave event."""
    [started] = [e for e in await hub_events(hub_dir, "rollout_started") if e["body"]["rollout"] == rollout]
    waves = sorted((e for e in await hub_events(hub_dir, "rollout_wave") if e["body"]["rollout"] == rollout),
                   key=lambda e: e["body"]["wave"])
    return [started["ts"], *(e["ts"] for e in waves)]


async def assert_reached_in_order(hub_dir: HubDir, rollout: int, version: int, order: list[str],
                                  reach: list[int]) -> None:
    """The i-th device in cohort order applied `version` during the first wave that reaches it
    (`reach`: devices reached after each wave), never before that wave began nor after the next."""
    began = await wave_times(hub_dir, rollout)
    assert len(began) == len(reach), began
    applied = {e["device"]: e["ts"] for e in await events(hub_dir, kind="policy_applied")
               if e["policy_version"] == version}
    for i, device in enumerate(order):
        wave = next(w for w, upto in enumerate(reach) if i < upto)
        assert began[wave] <= applied[device], f"{device} applied version {version} before its wave {wave + 1}"
        if wave + 1 < len(began):
            assert applied[device] < began[wave + 1], f"{device} still pending when wave {wave + 2} began"


async def test_good_policy_reaches_all_targeted_devices_through_the_waves(
        hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    """--target site=a --canary 25 over four site=a devices and two site=b ones: 1, 2, then 4
    devices, in cohort order, each wave after the last was healthy for its bake; site b
    is never assigned, sent or told anything."""
    site_a = [f"dev-a{i}" for i in range(4)]
    site_b = ["dev-b0", "dev-b1"]
    await hub_dir.provision(bundles, *site_a, extra=("--tag", "site=a"))
    await hub_dir.provision(bundles, *site_b, extra=("--tag", "site=b"))
    async with fleet(bundles, *site_a, *site_b) as agents:
        hub_mark = hub.mark()
        version, r = await push(hub_dir, workdir, good_policy("waves"), "--target", "site=a",
                                "--canary", "25", "--bake", "2s")
        # Canary 25 %, hub.toml's default waves 25 and 50 above it (25 is not above): 25 → 50 → 100.
        await hub.wait_for(rf"rollout {r}: version {version} healthy after 2 s on 1 device\(s\); "
                           r"wave 2 of 3: 50% \(2 devices\)", timeout=20, after=hub_mark)
        await hub.wait_for(rf"rollout {r}: version {version} healthy after 2 s on 2 device\(s\); "
                           r"wave 3 of 3: 100% \(4 devices\)", timeout=20, after=hub_mark)
        await hub.wait_for(rf"rollout {r}: version {version} reached all 4 targeted devices", timeout=20,
                           after=hub_mark)
        await wait_applied({d: agents[d] for d in site_a}, version)
        await reported(hub_dir, dict.fromkeys(site_a, version))

        [started] = await hub_events(hub_dir, "rollout_started")
        assert started["policy_version"] == version
        assert {k: started["body"][k] for k in ("rollout", "targeted", "reached", "waves", "target")} == {
            "rollout": r, "targeted": 4, "reached": 1, "waves": [25.0, 50.0, 100.0], "target": "site=a"}
        waves = [(e["body"]["wave"], e["body"]["percent"], e["body"]["reached"], e["body"]["healthy"]["applied"])
                 for e in await hub_events(hub_dir, "rollout_wave")]
        assert waves == [(1, 50.0, 2, 1), (2, 100.0, 4, 2)]  # growing reach, each after the last was healthy
        [complete] = await hub_events(hub_dir, "rollout_complete")
        assert (complete["policy_version"], complete["body"]["rollout"], complete["body"]["reached"]) == (
            version, r, 4)
        await assert_reached_in_order(hub_dir, r, version, ranked(site_a), [1, 2, 4])

        st = await status(hub_dir)
        assert st["active"] is None
        assert [(x["rollout"], x["state"], x["reason"], x["targeted"]) for x in st["rollouts"]] == [
            (r, "complete", None, 4)]
        assert st["versions"] == {str(version): {"intended": 4, "applied": 4}, "none": {"intended": 2, "applied": 0}}
        assert st["drifted"] == []
        assert st["refused"] == []
        rows = await devices(hub_dir)

    for device in site_a:
        assert (rows[device]["policy_version"], rows[device]["policy_intended"]) == (version, version)
        assert logged_versions(agents[device]) == [f"{version} applied"]
    # The other site was never sent anything.
    assert set(await applied_versions(hub_dir)) == set(site_a)
    for device in site_b:
        assert (rows[device]["policy_version"], rows[device]["policy_intended"]) == (None, None), rows[device]
        assert rows[device]["online"] is True
        assert not [line for line in agents[device].lines if "policy" in line.lower()], device


# --- 3. offline through a push, and through a push and its rollback ---------------------------


async def test_offline_device_catches_up_and_skips_a_rolled_back_version(
        hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    """The sleeper is stopped through a push (the rollout completes without it; it applies the
    retained version on reconnect), then through a push and its `policy rollback`: it goes
    straight from v1 to the rollback's version and never applies (or logs) the undone one."""
    names = ["dev-o0", "dev-o1", "dev-o2"]
    sleeper, awake = "dev-o2", ["dev-o0", "dev-o1"]
    await hub_dir.provision(bundles, *names)
    runs: list[Proc] = []  # every run of the sleeper, for its whole log
    async with fleet(bundles, *names) as agents:
        runs.append(agents[sleeper])
        # Offline through a push: the rollout does not wait for it, it catches up on reconnect.
        await stop_agent(hub, agents[sleeper], sleeper)
        hub_mark = hub.mark()
        v1, r1 = await push(hub_dir, workdir, good_policy("first"), "--bake", "2s")
        await wait_applied({d: agents[d] for d in awake}, v1)
        await hub.wait_for(rf"rollout {r1}: version {v1} reached all 3 targeted devices", after=hub_mark)
        rows = await devices(hub_dir)
        assert (rows[sleeper]["online"], rows[sleeper]["policy_version"], rows[sleeper]["policy_intended"],
                rows[sleeper]["policy_drifted"]) == (False, None, v1, False)

        agents[sleeper] = await Proc(sleeper, agent_argv(bundles / sleeper)).start()
        runs.append(agents[sleeper])
        await agents[sleeper].wait_for(rf"policy version {v1} applied: 1 rule", timeout=RECONNECT_TIMEOUT)
        await reported(hub_dir, dict.fromkeys(names, v1))

        # Offline through a push AND its rollback: straight to the rollback's version.
        await stop_agent(hub, agents[sleeper], sleeper)
        marks = {d: agents[d].mark() for d in awake}
        v2, r2 = await push(hub_dir, workdir, good_policy("second"), "--bake", "60s")
        await wait_applied({d: agents[d] for d in awake}, v2, marks)
        out = await cli(hub_dir, "policy", "rollback")
        assert f"rollout {r2}: version {v2} rolled back on 3 device(s)" in out, out
        v3 = v2 + 1
        await wait_applied({d: agents[d] for d in awake}, v3, marks)
        assert policy_text(hub_dir, v3) == policy_text(hub_dir, v1)
        rows = await devices(hub_dir)
        assert (rows[sleeper]["online"], rows[sleeper]["policy_version"], rows[sleeper]["policy_intended"]) == (
            False, v1, v3)

        agents[sleeper] = await Proc(sleeper, agent_argv(bundles / sleeper)).start()
        runs.append(agents[sleeper])
        await agents[sleeper].wait_for(rf"policy version {v3} applied: 1 rule", timeout=RECONNECT_TIMEOUT)
        await reported(hub_dir, dict.fromkeys(names, v3))

        async def first_again() -> bool:  # it runs v1's rule again, now as v3
            return any(e["policy_version"] == v3 and e["rule"] == "first"
                       for e in await events(hub_dir, device=sleeper, kind="action_succeeded"))
        await eventually(first_again, f"{sleeper} acts on rule 'first' under version {v3}")

        st = await status(hub_dir)
        assert [(x["rollout"], x["version"], x["state"]) for x in st["rollouts"]] == [
            (r2, v2, "rolled_back"), (r1, v1, "complete")]
        assert st["rollouts"][0]["reason"].startswith("rolled back by ")
        [event] = await hub_events(hub_dir, "rollout_rolled_back")
        assert event["body"]["automatic"] is False
        assert event["body"]["replaced_by"] == [{"version": v3, "previous": v1}]

    applied = await applied_versions(hub_dir)
    for device in awake:
        assert applied[device] == [v1, v2, v3], device
    assert applied[sleeper] == [v1, v3]
    assert [v for run in runs for v in logged_versions(run)] == [f"{v1} applied", f"{v3} applied"]
    assert not [line for run in runs for line in run.lines if f"policy version {v2}" in line]


# --- 4. the hub killed mid-rollout resumes it --------------------------------------------------


async def test_hub_killed_mid_rollout_resumes_it(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    """kill -9 of hub and broker while wave 2 of 3 bakes; a new hub on the same directory
    carries the same rollout on from wave 2 (wave 3, then complete), and every device gets
    the version once, in its own wave."""
    names = [f"dev-h{i}" for i in range(4)]
    await hub_dir.provision(bundles, *names)
    order = ranked(names)
    hub = await start_hub(hub_dir)
    try:
        async with fleet(bundles, *names) as agents:
            version, r = await push(hub_dir, workdir, good_policy("resumed"), "--canary", "25", "--bake", "5s")
            await hub.wait_for(rf"rollout {r}: version {version} .* wave 2 of 3: 50% \(2 devices\)", timeout=20)
            # The kill lands once wave 2's devices have applied it and their audit is at the hub,
            # not while a delivery is in flight (see test_policy_delivery_cut_by_a_disconnect...).
            await eventually(lambda: has_applied(hub_dir, order[:2], version), f"{order[:2]} applied {version}")
            # kill -9 of the hub and its broker (one process group) while wave 2 bakes.
            os.killpg(hub.pid, signal.SIGKILL)
            await hub.stop()
            st = await status(hub_dir)
            assert st["active"] is not None, st
            assert (st["active"]["rollout"], st["active"]["version"], st["active"]["wave"]) == (r, version, 2)

            marks = {d: a.mark() for d, a in agents.items()}
            hub = await start_hub(hub_dir)
            await hub.wait_for(rf"rollout {r}: version {version} .* wave 3 of 3: 100% \(4 devices\)", timeout=30)
            await hub.wait_for(rf"rollout {r}: version {version} reached all 4 targeted devices", timeout=20)
            await asyncio.gather(*(a.wait_for(rf"{d} online", after=marks[d], timeout=RECONNECT_TIMEOUT)
                                   for d, a in agents.items()))
            await wait_applied(agents, version)
            await reported(hub_dir, dict.fromkeys(names, version))
            assert not [line for line in hub.lines if "wave 2 of 3" in line]  # resumed, not restarted

            st = await status(hub_dir)
            assert st["active"] is None
            assert [(x["rollout"], x["version"], x["state"]) for x in st["rollouts"]] == [(r, version, "complete")]
            assert [e["body"]["wave"] for e in await hub_events(hub_dir, "rollout_wave")] == [1, 2]
            assert len(await hub_events(hub_dir, "rollout_complete")) == 1
            assert await hub_events(hub_dir, "rollout_rolled_back") == []
            await assert_reached_in_order(hub_dir, r, version, ranked(names), [1, 2, 4])
    finally:
        await hub.stop()
    # One version, once each: no device got it early, twice, or anything else.
    assert await applied_versions(hub_dir) == {d: [version] for d in names}
    for device in names:
        assert logged_versions(agents[device]) == [f"{version} applied"], device


async def test_hub_killed_while_a_bad_canary_bakes_rolls_it_back(
        hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    """The failures the canary audits while the hub is down reach the new hub, which rolls the
    same rollout back: the canary had no hub policy before, so it gets the withdrawal (its
    local policy file, here none) as a new version."""
    names = [f"dev-k{i}" for i in range(4)]
    await hub_dir.provision(bundles, *names)
    canary, *rest = ranked(names)
    configure(hub_dir, min_actions="6")  # a failure a second: the gate cannot breach within 5 s
    hub = await start_hub(hub_dir)
    try:
        async with fleet(bundles, *names) as agents:
            slow_bad = "[limits]\nescalate_after_failures = 100\nescalate_after_fires_without_clear = 100\n"
            bad, r = await push(hub_dir, workdir, slow_bad + bad_policy("bad"), "--canary", "25", "--bake", "60s")
            await agents[canary].wait_for(rf"policy version {bad} applied", timeout=APPLY_TIMEOUT)
            await eventually(lambda: has_applied(hub_dir, [canary], bad), f"{canary} applied {bad}")
            os.killpg(hub.pid, signal.SIGKILL)
            await hub.stop()
            st = await status(hub_dir)
            assert st["active"] is not None, st["rollouts"]
            assert (st["active"]["rollout"], st["active"]["wave"]) == (r, 1)

            hub = await start_hub(hub_dir)
            line = await hub.wait_for(rf"rollout {r}: version {bad} rolled back", timeout=RECONNECT_TIMEOUT)
            assert re.search(rf"health gate: (\d+) of \1 actions under version {bad} failed", line), line
            back = bad + 1
            await agents[canary].wait_for(rf"policy version {back} applied: the local policy file",
                                          timeout=APPLY_TIMEOUT)
            await reported(hub_dir, {canary: back})
            st = await status(hub_dir)
            assert st["active"] is None
            assert [(x["rollout"], x["state"]) for x in st["rollouts"]] == [(r, "rolled_back")]
            [event] = await hub_events(hub_dir, "rollout_rolled_back")
            assert event["body"]["automatic"] is True
            assert event["body"]["replaced_by"] == [{"version": back, "previous": None}]
            assert policy_text(hub_dir, back) is None
            rows = await devices(hub_dir)
    finally:
        await hub.stop()
    assert await applied_versions(hub_dir) == {canary: [bad, back]}
    assert logged_versions(agents[canary]) == [f"{bad} applied", f"{back} applied"]
    for device in rest:
        assert (rows[device]["policy_version"], rows[device]["policy_intended"]) == (None, None), rows[device]
        assert logged_versions(agents[device]) == [], device


def signed_policy(hub_dir: HubDir, device: str, version: int, text: str) -> bytes:
    """What the hub publishes on the device's down/policy topic (hub.rollout.distribution)."""
    doc = PolicyDocument(version=version, device=device, profile="sim", region=hub_dir.region, text=text,
                         issued_at=time.time())
    return pack(seal(pack(doc), load_policy_key(hub_dir.dir / "pki" / "policy.key")))


async def test_policy_delivery_cut_by_a_disconnect_is_still_installed(
        hub_dir: HubDir, bundles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the hub kill in test_hub_killed_mid_rollout_resumes_it hits when it lands while a
    wave's policy is being delivered (seen there under CPU load): the agent's receive task
    lives in the connection's task group, so the lost connection cancels take_policy while
    the intake's check runs in a worker thread. The thread finishes anyway: the policy is
    stored and intake.version is set (so Status reports it), but _install, the log line and
    the policy_applied event never happen; after the reconnect the retained copy is
    'unchanged'. Here the thread is held until the cancel so the timing is certain."""
    await hub_dir.provision(bundles, "dev-cut")
    settings = load_settings(bundles / "dev-cut" / "agent.toml")
    payload = signed_policy(hub_dir, "dev-cut", 1, good_policy("cut"))
    agent = await Agent.open(settings, None)
    try:
        offer = agent.intake.offer
        checked, release = threading.Event(), threading.Event()

        def held_offer(data: bytes) -> Outcome:
            outcome = offer(data)
            checked.set()
            release.wait(10)
            return outcome

        monkeypatch.setattr(agent.intake, "offer", held_offer)
        delivery = asyncio.create_task(agent.take_policy(payload))
        assert await asyncio.to_thread(checked.wait, 10)
        delivery.cancel()  # the connection drops: its task group cancels the receive loop
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        monkeypatch.undo()
        await agent.take_policy(payload)  # the retained copy, on the next connection

        assert (await agent.status()).policy_version == 1  # what the hub is told

        async def installed() -> bool:  # a fix may finish the installation in the background
            return agent.engine is not None
        await eventually(installed, "version 1 is reported in force, so its rules must run", timeout=1)
        assert agent.engine is not None
        assert agent.engine.policy.version == 1
        assert [r.name for r in agent.engine.policy.rules] == ["cut"]
    finally:
        await agent.close()
    db = sqlite3.connect(f"file:{settings.state_dir / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        kinds = [k for (k,) in db.execute("SELECT kind FROM records WHERE kind IS NOT NULL ORDER BY seq")]
    finally:
        db.close()
    assert "policy_applied" in kinds


# --- 5. the operator's promote and abort against a running hub ----------------------------------


async def test_promote_and_abort(hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    """`policy promote` takes a canary rollout to all devices at once; `policy abort` puts the
    devices a canary reached back on their previous policy (as a new version), and leaves the
    others alone."""
    names = [f"dev-p{i}" for i in range(4)]
    await hub_dir.provision(bundles, *names)
    order = ranked(names)
    async with fleet(bundles, *names) as agents:
        # promote: from the canary to every device at once, long before its bake is over.
        v1, r1 = await push(hub_dir, workdir, good_policy("first"), "--canary", "25", "--bake", "60s")
        await agents[order[0]].wait_for(rf"policy version {v1} applied", timeout=APPLY_TIMEOUT)
        await reported(hub_dir, {order[0]: v1})
        st = await status(hub_dir)
        assert (st["active"]["rollout"], st["active"]["wave"], st["active"]["health"]["reached"]) == (r1, 1, 1)
        out = await cli(hub_dir, "policy", "promote")
        assert f"rollout {r1}: version {v1} promoted to all 4 targeted devices" in out, out
        await wait_applied(agents, v1)
        await reported(hub_dir, dict.fromkeys(names, v1))
        st = await status(hub_dir)
        assert st["active"] is None
        assert (st["rollouts"][0]["rollout"], st["rollouts"][0]["state"]) == (r1, "complete")
        assert st["rollouts"][0]["reason"].startswith("promoted by ")
        [promoted] = await hub_events(hub_dir, "rollout_promoted")
        assert (promoted["policy_version"], promoted["body"]["reached"]) == (v1, 4)
        assert await hub_events(hub_dir, "rollout_wave") == []  # no wave baked: straight to 100 %

        # abort: the two canaries go back to v1's rules (as a new version), the others never move.
        marks = {d: a.mark() for d, a in agents.items()}
        v2, r2 = await push(hub_dir, workdir, good_policy("second"), "--canary", "50", "--bake", "60s")
        reached, untouched = order[:2], order[2:]
        await wait_applied({d: agents[d] for d in reached}, v2, marks)
        out = await cli(hub_dir, "policy", "abort")
        assert f"rollout {r2}: version {v2} aborted on 2 device(s)" in out, out
        v3 = v2 + 1
        await wait_applied({d: agents[d] for d in reached}, v3, marks)
        await reported(hub_dir, {**dict.fromkeys(reached, v3), **dict.fromkeys(untouched, v1)})
        assert policy_text(hub_dir, v3) == policy_text(hub_dir, v1)

        async def first_again() -> bool:
            acted = {e["device"] for e in await events(hub_dir, kind="action_succeeded")
                     if e["policy_version"] == v3 and e["rule"] == "first"}
            return acted == set(reached)
        await eventually(first_again, f"{reached} act on rule 'first' under version {v3}")

        st = await status(hub_dir)
        assert st["active"] is None
        assert [(x["rollout"], x["state"]) for x in st["rollouts"]] == [(r2, "aborted"), (r1, "complete")]
        assert st["rollouts"][0]["reason"].startswith("aborted by ")
        assert st["versions"] == {str(v3): {"intended": 2, "applied": 2}, str(v1): {"intended": 2, "applied": 2}}
        [aborted] = await hub_events(hub_dir, "rollout_aborted")
        assert aborted["policy_version"] == v2
        assert (aborted["body"]["automatic"], aborted["body"]["devices"]) == (False, 2)
        assert aborted["body"]["replaced_by"] == [{"version": v3, "previous": v1}]
        # A finished rollout cannot be aborted or promoted again.
        for command in ("abort", "promote"):
            code, _, err = await run_cli(HUB, "policy", command, "--dir", str(hub_dir.dir))
            assert (code, "no rollout is in progress" in err) == (1, True), (command, err)

    applied = await applied_versions(hub_dir)
    for device in reached:
        assert applied[device] == [v1, v2, v3]
        assert logged_versions(agents[device]) == [f"{v1} applied", f"{v2} applied", f"{v3} applied"]
    for device in untouched:
        assert applied[device] == [v1]
        assert logged_versions(agents[device]) == [f"{v1} applied"]


# --- 6. a device provisioned after a rollout runs what its peers run ----------------------------


async def test_a_device_provisioned_after_a_rollout_gets_the_fleets_policy(
        hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    """The rollout is complete when dev-n1 is provisioned: provisioning makes it a member, the
    hub sends it the version at its first connection, and a rollback takes it back too."""
    await hub_dir.provision(bundles, "dev-n0")
    async with fleet(bundles, "dev-n0") as agents:
        hub_mark = hub.mark()
        v1, r1 = await push(hub_dir, workdir, good_policy("fleet"), "--bake", "1s")
        await wait_applied(agents, v1)
        await hub.wait_for(rf"rollout {r1}: version {v1} reached all 1 targeted devices", after=hub_mark)

        code, out, err = await run_cli(HUB, "provision", "--dir", str(hub_dir.dir), "--out", str(bundles),
                                       "--profile", "sim", "dev-n1")
        assert code == 0, err
        assert f"1 new device(s) get policy version {v1}, as their peers did" in out, out
        agents["dev-n1"] = await Proc("dev-n1", agent_argv(bundles / "dev-n1")).start()
        await agents["dev-n1"].wait_for(rf"policy version {v1} applied: 1 rule", timeout=RECONNECT_TIMEOUT)
        await reported(hub_dir, {"dev-n0": v1, "dev-n1": v1})

        marks = {d: a.mark() for d, a in agents.items()}
        out = await cli(hub_dir, "policy", "rollback")
        assert f"rollout {r1}: version {v1} rolled back on 2 device(s)" in out, out
        # Neither had a hub policy before v1: both go back to their local policy file, as v1 + 1.
        await asyncio.gather(*(a.wait_for(rf"policy version {v1 + 1} applied: the local policy file",
                                          after=marks[d], timeout=APPLY_TIMEOUT) for d, a in agents.items()))
