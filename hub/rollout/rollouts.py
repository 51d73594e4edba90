"""Policy rollouts: versions, canary cohorts, waves, health gates, rollback.

All state is in the hub database (policies, rollouts, rollout_members, assignments), so the
operator's CLI and a running hub act on the same state, and a hub that restarts carries on
where it stopped. The CLI pushes and takes the operator's decisions (promote, abort,
rollback); the running hub's `tick` checks the health gates, rolls back by itself on a
breach and otherwise promotes wave by wave; `hub.service` publishes each device's intended
version, signed, whenever it differs from what it last sent (and again on drift).

Versions only grow. A rollback is a new version carrying the previous policy's text, so an
agent's replay check (version must grow) never has to make an exception, and a device that
was offline through a push and its rollback goes straight to the rollback's version.

Every transition is one IMMEDIATE transaction that re-reads the state it changes, so two
writers (the CLI and the hub, or two hub processes on one database file) cannot both advance
the same wave; with a shared database server the same statements hold. The hub's `tick` runs
in the leading process only (hub/region/leadership.py).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from edgefleet.policy.document import Policy
from edgefleet.wire.events import ROLLOUT_REVERTED, EventKind
from hub.config import RolloutConf
from hub.db.dialect import JSON_FIELD, JSON_INT
from hub.db.interface import HubState, Tx
from hub.errors import HubError, UsageError

ACTIVE: Final = "baking"
FINISHED: Final = ("complete", "rolled_back", "aborted")
GATED_EVENTS: Final = (EventKind.ACTION_SUCCEEDED, EventKind.ACTION_FAILED, EventKind.ESCALATION)


class RolloutError(HubError):
    """A rollout command that does not fit the current state (exit 1, with what to do)."""


@dataclass(frozen=True)
class Selector:
    """`--target K=V ...` (tags, and `profile=P`): every key must hold; a key given more than once
    holds for any of its values (`site=a site=b`: a device at either site)."""

    profiles: frozenset[str] = frozenset()
    tags: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: list[str]) -> Selector:
        profiles: set[str] = set()
        tags: dict[str, set[str]] = {}
        for item in items:
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UsageError(f"--target {item!r}: expected tag=value or profile=NAME")
            if key == "profile":
                profiles.add(value)
            else:
                tags.setdefault(key, set()).add(value)
        return cls(frozenset(profiles), {k: frozenset(v) for k, v in tags.items()})

    def matches(self, profile: str, tags: dict[str, str]) -> bool:
        return (not self.profiles or profile in self.profiles) and all(
            tags.get(k) in values for k, values in self.tags.items())

    def describe(self) -> str:
        keys = [("profile", self.profiles), *self.tags.items()]
        return ", ".join(f"{k}={'|'.join(sorted(values))}" for k, values in keys if values) or "every device"

    def to_json(self) -> str:
        """One value as a plain string (as stored before "any of" existed), several as a list."""
        def one_or_all(values: frozenset[str]) -> str | list[str] | None:
            return None if not values else next(iter(values)) if len(values) == 1 else sorted(values)

        return json.dumps({"profile": one_or_all(self.profiles),
                           "tags": {k: one_or_all(v) for k, v in self.tags.items()}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Selector:
        """As stored by `to_json` (rollouts) or written as {"profile", "tags"} (tasks)."""
        def values(value: str | list[str] | None) -> frozenset[str]:
            return frozenset() if value is None else frozenset([value] if isinstance(value, str) else value)

        data = json.loads(text)
        return cls(values(data.get("profile")), {k: values(v) for k, v in data.get("tags", {}).items()})


def cohort_rank(device: str) -> int:
    """A device's place in every cohort: the same devices are always the canaries."""
    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:8], "big")


def wave_plan(canary_pct: float | None, conf: RolloutConf) -> list[float]:
    """Cumulative percentages: the canary, the configured waves above it, then 100."""
    if canary_pct is None or canary_pct >= 100:
        return [100.0]
    return [canary_pct, *sorted({w for w in conf.waves if canary_pct < w < 100}), 100.0]


def reached_count(members: int, pct: float) -> int:
    """Devices a wave of `pct` % reaches: rounded up, and at least one."""
    return min(members, max(1, math.ceil(members * pct / 100 - 1e-9)))


@dataclass(frozen=True)
class Pushed:
    rollout: int
    version: int
    targeted: int
    reached: int
    waves: list[float]


@dataclass
class Health:
    """The gates' figures over the devices a rollout has reached so far."""

    reached: int = 0
    applied: int = 0
    refused: int = 0
    waiting: int = 0  # online, neither applied nor refused yet
    offline: int = 0  # not online now (catch up on reconnect)
    went_offline: int = 0  # online when reached, offline since
    actions: int = 0
    action_failures: int = 0
    escalations: int = 0
    refusal_example: str = ""
    breach: str | None = None

    @property
    def ready(self) -> bool:
        """Enough evidence to promote: someone runs it, and no online device is still pending."""
        return self.applied >= 1 and self.waiting == 0


@dataclass(frozen=True)
class Transition:
    rollout: int
    version: int
    kind: str  # wave | complete | rolled_back | aborted | promoted
    message: str


# --- pushing ----------------------------------------------------------------------------


async def push(store: HubState, identity: str, region: str, text: str, policy: Policy, *, selector: Selector,
               canary_pct: float | None, bake_s: float, conf: RolloutConf, origin: str, now: float,
               checked_profiles: set[str]) -> Pushed:
    """Record the policy under a new version and reach the first wave, in one transaction.

    `checked_profiles`: the profiles the caller validated the policy against (`check_policy`).
    """
    waves = wave_plan(canary_pct, conf)

    async def work(db: Tx) -> Pushed:
        latest = (await db.fetch_one("SELECT MAX(version) FROM policies", ()))[0] or 0
        if policy.version and policy.version <= latest:
            raise RolloutError(f"the file says version = {policy.version}, but version {latest} was already "
                               f"pushed; versions only grow: remove the line to let the hub number it")
        version = policy.version or latest + 1
        targeted = targets(await db.fetch(CANDIDATES), selector, policy, region)
        if not targeted:
            raise RolloutError(f"no registered, unrevoked device matches {selector.describe()}"
                               + (" and the policy's [target]" if policy.target else ""))
        await _refuse_overlap(db, targeted)
        unchecked = set(targeted.values()) - checked_profiles
        if unchecked:
            raise RolloutError(f"devices of profile(s) {', '.join(sorted(unchecked))} were registered while the "
                               "policy was being checked: push again")
        await db.execute(
            "INSERT INTO policies(version, text, sha256, created_at, origin) VALUES (?, ?, ?, ?, ?)",
            (version, text, hashlib.sha256(text.encode()).hexdigest(), now, origin))
        rollout = int((await db.fetch_one(
            "INSERT INTO rollouts(version, selector, waves, bake_s, wave, wave_started_at, state, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?) RETURNING id",
            (version, selector.to_json(), json.dumps(waves), bake_s, now, ACTIVE, now, now)))[0])
        ranked = sorted(targeted, key=cohort_rank)
        await db.executemany(
            "INSERT INTO rollout_members(rollout, device, rank, previous) "
            "VALUES (?, ?, ?, (SELECT version FROM assignments WHERE device = ?))",
            [(rollout, device, rank, device) for rank, device in enumerate(ranked)])
        reached = await _reach(db, rollout, version, 0, waves[0], now)
        await store.hub_event(db, identity, EventKind.ROLLOUT_STARTED, {
            "policy_version": version, "rollout": rollout, "targeted": len(ranked), "reached": reached,
            "waves": waves, "bake_s": bake_s, "target": selector.describe(), "origin": origin,
            "by": operator_name()}, ts=now)
        return Pushed(rollout, version, len(ranked), reached, waves)

    return await store.atomically(work)


async def _refuse_overlap(db: Tx, targeted: dict[str, str]) -> None:
    """Rollouts run side by side only on disjoint devices: one device never runs two at once."""
    busy = [(rollout, version, device) for rollout, version, device in await db.fetch(
            "SELECT r.id, r.version, m.device FROM rollout_members m JOIN rollouts r ON r.id = m.rollout "
            "WHERE r.state = ? ORDER BY r.id, m.device", (ACTIVE,)) if device in targeted]
    if busy:
        rollout, version, _ = busy[0]
        named = [device for r, _, device in busy if r == rollout]
        some = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        raise RolloutError(f"rollout {rollout} (version {version}) is still in progress on {some}, which this push "
                           f"also targets: narrow --target to other devices, or wait for it, or run edge-hub policy "
                           f"promote, abort or rollback --rollout {rollout}")


NO_LIMIT: Final = 2**62  # LIMIT without one, on both engines
CANDIDATES: Final = "SELECT device, profile, tags FROM devices WHERE revoked_at IS NULL ORDER BY device"


def targets(candidates: list[Any], selector: Selector, policy: Policy, region: str) -> dict[str, str]:
    """device -> profile of the CANDIDATES rows that the selector and the policy's [target] both pick."""
    return {device: profile for device, profile, tags_json in candidates
            if picks(selector, policy, region, profile, json.loads(tags_json))}


def picks(selector: Selector, policy: Policy, region: str, profile: str, tags: dict[str, str]) -> bool:
    """Does a push with this selector and policy target the device (push, and admit after it)?"""
    return selector.matches(profile, tags) and policy.targets(profile, region, tags) is None


async def _reach(db: Tx, rollout: int, version: int, wave: int, pct: float, now: float) -> int:
    """Assign `version` to the members a wave of `pct` % reaches; return how many are reached in all."""
    members = (await db.fetch_one("SELECT COUNT(*) FROM rollout_members WHERE rollout = ?", (rollout,)))[0]
    upto = reached_count(members, pct)
    await db.execute(
        "UPDATE rollout_members SET wave = ?, reached_at = ?, online_when_reached = "
        "(SELECT online FROM devices d WHERE d.device = rollout_members.device) "
        "WHERE rollout = ? AND wave IS NULL AND rank < ?", (wave, now, rollout, upto))
    await db.execute(
        "INSERT INTO assignments(device, version, assigned_at) SELECT device, CAST(? AS BIGINT), "
        "CAST(? AS DOUBLE PRECISION) FROM rollout_members "
        "WHERE rollout = ? AND wave = ? ON CONFLICT(device) DO UPDATE SET version = excluded.version, "
        "assigned_at = excluded.assigned_at", (version, now, rollout, wave))
    return int(upto)


# --- devices registered after a push ---------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """What a newly registered device was given: the policy its peers run, a place in the
    rollout in progress, or (refused) why the policy meant for it does not fit its profile."""

    device: str
    version: int | None = None  # assigned now
    rollout: int | None = None  # the rollout it became a member of
    waiting: bool = False  # a member of the rollout in progress, reached by a later wave
    refused: str | None = None


async def admit(store: HubState, region: str, devices: list[str], now: float) -> list[Admission]:
    """Give devices registered after a push what their peers were given, in one transaction.

    A device with no assigned version becomes a member of the latest complete rollout that
    targets it (selector and the policy's [target]), reached now, and is assigned its version:
    a later `policy rollback` of that rollout takes it back like the others. If a rollout in
    progress targets it too, it also joins that one, last in rank, so the wave still to come
    (at the latest the final one, 100 %) reaches it under the same health gates. A policy
    whose rules do not fit the device's profile (checked as `policy push` checks) is not given:
    the Admission says why, and the device keeps its local policy until the next push.
    """
    from edgefleet.errors import ConfigError
    from edgefleet.policy.check import check_policy
    from edgefleet.policy.document import validate_policy
    from edgefleet.policy.profiles import load_profile

    wanted = set(devices)
    fits: dict[tuple[int, str], str | None] = {}  # (version, profile) -> why not

    def misfit(r: _Stored, profile: str) -> str | None:
        if (r.version, profile) not in fits:
            try:
                check_policy(r.text, load_profile(profile))
                fits[r.version, profile] = None
            except ConfigError as exc:
                why = " ".join(str(exc).split())  # one line: "invalid policy: line 6, column 1: ..."
                fits[r.version, profile] = f"version {r.version} does not fit profile {profile}: {why}"
        return fits[r.version, profile]

    async def work(db: Tx) -> list[Admission]:
        new = [r for r in await db.fetch(
                "SELECT d.device, d.profile, d.tags FROM devices d LEFT JOIN assignments a USING (device) "
                "WHERE a.device IS NULL AND d.revoked_at IS NULL ORDER BY d.device") if r[0] in wanted]
        if not new:
            return []
        rollouts = [_Stored(rid, version, Selector.from_json(sel), state, text,
                            validate_policy(text, metrics=None, actuators_allowed=None))
                    for rid, version, sel, state, text in await db.fetch(
                            "SELECT r.id, r.version, r.selector, r.state, p.text FROM rollouts r JOIN policies p "
                            "USING (version) WHERE r.state IN (?, 'complete') ORDER BY r.version DESC", (ACTIVE,))]
        admitted = []
        ranks: dict[int, int] = {}
        for device, profile, tags_json in new:
            tags = json.loads(tags_json)
            targeting = [r for r in rollouts if picks(r.selector, r.policy, region, profile, tags)]  # newest first
            complete = next((r for r in targeting if r.state == "complete"), None)
            active = next((r for r in targeting if r.state == ACTIVE), None)
            version = rollout_id = refused = None
            if complete is not None:
                refused = misfit(complete, profile)
                if refused is None:
                    rollout_id, version = complete.id, complete.version
                    await _join(db, ranks, rollout_id, device, None, now, reached=True)
                    await db.execute("INSERT INTO assignments(device, version, assigned_at) VALUES (?, ?, ?)",
                                     (device, version, now))
            waiting = False
            if active is not None:
                why = misfit(active, profile)
                if why is None:
                    rollout_id, waiting = active.id, True
                    await _join(db, ranks, rollout_id, device, version, now, reached=False)
                refused = refused or why
            admitted.append(Admission(device, version, rollout_id, waiting, refused))
        return admitted

    return await store.atomically(work)


class _Stored(NamedTuple):
    """A complete or active rollout, as admit reads it."""

    id: int
    version: int
    selector: Selector
    state: str
    text: str
    policy: Policy


async def _join(db: Tx, ranks: dict[int, int], rollout: int, device: str, previous: int | None,
                now: float, *, reached: bool) -> None:
    """Add a member after the push, last in rank; reached now (in the rollout's current wave) or
    not yet. `ranks` holds each rollout's next rank (read once, then counted here)."""
    if rollout not in ranks:
        ranks[rollout] = (await db.fetch_one(
                "SELECT COALESCE(MAX(rank), -1) + 1 FROM rollout_members WHERE rollout = ?", (rollout,)))[0]
    rank = ranks[rollout]
    ranks[rollout] += 1
    if reached:  # in the rollout's current wave, as its online state is now
        await db.execute(
            "INSERT INTO rollout_members(rollout, device, rank, previous, wave, reached_at, online_when_reached) "
            "SELECT CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS BIGINT), r.wave, "
            "CAST(? AS DOUBLE PRECISION), d.online FROM rollouts r, devices d WHERE r.id = ? AND d.device = ?",
            (rollout, device, rank, previous, now, rollout, device))
    else:
        await db.execute("INSERT INTO rollout_members(rollout, device, rank, previous) VALUES (?, ?, ?, ?)",
                         (rollout, device, rank, previous))


# --- watching and advancing (the running hub, once a second) -----------------------------


async def health(store: HubState, rollout: int, version: int, conf: RolloutConf, now: float | None = None) -> Health:
    now = time.time() if now is None else now
    h = Health()
    for online, was_online, reached_at, applied, refused_json, last_seen in await store.query(
        "SELECT d.online, m.online_when_reached, m.reached_at, d.policy_version, d.policy_refused, d.last_seen "
        "FROM rollout_members m JOIN devices d ON d.device = m.device WHERE m.rollout = ? AND m.wave IS NOT NULL",
        (rollout,)):
        h.reached += 1
        refusal = json.loads(refused_json) if refused_json else None
        if applied == version:
            h.applied += 1
        elif refusal is not None and _refuses(refusal, version, reached_at):
            h.refused += 1
            h.refusal_example = h.refusal_example or f"{refusal.get('reason')}: {refusal.get('detail', '')}"
        elif online:
            h.waiting += 1
        if not online:
            h.offline += 1
            h.went_offline += bool(was_online) and now - (last_seen or 0.0) >= conf.offline_grace_s
    counts = dict(await store.query(
        "SELECT kind, COUNT(*) FROM events WHERE kind IN (?, ?, ?) AND device IN "  # noqa: S608  # fragments are ours
        "(SELECT device FROM rollout_members WHERE rollout = ? AND wave IS NOT NULL) AND "
        f"{JSON_INT[store.dialect].format('body', 'policy_version')} = ? AND "
        f"{JSON_FIELD[store.dialect].format('body', 'policy_local')} IS NULL GROUP BY kind",
        (*GATED_EVENTS, rollout, version)))
    h.action_failures = counts.get(EventKind.ACTION_FAILED, 0)
    h.actions = h.action_failures + counts.get(EventKind.ACTION_SUCCEEDED, 0)
    h.escalations = counts.get(EventKind.ESCALATION, 0)
    h.breach = _breach(h, version, conf)
    return h


def _refuses(refusal: dict[str, Any], version: int, reached_at: float | None) -> bool:
    """A refusal of this version; one the device could not tie to a version (a signature it could
    not check) counts when it came after the rollout reached the device (device clock)."""
    if refusal.get("version") == version:
        return True
    ts = refusal.get("ts")
    return refusal.get("version") == 0 and isinstance(ts, int | float) and ts >= (reached_at or 0.0)


def _breach(h: Health, version: int, conf: RolloutConf) -> str | None:
    def pct(part: int) -> float:
        return 100.0 * part / h.reached if h.reached else 0.0

    if h.refused and pct(h.refused) > conf.max_apply_failure_pct:
        return (f"{h.refused} of {h.reached} reached devices refused version {version} "
                f"({pct(h.refused):.0f}% > {conf.max_apply_failure_pct:g}%), e.g. {h.refusal_example}")
    if h.actions >= conf.min_actions and 100.0 * h.action_failures / h.actions > conf.max_action_failure_pct:
        return (f"{h.action_failures} of {h.actions} actions under version {version} failed "
                f"({100.0 * h.action_failures / h.actions:.0f}% > {conf.max_action_failure_pct:g}%)")
    if h.escalations > conf.max_escalations:
        return f"{h.escalations} rule(s) escalated under version {version} (more than {conf.max_escalations})"
    if h.went_offline and pct(h.went_offline) > conf.max_offline_pct:
        return (f"{h.went_offline} of {h.reached} reached devices went offline after version {version} "
                f"({pct(h.went_offline):.0f}% > {conf.max_offline_pct:g}%)")
    return None


async def tick(store: HubState, identity: str, conf: RolloutConf, now: float) -> list[Transition]:
    """Each rollout in progress: roll it back on a breach; else, once its wave has baked, promote it."""
    transitions = []
    for row in await _active(store):
        transition = await _tick_one(store, identity, conf, now, row)
        if transition is not None:
            transitions.append(transition)
    return transitions


async def _tick_one(store: HubState, identity: str, conf: RolloutConf, now: float,
                    row: tuple[int, int, str, float, int, float]) -> Transition | None:
    rollout, version, waves_json, bake_s, wave, started = row
    h = await health(store, rollout, version, conf, now)
    if h.breach:
        return await revert(store, identity, rollout, "rolled_back", f"health gate: {h.breach}", now, automatic=True)
    if now - started < bake_s or not h.ready:
        return None
    waves = json.loads(waves_json)

    async def work(db: Tx) -> Transition | None:
        current = await db.fetch_one("SELECT state, wave FROM rollouts WHERE id = ?", (rollout,))
        if current is None or tuple(current) != (ACTIVE, wave):
            return None  # the operator moved it meanwhile
        if wave + 1 >= len(waves):
            await _reach(db, rollout, version, wave, waves[wave], now)  # members who joined since (admit)
            await _finish(db, rollout, "complete", None, now)
            message = f"rollout {rollout}: version {version} reached all {h.reached} targeted devices"
            await store.hub_event(db, identity, EventKind.ROLLOUT_COMPLETE, {
                "policy_version": version, "rollout": rollout, "reached": h.reached}, ts=now)
            return Transition(rollout, version, "complete", message)
        reached = await _reach(db, rollout, version, wave + 1, waves[wave + 1], now)
        await db.execute("UPDATE rollouts SET wave = ?, wave_started_at = ?, updated_at = ? WHERE id = ?",
                         (wave + 1, now, now, rollout))
        await store.hub_event(db, identity, EventKind.ROLLOUT_WAVE, {
            "policy_version": version, "rollout": rollout, "wave": wave + 1, "percent": waves[wave + 1],
            "reached": reached, "healthy": {"applied": h.applied, "actions": h.actions,
                                            "action_failures": h.action_failures}}, ts=now)
        return Transition(rollout, version, "wave", f"rollout {rollout}: version {version} healthy after "
                          f"{bake_s:g} s on {h.applied} device(s); wave {wave + 2} of {len(waves)}: "
                          f"{waves[wave + 1]:g}% ({reached} devices)")

    return await store.atomically(work)


async def _active(store: HubState) -> list[tuple[int, int, str, float, int, float]]:
    """The rollouts in progress (several run side by side on disjoint devices), oldest first."""
    rows = await store.query(
        "SELECT id, version, waves, bake_s, wave, wave_started_at FROM rollouts WHERE state = ? ORDER BY id",
        (ACTIVE,))
    return [tuple(row) for row in rows]


def _chosen(active: list[Any], rollout: int | None, verb: str, none: str) -> Any:
    """The row of the rollout in progress an operator's decision is about: `rollout`, or the only one."""
    if rollout is not None:
        row = next((r for r in active if r[0] == rollout), None)
        if row is None:
            raise RolloutError(f"rollout {rollout} is not in progress (edge-hub policy status lists those that are)")
        return row
    if not active:
        raise RolloutError(none)
    if len(active) > 1:
        ids = ", ".join(str(r[0]) for r in active)
        raise UsageError(f"rollouts {ids} are in progress side by side: name the one to {verb} with --rollout ID")
    return active[0]


async def _finish(db: Tx, rollout: int, state: str, reason: str | None, now: float) -> None:
    await db.execute("UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                     (state, reason, now, rollout))


# --- the operator's decisions -----------------------------------------------------------


async def promote(store: HubState, identity: str, now: float, rollout_id: int | None = None) -> Transition:
    """Skip the remaining bake: every targeted device gets the version now."""

    async def work(db: Tx) -> Transition:
        active = await db.fetch("SELECT id, version, waves FROM rollouts WHERE state = ? ORDER BY id", (ACTIVE,))
        rollout, version, waves = _chosen(active, rollout_id, "promote",
                                          "no rollout is in progress (edge-hub policy status shows the latest)")
        last = len(json.loads(waves)) - 1
        reached = await _reach(db, rollout, version, last, 100.0, now)
        await db.execute("UPDATE rollouts SET wave = ?, wave_started_at = ? WHERE id = ?", (last, now, rollout))
        await _finish(db, rollout, "complete", f"promoted by {operator_name()}", now)
        await store.hub_event(db, identity, EventKind.ROLLOUT_PROMOTED, {
            "policy_version": version, "rollout": rollout, "reached": reached, "by": operator_name()}, ts=now)
        return Transition(rollout, version, "promoted",
                          f"rollout {rollout}: version {version} promoted to all {reached} targeted devices")

    return await store.atomically(work)


async def abort(store: HubState, identity: str, now: float, rollout_id: int | None = None) -> Transition:
    """Stop a rollout in progress and put the devices it reached back on their previous policy."""
    row = _chosen(await _active(store), rollout_id, "abort",
                  "no rollout is in progress; to undo a finished one use edge-hub policy rollback")
    return await revert(store, identity, row[0], "aborted", f"aborted by {operator_name()}", now)


async def rollback(store: HubState, identity: str, now: float, rollout_id: int | None = None) -> Transition:
    """Undo the latest rollout (or `rollout_id`), in progress or complete."""
    if rollout_id is None:
        rows = await store.query("SELECT id, state FROM rollouts ORDER BY id DESC LIMIT 1")
    else:
        rows = await store.query("SELECT id, state FROM rollouts WHERE id = ?", (rollout_id,))
        if not rows:
            raise RolloutError(f"there is no rollout {rollout_id} (edge-hub policy status lists the latest)")
    if not rows or rows[0][1] not in (ACTIVE, "complete"):
        what = f"rollout {rows[0][0]} is already {rows[0][1].replace('_', ' ')}" if rows else "nothing was pushed"
        raise RolloutError(f"nothing to roll back: {what}")
    later = await store.query(
        "SELECT MIN(m.rollout) FROM rollout_members m JOIN rollouts r ON r.id = m.rollout WHERE m.rollout > ? "
        "AND r.state IN (?, 'complete') AND m.wave IS NOT NULL AND m.device IN "
        "(SELECT device FROM rollout_members WHERE rollout = ? AND wave IS NOT NULL)", (rows[0][0], ACTIVE, rows[0][0]))
    if later[0][0] is not None:
        raise RolloutError(f"rollout {later[0][0]} has since given some of rollout {rows[0][0]}'s devices another "
                           f"version: roll that one back first")
    return await revert(store, identity, rows[0][0], "rolled_back", f"rolled back by {operator_name()}", now)


async def revert(store: HubState, identity: str, rollout: int, state: str, reason: str, now: float, *,
                 automatic: bool = False) -> Transition:
    """Give every device the rollout reached its previous policy again, as a new version each."""

    async def work(db: Tx) -> Transition:
        row = await db.fetch_one("SELECT version, state FROM rollouts WHERE id = ?", (rollout,))
        if row is None or (row[1] in FINISHED and not (row[1] == "complete" and state == "rolled_back")):
            raise RolloutError(f"rollout {rollout} is {row[1] if row else 'unknown'}: nothing to undo")
        version = row[0]
        groups: dict[int | None, list[str]] = {}
        for device, previous in await db.fetch(
                "SELECT device, previous FROM rollout_members WHERE rollout = ? AND wave IS NOT NULL "
                "ORDER BY rank", (rollout,)):
            groups.setdefault(previous, []).append(device)
        latest = (await db.fetch_one("SELECT MAX(version) FROM policies", ()))[0]
        replaced: dict[int, int | None] = {}
        for previous, devices in sorted(groups.items(), key=lambda g: (g[0] is not None, g[0] or 0)):
            latest += 1
            text = None if previous is None else (await db.fetch_one(
                    "SELECT text FROM policies WHERE version = ?", (previous,)))[0]
            back_to = f"version {previous}" if previous is not None else "the devices' local policies"
            await db.execute(
                "INSERT INTO policies(version, text, sha256, created_at, origin) VALUES (?, ?, ?, ?, ?)",
                (latest, text, hashlib.sha256((text or "").encode()).hexdigest(), now,
                 f"rollback of version {version} (rollout {rollout}) to {back_to}"))
            await db.executemany("UPDATE assignments SET version = ?, assigned_at = ? WHERE device = ?",
                                 [(latest, now, d) for d in devices])
            replaced[latest] = previous
        await _finish(db, rollout, state, reason, now)
        await store.hub_event(db, identity, ROLLOUT_REVERTED[state], {
            "policy_version": version, "rollout": rollout, "reason": reason, "automatic": automatic,
            "devices": sum(map(len, groups.values())),
            "replaced_by": [{"version": v, "previous": p} for v, p in replaced.items()]}, ts=now)
        verb = "rolled back" if state == "rolled_back" else state
        return Transition(rollout, version, state, f"rollout {rollout}: version {version} {verb} on "
                          f"{sum(map(len, groups.values()))} device(s) ({reason})")

    return await store.atomically(work)


# --- reading --------------------------------------------------------------------------


async def recent(store: HubState, limit: int | None = 5, state: str | None = None) -> list[dict[str, Any]]:
    """The latest rollouts (in `state`, if given), newest first, as plain data for `policy status`."""
    out = []
    for r in await store.query(
            "SELECT r.id, r.version, r.selector, r.waves, r.bake_s, r.wave, r.wave_started_at, r.state, r.reason, "
            "r.created_at, r.updated_at, p.origin, (SELECT COUNT(*) FROM rollout_members m WHERE m.rollout = r.id) "
            "FROM rollouts r JOIN policies p ON p.version = r.version WHERE CAST(? AS TEXT) IS NULL OR r.state = ? "
            "ORDER BY r.id DESC LIMIT ?", (state, state, NO_LIMIT if limit is None else limit)):
        out.append({"rollout": r[0], "version": r[1], "state": r[7], "reason": r[8],
                    "target": Selector.from_json(r[2]).describe(),
                    "waves": json.loads(r[3]), "wave": r[5] + 1, "bake_s": r[4], "wave_started_at": r[6],
                    "created_at": r[9], "updated_at": r[10], "origin": r[11], "targeted": r[12]})
    return out


async def in_progress(store: HubState) -> list[dict[str, Any]]:
    """Every rollout in progress, oldest first, as `recent` gives them."""
    return list(reversed(await recent(store, limit=None, state=ACTIVE)))


def operator_name() -> str:
    """Who runs this command, for the audit of operator decisions."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"
