"""One certificate, two machines: outbox instances and the sequence numbers each may use.

Every outbox has a random instance id, made anew when the outbox finds itself on another
machine than the one it was made on (edge_agent/buffer/outbox.py `_claim`). A device's sequence space
is shared out among the instances the hub has seen, in regions: an instance numbers its own
records above its `floor`, up to the next instance's floor. The first instance of a device owns
the space from 0; one whose records all come after everything the device ever sent is a new
outbox on the same board (one replaced after corruption) and takes the rest of the space over.
One whose records overlap another's is a second machine with this certificate: its batch is
refused (not stored, not acknowledged as duplicates), the conflict is recorded as an
`identity_conflict` hub event and counted, and it is given a region of its own, above every
number the device used, to renumber its records into (protocol.Renumber); when it runs on the
same machine as the instance whose numbers it used (Batch.machine), it is that board's outbox
started again without its state, moved the same way but not reported as a clone. Records <= `keep`
were numbered before that (by the image it was cloned from): they keep their numbers, and the
hub stores them once whoever sends them.

Each instance's acknowledgments come from its own coverage (`stream`, a key of the ingest
tables: the device id, or DEVICE/INSTANCE once moved), never above its region, and carry its
instance id: both boards read the device's ack topic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import MAX_SEQ, Batch, Renumber
from hub.db.dialect import GREATEST, JSON_VALUES
from hub.db.interface import Tx

# A moved instance starts at the next multiple of this above every number the device used:
# the instance below it would need 2**40 records (350 years at 100 a second) to reach it.
REGION_STRIDE: Final = 2**40
CONFLICT: Final = EventKind.IDENTITY_CONFLICT  # the hub event's kind and the reject counter's reason
STALE: Final = "renumbered"  # a batch numbered before its instance was moved (still in flight then)
RESET: Final = "outbox_reset"  # a new outbox on the same board below numbers it used (its state was lost)

log = logging.getLogger("hub.identities")

# Where a conflict is recorded (kind, body), inside the ingest's transaction: a hub event.
EventSink = Callable[[EventKind, dict[str, Any]], Awaitable[None]]  # a hub event in the same transaction


@dataclass
class Instance:
    instance: int
    stream: str
    floor: int
    keep: int
    top: int
    machine: int = 0


@dataclass(frozen=True)
class Accept:
    stream: str
    ceiling: int
    row: Instance


@dataclass(frozen=True)
class Refuse:
    keep: int
    resume_after: int
    moved: bool  # given a region of its own now; else a batch of the numbering it had before it was
    clone: bool  # moved because another machine numbers the same records (recorded and counted)
    other: int = 0  # the instance whose numbers it used (0: none known)


def judge(device: str, batch: Batch, known: dict[int, Instance], top_all: int) -> Accept | Refuse:
    """Where a batch of outbox instance `batch.instance` stands among the device's `known` instances."""
    own_from = max(batch.base, batch.inherited)  # its own records are numbered above this
    seqs = [*batch.seq, *(e.seq for e in batch.events)]
    me = known.get(batch.instance)
    if me is None:
        if not known or own_from >= top_all:
            floor = own_from if known else 0
            return Accept(device, MAX_SEQ, Instance(batch.instance, device, floor, floor, batch.last, batch.machine))
        return _move(batch, own_from, known, top_all)
    ceiling = min((i.floor for i in known.values() if i.floor > me.floor), default=MAX_SEQ)
    if any(max(own_from, me.keep) < s <= me.floor for s in seqs):  # numbered before it was moved
        return Refuse(me.keep, me.floor, moved=False, clone=False)
    if batch.last > ceiling:
        return _move(batch, ceiling, known, top_all)
    me.top = max(me.top, batch.last)
    return Accept(me.stream, ceiling, me)


def _move(batch: Batch, keep: int, known: dict[int, Instance], top_all: int) -> Refuse:
    """Refuse the batch and give its instance a region above every number the device used. Another
    machine's instance there means a clone; the same machine's, an outbox that lost its state."""
    below = [i for i in known.values() if i.floor <= keep and i.instance != batch.instance]
    other = max(below, key=lambda i: i.floor) if below else None  # whose numbers it used
    same_board = other is not None and batch.machine != 0 and other.machine == batch.machine
    return Refuse(keep, next_region(known, top_all, batch.last), moved=True, clone=not same_board,
                  other=other.instance if other else 0)


def next_region(known: dict[int, Instance], top_all: int, last: int) -> int:
    highest = max([top_all, last, *(max(i.floor, i.top) for i in known.values())])
    return (highest // REGION_STRIDE + 1) * REGION_STRIDE




class ClaimWork(Protocol):
    """What resolve_claims reads and fills of an ingest cycle (hub.db.store.IngestWork)."""

    now: float
    claims: list[tuple[str, Batch]]
    ranges: dict[str, list[tuple[int, int, bool]]]
    rejects: dict[str, int]
    renumber: dict[tuple[str, int], Renumber]

    def add_rows(self, device: str, batch: Batch) -> None: ...


async def resolve_claims(db: Tx, work: ClaimWork, record_event: EventSink) -> dict[
        tuple[str, int], tuple[str, int]]:
    """Judge the cycle's batches that carry an instance id, inside the ingest's transaction: add the
    accepted ones' rows and ranges to `work`, the refusals to `work.renumber`. Returns, per (device,
    instance) accepted, its stream and the ceiling of its region (its acks never go past it)."""
    placed: dict[tuple[str, int], tuple[str, int]] = {}
    instances = await _instances(db, sorted({device for device, _ in work.claims}))
    seen: dict[tuple[str, int], Instance] = {}  # what to write back, once per instance
    conflicts: dict[tuple[str, int], int] = {}
    for device, batch in work.claims:
        known, key = instances.setdefault(device, {}), (device, batch.instance)
        new = known and batch.instance not in known  # only a newcomer is measured against the device's top
        verdict = judge(device, batch, known, await _top(db, device, known) if new else 0)
        if isinstance(verdict, Accept):
            known[batch.instance] = seen[key] = verdict.row
            placed[key] = (verdict.stream, verdict.ceiling)
            work.add_rows(device, batch)
            work.ranges.setdefault(verdict.stream, []).append((batch.base, batch.last, batch.settled))
            continue
        reason = (f"another machine numbers this device's records above {verdict.keep} with the same certificate "
                  "(a cloned image?)" if verdict.clone else
                  f"this board numbered records above {verdict.keep} before, in an outbox it no longer has")
        work.renumber[key] = Renumber(keep_through=verdict.keep, resume_after=verdict.resume_after, reason=reason)
        why = CONFLICT if verdict.clone else RESET if verdict.moved else STALE
        work.rejects[why] = work.rejects.get(why, 0) + 1
        if not verdict.moved:
            continue
        known[batch.instance] = seen[key] = Instance(batch.instance, f"{device}/{batch.instance:x}",
                                                     verdict.resume_after, verdict.keep, verdict.resume_after,
                                                     batch.machine)
        if not verdict.clone:
            log.warning("device %s: a new outbox on the same board numbers records it numbered before (%d..); "
                        "told to renumber them from %d", device, verdict.keep + 1, verdict.resume_after + 1)
            continue
        conflicts[key] = conflicts.get(key, 0) + 1
        log.warning("device %s: two machines use its certificate: outbox %x numbered records %d.. that outbox %x "
                    "uses; refused, and told to renumber them from %d", device, batch.instance, verdict.keep + 1,
                    verdict.other, verdict.resume_after + 1)
        await record_event(CONFLICT, {
            "device": device, "instance": f"{batch.instance:x}", "other": f"{verdict.other:x}",
            "renumbered_after": verdict.keep, "resume_after": verdict.resume_after,
            "detail": f"two machines use the certificate of {device}: give each board its own identity "
                      "(edge-hub provision) and re-image the copy; meanwhile every reading of both is kept"})
    await db.executemany(  # the fragment is ours; values are bound
        "INSERT INTO ingest_instances(device, instance, stream, floor, keep, top, conflicts, conflict_at, machine, "  # noqa: S608  # the fragment is ours; values are bound
        "first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, instance) DO UPDATE SET "
        "stream = excluded.stream, floor = excluded.floor, keep = excluded.keep, "
        f"top = {GREATEST[db.dialect]}(ingest_instances.top, excluded.top), "
        "conflicts = ingest_instances.conflicts + excluded.conflicts, "
        "conflict_at = COALESCE(excluded.conflict_at, ingest_instances.conflict_at), "
        "last_seen = excluded.last_seen",
        [(device, i.instance, i.stream, i.floor, i.keep, i.top, conflicts.get((device, i.instance), 0),
          work.now if (device, i.instance) in conflicts else None, i.machine, work.now, work.now)
         for (device, _), i in seen.items()])
    return placed


async def _instances(db: Tx, devices: list[str]) -> dict[str, dict[int, Instance]]:
    found: dict[str, dict[int, Instance]] = {}
    for r in await db.fetch("SELECT device, instance, stream, floor, keep, top, machine FROM ingest_instances "  # noqa: S608  # the fragment is ours; values are bound
                            f"WHERE device IN (SELECT value FROM {JSON_VALUES[db.dialect]})",  # ours
                            (json.dumps(devices),)):
        found.setdefault(r[0], {})[int(r[1])] = Instance(int(r[1]), r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6]))
    return found


async def _top(db: Tx, device: str, known: dict[int, Instance]) -> int:
    """The highest number the device is known to have used (its instances', and before it had any)."""
    rows = await db.fetch(f"SELECT {GREATEST[db.dialect]}(COALESCE((SELECT acked_through FROM ingest "  # noqa: S608  # the fragment is ours; values are bound
                          "WHERE device = ?), 0), COALESCE((SELECT max(last) FROM ingest_ranges "  # ours
                          "WHERE device = ?), 0))", (device, device))
    row = rows[0] if rows else None
    return max([int(row[0]) if row else 0, *(i.top for i in known.values())])
