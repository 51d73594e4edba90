"""`edge-agent status`: one device's queue, acknowledgment, policy and recent errors, read-only.

Outboxes are written by the real Outbox (then closed) or by a real running agent; the
command runs as a subprocess, as an operator runs it, except where a test needs another
clock (`collect(now=...)`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.buffer.outbox import DB_NAME, Outbox
from edge_agent.config import load_settings
from edge_agent.decide.policy_intake import STORED_NAME
from edge_agent.ops.status import ERRORS_SHOWN, STALE_AFTER_S, collect
from edge_agent.sense.sensors import Reading
from edgefleet.wire.protocol import PolicyDocument, pack
from hub.rollout.signing import seal
from tests.integration.test_store_forward_faults import wait_until
from tests.support.harness import AGENT, HubDir, Proc, free_port, run_cli, start_agent

AGENT_TOML = """\
device_id = "dev-1"
profile = "sim"
region = "eu-1"
policy = "local-policy.toml"

[broker]
host = "127.0.0.1"
"""

LOCAL_POLICY = """\
version = 5

[[rules]]
name = "local-rule"
when = "sig0 > 100"
clear = "sig0 < 90"
action = "record"
offline = "act"
"""

HUB_POLICY = """\
[[rules]]
name = "hub-rule"
when = "sig1 > 50"
clear = "sig1 < 40"
action = "alert"
args = { message = "sig1 high" }
offline = "act"
"""

SCREEN_LINES = 24
READINGS_AGE = 60.0  # seconds: the first reading's age when written, well within STALE_AFTER_S


@dataclass
class Device:
    folder: Path
    key: Ed25519PrivateKey

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    def store_policy(self, version: int, text: str | None = HUB_POLICY) -> None:
        doc = PolicyDocument(version=version, device="dev-1", profile="sim", region="eu-1", text=text,
                             issued_at=1_700_000_000.0)
        self.state.mkdir(exist_ok=True)
        (self.state / STORED_NAME).write_bytes(pack(seal(pack(doc), self.key)))


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    folder = tmp_path / "device"
    folder.mkdir()
    (folder / "agent.toml").write_text(AGENT_TOML)
    (folder / "local-policy.toml").write_text(LOCAL_POLICY)
    key = Ed25519PrivateKey.generate()
    (folder / "policy.pub").write_bytes(public_pem(key))
    return Device(folder, key)


async def status(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await run_cli(AGENT, "status", "--config", str(config), "--json", *args)
    assert code in (0, 1), (code, err)
    return code, json.loads(out)


async def write_outbox(state: Path, events: list[tuple[str, dict[str, object]]], readings: int,
                       ack_through: int) -> float:
    """`readings` readings one second apart, then `events`, acknowledged through `ack_through`;
    closed cleanly. Returns the first reading's time (READINGS_AGE ago)."""
    t0 = time.time() - READINGS_AGE
    outbox = await Outbox.open(state, 10**9)
    try:
        outbox.add([Reading("sig0", t0 + i, float(i)) for i in range(readings)])
        await outbox.add_events(events)
        outbox.acknowledge(ack_through)
        await outbox.flush()
    finally:
        await outbox.close()
    return t0


def listing(folder: Path) -> dict[str, tuple[int, float]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime) for p in folder.iterdir()}


# --- without an agent ---------------------------------------------------------------------


async def test_a_device_that_never_ran_needs_attention(device: Device) -> None:
    code, st = await status(device.config)
    assert code == 1
    assert st["device"] == "dev-1"
    assert not st["healthy"]
    assert st["agent"]["state"] == "not running"
    assert "no outbox yet" in st["outbox"]["error"]
    assert st["policy"] == {"in_force": "local", "version": 0, "rules": 1, "withdrawn": False,
                            "stored": str(device.state / STORED_NAME), "stored_refused": None,
                            "local": str(device.folder / "local-policy.toml"), "local_rules": 1}
    assert any(a.startswith("the agent is not running") for a in st["attention"])


async def test_a_broken_config_is_exit_2(device: Device) -> None:
    device.config.write_text(AGENT_TOML + "\nunknown_key = 1\n")
    code, out, err = await run_cli(AGENT, "status", "--config", str(device.config))
    assert code == 2
    assert out == ""
    assert err.startswith("edge-agent: configuration error:"), err


async def test_queue_acknowledgment_and_unacknowledged_errors_come_from_the_outbox(device: Device) -> None:
    rule = {"rule": "hot", "policy_version": 3}
    # seq 1: an error the hub has acknowledged (deleted from the outbox: not shown)
    await write_outbox(device.state, [("action_failed", {**rule, "action": "record", "detail": "old"})], 0, 1)
    t0 = await write_outbox(device.state, [
        ("rule_fired", {**rule, "readings": {"sig0": 5}}),  # seq 12: not an error
        ("action_failed", {**rule, "action": "command", "exit_code": 3, "detail": "no such file"}),
        ("alert", {"message": "just so you know", "severity": "info"}),  # information, not an error
        ("alert", {"message": "disk almost full", "severity": "warning"}),
        ("escalation", {**rule, "reason": "repeated_failures", "detail": "its action failed 3 times in a row"}),
        ("policy_refused", {"policy_version": 9, "reason": "bad_signature", "detail": "signed by unknown key",
                            "in_force": 3}),
    ], readings=10, ack_through=5)  # readings are seq 2..11: 2..5 acknowledged
    before = listing(device.state)

    code, st = await status(device.config)

    assert listing(device.state) == before, "status wrote beside the outbox"
    assert code == 1  # not running, and errors waiting
    o = st["outbox"]
    assert (o["backlog"], o["readings"], o["events"]) == (6 + 6, 6, 6)
    assert (o["acked_through"], o["last_seq"]) == (5, 17)
    assert o["oldest_waiting_ts"] == pytest.approx(t0 + 4)  # reading seq 6 is the fifth
    assert o["error"] is None
    assert o["bytes"] > 0
    assert [e["kind"] for e in st["recent_errors"]] == ["policy_refused", "escalation", "alert", "action_failed"]
    assert st["recent_errors_total"] == 4
    refused, escalation, alert, failed = st["recent_errors"]
    assert refused["detail"] == "version 9 refused (bad_signature): signed by unknown key"
    assert (escalation["rule"], escalation["policy_version"]) == ("hot", 3)
    assert escalation["detail"] == "repeated_failures: its action failed 3 times in a row"
    assert alert["detail"] == "warning: disk almost full"
    assert failed["detail"] == "command (exit 3): no such file"
    assert "4 error event(s) not yet acknowledged by the hub (listed under errors)" in st["attention"]


async def test_a_queue_nobody_acknowledges_a_full_outbox_and_kept_corrupt_files_need_attention(
        device: Device) -> None:
    t0 = await write_outbox(device.state, [], readings=2000, ack_through=0)
    (device.state / f"{DB_NAME}.corrupt-20260101T000000").write_bytes(b"not sqlite")
    settings = load_settings(device.config, ["outbox.quota_mb=0.02"])

    now = t0 + STALE_AFTER_S + 60
    st = collect(settings, settings.load_policy(), now=now)

    assert st.outbox.backlog == 2000
    text = "\n".join(st.attention)
    assert f"2000 record(s) waiting, the oldest for {STALE_AFTER_S / 60 + 1:.0f} min" in text
    assert "% of its 0.02 MB quota: it sheds old readings" in text
    assert "1 corrupt outbox(es) kept beside it" in text
    fresh = collect(settings, settings.load_policy(), now=t0 + 5)  # the oldest record 5 s old
    assert not [a for a in fresh.attention if "waiting, the oldest" in a]


async def test_the_text_fits_one_screen(device: Device) -> None:
    alerts: list[tuple[str, dict[str, object]]] = [
        ("alert", {"message": f"alert {i} " + "x" * 300, "severity": "critical"}) for i in range(30)]
    await write_outbox(device.state, alerts, readings=5, ack_through=0)
    code, out, _ = await run_cli(AGENT, "status", "--config", str(device.config))
    assert code == 1
    lines = out.splitlines()
    assert len(lines) <= SCREEN_LINES, out
    assert max(len(line) for line in lines if "alert" in line) <= 140, out  # details are cut short
    assert lines[0] == "dev-1 (profile sim): needs attention (2)"
    assert f"… and {30 - ERRORS_SHOWN} older" in out
    assert "critical: alert 29 " in out  # newest first


# --- the stored signed policy -------------------------------------------------------------


async def test_the_stored_signed_policy_is_verified_as_at_start(device: Device) -> None:
    device.store_policy(7)
    _, st = await status(device.config)
    assert (st["policy"]["in_force"], st["policy"]["version"], st["policy"]["rules"]) == ("signed", 7, 1)
    assert st["policy"]["stored_refused"] is None

    device.store_policy(8, text=None)  # the hub withdrew its policies: the local file runs
    _, st = await status(device.config)
    assert (st["policy"]["in_force"], st["policy"]["version"], st["policy"]["withdrawn"]) == ("local", 8, True)

    device.store_policy(9)
    (device.folder / "policy.pub").write_bytes(public_pem(Ed25519PrivateKey.generate()))  # a new hub key
    code, out, _ = await run_cli(AGENT, "status", "--config", str(device.config))
    assert code == 1
    assert "policy    the stored signed policy does not check out (bad_signature); local file" in out
    assert "attention: the stored signed policy does not check out (bad_signature: signed by unknown key" in out
    assert "the agent starts with the local policy file instead" in out

    device.store_policy(10, text=HUB_POLICY.replace('"alert"', '"command"'))  # signed, but not for this profile
    (device.folder / "policy.pub").write_bytes(public_pem(device.key))
    code, st = await status(device.config)
    assert st["policy"]["stored_refused"]["version"] == 10
    assert st["policy"]["stored_refused"]["reason"] == "invalid_policy"
    assert any(a.startswith("the stored signed policy (version 10) does not check out (invalid_policy:")
               for a in st["attention"])


# --- with a running agent -----------------------------------------------------------------


async def test_a_running_agent_is_named_by_its_pid_and_a_killed_one_is_not_running(
        hub_dir: HubDir, bundles: Path) -> None:
    """No hub here: the agent runs, buffers, and cannot deliver; status reads it all the while."""
    await hub_dir.provision(bundles, "dev-r")
    config = bundles / "dev-r" / "agent.toml"
    agent = await Proc("agent", [AGENT, "run", "--config", str(config), "--set", f"broker.port={free_port()}",
                                 "--set", "sim.rate_hz=20", "--set", "report.default_deadband=0"]).start()
    try:
        await agent.wait_for(r"retrying in")
        code, st = await status(config)
        assert code == 0, st["attention"]  # a hub away for seconds is not yet news
        assert st["agent"]["state"] == "running"
        assert st["agent"]["pid"] == agent.pid
        assert "edge-agent run" in st["agent"]["detail"]
        await wait_until(lambda: collect(load_settings(config), None).outbox.backlog >= 10, "readings buffered")
        later = collect(load_settings(config), None, now=time.time() + STALE_AFTER_S + 1)
        assert later.agent.pid == agent.pid
        assert [a for a in later.attention if "waiting, the oldest for" in a], later.attention
    finally:
        agent.signal(signal.SIGKILL)
        await agent.stop()
    code, st = await status(config)
    assert code == 1
    assert st["agent"] == {"state": "not running", "pid": None, "detail": "no process has the outbox open"}
    assert st["outbox"]["backlog"] >= 10  # read from the WAL the killed agent left behind


@pytest.mark.integration
async def test_a_connected_agent_is_healthy_and_acknowledged(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-s")
    config = bundles / "dev-s" / "agent.toml"
    fast = ("sim.rate_hz=20", "report.default_deadband=0")
    agent = await start_agent(config, *fast)
    try:
        await agent.wait_for(r"dev-s online")
        await wait_until(lambda: collect(load_settings(config), None).outbox.acked_through > 20, "acknowledged")
        code, st = await status(config)
        assert code == 0, st["attention"]
        assert st["healthy"]
        assert st["agent"]["pid"] == agent.pid
        assert st["outbox"]["acked_through"] > 20
        assert st["outbox"]["backlog"] < 200  # 20 readings/s x 4 signals, acknowledged as they go
        assert st["recent_errors"] == []
        code, out, _ = await run_cli(AGENT, "status", "--config", str(config))
        assert out.splitlines()[0] == "dev-s (profile sim): ok"
        await asyncio.sleep(0.5)
        assert agent.proc is not None
        assert agent.proc.returncode is None
        assert (bundles / "dev-s" / "state" / f"{DB_NAME}-wal").exists()
    finally:
        assert await agent.stop() == 0
