"""The uplink: the outbox to the hub in batches, deleted only on the hub's acknowledgment.

A batch covers the sequence range (base, last]; batches go out in order, at most `window`
of them unacknowledged at once. The hub commits a batch and then acknowledges a cumulative
watermark; only that deletes anything. A broker PUBACK deletes nothing: it only tells us
the broker took the message (and a PUBACK with a failure reason is a failure). After a
reconnect, or when the hub has not acknowledged in `ack_timeout`, we rewind to the last
acknowledgment and send again; the hub stores by (device, seq), so a resend is harmless.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass

from edge_agent.buffer.outbox import Outbox, Record
from edgefleet.mqtt.session import MqttSession
from edgefleet.wire.protocol import TELEMETRY, Ack, Batch, EventRecord, ProtocolError, pack, up_topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UplinkSettings:
    batch_max: int = 5000  # records per message; the payload limit may make it fewer
    window: int = 8  # batches sent but not yet acknowledged by the hub
    ack_timeout: float = 15.0  # seconds without the hub's ack before we resend from the last one


def encode_batch(base: int, records: list[Record], settled: bool, instance: int = 0,
                 inherited: int = 0, machine: int = 0) -> tuple[Batch, bytes]:
    """Encode records (seq > base) as one batch; halve until it fits the payload limit."""
    while True:
        names: dict[str, int] = {}
        seq: list[int] = []
        ts: list[float] = []
        metric: list[int] = []
        value: list[float] = []
        events: list[EventRecord] = []
        for r in records:
            if r.metric is not None and r.value is not None:
                seq.append(r.seq)
                ts.append(r.ts)
                metric.append(names.setdefault(r.metric, len(names)))
                value.append(r.value)
            else:
                events.append(EventRecord(r.seq, r.ts, r.kind or "event", r.body or ""))
        batch = Batch(base=base, last=records[-1].seq, settled=settled, names=list(names), seq=seq,
                      ts=ts, metric=metric, value=value, events=events, instance=instance, inherited=inherited,
                      machine=machine)
        try:
            return batch, pack(batch)
        except ProtocolError:
            if len(records) == 1:
                raise
            records = records[: len(records) // 2]


class Uplink:
    def __init__(self, device: str, outbox: Outbox, settings: UplinkSettings) -> None:
        self.device, self.outbox, self.settings = device, outbox, settings
        self._topic = up_topic(device, TELEMETRY)
        self._in_flight: collections.deque[tuple[int, float]] = collections.deque()  # (last, sent at)
        self._news = asyncio.Event()  # records committed or an ack arrived
        outbox.watch(self._news)
        self._rewind_now = False  # the outbox was renumbered: what is in flight is void
        self.batches_sent = 0
        self.resends = 0
        self.last_ack_at: float | None = None

    def on_ack(self, through: int) -> None:
        """The hub committed everything <= through."""
        self.outbox.acknowledge(through)
        self.last_ack_at = time.time()
        while self._in_flight and self._in_flight[0][0] <= through:
            self._in_flight.popleft()
        self._news.set()

    async def on_hub_ack(self, ack: Ack) -> None:
        """An ack from the hub: ours (or for every instance), or another board's with our certificate."""
        outbox = self.outbox
        if ack.instance and ack.instance != outbox.instance:
            return  # a clone's: acting on it would delete what we have not delivered
        if ack.renumber is None:
            self.on_ack(ack.through)
            return
        r = ack.renumber
        moved = await outbox.renumber(r.keep_through, r.resume_after)
        if moved is not None:
            log.warning("the hub refused our sequence numbers above %d (%s); our records above it (%d committed) are "
                        "numbered from %d on and sent again", r.keep_through, r.reason, moved, r.resume_after + 1)
        self._rewind_now = True
        self._news.set()

    async def serve(self, session: MqttSession) -> None:
        """Send while connected; return or raise when the connection is done."""
        cursor = self._rewind()
        settled = True  # the first batch after a (re)start declares base acknowledged
        while True:
            if self._rewind_now:
                self._rewind_now = False
                cursor, settled = self._rewind(), True
            if self._in_flight and time.monotonic() - self._in_flight[0][1] > self.settings.ack_timeout:
                log.warning("no acknowledgment from the hub for %.0f s; resending from seq %d",
                            self.settings.ack_timeout, self.outbox.acked)
                self.resends += 1
                cursor, settled = self._rewind(), True
            if len(self._in_flight) >= self.settings.window:
                await self._wait()
                continue
            # Read last_seq before the query: everything up to it was committed before the
            # query ran, so "no rows" below really means those numbers are gone.
            committed = self.outbox.last_seq
            records = await self.outbox.read_after(cursor, self.settings.batch_max)
            instance, inherited, machine = self.outbox.instance, self.outbox.inherited, self.outbox.machine
            if records:
                batch, payload = encode_batch(cursor, records, settled, instance, inherited, machine)
            elif committed > cursor:
                # Everything up to `committed` after the cursor was shed: an empty batch covers
                # the range, so the hub's watermark (and our ack) can move past it.
                batch = Batch(base=cursor, last=committed, settled=settled, instance=instance, inherited=inherited,
                              machine=machine)
                payload = pack(batch)
            else:
                await self._wait()
                continue
            # Once sent, a record may be at the hub even if its ack never comes back: shedding
            # must not count it as dropped. Protected until acknowledged, across rewinds.
            self.outbox.protect_through = max(self.outbox.protect_through, batch.last)
            await session.publish(self._topic, payload, qos=1)
            self._in_flight.append((batch.last, time.monotonic()))
            self.batches_sent += 1
            cursor, settled = batch.last, False

    def _rewind(self) -> int:
        self._in_flight.clear()
        return self.outbox.acked

    async def _wait(self) -> None:
        """Until records are committed or an ack arrives; with batches in flight, no longer than
        the oldest one's ack timeout. Idle, it sleeps: no polling (2,000 agents share a process)."""
        delay = None
        if self._in_flight:
            delay = max(0.0, self._in_flight[0][1] + self.settings.ack_timeout - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._news.wait()
        self._news.clear()  # before the caller looks again: news after this wakes the next wait
