"""Hostile input without a broker: nested payloads on every decoder, nested JSON in stored
bodies, and (device, seq) kept one record across readings and events.

The store is a real SQLite file; only the MQTT transport is left out (messages are handed to
the ingest as the session would hand them).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge_agent.buffer.outbox import Outbox
from edgefleet.mqtt.session import Message
from edgefleet.policy.document import PolicyError, validate_policy
from edgefleet.wire.envelope import SignedEnvelope
from edgefleet.wire.protocol import (
    MAX_JSON_DEPTH,
    Ack,
    ApprovalRequest,
    Batch,
    CertRequest,
    CoordUp,
    EventRecord,
    LeaseRequest,
    PolicyDocument,
    Presence,
    ProtocolError,
    Status,
    TaskOffer,
    check_batch,
    decode,
    encode,
    json_body,
    json_too_deep,
    pack,
    pack_coord,
    presence_topic,
    unpack,
    unpack_cert_reply,
    unpack_down,
    unpack_up,
    up_topic,
)
from hub.config import load_hub
from hub.db.store import HubStore, IngestWork, event_row
from hub.ingest import batches as hub_ingest
from hub.ingest.batches import Ingest
from hub.pki.init import init_hub
from hub.region.coordination import Replies
from hub.service import HubService
from tests.support.hostile import BODY, DEEP, nested_json, nested_msgpack
from tests.support.net import free_port

DECODERS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("presence", lambda b: decode(b, Presence), nested_json({"state": "online", "session": "s"})),
    ("batch", lambda b: unpack(b, Batch), nested_msgpack({"base": 0, "last": 1})),
    ("status", lambda b: unpack(b, Status), nested_msgpack({"backlog": 0, "dropped": 0})),
    ("cert_request", lambda b: unpack(b, CertRequest), nested_msgpack({"csr": "x"})),
    ("coord_up", unpack_up, nested_msgpack({"type": "release", "id": "r1", "name": "l"})),
    ("ack", lambda b: unpack(b, Ack), nested_msgpack({"through": 1})),
    ("envelope", lambda b: unpack(b, SignedEnvelope),
     nested_msgpack({"key_id": "k", "payload": b"", "signature": b""})),
    ("policy", lambda b: unpack(b, PolicyDocument), nested_msgpack({"version": 1, "device": "d", "profile": "sim"})),
    ("coord_down", unpack_down, nested_msgpack({"type": "queued", "id": "r1", "name": "l", "position": 1})),
    ("cert_reply", unpack_cert_reply, nested_msgpack({"type": "refused", "key_id": "", "reason": "x"})),
]


@pytest.mark.parametrize(("name", "decoder", "payload"), DECODERS, ids=[d[0] for d in DECODERS])
def test_a_deeply_nested_payload_is_a_protocol_error_on_every_decoder(
        name: str, decoder: Callable[[bytes], object], payload: bytes) -> None:
    assert len(payload) < 12_000
    with pytest.raises(ProtocolError) as refused:
        decoder(payload)
    assert refused.value.reason == "too_deep", refused.value


def test_nesting_the_decoders_can_read_is_still_accepted() -> None:
    assert unpack(nested_msgpack({"base": 0, "last": 1}, depth=50), Batch) == Batch(base=0, last=1)
    assert decode(nested_json({"state": "online", "session": "s"}, depth=50), Presence).session == "s"


def test_json_args_a_reader_would_parse_are_bounded_both_ways() -> None:
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    up = ApprovalRequest(id="a1", rule="r", action="command", args=deep, expires_s=60)
    down = TaskOffer(task=1, kind="record", args=deep, bid_by=0.0)
    for unpacker, message in ((unpack_up, up), (unpack_down, down)):
        with pytest.raises(ProtocolError) as refused:
            unpacker(pack_coord(message))  # type: ignore[operator]  # one of the two unpackers
        assert refused.value.reason == "too_deep"
    fine = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert unpack_up(pack_coord(msgspec.structs.replace(up, args=fine))) == msgspec.structs.replace(up, args=fine)


def test_a_batch_whose_event_body_nests_too_deep_is_refused() -> None:
    def batch(body: str) -> Batch:
        return Batch(base=0, last=1, events=[EventRecord(1, 1.0, "alert", body)])

    with pytest.raises(ProtocolError) as refused:
        check_batch(unpack(pack(batch(BODY)), Batch))
    assert refused.value.reason == "too_deep"
    # Brackets inside strings are text, not nesting; the limit itself is fine.
    assert check_batch(batch(json.dumps({"output": "[" * DEEP}))) == 1
    assert check_batch(batch("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)) == 1


@pytest.mark.parametrize("text", [
    "[" * (MAX_JSON_DEPTH + 1),  # unterminated
    '{"a": "x\\"", "b": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}",  # an escaped quote first
    '{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1),
])
def test_json_nesting_is_measured_as_a_parser_would(text: str) -> None:
    assert json_too_deep(text)


def test_a_stored_body_of_any_shape_is_shown_as_an_object() -> None:
    unreadable = event_row("d", 1, 1.0, "alert", BODY)
    assert unreadable.body["unreadable"] == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    assert unreadable.body["text"].startswith("[[[")
    assert len(msgspec.json.encode(unreadable)) < 400  # shown, not dumped whole
    assert json_body("not json") == {"text": "not json"}
    assert json_body("[1]") == {"text": "[1]"}
    assert event_row("d", 1, 1.0, "alert", '{"rule": "r", "x": 1}').body == {"x": 1}


def test_a_policy_nested_beyond_what_can_be_read_is_a_policy_error() -> None:
    for text in ("a = " + "[" * DEEP + "]" * DEEP, "a = " + "{b=" * 3000 + "1" + "}" * 3000):
        with pytest.raises(PolicyError) as refused:
            validate_policy(text, metrics=None, actuators_allowed=None)
        assert "nested beyond what can be read" in str(refused.value)


async def test_the_agent_never_stores_an_event_body_the_hub_would_refuse(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path, quota_bytes=10_000_000)
    try:
        nested: Any = "leaf"
        for _ in range(MAX_JSON_DEPTH + 5):
            nested = {"v": nested}
        await outbox.add_event("record", {"values": nested})
    finally:
        await outbox.close()
    with sqlite3.connect(tmp_path / "outbox.db") as db:
        (body,) = db.execute("SELECT body FROM records WHERE body IS NOT NULL").fetchone()
    assert not json_too_deep(body)
    assert json.loads(body)["truncated"] is True


# --- the hub's ingest ---------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    s = await HubStore.open(tmp_path / "hub.db")
    try:
        await s.register("dev-a", "sim", {})
        yield s
    finally:
        await s.close()


def message(kind: str, payload: bytes, mid: int = 1) -> Message:
    return Message(topic=up_topic("dev-a", kind), payload=payload, qos=1, retain=False, mid=mid)


def readings(base: int, seqs: list[int], events: list[EventRecord] | None = None, last: int | None = None) -> bytes:
    n = len(seqs)
    return pack(Batch(base=base, last=last or max(seqs, default=base + 1), settled=True, names=["m"], seq=seqs,
                      ts=[1.0] * n, metric=[0] * n, value=[float(s) for s in seqs], events=events or []))


async def rows(store: HubStore, table: str) -> list[int]:
    return [r[0] for r in await store.query(f"SELECT seq FROM {table} WHERE device = 'dev-a' ORDER BY seq")]


async def test_a_defect_one_message_triggers_rejects_that_message_only(
        store: HubStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours (here: check_batch failing on one batch) costs that message, not the hub."""
    real = hub_ingest.check_batch

    def broken_on_seq_2(batch: Batch) -> int:
        if 2 in batch.seq:
            raise KeyError("a defect")
        return real(batch)

    monkeypatch.setattr(hub_ingest, "check_batch", broken_on_seq_2)
    ingest = Ingest(store, "hub.test")
    result = await ingest.process([message("telemetry", readings(0, [1])),
                                   message("telemetry", readings(1, [2]), 2),
                                   message("telemetry", readings(2, [3]), 3)])
    assert await rows(store, "telemetry") == [1, 3]
    assert result.stored == 2
    assert await store.reject_counts() == {"internal_error": 1}
    assert ingest.rejects == {"internal_error": 1}
    (logged,) = [r for r in caplog.records if r.name == "hub.ingest"]
    assert logged.levelname == "ERROR"
    assert logged.exc_info is not None  # the traceback, to find the defect by
    assert "rejected (internal_error, 0 before): edgefleet/v1/dev/dev-a/up/telemetry" in logged.getMessage()


async def test_a_reading_cannot_reuse_a_seq_stored_as_an_event_nor_the_reverse(store: HubStore) -> None:
    ingest = Ingest(store, "hub.test")
    first = await ingest.process([message("telemetry", readings(0, [1, 3], [EventRecord(2, 1.0, "alert", "{}")]))])
    assert first.acks == {"dev-a": 3}
    # Later batches (a reset outbox, a clone) reuse 2 as a reading and 3 as an event.
    event_3 = readings(2, [], [EventRecord(3, 1.0, "alert", "{}")], last=3)
    again = await ingest.process([message("telemetry", readings(1, [2], last=2)), message("telemetry", event_3, 2)])
    assert await rows(store, "telemetry") == [1, 3]
    assert await rows(store, "events") == [2]
    assert again.stored == 0
    assert again.acks == {"dev-a": 3}  # each seq has its one record here: the watermark holds
    assert await store.reject_counts() == {"seq_conflict": 2}
    # A plain resend of the first batch is a duplicate, not a conflict.
    await ingest.process([message("telemetry", readings(0, [1, 3], [EventRecord(2, 1.0, "alert", "{}")]))])
    assert await store.reject_counts() == {"seq_conflict": 2}


async def test_one_cycle_cannot_store_a_reading_and_an_event_with_one_seq(store: HubStore) -> None:
    await store.commit_ingest(IngestWork(
        now=1.0, telemetry=[("dev-a", 5, 1.0, "m", 1.0)], events=[("dev-a", 5, 1.0, "alert", "{}")],
        ranges={"dev-a": [(0, 5, True)]}))
    assert await rows(store, "telemetry") == [5]
    assert await rows(store, "events") == []
    assert await store.reject_counts() == {"seq_conflict": 1}


# --- the hub service's later steps: coordination, certificates, presence ------------------------


async def test_a_defect_in_a_later_step_costs_only_the_message_that_triggers_it(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordination bug that one device's request triggers: the other device is still answered,
    the cycle returns (its messages get their PUBACK), and the failure is counted."""
    paths = await init_hub(workdir / "hub", "test", port=free_port(), host="127.0.0.1", bind="127.0.0.1", force=False)
    _, config = load_hub(paths.root)
    store = await HubStore.open(paths.db)
    try:
        for device in ("dev-a", "dev-b"):
            await store.register(device, "sim", {})
        service = HubService(paths, config, store)
        real = service.coordination.handle

        async def broken_for_dev_b(requests: list[tuple[str, CoordUp]], now: float | None = None) -> Replies:
            if any(device == "dev-b" for device, _ in requests):
                raise AttributeError("a defect")
            return await real(requests, now)

        monkeypatch.setattr(service.coordination, "handle", broken_for_dev_b)
        devices = ("dev-a", "dev-b")
        online = [Message(presence_topic(d), encode(Presence(state="online", session="s")), 1, True, i)
                  for i, d in enumerate(devices)]
        asks = [Message(up_topic(d, "coord"), pack_coord(LeaseRequest(id=f"r-{d}", name="fan", limit=2, ttl_s=60)),
                        1, False, 10 + i) for i, d in enumerate(devices)]
        _, replies = await service._process(online + asks)  # one ingest cycle, as the service runs it
        assert [(d, type(m).__name__) for d, m in replies.messages] == [("dev-a", "LeaseGrant")]
        assert await store.reject_counts() == {"internal_error": 1}
    finally:
        await store.close()
