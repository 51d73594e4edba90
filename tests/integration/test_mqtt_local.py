"""Local MQTT sensors against a real Mosquitto on loopback (plain TCP, as on a device's LAN)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from edge_agent.decide.actuators import Actuators
from edge_agent.sense.field.base import FieldContext, SensorHealth
from edge_agent.sense.field.mqtt_local import Endpoint, LocalMqtt, TopicMap, build
from edge_agent.sense.sensors import Reading, SensorError
from edgefleet.policy.field import MqttSensorSpec, MqttTopicSpec
from edgefleet.policy.profiles import ActuatorSpec
from tests.support.field import WAIT_S, Collected, wait_until
from tests.support.local_broker import LocalBroker, local_broker, tls_files

NOW = 1_700_000_000.0


def health_of(sensor: LocalMqtt) -> SensorHealth:
    return SensorHealth(sensor.name, sensor.kind, lambda kind, body: None)


@asynccontextmanager
async def subscribed(sensor: LocalMqtt, sink: Collected, health: SensorHealth | None = None) -> AsyncIterator[None]:
    task = asyncio.create_task(sensor.run(health or health_of(sensor), sink))
    try:
        async with asyncio.timeout(WAIT_S):
            await sensor.link.connected.wait()
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def _subscribed_now(broker: LocalBroker, sink: Collected, topic: str) -> None:
    """A retained marker reaches the sensor once its subscription is live (the broker is the test's own)."""
    before = len(sink.readings)  # counted first: the marker may arrive before publish() returns
    await broker.publish(topic, "0", retain=True)
    await sink.until(before + 1)


ZIGBEE = TopicMap("zigbee2mqtt/+", {"temperature": "temperature", "humidity": "humidity"}, "last_seen", "ms")
POWER = TopicMap("shellies/plug/relay/0/power", {"power": ""})
READY = TopicMap("ready", {"ready": ""})


async def test_json_fields_and_plain_numbers_arrive_bad_payloads_are_counted(workdir: Path) -> None:
    async with local_broker(workdir / "lan") as broker:
        sink = Collected()
        sensor = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port), [ZIGBEE, POWER, READY], clock=lambda: NOW)
        health = health_of(sensor)
        async with subscribed(sensor, sink, health):
            await _subscribed_now(broker, sink, "ready")
            sink.readings.clear()
            await broker.publish("zigbee2mqtt/kitchen",
                                 '{"temperature": 21.5, "humidity": 40, "last_seen": 1700000005000}')
            await broker.publish("zigbee2mqtt/kitchen", '{"humidity": "n/a", "last_seen": 1700000006000}')
            await broker.publish("shellies/plug/relay/0/power", "NaN")
            await broker.publish("shellies/plug/relay/0/power", "230.5")
            readings = await sink.until(3)
    assert readings == [
        Reading("zb.temperature", 1700000005.0, 21.5),
        Reading("zb.humidity", 1700000005.0, 40.0),
        Reading("zb.power", NOW, 230.5),
    ]
    assert health.rejected == 3  # temperature missing, humidity "n/a", power NaN


async def test_username_and_password(workdir: Path) -> None:
    async with local_broker(workdir / "lan", users={"agent": "s3cret", "z2m": "pw"}) as broker:
        sink = Collected()
        secret = workdir / "zb.password"
        secret.write_text("s3cret\n")  # read at each connection, the newline dropped
        sensor = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port, username="agent"), [POWER], password_file=secret)
        async with subscribed(sensor, sink):
            await broker.publish(POWER.filter, "1.5", retain=True, username="z2m", password="pw")
            assert [r.value for r in await sink.until(1)] == [1.5]
        refused = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port, username="agent", password="wrong"), [POWER])
        health = health_of(refused)
        task = asyncio.create_task(refused.run(health, Collected()))
        try:
            await wait_until(lambda: bool(refused.link.last_error), "the broker refuses the password")
        finally:
            task.cancel()
            await asyncio.wait([task])
        assert "refused" in refused.link.last_error
        assert "wrong" not in refused.link.last_error
        assert health.state == "failing"
        assert "not authorized" in health.last_error.lower() or "bad user name" in health.last_error.lower()


async def test_the_broker_restarts_and_readings_resume_without_restarting_the_sensor(workdir: Path) -> None:
    async with local_broker(workdir / "lan") as broker:
        sink = Collected()
        sensor = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port), [POWER, READY])
        health = health_of(sensor)
        async with subscribed(sensor, sink, health):
            await _subscribed_now(broker, sink, "ready")
            await broker.publish(POWER.filter, "1")
            await sink.until(2)
            await broker.stop()
            await broker.start()
            await wait_until(lambda: health.state == "failing", "the sensor reports the broker gone")
            await wait_until(lambda: sensor.link.connections >= 2, "the sensor reconnects")
            await _subscribed_now(broker, sink, "ready")
            await broker.publish(POWER.filter, "2")
            readings = await sink.until(4)
    assert [r.value for r in readings if r.metric == "zb.power"] == [1.0, 2.0]
    assert health.state == "ok"


async def test_probe_says_whether_the_broker_is_there(workdir: Path) -> None:
    async with local_broker(workdir / "lan") as broker:
        await broker.publish(POWER.filter, "42", retain=True)
        sensor = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port), [POWER])
        assert [(r.metric, r.value) for r in await sensor.probe()] == [("zb.power", 42.0)]
        port = broker.port
    with pytest.raises(SensorError, match=f"local broker 127.0.0.1:{port}: cannot reach"):
        await LocalMqtt("zb", Endpoint("127.0.0.1", port), [POWER]).probe()


async def test_mqtt_publish_actuator_reaches_the_lan_broker_and_fails_cleanly_when_it_is_gone(
    workdir: Path,
) -> None:
    spec = ActuatorSpec(allowed=["mqtt_publish"], mqtt_topics=["zigbee2mqtt/pump/set"])
    async with local_broker(workdir / "lan") as broker:
        sensor = LocalMqtt("zb", Endpoint("127.0.0.1", broker.port), [READY])
        watcher = LocalMqtt("watch", Endpoint("127.0.0.1", broker.port),
                            [TopicMap("zigbee2mqtt/pump/set", {"on": ""}), READY])
        actuators = Actuators(spec, mqtt={"zb": sensor})
        seen = Collected()
        async with subscribed(sensor, Collected()), subscribed(watcher, seen):
            await _subscribed_now(broker, seen, "ready")
            seen.readings.clear()
            result = await actuators.run("mqtt_publish", {"sensor": "zb", "topic": "zigbee2mqtt/pump/set",
                                                          "payload": "1"}, timeout=5.0)
            assert result.ok, result.detail
            assert result.detail == "published 1 bytes to zigbee2mqtt/pump/set on zb's broker."
            assert [(r.metric, r.value) for r in await seen.until(1)] == [("watch.on", 1.0)]
            await broker.stop()
            await wait_until(lambda: not sensor.link.connected.is_set(), "the sensor notices the broker is gone")
            failed = await actuators.run("mqtt_publish", {"sensor": "zb", "topic": "zigbee2mqtt/pump/set",
                                                          "payload": "0"}, timeout=5.0)
    assert not failed.ok
    assert "not connected to the local broker" in failed.detail


async def test_tls_to_the_lan_broker_checked_against_the_given_ca(workdir: Path) -> None:
    async with local_broker(workdir / "lan", tls=True) as broker:
        spec = MqttSensorSpec(name="zb", port=broker.port, tls=True, ca=str(workdir / "lan" / "lan-ca.crt"),
                              topics=[MqttTopicSpec(topic="ready", points={"ready": ""})])
        [sensor] = build([spec], FieldContext())
        assert isinstance(sensor, LocalMqtt)
        [publisher] = build([msgspec.structs.replace(spec, name="pub")], FieldContext())
        assert isinstance(publisher, LocalMqtt)
        await _publish_retained(publisher, "ready", b"0")  # mosquitto_pub would need the CA too
        assert [(r.metric, r.value) for r in await sensor.probe()] == [("zb.ready", 0.0)]
        other_ca, _, _ = tls_files(workdir, "other")
        wrong = MqttSensorSpec(name="zb", port=broker.port, tls=True, ca=str(other_ca),
                               topics=[MqttTopicSpec(topic="ready", points={"ready": ""})])
        [refused] = build([wrong], FieldContext())
        with pytest.raises(SensorError, match=f"local broker 127.0.0.1:{broker.port}: TLS: self-signed certificate"):
            await refused.probe()


async def _publish_retained(publisher: LocalMqtt, topic: str, payload: bytes) -> None:
    task = asyncio.create_task(publisher.run(health_of(publisher), Collected()))
    try:
        async with asyncio.timeout(WAIT_S):
            await publisher.link.connected.wait()
        await publisher.publish(topic, payload, qos=1, retain=True)
    finally:
        task.cancel()
        await asyncio.wait([task])
