"""`edge-hub events` and `edge-hub status`: stored decisions in the documented JSON shape, and
the one screen of what needs a person."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.wire.protocol import (
    ACK,
    TELEMETRY,
    Ack,
    Batch,
    EventRecord,
    Presence,
    down_topic,
    encode,
    pack,
    presence_topic,
    unpack,
    up_topic,
)
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli

pytestmark = pytest.mark.integration


async def send(hub_dir: HubDir, bundle: Path, batch: Batch, *, garbage: bool = False, online: bool = False) -> None:
    """Publish a batch with the device's own certificate and wait for the hub's ack.

    `garbage` first publishes a payload the hub must reject; `online` announces presence."""
    device = bundle.name
    session = await connect(device_identity(bundle), hub_dir.port, device)
    try:
        await session.subscribe([(down_topic(device, ACK), 1)])
        if online:
            await session.publish(presence_topic(device), encode(Presence(state="online", session="s-1")),
                                  qos=1, retain=True)
        if garbage:
            await session.publish(up_topic(device, TELEMETRY), b"\xff not a batch", qos=1)
        await session.publish(up_topic(device, TELEMETRY), pack(batch), qos=1)
        async with asyncio.timeout(10):
            while unpack((await session.next_message()).payload, Ack).through < batch.last:
                pass
    finally:
        await session.close()


def ev(seq: int, ts: float, kind: str, **body: Any) -> EventRecord:
    return EventRecord(seq, ts, kind, json.dumps(body))


async def events(hub_dir: HubDir, *args: str) -> list[dict[str, Any]]:
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_events_and_status(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-e1", "dev-e2", "dev-e3")
    now = time.time()
    await send(hub_dir, bundles / "dev-e1", Batch(
        base=0, last=4, settled=True, names=["temp"], seq=[1], ts=[now - 7200], metric=[0], value=[90.0],
        events=[
            ev(2, now - 7200, "rule_fired", policy_version=3, rule="hot", readings={"temp": 90.0}),
            ev(3, now - 60, "action_failed", policy_version=3, rule="hot", action="fan", detail="exit 1",
               exit_code=1, output="", latency_ms=12, timed_out=False),
            ev(4, now - 30, "escalation", policy_version=3, rule="hot", reason="repeated_failures",
               detail="3 failures in 10 min"),
        ]), online=True)
    await send(hub_dir, bundles / "dev-e2", Batch(
        base=0, last=3, settled=True, events=[
            ev(1, now - 20, "escalation", policy_version=None, rule="cool", reason="fires_without_clear",
               detail="old"),
            ev(2, now - 10, "escalation", policy_version=4, rule="cool", reason="fires_without_clear",
               detail="fired 50 times without clearing"),
            ev(3, now - 5, "outbox_corrupt", moved_to="state/outbox.corrupt-1", reason="malformed"),
        ]), garbage=True)

    rows = await events(hub_dir)
    assert [(r["device"], r["seq"]) for r in rows] == [
        ("dev-e1", 2), ("dev-e1", 3), ("dev-e1", 4), ("dev-e2", 1), ("dev-e2", 2), ("dev-e2", 3)]
    assert set(rows[0]) >= {"device", "seq", "ts", "kind", "policy_version", "rule", "body"}
    assert rows[0]["kind"] == "rule_fired"
    assert rows[0]["policy_version"] == 3
    assert rows[0]["rule"] == "hot"
    assert rows[0]["body"] == {"readings": {"temp": 90.0}}
    assert abs(rows[0]["ts"] - (now - 7200)) < 1e-3
    assert rows[3]["policy_version"] is None
    corrupt = rows[5]
    assert (corrupt["kind"], corrupt["rule"], corrupt["policy_version"]) == ("outbox_corrupt", None, None)
    assert corrupt["body"] == {"moved_to": "state/outbox.corrupt-1", "reason": "malformed"}

    assert [r["seq"] for r in await events(hub_dir, "--device", "dev-e1")] == [2, 3, 4]
    assert [(r["device"], r["seq"]) for r in await events(hub_dir, "--kind", "escalation")] == [
        ("dev-e1", 4), ("dev-e2", 1), ("dev-e2", 2)]
    assert [(r["device"], r["seq"]) for r in await events(hub_dir, "--since", "1h", "--device", "dev-e1")] == [
        ("dev-e1", 3), ("dev-e1", 4)]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 15))
    assert [r["seq"] for r in await events(hub_dir, "--since", iso)] == [2, 3]
    assert len(await events(hub_dir, "--limit", "2")) == 2

    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--device", "dev-e1")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    assert "\tdev-e1\t3\taction_failed\thot\tfan exit 1 12 ms exit 1" in lines[1]
    assert lines[2].endswith("escalation\thot\trepeated_failures: 3 failures in 10 min")
    assert lines[0].startswith(time.strftime("%Y-%m-%dT", time.gmtime(now - 7200)))
    assert "3 event(s)" in err
    code, _, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--since", "soon")
    assert code == 2
    assert "not a time" in err

    # The hub applies presence asynchronously: wait until dev-e1 shows online.
    async with asyncio.timeout(10):
        while True:
            code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
            assert code == 0, err
            status = json.loads(out)
            if status["devices"]["online"] == 1:
                break
            await asyncio.sleep(0.2)
    assert status["devices"] == {"total": 3, "online": 1, "offline": 2, "revoked": 0}
    assert [d["device"] for d in status["offline"]] == ["dev-e2", "dev-e3"]
    assert [(e["device"], e["rule"], e["reason"], e["seq"]) for e in status["escalations"]] == [
        ("dev-e1", "hot", "repeated_failures", 4), ("dev-e2", "cool", "fires_without_clear", 2)]
    assert sum(status["rejects"].values()) == 1
    assert status["crl"]["next_update"]
    assert status["crl"]["overdue"] is False
    assert status["crl"]["error"] is None
    assert status["cert_expiring"] == []

    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert "devices: 3 total, 1 online, 2 offline, 0 revoked" in out
    assert "offline  dev-e3  last seen never" in out
    assert "dev-e2  cool  fires_without_clear: fired 50 times without clearing" in out
    assert "dev-e1  hot  repeated_failures: 3 failures in 10 min" in out
    reason = next(iter(status["rejects"]))
    assert f"rejected messages: 1 ({reason} 1)" in out
    assert "CRL next update: 20" in out
    assert "certificates expiring within 14 days: none" in out
