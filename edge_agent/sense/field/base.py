"""The field-sensor runtime: one long-lived task per field sensor, supervised, with a health record.

A connector (Modbus, local MQTT, sysfs, exec...) is a module with a `build(specs, context)`
function that turns every configured spec of its kind into `FieldSensor`s; BUILDERS names that
module, which is imported only when a sensor of its kind is configured (the agent's memory, P3).
A sensor's `run(health, emit)` never returns: it reads or listens, hands readings to `emit`,
and reports each outcome to `health`. If it raises anyway, the supervisor logs it with its
traceback, counts it, and starts it again after a capped, jittered backoff: polling never stops
for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable

import msgspec

from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.mqtt.reconnect import Backoff
from edgefleet.policy.field import FieldSensorSpec
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import FieldHealth

log = logging.getLogger("edge_agent.field")

# kind -> the module whose `build(specs, context) -> list[FieldSensor]` makes that kind's sensors.
BUILDERS: Final[dict[str, str]] = {
    "modbus": "edge_agent.sense.field.modbus",
    "sysfs": "edge_agent.sense.field.sysfs",
    "exec": "edge_agent.sense.field.exec",
    "mqtt": "edge_agent.sense.field.mqtt_local",
    "gpio": "edge_agent.sense.field.gpio",
    "plugin": "edge_agent.sense.field.entrypoints",
}
# First retry of a failed sensor or connection: soon enough for a device that blinked.
BACKOFF_INITIAL_S: Final = 1.0
# Longest wait between retries: a device back from a power cut is read again within this.
BACKOFF_MAX_S: Final = 30.0
# Error text kept per sensor (status, events): one sentence, not a traceback.
ERROR_TEXT_LIMIT: Final = 300
# The agent's field sensor health, for `edge-agent status` (a snapshot, not a record: no fsync).
HEALTH_FILE: Final = "field-health.json"
# The health file is rewritten on every state change, and at most this often for the counters.
HEALTH_WRITE_S: Final = 10.0
# Distinct bad-value reasons logged at WARNING per sensor; the rest (and repeats) go to DEBUG.
REJECT_REASONS_LOGGED: Final = 32

HealthState = Literal["starting", "ok", "failing"]
T = TypeVar("T")
Audit = Callable[[EventKind, dict[str, object]], None]


def check_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop: a library awaiting with Python 3.11's
    asyncio.wait_for (pymodbus does) can swallow a cancellation that arrives as its answer does,
    and a connector's loop must still end. Call it at the top of every loop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def field_backoff() -> Backoff:
    """Capped, jittered, and reset by the first success (stable_after=0): a read is proof enough."""
    return Backoff(initial=BACKOFF_INITIAL_S, maximum=BACKOFF_MAX_S, stable_after=0.0)


class SensorHealth:
    """One field sensor's state; transitions are logged and audited, repeats only counted."""

    def __init__(self, name: str, kind: str, audit: Audit, clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.kind = kind
        self.state: HealthState = "starting"
        self.since = clock()
        self.reads = 0  # successful polls (or messages, for a listening sensor)
        self.errors = 0  # failed polls: no answer, a refused connection, an exception response
        self.rejected = 0  # values skipped because they were bad (NaN, a wrong length, ...)
        self.last_error = ""
        self._audit = audit
        self._clock = clock
        self._on_change = on_change  # every change of state, audited or not (the health file)
        self._reasons: set[str] = set()

    def ok(self) -> None:
        """A poll (or message) that produced what it should."""
        self.reads += 1
        if self.state == "ok":
            return
        was, self.state, self.since = self.state, "ok", self._clock()
        self._on_change()
        if was == "failing":
            log.info("field sensor %s recovered after %d error(s): %s", self.name, self.errors, self.last_error)
            self._audit(EventKind.SENSOR_RECOVERED, {"sensor": self.name, "kind": self.kind,
                                                    "errors": self.errors, "last_error": self.last_error})
        else:
            log.info("field sensor %s is reading", self.name)

    def failed(self, reason: str) -> None:
        """A poll that produced nothing usable; `reason` is one sentence."""
        self.errors += 1
        self.last_error = reason[:ERROR_TEXT_LIMIT]
        if self.state == "failing":
            log.debug("field sensor %s failed again (%d errors): %s", self.name, self.errors, reason)
            return
        self.state, self.since = "failing", self._clock()
        self._on_change()
        log.warning("field sensor %s is failing: %s (retried with backoff; repeats are logged at DEBUG)",
                    self.name, reason)
        self._audit(EventKind.SENSOR_FAILING, {"sensor": self.name, "kind": self.kind, "error": self.last_error})

    def reject(self, reason: str) -> None:
        """One value skipped (the rest of the poll still counts); each reason logged once."""
        self.rejected += 1
        if reason not in self._reasons and len(self._reasons) < REJECT_REASONS_LOGGED:
            self._reasons.add(reason)
            log.warning("field sensor %s: skipped a value: %s (repeats are logged at DEBUG)", self.name, reason)
        else:
            log.debug("field sensor %s: skipped a value (%d so far): %s", self.name, self.rejected, reason)

    def record(self) -> FieldHealth:
        return FieldHealth(state=self.state, since=self.since, reads=self.reads, errors=self.errors,
                           rejected=self.rejected, last_error=self.last_error, kind=self.kind)


class FieldSensor(Protocol):
    name: str
    kind: str

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        """Read (or listen) until cancelled, handing readings to `emit`; never returns."""
        ...

    async def probe(self) -> list[Reading]:
        """One read for `edge-agent check`; raises SensorError with one sentence saying what is wrong."""
        ...


Reject = Callable[[str], None]
PolledRead = Callable[[float, Reject], list[Reading]]


async def run_polled(read: PolledRead, interval: float, health: SensorHealth, emit: Sink,
                     clock: Callable[[], float] = time.time) -> None:
    """Call `read(now, reject)` every `interval` seconds without drift, for sensors whose reads are
    quick and synchronous (sysfs files, GPIO levels). A SensorError is a failed poll, tried again
    after max(interval, a field_backoff() delay); a read that returns nothing is one too."""
    loop = asyncio.get_running_loop()
    backoff = field_backoff()
    due = loop.time()
    while True:
        try:
            readings = read(clock(), health.reject)
        except SensorError as exc:
            health.failed(str(exc))
            due = loop.time() + max(interval, backoff.lost(loop.time()))
        else:
            if readings:
                emit(readings)
                health.ok()
                backoff.connected(loop.time())
            else:
                health.failed("the read gave no value")
            due += interval
            if due < loop.time():  # a stall (or a suspended board): keep the cadence from now on
                due = loop.time() + interval
        await asyncio.sleep(max(due - loop.time(), 0.0))


async def first_batch(start: Callable[[Sink], Awaitable[T]]) -> tuple[list[Reading] | None, T | None]:
    """Run `start(emit)` until its first batch of readings (a probe of a sensor that pushes; the
    caller bounds the wait). Returns (the batch, None), or (None, what `start` returned) if it
    ended first; it is cancelled once the batch is in."""
    first: asyncio.Future[list[Reading]] = asyncio.get_running_loop().create_future()

    def emit(readings: list[Reading]) -> None:
        if not first.done():
            first.set_result(readings)

    task = asyncio.ensure_future(start(emit))
    waiters: list[asyncio.Future[Any]] = [task, first]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        await asyncio.wait([task])
    if first.done():
        return first.result(), None
    return None, task.result()
@runtime_checkable
class FieldWriter(Protocol):
    """A field sensor whose points an actuator may set (Modbus coils and registers, ...)."""

    async def write(self, point: str, value: float) -> str:
        """Set `point` (the part after the sensor's name) and say what was done; raise SensorError
        or ValueError with one sentence when it was not."""
        ...


@dataclass
class FieldContext:
    """What builders get besides their specs."""

    clock: Callable[[], float] = time.time  # timestamps readings (the outbox's corrected clock)
    # Connections shared between sensors of one kind within one agent, keyed by the builder.
    shared: dict[object, Any] = field(default_factory=dict)


Builder = Callable[[Sequence[Any], FieldContext], list[FieldSensor]]


def builder(kind: str) -> Builder:
    """The builder of `kind`, importing its module now (and only now)."""
    module = importlib.import_module(BUILDERS[kind])
    build: Builder = module.build
    return build


def build_field_sensors(specs: Sequence[FieldSensorSpec], context: FieldContext) -> list[FieldSensor]:
    """Every configured field sensor, each kind built by its own builder (all specs of a kind at once,
    so that sensors on one line or endpoint can share its connection)."""
    by_kind: dict[str, list[FieldSensorSpec]] = {}
    for spec in specs:
        by_kind.setdefault(spec.kind, []).append(spec)
    sensors: list[FieldSensor] = []
    for kind, group in by_kind.items():
        sensors += builder(kind)(group, context)
    return sensors


class FieldSensors:
    """The agent's field sensors: `run()` supervises one task per sensor until cancelled."""

    def __init__(self, sensors: Sequence[FieldSensor], emit: Sink, audit: Audit,
                 clock: Callable[[], float] = time.time, health_file: Path | None = None) -> None:
        self.sensors = list(sensors)
        self._changed = asyncio.Event()  # a state changed: the health file is rewritten now
        self.health = {s.name: SensorHealth(s.name, s.kind, audit, clock, self._changed.set) for s in self.sensors}
        self._emit = emit
        self._health_file = health_file

    @classmethod
    def from_specs(cls, specs: Sequence[FieldSensorSpec], emit: Sink, audit: Audit,
                   clock: Callable[[], float] = time.time, health_file: Path | None = None) -> FieldSensors:
        return cls(build_field_sensors(specs, FieldContext(clock=clock)), emit, audit, clock, health_file)

    def records(self) -> dict[str, FieldHealth]:
        return {name: health.record() for name, health in self.health.items()}

    async def write(self, metric: str, value: float) -> str:
        """Write `<sensor>.<point>` through the sensor that reads it (the allowlist was checked before)."""
        name, _, point = metric.partition(".")
        sensor = next((s for s in self.sensors if s.name == name), None)
        if not isinstance(sensor, FieldWriter):
            raise SensorError(f"no field sensor named {name!r} can be written")
        return await sensor.write(point, value)

    def errors(self) -> dict[str, int]:
        """Failed polls per sensor (the status message's sensor_failures, beside the sampler's)."""
        return {name: health.errors for name, health in self.health.items()}

    async def run(self) -> None:
        if not self.sensors:
            if self._health_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._health_file.unlink()  # a file left by a configuration that had some
            return
        async with asyncio.TaskGroup() as tasks:
            for sensor in self.sensors:
                tasks.create_task(self._supervise(sensor), name=f"field:{sensor.name}")
            if self._health_file is not None:
                tasks.create_task(self._keep_health_file(self._health_file), name="field:health")

    async def _keep_health_file(self, path: Path) -> None:
        while True:
            self._changed.clear()
            try:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(msgspec.json.encode({"ts": time.time(), "sensors": self.records()}))
                os.replace(tmp, path)
            except OSError as exc:  # a full disk: status shows an older snapshot, sensing goes on
                log.debug("could not write %s: %s", path, exc)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the wait ends, and the agent's stop would then hang on this task.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_WRITE_S):
                    await self._changed.wait()

    async def _supervise(self, sensor: FieldSensor) -> None:
        health = self.health[sensor.name]
        # A sensor that crashes at once again and again waits longer each time; one that ran a while starts over.
        backoff = Backoff(initial=BACKOFF_INITIAL_S, maximum=BACKOFF_MAX_S, stable_after=BACKOFF_MAX_S)
        loop = asyncio.get_running_loop()
        while True:
            backoff.connected(loop.time())
            try:
                await sensor.run(health, self._emit)
                reason = "its task ended"
            except Exception as exc:  # a connector's bug must not end the others' polling
                log.exception("field sensor %s stopped unexpectedly; restarting it", sensor.name)
                reason = f"{type(exc).__name__}: {exc}"
            health.failed(f"the sensor stopped ({reason}) and is restarted")
            await asyncio.sleep(backoff.lost(loop.time()))
