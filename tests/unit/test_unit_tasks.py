"""Owned tasks: a daemon's spawned work is logged when it fails and cancelled when its owner stops;
run_until_signal stops a daemon's main loop on SIGTERM or SIGINT (real signals to this process)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_settings
from edgefleet.runtime.lifecycle import run_until_signal
from edgefleet.runtime.sdnotify import NOTIFY_SOCKET_ENV, STOPPING
from edgefleet.runtime.tasks import TaskSet

WAIT: Final = 10.0  # bound on every wait here; generous, the machine is shared

log = logging.getLogger("test_tasks")


class Boom(Exception):
    pass


async def fail_soon() -> None:
    await asyncio.sleep(0)
    raise Boom("the job failed")


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info and r.exc_info[0] is Boom]


# --- TaskSet -------------------------------------------------------------------------------


async def test_a_failing_task_is_logged_once_at_error_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("owner", log)
    task = tasks.spawn(fail_soon(), name="audit")
    await asyncio.wait_for(asyncio.wait([task]), WAIT)
    await asyncio.sleep(0)  # the done callbacks run
    [record] = failures(caplog)
    assert "owner: audit failed" in record.getMessage()
    assert len(tasks) == 0  # not kept once ended
    await tasks.close()
    assert len(failures(caplog)) == 1


async def test_a_quiet_task_is_left_to_its_owner(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("owner", log)
    with pytest.raises(Boom):
        await asyncio.wait_for(tasks.spawn(fail_soon(), name="policy", quiet=True), WAIT)
    await asyncio.sleep(0)
    assert failures(caplog) == []


async def test_close_cancels_and_awaits_what_is_left_latest_first() -> None:
    tasks = TaskSet("owner", log)
    started: list[str] = []
    ended: list[str] = []

    async def job(name: str) -> None:
        started.append(name)
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    for name in ("first", "second", "third"):
        tasks.spawn(job(name), name=name)
    await asyncio.sleep(0)  # each took its first step
    assert started == ["first", "second", "third"]
    await asyncio.wait_for(tasks.close(), WAIT)
    assert ended == ["third", "second", "first"]
    assert len(tasks) == 0


async def test_nothing_starts_once_closed() -> None:
    tasks = TaskSet("owner", log)
    await tasks.close()
    work = fail_soon()
    with pytest.raises(RuntimeError, match="owner is stopping"):
        tasks.spawn(work, name="late")
    assert work.cr_frame is None  # closed, never to run (and no "never awaited" warning)


async def test_first_to_end_returns_the_task_that_ended() -> None:
    tasks = TaskSet("owner", log)
    assert await tasks.first_to_end() is None
    forever = tasks.spawn(asyncio.Event().wait(), name="forever", quiet=True)
    soon = tasks.spawn(asyncio.sleep(0), name="soon", quiet=True)
    assert await asyncio.wait_for(tasks.first_to_end(), WAIT) is soon
    await tasks.close()
    assert forever.cancelled()


# --- the agent owns what it spawns -------------------------------------------------------------

AGENT_TOML = """\
device_id = "dev-1"
profile = "sim"
region = "eu-1"

[broker]
host = "127.0.0.1"

[state]
dir = "state"
"""


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML, encoding="utf-8")
    return path


async def test_a_failing_agent_job_is_logged_and_the_agent_goes_on(agent_toml: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with Agent.open(load_settings(agent_toml), None) as agent:
        agent._spawn(fail_soon(), "bid for task 7")
        await asyncio.wait_for(agent._jobs.drain(), WAIT)  # its failure is logged as it ends
        [record] = failures(caplog)
        assert "bid for task 7 failed" in record.getMessage()
        await agent.outbox.add_event("alert", {"message": "still working", "severity": "info"})
        assert agent.outbox.backlog == 1


async def test_stopping_the_agent_cancels_and_awaits_its_jobs(agent_toml: Path) -> None:
    entered, finished = asyncio.Event(), asyncio.Event()

    async def long_task() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            finished.set()

    agent = await Agent.open(load_settings(agent_toml), None)
    try:
        agent._spawn(long_task(), "task 3")
        await asyncio.wait_for(entered.wait(), WAIT)
    finally:
        await asyncio.wait_for(agent.close(), WAIT)
    assert finished.is_set()  # cancelled and awaited by close(), not left pending for the loop to destroy
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not [t for t in pending if "agent dev-1" in t.get_name()]


# --- run_until_signal ------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET like systemd's, to hear STOPPING=1."""
    folder = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: sun_path holds 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(WAIT)
    monkeypatch.setenv(NOTIFY_SOCKET_ENV, str(folder / "notify"))
    try:
        yield sock
    finally:
        sock.close()
        (folder / "notify").unlink()
        folder.rmdir()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_leaves_then_cancels_the_work(sig: signal.Signals, notify_socket: socket.socket) -> None:
    steps: list[str] = []
    running = asyncio.Event()

    async def work() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise

    async def leave() -> None:
        steps.append("left")

    async def signal_once_running() -> None:
        await running.wait()
        os.kill(os.getpid(), sig)

    sender = asyncio.create_task(signal_once_running())
    await asyncio.wait_for(run_until_signal(work(), leave=leave), WAIT)
    await sender
    assert steps == ["left", "cancelled"]
    assert notify_socket.recv(4096).decode() == STOPPING


async def test_the_works_own_failure_is_raised_and_stopping_sent(notify_socket: socket.socket) -> None:
    left: list[bool] = []

    async def leave() -> None:
        left.append(True)

    with pytest.raises(Boom):
        await asyncio.wait_for(run_until_signal(fail_soon(), leave=leave), WAIT)
    assert left == []  # leaving is for a signal; a failure is raised as it is
    assert notify_socket.recv(4096).decode() == STOPPING


async def test_work_that_ends_by_itself_returns() -> None:
    await asyncio.wait_for(run_until_signal(asyncio.sleep(0)), WAIT)
