"""The agent daemon: sense, filter, buffer in the outbox, sync with the hub.

Sensing and buffering never depend on the hub: the sampler and the outbox run from start
to stop; only the uplink and presence live and die with the MQTT connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any, Final

from edge_agent import __version__
from edge_agent.buffer.machine import fingerprint, machine_number
from edge_agent.buffer.outbox import Outbox, OutboxUnwritable
from edge_agent.config import AgentSettings
from edge_agent.decide.actuators import Actuators, MqttPublisher
from edge_agent.decide.coordination import HubCoordinator, bid_score
from edge_agent.decide.policy_intake import PolicyIntake
from edge_agent.decide.rules import TICK_INTERVAL, UNAUDITED, RuleEngine
from edge_agent.decide.windows import ReadingWindows
from edge_agent.identity.clock import unset_clock_warning
from edge_agent.identity.enroll import Enrollment
from edge_agent.identity.renewal import Renewal
from edge_agent.identity.tls import IdentityFiles
from edge_agent.metrics import serve_agent_metrics
from edge_agent.sense.field.base import HEALTH_FILE, FieldSensors
from edge_agent.sense.report import ReportFilter
from edge_agent.sense.sensors import Reading, Sampler, build_sensors
from edge_agent.sync.uplink import Uplink, UplinkSettings
from edgefleet.errors import ConnectionLost, TransientError
from edgefleet.mqtt.link import Link
from edgefleet.mqtt.session import MqttSession, Will
from edgefleet.policy.document import Policy
from edgefleet.runtime.lifecycle import Opening, run_until_signal
from edgefleet.runtime.runlock import AGENT_LOCK, RunLock
from edgefleet.runtime.sdnotify import READY, Watchdog, notify
from edgefleet.runtime.tasks import TaskSet
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import (
    ACK,
    CERT,
    COORD,
    POLICY,
    STATUS,
    Ack,
    Bid,
    CoordDown,
    CoordUp,
    Presence,
    ProtocolError,
    Status,
    TaskAward,
    TaskDone,
    TaskOffer,
    down_filter,
    encode,
    pack,
    pack_coord,
    parse_topic,
    presence_topic,
    read_json,
    unpack,
    unpack_cert_reply,
    unpack_down,
    up_topic,
)

STOP_FLUSH_TIMEOUT: Final = 5.0  # a clean stop commits what is buffered; bounded for systemd

log = logging.getLogger("edge_agent")


class Agent:
    """One device. Build with `async with Agent.open(settings, policy) as agent:` (or await it and
    `close()` at the end), then `run()`."""

    def __init__(self, settings: AgentSettings, outbox: Outbox, policy: Policy | None = None) -> None:
        self.settings = settings
        self.device = settings.config.device_id
        self.outbox = outbox
        up = settings.config.uplink
        self.uplink = Uplink(self.device, outbox, UplinkSettings(up.batch_max, up.window, up.ack_timeout))
        self.report = ReportFilter(settings.profile.report)
        self.sampler = Sampler(build_sensors(settings.profile, self.device, settings.state_dir), self._take,
                               clock=outbox.clock.now)
        self.field = FieldSensors.from_specs(settings.profile.field_sensors, self._take, clock=outbox.clock.now,
                                             audit=lambda kind, body: self._spawn(self._record(kind, body),
                                                                                  f"audit {kind}"),
                                             health_file=settings.state_dir / HEALTH_FILE)
        # Open aggregation windows hold readings stamped before a clock step: they go in before it.
        outbox.before_clock_change = lambda: outbox.add(self.report.flush())
        self.actuators = Actuators(settings.profile.actuators, set_rate=self.sampler.set_interval, alert=self._alert,
                                   mqtt={s.name: s for s in self.field.sensors if isinstance(s, MqttPublisher)},
                                   field_write=self.field.write)
        self.link = Link(f"agent {self.device}", self._new_session, self._serve, logger=log,
                         on_refused=lambda exc: self.renewal.on_refused(exc))
        files = IdentityFiles(settings.tls, settings.state_dir)
        self.renewal = Renewal(self.device, files, self.link,
                               audit=lambda kind, body: self._spawn(self._record(kind, body), f"audit {kind}"))
        # An image folder's device without an identity of its own yet: enroll before connecting.
        token, enroll = settings.enroll_token, settings.config.enroll
        self.enrollment = (Enrollment(self.device, enroll.url, token, files, settings.state_dir)
                           if enroll is not None and token is not None else None)
        self._session_id = ""
        self._status_now = asyncio.Event()  # report at once (a policy was applied or refused)
        self.coordinator = HubCoordinator(self._send_coord)
        self._jobs = TaskSet(f"agent {self.device}", log)  # policies being applied, bids, awarded tasks, audits
        self._policy_lock = asyncio.Lock()
        # The signed policy kept from the hub outranks the local file it was given.
        self.intake = PolicyIntake(settings, local=policy)
        self.engine: RuleEngine | None = None
        self._retired: list[RuleEngine] = []  # replaced engines whose actions still run under their audit
        self._install(self.intake.load())
        self.watchdog = Watchdog.from_environment(status=self._systemd_status)
        self.run_lock: RunLock | None = None  # Agent.open takes it; close() lets it go

    def _systemd_status(self) -> str:
        """What `systemctl status edge-agent` shows, refreshed with every watchdog ping."""
        link = "connected to the hub" if self.link.connected.is_set() else "not connected to the hub"
        disk = f"; the outbox cannot write: {self.outbox.unwritable.value}" if self.outbox.unwritable else ""
        return f"{link}, backlog {self.outbox.backlog}, policy version {self.intake.version}{disk}"

    def _install(self, policy: Policy | None) -> None:
        """Switch the rules over; actions the old engine started finish under its audit."""
        self.coordinator.policy_version = policy.version if policy is not None else 0
        if self.engine is not None:
            self._retired = [e for e in self._retired if e.busy] + [self.engine]
        if policy is None or not policy.rules:
            self.engine = None
            return
        keep = {m: 0.0 for rule in policy.rules for m in rule.when.metrics | rule.clear.metrics}
        for metric, seconds in policy.windows:
            keep[metric] = max(keep[metric], seconds)  # the longest window of each metric
        self.engine = RuleEngine(policy, ReadingWindows(keep), self.actuators, self.outbox,
                                 hub_reachable=lambda: self.link.connected.is_set(), coordinator=self.coordinator)

    @classmethod
    def open(cls, settings: AgentSettings, policy: Policy | None) -> Opening[Agent]:
        """`await Agent.open(...)` (then `close()`), or `async with Agent.open(...) as agent:`."""
        return Opening(cls._open(settings, policy))

    @classmethod
    async def _open(cls, settings: AgentSettings, policy: Policy | None) -> Agent:
        """`policy` as validated by `settings.load_policy()` (the CLI does it before start). Raises
        AlreadyRunning, before anything is opened, when another agent runs on the state directory."""
        lock = RunLock.acquire(settings.state_dir / AGENT_LOCK, "edge-agent", settings.state_dir)
        try:
            conf = settings.config.outbox
            outbox = await Outbox.open(settings.state_dir, settings.quota_bytes, conf.synchronous,
                                       machine=machine_number(fingerprint(settings.config.state.machine)),
                                       ballast_bytes=int(conf.ballast_mb * 1024 * 1024))
            agent = cls(settings, outbox, policy)
        except BaseException:
            lock.release()
            raise
        agent.run_lock = lock
        return agent

    def _take(self, readings: list[Reading]) -> None:
        arrived = time.perf_counter()
        if self.engine is not None:
            try:
                self.engine.on_readings(readings, arrived)  # raw readings: decide on everything sensed
            except Exception:  # one bad evaluation must not stop sensing
                log.exception("the rule engine failed on a reading")
        self.outbox.add(self.report.filter(readings))

    async def _alert(self, message: str, severity: str) -> None:
        await self.outbox.add_event(EventKind.ALERT, {"message": message, "severity": severity})

    async def _record(self, kind: EventKind, body: dict[str, object]) -> None:
        await self.outbox.add_event(kind, body)

    # --- the connection ---------------------------------------------------------------

    def _presence(self, state: str) -> bytes:
        c = self.settings.config
        return encode(Presence(
            state="online" if state == "online" else "offline", session=self._session_id,
            agent_version=__version__, profile=c.profile, tags=dict(c.tags), ts=time.time(),
        ))

    def _new_session(self) -> MqttSession:
        c = self.settings.config
        # A fresh id per connection: the hub ignores a late Last Will of an older one.
        self._session_id = secrets.token_hex(8)
        return MqttSession(
            client_id=self.device, host=c.broker.host, port=c.broker.port,
            # Chosen per connection: a renewed certificate is tried, and promoted, or dropped.
            tls=self.renewal.credential().tls.context(), keepalive=c.broker.keepalive,
            connect_timeout=c.broker.connect_timeout, max_inflight=c.uplink.window + 4,
            will=Will(presence_topic(self.device), self._presence("offline")),
        )

    async def _serve(self, session: MqttSession) -> None:
        await session.subscribe([(down_filter(self.device), 1)])
        await session.publish(presence_topic(self.device), self._presence("online"), qos=1, retain=True)
        log.info("%s online (profile %s, backlog %d)", self.device, self.settings.config.profile,
                 self.outbox.backlog)
        self.renewal.on_connected()  # the session works: a renewed certificate becomes the current one
        await self.coordinator.on_connected()  # leases and approvals still waited for: ask again
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.uplink.serve(session), name="uplink")
            tasks.create_task(self._report_status(session), name="status")
            tasks.create_task(self._receive(session), name="receive")

    async def _receive(self, session: MqttSession) -> None:
        while True:
            message = await session.next_message()
            try:
                topic = parse_topic(message.topic)
                if topic.device != self.device or topic.channel != "down":
                    raise ProtocolError("bad_topic", f"not ours: {message.topic}")
                if topic.kind == ACK:
                    await self.uplink.on_hub_ack(unpack(message.payload, Ack))
                elif topic.kind == POLICY:
                    await self.take_policy(message.payload)
                elif topic.kind == COORD:
                    await self._coordination(unpack_down(message.payload))
                elif topic.kind == CERT:
                    self.renewal.on_reply(unpack_cert_reply(message.payload))
                else:
                    log.debug("message on %s not handled yet", message.topic)
            except ProtocolError as exc:
                log.warning("ignored a message from the hub (%s): %s", exc.reason, exc.detail)

    # --- coordination: leases and approvals (the rule engine's), tasks (ours) -------------

    async def _send_coord(self, message: CoordUp) -> None:
        session = self.link.session
        if session is None or not self.link.connected.is_set():
            raise ConnectionLost("not connected to the hub")
        await session.publish(up_topic(self.device, COORD), pack_coord(message), qos=1)

    async def _coordination(self, message: CoordDown) -> None:
        if isinstance(message, TaskOffer):
            self._spawn(self._bid(message), f"bid for task {message.task}")
        elif isinstance(message, TaskAward):
            self._spawn(self._run_task(message), f"task {message.task}")
        else:
            await self.coordinator.on_message(message)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Work of the agent's, not of the connection's: it outlives a disconnect, not the agent."""
        self._jobs.spawn(work, name=name)

    def _task_args(self, kind: str, args_json: str) -> tuple[dict[str, Any], str | None]:
        try:
            args = read_json(args_json)
        except ProtocolError as exc:
            return {}, f"its arguments are not usable JSON ({exc.detail})"
        if not isinstance(args, dict):
            return {}, "its arguments are not a JSON object"
        return args, self.actuators.check(kind, args)

    async def _bid(self, offer: TaskOffer) -> None:
        _, why_not = self._task_args(offer.kind, offer.args)
        if why_not:
            bid = Bid(task=offer.task, able=False, detail=why_not)
        else:
            score, figures = bid_score(self.settings.profile, self.device, self.settings.state_dir,
                                       self.outbox.backlog)
            bid = Bid(task=offer.task, able=True, score=score, detail=figures)
        log.info("task %d (%s): %s", offer.task, offer.kind,
                 f"bid {bid.score:.3f} ({bid.detail})" if bid.able else f"cannot: {bid.detail}")
        with contextlib.suppress(TransientError):
            await self._send_coord(bid)

    async def _run_task(self, award: TaskAward) -> None:
        args, why_not = self._task_args(award.kind, award.args)
        base = {"task": award.task, "attempt": award.attempt, "action": award.kind}
        if why_not:
            done = TaskDone(task=award.task, attempt=award.attempt, ok=False, refused=True, detail=why_not)
            await self.outbox.add_event(EventKind.TASK_REFUSED, {**base, "detail": why_not})
        else:
            async def started(_kind: str, _args: object) -> None:
                # No task runs unaudited: on a full or read-only disk it is refused (OutboxUnwritable).
                await self.outbox.add_event(EventKind.TASK_STARTED, {**base, "args": args},
                                            otherwise=(EventKind.TASK_REFUSED, {**base, "detail": UNAUDITED}))

            try:
                result = await self.actuators.run(award.kind, args, timeout=award.timeout_s, started=started)
            except OutboxUnwritable:
                done = TaskDone(task=award.task, attempt=award.attempt, ok=False, refused=True, detail=UNAUDITED)
            else:
                done = TaskDone(task=award.task, attempt=award.attempt, ok=result.ok, refused=result.refused,
                                detail=result.detail[:1000], exit_code=result.exit_code)
                await self.outbox.add_event(EventKind.TASK_DONE, {**base, "ok": result.ok, "detail": result.detail,
                                                          "exit_code": result.exit_code, "output": result.output})
        log.info("task %d: %s", award.task, "done" if done.ok else f"not done: {done.detail}")
        with contextlib.suppress(TransientError):  # the hub times the award out and moves on
            await self._send_coord(done)

    async def take_policy(self, payload: bytes) -> None:
        """A signed policy from the hub: apply it, or keep the one in force and say why not.

        The work belongs to the agent, not to the connection: a disconnect in the middle must
        not leave a policy stored (and reported) but not installed, or installed but unaudited.
        """
        # Quiet: its failure reaches the caller through the shield (and ends the session, as before).
        await asyncio.shield(self._jobs.spawn(self._take_policy(payload), name="policy", quiet=True))

    async def _take_policy(self, payload: bytes) -> None:
        async with self._policy_lock:  # one at a time, in the order received
            await self._apply_policy(payload)

    async def _apply_policy(self, payload: bytes) -> None:
        # Signature check and validation are CPU work; the sampler keeps its pace meanwhile.
        outcome = await asyncio.to_thread(self.intake.offer, payload)
        if outcome.kind == "unchanged":
            return
        if outcome.kind == "applied":
            self._install(outcome.policy)
            rules = len(outcome.policy.rules) if outcome.policy else 0
            source = "the local policy file" if outcome.withdrawn else f"{rules} rule(s)"
            log.info("policy version %d applied: %s", outcome.version, source)
            await self.outbox.add_event(EventKind.POLICY_APPLIED, {
                "policy_version": outcome.version, "rules": rules, "withdrawn": outcome.withdrawn})
        elif outcome.refusal is not None and not outcome.repeated:
            r = outcome.refusal
            log.warning("policy version %d refused (%s): %s; version %d stays in force",
                        r.version, r.reason, r.detail, self.intake.version)
            await self.outbox.add_event(EventKind.POLICY_REFUSED, {
                "policy_version": r.version, "reason": r.reason, "detail": r.detail,
                "in_force": self.intake.version})
        self._status_now.set()

    async def status(self) -> Status:
        shed = await self.outbox.shed_report()
        return Status(
            backlog=self.outbox.backlog, dropped=shed.dropped, dropped_by_metric=shed.by_metric,
            outbox_bytes=await self.outbox.used_bytes(), corrupt_outboxes=self.outbox.corrupt_outboxes,
            sensor_failures={**self.sampler.failures, **self.field.errors()}, ts=time.time(),
            policy_version=self.intake.version, policy_refused=self.intake.refused,
            field_sensors=self.field.records(),
        )

    async def _report_status(self, session: MqttSession) -> None:
        topic = up_topic(self.device, STATUS)
        while True:
            self._status_now.clear()
            await session.publish(topic, pack(await self.status()), qos=1)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
            # arrives as the event is set, and the agent's stop would then wait on this task.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.config.uplink.status_interval):
                    await self._status_now.wait()

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Sense, buffer and sync until cancelled."""
        problem = unset_clock_warning(dt.datetime.now(dt.UTC))
        if problem:
            # Not the certificate-based check of `edge-agent check`: parsing X.509 here would
            # load `cryptography` (about 15 MB of RSS) into the daemon for one log line.
            log.warning("%s", problem)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.outbox.flusher(partial(self.watchdog.beat, "outbox")), name="outbox")
            tasks.create_task(self.sampler.run(partial(self.watchdog.beat, "sampler")), name="sampler")
            tasks.create_task(self.field.run(), name="field")
            tasks.create_task(self._close_windows(), name="aggregation")
            tasks.create_task(self._tick_rules(), name="rules")
            tasks.create_task(self._connect(tasks), name="connect")
            tasks.create_task(self.watchdog.run(), name="watchdog")
            m = self.settings.config.metrics
            if m.port:
                tasks.create_task(serve_agent_metrics(self, m.listen, m.port), name="metrics")
            await asyncio.sleep(0)  # every task took its first step: the link's first connect attempt started
            notify(READY)

    async def _connect(self, tasks: asyncio.TaskGroup) -> None:
        """The link and renewal, once the device has an identity (enrolled first if it has none)."""
        if self.enrollment is not None and self.enrollment.needed():
            await self.enrollment.run()
        tasks.create_task(self.link.run(), name="link")
        tasks.create_task(self.renewal.run(), name="renewal")

    async def _tick_rules(self) -> None:
        """Whichever engine is in force is also evaluated on the clock (age() rules, see rules.py)."""
        while True:
            self.watchdog.beat("rules")
            await asyncio.sleep(TICK_INTERVAL)
            if self.engine is not None:
                self.engine.tick()

    async def _close_windows(self) -> None:
        """Aggregation windows close on the clock too, not only when a later reading arrives."""
        period = self.settings.profile.report.aggregate_s
        if not period:
            return
        while True:
            await asyncio.sleep(min(period, 1.0))
            self.outbox.add(self.report.flush(self.outbox.clock.now()))

    async def stop(self) -> None:
        """Leave cleanly: the broker publishes our Last Will, so the hub sees us offline now."""
        if self.link.session is not None:
            await self.link.session.close(with_will=True)

    async def close(self) -> None:
        self.actuators.close()  # GPIO outputs back to idle before anything else can fail
        # Bids, tasks and audits first, then the rule engines' actions: none of them outlives the agent.
        await self._jobs.close()
        for engine in reversed([*self._retired, *([self.engine] if self.engine else [])]):
            await engine.close()
        self.outbox.add(self.report.flush())  # partial aggregation windows are kept, not lost
        try:
            async with asyncio.timeout(STOP_FLUSH_TIMEOUT):
                await self.outbox.close()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()


async def run_agent(settings: AgentSettings, policy: Policy | None) -> None:
    """`edge-agent run`: until SIGTERM or SIGINT, then leave the broker cleanly and close."""
    async with Agent.open(settings, policy) as agent:
        await run_until_signal(agent.run(), leave=agent.stop)
