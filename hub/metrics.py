"""The hub's Prometheus metrics, read from its database at each scrape.

The figures are the hub's state, not a second bookkeeping: a Collector reads the database
in one read transaction (a read-only connection of its own, in a worker thread; WAL lets it
read while the hub writes). Every scrape is cheap whatever the size of the telemetry table:
it is only ever sought into by key, never counted. So what grows is exposed as counters and
Prometheus does the arithmetic over time:

- ingest rate: `sum(rate(edgefleet_ingest_acked_records_total[5m]))`, records a second. The
  counter is each device's acknowledged watermark: readings and events committed, plus any
  sequence numbers the device shed by quota (`edgefleet_device_readings_shed_total`). The hub
  also counts what it commits per minute: `edgefleet_ingest_records_per_second` is that rate
  over the last few minutes, for a glance without Prometheus (`edge-hub status`).
- action success rate: `sum(rate(edgefleet_actions_total{outcome="succeeded"}[1h]))
  / sum(rate(edgefleet_actions_total{outcome=~"succeeded|failed"}[1h]))`.
- decision latency: `histogram_quantile(0.99, sum by (le) (rate(edgefleet_decision_latency_seconds_bucket[15m])))`,
  from the `latency_ms` the agents audit in their action results.
- coordination conflicts: `edgefleet_lease_queued` (requests waiting now),
  `edgefleet_lease_longest_wait_seconds`, and `rate(edgefleet_coordination_refusals_total[1h])`
  (actions given up for want of a lease or an approval).

Telemetry coverage is the share of registered devices whose newest stored reading was taken
(by the device's clock) within COVERAGE_WINDOW_S. Per-device series are for registered,
unrevoked devices; every series carries `region`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edgefleet.runtime.exposition import LatencyTally, MetricsUnavailable, exposition_server
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import ProtocolError, hub_identity, json_body, read_json
from hub.config import HubPaths, RolloutConf
from hub.db.dialect import JSON_FIELD, JSON_OBJECT_ROWS, Dialect
from hub.db.interface import StoreUnavailable
from hub.errors import HubError
from hub.ingest.subscriptions import FOREIGN, NOTICE_INTERVAL_S

DEFAULT_LISTEN: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9464  # hub.toml [metrics] port; 0 turns the endpoint off
INGEST_RATE_MINUTES: Final = 5  # the ingest rate gauges average over the last 4 to 5 minutes
COVERAGE_WINDOW_S: Final = 300.0  # "has data": a reading taken in the last five minutes is at the hub
# A WAL reader waits only for a checkpoint or a recovery; longer than this and the scrape gets a 503.
READ_TIMEOUT_S: Final = 5.0
OUTCOMES: Final = {EventKind.ACTION_SUCCEEDED: "succeeded", EventKind.ACTION_FAILED: "failed",
                   EventKind.ACTION_REFUSED: "refused", EventKind.ACTION_SKIPPED: "skipped"}
# The rule engine's wording for actions refused by coordination (edge_agent/decide/rules.py, _coordinate).
REFUSAL_NEEDS: Final = (("no lease ", "lease"), ("no approval", "approval"))


class MetricsError(HubError):
    """The metrics endpoint cannot be served (its port is taken); the message says what to change."""


class FiguresUnavailable(HubError, MetricsUnavailable):
    """The hub database cannot be read for a scrape now; the shared endpoint answers 503."""


@dataclass
class ActionTally:
    """Action events of one device: outcomes, coordination refusals, decision latencies."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    latency: LatencyTally = field(default_factory=LatencyTally)

    def add(self, outcome: str, text: str) -> None:
        self.outcomes[outcome] += 1
        body = json_body(text)  # a body that is not a readable object is counted, nothing more
        latency_ms = body.get("latency_ms")
        if isinstance(latency_ms, int | float) and not isinstance(latency_ms, bool) and latency_ms >= 0:
            self.latency.observe(latency_ms / 1000)
        detail = body.get("detail")
        if outcome == "refused" and isinstance(detail, str):
            for prefix, need in REFUSAL_NEEDS:
                if detail.startswith(prefix):
                    self.refusals[need] += 1

    def include(self, other: ActionTally) -> None:
        self.outcomes.update(other.outcomes)
        self.refusals.update(other.refusals)
        self.latency.include(other.latency)


@dataclass
class _Settled:
    """A device's action events with seq <= `through` (its ingest watermark: final), counted once."""

    through: int = 0
    tally: ActionTally = field(default_factory=ActionTally)


class HubCollector(Collector):
    """Reads the hub database at each collect(); keeps only the counts of settled action events.

    Action events are counted incrementally: below a device's ingest watermark nothing can be
    added any more, so those counts are kept and only newer events are read at the next scrape.
    """

    def __init__(self, db_path: Path, region: str, *, drift_grace_s: float = RolloutConf().drift_grace_s,
                 clock: Callable[[], float] = time.time, database: str = "") -> None:
        self._db_path, self._region, self._identity = db_path, region, hub_identity(region)
        self._database = database  # [database] url: "" reads db_path (SQLite)
        self._dialect: Dialect = "postgresql" if database else "sqlite"
        self._drift_grace_s, self._clock = drift_grace_s, clock
        self._settled: dict[str, _Settled] = {}
        self._lock = threading.Lock()  # collect() runs in worker threads; the counts are shared

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                with closing(self._open()) as db:
                    return list(self._families(db, self._clock()))
            except sqlite3.Error as exc:
                raise FiguresUnavailable(f"cannot read the hub database {self._db_path}: {exc}") from exc
            except StoreUnavailable as exc:
                raise FiguresUnavailable(str(exc)) from exc

    def _open(self) -> Any:
        """One snapshot for every figure: SQLite's read transaction, or PostgreSQL's (hub/db/postgres.py)."""
        if self._database:
            from hub.db.postgres import SnapshotReader  # asyncpg only where PostgreSQL is configured
            return SnapshotReader(self._database)
        db = _connect(self._db_path)
        db.execute("BEGIN")
        return db

    def _families(self, db: sqlite3.Connection, now: float) -> Iterator[Metric]:
        yield from self._fleet(db, now)
        yield from self._ingest(db, now)
        yield from self._actions(db)
        yield from self._leases(db, now)
        yield from self._pki(db, now)

    # --- devices, coverage, policy versions, certificates ---------------------------------

    def _fleet(self, db: sqlite3.Connection, now: float) -> Iterator[Metric]:
        rows = db.execute(
            "SELECT d.device, d.online, d.revoked_at, d.last_seen, d.backlog, d.policy_version, d.sensor_failures, "
            "d.connected_at, a.version, a.assigned_at, "
            "(SELECT MAX(not_after) FROM certificates c WHERE c.device = d.device AND c.purpose = 'device' "
            " AND c.revoked_at IS NULL), "
            "(SELECT ts FROM telemetry t WHERE t.device = d.device ORDER BY t.seq DESC LIMIT 1) "
            "FROM devices d LEFT JOIN assignments a USING (device) ORDER BY d.device").fetchall()
        live = [r for r in rows if r[2] is None]
        f = _Families(self._region)
        online = f.gauge("device_online", "1 while the device is connected.")
        last_seen = f.gauge("device_last_seen_timestamp_seconds", "The device's latest presence or status, hub clock.")
        last_reading = f.gauge("device_last_reading_timestamp_seconds",
                               "When the device's newest reading at the hub was taken, device clock.")
        backlog = f.gauge("device_backlog", "Readings in the device's outbox not yet acknowledged, as last reported.")
        failures = f.counter("device_sensor_failures", "Failed sensor reads since the agent started, as last reported.",
                             "sensor")
        expiry = f.gauge("device_certificate_expiry_seconds",
                         "Seconds until the device's newest unrevoked certificate expires (negative: expired).")
        covered = assigned = on_intended = drifted = 0
        for (device, is_online, _, seen, queued, version, sensor_failures, connected_at, intended, assigned_at,
             not_after, newest) in live:
            online.add_metric([self._region, device], int(bool(is_online)))
            if seen is not None:
                last_seen.add_metric([self._region, device], seen)
            if newest is not None:
                last_reading.add_metric([self._region, device], newest)
                covered += newest >= now - COVERAGE_WINDOW_S
            if queued is not None:
                backlog.add_metric([self._region, device], queued)
            for sensor, count in sorted(_json_object(sensor_failures).items()):
                if isinstance(count, int):
                    failures.add_metric([self._region, device, sensor], count)
            if not_after is not None:
                expiry.add_metric([self._region, device], not_after - now)
            if intended is not None:
                assigned += 1
                on_intended += version == intended
                # The same test as hub.db.rows.device_row (edge-hub devices / status).
                off_since = max(assigned_at or 0.0, connected_at or 0.0)
                drifted += bool(is_online) and version != intended and now - off_since > self._drift_grace_s
        yield f.gauge("devices_registered", "Devices registered and not revoked.", value=len(live))
        yield f.gauge("devices_online", "Registered devices connected now.", value=sum(bool(r[1]) for r in live))
        yield f.gauge("devices_revoked", "Devices revoked.", value=len(rows) - len(live))
        yield f.gauge("telemetry_covered_devices",
                      f"Registered devices with a reading taken in the last {COVERAGE_WINDOW_S:g} s at the hub.",
                      value=covered)
        ratio = f.gauge("telemetry_coverage_ratio", "Share of registered devices with a reading taken in the last "
                        f"{COVERAGE_WINDOW_S:g} s at the hub (absent without devices).")
        if live:
            ratio.add_metric([self._region], covered / len(live))
        yield ratio
        yield f.gauge("policy_devices_assigned", "Registered devices the hub intends a policy version for.",
                      value=assigned)
        yield f.gauge("policy_devices_on_intended", "Registered devices running their intended policy version.",
                      value=on_intended)
        yield f.gauge("policy_devices_drifted", "Online devices off their intended policy version for longer than "
                      "rollout.drift_grace_s.", value=drifted)
        yield from (online, last_seen, last_reading, backlog, failures, expiry)

    # --- ingest -------------------------------------------------------------------------------

    def _ingest(self, db: sqlite3.Connection, now: float) -> Iterator[Metric]:
        f = _Families(self._region)
        start = (now // 60 - INGEST_RATE_MINUTES + 1) * 60  # whole minutes, the current one so far
        span = max(now - start, 1.0)
        per_hub = {hub: (records / span, messages / span) for hub, records, messages in db.execute(
            "SELECT hub, SUM(records), SUM(messages) FROM ingest_minutes WHERE minute >= ? GROUP BY hub ORDER BY hub",
            (int(start // 60),))}
        by_hub = _Families(self._region, key="hub")
        yield by_hub.per_key("ingest_records_per_second", "Records each hub process (the primary, each replica) "
                             f"committed a second, over the last {INGEST_RATE_MINUTES - 1} to {INGEST_RATE_MINUTES} "
                             "minutes of the hub clock.", {h: r[0] for h, r in per_hub.items()}, per_hub)
        yield by_hub.per_key("ingest_messages_per_second", "MQTT messages each hub process took in a second, over "
                             "the same window.", {h: r[1] for h, r in per_hub.items()}, per_hub)
        f = _Families(self._region)
        acked = f.counter("ingest_acked_records", "Records the hub committed and acknowledged, by device (its "
                          "watermark: readings, events and numbers the device shed); rate() is the ingest rate.")
        for device, through in db.execute(
                "SELECT i.device, i.acked_through FROM ingest i JOIN devices d USING (device) "
                "WHERE d.revoked_at IS NULL ORDER BY i.device"):
            acked.add_metric([self._region, device], through)
        yield acked
        shed = f.counter("device_readings_shed", "Readings the device shed by quota, by metric, as last reported.",
                         "metric")
        for device, metric, count in db.execute(
                "SELECT r.device, r.metric, r.count FROM drops r JOIN devices d USING (device) "
                "WHERE d.revoked_at IS NULL ORDER BY r.device, r.metric"):
            shed.add_metric([self._region, device, metric], count)
        yield shed
        conflicts = dict(db.execute("SELECT device, SUM(conflicts) FROM ingest_instances GROUP BY device "
                                    "HAVING SUM(conflicts) > 0 ORDER BY device").fetchall())
        yield f.per_key("device_identity_conflicts", "Times the hub found two machines numbering a device's records "
                        "with its one certificate (a cloned image; hub/db/identities.py).", conflicts, conflicts,
                        counter=True)
        rejects = CounterMetricFamily("edgefleet_ingest_rejects", "Messages the hub rejected, by reason.",
                                      labels=["region", "reason"])
        for reason, count in db.execute("SELECT reason, count FROM rejects ORDER BY reason"):
            rejects.add_metric([self._region, reason], count)
        yield rejects
        yield self._foreign_subscriptions(db)
        removed = dict(db.execute("SELECT tbl, removed FROM retention ORDER BY tbl").fetchall())
        yield _Families(self._region, key="table").per_key(
            "retention_removed_rows", "Readings (table telemetry) and events retention removed, for being older "
            "than hub.toml [retention] allows.", removed, ("events", "telemetry"), counter=True)

    def _foreign_subscriptions(self, db: sqlite3.Connection) -> Metric:
        foreign = _Families(self._region).counter(
            "foreign_subscriptions", "Subscriptions a device made outside its own down/ topics, as the hub noticed "
            f"them (once per device and filter every {NOTICE_INTERVAL_S:g} s): who probes the hub's messages.")
        named = JSON_FIELD[self._dialect].format("body", "device")
        for device, count in db.execute(
                f"SELECT {named}, COUNT(*) FROM events WHERE device = ? AND kind = ? "  # noqa: S608  # ours
                f"AND {named} IS NOT NULL GROUP BY 1 ORDER BY 1", (self._identity, FOREIGN)):
            foreign.add_metric([self._region, str(device)], count)
        return foreign

    # --- actions and decision latency --------------------------------------------------------

    def _actions(self, db: sqlite3.Connection) -> Iterator[Metric]:
        tallies = self._tally(db)
        live = {d for (d,) in db.execute("SELECT device FROM devices WHERE revoked_at IS NULL")}
        f = _Families(self._region)
        outcomes = f.counter("actions", "Rule actions the devices audited, by outcome.", "outcome")
        refusals = f.counter("coordination_refusals", "Actions refused for want of a lease or an approval.", "need")
        region = LatencyTally()
        for device, tally in sorted(tallies.items()):
            region.include(tally.latency)
            if device not in live:
                continue
            for outcome in OUTCOMES.values():
                outcomes.add_metric([self._region, device, outcome], tally.outcomes[outcome])
            for _, need in REFUSAL_NEEDS:
                refusals.add_metric([self._region, device, need], tally.refusals[need])
        latency = HistogramMetricFamily(
            "edgefleet_decision_latency_seconds",
            "Rule decisions in the region, sample arrival to the actuator starting, as the devices audited them.",
            labels=["region"])
        latency.add_metric([self._region], region.cumulative(), region.sum_s)
        yield from (outcomes, refusals, latency)

    def _tally(self, db: sqlite3.Connection) -> dict[str, ActionTally]:
        """Each device's action events: settled counts kept from earlier scrapes plus what is new."""
        marks = {d: int(w) for d, w in db.execute("SELECT device, acked_through FROM ingest")}
        base = {d: s.through if (s := self._settled.get(d)) and s.through <= marks[d] else 0 for d in marks}
        settling: dict[str, ActionTally] = collections.defaultdict(ActionTally)
        unsettled: dict[str, ActionTally] = collections.defaultdict(ActionTally)
        for kind, outcome in OUTCOMES.items():
            # One index seek per device and kind (events_kind is (kind, device, seq)).
            for device, seq, body in db.execute(
                    f"SELECT m.key, e.seq, e.body FROM {JSON_OBJECT_ROWS[self._dialect]} m CROSS JOIN events e "  # noqa: S608  # ours
                    "WHERE e.kind = ? AND e.device = m.key AND e.seq > m.value", (json.dumps(base), kind)):
                (settling if seq <= marks[device] else unsettled)[device].add(outcome, body)
        # Only now, with every row read: a failed read must not count anything twice.
        kept: dict[str, _Settled] = {}
        out: dict[str, ActionTally] = {}
        for device, mark in marks.items():
            old = self._settled.get(device)
            settled = old if old is not None and base[device] == old.through else _Settled()
            if device in settling:
                settled.tally.include(settling[device])
            settled.through = mark
            kept[device], out[device] = settled, settled.tally
            if device in unsettled:
                out[device] = ActionTally()
                out[device].include(settled.tally)
                out[device].include(unsettled[device])
        self._settled = kept
        return out

    # --- leases ---------------------------------------------------------------------------------

    def _leases(self, db: sqlite3.Connection, now: float) -> Iterator[Metric]:
        f = _Families(self._region, key="lease")
        grants = dict(db.execute("SELECT name, last_token FROM leases"))
        holders = dict(db.execute("SELECT name, COUNT(*) FROM lease_holders GROUP BY name"))
        queue = {name: (n, oldest) for name, n, oldest in db.execute(
            "SELECT name, COUNT(*), MIN(requested_at) FROM lease_queue GROUP BY name")}
        names = sorted(grants.keys() | holders.keys() | queue.keys())
        yield f.per_key("lease_grants", "Leases granted (the latest fencing token).", grants, names, counter=True)
        yield f.per_key("lease_holders", "Devices holding the lease now.", holders, names)
        yield f.per_key("lease_queued", "Lease requests waiting in the queue now (coordination conflicts).",
                        {n: q[0] for n, q in queue.items()}, names)
        yield f.per_key("lease_longest_wait_seconds", "How long the oldest queued request has waited.",
                        {n: max(now - q[1], 0.0) for n, q in queue.items()}, names)
        (expired,) = db.execute("SELECT COUNT(*) FROM events WHERE kind = ? AND device = ?",
                                (EventKind.LEASE_EXPIRED, self._identity)).fetchone()
        yield f.counter("lease_expiries", "Leases taken back at their TTL (the holder never released them).",
                        value=expired)

    # --- the hub's own certificates, the CRL, in-band renewals ------------------------------

    def _pki(self, db: sqlite3.Connection, now: float) -> Iterator[Metric]:
        f = _Families(self._region)
        (server,) = db.execute("SELECT MAX(not_after) FROM certificates WHERE purpose = 'server'").fetchone()
        broker = f.gauge("server_certificate_expiry_seconds", "Seconds until the broker's newest server certificate "
                         "expires (the hub renews it once pki.server_cert_renew_fraction of its life is left).")
        if server is not None:
            broker.add_metric([self._region], server - now)
        hubs = dict(db.execute("SELECT device, MAX(not_after) - ? FROM certificates WHERE purpose = 'hub' "
                               "GROUP BY device", (now,)))
        yield broker
        yield _Families(self._region, key="hub").per_key(
            "hub_certificate_expiry_seconds", "Seconds until each hub process's newest client certificate expires.",
            hubs, sorted(hubs))
        crl = f.gauge("crl_next_update_seconds", "Seconds until the CRL's next update: past it, the broker refuses "
                      "every device (absent: the CRL cannot be read).")
        next_update = _crl_next_update(HubPaths(self._db_path.parent).crl)  # the hub's layout: beside hub.db
        if next_update is not None:
            crl.add_metric([self._region], next_update - now)
        yield crl
        outcomes = dict(db.execute("SELECT kind, COUNT(*) FROM events WHERE device = ? AND kind IN (?, ?) "
                                   "GROUP BY kind", (self._identity, EventKind.CERT_ISSUED, EventKind.CERT_REFUSED)))
        renewals = CounterMetricFamily("edgefleet_certificate_renewals", "Devices' in-band certificate requests, by "
                                       "outcome (refused: audited as cert_refused hub events).",
                                       labels=["region", "outcome"])
        for outcome, kind in (("issued", EventKind.CERT_ISSUED), ("refused", EventKind.CERT_REFUSED)):
            renewals.add_metric([self._region, outcome], outcomes.get(kind, 0))
        yield renewals
        enrollments = CounterMetricFamily(
            "edgefleet_enrollment_requests", "Enrollment requests at the hub's HTTPS endpoint, by outcome: issued, "
            "pending, refused_REASON, rate_limited, busy, tls_failed, incomplete (flushed every few seconds).",
            labels=["region", "outcome"])
        for outcome, count in db.execute("SELECT outcome, count FROM enroll_counts ORDER BY outcome"):
            enrollments.add_metric([self._region, outcome], count)
        yield enrollments


def _crl_next_update(path: Path) -> float | None:
    """The CRL's nextUpdate (epoch seconds), or None when it cannot be read."""
    from cryptography import x509

    try:
        next_update = x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return None
    return None if next_update is None else next_update.timestamp()


class _Families:
    """Families named edgefleet_*, labelled `region`, then `device` (or `key`) and one more label if given."""

    def __init__(self, region: str, key: str = "device") -> None:
        self._region, self._key = region, key

    def gauge(self, name: str, doc: str, extra: str | None = None, *, value: float | None = None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"edgefleet_{name}", doc, labels=self._labels(value, extra))
        if value is not None:
            family.add_metric([self._region], value)
        return family

    def counter(self, name: str, doc: str, extra: str | None = None, *,
                value: float | None = None) -> CounterMetricFamily:
        family = CounterMetricFamily(f"edgefleet_{name}", doc, labels=self._labels(value, extra))
        if value is not None:
            family.add_metric([self._region], value)
        return family

    def per_key(self, name: str, doc: str, values: Mapping[str, float], keys: Iterable[str], *,
                counter: bool = False) -> Metric:
        family = self.counter(name, doc) if counter else self.gauge(name, doc)
        for key in keys:
            family.add_metric([self._region, key], values.get(key, 0))
        return family

    def _labels(self, value: float | None, extra: str | None) -> list[str]:
        if value is not None:
            return ["region"]  # a region-wide figure
        return ["region", self._key, *([extra] if extra else [])]


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = read_json(text) if text else {}
    except ProtocolError:
        return {}
    return value if isinstance(value, dict) else {}


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection of its own (mode=ro: this side can never write the hub's database)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_TIMEOUT_S,
                           isolation_level=None, check_same_thread=False)


def render(db_path: Path, region: str, *, drift_grace_s: float = RolloutConf().drift_grace_s,
           now: float | None = None, database: str = "") -> bytes:
    """The text exposition of the hub database at `db_path`, as one scrape sees it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(db_path, region, drift_grace_s=drift_grace_s,
                                   clock=time.time if now is None else lambda: now, database=database))
    return generate_latest(registry)


async def serve_metrics(db_path: Path, listen: str, port: int, region: str, *,
                        drift_grace_s: float = RolloutConf().drift_grace_s, database: str = "") -> None:
    """Serve GET /metrics on listen:port until cancelled; port 0: off (returns at once).

    Each scrape reads the database in a worker thread; the event loop only moves bytes.
    Raises MetricsError when the port cannot be bound.
    """
    if not port:
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(db_path, region, drift_grace_s=drift_grace_s, database=database))
    one_at_a_time = asyncio.Lock()  # a burst of scrapes queues here, not in the thread pool

    async def scrape() -> bytes:
        async with one_at_a_time:
            return await asyncio.to_thread(generate_latest, registry)

    try:
        async with exposition_server(listen, port, scrape):
            await asyncio.Future()  # until cancelled
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {listen}:{port} ({exc.strerror or exc}): choose another "
                           "[metrics] port in hub.toml, or 0 to turn them off") from exc
