"""Field sensors: declarations in agent.toml and profiles, metric names in rules and deadbands, the
health record and the supervisor (with a sensor written here standing in for a connector)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import msgspec
import pytest

from edge_agent.config import load_settings
from edge_agent.sense.field.base import FieldSensors, SensorHealth, check_cancelled
from edge_agent.sense.sensors import Reading, Sink
from edgefleet.errors import ConfigError
from edgefleet.policy.check import check_policy, known_metrics
from edgefleet.policy.document import PolicyError
from edgefleet.policy.expr import parse
from edgefleet.policy.field import ModbusSensorSpec
from edgefleet.policy.profiles import METRIC_PATTERN, load_profile
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import FieldHealth, Status, pack, unpack

AGENT_TOML = """\
device_id = "dev-1"
profile = "bench"
profiles_dir = "profiles"

[broker]
host = "hub.example.net"
"""

PROFILE = """\
name = "bench"
description = "a test board"

[budgets]
disk_mb = 32

[[sensors]]
kind = "system"
metrics = ["cpu_percent"]

[actuators]
allowed = ["alert"]
"""

METER = """
[[sensors]]
kind = "modbus"
name = "meter"
url = "tcp://192.168.1.50:502"
unit = 1
interval_s = 1.0
registers = [
  { name = "voltage", table = "input",   address = 0,  type = "float32", order = "ABCD" },
  { name = "energy",  table = "holding", address = 10, type = "uint32",  order = "CDAB", scale = 0.01 },
  { name = "relay",   table = "coil",    address = 0 },
]
"""


def setup(tmp_path: Path, agent_extra: str = METER, profile_extra: str = "") -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "bench.toml").write_text(PROFILE + profile_extra, encoding="utf-8")
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML + agent_extra, encoding="utf-8")
    return path


def refused(tmp_path: Path, agent_extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(setup(tmp_path, agent_extra))
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "agent.toml")), message
    return message


def test_the_issue_example_declared_in_agent_toml_adds_to_the_profile(tmp_path: Path) -> None:
    settings = load_settings(setup(tmp_path))
    assert [s.kind for s in settings.profile.sensors] == ["system"]
    (meter,) = settings.profile.field_sensors
    assert isinstance(meter, ModbusSensorSpec)
    assert meter.points() == {"meter.voltage", "meter.energy", "meter.relay"}
    relay = meter.registers[2]
    assert (relay.value_type, relay.count) == ("bool", 1)
    assert (meter.registers[1].byte_order, meter.registers[1].count) == ("CDAB", 2)
    assert known_metrics(settings.profile) == {"cpu_percent", "meter.voltage", "meter.energy", "meter.relay"}


def replace_line(old: str, new: str) -> str:
    assert old in METER
    return METER.replace(old, new)


VOLTAGE = '{ name = "voltage", table = "input",   address = 0,  type = "float32", order = "ABCD" }'


@pytest.mark.parametrize(("extra", "says"), [
    (replace_line("unit = 1", "unit = 1\nspeed = 3"), "sensors[0]: Object contains unknown field `speed`"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "input", address = 70000 }'),
     "sensors[0].registers[0].address"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "input", address = 0, type = "float16" }'),
     "sensors[0].registers[0].type"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "input", address = 0, type = "float32", order = "AB" }'),
     "sensors[0].registers[0].order = 'AB' does not fit float32: use one of ABCD, CDAB, BADC, DCBA"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "input", address = 65535, type = "float32" }'),
     "ends at 65536, past the last Modbus address 65535: lower the address"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "holding", address = 9, type = "uint32" }'),
     "sensors[0].registers[1] (energy) overlaps holding 10 with voltage"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "holding", address = 10 }'),
     "sensors[0].registers[1] (energy) is listed twice holding 10 with voltage"),
    (replace_line(VOLTAGE, '{ name = "energy", table = "input", address = 0 }'), "point 'energy' is listed twice"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "coil", address = 5, type = "uint16" }'),
     "sensors[0].registers[0].type = 'uint16' does not fit table 'coil': use bool"),
    (replace_line(VOLTAGE, '{ name = "voltage", table = "input", address = 5, type = "bool" }'),
     "does not fit table 'input': use a 16/32/64-bit type"),
    (replace_line("tcp://192.168.1.50:502", "udp://192.168.1.50:502"), "sensors[0].url = 'udp://192.168.1.50:502': "
                                                                      "it must start with tcp:// or rtu://"),
    (replace_line("tcp://192.168.1.50:502", "rtu:///dev/ttyUSB0?baudrate=9600&parity=X"),
     "parity is N, E or O"),
    (replace_line('name = "meter"', 'name = "9meter"'), "sensors[0].name = '9meter' is not a sensor name"),
    (METER.replace('kind = "modbus"', 'kind = "canbus"'), "sensors[0].kind = 'canbus' is not a sensor kind here"),
    (METER.replace('kind = "modbus"', 'kind = "thermal"'), "belong in its firmware profile"),
    (METER + METER, "sensors[1].name = 'meter' is taken by another sensor"),
])
def test_bad_declarations_are_refused_naming_the_file_the_key_and_the_fix(
        tmp_path: Path, extra: str, says: str) -> None:
    assert says in refused(tmp_path, extra)


def test_rtu_urls_carry_the_line_settings(tmp_path: Path) -> None:
    extra = replace_line("tcp://192.168.1.50:502", "rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=2")
    (meter,) = load_settings(setup(tmp_path, extra)).profile.field_sensors
    assert str(meter.endpoint) == "rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=2"


def test_a_profile_may_declare_field_sensors_and_dotted_deadbands(tmp_path: Path) -> None:
    report = '\n[report]\ndefault_deadband = 0.0\ndeadband = { meter.voltage = 0.5, "meter.energy" = 0.1 }\n'
    setup(tmp_path, "", METER + report)
    profile = load_profile("bench", search=[tmp_path / "profiles"])
    assert profile.report.deadband == {"meter.voltage": 0.5, "meter.energy": 0.1}
    assert [s.name for s in profile.field_sensors] == ["meter"]


def test_a_deadband_on_a_point_no_sensor_reads_is_refused(tmp_path: Path) -> None:
    setup(tmp_path, "", METER + "\n[report]\ndeadband = { meter.current = 0.5 }\n")
    with pytest.raises(ConfigError, match=r"report.deadband.meter.current: no sensor of this profile reports"):
        load_profile("bench", search=[tmp_path / "profiles"])


def test_rules_read_field_metrics_by_their_dotted_names(tmp_path: Path) -> None:
    settings = load_settings(setup(tmp_path))
    policy = check_policy('[[rules]]\nname = "overvoltage"\nwhen = "meter.voltage > 250"\n'
                          'clear = "avg(meter.voltage, 10s) < 240"\naction = "alert"\n'
                          'offline = "act"\nargs = { message = "over voltage" }\n', settings.profile)
    assert policy.rules[0].when.metrics == {"meter.voltage"}
    with pytest.raises(PolicyError, match=r"unknown metric 'meter\.current'"):
        check_policy('[[rules]]\nname = "x"\nwhen = "meter.current > 1"\nclear = "meter.voltage < 1"\n'
                     'action = "alert"\noffline = "act"\nargs = { message = "m" }\n', settings.profile)


def test_dotted_metric_names_match_both_patterns() -> None:
    assert METRIC_PATTERN.fullmatch("meter.voltage")
    assert METRIC_PATTERN.fullmatch("cpu_temp")
    for bad in ("meter.", ".voltage", "a.b.c", "x" * 65, "meter..voltage", "meter.volt-age"):
        assert not METRIC_PATTERN.fullmatch(bad), bad
    assert parse("meter.voltage > 250", metrics={"meter.voltage"}).metrics == {"meter.voltage"}


# --- health ----------------------------------------------------------------------------------


def test_health_logs_and_audits_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    health = SensorHealth("meter", "modbus", lambda kind, body: events.append((kind, body)), clock=lambda: 100.0)
    caplog.set_level(logging.DEBUG, logger="edge_agent.field")
    health.ok()
    for _ in range(5):
        health.failed("no answer from unit 3 within 1 s")
    health.ok()
    health.ok()
    assert [kind for kind, _ in events] == [EventKind.SENSOR_FAILING, EventKind.SENSOR_RECOVERED]
    assert events[0][1] == {"sensor": "meter", "kind": "modbus", "error": "no answer from unit 3 within 1 s"}
    levels = [r.levelname for r in caplog.records]
    assert levels == ["INFO", "WARNING", "DEBUG", "DEBUG", "DEBUG", "DEBUG", "INFO"]
    record = health.record()
    assert (record.state, record.reads, record.errors) == ("ok", 3, 5)


def test_rejected_values_are_counted_and_each_reason_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    health = SensorHealth("meter", "modbus", lambda kind, body: None)
    caplog.set_level(logging.DEBUG, logger="edge_agent.field")
    for _ in range(3):
        health.reject("voltage decodes to NaN")
    health.reject("energy: 1 register(s) where 2 were asked")
    assert health.rejected == 4
    assert [r.levelname for r in caplog.records] == ["WARNING", "DEBUG", "DEBUG", "WARNING"]
    assert health.state == "starting"  # skipped values are not a failed poll


def test_status_carries_field_health_and_older_peers_ignore_or_miss_it() -> None:
    health = FieldHealth(state="failing", since=5.0, reads=3, errors=2, last_error="timed out", kind="modbus")
    status = Status(backlog=0, dropped=0, field_sensors={"meter": health})
    assert unpack(pack(status), Status).field_sensors["meter"] == health

    class OldStatus(msgspec.Struct, kw_only=True):  # a hub from before field sensors
        backlog: int
        dropped: int

    assert unpack(pack(status), OldStatus).backlog == 0
    assert unpack(pack(OldStatus(backlog=1, dropped=0)), Status).field_sensors == {}


# --- the supervisor --------------------------------------------------------------------------


class Flaky:
    """A connector that crashes on its first runs, then reads: the supervisor must bring it back."""

    kind = "test"

    def __init__(self, name: str, crashes: int) -> None:
        self.name = name
        self.crashes = crashes
        self.runs = 0

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"bug number {self.runs}")
        while True:
            emit([Reading(f"{self.name}.x", 1.0, float(self.runs))])
            health.ok()
            await asyncio.sleep(0.01)

    async def probe(self) -> list[Reading]:
        return []


async def test_a_crashing_sensor_is_restarted_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Reading] = []
    back = asyncio.Event()

    def emit(readings: list[Reading]) -> None:
        got.extend(readings)
        if any(r.metric == "flaky.x" for r in readings):
            back.set()

    events: list[str] = []
    flaky, steady = Flaky("flaky", crashes=1), Flaky("steady", crashes=0)
    field = FieldSensors([flaky, steady], emit, lambda kind, body: events.append(kind))
    task = asyncio.create_task(field.run())
    try:
        async with asyncio.timeout(10):
            await back.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert flaky.runs == 2
    assert steady.runs == 1
    assert events == [EventKind.SENSOR_FAILING, EventKind.SENSOR_RECOVERED]
    assert "bug number 1" in field.health["flaky"].last_error
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


async def test_a_cancellation_a_library_swallowed_still_ends_a_connector_loop() -> None:
    """Python 3.11's asyncio.wait_for returns its result when the cancellation arrives as its future
    completes (pymodbus awaits answers that way); the connector's loop must stop all the same."""
    turns = 0

    async def connector_loop() -> None:
        nonlocal turns
        while True:
            check_cancelled()
            turns += 1
            with contextlib.suppress(asyncio.CancelledError):  # the library's swallowed cancellation
                await asyncio.sleep(0.01)

    task = asyncio.create_task(connector_loop())
    await asyncio.sleep(0.05)
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert turns >= 2
