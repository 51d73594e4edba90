"""Leadership among hub replicas: one leader, takeover after the TTL, a clean hand-over, work run only while leading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.db.store import HubStore
from hub.region.leadership import Leadership

TTL, RENEW = 10.0, 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[HubStore, HubStore]]:
    a, b = await HubStore.open(tmp_path / "hub.db"), await HubStore.open(tmp_path / "hub.db")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_one_leader_and_a_takeover_only_after_the_ttl(stores: tuple[HubStore, HubStore]) -> None:
    clock = Clock()
    a = Leadership(stores[0], "hub.r", ttl_s=TTL, renew_s=RENEW, clock=clock)
    b = Leadership(stores[1], "hub.r.b", ttl_s=TTL, renew_s=RENEW, clock=clock)
    assert await a.renew()
    assert not await b.renew()
    assert b.leader == "hub.r"
    clock.now += TTL - 0.1  # a stops renewing (killed); its row is still valid
    assert not await b.renew()
    clock.now += 0.2
    assert await b.renew()  # expired: b takes over
    assert not await a.renew()  # a, back (or un-hung), follows instead of leading beside b
    assert (a.leading, b.leading, a.leader) == (False, True, "hub.r.b")


async def test_a_restarted_leader_takes_its_row_back_at_once(stores: tuple[HubStore, HubStore]) -> None:
    clock = Clock()
    assert await Leadership(stores[0], "hub.r", clock=clock).renew()
    clock.now += 1
    assert await Leadership(stores[1], "hub.r", clock=clock).renew()  # the same name: no TTL to wait out


async def test_a_clean_stop_hands_over_at_once_and_leaves_a_trace(stores: tuple[HubStore, HubStore]) -> None:
    a = Leadership(stores[0], "hub.r", ttl_s=TTL, renew_s=0.01)
    b = Leadership(stores[1], "hub.r.b", ttl_s=TTL, renew_s=0.01)
    run = asyncio.create_task(a.run())
    async with asyncio.timeout(5):
        await a.until_leading()
    assert not await b.renew()
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert await b.renew()  # long before the TTL
    assert [tuple(r) for r in await stores[0].query("SELECT holder FROM leadership")] == [("hub.r.b",)]


async def test_work_runs_while_leading_and_is_cancelled_when_the_lead_is_lost(
        stores: tuple[HubStore, HubStore]) -> None:
    clock = Clock()
    a = Leadership(stores[0], "hub.r", ttl_s=TTL, renew_s=RENEW, clock=clock)
    b = Leadership(stores[1], "hub.r.b", ttl_s=TTL, renew_s=RENEW, clock=clock)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = asyncio.create_task(a.while_leading(work))
    try:
        await asyncio.sleep(0)
        assert not started.is_set()  # not leading yet: nothing runs
        await a.renew()
        async with asyncio.timeout(5):
            await started.wait()
        clock.now += TTL + 1
        assert await b.renew()
        await a.renew()  # a learns it lost the lead
        async with asyncio.timeout(5):
            await cancelled.wait()
        assert not runner.done()  # waiting to lead again
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_an_error_of_the_work_propagates(stores: tuple[HubStore, HubStore]) -> None:
    a = Leadership(stores[0], "hub.r")

    async def broken() -> None:
        raise RuntimeError("bug")

    await a.renew()
    with pytest.raises(RuntimeError, match="bug"):
        async with asyncio.timeout(5):
            await a.while_leading(broken)
