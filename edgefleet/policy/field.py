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
from typing import Annotated, Final, Literal
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


# --- the union ------------------------------------------------------------------------------

# Every field sensor kind; add a new kind's struct here (and its builder in edge_agent/sense/field/base.py).
FieldSensorSpec = ModbusSensorSpec
FIELD_KINDS: Final = ("modbus",)


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
