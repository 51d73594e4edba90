"""Modbus TCP and RTU field sensors (pymodbus' asyncio clients) and the writes of the modbus actuator.

Sensors on one TCP endpoint or one serial line share one connection (`ModbusLine`): one request
at a time, in the order asked (asyncio.Lock is fair), with the line's pause between requests.
Each sensor (one unit id) polls on its own schedule in its own task, on a grid of its interval
from the line's first poll, so the polls of a line bunch together and leave it idle in between.

A slave that does not answer gives up the rest of its poll and asks again after a backoff; while
it has not answered, it asks only when the line is idle for longer than its timeout before any
answering slave's next poll (or after MAX_CAREFUL_WAIT_S without such a gap, so that it is still
found again on a line that is never idle). So a dead slave does not delay the live ones while the
line has idle time. A connection that fails is opened again with capped, jittered backoff, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edge_agent.sense.field.base import FieldContext, FieldSensor, SensorHealth, check_cancelled, field_backoff
from edge_agent.sense.field.modbus_codec import BadValue, Block, decode_block, encode_words, plan
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.policy.field import (
    BIT_TABLES,
    WRITABLE_TABLES,
    ModbusEndpoint,
    ModbusPoint,
    ModbusSensorSpec,
    SerialEndpoint,
    TcpEndpoint,
    metric_name,
)

log = logging.getLogger("edge_agent.field.modbus")

# Opening a TCP connection or a serial port: a device that takes longer is as good as down.
CONNECT_TIMEOUT_S: Final = 5.0
# pymodbus closes a connection after a few unanswered requests in a row; on a gateway with a dead
# slave that would cut every live slave off. We close it ourselves when the whole line is silent.
PYMODBUS_NEVER_CLOSE: Final = 1 << 30
# A TCP connection on which nothing at all has answered for this long (and at least
# SILENT_TIMEOUTS requests in a row) is half-open or hung: it is closed and opened again.
LINE_SILENCE_S: Final = 10.0
SILENT_TIMEOUTS: Final = 3
# A slave that stopped answering waits at most this long for an idle gap on a busy line; then it
# asks anyway, delaying the others once by up to its timeout.
MAX_CAREFUL_WAIT_S: Final = 30.0
# Spare time a careful request leaves before the next answering slave's poll is due.
CAREFUL_MARGIN_S: Final = 0.05
# pymodbus logs each timeout at ERROR; we log state changes ourselves (base.SensorHealth).
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
EXCEPTION_NAMES: Final = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
    5: "acknowledge", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class LineDown(SensorError):
    """The connection (TCP or serial) is not open; the message says why and when it is tried again."""


class NoAnswer(SensorError):
    """The slave did not answer within the line's timeout."""


class SlaveException(SensorError):
    """The slave answered with a Modbus exception."""


Request = Callable[[Any], Awaitable[Any]]


class ModbusLine:
    """One TCP endpoint or serial line: one connection, one request at a time, `pause_s` between."""

    def __init__(self, endpoint: ModbusEndpoint, timeout_s: float, pause_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        # retries=0 and no reconnect_delay: retries and reconnects are ours (backoff, per slave).
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if isinstance(endpoint, SerialEndpoint):
            self._client = AsyncModbusSerialClient(
                endpoint.device, framer=FramerType.RTU, baudrate=endpoint.baudrate, bytesize=endpoint.bytesize,
                parity=endpoint.parity, stopbits=endpoint.stopbits, timeout=timeout_s, retries=0,
                reconnect_delay=0)
        else:
            self._client = AsyncModbusTcpClient(endpoint.host, port=endpoint.port, timeout=timeout_s, retries=0,
                                                reconnect_delay=0)
        self._client.ctx.max_until_disconnect = self._client.ctx.count_until_disconnect = PYMODBUS_NEVER_CLOSE
        self._lock = asyncio.Lock()
        self._backoff = field_backoff()
        self._last_answer = 0.0
        self._silent = 0  # requests unanswered in a row, whatever their slave
        self._epoch: float | None = None  # the line's first poll: every schedule counts from it
        self._expected: dict[str, float] = {}  # answering sensors: when each polls next (loop time)
        self._moved = asyncio.Event()  # a request ended or a schedule changed
        self._retry_at = 0.0
        self._down_reason = ""
        self._last_end = 0.0

    def widen(self, timeout_s: float, pause_s: float) -> None:
        """Another sensor joins the line: the line keeps the longest timeout and pause asked for."""
        self.timeout_s = max(self.timeout_s, timeout_s)
        self.pause_s = max(self.pause_s, pause_s)
        self._client.comm_params.timeout_connect = self.timeout_s

    def slot(self, after: float, interval: float, *, first: bool = False) -> float:
        """The first time after `after` on the grid of `interval` from the line's first poll
        (`first`: the last one at or before it, so that a sensor starts at once, on the grid)."""
        if self._epoch is None:
            self._epoch = after
        steps = math.floor((after - self._epoch) / interval)
        return self._epoch + (steps if first else steps + 1) * interval

    def expect(self, sensor: str, due: float | None) -> None:
        """`sensor` answers and polls next at `due` (loop time); None: it does not answer now."""
        if due is None:
            self._expected.pop(sensor, None)
        else:
            self._expected[sensor] = due
        self._moved.set()

    async def _idle_gap(self) -> None:
        """Wait until the line is free for a whole timeout before any answering sensor's next poll."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + MAX_CAREFUL_WAIT_S
        while (now := loop.time()) < give_up:
            check_cancelled()
            quiet = min(self._expected.values(), default=math.inf) - now
            if not self._lock.locked() and quiet >= self.timeout_s + self.pause_s + CAREFUL_MARGIN_S:
                return
            self._moved.clear()
            # Woken when a request ends or a schedule moves; at the latest when the next poll is due.
            # asyncio.timeout, not wait_for, which can swallow a cancellation (check_cancelled).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(min(quiet, give_up - now), CAREFUL_MARGIN_S)):
                    await self._moved.wait()

    async def call(self, request: Request, unit: int, *, careful: bool = False) -> Any:
        """Run one request on the line; raise LineDown, NoAnswer or SensorError. `careful`: the
        slave has not been answering, so ask only in an idle gap of the line (see the module)."""
        loop = asyncio.get_running_loop()
        if careful:
            await self._idle_gap()
        async with self._lock:
            await self._connect(loop.time())
            wait = self._last_end + self.pause_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                response = await request(self._client)
            except ConnectionException as exc:
                self._client.close()
                raise LineDown(f"lost the connection to {self.endpoint}: {exc}") from None
            except ModbusIOException:
                self._unanswered(loop.time())
                raise NoAnswer(f"unit {unit} did not answer within {self.timeout_s:g} s on {self.endpoint}") from None
            except ModbusException as exc:
                raise SensorError(f"unit {unit} on {self.endpoint}: {exc}") from None
            finally:
                self._last_end = loop.time()
                self._moved.set()
            self._last_answer, self._silent = loop.time(), 0
            return response

    def _unanswered(self, now: float) -> None:
        self._silent += 1
        if (isinstance(self.endpoint, TcpEndpoint) and self._silent >= SILENT_TIMEOUTS
                and now - self._last_answer >= LINE_SILENCE_S):
            log.debug("nothing answered on %s for %.0f s: opening the connection again", self.endpoint,
                      now - self._last_answer)
            self._client.close()

    async def _connect(self, now: float) -> None:
        if self._client.connected:
            return
        if now < self._retry_at:
            raise LineDown(f"{self.endpoint} is not connected ({self._down_reason}); "
                           f"next attempt in {self._retry_at - now:.1f} s")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                opened = await self._client.connect()
            reason = "" if opened else "the connection was refused or the port could not be opened"
        except (TimeoutError, OSError, ModbusException) as exc:
            opened, reason = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        loop = asyncio.get_running_loop()
        if not opened:
            self._client.close()
            self._down_reason = reason
            self._retry_at = loop.time() + self._backoff.lost(loop.time())
            raise LineDown(f"cannot connect to {self.endpoint}: {reason}")
        self._backoff.connected(loop.time())
        self._last_answer, self._silent = loop.time(), 0
        self._client.ctx.count_until_disconnect = PYMODBUS_NEVER_CLOSE
        log.info("connected to %s", self.endpoint)

    def close(self) -> None:
        self._client.close()


def _exception_text(response: Any) -> str:
    code = int(getattr(response, "exception_code", 0))
    return f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"


def _reader(block: Block, unit: int) -> Request:
    async def read(client: Any) -> Any:
        if block.table == "coil":
            return await client.read_coils(block.address, count=block.count, device_id=unit)
        if block.table == "discrete":
            return await client.read_discrete_inputs(block.address, count=block.count, device_id=unit)
        if block.table == "input":
            return await client.read_input_registers(block.address, count=block.count, device_id=unit)
        return await client.read_holding_registers(block.address, count=block.count, device_id=unit)
    return read


class ModbusSensor:
    """One slave (unit id): its points read in as few requests as the protocol allows."""

    kind = "modbus"

    def __init__(self, spec: ModbusSensorSpec, line: ModbusLine, clock: Callable[[], float]) -> None:
        self.name = spec.name
        self.spec = spec
        self.line = line
        self._blocks = plan(spec.registers)
        self._points = {p.name: p for p in spec.registers}
        self._rank = {metric_name(spec.name, p.name): i for i, p in enumerate(spec.registers)}
        self._clock = clock

    async def poll(self, *, careful: bool = False) -> tuple[list[Reading], list[str]]:
        """One read of every point: the readings and the reasons values were skipped. Raises
        SensorError when the slave does not answer (the rest of the poll would only wait too)."""
        readings: list[Reading] = []
        skipped: list[str] = []
        unit = self.spec.unit
        for index, block in enumerate(self._blocks):
            response = await self.line.call(_reader(block, unit), unit, careful=careful and index == 0)
            ts = self._clock()  # when the answer came: the sample's time, whatever the line's queue
            where = f"{block.table} {block.address}+{block.count}"
            if response.isError():
                if getattr(response, "exception_code", 0) == 11:  # the gateway's slave is dead: same as no answer
                    raise NoAnswer(f"unit {unit}: {where}: {_exception_text(response)}")
                skipped.append(f"unit {unit} answered {where} with {_exception_text(response)}")
                continue
            values = response.bits if block.table in BIT_TABLES else response.registers
            good, bad = decode_block(block, values)
            readings += [Reading(metric_name(self.name, point), ts, value) for point, value in good]
            skipped += bad
        readings.sort(key=lambda r: self._rank[r.metric])  # as declared, whatever the requests' order
        return readings, skipped

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        loop = asyncio.get_running_loop()
        backoff = field_backoff()
        interval = self.spec.interval_s
        line = self.line
        due = line.slot(loop.time(), interval, first=True)
        careful = False  # the slave stopped answering: ask only in the line's idle gaps
        try:
            while True:
                check_cancelled()
                line.expect(self.name, None if careful else due)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    readings, skipped = await self.poll(careful=careful)
                except SensorError as exc:
                    health.failed(str(exc))
                    careful = isinstance(exc, NoAnswer)
                    now = loop.time()
                    due = line.slot(now + max(backoff.lost(now), interval) - interval, interval)
                    continue
                careful = False
                for reason in skipped:
                    health.reject(reason)
                if readings:
                    emit(readings)
                    health.ok()
                    backoff.connected(loop.time())
                else:
                    health.failed(f"no usable value: {skipped[0]}" if skipped else "no value read")
                # The next point of the grid: the cadence is kept, and polls missed in a stall are skipped.
                due = line.slot(loop.time(), interval)
        finally:
            line.expect(self.name, None)

    async def probe(self) -> list[Reading]:
        readings, skipped = await self.poll()
        if not readings:
            raise SensorError(f"no usable value from unit {self.spec.unit} on {self.line.endpoint}: "
                              f"{'; '.join(skipped) or 'nothing read'}")
        return readings

    def writable(self, point: str) -> ModbusPoint:
        found = self._points.get(point)
        if found is None or found.table not in WRITABLE_TABLES:
            raise SensorError(f"{self.name}.{point} is not a coil or holding register of this sensor")
        return found

    async def write(self, point_name: str, value: float) -> str:
        """Write one coil or holding register point; return one sentence. Raises SensorError or BadValue."""
        point = self.writable(point_name)
        unit = self.spec.unit
        if point.table == "coil":
            if value not in (0, 1):
                raise BadValue(f"{self.name}.{point_name} is a coil: write 0 or 1, not {value:g}")

            async def request(client: Any) -> Any:
                return await client.write_coil(point.address, bool(value), device_id=unit)
        else:
            words = encode_words(point, value)

            async def request(client: Any) -> Any:
                if len(words) == 1:
                    return await client.write_register(point.address, words[0], device_id=unit)
                return await client.write_registers(point.address, words, device_id=unit)
        response = await self.line.call(request, unit)
        if response.isError():
            raise SlaveException(f"unit {unit} refused the write to {point.table} {point.address}: "
                                 f"{_exception_text(response)}")
        return f"wrote {value:g} to {self.name}.{point_name} ({point.table} {point.address} of unit {unit})"


def build(specs: Sequence[ModbusSensorSpec], context: FieldContext) -> list[FieldSensor]:
    """One sensor per spec; one line per endpoint, shared by the specs that name it."""
    sensors: list[FieldSensor] = []
    for spec in specs:
        key = ("modbus", spec.endpoint)
        line = context.shared.get(key)
        if line is None:
            line = context.shared[key] = ModbusLine(spec.endpoint, spec.timeout_s, spec.pause_s)
        else:
            line.widen(spec.timeout_s, spec.pause_s)
        sensors.append(ModbusSensor(spec, line, context.clock))
    return sensors
