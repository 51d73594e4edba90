"""GPIO through the kernel's character device and libgpiod v2 (`gpiod`, the `edgefleet[gpio]` extra).

Inputs are read as levels (1 = active) or counted as edges (pulse meters: water, gas, energy),
with debounce both in the kernel (the line's debounce period) and here, on the events' kernel
timestamps, so a bouncing contact counts once even on a chip that cannot debounce. A counter
reports the pulses counted since its previous read: sums over any window are right, and an agent
restart loses only the pulses that came while it was down.

Outputs (actuators) are set, or pulsed for a duration; a pulse always ends on the idle level,
also when it is cancelled or the agent stops. `gpiod` is imported only when a chip is opened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from edge_agent.sense.field.base import FieldContext, FieldSensor, Reject, SensorHealth, run_polled
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.policy.field import GpioSensorSpec

if TYPE_CHECKING:  # the types only; the module is imported when a chip is opened
    import gpiod

log = logging.getLogger("edge_agent.sense.gpio")

CONSUMER: Final = "edge-agent"  # what `gpioinfo` shows as the user of our lines
EVENT_BUFFER: Final = 256  # edge events the kernel holds for us between two reads of the fd
DEFAULT_DEBOUNCE_MS: Final = 10.0  # reed contacts of water and gas meters bounce for a few ms
MAX_PULSE_S: Final = 3600.0  # a relay pulse longer than an hour is a "set", not a pulse
Mode = Literal["level", "counter"]
EdgeKind = Literal["rising", "falling", "both"]
BiasKind = Literal["as-is", "pull-up", "pull-down", "disabled"]
LineId = int | str  # an offset on the chip, or the line's name from the device tree


class GpioError(SensorError):
    """A chip or line that cannot be opened or driven; the message says which and why."""


# --- the few gpiod calls we make (a unit test fakes exactly these) --------------------------------


class LineRequestLike(Protocol):
    @property
    def fd(self) -> int: ...
    def get_value(self, line: int) -> gpiod.line.Value: ...
    def set_value(self, line: int, value: gpiod.line.Value) -> None: ...
    def read_edge_events(self, max_events: int | None = None) -> list[gpiod.EdgeEvent]: ...
    def release(self) -> None: ...


class ChipLike(Protocol):
    def __enter__(self) -> ChipLike: ...
    def __exit__(self, *exc: object) -> None: ...
    def line_offset_from_id(self, id: LineId) -> int: ...  # gpiod's own parameter name
    def request_lines(self, config: dict[Any, Any], consumer: str | None = None,
                      event_buffer_size: int | None = None,
                      output_values: dict[Any, Any] | None = None) -> LineRequestLike: ...


ChipOpener = Callable[[str], ChipLike]


def _gpiod() -> Any:
    try:
        import gpiod  # heavy and optional: only an agent with GPIO lines loads it
    except ImportError:
        raise GpioError("GPIO needs the gpiod package: install edgefleet[gpio]") from None
    return gpiod


def open_chip(path: str) -> ChipLike:
    chip: ChipLike = _gpiod().Chip(path)
    return chip


def chip_path(chip: str) -> str:
    """`gpiochip0` or `/dev/gpiochip0`."""
    return chip if chip.startswith("/") else f"/dev/{chip}"


def _resolve(chip: ChipLike, lines: Iterable[LineId], path: str) -> list[int]:
    offsets = []
    for line in lines:
        try:
            offsets.append(chip.line_offset_from_id(line))
        except (OSError, ValueError) as exc:
            raise GpioError(f"{path} has no line {line!r}: {exc}") from None
    return offsets


def _request(path: str, opener: ChipOpener, lines: Sequence[LineId],
             settings: Callable[[int], Any], output_values: Callable[[int], Any] | None = None,
             ) -> tuple[LineRequestLike, list[int]]:
    try:
        with opener(path) as chip:
            offsets = _resolve(chip, lines, path)
            if len(set(offsets)) != len(offsets):
                raise GpioError(f"{path}: a line is listed twice ({', '.join(map(str, lines))})")
            config = {offset: settings(index) for index, offset in enumerate(offsets)}
            values = {offset: output_values(index) for index, offset in enumerate(offsets)} if output_values else None
            return chip.request_lines(config, consumer=CONSUMER, event_buffer_size=EVENT_BUFFER,
                                      output_values=values), offsets
    except OSError as exc:  # no such chip, permission denied, a line busy with another user
        raise GpioError(f"cannot request lines {', '.join(map(str, lines))} of {path}: "
                        f"{exc.strerror or exc}") from None


# --- inputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputLine:
    point: str
    line: LineId
    mode: Mode = "level"
    edge: EdgeKind = "rising"  # which edges a counter counts
    bias: BiasKind = "as-is"
    active_low: bool = False
    debounce_ms: float = DEFAULT_DEBOUNCE_MS


class GpioInputs:
    """The input lines of one chip as one sensor: levels read at each poll, edges counted as they come."""

    kind = "gpio"

    def __init__(self, name: str, chip: str, lines: Sequence[InputLine], *, interval: float = 5.0,
                 opener: ChipOpener = open_chip, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self._clock = clock
        self.interval = interval
        self._path = chip_path(chip)
        self._lines = list(lines)
        self._opener = opener
        self._request: LineRequestLike | None = None
        self._offsets: list[int] = []
        self._counts: dict[int, int] = {}
        self._last_edge_ns: dict[int, int] = {}
        self._debounce_ns: dict[int, int] = {}
        self.bounces = 0  # edges inside a debounce period, not counted

    @property
    def is_open(self) -> bool:
        return self._request is not None

    def open(self) -> None:
        """Request the lines and start counting edges on the running loop."""
        if self._request is not None:
            return
        gpiod = _gpiod()
        from gpiod.line import Bias, Direction, Edge  # with gpiod, only when used

        edges = {"rising": Edge.RISING, "falling": Edge.FALLING, "both": Edge.BOTH}
        biases = {"as-is": Bias.AS_IS, "pull-up": Bias.PULL_UP, "pull-down": Bias.PULL_DOWN,
                  "disabled": Bias.DISABLED}

        def settings(index: int) -> Any:
            spec = self._lines[index]
            counter = spec.mode == "counter"
            return gpiod.LineSettings(
                direction=Direction.INPUT, bias=biases[spec.bias], active_low=spec.active_low,
                edge_detection=edges[spec.edge] if counter else Edge.NONE,
                debounce_period=timedelta(milliseconds=spec.debounce_ms) if counter else timedelta(0),
            )

        request, offsets = _request(self._path, self._opener, [s.line for s in self._lines], settings)
        self._request, self._offsets = request, offsets
        for spec, offset in zip(self._lines, offsets, strict=True):
            if spec.mode == "counter":
                self._counts[offset] = 0
                self._debounce_ns[offset] = int(spec.debounce_ms * 1e6)
        if self._counts:
            asyncio.get_running_loop().add_reader(request.fd, self._on_edges)

    def close(self) -> None:
        request, self._request = self._request, None
        if request is None:
            return
        if self._counts:
            asyncio.get_running_loop().remove_reader(request.fd)
        request.release()

    def _on_edges(self) -> None:
        if self._request is None:
            return
        for event in self._request.read_edge_events():
            offset = event.line_offset
            last = self._last_edge_ns.get(offset)
            if last is not None and event.timestamp_ns - last < self._debounce_ns.get(offset, 0):
                self.bounces += 1
                continue
            self._last_edge_ns[offset] = event.timestamp_ns
            if offset in self._counts:
                self._counts[offset] += 1

    def read(self, now: float, reject: Reject | None = None) -> list[Reading]:
        if self._request is None:
            self.open()
        assert self._request is not None
        readings: list[Reading] = []
        for spec, offset in zip(self._lines, self._offsets, strict=True):
            if spec.mode == "counter":
                readings.append(Reading(f"{self.name}.{spec.point}", now, float(self._counts[offset])))
                self._counts[offset] = 0
            else:
                try:
                    value = self._request.get_value(offset)
                except OSError as exc:
                    self.close()  # requested again at the next read
                    raise GpioError(f"cannot read line {spec.line!r} of {self._path}: {exc.strerror or exc}") from None
                readings.append(Reading(f"{self.name}.{spec.point}", now, 1.0 if value.value else 0.0))
        return readings

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        try:
            await run_polled(self.read, self.interval, health, emit, self._clock)
        finally:
            self.close()

    async def probe(self) -> list[Reading]:
        """Open the lines and read them once, for `edge-agent check`; GpioError says what is wrong."""
        try:
            return self.read(self._clock())
        finally:
            self.close()


# --- outputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputLine:
    point: str
    line: LineId
    idle: bool = False  # the level it is set to at start, after a pulse and at stop
    active_low: bool = False


class GpioOutputs:
    """Output lines of one chip, held for as long as the agent runs; always left on their idle level."""

    def __init__(self, chip: str, lines: Sequence[OutputLine], *, opener: ChipOpener = open_chip) -> None:
        self._path = chip_path(chip)
        self._lines = {spec.point: spec for spec in lines}
        self._opener = opener
        self._request: LineRequestLike | None = None
        self._offsets: dict[str, int] = {}
        self._pulsing: set[str] = set()

    @property
    def points(self) -> list[str]:
        return list(self._lines)

    def open(self) -> None:
        if self._request is not None:
            return
        gpiod = _gpiod()
        from gpiod.line import Direction  # with gpiod, only when used

        specs = list(self._lines.values())
        request, offsets = _request(
            self._path, self._opener, [s.line for s in specs],
            lambda i: gpiod.LineSettings(direction=Direction.OUTPUT, active_low=specs[i].active_low),
            lambda i: self._level(specs[i].idle),
        )
        self._request = request
        self._offsets = {spec.point: offset for spec, offset in zip(specs, offsets, strict=True)}

    def close(self) -> None:
        """Every line back to idle, then released."""
        request, self._request = self._request, None
        if request is None:
            return
        try:
            for point, offset in self._offsets.items():
                request.set_value(offset, self._level(self._lines[point].idle))
        finally:
            request.release()

    def set(self, point: str, active: bool) -> None:
        """Drive `point` active (True) or inactive; GpioError if it cannot."""
        spec = self._lines.get(point)
        if spec is None:
            raise GpioError(f"no output line {point!r}; outputs: {', '.join(self._lines) or 'none'}")
        self.open()
        assert self._request is not None
        try:
            self._request.set_value(self._offsets[point], self._level(active))
        except OSError as exc:
            raise GpioError(f"cannot set line {spec.line!r} of {self._path}: {exc.strerror or exc}") from None

    async def pulse(self, point: str, seconds: float) -> None:
        """Drive `point` away from its idle level for `seconds`, then back, whatever happens meanwhile."""
        spec = self._lines.get(point)
        if spec is None:
            raise GpioError(f"no output line {point!r}; outputs: {', '.join(self._lines) or 'none'}")
        if not 0 < seconds <= MAX_PULSE_S:
            raise GpioError(f"a pulse lasts more than 0 and at most {MAX_PULSE_S:g} s, not {seconds}")
        if point in self._pulsing:
            raise GpioError(f"line {point!r} is already pulsing")
        self._pulsing.add(point)
        try:
            self.set(point, not spec.idle)
            await asyncio.sleep(seconds)
        finally:
            self._pulsing.discard(point)
            if self._request is not None:
                self.set(point, spec.idle)  # also on cancel: a relay is never left on

    @staticmethod
    def _level(active: bool) -> Any:
        from gpiod.line import Value  # with gpiod, only when used

        return Value.ACTIVE if active else Value.INACTIVE



def build(specs: Sequence[GpioSensorSpec], context: FieldContext) -> list[FieldSensor]:
    return [
        GpioInputs(spec.name, spec.chip, [
            InputLine(line.name, line.line, line.mode, line.edge, line.bias, line.active_low, line.debounce_ms)
            for line in spec.lines
        ], interval=spec.interval_s, clock=context.clock)
        for spec in specs
    ]
