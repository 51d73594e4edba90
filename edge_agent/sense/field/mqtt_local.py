"""Local MQTT: readings from a broker on the device or its LAN (Zigbee2MQTT, Tasmota, Shelly, ESPHome).

A connection of its own, apart from the hub's mutual-TLS uplink: plain TCP or TLS, with an
optional username and password. It is kept up by the same `Link` and backoff as the uplink.
Each topic filter maps JSON fields (dotted paths into nested objects) or the whole payload (a
plain number) to points; the timestamp comes from a payload field when one is named (seconds,
milliseconds or ISO-8601), else it is the time of arrival. A payload without the field, with a
value that is not a finite number, or larger than the bound is counted, logged once and skipped.
"""

from __future__ import annotations

import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec
from paho.mqtt.client import topic_matches_sub

from edge_agent.sense.sensors import Reading
from edgefleet.mqtt.link import Link
from edgefleet.mqtt.session import Message, MqttSession

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


Sink = Callable[[list[Reading]], None]


class LocalMqtt:
    """Subscribes to the topic filters of one sensor on one broker and hands readings to a sink."""

    def __init__(self, name: str, endpoint: Endpoint, topics: Sequence[TopicMap], *, qos: int = 0,
                 client_id: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self._endpoint = endpoint
        self._topics = list(topics)
        self._qos = qos
        self._client_id = client_id or f"edgefleet-{name}-{secrets.token_hex(4)}"
        self._clock = clock
        self.messages = 0
        self.skipped = 0
        self._warned: set[str] = set()
        self._sink: Sink | None = None
        self.link = Link(f"{name} (local MQTT {endpoint.host}:{endpoint.port})", self.session, self._work, logger=log)

    def session(self) -> MqttSession:
        e = self._endpoint
        return MqttSession(
            client_id=self._client_id, host=e.host, port=e.port, tls=e.tls, username=e.username,
            password=e.password, keepalive=KEEPALIVE_S, connect_timeout=CONNECT_TIMEOUT_S,
            # Headroom over the payload bound for the topic and properties: larger never arrives.
            max_packet=MAX_PAYLOAD_BYTES + 4096,
        )

    async def run(self, sink: Sink) -> None:
        """Connect, subscribe, read; reconnect with backoff; until cancelled."""
        self._sink = sink
        await self.link.run()

    async def _work(self, session: MqttSession) -> None:
        assert self._sink is not None  # set by run(), the only caller of the link
        await session.subscribe([(t.filter, self._qos) for t in self._topics])
        log.info("%s: subscribed to %s", self.name, ", ".join(t.filter for t in self._topics))
        while True:
            self.handle(await session.next_message(), self._sink)

    def handle(self, message: Message, sink: Sink) -> None:
        self.messages += 1
        now = self._clock()
        readings: list[Reading] = []
        for mapping in self._topics:
            if not topic_matches_sub(mapping.filter, message.topic):
                continue
            points, problems = decode(mapping, message.payload, now)
            readings.extend(Reading(f"{self.name}.{point}", ts, value) for point, ts, value in points)
            for problem in problems:
                self._skip(message.topic, problem)
        if readings:
            sink(readings)

    def _skip(self, topic: str, why: str) -> None:
        self.skipped += 1
        key = why.split(":", 1)[0]
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, "%s: skipped a value from %s (%d so far): %s", self.name, topic, self.skipped, why)
