"""Allowlisted actuators: what a rule may do on the device, and nothing its profile does not allow.

`Actuators.run` checks the action against the profile's `ActuatorSpec` first; a refused
action never starts. Commands run from an argv list (never a shell), in their own process
group, with a timeout that kills the whole group, and with bounded output capture.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, runtime_checkable

from edge_agent.errors import AgentError
from edge_agent.sense.sensors import SensorError
from edgefleet.errors import ConfigError
from edgefleet.policy.allowlist import BadArgs as _BadArgs
from edgefleet.policy.allowlist import Refused as _Refused
from edgefleet.policy.allowlist import allowlisted as _allowlisted
from edgefleet.policy.allowlist import number_arg as _number
from edgefleet.policy.allowlist import only_args as _only
from edgefleet.policy.allowlist import text_arg as _text
from edgefleet.policy.profiles import ActuatorSpec
from edgefleet.runtime.processes import KILL_GRACE_S as KILL_GRACE_S  # re-exported: tests bound waits by it
from edgefleet.runtime.processes import signal_group as _signal_group
from edgefleet.runtime.processes import stop_group as _stop_group

if TYPE_CHECKING:
    from edge_agent.sense.field.entrypoints import PluginActuator
    from edge_agent.sense.field.gpio import GpioOutputs

log = logging.getLogger("edge_agent.actuators")

# Output travels in audit events to the hub; a few KiB explain a failure, more is noise.
OUTPUT_LIMIT_BYTES: Final = 8 * 1024
# Read size while draining a command's output; the excess is discarded, never buffered.
READ_CHUNK_BYTES: Final = 64 * 1024
# The sim profile's recorder keeps this many invocations; older ones drop (bounded memory).
RECORD_LIMIT: Final = 10_000
DEFAULT_SEVERITY: Final = "warning"
SEVERITIES: Final = ("info", "warning", "critical")
# The hub has no terminal to ask on; polkit must fail rather than prompt.
SYSTEMCTL_ARGS: Final = ("--no-ask-password", "restart")


AlertSink = Callable[[str, str], Awaitable[None]]
# Writes a field point (`<sensor>.<point>`, value) and says what it did; raises SensorError or ValueError.
FieldWrite = Callable[[str, float], Awaitable[str]]
RateSetter = Callable[[str, float], None]
# Called with (kind, args) after every check passed, right before the action starts. It may
# be async (an audit write). If it raises, the action does not run and the error propagates.
StartHook = Callable[[str, Mapping[str, object]], Awaitable[None] | None]


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    kind: str
    detail: str  # one plain sentence for the audit trail and the operator
    duration_s: float  # from the action's start (after the checks) to its end; 0 if it never started
    exit_code: int | None = None  # for command and systemd_restart, when the process ended
    output: str = ""  # stdout and stderr, interleaved, cut at OUTPUT_LIMIT_BYTES with a marker
    refused: bool = False  # refused by the profile's allowlist; the action never started
    timed_out: bool = False


class Recorder:
    """The sim profile's test actuator: remembers each `record` invocation as (ts, args)."""

    def __init__(self, limit: int = RECORD_LIMIT, clock: Callable[[], float] = time.time) -> None:
        self._calls: deque[tuple[float, dict[str, object]]] = deque(maxlen=limit)
        self._clock = clock
        self.dropped = 0  # invocations pushed out by the limit

    @property
    def calls(self) -> list[tuple[float, dict[str, object]]]:
        return list(self._calls)

    def append(self, args: Mapping[str, object]) -> None:
        if len(self._calls) == self._calls.maxlen:
            self.dropped += 1
        self._calls.append((self._clock(), dict(args)))


class _Outcome(NamedTuple):
    ok: bool
    detail: str
    exit_code: int | None = None
    output: str = ""
    timed_out: bool = False


Runner = Callable[[float], Awaitable[_Outcome]]


class Actuators:
    """The actuators one profile allows, with the callbacks they drive."""

    def __init__(
        self,
        spec: ActuatorSpec,
        *,
        set_rate: RateSetter | None = None,
        alert: AlertSink | None = None,
        recorder: Recorder | None = None,
        started: StartHook | None = None,
        field_write: FieldWrite | None = None,
        mqtt: Mapping[str, MqttPublisher] | None = None,  # local MQTT sensors by name, for mqtt_publish
        gpio_opener: object = None,  # opens a GPIO chip; None: libgpiod (tests pass a fake chip)
    ) -> None:
        if "set_rate" in spec.allowed and set_rate is None:
            raise ConfigError("the profile allows set_rate but no sampler was given to change rates")
        if "alert" in spec.allowed and alert is None:
            raise ConfigError("the profile allows alert but no way to reach the hub was given")
        if "modbus_write" in spec.allowed and field_write is None:
            raise ConfigError("the profile allows modbus_write but no field sensors were given to write through")
        self._spec = spec
        self._field_write = field_write
        self._set_rate = set_rate
        self._alert = alert
        self.recorder = recorder if recorder is not None else Recorder()
        self.started = started
        self.field = FieldWrites(spec, mqtt or {}, gpio_opener)

    def close(self) -> None:
        """Field outputs back to their idle level and released (the agent is stopping)."""
        self.field.close()

    async def run(
        self,
        kind: str,
        args: Mapping[str, object],
        *,
        # The action's own limit, not the caller's: it starts after the checks and the hook, and
        # an overrun must SIGTERM the process group with a grace and say timed_out, not just cancel.
        timeout: float,  # noqa: ASYNC109
        started: StartHook | None = None,
        env: Mapping[str, str] | None = None,  # extra environment for a command (the lease's fencing token)
    ) -> ActionResult:
        """Run one action; ordinary failures come back as ok=False, never as exceptions.

        `started` (or the hook given at construction) fires once, after the checks, just
        before the action starts; never for a refused or malformed action.
        """
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout}")
        try:
            runner = self._plan(kind, args, env)
        except _Refused as refusal:
            log.warning("refused %s: %s", kind, refusal)
            return ActionResult(False, kind, str(refusal), 0.0, refused=True)
        except _BadArgs as bad:
            log.warning("bad arguments for %s: %s", kind, bad)
            return ActionResult(False, kind, str(bad), 0.0)
        hook = started if started is not None else self.started
        if hook is not None:
            pending = hook(kind, args)
            if pending is not None:
                await pending
        begin = time.perf_counter()
        outcome = await runner(timeout)
        duration = time.perf_counter() - begin
        log.debug("%s finished in %.3f s: %s", kind, duration, outcome.detail)
        return ActionResult(
            outcome.ok, kind, outcome.detail, duration, outcome.exit_code, outcome.output,
            timed_out=outcome.timed_out,
        )

    def check(self, kind: str, args: Mapping[str, object]) -> str | None:
        """Why this action could not run here (the allowlist, its arguments), or None if it could."""
        try:
            self._plan(kind, args)
        except (_Refused, _BadArgs) as exc:
            return str(exc)
        return None

    def _plan(self, kind: str, args: Mapping[str, object], env: Mapping[str, str] | None = None) -> Runner:
        """Check the action against the allowlist and its arguments; return what will run it."""
        allowed = _allowlisted(self._spec, kind, args)
        if kind == "command":
            return partial(_run_process, allowed, env=env)
        if kind == "systemd_restart":
            return partial(_restart_unit, allowed[0])
        if kind == "modbus_write":
            value = args["value"]
            assert isinstance(value, int | float)  # checked by the allowlist
            return partial(self._write_field, allowed[0], float(value))
        if kind == "set_rate":
            _only(args, kind, {"sensor", "interval_s"})
            sensor = _text(args, "sensor")
            interval = _number(args, "interval_s")
            return partial(self._change_rate, sensor, interval)
        if kind == "alert":
            _only(args, kind, {"message", "severity"})
            severity = _text(args, "severity") if "severity" in args else DEFAULT_SEVERITY
            if severity not in SEVERITIES:
                raise _BadArgs(f"alert severity {severity!r} is not one of {', '.join(SEVERITIES)}.")
            return partial(self._raise_alert, _text(args, "message"), severity)
        if kind == "record":
            fail = args.get("fail", False)
            if not isinstance(fail, bool):
                raise _BadArgs("record argument 'fail' must be true or false.")
            sleep_s = _number(args, "sleep_s") if "sleep_s" in args else 0.0
            return partial(self._record, args, sleep_s, fail)
        if kind in FIELD_WRITES:
            return self.field.plan(kind, args)
        raise AssertionError(f"profile allows an actuator kind this module does not know: {kind!r}")

    async def _change_rate(self, sensor: str, interval: float, within_s: float) -> _Outcome:
        assert self._set_rate is not None  # checked in __init__ when set_rate is allowed
        try:
            self._set_rate(sensor, interval)
        except SensorError as exc:
            return _Outcome(False, f"could not change the rate: {exc}")
        return _Outcome(True, f"sensor {sensor!r} now reads every {interval:g} s.")

    async def _write_field(self, point: str, value: float, within_s: float) -> _Outcome:
        assert self._field_write is not None  # checked in __init__ when modbus_write is allowed
        try:
            async with asyncio.timeout(within_s):
                detail = await self._field_write(point, value)
        except TimeoutError:
            return _Outcome(False, f"the write of {value:g} to {point} did not finish within {within_s:g} s.",
                            timed_out=True)
        except (AgentError, ValueError) as exc:
            return _Outcome(False, f"could not write {value:g} to {point}: {exc}.")
        return _Outcome(True, f"{detail}.")

    async def _raise_alert(self, message: str, severity: str, within_s: float) -> _Outcome:
        assert self._alert is not None  # checked in __init__ when alert is allowed
        try:
            async with asyncio.timeout(within_s):
                await self._alert(message, severity)
        except TimeoutError:
            return _Outcome(False, f"the alert was not delivered within {within_s:g} s.", timed_out=True)
        except (AgentError, OSError) as exc:
            return _Outcome(False, f"the alert could not be raised: {exc}")
        return _Outcome(True, f"raised a {severity} alert.")

    async def _record(self, args: Mapping[str, object], sleep_s: float, fail: bool, within_s: float) -> _Outcome:
        """Test actuator: records, then optionally sleeps (bounded by within_s) and fails."""
        self.recorder.append(args)
        if sleep_s > within_s:
            await asyncio.sleep(within_s)
            return _Outcome(False, f"the recording did not finish within {within_s:g} s.", timed_out=True)
        if sleep_s > 0:
            await asyncio.sleep(sleep_s)
        if fail:
            return _Outcome(False, "the recording failed because its arguments asked it to.")
        return _Outcome(True, "recorded.")


# --- field writes: local MQTT publish, GPIO set and pulse ------------------------------------

FIELD_WRITES: Final = frozenset({"mqtt_publish", "gpio_set", "gpio_pulse", "plugin"})


@runtime_checkable
class MqttPublisher(Protocol):
    """A local MQTT sensor's connection (edge_agent.sense.field.mqtt_local.LocalMqtt)."""

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None: ...


class FieldWrites:
    """Writes to field devices: a topic on a local broker, a GPIO line; only what the allowlist lists
    (checked by the caller, `Actuators._plan`). GPIO lines are requested at the first write and put
    back to idle when the agent stops."""

    def __init__(self, spec: ActuatorSpec, mqtt: Mapping[str, MqttPublisher], gpio_opener: object = None) -> None:
        self._mqtt = dict(mqtt)
        self._plugin_specs = {p.name: p for p in spec.plugins}
        self._plugins: dict[str, PluginActuator] = {}  # built at their first use
        self._gpio: dict[str, GpioOutputs] = {}  # output name -> its chip's outputs
        if spec.gpio_outputs:
            from edge_agent.sense.field.gpio import GpioOutputs, OutputLine  # only a device that drives GPIO

            by_chip: dict[str, list[OutputLine]] = {}
            for out in spec.gpio_outputs:
                by_chip.setdefault(out.chip.removeprefix("/dev/"), []).append(
                    OutputLine(out.name, out.line, out.idle, out.active_low))
            for chip, lines in by_chip.items():
                outputs = GpioOutputs(chip, lines) if gpio_opener is None else GpioOutputs(
                    chip, lines, opener=gpio_opener)  # type: ignore[arg-type]  # a test's fake chip
                self._gpio.update(dict.fromkeys(outputs.points, outputs))

    def plan(self, kind: str, args: Mapping[str, object]) -> Runner:
        if kind == "plugin":
            name = _text(args, "actuator")
            values = args.get("values", {})
            if not isinstance(values, Mapping):
                raise _BadArgs(f"plugin: argument 'values' must be a table, not {values!r}.")
            return partial(self._plugin, name, dict(values))
        if kind == "mqtt_publish":
            _only(args, kind, {"sensor", "topic", "payload", "retain", "qos"})
            sensor, topic = _text(args, "sensor"), _text(args, "topic")
            payload = args.get("payload")
            if not isinstance(payload, str):
                raise _BadArgs(f"argument 'payload' must be a string, not {payload!r}.")
            retain, qos = args.get("retain", False), args.get("qos", 1)
            if not isinstance(retain, bool) or qos not in (0, 1) or isinstance(qos, bool):
                raise _BadArgs("mqtt_publish: retain is true or false, qos is 0 or 1.")
            publisher = self._mqtt.get(sensor)
            if publisher is None:
                raise _BadArgs(f"mqtt_publish: no local MQTT sensor named {sensor!r} on this device; "
                               f"there are: {', '.join(self._mqtt) or 'none'}.")
            return partial(self._publish, publisher, sensor, topic, payload.encode(), 1 if qos == 1 else 0, retain)
        output = _text(args, "output")
        outputs = self._gpio[output]  # the allowlist named it, so it is here
        if kind == "gpio_set":
            _only(args, kind, {"output", "value"})
            value = args.get("value")
            if not isinstance(value, bool):
                raise _BadArgs(f"gpio_set: argument 'value' must be true or false, not {value!r}.")
            return partial(self._set, outputs, output, value)
        _only(args, kind, {"output", "seconds"})
        return partial(self._pulse, outputs, output, _number(args, "seconds"))

    @staticmethod
    async def _publish(publisher: MqttPublisher, sensor: str, topic: str, payload: bytes, qos: int, retain: bool,
                       within_s: float) -> _Outcome:
        try:
            async with asyncio.timeout(within_s):
                await publisher.publish(topic, payload, qos=qos, retain=retain)
        except TimeoutError:
            return _Outcome(False, f"the publish to {topic} was not acknowledged within {within_s:g} s.",
                            timed_out=True)
        except AgentError as exc:  # not connected, the broker refused it
            return _Outcome(False, f"could not publish to {topic} on {sensor}'s broker: {exc}")
        return _Outcome(True, f"published {len(payload)} bytes to {topic} on {sensor}'s broker.")

    @staticmethod
    async def _set(outputs: GpioOutputs, output: str, value: bool, within_s: float) -> _Outcome:
        try:
            outputs.set(output, value)
        except AgentError as exc:  # GpioError: no gpiod, a busy line, a chip that went away
            return _Outcome(False, f"could not set {output}: {exc}")
        return _Outcome(True, f"{output} set {'active' if value else 'inactive'}.")

    @staticmethod
    async def _pulse(outputs: GpioOutputs, output: str, seconds: float, within_s: float) -> _Outcome:
        try:
            async with asyncio.timeout(within_s):
                await outputs.pulse(output, seconds)
        except TimeoutError:
            return _Outcome(False, f"{output} was pulsed for {within_s:g} s, not {seconds:g}, and is idle again.",
                            timed_out=True)
        except AgentError as exc:
            return _Outcome(False, f"could not pulse {output}: {exc}")
        return _Outcome(True, f"{output} pulsed for {seconds:g} s and is idle again.")

    async def _plugin(self, name: str, values: dict[str, object], within_s: float) -> _Outcome:
        try:
            actuator = self._plugins.get(name)
            if actuator is None:
                from edge_agent.sense.field.entrypoints import build_actuator  # only a device that uses one

                spec = self._plugin_specs[name]  # the allowlist named it
                actuator = self._plugins[name] = build_actuator(spec.plugin, name, spec.options, "actuators.plugins")
            async with asyncio.timeout(within_s):
                detail = await actuator.write(values)
        except TimeoutError:
            return _Outcome(False, f"{name} did not finish within {within_s:g} s.", timed_out=True)
        except Exception as exc:  # noqa: BLE001  # a plugin may fail in any way: an outcome, never a crash
            return _Outcome(False, f"{name} failed: {type(exc).__name__}: {exc}")
        return _Outcome(True, f"{name}: {detail}")

    def close(self) -> None:
        for outputs in set(self._gpio.values()):
            try:
                outputs.close()
            except AgentError as exc:
                log.warning("could not put GPIO outputs back to idle: %s", exc)


# --- the allowlists ----------------------------------------------------------------------


# --- processes --------------------------------------------------------------------------


class _Capture:
    """Keeps the first OUTPUT_LIMIT_BYTES of a stream and counts the rest."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.cut = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK_BYTES):
            room = max(OUTPUT_LIMIT_BYTES - len(self.kept), 0)
            self.kept += chunk[:room]
            self.cut += max(len(chunk) - room, 0)

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.cut:
            text += f"\n[output truncated: {self.cut} more bytes not kept]"
        return text


async def _restart_unit(unit: str, within_s: float) -> _Outcome:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return _Outcome(False, f"cannot restart {unit}: systemctl is not installed on this host.")
    return await _run_process([systemctl, *SYSTEMCTL_ARGS, unit], within_s)


async def _run_process(argv: Sequence[str], within_s: float, env: Mapping[str, str] | None = None) -> _Outcome:
    """Run argv in its own session; on an overrun or cancellation, kill its whole process group."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    except OSError as exc:  # not found, not executable, out of processes
        return _Outcome(False, f"could not start {argv[0]}: {exc.strerror or exc}.")
    assert process.stdout is not None  # stdout=PIPE
    capture = _Capture()
    try:
        async with asyncio.timeout(within_s):
            # Until EOF: a child that leaves a grandchild holding the pipe has not finished.
            await capture.drain(process.stdout)
            await process.wait()
    except TimeoutError:
        await _stop_group(process)
        return _Outcome(
            False, f"{argv[0]} did not finish within {within_s:g} s and was killed.",
            process.returncode, capture.text(), timed_out=True,
        )
    except asyncio.CancelledError:
        _signal_group(process.pid, signal.SIGKILL)  # no waiting: the caller is going away
        raise
    code = process.returncode
    if code != 0:
        return _Outcome(False, f"{argv[0]} exited with code {code}.", code, capture.text())
    return _Outcome(True, f"{argv[0]} succeeded.", code, capture.text())
