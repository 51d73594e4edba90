"""One device's hostile payloads against a real hub: nothing it sends (or once got stored) stops
the hub, its broker or an operator's view of the region.

Real processes: `edge-hub run` with its managed Mosquitto, `edge-agent run` for a well-behaved
device, and MQTT clients holding real device certificates made at test time for the attacker.
Nested payloads on each up/ topic, while a real agent streams exactly once, are among
test_store_forward_input's BAD_INPUT.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgefleet.mqtt.session import MqttSession
from edgefleet.wire.protocol import (
    ACK,
    CERT,
    COORD,
    MAX_EVENT_BODY,
    POLICY,
    TELEMETRY,
    Ack,
    Batch,
    CertRefused,
    CertRequest,
    EventRecord,
    PolicyDocument,
    down_filter,
    down_topic,
    pack,
    presence_topic,
    unpack,
    unpack_cert_reply,
    up_topic,
)
from hub.rollout.signing import seal
from tests.integration.test_store_forward_input import events, rejects, start_streaming, telemetry, wait_until
from tests.support.exactly_once import hub_watermark
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, hub_tap, run_cli, start_hub
from tests.support.hostile import BODY, csr_of_unknown_key_type, nested_json, nested_msgpack

pytestmark = pytest.mark.integration

ARRIVAL = 5.0  # bound on one PUBACK or ack
assert len(BODY) < MAX_EVENT_BODY


def nested_presence() -> bytes:
    return nested_json({"state": "online", "session": "s-evil"})


async def publish(session: MqttSession, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async with asyncio.timeout(ARRIVAL):
        await session.publish(topic, payload, qos=1, retain=retain)


async def send_acked(hub_dir: HubDir, bundle: Path, batch: Batch) -> None:
    """Publish a batch with the device's own certificate and wait for an ack covering it."""
    device = bundle.name
    session = await connect(device_identity(bundle), hub_dir.port, device)
    try:
        await session.subscribe([(down_topic(device, ACK), 1)])
        await publish(session, up_topic(device, TELEMETRY), pack(batch))
        async with asyncio.timeout(ARRIVAL * 2):
            while unpack((await session.next_message()).payload, Ack).through < batch.last:
                pass
    finally:
        await session.close()


def assert_alive(hub: Proc) -> None:
    assert hub.proc is not None
    assert hub.proc.returncode is None, "the hub died:\n" + "\n".join(hub.lines[-30:])


# --- item 1: a retained hostile presence ---------------------------------------------------------


async def test_a_retained_nested_presence_does_not_stop_the_hub_at_each_restart(
    hub_dir: HubDir, bundles: Path,
) -> None:
    """With broker persistence a retained message outlives the broker, so a crash on it would repeat at
    every start. The hub rejects it without stopping and clears it at the broker (hub.ingest.retained): after a
    restart it is not handed over again."""
    config = hub_dir.dir / "hub.toml"
    config.write_text(config.read_text().replace("persistence = false", "persistence = true", 1))
    await hub_dir.provision(bundles, "dev-good", "dev-evil")
    hub = await start_hub(hub_dir)
    try:
        session = await connect(device_identity(bundles / "dev-evil"), hub_dir.port, "dev-evil")
        try:
            await publish(session, presence_topic("dev-evil"), nested_presence(), retain=True)
        finally:
            await session.close()
        await wait_until(lambda: rejects(hub_dir).get("too_deep", 0) == 1, "the first rejection", log=hub)
        await hub.wait_for(r"cleared .*dev-evil/presence|dev-evil/presence.*cleared", timeout=ARRIVAL)
        assert await hub.stop() == 0
        hub = await start_hub(hub_dir)  # a persisted retained message would be handed over at its subscribe
        # Positive control after the restart: a good device's batch is committed and acknowledged.
        await send_acked(hub_dir, bundles / "dev-good", Batch(base=0, last=1, settled=True, names=["m"], seq=[1],
                                                              ts=[time.time()], metric=[0], value=[1.0]))
        assert telemetry(hub_dir, "dev-good") == [(1, "m", 1.0)]
        assert rejects(hub_dir).get("too_deep", 0) == 1  # cleared: not handed over again
        assert_alive(hub)
    finally:
        assert await hub.stop() == 0


async def test_a_certificate_request_for_an_unknown_key_type_is_refused(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    """cryptography raises UnsupportedAlgorithm (not a ValueError) reading such a request's key."""
    await hub_dir.provision(bundles, "dev-a")
    session = await connect(device_identity(bundles / "dev-a"), hub_dir.port, "dev-a")
    try:
        await session.subscribe([(down_filter("dev-a"), 1)])
        await publish(session, up_topic("dev-a", CERT), pack(CertRequest(csr=csr_of_unknown_key_type("dev-a"))))
        async with asyncio.timeout(ARRIVAL):
            reply = unpack_cert_reply((await session.next_message()).payload)
    finally:
        await session.close()
    assert isinstance(reply, CertRefused)
    assert (reply.reason, reply.key_id) == ("bad_request", "")
    assert "Unknown key type" in reply.detail
    await hub.wait_for(r"certificate request from dev-a refused \(bad_request\)", timeout=ARRIVAL)
    assert_alive(hub)


async def test_an_agent_survives_nested_messages_on_its_down_topics(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    """What the agent decodes from the hub: ack, coord, cert, and a signed policy nested too deep for TOML."""
    await hub_dir.provision(bundles, "dev-a")
    bundle = bundles / "dev-a"
    agent = await start_streaming(hub_dir, hub, bundle)
    try:
        key = load_pem_private_key((hub_dir.pki / "policy.key").read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        deep_policy = PolicyDocument(version=7, device="dev-a", profile="sim", region=hub_dir.region,
                                     text="a = " + "[" * 3000 + "]" * 3000)
        mark = agent.mark()
        async with hub_tap(hub_dir, hub) as session:
            for kind, payload in ((ACK, nested_msgpack({"through": 1})),
                                  (COORD, nested_msgpack({"type": "queued", "id": "r1", "name": "l", "position": 1})),
                                  (CERT, nested_msgpack({"type": "refused", "key_id": "", "reason": "x"})),
                                  (POLICY, pack(seal(pack(deep_policy), key)))):
                await publish(session, down_topic("dev-a", kind), payload)
        seen = mark
        for _ in (ACK, COORD, CERT):  # one line each
            line = await agent.wait_for(r"ignored a message from the hub \(too_deep\)", after=seen, timeout=ARRIVAL)
            seen = agent.lines.index(line, seen) + 1
        await agent.wait_for(r"policy version 7 refused \(invalid_policy\): .*nested beyond what can be read",
                             after=mark, timeout=ARRIVAL)
        # The agent streams on, through the hub (resumed after the tap).
        acked = hub_watermark(hub_dir.dir, "dev-a")
        await wait_until(lambda: hub_watermark(hub_dir.dir, "dev-a") > acked, "dev-a still acknowledged",
                         timeout=30, log=agent)
        assert not any("Traceback" in line for line in agent.lines[mark:]), "\n".join(agent.lines[-30:])
        assert await agent.stop() == 0
    finally:
        await agent.stop()


# --- item 3: a stored body cannot break a read path ---------------------------------------------


def plant(hub_dir: HubDir, device: str, now: float) -> None:
    """Rows as an older hub may have stored them: the deep body on the kinds every view reads."""
    with sqlite3.connect(hub_dir.dir / "hub.db", timeout=10) as db:
        db.executemany("INSERT INTO events(device, seq, ts, kind, body) VALUES (?, ?, ?, ?, ?)",
                       [(device, 10, now, "action_failed", BODY), (device, 11, now, "escalation", BODY),
                        (device, 12, now, "alert", BODY)])
        db.execute("INSERT INTO approvals(device, request, rule, action, args, requested_at, expires_at, state) "
                   "VALUES (?, 'a1', 'r', 'command', ?, ?, ?, 'pending')", (device, BODY, now, now + 3600))


async def views_of_the_region(hub_dir: HubDir) -> dict[str, str]:
    """What an operator reads: every command must exit 0, without a traceback."""
    views = {}
    for argv in (["events"], ["events", "--json"], ["status"], ["status", "--json"],
                 ["approvals", "list", "--json"]):
        code, out, err = await run_cli(HUB, *argv, "--dir", str(hub_dir.dir))
        assert code == 0, f"{argv}: {err}"
        assert "Traceback" not in err
        views[" ".join(argv)] = out
    return views


def scrape(hub_dir: HubDir) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{hub_dir.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # a loopback URL we built
        return response.status, response.read()


async def test_a_deeply_nested_event_body_breaks_no_view_of_the_region(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-evil")
    evil = bundles / "dev-evil"
    now = time.time()
    # Already stored (by a hub from before the bound): every reader must cope.
    plant(hub_dir, "dev-evil", now)
    views = await views_of_the_region(hub_dir)
    rows = {r["seq"]: r for r in map(json.loads, views["events --json"].splitlines())}
    assert rows[10]["body"]["unreadable"] == "JSON nested deeper than 32 levels"
    assert rows[10]["body"]["text"].startswith("[[[")
    assert len(views["events --json"]) < 3000, "an unreadable body is marked, not dumped whole"
    lines = {line.split("\t")[2]: line for line in views["events"].splitlines()}
    for seq in ("10", "11", "12"):  # action_failed, escalation, alert: each says what it is
        assert "unreadable body (JSON nested deeper than 32 levels): [[[" in lines[seq], lines[seq]
    assert "dev-evil  -  unreadable body" in views["status"]  # the escalation, in what needs a person
    assert json.loads(views["status --json"])["devices"]["total"] == 1
    assert json.loads(views["approvals list --json"])["args"]["unreadable"]
    assert (await asyncio.to_thread(scrape, hub_dir))[0] == 200

    # Through the protocol: refused, so never stored; the device's next, sane batch still is.
    session = await connect(device_identity(evil), hub_dir.port, "dev-evil")
    try:
        await publish(session, up_topic("dev-evil", TELEMETRY), pack(Batch(
            base=0, last=1, settled=True, events=[EventRecord(1, now, "action_failed", BODY)])))
    finally:
        await session.close()
    await send_acked(hub_dir, evil, Batch(base=0, last=1, settled=True,
                                          events=[EventRecord(1, now, "alert", '{"severity": "critical"}')]))
    assert rejects(hub_dir) == {"too_deep": 1}
    assert events(hub_dir, "dev-evil")[0] == (1, "alert", '{"severity": "critical"}')
    await views_of_the_region(hub_dir)
    status, body = await asyncio.to_thread(scrape, hub_dir)
    assert status == 200
    assert b'edgefleet_ingest_rejects_total{reason="too_deep"' in body
    assert_alive(hub)


# --- item 7: one seq, one record -------------------------------------------------------------------


async def test_a_seq_cannot_be_both_a_reading_and_an_event(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-seq")
    bundle = bundles / "dev-seq"
    now = time.time()
    await send_acked(hub_dir, bundle, Batch(base=0, last=3, settled=True, names=["m"], seq=[1, 3], ts=[now, now],
                                            metric=[0, 0], value=[1.0, 3.0],
                                            events=[EventRecord(2, now, "alert", "{}")]))
    # Later batches reuse seq 2 (an event) as a reading and seq 3 (a reading) as an event.
    await send_acked(hub_dir, bundle, Batch(base=1, last=2, names=["m"], seq=[2], ts=[now], metric=[0], value=[2.0]))
    await send_acked(hub_dir, bundle, Batch(base=2, last=3, events=[EventRecord(3, now, "alert", '{"x": 1}')]))
    assert telemetry(hub_dir, "dev-seq") == [(1, "m", 1.0), (3, "m", 3.0)]
    assert events(hub_dir, "dev-seq") == [(2, "alert", "{}")]
    assert hub_watermark(hub_dir.dir, "dev-seq") == 3
    assert rejects(hub_dir) == {"seq_conflict": 2}
    await hub.wait_for(r"rejected \(seq_conflict, 0 before\): dev-seq: the reading with seq 2", timeout=ARRIVAL)
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    assert json.loads(out)["rejects"] == {"seq_conflict": 2}
