"""`edge-hub status` flags what needs a person: offline, drifted, approvals, expiring certificates."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import aiosqlite

from edge_agent.protocol import ApprovalRequest, Presence, Status
from hub.coordination import Coordination
from hub.store import HubStore, IngestWork
from tests.conftest import HUB, HubDir, run_cli


async def test_status_flags_offline_drifted_pending_approval_and_expiring_certificate(hub_dir: HubDir) -> None:
    now = time.time()
    store = await HubStore.open(hub_dir.dir / "hub.db")
    try:
        for serial, device in enumerate(("ok", "gone", "drifter", "asker", "old-cert"), start=0x1000):
            await store.register(device, "sim", {})
            await store.apply_presence(device, Presence(state="online", session="s1"), now - 1000)
            days = 3 if device == "old-cert" else 80
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
    assert [d["device"] for d in status["cert_expiring"]] == ["old-cert"]

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert "offline  gone" in out
    assert "drifter  runs none, should run 1" in out
    assert "asker  rule reflash: command" in out
    assert "edge-hub approvals approve|deny" in out
    assert "old-cert  expires" in out
