"""`edge-hub leases`, `approvals list|approve|deny`, `task offer`, `tasks`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from edgefleet.runtime.settings import duration_arg
from edgefleet.wire.protocol import ProtocolError, json_body, read_json
from hub.config import load_hub
from hub.db.engines import open_store
from hub.db.interface import HubState
from hub.errors import UsageError
from hub.rollout.rollouts import Selector, operator_name

EXIT_OK = 0


def add_parsers(sub: Any, dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    leases = sub.add_parser("leases", help="regional leases: holders, fencing tokens, queues",
                            description="Every lease name with its holders (device, fencing token, time left) "
                                        "and the devices queued for it, in order (docs/coordination.md).")
    dir_arg(leases)
    leases.add_argument("--json", action="store_true", help="one JSON object per lease name")

    appr = sub.add_parser("approvals", help="actions waiting for a person",
                          description="Rules marked `approval = true` ask before they act. A request not "
                                      "decided before it expires counts as denied. Decisions are audited with "
                                      "who took them.")
    acmds = appr.add_subparsers(dest="approvals_command", required=True, metavar="SUBCOMMAND")
    lst = acmds.add_parser("list", help="pending requests (and, with --all, decided ones)")
    dir_arg(lst)
    lst.add_argument("--all", action="store_true", help="decided and expired requests too")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    for name in ("approve", "deny"):
        cmd = acmds.add_parser(name, help=f"{name} request ID")
        dir_arg(cmd)
        cmd.add_argument("id", type=int, metavar="ID")
        cmd.add_argument("--reason", default="", help="recorded with the decision")

    task = sub.add_parser("task", help="offer a task to the region (contract net)",
                          description="The online devices the target picks bid with a score from their own "
                                      "state (idle CPU, free disk, backlog; battery on sim devices); the best "
                                      "bid is awarded; a refusal, a failure or no answer in time passes it to "
                                      "the next bid. The result is an event (edge-hub events --device hub.REGION).")
    tcmds = task.add_subparsers(dest="task_command", required=True, metavar="SUBCOMMAND")
    offer = tcmds.add_parser("offer", help="offer a task")
    dir_arg(offer)
    offer.add_argument("--kind", required=True, help="the actuator: command, systemd_restart, set_rate, alert, record")
    offer.add_argument("--args", default="{}", metavar="JSON",
                       help='the actuator\'s arguments as a JSON object, e.g. \'{"argv": ["/usr/bin/true"]}\'')
    offer.add_argument("--target", action="append", default=[], metavar="KEY=VALUE",
                       help="only devices with this tag, or profile=NAME (repeatable)")
    offer.add_argument("--deadline", type=duration_arg, metavar="DURATION",
                       help="fail the task if not done within this, e.g. 5m (default: none)")
    offer.add_argument("--timeout", type=duration_arg, default=60.0, metavar="DURATION",
                       help="how long an awarded device has before the next bid gets it (default 60s)")

    tasks = sub.add_parser("tasks", help="offered tasks and their outcome")
    dir_arg(tasks)
    tasks.add_argument("--json", action="store_true", help="one JSON object per line")


async def run(args: argparse.Namespace) -> int:
    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        if args.command == "leases":
            return await _leases(store, args)
        if args.command == "tasks":
            return await _tasks(store, args)
        from hub.region.coordination import Coordination

        coordination = Coordination(store, config.identity)
        if args.command == "task":
            return await _offer(coordination, args)
        if args.approvals_command == "list":
            return await _approvals(store, args)
        by = operator_name()
        print(await coordination.decide(args.id, args.approvals_command == "approve", by, args.reason))
        print("the running hub tells the device within a second")
        return EXIT_OK
    finally:
        await store.close()


def _emit(rows: list[dict[str, Any]], as_json: bool, text: Callable[[dict[str, Any]], str], empty: str) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(msgspec.json.encode(row).decode() + "\n")
    else:
        print("\n".join(map(text, rows)) if rows else empty)


async def _leases(store: HubState, args: argparse.Namespace) -> int:
    now = time.time()
    names: dict[str, dict[str, Any]] = {}
    for name, last in await store.query("SELECT name, last_token FROM leases ORDER BY name"):
        names[name] = {"lease": name, "last_token": last, "holders": [], "queue": []}
    for name, device, token, lim, rule, granted, expires in await store.query(
            "SELECT name, device, token, lim, rule, granted_at, expires_at FROM lease_holders ORDER BY name, token"):
        entry = names.setdefault(name, {"lease": name, "last_token": token, "holders": [], "queue": []})
        entry["limit"] = min(entry.get("limit", lim), lim)
        entry["holders"].append({"device": device, "token": token, "rule": rule, "granted_at": granted,
                                 "expires_in_s": round(expires - now, 1)})
    for name, device, lim, rule, requested in await store.query(
            "SELECT name, device, lim, rule, requested_at FROM lease_queue ORDER BY name, qid"):
        entry = names.setdefault(name, {"lease": name, "last_token": 0, "holders": [], "queue": []})
        entry["queue"].append({"device": device, "rule": rule, "waiting_s": round(now - requested, 1), "limit": lim})

    def text(e: dict[str, Any]) -> str:
        holders = ", ".join(f"{h['device']} (token {h['token']}, {h['expires_in_s']:g} s left)"
                            for h in e["holders"]) or "none"
        queue = ", ".join(q["device"] for q in e["queue"]) or "none"
        return f"{e['lease']}: last token {e['last_token']}; holders: {holders}; queued: {queue}"

    _emit(list(names.values()), args.json, text, "no leases have been asked for")
    return EXIT_OK


async def _approvals(store: HubState, args: argparse.Namespace) -> int:
    query = ("SELECT id, device, rule, action, args, policy_version, requested_at, expires_at, state, decided_by, "
             "decided_at, reason FROM approvals")
    if not args.all:
        query += " WHERE state = 'pending'"
    rows = [{"id": r[0], "device": r[1], "rule": r[2], "action": r[3], "args": json_body(r[4]),
             "policy_version": r[5], "requested_at": r[6], "expires_at": r[7], "state": r[8], "decided_by": r[9],
             "decided_at": r[10], "reason": r[11]} for r in await store.query(query + " ORDER BY id")]

    def text(r: dict[str, Any]) -> str:
        when = dt.datetime.fromtimestamp(r["expires_at"], dt.UTC).isoformat(timespec="seconds")
        state = r["state"] if r["state"] != "pending" else f"pending until {when}"
        by = f" by {r['decided_by']}" if r["state"] in ("approved", "denied") else ""
        return f"{r['id']:>5}  {r['device']}  rule {r['rule']}: {r['action']} {json.dumps(r['args'])}  {state}{by}"

    _emit(rows, args.json, text, "no approval requests" + ("" if args.all else " pending"))
    return EXIT_OK


async def _offer(coordination: Any, args: argparse.Namespace) -> int:
    try:
        task_args = read_json(args.args)
    except ProtocolError as exc:
        raise UsageError(f"--args is not usable JSON ({exc.detail}): give a JSON object") from None
    if not isinstance(task_args, dict):
        raise UsageError("--args must be a JSON object")
    selector = Selector.parse(args.target)
    deadline = time.time() + args.deadline if args.deadline else None
    task = await coordination.offer_task(args.kind, task_args, json.loads(selector.to_json()),
                                         deadline, args.timeout)
    print(f"task {task} ({args.kind}) offered to {selector.describe()}; follow it with edge-hub tasks --dir {args.dir}")
    return EXIT_OK


async def _tasks(store: HubState, args: argparse.Namespace) -> int:
    rows = []
    for r in await store.query("SELECT id, kind, args, target, deadline, state, attempt, awarded_to, result, reason, "
                               "created_at, updated_at FROM tasks ORDER BY id"):
        bids = [{"device": b[0], "able": bool(b[1]), "score": b[2], "detail": b[3], "outcome": b[4], "result": b[5]}
                for b in await store.query("SELECT device, able, score, detail, outcome, result FROM bids "
                                           "WHERE task = ? ORDER BY score DESC, device", (r[0],))]
        rows.append({"task": r[0], "kind": r[1], "args": json_body(r[2]), "target": json.loads(r[3]),
                     "deadline": r[4], "state": r[5], "attempts": r[6], "device": r[7],
                     "result": json.loads(r[8]) if r[8] else None, "reason": r[9], "created_at": r[10],
                     "updated_at": r[11], "bids": bids})

    def text(t: dict[str, Any]) -> str:
        how = f"on {t['device']}" if t["state"] == "done" else (t["reason"] or (
            f"awarded to {t['device']}" if t["device"] else ""))
        return (f"{t['task']:>5}  {t['kind']:<16} {t['state']:<8} {len(t['bids'])} bid(s), "
                f"{t['attempts']} attempt(s)  {how}")

    _emit(rows, args.json, text, "no tasks")
    return EXIT_OK
