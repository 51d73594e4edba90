"""`edge-hub run`: the managed broker (unless external) and the hub's MQTT service."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from edgefleet.errors import AlreadyRunning
from edgefleet.mqtt.link import SESSION_ENDED, Link
from edgefleet.mqtt.session import Message, MqttSession, TlsIdentity
from edgefleet.runtime.lifecycle import run_until_signal
from edgefleet.runtime.runlock import RunLock
from edgefleet.runtime.sdnotify import READY, Watchdog, notify
from edgefleet.runtime.tasks import TaskSet
from edgefleet.wire.protocol import (
    ACK,
    COORD,
    PRESENCE_FILTER,
    UP_FILTER,
    Ack,
    Presence,
    Renumber,
    down_topic,
    pack,
    pack_coord,
    shared_filter,
)
from hub.broker import STOP_GRACE, BrokerSupervisor, broker_executable, write_broker_files
from hub.config import HubConfig, HubPaths, RetentionConf
from hub.db.engines import open_store
from hub.db.interface import UNAVAILABLE, HubState
from hub.db.retention import keep_pruning
from hub.errors import HubAlreadyRunning
from hub.ingest.batches import INTERNAL_ERROR, CycleResult, Ingest, blames_message
from hub.ingest.retained import RetainedSweeper
from hub.ingest.subscriptions import SubscriptionWatch, share_group
from hub.metrics import MetricsError, serve_metrics
from hub.pki.authority import load_policy_key
from hub.pki.renewal import CertificateDesk, keep_pki_fresh
from hub.region.coordination import Coordination, Replies
from hub.region.leadership import CA_ROLE, Leadership
from hub.region.replicas import prepare_replica
from hub.rollout.distribution import PolicyPublisher

DB_RETRY_WAIT: Final = 1.0  # after SQLite's own 10 s busy timeout ran out
HUB_SESSION_EXPIRY: Final = 600  # seconds the broker keeps the hub's queue while it restarts
# Messages taken per ingest cycle (one transaction): large enough to amortise the commit,
# small enough that one cycle stays well under a second.
INGEST_MAX_MESSAGES: Final = 200
COORDINATION_TICK: Final = 0.5  # lease expiries and task timeouts are seen within this
# Each of run_hub's tasks gets this long to end once cancelled: the broker's takes up to
# STOP_GRACE and a kill; all of them stay within the unit's TimeoutStopSec (30 s).
TASK_STOP_TIMEOUT: Final = 2 * STOP_GRACE

log = logging.getLogger("hub")
R = TypeVar("R")
T = TypeVar("T")


class HubService:
    """The hub's MQTT side: presence and telemetry ingest; subscribes again on every connect."""

    def __init__(self, paths: HubPaths, config: HubConfig, store: HubState, watchdog: Watchdog | None = None,
                 replica: str | None = None) -> None:
        self._paths, self._config, self._store, self._replica = paths, config, store, replica
        self.identity = config.replica_identity(replica)
        self.watchdog = watchdog if watchdog is not None else Watchdog(None)
        self.ingest = Ingest(store, self.identity)
        self.policies = PolicyPublisher(config, store, load_policy_key(paths.policy_key))
        self.coordination = Coordination(store, config.identity)
        self.certificates = CertificateDesk(paths, config, store)  # devices' in-band renewals
        self.leadership = Leadership(store, self.identity)
        self._group = share_group(paths)  # secret: no device can join the hub's share of the messages
        self.link = Link(f"hub {self.identity}", self._session, self._serve, logger=log)

    def _session(self) -> MqttSession:
        p = self._paths
        cert, key = ((p.hub_cert, p.hub_key) if self._replica is None
                     else (p.replica_cert(self._replica), p.replica_key(self._replica)))
        return MqttSession(
            client_id=self.identity, host=self._config.broker.host,
            port=self._config.broker.port, tls=TlsIdentity(p.ca_cert, cert, key).context(),
            keepalive=self._config.hub.keepalive, manual_ack=True,
            # A lone hub keeps a persistent session: what devices send while it restarts waits at
            # the broker instead of the devices' ack timeouts. With replicas it must not: the
            # broker goes on handing a stopped member of a shared subscription its share of the
            # messages, to hold until it returns. Then the devices' own resend covers a restart.
            clean_start=self._shares_ingest,
            session_expiry=0 if self._shares_ingest else HUB_SESSION_EXPIRY,
            max_inflight=INGEST_MAX_MESSAGES,
        )

    @property
    def _shares_ingest(self) -> bool:
        """Replicas are configured: other hub processes take part in the shared subscription."""
        return bool(self._config.hub.replicas)

    async def run(self) -> None:
        await self.link.run()

    async def _process(self, messages: list[Message]) -> tuple[CycleResult, Replies]:
        """Ingest, then the cycle's coordination requests; while the database is locked (an
        operator's command holding it past the busy timeout) wait and try again: the messages
        stay unacknowledged, nothing is lost, and handling a request twice answers the same."""
        for attempt in itertools.count():
            try:
                result = await self.ingest.process(messages)
                # Presence first: a device that reconnects sends "online" and, at once, its open
                # coordination requests; they must find it online.
                await self._apply_presence(result)
                replies = Replies()
                for handled in await self._each_alone("coordination request", result.coord, self.coordination.handle):
                    replies.messages += handled.messages
                    replies.notes += handled.notes
                await self._each_alone("certificate request", result.certs, self.certificates.handle)
                return result, replies
            except UNAVAILABLE as exc:  # PUBACK nothing: the devices keep their batches, and resend
                log.log(logging.WARNING if attempt == 0 else logging.DEBUG,
                        "hub database unavailable (%s); retrying in %.0f s", exc, DB_RETRY_WAIT)
                self.watchdog.beat("ingest")  # an operator's command holds the database: not a hang
                await asyncio.sleep(DB_RETRY_WAIT)
        raise AssertionError("unreachable")

    async def _each_alone(self, what: str, requests: list[tuple[str, R]],
                          handle: Callable[[list[tuple[str, R]]], Awaitable[T]]) -> list[T]:
        """`handle(requests)`; should it fail unexpectedly, each request alone, and the one that
        fails is counted and logged as rejected: one device's message cannot stop the hub."""
        try:
            return [await handle(requests)] if requests else []
        except Exception as exc:
            if not blames_message(exc):
                raise
        done: list[T] = []
        for request in requests:
            try:
                done.append(await handle([request]))
            except Exception as exc:
                if not blames_message(exc):
                    raise
                await self.ingest.reject(INTERNAL_ERROR, f"{what} from {request[0]}", exc)
        return done

    async def _serve(self, session: MqttSession) -> None:
        # A durable subscription is not restored after a broker restart (2.0.11), and a
        # new session has none: subscribe on every connect.
        # Presence reaches every replica (each applies it; the same state twice changes nothing);
        # device messages are shared out, each to one replica.
        # Retain-as-published: a retained message a device may not keep shows its flag (hub.ingest.retained).
        await session.subscribe([(PRESENCE_FILTER, 1), (shared_filter(self._group, UP_FILTER), 1)],
                                retain_as_published=True)
        log.info("hub ready: %s subscribed on %s:%d", self.identity, self._config.broker.host,
                 self._config.broker.port)
        outgoing: asyncio.Queue[Replies] = asyncio.Queue()
        acks = AckSender()
        clears = RetainedSweeper()

        async def lead() -> None:
            async with asyncio.TaskGroup() as leader_tasks:
                leader_tasks.create_task(self.policies.serve(session), name="policies")
                leader_tasks.create_task(self._coordinate(outgoing), name="coordination")

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._ingest(session, outgoing, acks, clears), name="ingest")
            tasks.create_task(acks.serve(session), name="acks")
            tasks.create_task(clears.serve(session), name="retained")
            tasks.create_task(self.leadership.while_leading(lead), name="leader")
            tasks.create_task(self._send_replies(session, outgoing), name="replies")
            tasks.create_task(self.certificates.serve(session), name="certificates")

    async def _coordinate(self, outgoing: asyncio.Queue[Replies]) -> None:
        """Lease expiries, approval decisions and task phases, twice a second."""
        while True:
            try:
                with self.watchdog.busy("coordination"):
                    outgoing.put_nowait(await self.coordination.tick())
            except UNAVAILABLE as exc:
                log.warning("hub database unavailable for coordination (%s); trying again", exc)
            except SESSION_ENDED:
                raise
            except Exception:  # a coordination bug must not take the ingest down with it
                log.exception("coordination failed; trying again")
            await asyncio.sleep(COORDINATION_TICK)

    async def _apply_presence(self, result: CycleResult) -> None:
        """The cycle's presence messages, in one transaction; applied once, also when a later step is retried."""
        now = time.time()

        async def apply(messages: list[tuple[str, Presence]]) -> None:
            for i in await self._store.apply_presences(messages, now):
                device, presence = messages[i]
                log.info("device %s is %s", device, presence.state)

        await self._each_alone("presence", result.presence, apply)
        result.presence = []

    @staticmethod
    async def _send_replies(session: MqttSession, outgoing: asyncio.Queue[Replies]) -> None:
        """Coordination replies, in order, apart from the ingest loop: it takes the next messages
        instead of waiting for these PUBACKs. The state they announce is already committed; a
        reply lost with the connection is asked for again (devices re-send open requests)."""
        while True:
            replies = await outgoing.get()
            try:
                for note in replies.notes:
                    log.info("%s", note)
                if replies.messages:
                    await asyncio.gather(*(session.publish(down_topic(d, COORD), pack_coord(m), qos=1)
                                           for d, m in replies.messages))
            finally:
                outgoing.task_done()

    async def _ingest(self, session: MqttSession, outgoing: asyncio.Queue[Replies], acks: AckSender,
                      clears: RetainedSweeper) -> None:
        while True:
            messages = [await session.next_message(), *session.drain(INGEST_MAX_MESSAGES - 1)]
            with self.watchdog.busy("ingest"):  # waiting for messages is not watched; a cycle is
                result, replies = await self._process(messages)
                for message in messages:
                    session.ack(message)  # PUBACK only now that the database has it
                outgoing.put_nowait(replies)
                acks.put(result.acks, result.instance_acks, result.renumber)
                clears.put(result.clear)


class AckSender:
    """The devices' end-to-end acks, published apart from the ingest loop.

    The ingest must not wait for their PUBACKs: when more messages wait than the session reads
    ahead (it stops reading the socket, edgefleet.mqtt.session.READ_HIGH_WATER), those PUBACKs cannot
    arrive until the ingest takes more messages, and the hub stalled until the broker dropped it
    for keepalive (seen at 2,000 devices sending every second). Pending acks are kept one per
    device, the highest watermark: a slow broker makes them fewer, never a growing queue. An ack
    lost with the connection costs nothing: the device resends, and the duplicate is acked again.
    """

    def __init__(self) -> None:
        self._due: dict[tuple[str, int], int] = {}  # (device, outbox instance; 0 for an agent without) -> through
        self._renumber: dict[tuple[str, int], Renumber] = {}  # refused batches: hub/db/identities.py
        self._news = asyncio.Event()

    def put(self, acks: dict[str, int], instances: dict[tuple[str, int], int] | None = None,
            renumber: dict[tuple[str, int], Renumber] | None = None) -> None:
        due = self._due
        for key, through in [*(((d, 0), w) for d, w in acks.items()), *(instances or {}).items()]:
            if through > due.get(key, 0):
                due[key] = through
        self._renumber.update(renumber or {})
        if due or self._renumber:
            self._news.set()

    async def serve(self, session: MqttSession) -> None:
        while True:
            await self._news.wait()
            self._news.clear()
            (due, self._due), (renumber, self._renumber) = (self._due, {}), (self._renumber, {})
            acks = {key: Ack(through=w, instance=key[1]) for key, w in due.items()}
            acks |= {key: Ack(through=due.get(key, 0), instance=key[1], renumber=r) for key, r in renumber.items()}
            await asyncio.gather(*(session.publish(down_topic(d, ACK), pack(ack), qos=1)
                                   for (d, _), ack in acks.items()))


async def _metrics(paths: HubPaths, config: HubConfig) -> None:
    """The metrics endpoint; if its port cannot be had, the hub goes on without it and says so."""
    try:
        await serve_metrics(paths.db, config.metrics.listen, config.metrics.port, config.region,
                            drift_grace_s=config.rollout.drift_grace_s, database=config.database.url)
    except MetricsError as exc:
        log.error("no metrics endpoint: %s", exc)
        await asyncio.Event().wait()  # the hub's other work goes on


async def _enrollment(paths: HubPaths, config: HubConfig, store: HubState) -> None:
    """The HTTPS enrollment endpoint (hub/pki/enroll_server.py); without its port the hub goes on and says so."""
    from hub.pki.enroll_server import EnrollmentServer

    try:
        async with EnrollmentServer.serving(paths, config, store):
            await asyncio.Event().wait()
    except OSError as exc:
        log.error("no enrollment endpoint: cannot listen on port %d (%s)", config.enroll.port, exc.strerror or exc)
        await asyncio.Event().wait()  # the hub's other work goes on


async def _after_broker(supervisor: BrokerSupervisor | None, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` once the managed broker runs: a connection made sooner may reach whatever else
    holds the port, and report its TLS error instead of the real cause."""
    if supervisor is not None:
        await supervisor.started.wait()
    await work()


async def _announce_ready(supervisor: BrokerSupervisor | None) -> None:
    """READY=1 once devices can connect: the managed broker is running (an external one is not ours)."""
    if supervisor is not None:
        await supervisor.started.wait()
    notify(READY)
    await asyncio.Event().wait()  # stays, like every task here, until run_hub cancels it


async def run_hub(paths: HubPaths, config: HubConfig, replica: str | None = None) -> None:
    """Run until SIGTERM or SIGINT; stop in reverse order of start.

    A replica (`replica` names one of hub.toml's [hub] replicas) shares the primary's broker
    and database: it runs no broker and no metrics endpoint of its own.
    """
    replica = replica or config.hub.replica or None  # a folder of `edge-hub replica create` runs its replica
    if replica is not None:
        await prepare_replica(paths, config, replica)  # fail in words before anything starts
    lock = hold_run_lock(paths, replica)  # before anything of the hub's is touched
    try:
        store = await open_store(config.database.url, paths.db)
    except BaseException:
        lock.release()
        raise
    # Quiet: the first of them to end stops the hub, and what it raised is raised here (not logged twice).
    tasks = TaskSet("hub", log, close_timeout=TASK_STOP_TIMEOUT)
    supervisor = None
    try:
        # Inside the try: a service that cannot be built (an unreadable policy key) must close the
        # store, whose thread would otherwise keep the process alive after the error is printed.
        service = HubService(paths, config, store, Watchdog.from_environment(), replica)
        tasks.spawn(service.watchdog.run(), name="watchdog", quiet=True)
        tasks.spawn(service.leadership.run(), name="leadership", quiet=True)
        if config.broker.mode == "managed" and replica is None:
            write_broker_files(paths, config)  # fail in words before anything starts
            broker_executable(config.broker.executable)
            watch = SubscriptionWatch(store, config)
            tasks.spawn(watch.serve(), name="subscriptions", quiet=True)
            supervisor = BrokerSupervisor(paths, config, watch.line)
            tasks.spawn(supervisor.run(), name="broker", quiet=True)
        if paths.ca_key.exists():  # the CA's upkeep runs where the CA key is (a replica's own folder has none)
            ca_leadership = Leadership(store, service.identity, role=CA_ROLE)
            tasks.spawn(ca_leadership.run(), name="ca-leadership", quiet=True)
            tasks.spawn(ca_leadership.while_leading(lambda: keep_pki_fresh(paths, config, store)),
                        name="pki", quiet=True)
        if config.retention != RetentionConf():  # old readings and events go, in the leader only
            tasks.spawn(service.leadership.while_leading(lambda: keep_pruning(
                store, config.retention.telemetry_s, config.retention.events_s)), name="retention", quiet=True)
        if config.metrics.port and replica is None:  # (serve_metrics returns at once for port 0)
            tasks.spawn(_metrics(paths, config), name="metrics", quiet=True)
        if config.enroll.port and replica is None:
            tasks.spawn(_enrollment(paths, config, store), name="enrollment", quiet=True)
        tasks.spawn(_after_broker(supervisor, service.run), name="hub-service", quiet=True)
        tasks.spawn(_announce_ready(supervisor), name="ready", quiet=True)
        await run_until_signal(_until_one_ends(tasks))
        log.info("stopping")
    finally:
        await tasks.close()  # in reverse order of start
        await store.close()
        lock.release()


async def _until_one_ends(tasks: TaskSet) -> None:
    """Return when one of the hub's tasks ends; raise what it raised."""
    ended = await tasks.first_to_end()
    if ended is not None and not ended.cancelled() and (exc := ended.exception()) is not None:
        raise exc


def hold_run_lock(paths: HubPaths, replica: str | None) -> RunLock:
    """One process per (hub directory, replica): a second one would take the first one's broker for
    a leftover and stop it, and fight it for the hub's session. Raises HubAlreadyRunning."""
    paths.run.mkdir(mode=0o711, exist_ok=True)
    name, what = ("hub", "edge-hub run") if replica is None else (f"hub.{replica}", f"edge-hub run --replica {replica}")
    try:
        return RunLock.acquire(paths.run / f"{name}.lock", what, paths.root)
    except AlreadyRunning as exc:
        raise HubAlreadyRunning(str(exc)) from exc
