"""The uplink against a fake transport: what it sends, when it waits, when it resends."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from edge_agent.buffer.outbox import Outbox
from edge_agent.sense.sensors import Reading
from edge_agent.sync.uplink import Uplink, UplinkSettings
from edgefleet.wire.protocol import Batch, unpack


class FakeSession:
    """Takes publishes like a broker that PUBACKs everything; the hub's acks are up to the test."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.sent = asyncio.Condition()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        async with self.sent:
            self.batches.append(unpack(payload, Batch))
            self.sent.notify_all()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Batch]:
        async with asyncio.timeout(timeout), self.sent:
            await self.sent.wait_for(lambda: len(self.batches) >= count)
        return self.batches


@asynccontextmanager
async def running(tmp_path: Path, settings: UplinkSettings) -> AsyncIterator[tuple[Outbox, Uplink, FakeSession]]:
    outbox = await Outbox.open(tmp_path, 10**9)
    uplink = Uplink("dev", outbox, settings)
    session = FakeSession()
    task = asyncio.create_task(uplink.serve(session))  # type: ignore[arg-type]
    try:
        yield outbox, uplink, session
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading("m", 1000.0 + i, float(i)) for i in range(start, start + n)]


async def test_batches_cover_consecutive_ranges_and_acks_delete(tmp_path: Path) -> None:
    async with running(tmp_path, UplinkSettings(batch_max=4, window=8)) as (outbox, uplink, session):
        outbox.add(readings(10))
        await outbox.flush()
        batches = await session.wait_for(3)
        assert [(b.base, b.last) for b in batches[:3]] == [(0, 4), (4, 8), (8, 10)]
        assert batches[0].settled
        assert not batches[1].settled
        assert [s for b in batches[:3] for s in b.seq] == list(range(1, 11))
        uplink.on_ack(8)
        await outbox.flush()
        assert [r.seq for r in await outbox.read_after(0, 100)] == [9, 10]


async def test_window_waits_for_the_hub_and_resends_after_the_ack_timeout(tmp_path: Path) -> None:
    settings = UplinkSettings(batch_max=2, window=2, ack_timeout=0.3)
    async with running(tmp_path, settings) as (outbox, uplink, session):
        outbox.add(readings(8))
        await outbox.flush()
        await session.wait_for(2)
        await asyncio.sleep(0.1)
        assert len(session.batches) == 2  # the window is full: nothing more without an ack
        batches = await session.wait_for(3, timeout=3.0)  # no ack: resend from the last one
        assert (batches[2].base, batches[2].settled) == (0, True)
        assert uplink.resends >= 1


async def test_a_shed_tail_is_covered_by_an_empty_batch(tmp_path: Path) -> None:
    """Readings 4..8 were shed before they could be sent: the hub must still be told the range
    is settled, or its watermark (and our ack) would stop at 3 until the next reading."""
    outbox = await Outbox.open(tmp_path, 10**9)
    outbox.add(readings(8))
    await outbox.flush()
    outbox.acknowledge(3)
    await outbox.flush()
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.execute("DELETE FROM records WHERE seq > 3")  # as quota shedding would
    db.commit()
    db.close()
    await outbox.close()
    async with running(tmp_path, UplinkSettings()) as (_, _, session):
        first = (await session.wait_for(1))[0]
    assert (first.base, first.last, first.settled) == (3, 8, True)
    assert first.seq == []
    assert first.events == []
