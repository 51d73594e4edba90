"""What a local MQTT payload means: JSON fields by dotted path, plain numbers, timestamps."""

from __future__ import annotations

import pytest

from edge_agent.sense.field.mqtt_local import MAX_PAYLOAD_BYTES, TopicMap, decode

NOW = 1_700_000_000.0
Z2M = b'{"temperature": 21.3, "humidity": 48, "battery": 97, "occupancy": true, "update": {"state": "idle"},' \
      b' "last_seen": "2024-01-02T03:04:05.500Z", "readings": [1.5, 2.5], "power": null}'


def test_dotted_paths_booleans_and_list_indexes() -> None:
    mapping = TopicMap("zigbee2mqtt/+", {"t": "temperature", "h": "humidity", "occ": "occupancy", "r1": "readings.1"})
    points, problems = decode(mapping, Z2M, NOW)
    assert points == [("t", NOW, 21.3), ("h", NOW, 48.0), ("occ", NOW, 1.0), ("r1", NOW, 2.5)]
    assert problems == []


def test_missing_and_non_numeric_fields_are_skipped_with_the_reason_others_kept() -> None:
    mapping = TopicMap("x", {"t": "temperature", "gone": "pressure", "state": "update.state", "p": "power"})
    points, problems = decode(mapping, Z2M, NOW)
    assert points == [("t", NOW, 21.3)]
    assert problems == [
        "gone: no field 'pressure'",
        "state: 'update.state' is 'idle', not a number",
        "p: 'power' is NoneType, not a number",
    ]


@pytest.mark.parametrize(("payload", "value"), [(b"230.5", 230.5), (b" 12\n", 12.0), (b"-3e2", -300.0)])
def test_plain_number_payload(payload: bytes, value: float) -> None:
    assert decode(TopicMap("shellies/plug/relay/0/power", {"power": ""}), payload, NOW) == ([("power", NOW, value)], [])


@pytest.mark.parametrize("payload", [b"nan", b"inf", b"ON", b""])
def test_plain_payload_that_is_not_a_finite_number(payload: bytes) -> None:
    points, problems = decode(TopicMap("t", {"v": ""}), payload, NOW)
    assert points == []
    assert len(problems) == 1
    assert "number" in problems[0]


def test_nan_in_json_is_refused() -> None:
    points, problems = decode(TopicMap("t", {"v": "v"}), b'{"v": "NaN"}', NOW)
    assert points == []
    assert problems == ["v: 'v' is NaN, not a finite number"]


@pytest.mark.parametrize(("field", "unit", "payload", "ts"), [
    ("last_seen", "auto", Z2M, 1704164645.5),
    ("last_seen", "iso", Z2M, 1704164645.5),
    ("time", "auto", b'{"v": 1, "time": "2024-01-02T03:04:05"}', 1704164645.0),  # no zone: UTC
    ("time", "auto", b'{"v": 1, "time": 1700000001}', 1700000001.0),
    ("time", "auto", b'{"v": 1, "time": 1700000001500}', 1700000001.5),
    ("time", "ms", b'{"v": 1, "time": 1700000001500}', 1700000001.5),
    ("time", "s", b'{"v": 1, "time": 1700000001.25}', 1700000001.25),
    ("meta.ts", "s", b'{"v": 1, "meta": {"ts": 1700000002}}', 1700000002.0),
])
def test_timestamp_from_the_payload(field: str, unit: str, payload: bytes, ts: float) -> None:
    mapping = TopicMap("t", {"v": "temperature" if payload is Z2M else "v"}, field, unit)  # type: ignore[arg-type]
    points, problems = decode(mapping, payload, NOW)
    assert problems == []
    assert points[0][1] == pytest.approx(ts)


def test_a_bad_timestamp_skips_the_message() -> None:
    points, problems = decode(TopicMap("t", {"v": "v"}, "time"), b'{"v": 1, "time": "yesterday"}', NOW)
    assert points == []
    assert problems == ["timestamp: timestamp 'yesterday' is not ISO-8601"]
    assert decode(TopicMap("t", {"v": "v"}, "time"), b'{"v": 1}', NOW)[1] == ["timestamp: no field 'time'"]


def test_not_json_and_oversized_payloads() -> None:
    assert decode(TopicMap("t", {"v": "v"}), b"{oops", NOW)[1][0].startswith("payload is not JSON")
    big = b'{"v": 1, "pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    assert decode(TopicMap("t", {"v": "v"}), big, NOW) == (
        [], [f"payload of {len(big)} bytes is over the {MAX_PAYLOAD_BYTES}-byte bound"])
