"""Field sensors: devices beside the board (a meter on RS-485, a PLC, a Zigbee bridge...).

A firmware profile or a device's own agent.toml declares them as `[[sensors]]` tables whose
`kind` is one of FIELD_KINDS. Each kind is one frozen struct here, a member of the tagged union
`FieldSensorSpec` (msgspec picks the struct by `kind`). A spec checks what its type cannot
(`check`) and says which metrics it produces (`points`); the agent's runtime for each kind is in
edge_agent/sense/field/. Metric names are `<sensor name>.<point name>`.

To add a kind: a struct with `tag="<kind>"` and the `kind`, `check` and `points` members below,
added to `FieldSensorSpec`; then a builder in edge_agent/sense/field/base.py (docs/sensors.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import msgspec
from msgspec import Meta

from edgefleet.errors import ConfigError

# A sensor name starts like an identifier (so `meter.voltage` parses in a rule) and leaves room
# for a point in a 64-character metric name.
SENSOR_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,30}")
POINT_NAME: Final = re.compile(r"[A-Za-z0-9_]{1,32}")
MAX_METRIC_LEN: Final = 64  # edgefleet.wire.protocol.METRIC_PATTERN

Interval = Annotated[float, Meta(gt=0, le=86400)]


def metric_name(sensor: str, point: str) -> str:
    return f"{sensor}.{point}"


def check_names(name: str, points: list[str], key: str, where: str) -> None:
    """The sensor's name and its points' names make valid, distinct metric names."""
    if not SENSOR_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name = {name!r} is not a sensor name: use 1 to 31 of A-Z a-z 0-9 _, "
                          "not starting with a digit", where)
    seen: set[str] = set()
    for point in points:
        if not POINT_NAME.fullmatch(point):
            raise ConfigError(f"{key}: point name {point!r} is not valid: use 1 to 32 of A-Z a-z 0-9 _", where)
        if point in seen:
            raise ConfigError(f"{key}: point {point!r} is listed twice: give each point its own name", where)
        seen.add(point)


# --- Modbus -------------------------------------------------------------------------------

ModbusTable = Literal["coil", "discrete", "input", "holding"]
ModbusType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
BIT_TABLES: Final = frozenset({"coil", "discrete"})
WRITABLE_TABLES: Final = frozenset({"coil", "holding"})
MAX_ADDRESS: Final = 0xFFFF  # Modbus addresses are 16 bits, 0-based on the wire
TYPE_BITS: Final = {"bool": 1, "int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64,
                    "float32": 32, "float64": 64}
# Byte orders a device may use, named from the most significant byte (A) in wire order.
ORDERS: Final = {
    16: ("AB", "BA"),
    32: ("ABCD", "CDAB", "BADC", "DCBA"),
    64: ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"),
}
DEFAULT_TCP_PORT: Final = 502
SERIAL_PARITIES: Final = ("N", "E", "O")
SERIAL_KEYS: Final = frozenset({"baudrate", "parity", "stopbits", "bytesize"})


class ModbusPoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One value: a bit (coil, discrete) or 1 to 4 registers (input, holding)."""

    name: str
    table: ModbusTable
    address: Annotated[int, Meta(ge=0, le=MAX_ADDRESS)]
    type: ModbusType | None = None  # default: bool for coil/discrete, uint16 for input/holding
    order: str | None = None  # default: big-endian (AB, ABCD, ABCDEFGH)
    scale: float = 1.0  # value = raw * scale + offset
    offset: float = 0.0

    @property
    def value_type(self) -> ModbusType:
        if self.type is not None:
            return self.type
        return "bool" if self.table in BIT_TABLES else "uint16"

    @property
    def byte_order(self) -> str:
        bits = TYPE_BITS[self.value_type]
        return self.order if self.order is not None else "ABCDEFGH"[: max(bits // 8, 1)]

    @property
    def count(self) -> int:
        """How many addresses (bits or 16-bit registers) the value takes."""
        return max(TYPE_BITS[self.value_type] // 16, 1)


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SerialEndpoint:
    device: str
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    def __str__(self) -> str:
        return f"rtu://{self.device}?baudrate={self.baudrate}&parity={self.parity}&stopbits={self.stopbits}"


ModbusEndpoint = TcpEndpoint | SerialEndpoint


def modbus_endpoint(url: str) -> ModbusEndpoint:
    """tcp://host[:port] or rtu:///dev/tty...?baudrate=&parity=&stopbits=&bytesize=; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port is not a number from 1 to 65535") from None
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError("write it as tcp://HOST:PORT")
        return TcpEndpoint(parts.hostname, port or DEFAULT_TCP_PORT)
    if parts.scheme == "rtu":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError("write it as rtu:///dev/ttyUSB0?baudrate=9600&parity=E&stopbits=1 (three slashes)")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - SERIAL_KEYS)
        if unknown:
            raise ValueError(f"unknown setting {', '.join(unknown)}; known: {', '.join(sorted(SERIAL_KEYS))}")
        try:
            baudrate = int(query.get("baudrate", "9600"))
            stopbits = int(query.get("stopbits", "1"))
            bytesize = int(query.get("bytesize", "8"))
        except ValueError:
            raise ValueError("baudrate, stopbits and bytesize are whole numbers") from None
        parity = query.get("parity", "N").upper()
        if parity not in SERIAL_PARITIES or stopbits not in (1, 2) or bytesize not in (7, 8) or baudrate <= 0:
            raise ValueError("parity is N, E or O; stopbits 1 or 2; bytesize 7 or 8; baudrate > 0")
        return SerialEndpoint(parts.path, baudrate, parity, stopbits, bytesize)
    raise ValueError("it must start with tcp:// or rtu://")


class ModbusSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="modbus"):
    """One slave (unit id) on a Modbus TCP endpoint or an RTU serial line."""

    name: str
    url: str
    registers: list[ModbusPoint]
    unit: Annotated[int, Meta(ge=0, le=255)] = 1
    interval_s: Interval = 1.0
    # One request's answer; a dead slave costs this much of a shared line per request.
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    # Silence between two requests on one connection (some RTU slaves and gateways need it).
    pause_s: Annotated[float, Meta(ge=0, le=10)] = 0.0

    @property
    def kind(self) -> str:
        return "modbus"

    @property
    def endpoint(self) -> ModbusEndpoint:
        return modbus_endpoint(self.url)

    def points(self) -> frozenset[str] | None:
        """The metrics this sensor produces (None: only known at run time)."""
        return frozenset(metric_name(self.name, p.name) for p in self.registers)

    def writable(self) -> frozenset[str]:
        """The points the modbus_write actuator could write (coils and holding registers)."""
        return frozenset(metric_name(self.name, p.name) for p in self.registers if p.table in WRITABLE_TABLES)

    def check(self, key: str, where: str) -> None:
        """What the struct's types cannot say; raises ConfigError naming `key`."""
        check_names(self.name, [p.name for p in self.registers], key, where)
        try:
            self.endpoint  # noqa: B018 - parsed for its error
        except ValueError as exc:
            raise ConfigError(f"{key}.url = {self.url!r}: {exc}", where) from None
        if not self.registers:
            raise ConfigError(f"{key}.registers is empty: list at least one register", where)
        taken: dict[tuple[str, int], str] = {}
        for index, point in enumerate(self.registers):
            check_modbus_point(point, f"{key}.registers[{index}]", where)
            for address in range(point.address, point.address + point.count):
                other = taken.get((point.table, address))
                if other is not None:
                    what = "is listed twice" if other_address(self.registers, other) == point.address else "overlaps"
                    raise ConfigError(
                        f"{key}.registers[{index}] ({point.name}) {what} {point.table} {address} with {other}: "
                        "give each value its own addresses", where)
                taken[(point.table, address)] = point.name


def other_address(points: list[ModbusPoint], name: str) -> int:
    return next(p.address for p in points if p.name == name)


def check_modbus_point(point: ModbusPoint, key: str, where: str) -> None:
    """Type against table, order against type, the last address inside 16 bits, finite scale."""
    kind = point.value_type
    if (point.table in BIT_TABLES) != (kind == "bool"):
        need = "bool" if point.table in BIT_TABLES else "a 16/32/64-bit type (e.g. uint16, float32)"
        raise ConfigError(f"{key}.type = {kind!r} does not fit table {point.table!r}: use {need}", where)
    bits = TYPE_BITS[kind]
    if point.order is not None:
        allowed = ORDERS.get(bits, ())
        if point.order not in allowed:
            fix = f"use one of {', '.join(allowed)}" if allowed else "leave order out for bits"
            raise ConfigError(f"{key}.order = {point.order!r} does not fit {kind}: {fix}", where)
    last = point.address + point.count - 1
    if last > MAX_ADDRESS:
        raise ConfigError(f"{key}: a {kind} at address {point.address} ends at {last}, past the last Modbus "
                          f"address {MAX_ADDRESS}: lower the address", where)
    if kind == "bool" and (point.scale != 1.0 or point.offset != 0.0):
        raise ConfigError(f"{key}: scale and offset do not apply to a bit: leave them out", where)
    if not (abs(point.scale) < float("inf") and abs(point.offset) < float("inf")) or point.scale == 0:
        raise ConfigError(f"{key}: scale must be a finite non-zero number and offset finite", where)


# --- kernel sensors (sysfs) ---------------------------------------------------------------------

SysfsSource = Literal["w1", "hwmon", "iio"]


class SysfsSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="sysfs"):
    """One kernel device: a 1-Wire thermometer, a hwmon chip or an IIO device, chosen by name."""

    name: str
    source: SysfsSource
    device: str  # the hwmon or IIO `name` (bme280, sht3x), or the 1-Wire slave id (28-0316a2795aff)
    interval_s: Interval = 5.0
    channels: list[str] = []  # the channels to report (temp1, pressure, ...); empty: every channel
    root: str = "/sys"  # where sysfs is mounted; a container or a test points it elsewhere

    @property
    def kind(self) -> str:
        return "sysfs"

    def points(self) -> frozenset[str] | None:
        return frozenset(metric_name(self.name, c) for c in self.channels) if self.channels else None

    def check(self, key: str, where: str) -> None:
        check_names(self.name, list(self.channels), key, where)
        if not self.device or "/" in self.device or self.device in (".", ".."):
            raise ConfigError(f"{key}.device = {self.device!r} is not a device name: give the hwmon or IIO "
                              "`name` or the 1-Wire id (e.g. 28-0316a2795aff)", where)
        if not self.root.startswith("/"):
            raise ConfigError(f"{key}.root = {self.root!r} must be an absolute path (e.g. /sys)", where)


# --- external programs (exec) ------------------------------------------------------------------


class ExecSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="exec"):
    """A long-lived program printing one reading set per line (JSON or InfluxDB line protocol)."""

    name: str
    argv: list[str]  # run as is, never through a shell
    format: Literal["auto", "json", "influx"] = "auto"
    precision: Literal["ns", "us", "ms", "s"] = "ns"  # of line-protocol timestamps

    @property
    def kind(self) -> str:
        return "exec"

    def points(self) -> frozenset[str] | None:
        return None  # whatever the program prints

    def check(self, key: str, where: str) -> None:
        check_names(self.name, [], key, where)
        if not self.argv or not self.argv[0]:
            raise ConfigError(f"{key}.argv is empty: give the program and its arguments as a list, "
                              'e.g. ["/usr/local/bin/ble-scan", "--json"]', where)


# --- local MQTT ------------------------------------------------------------------------------------

DEFAULT_MQTT_PORT: Final = 1883


class MqttTopicSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One topic filter and the points its payloads give: point -> dotted JSON path ("" = the payload)."""

    topic: str
    points: dict[str, str]
    ts_field: str | None = None  # a dotted path to the payload's timestamp
    ts_unit: Literal["auto", "s", "ms", "iso"] = "auto"


class MqttSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="mqtt"):
    """A broker on the device or its LAN (Zigbee2MQTT, Tasmota, Shelly, ESPHome), not the hub's."""

    name: str
    topics: list[MqttTopicSpec]
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = DEFAULT_MQTT_PORT
    username: str | None = None
    password_file: str | None = None  # a file holding the password: agent.toml is not a secret store
    tls: bool = False
    ca: str | None = None  # with tls: the CA that signed the broker's certificate (default: the system's)
    qos: Literal[0, 1] = 0

    @property
    def kind(self) -> str:
        return "mqtt"

    def points(self) -> frozenset[str] | None:
        return frozenset(metric_name(self.name, p) for t in self.topics for p in t.points)

    def check(self, key: str, where: str) -> None:
        check_names(self.name, [p for t in self.topics for p in t.points], key, where)
        if not self.topics:
            raise ConfigError(f"{key}.topics is empty: list at least one {{ topic = ..., points = ... }}", where)
        for index, topic in enumerate(self.topics):
            if not topic.topic or "#" in topic.topic[:-1] or any(
                    ("+" in level or "#" in level) and len(level) > 1 for level in topic.topic.split("/")):
                raise ConfigError(f"{key}.topics[{index}].topic = {topic.topic!r} is not an MQTT topic filter "
                                  "(+ and # stand alone in a level, # only last)", where)
            if not topic.points:
                raise ConfigError(f"{key}.topics[{index}].points is empty: map at least one point to a JSON "
                                  'field, or to "" for a payload that is a plain number', where)
        if self.password_file is not None and self.username is None:
            raise ConfigError(f"{key}.password_file needs {key}.username", where)
        if self.ca is not None and not self.tls:
            raise ConfigError(f"{key}.ca is only used with tls = true: set tls = true or drop ca", where)


# --- GPIO -----------------------------------------------------------------------------------------


class GpioInputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One input line: its level (1 = active), or a count of its edges (a pulse meter)."""

    name: str  # the point
    line: int | str  # the offset on the chip, or the line's name
    mode: Literal["level", "counter"] = "level"
    edge: Literal["rising", "falling", "both"] = "rising"  # which edges a counter counts
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "as-is"
    active_low: bool = False
    debounce_ms: Annotated[float, Meta(ge=0, le=1000)] = 10.0


class GpioSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="gpio"):
    """Input lines of one GPIO chip (through libgpiod v2: the edgefleet[gpio] extra)."""

    name: str
    chip: str  # gpiochip0 or /dev/gpiochip0
    lines: list[GpioInputSpec]
    interval_s: Interval = 5.0

    @property
    def kind(self) -> str:
        return "gpio"

    def points(self) -> frozenset[str] | None:
        return frozenset(metric_name(self.name, line.name) for line in self.lines)

    def check(self, key: str, where: str) -> None:
        check_names(self.name, [line.name for line in self.lines], key, where)
        check_gpio_lines(self.chip, [line.line for line in self.lines], f"{key}.lines", where)


def check_gpio_lines(chip: str, lines: list[int | str], key: str, where: str) -> None:
    if not chip or (not chip.startswith("/dev/") and "/" in chip):
        raise ConfigError(f"{key}: chip {chip!r} is not a GPIO chip: write gpiochip0 or /dev/gpiochip0", where)
    if not lines:
        raise ConfigError(f"{key} is empty: list at least one line", where)
    seen: set[int | str] = set()
    for line in lines:
        if isinstance(line, int) and line < 0:
            raise ConfigError(f"{key}: line {line} is negative: give its offset on the chip (0, 1, ...)", where)
        if line in seen:
            raise ConfigError(f"{key}: line {line!r} is listed twice: a line has one use", where)
        seen.add(line)


# --- plugins (Python entry points) ----------------------------------------------------------------

SENSOR_ENTRY_POINTS: Final = "edgefleet.sensors"  # the group a package adds a sensor kind in
ACTUATOR_ENTRY_POINTS: Final = "edgefleet.actuators"  # ... and an actuator kind


def offered_plugins(group: str) -> list[str]:
    """The entry point names installed packages offer in `group` (nothing is imported)."""
    from importlib.metadata import entry_points  # scans the installed distributions: only when asked

    return sorted({point.name for point in entry_points(group=group)})


class PluginSensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", tag="plugin"):
    """A sensor kind an installed package adds (entry point group edgefleet.sensors)."""

    name: str
    plugin: str  # the entry point's name
    interval_s: Interval = 5.0  # for a plugin that is polled
    options: dict[str, Any] = {}  # handed to the plugin's builder as they are; it checks them

    @property
    def kind(self) -> str:
        return "plugin"

    def points(self) -> frozenset[str] | None:
        return None

    def check(self, key: str, where: str) -> None:
        check_names(self.name, [], key, where)
        offered = offered_plugins(SENSOR_ENTRY_POINTS)
        if self.plugin not in offered:
            raise ConfigError(f"{key}.plugin = {self.plugin!r} is offered by no installed package (entry point "
                              f"group {SENSOR_ENTRY_POINTS}: {', '.join(offered) or 'none'}); install the package "
                              "that provides it", where)


# --- the union ------------------------------------------------------------------------------

# Every field sensor kind; add a new kind's struct here (and its builder in edge_agent/sense/field/base.py).
FieldSensorSpec = (ModbusSensorSpec | SysfsSensorSpec | ExecSensorSpec | MqttSensorSpec | GpioSensorSpec
                   | PluginSensorSpec)
FIELD_KINDS: Final = ("modbus", "sysfs", "exec", "mqtt", "gpio", "plugin")


def parse_field_sensor(raw: object, key: str, where: str) -> FieldSensorSpec:
    """One `[[sensors]]` table of a field kind, validated and checked; errors name `key`."""
    try:
        spec: FieldSensorSpec = msgspec.convert(raw, type=FieldSensorSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{key}: {str(exc).replace('`$.', f'`{key}.').replace(' - at `$`', '')}", where) from None
    spec.check(key, where)
    return spec


def field_metric(spec: FieldSensorSpec, metric: str) -> bool:
    """Whether `spec` can produce `metric`."""
    points = spec.points()
    if points is None:
        return metric.startswith(f"{spec.name}.")
    return metric in points
