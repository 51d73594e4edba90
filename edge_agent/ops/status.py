"""`edge-agent status`: one device's state, read from its files, also while the agent runs.

Nothing here writes. The outbox is read in one read-only snapshot (the agent keeps writing
meanwhile); the stored signed policy is checked the way the agent checks it at start.
Whether the agent runs is read from the outbox's SQLite lock: every process that has the
outbox open holds a read lock on one byte of its `-shm` file, and F_GETLK names the process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

import msgspec

from edge_agent.buffer.outbox import DB_NAME, QUOTA_TARGET
from edge_agent.config import AgentSettings
from edge_agent.decide.policy_intake import PolicyIntake
from edge_agent.identity.enroll import EnrollStatus
from edge_agent.identity.enroll import read_status as read_enroll_status
from edge_agent.identity.tls import IdentityFiles
from edge_agent.sense.field.base import HEALTH_FILE
from edgefleet.policy.document import Policy
from edgefleet.runtime.logfmt import redact
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import FieldHealth, json_body

ERROR_KINDS: Final = (EventKind.POLICY_REFUSED, EventKind.ACTION_FAILED, EventKind.ESCALATION, EventKind.OUTBOX_CORRUPT,
                      EventKind.ALERT)
ERRORS_SHOWN: Final = 8  # the newest; the rest are counted, so the text stays on one screen
DETAIL_WIDTH: Final = 100  # characters of an error's detail in the text output
# A connected agent has its records acknowledged within seconds (unacknowledged batches are
# resent after uplink.ack_timeout); waiting longer than this means the hub is not taking them.
STALE_AFTER_S: Final = 120.0
STALE_ACK_TIMEOUTS: Final = 4  # ...or this many ack timeouts, when the device is configured slower
SHM_DMS_BYTE: Final = 128  # SQLite's unix VFS: each connection read-locks this byte of -shm while open
# struct flock with a 64-bit off_t (CPython is built with large-file support): type, whence, start, len, pid.
_FLOCK: Final = "@hhqqi0q"

class AgentProcess(msgspec.Struct, frozen=True):
    state: Literal["running", "not running", "unknown"]
    pid: int | None = None  # None also when the process is in another PID namespace
    detail: str = ""


class OutboxState(msgspec.Struct, frozen=True):
    path: str
    error: str | None = None  # why it could not be read; the other fields are then zero
    backlog: int = 0  # committed records the hub has not acknowledged (readings + events)
    readings: int = 0
    events: int = 0
    acked_through: int = 0  # the hub's end-to-end acknowledgment: every seq <= this is committed there
    last_seq: int = 0
    oldest_waiting_ts: float | None = None  # when the oldest unacknowledged record was taken
    bytes: int = 0
    quota_bytes: int = 0
    dropped: int = 0  # readings shed over quota since this outbox was created
    corrupt_kept: list[str] = []  # outboxes found corrupt and moved aside, never deleted


class StoredRefusal(msgspec.Struct, frozen=True):
    version: int
    reason: str
    detail: str


class PolicyState(msgspec.Struct, frozen=True):
    in_force: Literal["signed", "local", "none"]  # what the agent runs when it (re)starts now
    version: int  # the signed version in force (0: none)
    rules: int
    withdrawn: bool  # the hub withdrew its policies (signed version `version`): the local file runs
    stored: str
    stored_refused: StoredRefusal | None  # the stored signed policy does not check out any more
    local: str | None  # the local policy file, if agent.toml names one
    local_rules: int | None


class RecentError(msgspec.Struct, frozen=True):
    seq: int
    ts: float
    kind: str
    rule: str | None
    policy_version: int | None
    detail: str


class FieldSensorsState(msgspec.Struct, frozen=True):
    """The field sensors' health as the agent last wrote it (sense/field/base.py)."""

    ts: float | None = None  # when it was written; None: the agent never wrote it
    sensors: dict[str, FieldHealth] = {}


class DeviceStatus(msgspec.Struct, frozen=True):
    device: str
    profile: str
    config: str
    healthy: bool
    attention: list[str]
    agent: AgentProcess
    outbox: OutboxState
    policy: PolicyState
    recent_errors: list[RecentError]  # newest first, at most ERRORS_SHOWN, unacknowledged only
    recent_errors_total: int
    enrollment: EnrollStatus | None = None  # an image folder's device: its latest enrollment attempt
    field_sensors: FieldSensorsState = FieldSensorsState()


def collect(settings: AgentSettings, local: Policy | None, now: float | None = None) -> DeviceStatus:
    """Everything `edge-agent status` shows; `local` as `settings.load_policy()` returned it."""
    now = time.time() if now is None else now
    state_dir = settings.state_dir
    agent = agent_process(state_dir)
    outbox, errors, total = read_outbox(state_dir, settings.quota_bytes, agent.state != "not running")
    policy = policy_state(settings, local)
    stale = max(STALE_AFTER_S, STALE_ACK_TIMEOUTS * settings.config.uplink.ack_timeout)
    attention = _attention(agent, outbox, policy, total, now, stale, settings.path)
    field = read_field_health(settings) if agent.state != "not running" else FieldSensorsState()
    attention += [f"field sensor {name} has been failing since {_when(h.since)}: {h.last_error} "
                  f"(edge-agent check --config {settings.path} probes it when the agent is stopped)"
                  for name, h in field.sensors.items() if h.state == "failing"]
    c = settings.config
    enrollment = read_enroll_status(state_dir) if c.enroll is not None else None
    if enrollment is not None and enrollment.state != "enrolled":
        attention.insert(0, f"not enrolled yet ({enrollment.state}): {enrollment.detail}")
    elif c.enroll is not None and enrollment is None:
        files = IdentityFiles(settings.tls, state_dir)
        if files.current() is None and files.pending() is None:
            attention.insert(0, f"not enrolled yet, and no attempt made: start the agent; it enrolls at {c.enroll.url}")
    return DeviceStatus(device=c.device_id, profile=c.profile, config=str(settings.path), healthy=not attention,
                        attention=attention, agent=agent, outbox=outbox, policy=policy, recent_errors=errors,
                        recent_errors_total=total, enrollment=enrollment, field_sensors=field)


def read_field_health(settings: AgentSettings) -> FieldSensorsState:
    """The running agent's field sensor health file; configured sensors it does not list are unknown."""
    if not settings.profile.field_sensors:
        return FieldSensorsState()
    try:
        state = msgspec.json.decode((settings.state_dir / HEALTH_FILE).read_bytes(), type=FieldSensorsState)
    except (OSError, msgspec.DecodeError):
        return FieldSensorsState()
    configured = {spec.name for spec in settings.profile.field_sensors}
    return FieldSensorsState(state.ts, {n: h for n, h in state.sensors.items() if n in configured})


def agent_process(state_dir: Path) -> AgentProcess:
    """Whether a process has the outbox open (the agent keeps it open from start to stop)."""
    shm = state_dir / f"{DB_NAME}-shm"
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # SQLite deletes -shm when the last connection closes; a crash leaves it, unlocked.
        return AgentProcess("not running", detail="no process has the outbox open")
    except OSError as exc:
        return AgentProcess("unknown", detail=f"cannot open {shm}: {exc.strerror}; run as the agent's user or root")
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_BYTE, 1, 0)
        held, *_, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError as exc:
        return AgentProcess("unknown", detail=f"cannot test the lock on {shm}: {exc.strerror}")
    finally:
        os.close(fd)
    if held == fcntl.F_UNLCK:
        return AgentProcess("not running", detail="no process has the outbox open")
    if pid <= 0:
        return AgentProcess("running", detail="a process in another PID namespace has the outbox open")
    return AgentProcess("running", pid, _command(pid))


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv)


def read_outbox(state_dir: Path, quota_bytes: int, maybe_open: bool) -> tuple[OutboxState, list[RecentError], int]:
    """The outbox's queue and unacknowledged errors, in one snapshot; `maybe_open`: a process may
    have it open (then its WAL is read too; otherwise the file is complete and opened immutable)."""
    path = state_dir / DB_NAME
    try:
        kept = sorted(str(p) for p in state_dir.glob(f"{DB_NAME}.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
        present = path.exists()
        wal = path.with_name(f"{DB_NAME}-wal").exists()
    except OSError as exc:
        return OutboxState(str(path), error=f"cannot read {state_dir}: {exc.strerror}; run as the agent's "
                                            "user or root"), [], 0
    if not present:
        return OutboxState(str(path), error="no outbox yet: the agent has not run with this configuration",
                           quota_bytes=quota_bytes, corrupt_kept=kept), [], 0
    # Without a WAL everything is in the file; immutable then spares creating -wal/-shm beside it.
    mode = "ro" if maybe_open or wal else "ro&immutable=1"
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode={mode}", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return OutboxState(str(path), error=f"cannot open it read-only: {exc}", corrupt_kept=kept), [], 0
    try:
        with contextlib.closing(db):
            db.execute("BEGIN")  # one snapshot for every figure below
            state = _queue(db, str(path), quota_bytes, kept)
            errors, total = _errors(db, state.acked_through)
            db.execute("COMMIT")
    except sqlite3.Error as exc:
        return OutboxState(str(path), error=f"cannot read it: {exc}", corrupt_kept=kept), [], 0
    return state, errors, total


def _queue(db: sqlite3.Connection, path: str, quota_bytes: int, kept: list[str]) -> OutboxState:
    meta = {str(k): int(v) for k, v in db.execute("SELECT key, value FROM meta")}
    acked = meta.get("acked", 0)
    total, readings, events = db.execute(
        "SELECT count(*), count(metric), count(kind) FROM records WHERE seq > ?", (acked,)).fetchone()
    oldest = db.execute("SELECT ts FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (acked,)).fetchone()
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    return OutboxState(path, backlog=int(total), readings=int(readings), events=int(events), acked_through=acked,
                       last_seq=meta.get("last_seq", 0), oldest_waiting_ts=float(oldest[0]) if oldest else None,
                       bytes=int(pages * size), quota_bytes=quota_bytes, dropped=meta.get("dropped", 0),
                       corrupt_kept=kept)


def _errors(db: sqlite3.Connection, acked: int) -> tuple[list[RecentError], int]:
    """Error events not yet acknowledged, newest first; acknowledged ones are deleted from the outbox."""
    marks = ", ".join("?" * len(ERROR_KINDS))
    rows = db.execute(f"SELECT seq, ts, kind, body FROM records WHERE seq > ? AND kind IN ({marks}) "  # noqa: S608  # placeholders only
                      "ORDER BY seq DESC", (acked, *ERROR_KINDS))
    found: list[RecentError] = []
    total = 0
    for seq, ts, kind, text in rows:
        body = json_body(text)
        if kind == EventKind.ALERT and body.get("severity") == "info":
            continue  # an alert a rule raises for information is not an error
        total += 1
        if len(found) < ERRORS_SHOWN:
            version = body.get("policy_version")
            found.append(RecentError(seq=int(seq), ts=float(ts), kind=str(kind), rule=_str_or_none(body.get("rule")),
                                     policy_version=version if isinstance(version, int) else None,
                                     detail=redact(_detail(str(kind), body))))
    return found, total


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _detail(kind: str, body: dict[str, Any]) -> str:
    """What went wrong, in one line, from the fields that matter for the kind."""
    def get(key: str) -> str:
        value = body.get(key)
        return "" if value is None else str(value)

    if body.get("truncated"):
        text = get("head")
    elif kind == EventKind.POLICY_REFUSED:
        text = f"version {get('policy_version')} refused ({get('reason')}): {get('detail')}"
    elif kind == EventKind.ACTION_FAILED:
        how = "timed out" if body.get("timed_out") else f"exit {get('exit_code')}" if "exit_code" in body else ""
        head = get("action") + (f" ({how})" if how else "")
        text = f"{head}: {get('detail')}" if get("detail") else head
    elif kind == EventKind.ESCALATION:
        text = f"{get('reason')}: {get('detail')}"
    elif kind == EventKind.OUTBOX_CORRUPT:
        text = f"{get('reason')}; moved to {get('moved_to')}"
    elif kind == EventKind.ALERT:
        text = f"{get('severity')}: {get('message')}"
    else:
        text = json.dumps(body)
    return " ".join(text.split())


def policy_state(settings: AgentSettings, local: Policy | None) -> PolicyState:
    """The policy the agent runs when it starts now: the stored signed one if it checks out, else the local file."""
    intake = PolicyIntake(settings, local)
    refused: StoredRefusal | None = None
    with _quiet(logging.getLogger(PolicyIntake.__module__)):  # its complaint is reported below instead
        try:
            policy = intake.load()
        except OSError as exc:
            policy = local
            refused = StoredRefusal(0, "unreadable", f"cannot read {intake.stored}: {exc.strerror}")
    if intake.refused is not None:
        r = intake.refused
        refused = StoredRefusal(r.version, r.reason, r.detail)
    in_force: Literal["signed", "local", "none"] = (
        "none" if policy is None else "signed" if policy.signed else "local")
    c = settings.config
    return PolicyState(
        in_force=in_force, version=intake.version, rules=len(policy.rules) if policy else 0,
        withdrawn=intake.version > 0 and in_force != "signed", stored=str(intake.stored), stored_refused=refused,
        local=str(settings.resolve(c.policy)) if c.policy else None, local_rules=len(local.rules) if local else None,
    )


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _attention(agent: AgentProcess, outbox: OutboxState, policy: PolicyState, errors: int, now: float,
               stale_s: float, config: Path) -> list[str]:
    """Each thing a person should look at, as one sentence with what to do."""
    found: list[str] = []
    if agent.state == "not running":
        found.append(f"the agent is not running: start it (edge-agent run --config {config}, or its service)")
    elif agent.state == "unknown":
        found.append(f"cannot tell whether the agent runs: {agent.detail}")
    if outbox.error:
        found.append(f"outbox {outbox.path}: {outbox.error}")
    waited = now - outbox.oldest_waiting_ts if outbox.oldest_waiting_ts is not None else 0.0
    if waited > stale_s:
        found.append(f"{outbox.backlog} record(s) waiting, the oldest for {age(waited)}: the hub has not "
                     f"acknowledged them; edge-agent check --config {config} tests the connection")
    if outbox.quota_bytes and outbox.bytes >= QUOTA_TARGET * outbox.quota_bytes:
        found.append(f"the outbox is at {outbox.bytes / outbox.quota_bytes:.0%} of its {_mb(outbox.quota_bytes)} MB "
                     "quota: it sheds old readings until the hub takes them")
    if outbox.corrupt_kept:
        found.append(f"{len(outbox.corrupt_kept)} corrupt outbox(es) kept beside it (newest "
                     f"{outbox.corrupt_kept[-1]}): inspect them, then delete them")
    if policy.stored_refused is not None:
        r = policy.stored_refused
        instead = "the local policy file" if policy.local else "no rules"
        found.append(f"{_stored(r)} does not check out ({r.reason}: {r.detail}); the agent starts with {instead} "
                     "instead")
    if errors:
        found.append(f"{errors} error event(s) not yet acknowledged by the hub (listed under errors)")
    return found


def age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _stored(refused: StoredRefusal) -> str:
    """The stored policy's version is only known when its signature was good."""
    return "the stored signed policy" + (f" (version {refused.version})" if refused.version else "")


def _mb(size: int) -> str:
    return f"{size / 1e6:.3g}"


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def render(status: DeviceStatus, now: float | None = None) -> str:
    """The text output: one screen."""
    now = time.time() if now is None else now
    s, o, p, a = status, status.outbox, status.policy, status.agent
    verdict = "ok" if s.healthy else f"needs attention ({len(s.attention)})"
    lines = [f"{s.device} (profile {s.profile}): {verdict}"]
    running = a.state + (f", pid {a.pid}" if a.pid else "") + (f" ({a.detail})" if a.detail and not a.pid else "")
    lines.append(f"agent     {running}")
    if o.error:
        lines.append(f"outbox    {o.error}")
    else:
        oldest = f", the oldest {age(now - o.oldest_waiting_ts)} old" if o.oldest_waiting_ts is not None else ""
        lines.append(f"outbox    {o.backlog} record(s) waiting ({o.readings} readings, {o.events} events){oldest}")
        lines.append(f"          acknowledged through seq {o.acked_through} (last seq {o.last_seq}); "
                     f"{_mb(o.bytes)} of {_mb(o.quota_bytes)} MB; {o.dropped} reading(s) shed over quota")
    lines.append(f"policy    {_policy_line(p)}")
    if s.enrollment is not None:
        lines.append(f"enrolled  {s.enrollment.detail}" if s.enrollment.state == "enrolled"
                     else f"identity  not enrolled yet ({s.enrollment.state}): {s.enrollment.detail}")
    for name, h in s.field_sensors.sensors.items():
        since = f" since {_when(h.since)}" if h.state != "starting" else ""
        error = f"; last error: {h.last_error}" if h.last_error else ""
        lines.append(f"sensor    {name} ({h.kind}) {h.state}{since}: {h.reads} read(s), {h.errors} error(s), "
                     f"{h.rejected} value(s) skipped{error}")
    lines.append(f"errors    {s.recent_errors_total or 'none'} waiting for the hub (acknowledged events are deleted "
                 "here; edge-hub events has them all)")
    for e in s.recent_errors:
        detail = e.detail if len(e.detail) <= DETAIL_WIDTH else e.detail[: DETAIL_WIDTH - 1] + "…"
        lines.append(f"  {_when(e.ts)}  {e.kind}  {e.rule or '-'}  {detail}")
    if s.recent_errors_total > len(s.recent_errors):
        lines.append(f"  … and {s.recent_errors_total - len(s.recent_errors)} older")
    lines += [f"attention: {item}" for item in s.attention]
    return "\n".join(lines)


def _policy_line(p: PolicyState) -> str:
    local = f"local file {p.local} ({p.local_rules} rule(s))" if p.local else "no local file"
    if p.in_force == "signed":
        return f"signed version {p.version} in force ({p.rules} rule(s)); {local}"
    if p.stored_refused is not None:
        signed = f"{_stored(p.stored_refused)} does not check out ({p.stored_refused.reason})"
    elif p.withdrawn:
        signed = f"signed version {p.version} withdrew the hub's policies"
    else:
        signed = "no signed policy yet"
    return f"{signed}; {local}" + (" in force" if p.local else ", no rules")
