"""GPIO against the kernel's gpio-sim (configfs): real character-device lines, real edges.

Skipped, with the reason printed, where the kernel has no gpio-sim (CONFIG_GPIO_SIM, configfs
mounted at /sys/kernel/config): containers and most CI machines. tests/unit/test_unit_gpio.py
covers the same at the gpiod boundary everywhere."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.field import wait_until

GPIO_SIM = Path("/sys/kernel/config/gpio-sim")

if not GPIO_SIM.is_dir():
    reason = f"{GPIO_SIM} does not exist: this kernel has no gpio-sim (or configfs is not mounted)"
    print(f"test_gpio_sim skipped: {reason}")  # also in -q output, where a skip reason is easy to miss
    pytest.skip(reason, allow_module_level=True)
gpiod = pytest.importorskip("gpiod", reason="the gpio extra (gpiod) is not installed")

from edge_agent.sense.field.gpio import GpioInputs, GpioOutputs, InputLine, OutputLine  # noqa: E402


class SimChip:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.chip = (folder / "bank0" / "chip_name").read_text().strip()
        device = (folder / "dev_name").read_text().strip()
        self.lines = Path("/sys/devices/platform") / device / self.chip

    def pull(self, offset: int, up: bool) -> None:
        """Drive an input line from the outside, as a contact would."""
        (self.lines / f"sim_gpio{offset}" / "pull").write_text("pull-up" if up else "pull-down")

    def value(self, offset: int) -> int:
        """What an output line is driven to."""
        return int((self.lines / f"sim_gpio{offset}" / "value").read_text())


@pytest.fixture
def sim() -> Iterator[SimChip]:
    folder = GPIO_SIM / f"edgefleet-{os.getpid()}"
    bank = folder / "bank0"
    bank.mkdir(parents=True)
    (bank / "num_lines").write_text("8")
    (folder / "live").write_text("1")
    try:
        yield SimChip(folder)
    finally:
        (folder / "live").write_text("0")
        bank.rmdir()
        folder.rmdir()


async def test_levels_counters_and_outputs_on_gpio_sim(sim: SimChip) -> None:
    sensor = GpioInputs("io", sim.chip, [InputLine("door", 0), InputLine("pulses", 1, mode="counter", debounce_ms=1)])
    sensor.open()
    try:
        sim.pull(0, up=True)
        assert sensor.read(1.0)[0].value == 1.0
        for _ in range(3):
            sim.pull(1, up=True)
            await asyncio.sleep(0.05)  # longer than the 1 ms debounce: three separate pulses
            sim.pull(1, up=False)
            await asyncio.sleep(0.05)
        total = 0.0

        def counted() -> bool:
            nonlocal total
            total += sensor.read(2.0)[1].value
            return total >= 3

        await wait_until(counted, "three pulses counted")
        assert total == 3
    finally:
        sensor.close()
    outputs = GpioOutputs(sim.chip, [OutputLine("relay", 2)])
    outputs.open()
    try:
        assert sim.value(2) == 0
        task = asyncio.create_task(outputs.pulse("relay", 60.0))
        await wait_until(lambda: sim.value(2) == 1, "the pulse drives the line")
        task.cancel()
        await asyncio.wait([task])
        assert sim.value(2) == 0
    finally:
        outputs.close()
