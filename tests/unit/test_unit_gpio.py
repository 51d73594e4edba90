"""GPIO at the gpiod boundary: a fake of the few chip and line-request calls we make (this kernel
has no gpio-sim; tests/integration/test_gpio_sim.py runs the same against the kernel's where it has)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

gpiod = pytest.importorskip("gpiod", reason="the gpio extra (gpiod) is not installed")
from gpiod.line import Direction, Edge, Value  # noqa: E402

from edge_agent.sense.field.gpio import GpioError, GpioInputs, GpioOutputs, InputLine, OutputLine  # noqa: E402
from tests.support.field import wait_until  # noqa: E402

MS = 1_000_000


class FakeRequest:
    """A line request: its fd is a real pipe, so the agent's loop wakes on edges as on the kernel's."""

    def __init__(self, chip: FakeChip, config: dict[int, Any], output_values: dict[int, Value] | None) -> None:
        self.chip, self.config = chip, config
        self.read_fd, self._write_fd = os.pipe()
        self.events: list[gpiod.EdgeEvent] = []
        self.released = False
        for offset, value in (output_values or {}).items():
            self.set_value(offset, value)

    @property
    def fd(self) -> int:
        return self.read_fd

    def get_value(self, line: int) -> Value:
        high = self.chip.physical[line]
        return Value.ACTIVE if high != self.config[line].active_low else Value.INACTIVE

    def set_value(self, line: int, value: Value) -> None:
        assert not self.released
        assert self.config[line].direction == Direction.OUTPUT
        self.chip.physical[line] = (value == Value.ACTIVE) != self.config[line].active_low
        self.chip.history.append((line, self.chip.physical[line]))

    def edge(self, line: int, timestamp_ns: int, rising: bool = True) -> None:
        kind = gpiod.EdgeEvent.Type.RISING_EDGE if rising else gpiod.EdgeEvent.Type.FALLING_EDGE
        self.events.append(gpiod.EdgeEvent(kind.value, timestamp_ns, line, len(self.events) + 1, 0))
        os.write(self._write_fd, b"e")

    def read_edge_events(self, max_events: int | None = None) -> list[gpiod.EdgeEvent]:
        os.read(self.read_fd, 4096)
        events, self.events = self.events, []
        return events

    def release(self) -> None:
        self.released = True
        os.close(self.read_fd)
        os.close(self._write_fd)


class FakeChip:
    def __init__(self, names: dict[str, int], lines: int = 8, busy: bool = False) -> None:
        self.names, self.lines, self.busy = names, lines, busy
        self.physical: dict[int, bool] = dict.fromkeys(range(lines), False)
        self.history: list[tuple[int, bool]] = []
        self.requests: list[FakeRequest] = []
        self.opened: list[str] = []

    def __call__(self, path: str) -> FakeChip:
        self.opened.append(path)
        return self

    def __enter__(self) -> FakeChip:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def line_offset_from_id(self, id: int | str) -> int:
        if isinstance(id, int):
            if id >= self.lines:
                raise ValueError("invalid offset")
            return id
        if id not in self.names:
            raise FileNotFoundError(2, "No such file or directory")
        return self.names[id]

    def request_lines(self, config: dict[Any, Any], consumer: str | None = None, event_buffer_size: int | None = None,
                      output_values: dict[Any, Any] | None = None) -> FakeRequest:
        if self.busy:
            raise OSError(16, "Device or resource busy")
        request = FakeRequest(self, config, output_values)
        self.requests.append(request)
        return request


async def test_levels_respect_active_low_and_the_chip_is_found_by_name() -> None:
    chip = FakeChip({"DOOR": 4})
    sensor = GpioInputs("io", "gpiochip1", [InputLine("door", "DOOR"), InputLine("alarm", 5, active_low=True)],
                        opener=chip)
    chip.physical[4] = True
    assert [(r.metric, r.value) for r in sensor.read(1.0)] == [("io.door", 1.0), ("io.alarm", 1.0)]
    chip.physical[5] = True
    assert [r.value for r in sensor.read(2.0)] == [1.0, 0.0]
    assert chip.opened == ["/dev/gpiochip1"]
    settings = chip.requests[0].config[4]
    assert settings.direction == Direction.INPUT
    assert settings.edge_detection == Edge.NONE
    sensor.close()
    assert chip.requests[0].released


async def test_counter_counts_debounced_edges_per_interval() -> None:
    chip = FakeChip({})
    sensor = GpioInputs("water", "/dev/gpiochip0", [InputLine("pulses", 3, mode="counter", debounce_ms=10)],
                        opener=chip)
    sensor.open()
    request = chip.requests[0]
    assert request.config[3].edge_detection == Edge.RISING
    assert request.config[3].debounce_period.total_seconds() == pytest.approx(0.010)  # the kernel debounces too
    for t in (0, 2 * MS, 20 * MS, 25 * MS, 100 * MS):  # 2 ms and 25 ms are contact bounce
        request.edge(3, t)
    await wait_until(lambda: sensor.bounces >= 2, "the loop reads the edges (its fd became readable)")
    assert sensor.read(1.0)[0].value == 3.0
    assert sensor.read(2.0)[0].value == 0.0  # pulses since the previous read
    request.edge(3, 200 * MS)
    await wait_until(lambda: sensor.read(3.0)[0].value == 1.0, "one more pulse")
    sensor.close()


async def test_unknown_line_and_busy_line_are_errors_that_say_so() -> None:
    with pytest.raises(GpioError, match=r"/dev/gpiochip0 has no line 'PUMP'"):
        GpioInputs("io", "gpiochip0", [InputLine("p", "PUMP")], opener=FakeChip({})).read(0.0)
    with pytest.raises(GpioError, match="Device or resource busy"):
        GpioInputs("io", "gpiochip0", [InputLine("p", 1)], opener=FakeChip({}, busy=True)).read(0.0)
    with pytest.raises(GpioError, match="listed twice"):
        GpioInputs("io", "gpiochip0", [InputLine("a", 1), InputLine("b", "B")], opener=FakeChip({"B": 1})).read(0.0)


async def test_outputs_start_idle_set_and_return_to_idle_at_close() -> None:
    chip = FakeChip({"RELAY": 6})
    outputs = GpioOutputs("gpiochip0", [OutputLine("relay", "RELAY"), OutputLine("lamp", 7, idle=True)], opener=chip)
    outputs.open()
    assert chip.physical[6] is False
    assert chip.physical[7] is True
    outputs.set("relay", True)
    outputs.set("lamp", False)
    assert (chip.physical[6], chip.physical[7]) == (True, False)
    outputs.close()
    assert (chip.physical[6], chip.physical[7]) == (False, True)
    assert chip.requests[0].released
    with pytest.raises(GpioError, match="no output line 'pump'; outputs: relay, lamp"):
        outputs.set("pump", True)


async def test_pulse_returns_to_idle_also_when_cancelled() -> None:
    chip = FakeChip({})
    outputs = GpioOutputs("gpiochip0", [OutputLine("relay", 2, active_low=True)], opener=chip)
    await outputs.pulse("relay", 0.01)
    assert [level for line, level in chip.history if line == 2] == [True, False, True]  # active low: idle is high
    task = asyncio.create_task(outputs.pulse("relay", 60.0))
    await wait_until(lambda: not chip.physical[2], "the pulse starts")
    with pytest.raises(GpioError, match="already pulsing"):
        await outputs.pulse("relay", 1.0)
    task.cancel()
    await asyncio.wait([task])
    assert chip.physical[2] is True
    with pytest.raises(GpioError, match="at most 3600"):
        await outputs.pulse("relay", 7200.0)
    outputs.close()
