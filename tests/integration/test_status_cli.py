"""`edge-hub status` flags what needs a person: offline, drifted, approvals, expiring certificates."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import aiosqlite

from edgefleet.wire.protocol import ApprovalRequest, LeaseRequest, Presence, Status
from hub.cli.status import LIST_LINES, _capped
from hub.db.store import HubStore, IngestWork
from hub.region.coordination import Coordination
from tests.support.harness import HUB, HubDir, run_cli


async def test_status_flags_offline_drifted_pending_approval_and_expiring_certificate(hub_dir: HubDir) -> None:
    now = time.time()
    store = await HubStore.open(hub_dir.dir / "hub.db")
    try:
        for serial, device in enumerate(("ok", "gone", "drifter", "asker", "old-cert", "lapsed"), start=0x1000):
            await store.register(device, "sim", {})
            await store.apply_presence(device, Presence(state="online", session="s1"), now - 1000)
            days = {"old-cert": 3, "lapsed": -2}.get(device, 80)
            await store.record_certificate(serial, device, "device",
                                           dt.datetime.fromtimestamp(now + days * 86400, dt.UTC))
        await store.apply_presence("gone", Presence(state="offline", session="s1"), now - 500)

        async def intend(db: aiosqlite.Connection) -> None:
            await db.execute("INSERT INTO policies(version, text, sha256, created_at, origin) "
                             "VALUES (1, '', 'x', ?, 'test')", (now - 900,))
            await db.executemany("INSERT INTO assignments(device, version, assigned_at) VALUES (?, 1, ?)",
                                 [("ok", now - 900), ("drifter", now - 900)])

        await store.atomically(intend)
        # "ok" runs its intended version; "drifter" has run version 0 for 900 s (grace: 120 s).
        await store.commit_ingest(IngestWork(now=now, statuses={
            "ok": Status(backlog=0, dropped=0, policy_version=1), "drifter": Status(backlog=0, dropped=0)}))
        replies = await Coordination(store, "hub.test").handle([("asker", ApprovalRequest(
            id="r1", rule="reflash", action="command", expires_s=600))], now)
        assert replies.messages == []  # pending: nothing to tell the device yet
    finally:
        await store.close()

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    assert [d["device"] for d in status["offline"]] == ["gone"]
    assert [(d["device"], d["applied"], d["intended"]) for d in status["policy_drifted"]] == [("drifter", None, 1)]
    assert [(a["device"], a["rule"], a["action"]) for a in status["approvals_pending"]] == [
        ("asker", "reflash", "command")]
    assert sorted(d["device"] for d in status["cert_expiring"]) == ["lapsed", "old-cert"]
    assert [(d["device"], d["fix"]) for d in status["cert_expired"]] == [
        ("lapsed", "edge-hub provision --csr FILE --dir DIR --out OUT lapsed")]  # cannot renew in band

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert "offline  gone" in out
    assert "drifter  runs none, should run 1" in out
    assert "asker  rule reflash: command" in out
    assert "edge-hub approvals approve|deny" in out
    assert "old-cert  expires" in out
    assert "lapsed  expired" in out
    assert "devices whose certificate expired (they cannot renew in band): 1" in out


async def test_status_figures_match_the_hub_state(hub_dir: HubDir) -> None:
    """Coverage, ingest rate, action success rate, decision latency, policy and lease waits,
    as the screen and --json show them, against what was put in the database."""
    now = time.time()
    store = await HubStore.open(hub_dir.dir / "hub.db")
    try:
        for device in ("a", "b", "c", "quiet"):
            await store.register(device, "sim", {})
            await store.apply_presence(device, Presence(state="online", session="s1"), now - 60)
        telemetry = [(d, s, now - 30 + s, "m", float(s)) for d in ("a", "b", "c") for s in range(1, 11)]
        telemetry.append(("quiet", 1, now - 3600, "m", 1.0))  # its newest reading is an hour old
        events = [("a", 11, now, "action_succeeded", json.dumps({"rule": "r", "latency_ms": 2.0})),
                  ("a", 12, now, "action_succeeded", json.dumps({"rule": "r", "latency_ms": 3.0})),
                  ("b", 11, now, "action_succeeded", json.dumps({"rule": "r", "latency_ms": 4.0})),
                  ("b", 12, now, "action_failed", json.dumps({"rule": "r", "latency_ms": 40.0, "detail": "exit 1"}))]
        ranges = {"a": [(0, 12, False)], "b": [(0, 12, False)], "c": [(0, 10, False)], "quiet": [(0, 1, False)]}
        await store.commit_ingest(IngestWork(now=now, telemetry=telemetry, events=events, ranges=ranges, messages=7,
                                             statuses={
            "a": Status(backlog=120, dropped=0), "b": Status(backlog=30, dropped=0)}))
        coordination = Coordination(store, "hub.test")
        await coordination.handle([(d, LeaseRequest(id=f"q-{d}", name="pump", limit=1, ttl_s=60))
                                   for d in ("a", "b", "c")], now - 5)
    finally:
        await store.close()

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    figures: dict[str, Any] = json.loads(out)["figures"]
    assert figures["coverage"] == {"covered": 3, "registered": 4, "window_s": 300.0, "ratio": 0.75}
    records = len(telemetry) + len(events)
    assert records / 300 <= figures["ingest"]["records_per_s"] <= records / 240  # the last 4 to 5 minutes
    assert 7 / 300 <= figures["ingest"]["messages_per_s"] <= 7 / 240
    assert figures["backlog"] == {"readings": 150, "shed": 0}
    actions = figures["actions"]
    assert (actions["succeeded"], actions["failed"], actions["success_ratio"]) == (3, 1, 0.75)
    assert actions["decision_latency_p99_bound_s"] == 0.05  # the bucket that holds the 40 ms decision
    assert figures["leases"]["held"] == 1
    assert figures["leases"]["waiting"] == 2
    assert figures["leases"]["longest_wait_s"] >= 5

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert "hub: no hub process has run on this database yet" in out
    assert "telemetry coverage: 3/4 devices (75%)" in out
    assert "actions: 3 succeeded, 1 failed, 75.0% success" in out
    assert "decision latency p99 <= 50 ms" in out
    assert "leases: 1 held, 2 waiting" in out


def test_a_long_list_keeps_the_screen_one_screen() -> None:
    lines = [f"  offline  d{i}" for i in range(LIST_LINES + 5)]
    shown = _capped(lines, "edge-hub devices")
    assert len(shown) == LIST_LINES
    assert shown[-1] == "  ... and 6 more (edge-hub devices, or --json)"
    assert _capped(lines[:LIST_LINES], "x") == lines[:LIST_LINES]
