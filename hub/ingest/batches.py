"""Hub ingest: validate batches, store them idempotently, advance per-device watermarks.

The device id always comes from the topic the broker authorised (ACL: a device writes only
its own topics), never from a payload. A batch is stored whatever its position; the
cumulative watermark acknowledged to the device advances only across contiguous coverage
(hub/db/watermarks.py), in the same transaction as the rows.

Nothing here is kept between cycles but the list of registered devices: the watermarks and
the ranges waiting beyond a gap are in the database, so hub replicas that share the ingest
(an MQTT 5 shared subscription hands each message to one of them) acknowledge correctly
whichever of them stored a device's earlier batches (docs/scaling.md).
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Final

from edgefleet.mqtt.session import Message
from edgefleet.wire.protocol import (
    CERT,
    COORD,
    STATUS,
    TELEMETRY,
    Batch,
    CertRequest,
    CoordUp,
    Presence,
    ProtocolError,
    Renumber,
    Status,
    Topic,
    check_batch,
    check_presence_size,
    decode,
    parse_topic,
    unpack,
    unpack_up,
)
from hub.db.interface import HubState, StoreError
from hub.db.rows import SEQ_CONFLICT, IngestWork

# Errors of the data, not of the database's health: retried message by message.
UNSTORABLE: Final = (OverflowError, ValueError, sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)
# Counted for a message whose handling failed in a way nothing above foresaw (a defect of ours).
INTERNAL_ERROR: Final = "internal_error"


def blames_message(exc: Exception) -> bool:
    """Whether an unexpected failure can be put down to the message being handled: anything but
    the database's own health (locked, unavailable, corrupt), which is never a message's fault."""
    return isinstance(exc, UNSTORABLE) or not isinstance(exc, sqlite3.Error | StoreError)

log = logging.getLogger("hub.ingest")


@dataclass
class CycleResult:
    acks: dict[str, int]  # device -> cumulative watermark to acknowledge
    presence: list[tuple[str, Presence]]
    stored: int
    coord: list[tuple[str, CoordUp]] = field(default_factory=list)  # leases, approvals, bids: hub.region.coordination
    certs: list[tuple[str, CertRequest]] = field(default_factory=list)  # renewal requests: hub.pki.renewal
    instance_acks: dict[tuple[str, int], int] = field(default_factory=dict)  # (device, outbox instance) -> through
    renumber: dict[tuple[str, int], Renumber] = field(default_factory=dict)  # refused: a cloned identity
    # topics whose retained message the broker must drop: hub.ingest.retained
    clear: list[str] = field(default_factory=list)


class Ingest:
    def __init__(self, store: HubState, hub: str = "") -> None:
        self._store, self._hub = store, hub  # hub: this process's identity, for the per-process counts
        self._registered: set[str] = set()
        self.rejects: collections.Counter[str] = collections.Counter()
        self.records = 0

    async def _known(self, device: str) -> bool:
        if device not in self._registered:
            self._registered = await self._store.registered()  # provisioned since we looked
        return device in self._registered

    async def process(self, messages: list[Message]) -> CycleResult:
        """Validate and commit one cycle's messages; return what to acknowledge.

        A message the database refuses though it passed validation must not take the hub
        down (it would be redelivered to the restarted hub forever): the cycle is retried
        one message at a time and only the refused one is rejected.
        """
        try:
            return await self._process(messages)
        except Exception as exc:
            if not blames_message(exc):
                raise
            if len(messages) == 1:
                reason = "unstorable" if isinstance(exc, UNSTORABLE) else INTERNAL_ERROR
                await self.reject(reason, messages[0].topic, exc)
                return CycleResult({}, [], 0, clear=[messages[0].topic] if messages[0].retain else [])
        results = [await self.process([m]) for m in messages]
        return CycleResult({d: w for r in results for d, w in r.acks.items()},
                           [p for r in results for p in r.presence], sum(r.stored for r in results),
                           [c for r in results for c in r.coord], [c for r in results for c in r.certs],
                           {k: w for r in results for k, w in r.instance_acks.items()},
                           {k: n for r in results for k, n in r.renumber.items()},
                           [t for r in results for t in r.clear])

    async def _process(self, messages: list[Message]) -> CycleResult:
        work = IngestWork(now=time.time(), messages=len(messages), hub=self._hub)
        presence: list[tuple[str, Presence]] = []
        coord: list[tuple[str, CoordUp]] = []
        certs: list[tuple[str, CertRequest]] = []
        clear: list[str] = []
        rejects: collections.Counter[str] = collections.Counter()
        for message in messages:
            try:
                if message.retain and not message.payload:
                    continue  # a retained message being cleared (hub.ingest.retained): nothing to take in
                topic = parse_topic(message.topic)
                if topic.channel == "presence":
                    if message.payload:  # an empty payload clears a retained message
                        check_presence_size(message.payload)
                        presence.append((topic.device, decode(message.payload, Presence)))
                    continue
                if message.retain:
                    raise ProtocolError("retained", "devices never retain on up/ topics; the broker's copy is cleared")
                if topic.channel == "up" and topic.kind == CERT:  # hub.pki.renewal refuses, and audits, the unknown
                    certs.append((topic.device, unpack(message.payload, CertRequest)))
                    continue
                if not await self._known(topic.device):
                    raise ProtocolError("unknown_device", f"{topic.device} is not registered (or revoked)")
                if topic.channel == "up" and topic.kind == COORD:
                    coord.append((topic.device, unpack_up(message.payload)))
                    continue
                self._route(topic, message.payload, work)
            except ProtocolError as exc:
                rejects[exc.reason] += 1
                self._log_reject(exc.reason, f"{message.topic}: {exc.detail}")
                if message.retain:  # else the broker keeps it, and hands it to every new subscriber
                    clear.append(message.topic)
            except Exception as exc:  # one message must not stop the ingest, whatever it triggers
                if not blames_message(exc):
                    raise
                rejects[INTERNAL_ERROR] += 1
                self._log_reject(INTERNAL_ERROR, f"{message.topic}: {exc!r}", exc)
                if message.retain:
                    clear.append(message.topic)
        work.rejects = dict(rejects)
        acks = await self._store.commit_ingest(work)
        for device, seq, kind in work.conflicts:
            self._log_reject(SEQ_CONFLICT, f"{device}: the {kind} with seq {seq} reuses a seq of another record")
            self.rejects[SEQ_CONFLICT] += 1
        self.rejects.update(rejects)
        stored = len(work.telemetry) + len(work.events)
        self.records += stored
        return CycleResult(acks, presence, stored, coord, certs, work.instance_acks, work.renumber, clear)

    async def reject(self, reason: str, what: str, exc: Exception) -> None:
        """Count and log one message that failed after validation (its own transaction)."""
        self._log_reject(reason, f"{what}: {exc!r}", None if isinstance(exc, UNSTORABLE) else exc)
        self.rejects[reason] += 1
        await self._store.commit_ingest(IngestWork(now=time.time(), rejects={reason: 1}))

    def _log_reject(self, reason: str, detail: str, unexpected: Exception | None = None) -> None:
        """First of a reason WARNING (a defect of ours: ERROR, with its traceback), the next DEBUG:
        a device that sends the same thing again and again cannot flood the log."""
        seen = self.rejects[reason]
        first = logging.WARNING if unexpected is None else logging.ERROR
        log.log(first if seen == 0 else logging.DEBUG, "rejected (%s, %d before): %s", reason, seen, detail[:500],
                exc_info=unexpected)

    def _route(self, topic: Topic, payload: bytes, work: IngestWork) -> None:
        if topic.channel != "up":
            raise ProtocolError("bad_topic", "devices publish only on up/ and presence")
        if topic.kind == TELEMETRY:
            batch = unpack(payload, Batch)
            check_batch(batch)
            self._add_batch(topic.device, batch, work)
        elif topic.kind == STATUS:
            work.statuses[topic.device] = unpack(payload, Status)
        else:
            raise ProtocolError("bad_topic", f"unknown kind {topic.kind!r}")

    @staticmethod
    def _add_batch(device: str, batch: Batch, work: IngestWork) -> None:
        if batch.instance:  # judged at the commit, against the device's other outboxes (hub/db/identities.py)
            work.claims.append((device, batch))
            return
        work.add_rows(device, batch)
        work.ranges.setdefault(device, []).append((batch.base, batch.last, batch.settled))
