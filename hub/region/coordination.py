"""Regional coordination: leases with fencing tokens, operator approvals, tasks by bidding.

The state is in the hub database and every change is one transaction, committed before the
reply that announces it is published: a hub that restarts (or is killed) finds every holder,
queued request, pending approval and task where it was, and never grants a lease twice. A
device's requests carry its own ids and are sent again after a reconnect, so handling one
twice while it is open changes nothing and answers the same (a repeat that arrives after
its release is a new request: the device hands back a grant it no longer waits for).

- Leases: at most `limit` holders per name (the smallest limit any holder or the next in line
  asked for), the rest queue first come first served; every grant takes the next fencing token
  of that name. A holder releases when done; a lease whose holder vanished expires at its TTL;
  a queued request of a device that went offline is dropped when its turn comes.
- Approvals: pending until `edge-hub approvals approve|deny ID`, or expired (= denied).
- Tasks (contract net): offered to the online devices a selector picks; they bid; the best
  bid is awarded; a refusal, a failure or a silent award goes to the next bid; no bid left
  ends the task failed with the reason.

The transactions re-read what they change, so the CLI and the hub can act together, and so can
hub replicas: each answers the requests the shared subscription hands it. `tick` runs in the
leading replica only (hub/region/leadership.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from edgefleet.wire.events import APPROVAL_DECIDED, TASK_FINISHED, EventKind
from edgefleet.wire.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    Bid,
    CoordDown,
    CoordUp,
    LeaseGrant,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    TaskAward,
    TaskDone,
    TaskOffer,
)
from hub.db.dialect import JSON_ARRAY
from hub.db.interface import HubState, Tx
from hub.errors import HubError
from hub.rollout.rollouts import Selector

BID_WINDOW_S: Final = 2.0  # how long a task waits for bids (less when every device answered)
DEFAULT_TASK_TIMEOUT_S: Final = 60.0  # an awarded device that says nothing this long loses the award
FINAL: Final = ("done", "failed")

log = logging.getLogger("hub.coordination")

Outbox = list[tuple[str, CoordDown]]  # (device, message) to publish on its down/coord


class CoordinationError(HubError):
    """An operator command that does not fit the state (exit 1, with what to do)."""


@dataclass
class Replies:
    messages: Outbox = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # log lines for the hub's log


class Coordination:
    def __init__(self, store: HubState, identity: str) -> None:
        self._store, self._identity = store, identity

    # --- device messages (from the ingest cycle) -------------------------------------

    async def handle(self, requests: list[tuple[str, CoordUp]], now: float | None = None) -> Replies:
        """Apply one cycle's coordination messages in one transaction; return the replies."""
        now = time.time() if now is None else now
        if not requests:
            return Replies()

        async def work(db: Tx) -> Replies:
            out = Replies()
            touched: set[str] = set()
            asked: set[tuple[str, str]] = set()
            leases: list[tuple[str, LeaseRequest]] = []
            for device, message in requests:
                if isinstance(message, LeaseRequest):
                    leases.append((device, message))
                    touched.add(message.name)
                    asked.add((device, message.id))
                elif isinstance(message, LeaseRelease):
                    await self._queue(db, leases, now, out)  # in arrival order with the releases
                    leases = []
                    await self._release(db, device, message, now, out)
                    touched.add(message.name)
                elif isinstance(message, ApprovalRequest):
                    await self._approval(db, device, message, now, out)
                elif isinstance(message, Bid):
                    await self._bid(db, device, message, now)
                elif isinstance(message, TaskDone):
                    await self._task_done(db, device, message, now, out)
            await self._queue(db, leases, now, out)
            for name in sorted(touched):
                await self._promote(db, name, now, out)
                # Only those who asked now hear their place (all of them on every change
                # would be quadratic in the queue's length).
                for position, (device, request) in enumerate(await db.fetch(
                        "SELECT device, request FROM lease_queue WHERE name = ? ORDER BY qid", (name,)), start=1):
                    if (device, request) in asked:
                        out.messages.append((device, LeaseQueued(id=request, name=name, position=position)))
            return out

        return await self._store.atomically(work)

    async def _queue(self, db: Tx, leases: list[tuple[str, LeaseRequest]], now: float,
                     out: Replies) -> None:
        """Queue a cycle's lease requests, a few statements for all of them (a burst of hundreds
        is one cycle); `_promote` then grants what fits, and the rest hear their place."""
        if not leases:
            return
        names = sorted({req.name for _, req in leases})
        held = {(d, r): (token, expires) for d, r, token, expires in await db.fetch(
                f"SELECT device, request, token, expires_at FROM lease_holders WHERE name IN "  # noqa: S608  # placeholders only
                f"({', '.join('?' * len(names))})", names)}
        fresh = []
        for device, req in leases:
            grant = held.get((device, req.id))
            if grant is not None:  # asked again (a reconnect): the same answer
                out.messages.append((device, LeaseGrant(id=req.id, name=req.name, token=grant[0],
                                                        expires_in_s=max(grant[1] - now, 0.001))))
            else:
                fresh.append((req.name, device, req.id, req.limit, req.ttl_s, req.rule, req.policy_version, now))
        await db.executemany(
            "INSERT INTO lease_queue(name, device, request, lim, ttl_s, rule, policy_version, "
            "requested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", fresh)
        for name in names:
            asking = sorted({d for d, req in leases if req.name == name})
            shown = ", ".join(asking[:5]) + (f" and {len(asking) - 5} more" if len(asking) > 5 else "")
            out.notes.append(f"lease {name}: {shown} ask")

    async def _release(self, db: Tx, device: str, rel: LeaseRelease, now: float,
                       out: Replies) -> None:
        if await db.execute("DELETE FROM lease_holders WHERE device = ? AND request = ? AND name = ?",
                            (device, rel.id, rel.name)):
            out.notes.append(f"lease {rel.name}: {device} released token {rel.token}")
        await db.execute("DELETE FROM lease_queue WHERE device = ? AND request = ?", (device, rel.id))

    async def _promote(self, db: Tx, name: str, now: float, out: Replies) -> None:
        """Grant to the head of the queue while there is room; one process at a time per lease (two replicas
        counting the holders at once would both grant the last place)."""
        await db.lock(f"lease:{name}")
        while True:
            head = await db.fetch_one("SELECT q.qid, q.device, q.request, q.lim, q.ttl_s, q.rule, q.policy_version, "
                                  "COALESCE(d.online, 0) FROM lease_queue q LEFT JOIN devices d ON d.device = q.device "
                                  "WHERE q.name = ? ORDER BY q.qid LIMIT 1", (name,))
            if head is None:
                break
            qid, device, request, limit, ttl_s, rule, version, online = head
            if not online:  # it cannot use a grant now; it asks again when it is back
                await db.execute("DELETE FROM lease_queue WHERE qid = ?", (qid,))
                continue
            holders, cap = await db.fetch_one("SELECT COUNT(*), MIN(lim) FROM lease_holders WHERE name = ?", (name,))
            if holders >= min(limit, cap or limit):
                break
            token = (await db.fetch_one(
                "INSERT INTO leases(name, last_token) VALUES (?, 1) ON CONFLICT(name) DO "
                "UPDATE SET last_token = leases.last_token + 1 RETURNING last_token", (name,)))[0]
            await db.execute("DELETE FROM lease_queue WHERE qid = ?", (qid,))
            await db.execute(
                "INSERT INTO lease_holders(name, device, request, token, lim, rule, policy_version, granted_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, device, request, token, limit, rule, version, now, now + ttl_s))
            out.messages.append((device, LeaseGrant(id=request, name=name, token=token, expires_in_s=ttl_s)))
            out.notes.append(f"lease {name}: granted to {device}, token {token}")

    async def _approval(self, db: Tx, device: str, req: ApprovalRequest, now: float,
                        out: Replies) -> None:
        row = await db.fetch_one("SELECT id, state, decided_by, reason FROM approvals WHERE device = ? AND request = ?",
            (device, req.id))
        if row is None:
            created = await db.fetch_one(  # another replica may have taken the same request in just now
                "INSERT INTO approvals(device, request, rule, action, args, policy_version, requested_at, "
                "expires_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending') "
                "ON CONFLICT (device, request) DO NOTHING RETURNING id",
                (device, req.id, req.rule, req.action, req.args, req.policy_version, now, now + req.expires_s))
            if created is None:
                return
            approval = created[0]
            out.notes.append(f"approval {approval}: {device} asks to run {req.action} for rule {req.rule}; "
                             f"edge-hub approvals approve|deny {approval}")
        elif row[1] != "pending":  # decided while it was away: tell it again
            out.messages.append((device, _decision(req.id, row[1], row[2], row[3])))

    async def _bid(self, db: Tx, device: str, bid: Bid, now: float) -> None:
        await db.execute(
            # Only from a device it was offered to, and only while bids are taken.
            "INSERT INTO bids(task, device, able, score, detail, at) "  # noqa: S608  # the fragment is ours
            "SELECT CAST(? AS BIGINT), ?, CAST(? AS INTEGER), "
            "CAST(? AS DOUBLE PRECISION), ?, CAST(? AS DOUBLE PRECISION) "
            "WHERE EXISTS (SELECT 1 FROM tasks t WHERE t.id = ? AND t.state = 'bidding' AND t.bid_by >= ? "
            f"AND EXISTS (SELECT 1 FROM {JSON_ARRAY[db.dialect].format('t.offered')} WHERE value = ?)) "
            "ON CONFLICT(task, device) DO NOTHING",
            (bid.task, device, int(bid.able), bid.score, bid.detail, now, bid.task, now, device))

    async def _task_done(self, db: Tx, device: str, done: TaskDone, now: float,
                         out: Replies) -> None:
        task = await db.fetch_one("SELECT state, attempt, awarded_to, kind FROM tasks WHERE id = ?", (done.task,))
        if task is None or task[0] != "awarded" or task[1] != done.attempt or task[2] != device:
            return  # late news of an earlier award: already handed on
        outcome = "succeeded" if done.ok else ("refused" if done.refused else "failed")
        await db.execute("UPDATE bids SET outcome = ?, result = ? WHERE task = ? AND device = ?",
                         (outcome, done.detail, done.task, device))
        if done.ok:
            await self._finish_task(db, done.task, "done", None, now, out,
                                    {"device": device, "detail": done.detail, "exit_code": done.exit_code})
        else:
            out.notes.append(f"task {done.task}: {device} {outcome} ({done.detail}); offering it to the next bidder")
            await self._award_next(db, done.task, now, out)

    # --- time: expiries, decisions, task phases (the hub, twice a second) ----------------

    async def tick(self, now: float | None = None) -> Replies:
        now = time.time() if now is None else now

        async def work(db: Tx) -> Replies:
            out = Replies()
            for name, device, token in await db.fetch(
                    "SELECT name, device, token FROM lease_holders WHERE expires_at <= ?", (now,)):
                await db.execute("DELETE FROM lease_holders WHERE name = ? AND token = ?", (name, token))
                await self._store.hub_event(db, self._identity, EventKind.LEASE_EXPIRED, {
                    "lease": name, "device": device, "token": token}, ts=now)
                out.notes.append(f"lease {name}: token {token} of {device} expired (no release before its TTL)")
                await self._promote(db, name, now, out)
            for approval_id, device in await db.fetch(
                    "SELECT id, device FROM approvals WHERE state = 'pending' AND expires_at <= ?", (now,)):
                await db.execute("UPDATE approvals SET state = 'expired', decided_by = 'expired', decided_at = ?, "
                                 "reason = 'nobody decided in time' WHERE id = ?", (now, approval_id))
                await self._store.hub_event(db, self._identity, EventKind.APPROVAL_EXPIRED, {
                    "approval": approval_id, "device": device, "by": "expired"}, ts=now)
                out.notes.append(f"approval {approval_id} of {device} expired: treated as denied")
            for approval_id, device, request, state, by, reason in await db.fetch(
                    "SELECT id, device, request, state, decided_by, reason FROM approvals "
                        "WHERE state != 'pending' AND sent = 0", ()):
                out.messages.append((device, _decision(request, state, by, reason)))
                await db.execute("UPDATE approvals SET sent = 1 WHERE id = ?", (approval_id,))
            await self._tasks(db, now, out)
            return out

        return await self._store.atomically(work)

    async def _tasks(self, db: Tx, now: float, out: Replies) -> None:
        for task, state, deadline, bid_by, award_expires, offered in await db.fetch(
                "SELECT id, state, deadline, bid_by, award_expires, offered FROM tasks "
                    "WHERE state NOT IN ('done', 'failed')", ()):
            if deadline is not None and now >= deadline:
                await self._finish_task(db, task, "failed", "its deadline passed", now, out)
            elif state == "new":
                await self._offer(db, task, now, out)
            elif state == "bidding":
                answered = (await db.fetch_one("SELECT COUNT(*) FROM bids WHERE task = ?", (task,)))[0]
                if now >= bid_by or answered >= len(json.loads(offered or "[]")):
                    await self._award_next(db, task, now, out)
            elif state == "awarded" and now >= award_expires:
                device = (await db.fetch_one("SELECT awarded_to FROM tasks WHERE id = ?", (task,)))[0]
                await db.execute("UPDATE bids SET outcome = 'timeout', result = 'no answer in time' "
                                 "WHERE task = ? AND device = ?", (task, device))
                out.notes.append(f"task {task}: {device} did not answer in time; offering it to the next bidder")
                await self._award_next(db, task, now, out)

    async def _offer(self, db: Tx, task: int, now: float, out: Replies) -> None:
        kind, args, target, deadline = await db.fetch_one(
                "SELECT kind, args, target, deadline FROM tasks WHERE id = ?", (task,))
        want = Selector.from_json(target)
        devices = [d for d, profile, tags in await db.fetch(
                "SELECT device, profile, tags FROM devices WHERE revoked_at IS NULL AND online = 1 "
                "ORDER BY device", ())
            if want.matches(profile, json.loads(tags))]
        bid_by = min(now + BID_WINDOW_S, deadline if deadline is not None else float("inf"))
        await db.execute("UPDATE tasks SET state = 'bidding', bid_by = ?, offered = ?, updated_at = ? WHERE id = ?",
                         (bid_by, json.dumps(devices), now, task))
        out.messages += [(d, TaskOffer(task=task, kind=kind, args=args, bid_by=bid_by)) for d in devices]
        out.notes.append(f"task {task} ({kind}): offered to {len(devices)} online device(s)")

    async def _award_next(self, db: Tx, task: int, now: float, out: Replies) -> None:
        deadline = (await db.fetch_one("SELECT deadline FROM tasks WHERE id = ?", (task,)))[0]
        if deadline is not None and now >= deadline:
            await self._finish_task(db, task, "failed", "its deadline passed", now, out)
            return
        best = await db.fetch_one("SELECT device, score FROM bids WHERE task = ? AND able = 1 AND outcome IS NULL "
                              "ORDER BY score DESC, device LIMIT 1", (task,))
        if best is None:
            await self._finish_task(db, task, "failed", await _why_nobody(db, task), now, out)
            return
        device, score = best
        kind, args, attempt, timeout_s, deadline = await db.fetch_one(
                "SELECT kind, args, attempt, timeout_s, deadline FROM tasks WHERE id = ?", (task,))
        expires = min(now + timeout_s, deadline if deadline is not None else float("inf"))
        await db.execute("UPDATE bids SET outcome = 'awarded' WHERE task = ? AND device = ?", (task, device))
        await db.execute("UPDATE tasks SET state = 'awarded', attempt = ?, awarded_to = ?, award_expires = ?, "
                         "updated_at = ? WHERE id = ?", (attempt + 1, device, expires, now, task))
        out.messages.append((device, TaskAward(task=task, attempt=attempt + 1, kind=kind, args=args,
                                               timeout_s=max(expires - now, 0.001))))
        out.notes.append(f"task {task}: awarded to {device} (score {score:.3f}), attempt {attempt + 1}")

    async def _finish_task(self, db: Tx, task: int, state: str, reason: str | None, now: float,
                           out: Replies, result: dict[str, Any] | None = None) -> None:
        await db.execute("UPDATE tasks SET state = ?, reason = ?, result = ?, updated_at = ? WHERE id = ?",
                         (state, reason, json.dumps(result) if result else None, now, task))
        await self._store.hub_event(db, self._identity, TASK_FINISHED[state], {
            "task": task, "reason": reason, **(result or {})}, ts=now)
        out.notes.append(f"task {task}: {state}" + (f" ({reason})" if reason else "") +
                         (f" on {result['device']}" if result else ""))

    # --- the operator's side (CLI) ----------------------------------------------------

    async def offer_task(self, kind: str, args: dict[str, Any], target: dict[str, Any], deadline: float | None,
                         timeout_s: float, now: float | None = None) -> int:
        now = time.time() if now is None else now

        async def work(db: Tx) -> int:
            task = int((await db.fetch_one(
                "INSERT INTO tasks(kind, args, target, deadline, timeout_s, state, attempt, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'new', 0, ?, ?) RETURNING id",
                (kind, json.dumps(args), json.dumps(target), deadline, timeout_s, now, now)))[0])
            await self._store.hub_event(db, self._identity, EventKind.TASK_OFFERED, {
                "task": task, "kind": kind, "args": args, "target": target, "deadline": deadline}, ts=now)
            return task

        return await self._store.atomically(work)

    async def decide(self, approval: int, approved: bool, by: str, reason: str, now: float | None = None) -> str:
        now = time.time() if now is None else now

        async def work(db: Tx) -> str:
            row = await db.fetch_one("SELECT state, device, rule, action FROM approvals WHERE id = ?", (approval,))
            if row is None:
                raise CoordinationError(f"no approval request {approval} (edge-hub approvals list shows them)")
            if row[0] != "pending":
                raise CoordinationError(f"approval {approval} is already {row[0]}")
            state = "approved" if approved else "denied"
            await db.execute("UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, reason = ?, sent = 0 "
                             "WHERE id = ?", (state, by, now, reason, approval))
            await self._store.hub_event(db, self._identity, APPROVAL_DECIDED[state], {
                "approval": approval, "device": row[1], "rule": row[2], "action": row[3], "by": by,
                "reason": reason}, ts=now)
            return f"approval {approval} ({row[3]} on {row[1]}, rule {row[2]}): {state} by {by}"

        return await self._store.atomically(work)


def _decision(request: str, state: str, by: str | None, reason: str | None) -> ApprovalDecision:
    return ApprovalDecision(id=request, approved=state == "approved", by=by or "", reason=reason or state)


async def _why_nobody(db: Tx, task: int) -> str:
    bids = await db.fetch("SELECT device, able, detail, outcome, result FROM bids WHERE task = ? ORDER BY device",
                      (task,))
    offered = (await db.fetch_one("SELECT offered FROM tasks WHERE id = ?", (task,)))[0]
    if not json.loads(offered or "[]"):
        return "no online device matches the target"
    able = [b for b in bids if b[1]]
    if not able:
        declines = "; ".join(f"{d}: {detail}" for d, _, detail, _, _ in bids) or "no device answered"
        return f"no device can do it ({declines})"
    return "every bidder failed: " + "; ".join(f"{d} {outcome}: {result}" for d, _, _, outcome, result in able)
