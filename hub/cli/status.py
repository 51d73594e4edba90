"""`edge-hub status`: the region's figures and everything that needs a person, on one screen.

The figures are the metrics endpoint's (hub/metrics.py HubCollector, one read of the
database), so the screen and Prometheus never disagree on what a number means.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgefleet.wire.events import EventKind
from hub.cli.format import event_detail, when  # the listing commands' formats
from hub.config import HubConfig, HubPaths
from hub.db.dialect import JSON_FIELD
from hub.db.engines import open_store
from hub.db.interface import redact
from hub.db.rows import EventRow, iso
from hub.metrics import COVERAGE_WINDOW_S, INGEST_RATE_MINUTES, HubCollector
from hub.pki import renewal
from hub.rollout import rollouts as rollout

LIST_LINES: Final = 10  # per list on the screen; --json has them all
EXPIRY_WARNING_DAYS: Final = 14  # certificates (devices' and the broker's) listed this long before they expire
# An alert stays on the screen this long after the device raised it (its clock): the next shift sees it too.
ALERT_SHOWN_S: Final = 24 * 3600.0
ENROLL_REFUSALS_SHOWN_S: Final = 24 * 3600.0  # enrollment refusals listed by edge-hub status: the last day ...
ENROLL_REFUSALS_SHOWN: Final = 50  # ... at most this many (each audited refusal is one; repeats are only counted)
ALERT_SEVERITIES: Final = ("critical", "warning")  # "info" is for the record (edge-hub events), not a person


@dataclass(frozen=True)
class Figures:
    """The metrics samples of one collect(), by family name and labels."""

    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def collect(cls, collector: HubCollector) -> Figures:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in collector.collect():
            for sample in family.samples:
                samples.setdefault(sample.name.removeprefix("edgefleet_"), []).append((sample.labels, sample.value))
        return cls(samples)

    def total(self, name: str, **labels: str) -> float:
        return sum(v for sample_labels, v in self.samples.get(name, [])
                   if all(sample_labels.get(k) == want for k, want in labels.items()))

    def largest(self, name: str) -> float:
        return max((v for _, v in self.samples.get(name, [])), default=0.0)

    def quantile_bound(self, name: str, q: float) -> float | None:
        """The smallest histogram bucket bound holding the q quantile (None without observations)."""
        buckets = sorted((float(labels["le"]), v) for labels, v in self.samples.get(f"{name}_bucket", []))
        count = self.total(f"{name}_count")
        if not count:
            return None
        return next(bound for bound, cumulative in buckets if cumulative >= q * count)


def summarize(figures: Figures) -> dict[str, Any]:
    registered = figures.total("devices_registered")
    covered = figures.total("telemetry_covered_devices")
    succeeded, failed = figures.total("actions_total", outcome="succeeded"), figures.total("actions_total",
                                                                                         outcome="failed")
    p99 = figures.quantile_bound("decision_latency_seconds", 0.99)
    return {
        "coverage": {"covered": int(covered), "registered": int(registered), "window_s": COVERAGE_WINDOW_S,
                     "ratio": covered / registered if registered else None},
        "ingest": {"records_per_s": figures.total("ingest_records_per_second"),
                   "records_per_s_by_hub": {labels["hub"]: v for labels, v in
                                            figures.samples.get("ingest_records_per_second", [])},
                   "messages_per_s": figures.total("ingest_messages_per_second"),
                   "window_minutes": INGEST_RATE_MINUTES,
                   "rejected": int(figures.total("ingest_rejects_total"))},
        "backlog": {"readings": int(figures.total("device_backlog")),
                    "shed": int(figures.total("device_readings_shed_total"))},
        "actions": {"succeeded": int(succeeded), "failed": int(failed),
                    "refused": int(figures.total("actions_total", outcome="refused")),
                    "skipped": int(figures.total("actions_total", outcome="skipped")),
                    "success_ratio": succeeded / (succeeded + failed) if succeeded + failed else None,
                    "refused_for_coordination": int(figures.total("coordination_refusals_total")),
                    "decision_latency_p99_bound_s": None if p99 is None or p99 == float("inf") else p99},
        "policy": {"assigned": int(figures.total("policy_devices_assigned")),
                   "on_intended": int(figures.total("policy_devices_on_intended"))},
        "leases": {"held": int(figures.total("lease_holders")), "waiting": int(figures.total("lease_queued")),
                   "longest_wait_s": figures.largest("lease_longest_wait_seconds"),
                   "expired_at_ttl": int(figures.total("lease_expiries_total"))},
    }


@dataclass(frozen=True)
class Status:
    report: dict[str, Any]  # JSON-able: the contract of `edge-hub status --json`
    escalations: list[EventRow]  # the same events as rows, for the screen's short detail
    now: float


async def build(paths: HubPaths, config: HubConfig, now: float | None = None) -> Status:
    """The whole status, read in one go."""
    now = time.time() if now is None else now
    store = await open_store(config.database.url, paths.db)
    try:
        devices = await store.devices(drift_grace_s=config.rollout.drift_grace_s)
        escalations = await store.latest_escalations()
        alerts = await store.latest_alerts(now - ALERT_SHOWN_S, ALERT_SEVERITIES)
        recent = await rollout.recent(store, limit=1)
        in_progress = await rollout.in_progress(store)
        pending = await store.query("SELECT id, device, rule, action, expires_at FROM approvals "
                                    "WHERE state = 'pending' ORDER BY id")
        leaders = await store.query("SELECT holder, since, expires_at FROM leadership WHERE role = 'region'")
        lifecycle = await renewal.lifecycle_status(paths, config, store, now)
        field = JSON_FIELD[store.dialect]
        enroll_refused = await store.query(
            f"SELECT ts, {field.format('body', 'device')}, {field.format('body', 'enrollment')}, "  # noqa: S608  # ours
            f"{field.format('body', 'reason')}, {field.format('body', 'detail')} FROM events WHERE device = ? "
            "AND kind = ? AND ts > ? ORDER BY seq DESC LIMIT ?",
            (config.identity, EventKind.ENROLL_REFUSED, now - ENROLL_REFUSALS_SHOWN_S, ENROLL_REFUSALS_SHOWN))
        # Field sensors whose latest state change (sense/field/base.py events) says failing.
        sensor = field.format("body", "sensor")
        sensors_failing = await store.query(
            f"SELECT e.device, e.ts, {field.format('e.body', 'sensor')}, {field.format('e.body', 'error')} "  # noqa: S608
            f"FROM events e JOIN (SELECT device, MAX(seq) AS seq FROM events WHERE kind IN (?, ?) "
            f"AND {sensor} IS NOT NULL GROUP BY device, {sensor}) latest USING (device, seq) "
            "WHERE e.kind = ? ORDER BY e.device, e.ts",
            (EventKind.SENSOR_FAILING, EventKind.SENSOR_RECOVERED, EventKind.SENSOR_FAILING))
        clones = await store.query("SELECT device, COUNT(*), SUM(conflicts), MAX(conflict_at) FROM ingest_instances "
                                   "GROUP BY device HAVING SUM(conflicts) > 0 ORDER BY device")
    finally:
        await store.close()
    # In a thread: the collector reads PostgreSQL through an event loop of its own.
    figures = await asyncio.to_thread(Figures.collect, HubCollector(
        paths.db, config.region, drift_grace_s=config.rollout.drift_grace_s, clock=lambda: now,
        database=config.database.url))
    live = [d for d in devices if not d.revoked]
    offline = [d for d in live if not d.online]
    expiring = [d for d in live if d.cert_expires is not None
                and epoch(d.cert_expires) - now <= EXPIRY_WARNING_DAYS * 86400]
    crl_next, crl_error = crl_next_update(paths.crl)
    own = [{**c, "expiring": c["expires"] is not None and epoch(c["expires"]) - now <= EXPIRY_WARNING_DAYS * 86400}
           for c in lifecycle["hub_certificates"]]
    rejects = {s[0]["reason"]: int(s[1]) for s in figures.samples.get("ingest_rejects_total", [])}
    return Status({
        "database": {"engine": store.dialect, "where": redact(config.database.url) or str(paths.db)},
        "devices": {"total": len(devices), "online": len(live) - len(offline), "offline": len(offline),
                    "revoked": len(devices) - len(live)},
        "leader": ({"hub": leaders[0][0], "since": leaders[0][1], "expires_at": leaders[0][2],
                    "current": leaders[0][2] >= now} if leaders else None),
        "figures": summarize(figures),
        "offline": [{"device": d.device, "last_seen": d.last_seen} for d in offline],
        "escalations": [_escalation(e) for e in escalations],
        "alerts": [{"device": e.device, "severity": e.body.get("severity"), "message": e.body.get("message"),
                    "ts": e.ts, "seq": e.seq, "count": n} for e, n in alerts],
        "rejects": dict(sorted(rejects.items())),
        "crl": {"next_update": crl_next, "overdue": crl_next is not None and epoch(crl_next) < now,
                "error": crl_error},
        "hub_certificates": own,
        "cert_expiring": [{"device": d.device, "cert_expires": d.cert_expires} for d in expiring],
        "cert_expired": lifecycle["cert_expired"],
        "renewal_refused": lifecycle["renewal_refused"],
        "clock_skew": lifecycle["clock_skew"],
        "rollout": recent[0] if recent else None,
        "rollouts_in_progress": in_progress,  # several run side by side on disjoint devices
        "approvals_pending": [{"id": a[0], "device": a[1], "rule": a[2], "action": a[3], "expires_at": a[4]}
                              for a in pending],
        "policy_drifted": [{"device": d.device, "applied": d.policy_version, "intended": d.policy_intended,
                            "refused": d.policy_refused} for d in live if d.policy_drifted],
        "identity_conflicts": [{"device": c[0], "instances": c[1], "conflicts": c[2], "latest": c[3]}
                               for c in clones],
        "enroll_refused": [{"ts": r[0], "device": r[1], "enrollment": r[2], "reason": r[3], "detail": r[4]}
                           for r in enroll_refused],
        "field_sensors_failing": [{"device": r[0], "since": r[1], "sensor": r[2], "error": r[3]}
                                  for r in sensors_failing],
    }, escalations, now)


def _escalation(e: EventRow) -> dict[str, Any]:
    return {"device": e.device, "rule": e.rule, "reason": e.body.get("reason"), "detail": e.body.get("detail"),
            "ts": e.ts, "seq": e.seq, "policy_version": e.policy_version}


def render(status: Status) -> str:
    """The one screen: the figures first, then what needs a person."""

    report, escalations, now = status.report, status.escalations, status.now
    n, f = report["devices"], report["figures"]
    lines = [f"database: {report['database']['engine']} {report['database']['where']}",
             _leader_line(report["leader"], now),
             f"devices: {n['total']} total, {n['online']} online, {n['offline']} offline, {n['revoked']} revoked"]
    lines += _figure_lines(f)
    lines.append("needs a person:")
    lines += _capped([f"  offline  {d['device']}  last seen {d['last_seen'] or 'never'}" for d in report["offline"]],
                     "edge-hub devices")
    lines.append(f"escalations (latest per device and rule): {len(escalations) or 'none'}")
    lines += _capped([f"  {when(e.ts)}  {e.device}  {e.rule or '-'}  {event_detail(e.kind, e.body)}"
                      for e in escalations], "edge-hub events --kind escalation")
    alerts = report["alerts"]
    lines.append(f"alerts (warning and critical, latest per device and message, last {ALERT_SHOWN_S / 3600:g} h): "
                 f"{len(alerts) or 'none'}")
    lines += _capped([f"  {when(a['ts'])}  {a['device']}  {event_detail(EventKind.ALERT, a)}"
                      + (f"  ({a['count']} times)" if a["count"] > 1 else "") for a in alerts],
                     "edge-hub events --kind alert")
    failing = report["field_sensors_failing"]
    lines.append(f"field sensors failing (the device's latest word on each): {len(failing) or 'none'}")
    lines += _capped([f"  {when(r['since'])}  {r['device']}  {r['sensor']}: {r['error']}" for r in failing],
                     "edge-hub events --kind sensor_failing")
    total = sum(report["rejects"].values())
    lines.append(f"rejected messages: {total}" + (" (" + ", ".join(
        f"{reason} {count}" for reason, count in report["rejects"].items()) + ")" if total else ""))
    crl = report["crl"]
    lines.append(f"CRL: {crl['error']}" if crl["error"] else
                 f"CRL next update: {crl['next_update']}" + ("  OVERDUE" if crl["overdue"] else ""))
    lines.append("hub certificates: " + "; ".join(
        f"{c['certificate']}: {c['error']}" if c["error"] else
        f"{c['certificate']} expires {c['expires']}" + (" SOON" if c["expiring"] else "")
        for c in report["hub_certificates"]))
    latest = report["rollout"]
    if latest is not None:
        reason = f" ({latest['reason']})" if latest["reason"] else ""
        lines.append(f"latest policy rollout: {latest['rollout']}, version {latest['version']}, "
                     f"{latest['state'].replace('_', ' ')}{reason}")
    if len(report["rollouts_in_progress"]) > 1:
        lines.append("policy rollouts in progress side by side: " + "; ".join(
            f"{r['rollout']} (version {r['version']} to {r['target']})" for r in report["rollouts_in_progress"]))
    pending = report["approvals_pending"]
    lines.append(f"approvals pending: {len(pending) or 'none'}")
    lines += _capped([f"  {a['id']:>5}  {a['device']}  rule {a['rule']}: {a['action']}  expires "
                      f"{when(a['expires_at'])}  (edge-hub approvals approve|deny {a['id']})" for a in pending],
                     "edge-hub approvals")
    refused = report["enroll_refused"]
    lines.append(f"enrollments refused (last {ENROLL_REFUSALS_SHOWN_S / 3600:g} h, newest first): "
                 f"{len(refused) or 'none'}")
    lines += _capped([f"  {when(r['ts'])}  {r['device'] or '-'}  enrollment {r['enrollment']}  {r['reason']}: "
                      f"{r['detail']}" for r in refused], "edge-hub events --kind enroll_refused")
    drifted = report["policy_drifted"]
    lines.append(f"devices off their intended policy (drifted): {len(drifted) or 'none'}")
    lines += _capped([f"  {d['device']}  runs {d['applied'] or 'none'}, should run {d['intended']}"
                      + (f"; refused it: {d['refused'].get('reason')}" if d["refused"] else "") for d in drifted],
                     "edge-hub policy status")
    clones = report["identity_conflicts"]
    lines.append(f"certificates in use on more than one machine (cloned images): {len(clones) or 'none'}")
    lines += _capped([f"  {c['device']}  {c['instances']} machines use its certificate, latest conflict "
                      f"{when(c['latest'])}: provision the copy as a device of its own" for c in clones],
                     "edge-hub events --kind identity_conflict")
    expiring = report["cert_expiring"]
    lines.append(f"certificates expiring within {EXPIRY_WARNING_DAYS} days: {len(expiring) or 'none'}")
    lines += _capped([f"  {d['device']}  {'expired' if epoch(d['cert_expires']) < now else 'expires'} "
                      f"{d['cert_expires']}" for d in expiring], "edge-hub devices")
    expired = report["cert_expired"]
    lines.append(f"devices whose certificate expired (they cannot renew in band): {len(expired) or 'none'}")
    lines += _capped([f"  {d['device']}  expired {d['cert_expires']}, last seen {d['last_seen'] or 'never'}: "
                      f"re-provision from a CSR made on it ({d['fix']})" for d in expired], "--json")
    refused = report["renewal_refused"]
    lines.append(f"in-band renewals refused (latest per device, not renewed since): {len(refused) or 'none'}")
    lines += _capped([f"  {when(r['ts'])}  {r['device']}  {r['reason']}: {r['detail']}" for r in refused],
                     "edge-hub events --kind cert_refused")
    skewed = report["clock_skew"]
    lines.append(f"devices whose clock disagrees with their certificate (set it: NTP): {len(skewed) or 'none'}")
    lines += _capped([f"  {d['device']}  clock {d['clock_minus_start_s'] / 86400:+.1f} days from the certificate's "
                      "start when first seen" for d in skewed], "edge-hub events --kind cert_clock_skew")
    return "\n".join(lines)


def _capped(lines: list[str], where: str) -> list[str]:
    """At most LIST_LINES of a list, then where to see the rest: the screen stays one screen."""
    if len(lines) <= LIST_LINES:
        return lines
    return [*lines[:LIST_LINES - 1], f"  ... and {len(lines) - LIST_LINES + 1} more ({where}, or --json)"]


def _figure_lines(f: dict[str, Any]) -> list[str]:
    cov, ing, act, pol, lease = f["coverage"], f["ingest"], f["actions"], f["policy"], f["leases"]
    ratio = f" ({cov['ratio']:.0%})" if cov["ratio"] is not None else ""
    success = f", {act['success_ratio']:.1%} success" if act["success_ratio"] is not None else ""
    p99 = act["decision_latency_p99_bound_s"]
    return [
        f"telemetry coverage: {cov['covered']}/{cov['registered']} devices{ratio} with a reading taken "
        f"in the last {cov['window_s']:g} s",
        f"ingest: {ing['records_per_s']:,.0f} records/s, {ing['messages_per_s']:,.1f} messages/s "
        f"(last {ing['window_minutes'] - 1}-{ing['window_minutes']} min{_shares(ing)}); device backlogs "
        f"{f['backlog']['readings']:,} readings, {f['backlog']['shed']:,} shed",
        f"actions: {act['succeeded']} succeeded, {act['failed']} failed{success}, {act['refused']} refused "
        f"({act['refused_for_coordination']} for a lease or an approval), {act['skipped']} skipped"
        + (f"; decision latency p99 <= {p99 * 1000:g} ms" if p99 is not None else ""),
        f"policy: {pol['on_intended']} of {pol['assigned']} assigned devices on their intended version",
        f"leases: {lease['held']} held, {lease['waiting']} waiting"
        + (f" (longest {lease['longest_wait_s']:.1f} s)" if lease["waiting"] else "")
        + f", {lease['expired_at_ttl']} taken back at their TTL",
    ]


def _leader_line(leader: dict[str, Any] | None, now: float) -> str:
    """Which hub process leads the region; none current means no hub process is running it."""
    if leader is None:
        return "hub: no hub process has run on this database yet (edge-hub run)"
    if not leader["current"]:
        return (f"hub: NOT RUNNING: the last leader, {leader['hub']}, stopped renewing at "
                f"{iso(leader['expires_at'])} (edge-hub run; journalctl -u edge-hub)")
    return f"hub: {leader['hub']} leads the region (since {iso(leader['since'])})"


def _shares(ingest: dict[str, Any]) -> str:
    """Each hub process's share of the ingest, when replicas share it."""
    rates: dict[str, float] = ingest["records_per_s_by_hub"]
    total = sum(rates.values())
    if len(rates) < 2 or not total:
        return ""
    return "; " + ", ".join(f"{hub} {rate / total:.0%}" for hub, rate in rates.items())


def epoch(iso_time: str) -> float:
    return dt.datetime.fromisoformat(iso_time).timestamp()


def crl_next_update(path: Path) -> tuple[str | None, str | None]:
    """The CRL's next update (ISO 8601, UTC), or why it could not be read."""
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    next_update = crl.next_update_utc
    if next_update is None:
        return None, f"{path} has no next update"
    return next_update.isoformat(timespec="seconds"), None
