"""What an exec program's stdout lines mean: JSON and line protocol, and the bound on a line."""

from __future__ import annotations

import pytest

from edge_agent.sense.field.exec import MAX_LINE_BYTES, BadLine, LineSplitter, Point, parse_line


def test_json_object_with_and_without_ts() -> None:
    assert parse_line(b'{"temp": 21.5, "rssi": -70}\n') == [Point("temp", 21.5, None), Point("rssi", -70.0, None)]
    assert parse_line(b'{"ts": 1700000000.25, "temp": 1}') == [Point("temp", 1.0, 1700000000.25)]


@pytest.mark.parametrize(("line", "why"), [
    (b'{"temp": "warm"}', "not a number"),
    (b'{"temp": true}', "not a number"),
    (b'{"temp": NaN}', "not JSON"),
    (b"{\"temp\": 1e999}", "not JSON"),
    (b'{"ts": -1, "temp": 1}', "timestamp"),
    (b'{"bad name": 1}', "not a point name"),
    (b'[1, 2]', "not an object"),
    (b'{"ts": 1700000000}', "no metric"),
    (b'{"temp": 1', "not JSON"),
    (b"   ", "empty line"),
    (b"\xff\xfe garbage", "not UTF-8"),
])
def test_json_lines_that_are_refused_say_why(line: bytes, why: str) -> None:
    with pytest.raises(BadLine, match=why):
        parse_line(line)


def test_line_protocol_types_tags_and_timestamp() -> None:
    line = b"weather,site=roof\\ top,kind=a temp=21.5,rssi=-70i,count=3u,door=t,wet=FALSE 1700000000000000000"
    assert parse_line(line) == [
        Point("weather_temp", 21.5, 1_700_000_000.0),
        Point("weather_rssi", -70.0, 1_700_000_000.0),
        Point("weather_count", 3.0, 1_700_000_000.0),
        Point("weather_door", 1.0, 1_700_000_000.0),
        Point("weather_wet", 0.0, 1_700_000_000.0),
    ]
    assert parse_line(b"m v=1", "influx") == [Point("m_v", 1.0, None)]


@pytest.mark.parametrize(("precision", "stamp", "seconds"), [
    ("ns", "1700000000500000000", 1_700_000_000.5), ("us", "1700000000500000", 1_700_000_000.5),
    ("ms", "1700000000500", 1_700_000_000.5), ("s", "1700000000", 1_700_000_000.0),
])
def test_line_protocol_timestamp_precision(precision: str, stamp: str, seconds: float) -> None:
    [point] = parse_line(f"m v=2 {stamp}".encode(), "influx", precision)  # type: ignore[arg-type]
    assert point.ts == pytest.approx(seconds)


@pytest.mark.parametrize(("line", "why"), [
    (b'm,host=a msg="hello world",v=1', "is a string"),
    (b"m v=abc", "not a number"),
    (b"m v=1.5i", "not a number"),
    (b"m v=1 12x", "not an integer"),
    (b"m", "1 space-separated parts"),
    (b"m v=1 2 3", "4 space-separated parts"),
    (b"m novalue", "not key=value"),
    (b'm s="open', "not closed"),
    (b"m v=inf", "not a finite number"),
])
def test_line_protocol_lines_that_are_refused_say_why(line: bytes, why: str) -> None:
    with pytest.raises(BadLine, match=why):
        parse_line(line, "influx")


def test_json_format_forced_refuses_line_protocol() -> None:
    with pytest.raises(BadLine, match="not JSON"):
        parse_line(b"m v=1", "json")


def test_splitter_joins_chunks_and_drops_a_line_over_the_limit_to_its_newline() -> None:
    splitter = LineSplitter(limit=10)
    assert splitter.feed(b"ab") == []
    assert splitter.feed(b"c\nde\n") == [b"abc", b"de"]
    assert splitter.feed(b"x" * 8) == []
    assert splitter.feed(b"x" * 8) == []  # over the limit: discarded, not kept
    assert splitter.oversized == 1
    assert splitter.feed(b"y" * 50) == []
    assert splitter.feed(b"tail\nok\n") == [b"ok"]
    assert splitter.feed(b"0123456789A\nnext\n") == [b"next"]  # over the limit inside one chunk
    assert splitter.oversized == 2
    assert splitter.feed(b"last") == []
    assert splitter.rest() == b"last"


def test_splitter_memory_stays_bounded_over_a_huge_line() -> None:
    splitter = LineSplitter()
    chunk = b"z" * 65536
    for _ in range(160):  # 10 MiB without a newline
        splitter.feed(chunk)
        assert len(splitter._buffer) <= MAX_LINE_BYTES
    assert splitter.feed(b"\n{\"a\": 1}\n") == [b'{"a": 1}']
    assert splitter.oversized == 1
