"""Modbus values without I/O: which requests read a sensor's points, and how words become numbers.

A 16-bit register travels high byte first. A value of 2 or 4 registers is their bytes in wire
order; `order` names each of those bytes by its rank in the value, from the most significant (A).
So "ABCD" is big-endian, "CDAB" swaps the 16-bit words, "BADC" swaps the bytes in each word and
"DCBA" is little-endian.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edgefleet.policy.field import BIT_TABLES, ModbusPoint

MAX_REGISTERS: Final = 125  # per read request (function 3 and 4): the protocol's limit
MAX_BITS: Final = 2000  # per read request (functions 1 and 2)
MAX_WRITE_REGISTERS: Final = 123  # per write request (function 16)
_FORMATS: Final = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q",
                   "float32": "f", "float64": "d"}


class BadValue(ValueError):
    """A value that cannot be used (NaN, infinity, a short answer); the message says which and why."""


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: `count` contiguous addresses of `table` from `address`, and the points in it."""

    table: str
    address: int
    count: int
    points: tuple[ModbusPoint, ...]


def plan(points: Iterable[ModbusPoint]) -> list[Block]:
    """The fewest requests that read every point: contiguous points of a table share a request,
    up to the protocol's limit. Gaps are never read (a device may refuse the address)."""
    blocks: list[Block] = []
    by_table: dict[str, list[ModbusPoint]] = {}
    for point in points:
        by_table.setdefault(point.table, []).append(point)
    for table in sorted(by_table):
        limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        run: list[ModbusPoint] = []
        start = end = 0
        for point in sorted(by_table[table], key=lambda p: p.address):
            if run and point.address == end and point.address + point.count - start <= limit:
                run.append(point)
                end = point.address + point.count
                continue
            if run:
                blocks.append(Block(table, start, end - start, tuple(run)))
            run, start, end = [point], point.address, point.address + point.count
        if run:
            blocks.append(Block(table, start, end - start, tuple(run)))
    return blocks


def _wire_bytes(words: Sequence[int]) -> bytes:
    return b"".join(int(w).to_bytes(2, "big") for w in words)


def decode_words(point: ModbusPoint, words: Sequence[int]) -> float:
    """The point's value (scaled) from its registers as they came off the wire."""
    if len(words) != point.count:
        raise BadValue(f"{point.name}: {len(words)} register(s) where {point.count} were asked")
    wire = _wire_bytes(words)
    order = point.byte_order
    value_bytes = bytearray(len(wire))
    for position, letter in enumerate(order):
        value_bytes[ord(letter) - ord("A")] = wire[position]
    (raw,) = struct.unpack(">" + _FORMATS[point.value_type], bytes(value_bytes))
    value = float(raw) * point.scale + point.offset
    if not math.isfinite(value):
        raise BadValue(f"{point.name} decodes to {value} (raw words {[f'0x{w:04x}' for w in words]})")
    return value


def encode_words(point: ModbusPoint, value: float) -> list[int]:
    """The registers to write for `value` (unscaled first: raw = (value - offset) / scale)."""
    if not math.isfinite(value):
        raise BadValue(f"{point.name}: cannot write {value}")
    raw = (value - point.offset) / point.scale
    kind = point.value_type
    fmt = ">" + _FORMATS[kind]
    if kind.startswith(("int", "uint")):
        whole = round(raw)
        if abs(raw - whole) > 1e-9 * max(1.0, abs(raw)):
            raise BadValue(f"{point.name} is a {kind}: {value} is not a whole number of its units")
        try:
            value_bytes = struct.pack(fmt, whole)
        except struct.error:
            raise BadValue(f"{point.name}: {value} does not fit in {kind}") from None
    else:
        try:
            value_bytes = struct.pack(fmt, raw)
        except OverflowError:
            raise BadValue(f"{point.name}: {value} does not fit in {kind}") from None
    wire = bytes(value_bytes[ord(letter) - ord("A")] for letter in point.byte_order)
    return [int.from_bytes(wire[i:i + 2], "big") for i in range(0, len(wire), 2)]


def decode_block(block: Block, values: Sequence[int] | Sequence[bool]) -> tuple[list[tuple[str, float]], list[str]]:
    """(point name, value) for each point the answer holds, and a reason for each one skipped."""
    if len(values) < block.count:  # bits come padded to a whole byte; registers exactly
        return [], [f"{block.table} {block.address}+{block.count}: the answer holds {len(values)} value(s)"]
    good: list[tuple[str, float]] = []
    bad: list[str] = []
    for point in block.points:
        at = point.address - block.address
        if block.table in BIT_TABLES:
            good.append((point.name, 1.0 if values[at] else 0.0))
            continue
        try:
            good.append((point.name, decode_words(point, [int(v) for v in values[at:at + point.count]])))
        except BadValue as exc:
            bad.append(str(exc))
    return good, bad
