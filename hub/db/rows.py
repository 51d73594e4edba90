"""The rows the hub's stores hand out and take in, the same for SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec

from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import Batch, Renumber, Status, json_body
from hub.db.dialect import JSON_FIELD, JSON_VALUES, Dialect

T = TypeVar("T")
SEQ_CONFLICT: Final = "seq_conflict"  # reject reason: a record reusing a seq its device already used for the other kind


class DeviceRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub devices --json`; the field names are a documented contract."""

    device: str
    profile: str
    tags: dict[str, str]
    online: bool
    last_seen: str | None
    policy_version: int | None
    policy_intended: int | None
    policy_drifted: bool  # online, off the intended version for longer than the grace period
    policy_refused: dict[str, Any] | None  # the latest refusal, as the device reported it
    backlog: int | None
    dropped: int | None
    cert_expires: str | None
    revoked: bool
    agent_version: str | None
    sensor_failures: dict[str, int] | None
    corrupt_outboxes: int | None


class TelemetryRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub telemetry --json` (a documented contract); ts in epoch seconds."""

    device: str
    seq: int
    ts: float
    metric: str
    value: float
    clock_unknown: bool = False  # stamped by a device clock that was never set (docs/store-and-forward.md)


def telemetry_row(device: str, seq: int, ts: float, metric: str, value: float, clock_unknown: int) -> TelemetryRow:
    return TelemetryRow(device, seq, ts, metric, value, bool(clock_unknown))


class EventRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub events --json` (a documented contract); ts in epoch seconds.

    `policy_version` and `rule` are lifted out of the event's JSON body (null when absent);
    `body` holds the rest of it.
    """

    device: str
    seq: int
    ts: float
    kind: str
    policy_version: int | None
    rule: str | None
    body: dict[str, Any]


def event_row(device: str, seq: int, ts: float, kind: str, text: str) -> EventRow:
    """An events-table row as an EventRow, whatever its body holds (protocol.json_body)."""
    body = json_body(text)
    version = body.pop("policy_version", None)
    rule = body.pop("rule", None)
    return EventRow(
        device, seq, ts, kind,
        policy_version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        rule=rule if isinstance(rule, str) else None,
        body=body,
    )


@dataclass
class IngestWork:
    """Rows and state from one ingest cycle, committed together."""

    now: float
    telemetry: list[tuple[str, int, float, str, float]] = field(default_factory=list)
    events: list[tuple[str, int, float, str, str]] = field(default_factory=list)
    ranges: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)  # (base, last, settled)
    statuses: dict[str, Status] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    messages: int = 0  # the MQTT messages they came in
    hub: str = ""  # the hub process that took them in (replicas share the ingest)
    # Filled by the commit: (device, seq, kind) of records not stored because the device's seq is
    # already a record of the other kind (a reading vs an event); counted as SEQ_CONFLICT rejects.
    conflicts: list[tuple[str, int, str]] = field(default_factory=list)
    claims: list[tuple[str, Batch]] = field(default_factory=list)  # batches with an outbox instance id
    # Set by the commit (hub/db/identities.py): each instance's ack, and the batches refused for numbers
    # another machine with the same certificate uses.
    instance_acks: dict[tuple[str, int], int] = field(default_factory=dict)
    renumber: dict[tuple[str, int], Renumber] = field(default_factory=dict)

    def add_rows(self, device: str, batch: Batch) -> None:
        """A batch's readings and events, to be stored."""
        names = batch.names
        self.telemetry.extend((device, s, t, names[m], v) for s, t, m, v in zip(
            batch.seq, batch.ts, batch.metric, batch.value, strict=True))
        self.events.extend((device, e.seq, e.ts, e.kind, e.body) for e in batch.events)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def device_row(r: Any, now: float, drift_grace_s: float) -> DeviceRow:
    """A devices row (joined with its certificate expiry and intended policy) as a DeviceRow."""
    online = bool(r["online"]) and r["revoked_at"] is None
    off_since = max(r["assigned_at"] or 0.0, r["connected_at"] or 0.0)
    drifted = (online and r["intended"] is not None and r["policy_version"] != r["intended"]
               and now - off_since > drift_grace_s)
    return DeviceRow(
        device=r["device"], profile=r["profile"], tags=json.loads(r["tags"]),
        online=online, last_seen=iso(r["last_seen"]),
        policy_version=r["policy_version"], policy_intended=r["intended"], policy_drifted=drifted,
        policy_refused=json.loads(r["policy_refused"]) if r["policy_refused"] else None,
        backlog=r["backlog"], dropped=r["dropped"],
        cert_expires=iso(r["cert_expires"]), revoked=r["revoked_at"] is not None,
        agent_version=r["agent_version"],
        sensor_failures=json.loads(r["sensor_failures"]) if r["sensor_failures"] else None,
        corrupt_outboxes=r["corrupt_outboxes"],
    )


TELEMETRY_COLUMNS: Final = "device, seq, ts, metric, value, clock_unknown"  # telemetry_row's arguments
EVENT_COLUMNS: Final = "device, seq, ts, kind, body"  # event_row's arguments


def listing_sql(columns: str, table: str, filters: tuple[tuple[str, object], ...],
                limit: int | None, order: str = "device, seq") -> tuple[str, list[object]]:
    """A listing of a per-device table (by device and seq unless `order` says otherwise), with the
    filters whose value is not None."""
    active = [(clause, arg) for clause, arg in filters if arg is not None]
    query = f"SELECT {columns} FROM {table}"  # noqa: S608  # names are ours; values are bound
    if active:
        query += " WHERE " + " AND ".join(clause for clause, _ in active)
    query += f" ORDER BY {order}"
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    return query, [arg for _, arg in active]


class Listings:
    """What the operator reads the same way from both stores, over the store's own `_listing` (its cursor)
    and `query`."""

    dialect: Dialect

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _listing(self, columns: str, table: str, filters: tuple[tuple[str, object], ...],
                 limit: int | None, make: Callable[..., T]) -> AsyncGenerator[T, None]:
        raise NotImplementedError

    def telemetry(self, *, device: str | None = None, since: float | None = None, until: float | None = None,
                  metric: str | None = None, limit: int | None = None) -> AsyncGenerator[TelemetryRow, None]:
        """Stored readings ordered by device, then seq; `since` included, `until` not."""
        filters = (("device = ?", device), ("ts >= ?", since), ("ts < ?", until), ("metric = ?", metric))
        return self._listing(TELEMETRY_COLUMNS, "telemetry", filters, limit, telemetry_row)

    def events(self, *, device: str | None = None, since: float | None = None,
               kind: str | None = None, limit: int | None = None) -> AsyncGenerator[EventRow, None]:
        """Stored events ordered by device, then seq (the device's own order)."""
        filters = (("device = ?", device), ("ts >= ?", since), ("kind = ?", kind))
        return self._listing(EVENT_COLUMNS, "events", filters, limit, event_row)

    async def latest_escalations(self) -> list[EventRow]:
        """The newest `escalation` event of each (device, rule), ordered by device and rule.

        A scan of the events of that kind; fine for an operator's command."""
        rule = JSON_FIELD[self.dialect].format("body", "rule")
        query = (
            "SELECT e.device, e.seq, e.ts, e.kind, e.body FROM events e JOIN ("  # noqa: S608  # ours
            f"  SELECT device, MAX(seq) AS seq FROM events WHERE kind = ? GROUP BY device, {rule}"
            ") latest USING (device, seq) ORDER BY e.device, e.seq"
        )
        rows = [event_row(*r) for r in await self.query(query, (EventKind.ESCALATION,))]
        return sorted(rows, key=lambda r: (r.device, r.rule or ""))

    async def latest_alerts(self, since: float, severities: tuple[str, ...]) -> list[tuple[EventRow, int]]:
        """The newest `alert` event of each device and message with one of `severities`, taken at or
        after `since` (device clock), with how many there were since then; newest first."""
        field = JSON_FIELD[self.dialect]
        query = (
            "SELECT e.device, e.seq, e.ts, e.kind, e.body, latest.n FROM events e JOIN ("  # noqa: S608  # ours
            "  SELECT device, MAX(seq) AS seq, COUNT(*) AS n FROM events WHERE kind = ? AND ts >= ?"
            f"  AND {field.format('body', 'severity')} IN (SELECT value FROM {JSON_VALUES[self.dialect]})"
            f"  GROUP BY device, {field.format('body', 'message')}"
            ") latest USING (device, seq) ORDER BY e.ts DESC, e.device"
        )
        args = (EventKind.ALERT, since, json.dumps(severities))
        return [(event_row(*r[:5]), int(r[5])) for r in await self.query(query, args)]
