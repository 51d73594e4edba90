"""Modbus request planning and value coding, without a device (edge_agent/sense/field/modbus_codec.py)."""

from __future__ import annotations

import math

import pytest

from edge_agent.sense.field.modbus_codec import (
    MAX_BITS,
    MAX_REGISTERS,
    BadValue,
    decode_block,
    decode_words,
    encode_words,
    plan,
)
from edgefleet.policy.field import ModbusPoint


def reg(name: str, address: int, kind: str = "uint16", table: str = "holding", **extra: object) -> ModbusPoint:
    return ModbusPoint(name=name, table=table, address=address, type=kind, **extra)  # type: ignore[arg-type]


def test_contiguous_points_share_a_request_and_gaps_are_never_read() -> None:
    points = [reg("a", 0), reg("b", 1, "float32"), reg("c", 3), reg("d", 10), reg("i", 0, table="input"),
              ModbusPoint(name="k", table="coil", address=5), ModbusPoint(name="l", table="coil", address=6)]
    blocks = [(b.table, b.address, b.count, [p.name for p in b.points]) for b in plan(points)]
    assert blocks == [("coil", 5, 2, ["k", "l"]), ("holding", 0, 4, ["a", "b", "c"]), ("holding", 10, 1, ["d"]),
                      ("input", 0, 1, ["i"])]


def test_requests_respect_the_protocols_limits() -> None:
    registers = [reg(f"r{i}", i) for i in range(300)]
    assert [(b.address, b.count) for b in plan(registers)] == [(0, MAX_REGISTERS), (125, 125), (250, 50)]
    bits = [ModbusPoint(name=f"b{i}", table="discrete", address=i) for i in range(4500)]
    assert [(b.address, b.count) for b in plan(bits)] == [(0, MAX_BITS), (2000, 2000), (4000, 500)]
    # A 64-bit value never straddles two requests.
    wide = [reg(f"q{i}", 4 * i, "uint64") for i in range(40)]
    assert all(b.count % 4 == 0 and b.count <= MAX_REGISTERS for b in plan(wide))


@pytest.mark.parametrize(("kind", "order", "value"), [
    ("int16", "BA", -2), ("uint32", "CDAB", 4_000_000_000), ("int64", "HGFEDCBA", -(2**40)),
    ("float32", "BADC", 0.15625), ("float64", "GHEFCDAB", math.pi), ("uint64", "ABCDEFGH", 2**63 + 5),
])
def test_what_is_written_reads_back_the_same(kind: str, order: str, value: float) -> None:
    point = reg("p", 0, kind, order=order)
    assert decode_words(point, encode_words(point, value)) == float(value)


def test_scale_and_offset_apply_both_ways() -> None:
    point = reg("t", 0, "int16", scale=0.1, offset=-40.0)
    assert encode_words(point, 21.5) == [615]
    assert decode_words(point, [615]) == 615 * 0.1 - 40.0


@pytest.mark.parametrize(("kind", "value", "says"), [
    ("int16", 40000, "does not fit in int16"), ("uint16", -1, "does not fit in uint16"),
    ("int32", 1.5, "not a whole number"), ("float32", math.inf, "cannot write inf"),
    ("float32", 1e39, "does not fit in float32"),
])
def test_values_that_do_not_fit_are_refused(kind: str, value: float, says: str) -> None:
    with pytest.raises(BadValue, match=says):
        encode_words(reg("p", 0, kind), value)


def test_bad_answers_are_reasons_not_readings() -> None:
    (block,) = plan([reg("f", 0, "float32"), reg("g", 2)])
    good, bad = decode_block(block, [0x7FC0, 0x0000, 9])  # a quiet NaN, then 9
    assert good == [("g", 9.0)]
    assert len(bad) == 1
    assert "f decodes to nan" in bad[0]
    good, bad = decode_block(block, [1, 2])  # short
    assert good == []
    assert "the answer holds 2 value(s)" in bad[0]
