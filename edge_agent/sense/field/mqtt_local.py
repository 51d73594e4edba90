"""Local MQTT: readings from a broker on the device or its LAN (Zigbee2MQTT, Tasmota, Shelly, ESPHome).

A connection of its own, apart from the hub's mutual-TLS uplink: plain TCP or TLS, with an
optional username and password. It is kept up by the same `Link` and backoff as the uplink.
Each topic filter maps JSON fields (dotted paths into nested objects) or the whole payload (a
plain number) to points; the timestamp comes from a payload field when one is named (seconds,
milliseconds or ISO-8601), else it is the time of arrival. A payload without the field, with a
value that is not a finite number, or larger than the bound is a rejected value (counted, logged
once per reason by the sensor's health); a lost connection is a failed poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import msgspec
from paho.mqtt.client import topic_matches_sub

from edge_agent.sense.field.base import FieldContext, FieldSensor, SensorHealth
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.errors import ConnectionLost, ConnectRefused, TransientError
from edgefleet.mqtt.link import Link
from edgefleet.mqtt.session import Message, MqttSession
from edgefleet.policy.field import MqttSensorSpec

log = logging.getLogger("edge_agent.sense.mqtt_local")

# Zigbee2MQTT's largest messages (a device list) are a few KiB; a reading set never needs more.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
# Epoch numbers above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
MS_THRESHOLD: Final = 1e11
KEEPALIVE_S: Final = 30  # a dead LAN broker is noticed within about 1.5 keepalives
CONNECT_TIMEOUT_S: Final = 10.0
TsUnit = Literal["auto", "s", "ms", "iso"]
WHOLE_PAYLOAD: Final = ""  # a point whose path is empty reads the payload as one number


class BadPayload(ValueError):
    """A message that did not give a point its value; the message says why."""


@dataclass(frozen=True, slots=True)
class TopicMap:
    """One topic filter and what its payloads mean: point -> dotted path ("" = the payload)."""

    filter: str
    points: Mapping[str, str]
    ts_field: str | None = None
    ts_unit: TsUnit = "auto"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line


# --- decoding (no I/O) ---------------------------------------------------------------------------


def _dig(data: object, path: str) -> object:
    for key in path.split("."):
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            raise BadPayload(f"no field {path!r}")
    return data


def _value(raw: object, what: str) -> float:
    # A contact or occupancy sensor reports true/false: a reading of 1 or 0.
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise BadPayload(f"{what} is {raw[:40]!r}, not a number") from None
    else:
        raise BadPayload(f"{what} is {type(raw).__name__}, not a number")
    if not math.isfinite(value):
        raise BadPayload(f"{what} is {raw}, not a finite number")
    return value


def _timestamp(raw: object, unit: TsUnit) -> float:
    if isinstance(raw, str) and unit in ("auto", "iso"):
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise BadPayload(f"timestamp {raw[:40]!r} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)  # a zone-less time is taken as UTC
        return parsed.timestamp()
    number = _value(raw, "the timestamp")
    if unit == "ms" or (unit == "auto" and number > MS_THRESHOLD):
        number /= 1000.0
    if number <= 0:
        raise BadPayload(f"timestamp {raw!r} is not after 1970")
    return number


def decode(mapping: TopicMap, payload: bytes, now: float) -> tuple[list[tuple[str, float, float]], list[str]]:
    """(point, ts, value) for every point the payload gives, and why each other point was skipped."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return [], [f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte bound"]
    needs_json = mapping.ts_field is not None or any(path != WHOLE_PAYLOAD for path in mapping.points.values())
    data: object = None
    if needs_json:
        try:
            data = msgspec.json.decode(payload)
        except msgspec.DecodeError as exc:
            if any(path != WHOLE_PAYLOAD for path in mapping.points.values()):
                return [], [f"payload is not JSON: {exc}"]
            data = None
    ts = now
    if mapping.ts_field is not None:
        try:
            ts = _timestamp(_dig(data, mapping.ts_field), mapping.ts_unit)
        except BadPayload as exc:
            return [], [f"timestamp: {exc}"]
    out: list[tuple[str, float, float]] = []
    problems: list[str] = []
    for point, path in mapping.points.items():
        try:
            if path == WHOLE_PAYLOAD:
                raw: object = payload.decode("utf-8", "replace").strip()
            else:
                raw = _dig(data, path)
            out.append((point, ts, _value(raw, repr(path) if path else "the payload")))
        except BadPayload as exc:
            problems.append(f"{point}: {exc}")
    return out, problems


# --- the connection ------------------------------------------------------------------------------

# How long a probe waits for a first message after subscribing: many devices publish only on change.
PROBE_LISTEN_S: Final = 5.0


class LocalMqtt:
    """Subscribes to the topic filters of one sensor on one broker and hands readings to `emit`."""

    kind = "mqtt"

    def __init__(self, name: str, endpoint: Endpoint, topics: Sequence[TopicMap], *, qos: int = 0,
                 client_id: str | None = None, clock: Callable[[], float] = time.time,
                 password_file: Path | None = None) -> None:
        self.name = name
        self._endpoint = endpoint
        self._topics = list(topics)
        self._qos = qos
        self._client_id = client_id or f"edgefleet-{name}-{secrets.token_hex(4)}"
        self._clock = clock
        self._password_file = password_file
        self.messages = 0
        self._health: SensorHealth | None = None
        self._emit: Sink | None = None
        self.link = Link(f"{name} (local MQTT {endpoint.host}:{endpoint.port})", self.session, self._work,
                         logger=log, on_lost=self._lost)

    def session(self) -> MqttSession:
        e = self._endpoint
        password = e.password
        if self._password_file is not None:
            try:  # read at every connection: a rotated password is picked up without a restart
                password = self._password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConnectRefused(f"cannot read the password file {self._password_file}: "
                                     f"{exc.strerror or exc}", auth=True) from None
        return MqttSession(
            client_id=self._client_id, host=e.host, port=e.port, tls=e.tls, username=e.username,
            password=password, keepalive=KEEPALIVE_S, connect_timeout=CONNECT_TIMEOUT_S,
            # Headroom over the payload bound for the topic and properties: larger never arrives.
            max_packet=MAX_PAYLOAD_BYTES + 4096,
        )

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        """Connect, subscribe, read; reconnect with backoff; until cancelled."""
        self._health, self._emit = health, emit
        await self.link.run()

    def _lost(self, why: str) -> None:
        if self._health is not None:
            self._health.failed(f"local broker {self._endpoint.host}:{self._endpoint.port}: {why}")

    async def _work(self, session: MqttSession) -> None:
        assert self._health is not None  # set by run(), the only caller of the link
        assert self._emit is not None
        await session.subscribe([(t.filter, self._qos) for t in self._topics])
        log.info("%s: subscribed to %s", self.name, ", ".join(t.filter for t in self._topics))
        while True:
            self.handle(await session.next_message(), self._health, self._emit)

    def handle(self, message: Message, health: SensorHealth, emit: Sink) -> None:
        self.messages += 1
        now = self._clock()
        readings: list[Reading] = []
        for mapping in self._topics:
            if not topic_matches_sub(mapping.filter, message.topic):
                continue
            points, problems = decode(mapping, message.payload, now)
            readings.extend(Reading(f"{self.name}.{point}", ts, value) for point, ts, value in points)
            for problem in problems:
                health.reject(f"{message.topic}: {problem}")
        if readings:
            emit(readings)
            health.ok()

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish on this sensor's connection (the mqtt_publish actuator); ConnectionLost when it is down."""
        session = self.link.session
        if session is None or not session.is_connected:
            raise ConnectionLost(f"not connected to the local broker {self._endpoint.host}:{self._endpoint.port}"
                                 + (f" ({self.link.last_error})" if self.link.last_error else ""))
        await session.publish(topic, payload, qos=qos, retain=retain)

    async def probe(self) -> list[Reading]:
        """Connect and subscribe (or say why not), then listen briefly for a first message."""
        session = self.session()
        try:
            await session.connect()
            await session.subscribe([(t.filter, self._qos) for t in self._topics])
            health = SensorHealth(self.name, self.kind, lambda kind, body: None)
            readings: list[Reading] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_LISTEN_S):
                    while not readings:
                        self.handle(await session.next_message(), health, readings.extend)
            return readings
        except TransientError as exc:
            raise SensorError(f"local broker {self._endpoint.host}:{self._endpoint.port}: {exc}") from None
        finally:
            await session.close()


def build(specs: Sequence[MqttSensorSpec], context: FieldContext) -> list[FieldSensor]:
    sensors: list[FieldSensor] = []
    for spec in specs:
        tls = None
        if spec.tls:
            tls = ssl.create_default_context(cafile=spec.ca)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
        endpoint = Endpoint(spec.host, spec.port, tls, spec.username)
        topics = [TopicMap(t.topic, dict(t.points), t.ts_field, t.ts_unit) for t in spec.topics]
        sensors.append(LocalMqtt(spec.name, endpoint, topics, qos=spec.qos, clock=context.clock,
                                 password_file=Path(spec.password_file) if spec.password_file else None))
    return sensors
