"""The ingest's verdict on retained messages, and the hub clearing them, without a broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgefleet.mqtt.session import Message
from edgefleet.wire.protocol import MAX_PRESENCE_BYTES, STATUS, TELEMETRY, Presence, encode, presence_topic, up_topic
from hub.db.store import HubStore
from hub.ingest.batches import Ingest
from hub.ingest.retained import RetainedSweeper


def online(device_tag: str = "") -> bytes:
    return encode(Presence(state="online", session="s1", tags={"pad": device_tag}))


async def test_only_what_no_device_may_keep_is_cleared(tmp_path: Path) -> None:
    store = await HubStore.open(tmp_path / "hub.db")
    try:
        await store.register("a", "sim", {})
        ingest = Ingest(store)
        result = await ingest.process([
            Message(presence_topic("a"), online(), 1, True, 1),  # its presence: kept, applied
            Message(up_topic("a", STATUS), b"\x80", 1, True, 2),  # retained on up/: rejected, cleared
            Message(up_topic("a", TELEMETRY), b"", 1, True, 3),  # a clear coming back: ignored
            Message(presence_topic("b"), online("x" * MAX_PRESENCE_BYTES), 1, True, 4),  # too large
            Message(presence_topic("c"), b"{not json", 1, True, 5),  # unreadable, retained: cleared
            Message(up_topic("a", "junk"), b"x", 1, False, 6),  # not retained: nothing to clear
        ])
    finally:
        await store.close()
    assert [d for d, _ in result.presence] == ["a"]
    assert result.clear == [up_topic("a", STATUS), presence_topic("b"), presence_topic("c")]
    assert ingest.rejects == {"retained": 1, "too_large": 1, "undecodable": 1, "bad_topic": 1}


class PublishLog:
    """The transport's side of MqttSession.publish, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []
        self.news = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, qos, retain))
        self.news.set()


async def test_a_topic_cleared_again_and_again_costs_one_publish_a_round() -> None:
    sweeper, session = RetainedSweeper(), PublishLog()
    for _ in range(1000):
        sweeper.put([up_topic("a", STATUS)])
    sweeper.put([])
    serving = asyncio.create_task(sweeper.serve(session))  # type: ignore[arg-type]  # a fake transport
    try:
        async with asyncio.timeout(5):
            await session.news.wait()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert session.sent == [(up_topic("a", STATUS), b"", 1, True)]
