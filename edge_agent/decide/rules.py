"""The rule engine: local decisions with hysteresis, guardrails and an audit trail.

For each rule of the active policy, on every reading of a metric it reads:

- Idle: when `when` holds, the rule fires (it becomes active).
- Active: when `clear` holds, it re-arms (hysteresis: noise around the `when` threshold
  cannot flap the action). While `when` still holds, it fires again only if it has a
  cooldown and the cooldown has passed since its last action.
- An action also needs: the rule's cooldown since its last action, the rule's budget
  (`max_actions` per `per`), the device budget (`limits.max_actions_per_hour`), and, when
  the hub is unreachable, `offline = "act"` (with "skip" it is skipped and audited).
- A rule that fires `escalate_after_fires_without_clear` times without its clear condition
  ever holding, or whose action fails `escalate_after_failures` times in a row, is
  suspended and escalated to the hub ("break glass") instead of looping.
- Rules that need a regional lease or an operator's approval ask a Coordinator (the
  coordination work implements it; until then the default one declines, and says why).

Every decision is an event in the outbox, so it reaches the hub exactly once like any
reading; the record that an action starts is committed before the actuator starts. When the
outbox cannot commit it (a full or read-only disk), the action is refused instead, and that
refusal is what the audit trail keeps (in memory until the disk takes it).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from edge_agent.buffer.outbox import Outbox, OutboxUnwritable
from edge_agent.decide.actuators import ActionResult, Actuators
from edge_agent.decide.windows import ReadingWindows
from edge_agent.sense.sensors import Reading
from edgefleet.policy.allowlist import actuator_call
from edgefleet.policy.document import Policy, Rule
from edgefleet.runtime.tasks import TaskSet
from edgefleet.wire.events import ACTION_OUTCOMES, EventKind

TICK_INTERVAL: Final = 1.0  # how soon a condition on time alone (age, an emptying window) is seen
OUTCOMES: Final = ACTION_OUTCOMES
LATENCY_SAMPLES: Final = 10_000  # decision latencies kept for the P4 figures and metrics
UNAUDITED: Final = ("its audit record cannot be written (the outbox's disk is full or read-only); "
                    "no action runs unaudited")

log = logging.getLogger(__name__)


class Coordinator(Protocol):
    """The hub's side of leases and approvals (the coordination work implements it)."""

    async def lease(self, rule: Rule) -> tuple[bool, str]: ...  # (granted, token or reason)

    async def approve(self, rule: Rule) -> tuple[bool, str]: ...  # (approved, who or reason)

    async def release(self, rule: Rule, token: str) -> None: ...  # the action is over


class NoCoordinator:
    """Until the hub grants leases and approvals, rules that need them do not act."""

    async def lease(self, rule: Rule) -> tuple[bool, str]:
        return False, "regional leases are not granted by this hub yet"

    async def approve(self, rule: Rule) -> tuple[bool, str]:
        return False, "operator approvals are not available on this hub yet"

    async def release(self, rule: Rule, token: str) -> None:
        return None


@dataclass
class RuleState:
    active: bool = False
    suspended: str | None = None
    last_action: float = float("-inf")
    last_fire: float = float("-inf")  # acted on or skipped: repeats while active are timed from here
    actions: collections.deque[float] = field(default_factory=collections.deque)
    fires_without_clear: int = 0
    failures: int = 0
    busy: bool = False  # an action of this rule is running: never two at once


class RuleEngine:
    def __init__(self, policy: Policy, windows: ReadingWindows, actuators: Actuators, outbox: Outbox, *,
                 hub_reachable: Callable[[], bool], coordinator: Coordinator | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy, self.windows, self.actuators, self.outbox = policy, windows, actuators, outbox
        self._hub_reachable = hub_reachable
        self._coordinator = coordinator or NoCoordinator()
        self._clock = clock
        self.states = {rule.name: RuleState() for rule in policy.rules}
        self._by_metric: dict[str, list[Rule]] = collections.defaultdict(list)
        for rule in policy.rules:
            for metric in rule.when.metrics | rule.clear.metrics:
                self._by_metric[metric].append(rule)
        self._device_actions: collections.deque[float] = collections.deque()
        self._jobs = TaskSet(f"rule engine (policy {policy.version})", log)  # decisions being acted on, audits
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.outcomes: collections.Counter[str] = collections.Counter()  # succeeded, failed, refused, skipped

    # --- deciding (synchronous, on the sampler's path) ---------------------------------

    def on_readings(self, readings: list[Reading], arrived: float | None = None) -> None:
        """Take raw readings (before report-by-exception) and decide; `arrived` is
        time.perf_counter() when the sample arrived, for the latency figure."""
        arrived = time.perf_counter() if arrived is None else arrived
        changed = self.windows.add(readings)
        rules = {r.name: r for m in changed for r in self._by_metric.get(m, ())}
        for rule in rules.values():
            self._decide(rule, arrived)

    def tick(self) -> None:
        """Evaluate every rule, new readings or not: `age(m) > 120` must fire when m goes silent."""
        arrived = time.perf_counter()
        for rule in self.policy.rules:
            self._decide(rule, arrived)

    def _decide(self, rule: Rule, arrived: float) -> None:
        st = self.states[rule.name]
        if st.suspended:
            return
        now = self._clock()
        holds = rule.when.evaluate(self.windows) is True
        # While `when` holds the rule stays active, whatever `clear` says: a clear window that
        # lags a rising signal must not re-arm it. A clear is taken even while an action runs.
        if st.active and not holds and rule.clear.evaluate(self.windows) is True:
            st.active, st.fires_without_clear = False, 0
            self._spawn(self._audit(EventKind.RULE_CLEARED, rule, {}), f"rule {rule.name}: clear")
            return
        if not holds or st.busy:
            return
        if st.active:
            if not rule.cooldown_s or now - st.last_fire < rule.cooldown_s:
                return  # holds still: one action per activation, or one per cooldown
            st.fires_without_clear += 1
            limit = self.policy.limits.escalate_after_fires_without_clear
            if st.fires_without_clear >= limit:
                self._suspend(rule, "fires_without_clear",
                              f"fired {st.fires_without_clear} times without its clear condition holding")
                return
        st.active = True
        st.busy = True
        st.last_fire = now
        self._spawn(self._fire(rule, arrived, now, self._snapshot(rule)), f"rule {rule.name}: fire")

    def _snapshot(self, rule: Rule) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in sorted(rule.when.metrics):
            latest = self.windows.latest(metric)
            if latest is not None:
                out[metric] = latest[1]
        return out

    # --- acting (asynchronous) ----------------------------------------------------------

    async def _fire(self, rule: Rule, arrived: float, now: float, readings: dict[str, float]) -> None:
        st = self.states[rule.name]
        try:
            why_not = self._why_not(rule, now)
            if why_not:
                await self._audit_many([(EventKind.RULE_FIRED, {"readings": readings}),
                                        (EventKind.ACTION_SKIPPED, {"action": rule.action, "detail": why_not})], rule)
                return
            granted = await self._coordinate(rule, readings)
            if granted is None:
                return
            token, approved_by = granted
            st.last_action = now
            st.actions.append(now)
            self._device_actions.append(now)
            kind, args, timeout = actuator_call(rule)
            env: dict[str, str] = {}
            if token:
                # The fencing token travels into the action: a command sees it in its environment,
                # a record keeps it; whatever the action talks to can refuse an older token.
                env["EDGEFLEET_LEASE_TOKEN"] = token
                if kind == "record":
                    args = {**args, "lease_token": int(token)}
            latency: list[float] = []

            async def started(_kind: str, _args: object) -> None:
                body: dict[str, Any] = {"action": rule.action, "args": args}
                if token:
                    body["lease"] = rule.lease.name if rule.lease else None
                    body["lease_token"] = int(token)
                if approved_by:
                    body["approved_by"] = approved_by
                # Committed before the actuator starts: it survives a crash between the two. If it
                # cannot be, the action is refused (OutboxUnwritable), audited as such.
                fired = (EventKind.RULE_FIRED, {"readings": readings})
                await self._audit_many([fired, (EventKind.ACTION_STARTED, body)], rule, otherwise=[
                    fired, (EventKind.ACTION_REFUSED, {"action": rule.action, "detail": UNAUDITED})])
                # The decision latency (P4): sample arrival to the actuator starting, which is
                # now; it includes the durable audit commit, as it must.
                latency.append((time.perf_counter() - arrived) * 1000)
                self.latencies_ms.append(latency[0])

            try:
                try:
                    result = await self.actuators.run(kind, args, timeout=timeout, started=started, env=env)
                except OutboxUnwritable as exc:
                    self.outcomes["refused"] += 1
                    log.warning("rule %s: action %s refused: %s", rule.name, rule.action, exc)
                    return
                await self._finished(rule, result, readings, latency[0] if latency else None)
            finally:
                if token:  # after the outcome is audited: the audit never shows more holders than the limit
                    await self._coordinator.release(rule, token)
        finally:
            st.busy = False

    def _why_not(self, rule: Rule, now: float) -> str | None:
        st = self.states[rule.name]
        if now - st.last_action < rule.cooldown_s:
            return f"within its cooldown of {rule.cooldown_s:g} s"
        if rule.max_actions is not None:
            _expire(st.actions, now - rule.per_s)
            if len(st.actions) >= rule.max_actions:
                return f"its budget of {rule.max_actions} actions per {rule.per_s:g} s is spent"
        _expire(self._device_actions, now - 3600)
        if len(self._device_actions) >= self.policy.limits.max_actions_per_hour:
            return f"the device's budget of {self.policy.limits.max_actions_per_hour} actions per hour is spent"
        if not self._hub_reachable() and rule.offline == "skip":
            return 'the hub is unreachable and the rule says offline = "skip"'
        return None

    async def _coordinate(self, rule: Rule, readings: dict[str, float]) -> tuple[str, str] | None:
        """(lease token, approved by), '' for what is not needed; None when the action may not run."""
        if not (rule.lease or rule.approval):
            return "", ""
        if not self._hub_reachable():
            # offline = "skip" never gets here (_why_not skipped it): the policy says act alone
            # when the hub cannot be asked. Audited as such.
            without = " and ".join(w for w, on in (("a lease", rule.lease), ("an approval", rule.approval)) if on)
            await self._audit(EventKind.COORDINATION_SKIPPED, rule, {
                "detail": f'the hub is unreachable and the rule says offline = "act": acting without {without}'})
            return "", ""
        token = who = ""
        if rule.approval:
            ok, who = await self._coordinator.approve(rule)
            if not ok:
                await self._refused(rule, readings, f"no approval: {who}")
                return None
        if rule.lease:
            ok, token = await self._coordinator.lease(rule)
            if not ok:
                await self._refused(rule, readings, f"no lease {rule.lease.name!r}: {token}")
                return None
        return token, who

    async def _refused(self, rule: Rule, readings: dict[str, float], detail: str) -> None:
        await self._audit_many([(EventKind.RULE_FIRED, {"readings": readings}),
                                (EventKind.ACTION_REFUSED, {"action": rule.action, "detail": detail})], rule)

    async def _finished(self, rule: Rule, result: ActionResult, readings: dict[str, float],
                        latency_ms: float | None) -> None:
        st = self.states[rule.name]
        body = {"action": rule.action, "detail": result.detail, "exit_code": result.exit_code,
                "output": result.output, "timed_out": result.timed_out,
                "duration_ms": round(result.duration_s * 1000, 3),
                "latency_ms": None if latency_ms is None else round(latency_ms, 3)}
        if result.refused:
            # The allowlist said no: no action started (the hook did not run).
            await self._audit_many([(EventKind.RULE_FIRED, {"readings": readings}),
                                    (EventKind.ACTION_REFUSED, body)], rule)
            log.warning("rule %s: action refused: %s", rule.name, result.detail)
            return
        outcome = EventKind.ACTION_SUCCEEDED if result.ok else EventKind.ACTION_FAILED
        if latency_ms is None:
            # It failed before starting (bad arguments): no start record was written.
            await self._audit_many([(EventKind.RULE_FIRED, {"readings": readings}), (outcome, body)], rule)
        else:
            await self._audit(outcome, rule, body)
        if result.ok:
            st.failures = 0
            return
        st.failures += 1
        log.warning("rule %s: action failed (%d in a row): %s", rule.name, st.failures, result.detail)
        if st.failures >= self.policy.limits.escalate_after_failures:
            self._suspend(rule, "repeated_failures", f"its action failed {st.failures} times in a row")

    def _suspend(self, rule: Rule, reason: str, detail: str) -> None:
        self.states[rule.name].suspended = reason
        log.error("rule %s suspended and escalated to the hub: %s", rule.name, detail)
        self._spawn(self._audit(EventKind.ESCALATION, rule, {"reason": reason, "detail": detail}),
                    f"rule {rule.name}: escalation")

    # --- audit --------------------------------------------------------------------------

    async def _audit(self, kind: EventKind, rule: Rule, body: dict[str, Any]) -> None:
        await self._audit_many([(kind, body)], rule)

    async def _audit_many(self, records: list[tuple[EventKind, dict[str, Any]]], rule: Rule, *,
                          otherwise: list[tuple[EventKind, dict[str, Any]]] | None = None) -> None:
        """Audit records, committed; `otherwise` as Outbox.add_events takes it (raises OutboxUnwritable)."""
        for kind, _ in records:
            if kind in OUTCOMES:
                self.outcomes[kind.removeprefix("action_")] += 1
        base: dict[str, Any] = {"policy_version": self.policy.version, "rule": rule.name}
        if not self.policy.signed:
            base["policy_local"] = True  # a local file's number: never mistaken for the hub's version
        await self.outbox.add_events([(kind, {**base, **body}) for kind, body in records], otherwise=None
                                     if otherwise is None else [(kind, {**base, **body}) for kind, body in otherwise])

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._jobs.spawn(work, name=name)  # a failure is logged there, at ERROR with its traceback

    @property
    def busy(self) -> bool:
        """Decisions or actions are still running."""
        return bool(self._jobs)

    async def drain(self) -> None:
        """Wait for running decisions and actions (tests, and a clean stop)."""
        await self._jobs.drain()

    async def close(self) -> None:
        """Cancel the decisions and actions still running and wait for them (the agent stops)."""
        await self._jobs.close()


def _expire(times: collections.deque[float], before: float) -> None:
    while times and times[0] < before:
        times.popleft()

