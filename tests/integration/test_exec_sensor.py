"""`kind = "exec"` against real programs that behave and that misbehave."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edge_agent.sense.field.base import SensorHealth
from edge_agent.sense.field.exec import MAX_LINE_BYTES, ExecProgram
from edge_agent.sense.sensors import Reading, SensorError
from edgefleet.mqtt.reconnect import Backoff
from tests.support.field import WAIT_S, Collected, wait_until

PY = sys.executable


def health_of(program: ExecProgram) -> SensorHealth:
    return SensorHealth(program.name, program.kind, lambda kind, body: None)


@asynccontextmanager
async def running(program: ExecProgram, sink: Collected,
                  health: SensorHealth | None = None) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(program.run(health or health_of(program), sink))
    try:
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait([task])


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "program.py"
    path.write_text(body)
    return [PY, "-u", str(path)]


async def test_json_and_line_protocol_lines_become_readings(tmp_path: Path) -> None:
    argv = script(tmp_path, """
import sys, time
print('{"temp": 21.5, "ts": 1700000000.5}')
print('ble,addr=aa:bb rssi=-70i,battery=87.5 1700000001000000000')
sys.stdout.flush()
time.sleep(60)
""")
    sink = Collected()
    async with running(ExecProgram("ble", argv), sink):
        readings = await sink.until(3)
    assert readings == [
        Reading("ble.temp", 1700000000.5, 21.5),
        Reading("ble.ble_rssi", 1700000001.0, -70.0),
        Reading("ble.ble_battery", 1700000001.0, 87.5),
    ]


async def test_garbage_and_string_fields_are_counted_logged_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    argv = script(tmp_path, """
import time
print('not a reading at all')
print('m,host=a state="open" 1700000000000000000')
print('{"temp": "warm"}')
print('{"temp": 3}')
time.sleep(60)
""")
    sink = Collected()
    program = ExecProgram("x", argv, clock=lambda: 42.0)
    health = health_of(program)
    with caplog.at_level(logging.DEBUG):
        async with running(program, sink, health):
            assert await sink.until(1) == [Reading("x.temp", 42.0, 3.0)]
    assert health.rejected == 3
    assert health.reads == 1
    skipped = [r for r in caplog.records if "skipped a value" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(skipped) == 3  # three different reasons, each once
    assert "is a string" in caplog.text


async def test_a_ten_megabyte_line_is_discarded_without_holding_it(tmp_path: Path) -> None:
    argv = script(tmp_path, """
import sys, time
sys.stdout.write('x' * (10 * 1024 * 1024))
sys.stdout.write('\\n{"after": 1}\\n')
sys.stdout.flush()
time.sleep(60)
""")
    sink = Collected()
    program = ExecProgram("big", argv)
    health = health_of(program)
    tracemalloc.start()
    try:
        async with running(program, sink, health):
            assert [r.metric for r in await sink.until(1)] == ["big.after"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert program.oversized == 1
    assert health.rejected == 1
    assert peak < 8 * MAX_LINE_BYTES + 2 * 1024 * 1024  # a few chunks, never the 10 MB line


async def test_a_program_exiting_in_a_loop_is_restarted_with_growing_pauses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    argv = script(tmp_path, "import sys; print('{\"n\": 1}'); sys.exit(3)\n")
    starts: list[float] = []
    sink = Collected()

    def record(batch: list[Reading]) -> None:
        starts.append(time.monotonic())
        sink(batch)

    backoff = Backoff(initial=0.2, maximum=1.6, stable_after=30.0, rng=random.Random(7))
    program = ExecProgram("loop", argv, backoff=backoff)
    health = health_of(program)
    with caplog.at_level(logging.DEBUG):
        task = asyncio.create_task(program.run(health, record))
        try:
            await sink.until(5)
        finally:
            task.cancel()
            await asyncio.wait([task])
    assert "exited with code 3" in program.last_error
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Equal jitter: the n-th pause is at least half of min(1.6, 0.2 * 2**(n-1)).
    for n, gap in enumerate(gaps, start=1):
        assert gap >= min(1.6, 0.2 * 2 ** (n - 1)) / 2, gaps
    assert health.errors >= 4
    assert health.state == "failing"  # printing a line between crashes is not a recovery
    assert "recovered" not in caplog.text
    warnings = [r for r in caplog.records if "is failing" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # then DEBUG: a program that keeps exiting does not flood the log


async def test_a_program_that_cannot_start_is_retried_not_fatal(tmp_path: Path) -> None:
    backoff = Backoff(initial=0.05, maximum=0.1, stable_after=30.0)
    program = ExecProgram("none", [str(tmp_path / "missing")], backoff=backoff)
    task = asyncio.create_task(program.run(health_of(program), Collected()))
    try:
        await wait_until(lambda: backoff.failures >= 3, "three failed starts")
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert "could not be started" in program.last_error
    assert program.starts == 0


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_stopping_kills_a_program_that_ignores_sigterm_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    argv = script(tmp_path, f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", code])
open({str(pidfile)!r}, "w").write(str(child.pid))
print('{{"up": 1}}', flush=True)
time.sleep(600)
""")
    sink = Collected()
    program = ExecProgram("stubborn", argv)
    async with running(program, sink):
        await sink.until(1)
        leader = program.pid
        assert leader is not None
        child = int(pidfile.read_text())
        assert _alive(leader)
        assert _alive(child)
    # SIGKILL is asynchronous: the kernel tears the processes down soon after.
    await wait_until(lambda: not _alive(leader) and not _alive(child), "the program and its child are gone")


async def test_stderr_goes_to_the_log_rate_limited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = script(tmp_path, """
import sys, time
for i in range(100):
    sys.stderr.write(f'warning {i}\\n')
sys.stderr.flush()
print('{"done": 1}', flush=True)
time.sleep(60)
""")
    sink = Collected()
    program = ExecProgram("noisy", argv)
    with caplog.at_level(logging.INFO, logger="edge_agent.sense.exec"):
        async with running(program, sink):
            await sink.until(1)
            await wait_until(lambda: program.stderr_dropped >= 80, "80 stderr lines left out")
    logged = [r.getMessage() for r in caplog.records if "stderr:" in r.getMessage()]
    assert logged[0] == "noisy stderr: warning 0"
    assert len(logged) == 20


async def test_probe_answers_with_the_first_reading_set_or_says_why_not(tmp_path: Path) -> None:
    good = script(tmp_path, "import time\nprint('{\"v\": 7}', flush=True)\ntime.sleep(600)\n")
    assert [r.value for r in await ExecProgram("p", good).probe()] == [7.0]
    (tmp_path / "bad.py").write_text("print('v=oops')\n")
    with pytest.raises(SensorError, match=r"exited with code 0 before printing a reading; its lines did not parse"):
        await ExecProgram("p", [PY, str(tmp_path / "bad.py")]).probe()
