"""Link: what ends one connection (and is retried) versus what ends the link (a bug)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edge_agent.errors import ConnectionLost
from edge_agent.link import Link
from edge_agent.reconnect import Backoff


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
    runner = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(5):
            await third.wait()
        assert not runner.done()
        assert "broker went away" in link.last_error
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_bug_inside_a_task_group_still_ends_the_link() -> None:
    async def work(_session: Any) -> None:
        await grouped(ValueError("a bug"))

    link = Link("test", FakeSession, work, backoff=Backoff(initial=0.01, maximum=0.02))  # type: ignore[arg-type]
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.timeout(5):
            await link.run()
    assert caught.group_contains(ValueError, match="a bug")
