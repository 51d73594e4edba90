"""The Modbus connector against real pymodbus servers in their own processes (TCP, and RTU over a
socat pseudo-terminal pair): decoding, a dead slave beside a live one, a server that dies and comes
back, exception responses and bad values, and writes read back from the server."""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.decide.actuators import Actuators
from edge_agent.sense.field.base import FieldContext, FieldSensors
from edge_agent.sense.field.modbus import ModbusSensor, build
from edge_agent.sense.sensors import Reading
from edgefleet.policy.field import ModbusSensorSpec, parse_field_sensor
from edgefleet.policy.profiles import ActuatorSpec
from edgefleet.wire.events import EventKind
from tests.support.modbus import ModbusServer, SerialPair, wait_for

SETTLE = 30.0  # a reading, a failure or a recovery; backoff starts at 1 s


def wire(fmt: str, value: float, order: str) -> list[int]:
    """The registers a device sends for `value` in byte order `order` (A = most significant)."""
    big = struct.pack(">" + fmt, value)
    sent = bytes(big[ord(letter) - ord("A")] for letter in order)
    return [int.from_bytes(sent[i:i + 2], "big") for i in range(0, len(sent), 2)]


# (type, struct format, value): every type the contract names, in every byte order it allows.
TYPES: list[tuple[str, str, float]] = [
    ("int16", "h", -12345), ("uint16", "H", 54321), ("int32", "i", -123456789), ("uint32", "I", 3456789012),
    ("int64", "q", -1234567890123456789), ("uint64", "Q", 12345678901234567890),
    ("float32", "f", 123.456), ("float64", "d", -9876.54321),
]
ORDERS = {16: ["AB", "BA"], 32: ["ABCD", "CDAB", "BADC", "DCBA"],
          64: ["ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"]}


def every_type() -> tuple[list[int], list[dict[str, Any]], dict[str, float]]:
    """Holding registers from 0 holding each type in each order; the points; the values expected."""
    words: list[int] = []
    points: list[dict[str, Any]] = []
    expected: dict[str, float] = {}
    for kind, fmt, value in TYPES:
        for order in ORDERS[struct.calcsize(fmt) * 8]:
            name = f"{kind}_{order}"
            points.append({"name": name, "table": "holding", "address": len(words), "type": kind, "order": order})
            words += wire(fmt, value, order)
            expected[name] = struct.unpack(">" + fmt, struct.pack(">" + fmt, value))[0]  # float32 rounds
    return words, points, expected


def test_the_wire_helper_matches_hand_made_vectors() -> None:
    """The test's own encoder against values worked out by hand (0x42F6E979 is 123.456 as a float32)."""
    assert wire("f", 123.456, "ABCD") == [0x42F6, 0xE979]
    assert wire("f", 123.456, "CDAB") == [0xE979, 0x42F6]
    assert wire("f", 123.456, "BADC") == [0xF642, 0x79E9]
    assert wire("f", 123.456, "DCBA") == [0x79E9, 0xF642]
    assert wire("h", -12345, "BA") == [0xC7CF]
    assert wire("q", -1234567890123456789, "GHEFCDAB") == [0x7EEB, 0x8216, 0xEF0B, 0xEEDD]


def sensor_spec(name: str, url: str, registers: list[dict[str, Any]], **extra: Any) -> ModbusSensorSpec:
    spec = parse_field_sensor({"kind": "modbus", "name": name, "url": url, "registers": registers, **extra},
                              "sensors[0]", "test")
    assert isinstance(spec, ModbusSensorSpec)
    return spec


def sensors(*specs: ModbusSensorSpec) -> list[ModbusSensor]:
    built = build(list(specs), FieldContext())
    assert all(isinstance(s, ModbusSensor) for s in built)
    return [s for s in built if isinstance(s, ModbusSensor)]


def close_lines(built: list[ModbusSensor]) -> None:
    for sensor in built:
        sensor.line.close()


def values(readings: list[Reading]) -> dict[str, float]:
    return {r.metric: r.value for r in readings}


async def test_every_type_and_byte_order_decodes_to_the_exact_value_over_tcp(workdir: Path) -> None:
    words, points, expected = every_type()
    bits = {"coil": [True, False, True], "discrete": [False, True]}
    layout = {"units": {"1": {"holding": words, "input": [1234, 0xFFFF], **bits}}}
    points += [{"name": "c0", "table": "coil", "address": 0}, {"name": "c1", "table": "coil", "address": 1},
               {"name": "c2", "table": "coil", "address": 2}, {"name": "d1", "table": "discrete", "address": 1},
               {"name": "scaled", "table": "input", "address": 0, "scale": 0.1, "offset": -5.0},
               {"name": "minus_one", "table": "input", "address": 1, "type": "int16"}]
    async with ModbusServer(workdir, layout) as server:
        (meter,) = sensors(sensor_spec("meter", server.url, points))
        try:
            readings, skipped = await meter.poll()
        finally:
            meter.line.close()
    assert skipped == []
    got = values(readings)
    for name, value in expected.items():
        assert got[f"meter.{name}"] == float(value), name
    assert {k: got[f"meter.{k}"] for k in ("c0", "c1", "c2", "d1")} == {"c0": 1.0, "c1": 0.0, "c2": 1.0, "d1": 1.0}
    assert got["meter.scaled"] == 1234 * 0.1 - 5.0
    assert got["meter.minus_one"] == -1.0
    # 52 holding registers of contiguous points, 3 coils, 1 discrete, 2 inputs: four requests in all.
    assert len(meter._blocks) == 4


@pytest.mark.skipif(not SerialPair.available(), reason="socat is not installed: no pseudo-terminal pair for RTU")
async def test_rtu_over_a_serial_line_decodes_and_writes(workdir: Path) -> None:
    words, points, expected = every_type()
    layout = {"units": {"7": {"holding": words, "coil": [False]}}, "baudrate": 19200}
    async with SerialPair(workdir) as tty, ModbusServer(workdir, layout, rtu=tty.a) as server:
        client_url = f"rtu://{tty.b}?baudrate=19200&parity=N&stopbits=1"
        (meter,) = sensors(sensor_spec("meter", client_url, [*points, {"name": "relay", "table": "coil",
                                                                        "address": 0}], unit=7))
        assert server.url  # the server side of the pair
        try:
            readings, skipped = await meter.poll()
            said = await meter.write("relay", 1)
            after, _ = await meter.poll()
        finally:
            meter.line.close()
    assert skipped == []
    got = values(readings)
    assert all(got[f"meter.{name}"] == float(value) for name, value in expected.items())
    assert got["meter.relay"] == 0.0
    assert values(after)["meter.relay"] == 1.0
    assert "wrote 1 to meter.relay (coil 0 of unit 7)" in said


@asynccontextmanager
async def running(field: FieldSensors) -> AsyncIterator[None]:
    task = asyncio.create_task(field.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for sensor in field.sensors:
            assert isinstance(sensor, ModbusSensor)
            sensor.line.close()


class Recorder:
    """The sink and the audit of a FieldSensors: readings and events, with an event to wait on."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.event_times: list[float] = []
        self.changed = asyncio.Event()

    def emit(self, readings: list[Reading]) -> None:
        self.readings += readings
        self.changed.set()

    def audit(self, kind: str, body: dict[str, object]) -> None:
        self.events.append((kind, body))
        self.event_times.append(time.time())
        self.changed.set()

    def times(self, metric: str) -> list[float]:
        return [r.ts for r in self.readings if r.metric == metric]


@asynccontextmanager
async def line(workdir: Path, layout: dict[str, Any], transport: str) -> AsyncIterator[str]:
    """A server of `layout` on TCP or on one end of a serial pair; yields the URL a client uses."""
    if transport == "tcp":
        async with ModbusServer(workdir, layout) as server:
            yield server.url
        return
    if not SerialPair.available():
        pytest.skip("socat is not installed: no pseudo-terminal pair for RTU")
    async with SerialPair(workdir) as tty, ModbusServer(workdir, layout, rtu=tty.a):
        yield f"rtu://{tty.b}?baudrate=19200"


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_a_dead_slave_does_not_change_the_live_ones_intervals(workdir: Path, transport: str) -> None:
    """Units 1 and 2 share one connection (a TCP endpoint, or one serial line); 2 never answers.
    Unit 1's readings keep their 1 s spacing: the dead unit is asked again only in the line's idle
    time, never across a poll."""
    layout = {"units": {"1": {"holding": [1, 2, 3]}, "2": {"holding": [4, 5, 6]}}, "dead": [2]}
    registers = [{"name": "a", "table": "holding", "address": 0}, {"name": "b", "table": "holding", "address": 1}]
    record = Recorder()
    async with line(workdir, layout, transport) as url:
        live = sensor_spec("live", url, registers, unit=1, interval_s=1.0, timeout_s=0.6)
        dead = sensor_spec("dead", url, registers, unit=2, interval_s=1.0, timeout_s=0.6)
        field = FieldSensors(sensors(live, dead), record.emit, record.audit)
        async with running(field):
            # Backoff 1, 2, 4 s: within 9 s of the first failure the dead unit is asked at least 3 times more.
            await wait_for(lambda: record.events and len([t for t in record.times("live.a")
                                                          if t > record.event_times[0]]) >= 10,
                           "ten readings of the live unit after the dead one's first failure", SETTLE, record.changed)
    # From the dead unit's first failure on: its very first request, before anything was known
    # about it, may have come first on the line at start-up.
    times = [t for t in record.times("live.a") if t > record.event_times[0]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert field.health["dead"].errors >= 3, "the dead unit was not asked again: the test proves nothing"
    assert field.health["dead"].state == "failing"
    # A request across the live unit's poll would push it by up to the 0.6 s timeout.
    assert all(abs(gap - 1.0) < 0.3 for gap in gaps), gaps
    assert field.health["live"].errors == 0
    assert [kind for kind, _ in record.events] == [EventKind.SENSOR_FAILING]  # once, not once per poll


async def test_polling_resumes_by_itself_when_the_server_comes_back(workdir: Path) -> None:
    layout = {"units": {"1": {"input": [42]}}}
    record = Recorder()
    server = ModbusServer(workdir, layout)
    await server.start()
    try:
        spec = sensor_spec("plc", server.url, [{"name": "x", "table": "input", "address": 0}], interval_s=0.2,
                           timeout_s=0.5)
        field = FieldSensors(sensors(spec), record.emit, record.audit)
        async with running(field):
            await wait_for(lambda: record.times("plc.x"), "a first reading", SETTLE, record.changed)
            server.kill()
            await wait_for(lambda: field.health["plc"].state == "failing", "the sensor failing", SETTLE,
                           record.changed)
            errors = field.health["plc"].errors
            before = len(record.readings)
            await server.stop()
            await server.start()  # the same port
            await wait_for(lambda: len(record.readings) >= before + 3, "readings again", SETTLE, record.changed)
    finally:
        await server.stop()
    assert field.health["plc"].state == "ok"
    assert [kind for kind, _ in record.events] == [EventKind.SENSOR_FAILING, EventKind.SENSOR_RECOVERED]
    assert record.events[1][1]["errors"] >= errors
    assert all(r.value == 42.0 for r in record.readings)


async def test_exception_responses_and_bad_values_are_skipped_counted_and_the_rest_read(workdir: Path) -> None:
    nan = wire("f", math.nan, "ABCD")
    layout = {"units": {"1": {"holding": [7, *nan]}}}
    registers = [{"name": "good", "table": "holding", "address": 0},
                 {"name": "nan", "table": "holding", "address": 1, "type": "float32"},
                 {"name": "missing", "table": "holding", "address": 40}]  # beyond what the server holds
    async with ModbusServer(workdir, layout) as server:
        mixed, absent = sensors(
            sensor_spec("mixed", server.url, registers),
            sensor_spec("absent", server.url, [{"name": "y", "table": "input", "address": 500}]))
        record = Recorder()
        field = FieldSensors([mixed, absent], record.emit, record.audit)
        async with running(field):
            await wait_for(lambda: field.health["mixed"].reads >= 2 and field.health["absent"].errors >= 2,
                           "two polls of each", SETTLE, record.changed)
    assert {r.metric for r in record.readings} == {"mixed.good"}
    mixed_health, absent_health = field.health["mixed"], field.health["absent"]
    assert mixed_health.state == "ok"
    assert mixed_health.rejected >= 4  # the NaN and the exception, on each of two polls
    assert absent_health.state == "failing"
    assert "exception 2 (illegal data address)" in absent_health.last_error


async def test_a_write_through_the_actuator_is_read_back_from_the_server(workdir: Path) -> None:
    layout = {"units": {"3": {"coil": [False, False], "holding": [0, 0, 0, 0]}}}
    registers = [{"name": "relay", "table": "coil", "address": 1},
                 {"name": "setpoint", "table": "holding", "address": 0, "type": "float32", "order": "CDAB"},
                 {"name": "limit", "table": "holding", "address": 2, "type": "int16", "scale": 0.1}]
    async with ModbusServer(workdir, layout) as server:
        (plc,) = sensors(sensor_spec("plc", server.url, registers, unit=3))
        field = FieldSensors([plc], lambda readings: None, lambda kind, body: None)
        spec = ActuatorSpec(allowed=["modbus_write"], modbus=["plc.relay", "plc.setpoint", "plc.limit"])
        actuators = Actuators(spec, field_write=field.write)
        try:
            results = [await actuators.run("modbus_write", {"point": point, "value": value}, timeout=5.0)
                       for point, value in (("plc.relay", True), ("plc.setpoint", 12.5), ("plc.limit", -3.2))]
            refused = await actuators.run("modbus_write", {"point": "plc.other", "value": 1}, timeout=5.0)
            unfit = await actuators.run("modbus_write", {"point": "plc.limit", "value": 1e6}, timeout=5.0)
        finally:
            plc.line.close()
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=5, retries=0)
        try:
            assert await client.connect()
            coils = (await client.read_coils(0, count=2, device_id=3)).bits[:2]
            holding = (await client.read_holding_registers(0, count=3, device_id=3)).registers
        finally:
            client.close()
    assert [r.ok for r in results] == [True, True, True], [r.detail for r in results]
    assert coils == [False, True]
    assert holding[:2] == wire("f", 12.5, "CDAB")
    assert holding[2] == -32 & 0xFFFF
    assert refused.refused
    assert "may not be written" in refused.detail
    assert not unfit.ok
    assert "does not fit in int16" in unfit.detail
