"""Store and forward against bad input, a full quota, a corrupt outbox and a failing sensor.

Real processes: `edge-hub run` with its managed Mosquitto, `edge-agent run` on the sim (or
generic-linux) profile, and Python MQTT clients holding real device certificates. Every
stream ends with the exactly-once check read from the real databases (tests/support/exactly_once.py).

How a stream ends exactly once: the streaming agent is stopped, then restarted with sensing
paused (one reading at start, the next a day later) so that its outbox can empty while the
test watches; a running sim agent never stands still long enough to be "drained".
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edgefleet.errors import PublishRefused
from edgefleet.wire.protocol import (
    CERT,
    COORD,
    MAX_BATCH_RECORDS,
    MAX_PAYLOAD_BYTES,
    MAX_SEQ,
    STATUS,
    TELEMETRY,
    ApprovalRequest,
    Presence,
    Status,
    encode,
    pack_coord,
    presence_topic,
    unpack,
    up_topic,
)
from tests.support.exactly_once import QUIET, OutboxState, assert_exactly_once, hub_seqs, hub_watermark, outbox_state
from tests.support.harness import (
    AGENT,
    HUB,
    HubDir,
    Proc,
    connect,
    device_identity,
    free_port,
    hub_tap,
    run_cli,
    start_agent,
)
from tests.support.hostile import BODY, nested_msgpack

pytestmark = pytest.mark.integration

# 4 sim signals x 20 Hz, every reading kept; faults are noticed in seconds, not minutes.
STREAM = (
    "sim.rate_hz=20",
    "report.default_deadband=0",
    "uplink.ack_timeout=3",
    "uplink.status_interval=1",
    "broker.keepalive=5",
    "broker.connect_timeout=3",
)
ARRIVAL = 5.0  # bound on one PUBACK
SETTLE = 20.0  # bound on the hub committing (or counting) what was sent
DRAIN_TIMEOUT = 60.0
NOT_AUTHORIZED = 135  # MQTT v5 PUBACK reason code: the broker's ACL refused the publish
T0 = time.time()


# --- helpers --------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = SETTLE, every: float = 0.1,
                     log: Proc | None = None) -> None:
    """Poll `predicate()` (no process logs these database states) until true, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            message = f"not within {timeout} s: {what}"
            if log is not None:
                message += f"; {log.name}'s last lines:\n" + "\n".join(log.lines[-30:])
            raise AssertionError(message)
        await asyncio.sleep(every)


def hub_query(hub_dir: HubDir, query: str, *args: object) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def rejects(hub_dir: HubDir) -> dict[str, int]:
    return dict(hub_query(hub_dir, "SELECT reason, count FROM rejects"))


def telemetry(hub_dir: HubDir, device: str) -> list[tuple[int, str, float]]:
    return hub_query(hub_dir, "SELECT seq, metric, value FROM telemetry WHERE device = ? ORDER BY seq", device)


def events(hub_dir: HubDir, device: str) -> list[tuple[int, str, str]]:
    return hub_query(hub_dir, "SELECT seq, kind, body FROM events WHERE device = ? ORDER BY seq", device)


async def devices(hub_dir: HubDir) -> dict[str, dict[str, Any]]:
    code, out, err = await run_cli(HUB, "devices", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    return {row["device"]: row for row in map(json.loads, out.splitlines())}


async def wait_device_row(hub_dir: HubDir, device: str, what: str, check: Callable[[dict[str, Any]], bool],
                          timeout: float = SETTLE) -> dict[str, Any]:
    """Poll `edge-hub devices --json` until the device's row passes `check`."""
    deadline = time.monotonic() + timeout
    while True:
        row = (await devices(hub_dir))[device]
        if check(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; last row {row}")
        await asyncio.sleep(0.5)


def drained(hub_dir: HubDir, bundle: Path, at_least: int) -> bool:
    """The outbox took seq `at_least`, holds nothing, and the hub acknowledged all it sent.

    Not `acked >= last_seq` (exactly_once.wait_drained): readings shed at the very end of the
    outbox are covered by no batch, so the acknowledgment stops below last_seq until the
    device takes another reading.
    """
    state = outbox_state(bundle)
    return (state.last_seq >= at_least and state.rows == 0
            and hub_watermark(hub_dir.dir, bundle.name) >= state.acked > 0)


async def drain_quietly(hub_dir: HubDir, bundle: Path, *overrides: str) -> OutboxState:
    """Restart the (stopped) device with sensing paused, wait until the hub has everything
    and `edge-hub devices` says so (backlog 0, the outbox's dropped count), stop it cleanly."""
    before = outbox_state(bundle)
    agent = await start_agent(bundle / "agent.toml", *overrides, *STREAM, *QUIET, name=f"{bundle.name}-drain")
    try:
        # The paused sim sensor still reads once at start: the drain must include that reading.
        await wait_until(lambda: drained(hub_dir, bundle, before.last_seq + 1),
                         f"{bundle.name} drained", timeout=DRAIN_TIMEOUT, every=0.2, log=agent)
        state = outbox_state(bundle)
        row = await wait_device_row(
            hub_dir, bundle.name, f"{bundle.name}: backlog 0 and dropped {state.dropped} reported",
            lambda r: r["backlog"] == 0 and r["dropped"] == outbox_state(bundle).dropped,
        )
        assert await agent.stop() == 0, "\n".join(agent.lines[-30:])
    finally:
        await agent.stop()
    final = outbox_state(bundle)
    assert final.last_seq == state.last_seq, "the paused agent took readings after the drain"
    assert final.rows == 0
    assert row["dropped"] == final.dropped
    return final


async def start_streaming(hub_dir: HubDir, hub: Proc, bundle: Path) -> Proc:
    """`edge-agent run` at the STREAM rate, returned once the hub has it online and acknowledges it."""
    agent = await start_agent(bundle / "agent.toml", *STREAM, name=bundle.name)
    try:
        await hub.wait_for(rf"device {bundle.name} is online")
        await wait_until(lambda: hub_watermark(hub_dir.dir, bundle.name) > 0, f"{bundle.name} streaming")
    except BaseException:
        await agent.stop()
        raise
    return agent


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corrupt_outbox(bundle: Path) -> tuple[Path, str]:
    """Overwrite the device's outbox with garbage (creating it if need be); return (path, digest)."""
    state = bundle / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    path = state / "outbox.db"
    size = path.stat().st_size if path.exists() else 64 * 1024
    path.write_bytes(os.urandom(size))
    return path, digest(path)


def moved_aside(bundle: Path) -> list[Path]:
    return sorted(p for p in (bundle / "state").glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


# --- payloads -------------------------------------------------------------------------------


def batch(**fields: object) -> bytes:
    """A telemetry batch as msgpack: a valid one-reading batch with `fields` replaced or added."""
    message: dict[str, object] = {
        "base": 0, "last": 1, "settled": True, "names": ["x"],
        "seq": [1], "ts": [T0], "metric": [0], "value": [1.0], "events": [],
    }
    message.update(fields)
    return msgspec.msgpack.encode(message)


def too_many() -> bytes:
    """MAX_BATCH_RECORDS + 1 readings, under the payload limit (small ints pack in one byte)."""
    n = MAX_BATCH_RECORDS + 1
    payload = batch(last=n, seq=list(range(1, n + 1)), ts=[0] * n, metric=[0] * n, value=[0] * n)
    assert len(payload) < MAX_PAYLOAD_BYTES
    return payload


def only_event(ts: float, body: str = "{}") -> bytes:
    return batch(seq=[], ts=[], metric=[], value=[], events=[[1, ts, "decision", body]])


# (name, up/<kind>, payload, the reason the hub must count it under)
BAD_INPUT: list[tuple[str, str, bytes, str]] = [
    ("not_msgpack", TELEMETRY, b"\xc1\xc1\xc1", "undecodable"),
    ("truncated", TELEMETRY, batch()[:12], "undecodable"),
    ("empty", TELEMETRY, b"", "undecodable"),
    ("not_a_map", TELEMETRY, msgspec.msgpack.encode([1, 2, 3]), "invalid"),
    ("base_is_text", TELEMETRY, batch(base="zero"), "invalid"),
    ("value_is_text", TELEMETRY, batch(value=["1.0"]), "invalid"),
    ("lengths_differ", TELEMETRY, batch(ts=[T0, T0]), "invalid"),
    ("too_many_records", TELEMETRY, too_many(), "too_many"),
    # Over our limit, under the broker's max_packet_size: only the hub can refuse it.
    ("too_large", TELEMETRY, bytes(MAX_PAYLOAD_BYTES + 1024), "too_large"),
    ("negative_seq", TELEMETRY, batch(seq=[-1]), "invalid"),
    ("seq_2_pow_63", TELEMETRY, batch(seq=[2**63], last=MAX_SEQ), "invalid"),
    ("last_2_pow_63", TELEMETRY, batch(last=2**63), "invalid"),
    ("base_negative", TELEMETRY, batch(base=-1), "invalid"),
    ("nan_value", TELEMETRY, batch(value=[math.nan]), "not_finite"),
    ("inf_value", TELEMETRY, batch(value=[math.inf]), "not_finite"),
    ("minus_inf_ts", TELEMETRY, batch(ts=[-math.inf]), "not_finite"),
    ("nan_event_ts", TELEMETRY, only_event(math.nan), "not_finite"),
    ("last_equals_base", TELEMETRY, batch(base=5, last=5, seq=[5]), "bad_sequence"),
    ("last_below_base", TELEMETRY, batch(base=9, last=3, seq=[2]), "bad_sequence"),
    ("seq_above_last", TELEMETRY, batch(last=1, seq=[2]), "bad_sequence"),
    ("seq_at_base", TELEMETRY, batch(base=1, last=2, seq=[1]), "bad_sequence"),
    ("seq_repeats", TELEMETRY, batch(last=2, seq=[1, 1], ts=[T0, T0], metric=[0, 0], value=[1.0, 2.0]),
     "bad_sequence"),
    ("metric_index_out_of_range", TELEMETRY, batch(metric=[1]), "bad_metric"),
    ("metric_index_negative", TELEMETRY, batch(metric=[-1]), "invalid"),
    ("metric_name_not_allowed", TELEMETRY, batch(names=["a/b"]), "bad_metric"),
    ("status_negative_backlog", STATUS, msgspec.msgpack.encode({"backlog": -1, "dropped": 0}), "invalid"),
    # Nested past the interpreter's recursion limit (a few KB each): rejected, never a crash.
    ("nested_unknown_field", TELEMETRY, nested_msgpack({"base": 0, "last": 1}), "too_deep"),
    ("nested_status", STATUS, nested_msgpack({"backlog": 0, "dropped": 0}), "too_deep"),
    ("nested_coord", COORD, nested_msgpack({"type": "release", "id": "r1", "name": "fan"}), "too_deep"),
    ("nested_cert_request", CERT, nested_msgpack({"csr": "x"}), "too_deep"),
    ("nested_event_body", TELEMETRY, only_event(T0, BODY), "too_deep"),
    ("nested_approval_args", COORD, pack_coord(ApprovalRequest(id="a1", rule="r", action="command",
                                                               args=BODY[:2040], expires_s=60)), "too_deep"),
]


# --- bad input ------------------------------------------------------------------------------


async def test_bad_input_is_rejected_counted_and_stores_nothing_while_a_device_streams(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-good", "dev-bad")
    good = bundles / "dev-good"
    agent = await start_streaming(hub_dir, hub, good)
    try:
        session = await connect(device_identity(bundles / "dev-bad"), hub_dir.port, "dev-bad")
        try:
            for _, kind, payload, _ in BAD_INPUT:
                async with asyncio.timeout(ARRIVAL):
                    await session.publish(up_topic("dev-bad", kind), payload, qos=1)
            # A kind the hub does not define never reaches it: the broker's ACL refuses the publish.
            with pytest.raises(PublishRefused, match="Not authorized"):
                async with asyncio.timeout(ARRIVAL):
                    await session.publish(up_topic("dev-bad", "bogus"), batch(), qos=1)
        finally:
            await session.close()
        expected = dict(collections.Counter(reason for *_, reason in BAD_INPUT))
        await wait_until(lambda: all(rejects(hub_dir).get(r, 0) >= n for r, n in expected.items()),
                         f"the hub counted {expected}")
        assert rejects(hub_dir) == expected
        for reason in expected:  # the log is read through a pipe: it may trail the database a little
            await hub.wait_for(rf"rejected \({reason}, \d+ before\): edgefleet/v1/dev/dev-bad/", timeout=ARRIVAL)
        # Nothing of it was stored, and nothing moved for the sender.
        assert telemetry(hub_dir, "dev-bad") == []
        assert events(hub_dir, "dev-bad") == []
        assert hub_query(hub_dir, "SELECT count(*) FROM approvals") == [(0,)]
        assert hub_watermark(hub_dir.dir, "dev-bad") == 0
        row = (await devices(hub_dir))["dev-bad"]
        assert (row["backlog"], row["dropped"]) == (None, None)
        # The hub served the streaming device throughout, and still does.
        mark = hub_watermark(hub_dir.dir, "dev-good")
        await wait_until(lambda: hub_watermark(hub_dir.dir, "dev-good") > mark, "dev-good still acknowledged")
        assert hub.proc is not None
        assert hub.proc.returncode is None, "the hub died"
        assert await agent.stop() == 0
    finally:
        await agent.stop()
    final = await drain_quietly(hub_dir, good)
    assert_exactly_once(hub_dir.dir, "dev-good", final.last_seq, final.dropped)
    assert final.dropped == 0


async def test_a_batch_naming_another_device_is_stored_under_the_topics_device_only(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-good", "dev-bad")
    session = await connect(device_identity(bundles / "dev-bad"), hub_dir.port, "dev-bad")
    try:
        payload = batch(device="dev-good", device_id="dev-good", names=["spoof"], value=[4242.0])
        async with asyncio.timeout(ARRIVAL):
            await session.publish(up_topic("dev-bad", TELEMETRY), payload, qos=1)
    finally:
        await session.close()
    await wait_until(lambda: bool(telemetry(hub_dir, "dev-bad")), "the batch is stored")
    assert telemetry(hub_dir, "dev-bad") == [(1, "spoof", 4242.0)]
    assert telemetry(hub_dir, "dev-good") == []
    assert hub_query(hub_dir, "SELECT count(*) FROM telemetry WHERE metric = 'spoof'") == [(1,)]
    assert hub_watermark(hub_dir.dir, "dev-good") == 0
    assert rejects(hub_dir) == {}


async def test_publishing_on_another_devices_topics_is_refused_by_the_broker(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-good", "dev-bad")
    session = await connect(device_identity(bundles / "dev-bad"), hub_dir.port, "dev-bad")
    try:
        forged = [
            (up_topic("dev-good", TELEMETRY), batch(names=["spoof"], value=[4242.0])),
            (up_topic("dev-good", STATUS), msgspec.msgpack.encode({"backlog": 0, "dropped": 999})),
            (presence_topic("dev-good"), encode(Presence(state="online", session="forged"))),
        ]
        for topic, payload in forged:
            with pytest.raises(PublishRefused) as refused:
                async with asyncio.timeout(ARRIVAL):
                    await session.publish(topic, payload, qos=1)
            assert refused.value.code == NOT_AUTHORIZED, refused.value
        # Positive control on the same connection, after the refusals: its own topic works,
        # and the hub has processed everything this client sent before it.
        async with asyncio.timeout(ARRIVAL):
            await session.publish(up_topic("dev-bad", TELEMETRY), batch(names=["control"]), qos=1)
    finally:
        await session.close()
    await wait_until(lambda: bool(telemetry(hub_dir, "dev-bad")), "the control batch is stored")
    assert telemetry(hub_dir, "dev-good") == []
    assert events(hub_dir, "dev-good") == []
    row = (await devices(hub_dir))["dev-good"]
    assert (row["online"], row["backlog"], row["dropped"]) == (False, None, None)


@pytest.mark.parametrize("field", ["backlog", "dropped", "dropped_by_metric"])
async def test_a_status_with_counters_beyond_64_bits_is_rejected_and_the_hub_survives(
    hub_dir: HubDir, hub: Proc, bundles: Path, field: str,
) -> None:
    """msgpack carries unsigned 64-bit integers; SQLite's INTEGER is signed 64-bit."""
    await hub_dir.provision(bundles, "dev-bad")
    status: dict[str, object] = {"backlog": 0, "dropped": 0}
    status[field] = {"sig0": 2**64 - 1} if field == "dropped_by_metric" else 2**64 - 1
    session = await connect(device_identity(bundles / "dev-bad"), hub_dir.port, "dev-bad")
    try:
        async with asyncio.timeout(ARRIVAL):
            await session.publish(up_topic("dev-bad", STATUS), msgspec.msgpack.encode(status), qos=1)
            # A good batch behind it: the hub must still commit it.
            await session.publish(up_topic("dev-bad", TELEMETRY), batch(names=["control"]), qos=1)
    finally:
        await session.close()
    assert hub.proc is not None
    process = hub.proc
    await wait_until(lambda: process.returncode is not None
                     or (bool(telemetry(hub_dir, "dev-bad")) and bool(rejects(hub_dir))),
                     "the hub stores the good batch and counts the bad status (or dies)")
    if process.returncode is not None:
        async with asyncio.timeout(ARRIVAL):
            await process.wait()  # reaped before the fixture's teardown signals it
        pytest.fail("the hub died:\n" + "\n".join(hub.lines[-20:]))
    assert sum(rejects(hub_dir).values()) == 1
    assert telemetry(hub_dir, "dev-bad") == [(1, "control", 1.0)]


# --- quota ------------------------------------------------------------------------------------


async def test_a_full_quota_sheds_telemetry_and_the_hub_misses_exactly_the_dropped_count(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-q")
    bundle = bundles / "dev-q"
    aside, damaged = corrupt_outbox(bundle)  # its first record: an 'outbox_corrupt' event
    quota = "outbox.quota_mb=0.3"
    # Partitioned from the start: a broker port nothing listens on.
    agent = await start_agent(bundle / "agent.toml", *STREAM, "sim.rate_hz=500", quota,
                              f"broker.port={free_port()}", name="dev-q")
    try:
        await agent.wait_for(r"level=error .*outbox .* was corrupt")
        await wait_until(lambda: outbox_state(bundle).dropped >= 5000, "the outbox shed 5,000 readings", timeout=60)
        assert hub_watermark(hub_dir.dir, "dev-q") == 0
        assert await agent.stop() == 0
    finally:
        await agent.stop()
    partitioned = outbox_state(bundle)
    print(f"after the partition: {partitioned}")
    final = await drain_quietly(hub_dir, bundle, quota)
    assert final.dropped >= partitioned.dropped
    assert_exactly_once(hub_dir.dir, "dev-q", final.last_seq, final.dropped)
    # The event was never shed, even with the outbox over its quota for seconds.
    assert [(s, k) for s, k, _ in events(hub_dir, "dev-q")] == [(1, "outbox_corrupt")]
    drops = dict(hub_query(hub_dir, "SELECT metric, count FROM drops WHERE device = 'dev-q'"))
    assert sum(drops.values()) == final.dropped
    assert set(drops) <= {f"sig{i}" for i in range(4)}
    [moved] = moved_aside(bundle)
    assert digest(moved) == damaged
    assert aside.exists()  # a new outbox in its place


# --- a corrupt outbox at start-up ---------------------------------------------------------------


async def test_a_corrupt_outbox_at_start_up_is_moved_aside_and_reported_to_the_hub(
    hub_dir: HubDir, hub: Proc, bundles: Path,
) -> None:
    await hub_dir.provision(bundles, "dev-c")
    bundle = bundles / "dev-c"
    agent = await start_agent(bundle / "agent.toml", *STREAM, name="dev-c")
    try:
        await wait_until(lambda: hub_watermark(hub_dir.dir, "dev-c") > 100, "dev-c streaming")
        assert await agent.stop() == 0
    finally:
        await agent.stop()
    old = outbox_state(bundle)
    _, damaged = corrupt_outbox(bundle)

    agent = await start_agent(bundle / "agent.toml", *STREAM, name="dev-c")
    try:
        line = await agent.wait_for(r"outbox .* was corrupt")
        assert " level=error " in line
        await agent.wait_for(r"dev-c online")
        await wait_until(lambda: bool(events(hub_dir, "dev-c")), "the hub has the outbox_corrupt event")
        [(seq, kind, body)] = events(hub_dir, "dev-c")
        mark = hub_watermark(hub_dir.dir, "dev-c")
        await wait_until(lambda: hub_watermark(hub_dir.dir, "dev-c") > mark, "dev-c streams on")
        assert agent.proc is not None
        assert agent.proc.returncode is None
        assert await agent.stop() == 0
    finally:
        await agent.stop()
    [moved] = moved_aside(bundle)
    assert digest(moved) == damaged, "the corrupt outbox was changed; it is kept for inspection"
    assert kind == "outbox_corrupt"
    details = json.loads(body)
    assert details["moved_to"] == str(moved)
    assert seq > old.last_seq
    assert details["resumed_after_seq"] >= old.last_seq

    final = await drain_quietly(hub_dir, bundle)
    seqs = hub_seqs(hub_dir.dir, "dev-c")
    assert len(seqs) == len(set(seqs)), "duplicates at the hub"
    # Before: what the old outbox delivered (its unsent tail went with the file, as the event says).
    # After: every number from the event on, exactly once; nothing in between.
    assert all(s <= old.last_seq or s >= seq for s in seqs)
    assert [s for s in seqs if s >= seq] == list(range(seq, final.last_seq + 1))
    assert final.dropped == 0


# --- a failing sensor ----------------------------------------------------------------------------

THERMAL = Path("/sys/class/thermal")


def fake_thermal(root: Path, broken: bool) -> Path:
    """A sysfs thermal tree: one zone whose temperature cannot be parsed, or no zone at all."""
    root.mkdir()
    if broken:
        zone = root / "thermal_zone0"
        zone.mkdir()
        (zone / "type").write_text("cpu-thermal\n")
        (zone / "temp").write_text("N/A\n")  # as some drivers answer while the sensor is off
    root.chmod(0o755)
    return root


async def in_private_mounts(fake: Path, argv: list[str], name: str) -> Proc:
    """Run argv with `fake` mounted over /sys/class/thermal, in a mount namespace of its own."""
    script = 'mount --bind "$0" /sys/class/thermal && exec "$@"'
    return await Proc(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                             str(fake), *argv]).start()


async def can_fake_sysfs(probe: Path) -> bool:
    if not THERMAL.is_dir():
        return False
    probe.mkdir()
    try:
        code, _, _ = await run_cli("unshare", "--mount", "--propagation", "private", "sh", "-c",
                                   'mount --bind "$0" /sys/class/thermal', str(probe), timeout=10)
    except FileNotFoundError:
        return False
    return code == 0


@pytest.mark.parametrize("broken", [True, False], ids=["broken_zone", "no_zones"])
async def test_a_failing_sensor_does_not_stop_the_agent(
    hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path, broken: bool,
) -> None:
    if not await can_fake_sysfs(workdir / "probe"):
        pytest.skip("needs a private mount namespace (root with CAP_SYS_ADMIN) to give the agent a fake sysfs")
    await hub_dir.provision(bundles, "dev-t", profile="generic-linux")
    bundle = bundles / "dev-t"
    sensors = ('sensors=[{kind = "system", interval_s = 0.5, metrics = ["load1", "mem_used_percent"]}, '
               '{kind = "thermal", interval_s = 0.5}]')
    argv = [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "debug"]
    for override in (sensors, "report.default_deadband=0", "report.deadband={}", "uplink.status_interval=1"):
        argv += ["--set", override]
    agent = await in_private_mounts(fake_thermal(workdir / "thermal", broken), argv, "dev-t")
    try:
        await hub.wait_for(r"device dev-t is online")
        if broken:
            await agent.wait_for(r"sensor thermal failed again")
        await wait_until(lambda: sum(m == "load1" for _, m, _ in telemetry(hub_dir, "dev-t")) >= 6,
                         "six load1 readings at the hub")
        async with hub_tap(hub_dir, hub, [up_topic("dev-t", STATUS)]) as tap, asyncio.timeout(SETTLE):
            status = unpack((await tap.next_message()).payload, Status)
        assert agent.proc is not None
        assert agent.proc.returncode is None, "the agent stopped"
    finally:
        await agent.stop()
    metrics = {m for _, m, _ in telemetry(hub_dir, "dev-t")}
    assert metrics == {"load1", "mem_used_percent"}
    warnings = [line for line in agent.lines if "level=warning" in line and "sensor thermal failed" in line]
    if broken:
        assert status.sensor_failures["thermal"] >= 2
        assert len(warnings) == 1, warnings  # the first failure; repeats are DEBUG
        assert "no thermal zone could be read" in warnings[0]
    else:
        assert status.sensor_failures["thermal"] == 0
        assert warnings == []
    assert status.sensor_failures["system"] == 0
