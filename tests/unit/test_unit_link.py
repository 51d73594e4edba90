"""Link: what ends one connection (and is retried) versus what ends the link (a bug)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from edgefleet.errors import ConnectionLost, ConnectRefused
from edgefleet.mqtt.link import Link
from edgefleet.mqtt.reconnect import Backoff


class FakeSession:
    """Connects at once and stays open until closed: the transport is not under test here."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    async def connect(self) -> None:
        return None

    async def wait_closed(self) -> str:
        await self._closed.wait()
        return "closed"

    async def close(self, **_: Any) -> None:
        self._closed.set()


@contextlib.asynccontextmanager
async def running(link: Link) -> AsyncIterator[asyncio.Task[None]]:
    runner = asyncio.create_task(link.run())
    try:
        yield runner
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def grouped(exc: Exception) -> None:
    """Work with its own TaskGroup (like the hub's ingest and rollout loops) in which one task fails."""
    async def fail() -> None:
        raise exc

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(fail())
        tasks.create_task(asyncio.sleep(3600))


async def test_a_connection_lost_inside_a_task_group_is_retried_not_fatal() -> None:
    attempts: list[int] = []
    third = asyncio.Event()

    async def work(_session: Any) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            await grouped(ConnectionLost("broker went away"))
        third.set()
        await asyncio.sleep(3600)

    link = Link("test", FakeSession, work, backoff=Backoff(initial=0.01, maximum=0.02))  # type: ignore[arg-type]
    async with running(link) as runner:
        async with asyncio.timeout(5):
            await third.wait()
        assert not runner.done()
        assert "broker went away" in link.last_error


async def test_a_bug_inside_a_task_group_still_ends_the_link() -> None:
    async def work(_session: Any) -> None:
        await grouped(ValueError("a bug"))

    link = Link("test", FakeSession, work, backoff=Backoff(initial=0.01, maximum=0.02))  # type: ignore[arg-type]
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.timeout(5):
            await link.run()
    assert caught.group_contains(ValueError, match="a bug")


async def test_a_planned_restart_reconnects_at_once_without_counting_a_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    sessions: list[FakeSession] = []
    second = asyncio.Event()

    def factory() -> FakeSession:
        sessions.append(FakeSession())
        return sessions[-1]

    async def work(_session: Any) -> None:
        if len(sessions) == 2:
            second.set()
        await asyncio.sleep(3600)

    # A backoff this long would show: a restart must not wait for it.
    link = Link("test", factory, work, backoff=Backoff(initial=60.0, maximum=60.0))  # type: ignore[arg-type]
    async with running(link):
        async with asyncio.timeout(5):
            await link.connected.wait()
            with caplog.at_level("INFO"):
                link.restart("switching to the renewed certificate")
                await second.wait()
        assert sessions[0]._closed.is_set()  # the first connection was closed, not left behind
        assert link.backoff.failures == 0
        assert "switching to the renewed certificate; connecting again now" in caplog.text
        assert "retrying" not in caplog.text


async def test_a_refusal_the_hook_answers_with_another_identity_is_retried_at_once() -> None:
    attempts: list[int] = []
    connected = asyncio.Event()

    class Refused(FakeSession):
        async def connect(self) -> None:
            raise ConnectRefused("TLS: the broker rejected this certificate", auth=True)

    def factory() -> FakeSession:
        attempts.append(1)
        return Refused() if len(attempts) == 1 else FakeSession()

    async def work(_session: Any) -> None:
        connected.set()
        await asyncio.sleep(3600)

    link = Link("test", factory, work, on_refused=lambda _exc: True)  # type: ignore[arg-type]
    async with running(link):
        async with asyncio.timeout(5):  # the refused identity's 60 s wait would not fit
            await connected.wait()
        assert len(attempts) == 2
