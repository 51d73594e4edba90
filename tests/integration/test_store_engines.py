"""The hub's store on both engines: SQLite (a file) and PostgreSQL (a private cluster, tests/support/postgres.py).

The same assertions run against each through `hub.db.interface.HubState`; what only PostgreSQL has
(schema migration by URL, day partitions, the database's clock for leadership) is tested after.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from edgefleet.wire.protocol import LeaseGrant, LeaseRelease, LeaseRequest, Presence
from hub.db.engines import open_store
from hub.db.interface import HubState, StoreError, StoreUnavailable
from hub.db.postgres import DAY_S, SCHEMA_VERSION, PostgresStore
from hub.db.rows import IngestWork
from hub.region.coordination import Coordination, Replies
from hub.region.leadership import Leadership
from tests.support.postgres import PostgresCluster

Opener = Callable[[], Awaitable[HubState]]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens another store on one database: each call is another hub process's connection."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    return lambda: open_store(url, tmp_path / "hub.db")


@pytest.fixture
async def two(opener: Opener) -> AsyncIterator[tuple[HubState, HubState]]:
    a, b = await opener(), await opener()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def rows_of(store: HubState, device: str) -> list[int]:
    return [r.seq async for r in store.telemetry(device=device)]


async def test_registry_certificates_and_presence(two: tuple[HubState, HubState]) -> None:
    a, b = two
    await a.register("d1", "sim", {"site": "x"})
    await a.record_certificate(0xABC, "d1", "device", time_in(days=30))
    assert await b.exists("d1")
    assert not await b.is_revoked("d1")
    assert await b.vouches_for(0xABC, "d1") is True
    assert await b.vouches_for(0xDEF, "d1") is None
    assert await b.apply_presences([("d1", Presence(state="online", session="s1", agent_version="1")),
                                    ("nobody", Presence(state="online", session="s", agent_version="1"))],
                                   time.time()) == [0]
    assert not await b.apply_presence("d1", Presence(state="offline", session="old"), time.time())  # stale will
    [row] = await a.devices("d1")
    assert (row.online, row.tags, row.agent_version) == (True, {"site": "x"}, "1")
    assert row.cert_expires is not None
    assert await a.revoke_device("d1") == 1
    assert await b.is_revoked("d1")
    assert await b.certificate_revoked(0xABC)
    assert [s for s, _ in await b.revoked_serials()] == [0xABC]
    assert await b.registered() == set()


@pytest.mark.parametrize("seed", [1, 2])
async def test_two_replicas_committing_at_once_store_every_reading_once(
        two: tuple[HubState, HubState], seed: int) -> None:
    """One device's batches split at random between two stores committing concurrently, every third
    batch sent twice (a lost ack): the watermark ends at the last seq and every row is there once."""
    rng = random.Random(seed)
    await two[0].register("d1", "sim", {})
    await two[0].register("d2", "sim", {})
    batches = [(d, base, last) for d in ("d1", "d2") for base, last in itertools.pairwise(range(0, 3001, 50))]
    batches += batches[::3]
    rng.shuffle(batches)
    queues: list[list[tuple[str, int, int]]] = [[], []]
    for batch in batches:
        queues[rng.randrange(2)].append(batch)
    acks: dict[str, int] = {}

    async def replica(store: HubState, mine: list[tuple[str, int, int]], name: str) -> None:
        for device, base, last in mine:
            ack = await store.commit_ingest(IngestWork(
                now=time.time(), telemetry=[(device, s, time.time(), "m", float(s)) for s in range(base + 1, last + 1)],
                ranges={device: [(base, last, False)]}, messages=1, hub=name))
            acks[device] = max(acks.get(device, 0), ack[device])
            assert set(range(1, ack[device] + 1)) <= set(await rows_of(store, device))  # acks only what is stored
            await asyncio.sleep(0)

    await asyncio.gather(replica(two[0], queues[0], "hub.r"), replica(two[1], queues[1], "hub.r.b"))
    assert acks == {"d1": 3000, "d2": 3000}
    for device in ("d1", "d2"):
        assert await rows_of(two[1], device) == list(range(1, 3001))  # once each, in order
    assert await two[0].watermarks() == {"d1": 3000, "d2": 3000}


async def test_a_large_cycle_goes_in_once_even_when_resent(two: tuple[HubState, HubState]) -> None:
    """A cycle of many readings (COPY on PostgreSQL) committed twice, by two replicas: stored once."""
    rows = [("d1", s, time.time(), "m", float(s)) for s in range(1, 20_001)]
    acks = await asyncio.gather(*(store.commit_ingest(IngestWork(
        now=time.time(), telemetry=list(rows), ranges={"d1": [(0, 20_000, False)]}, messages=1)) for store in two))
    assert [a["d1"] for a in acks] == [20_000, 20_000]
    assert await rows_of(two[0], "d1") == list(range(1, 20_001))


async def test_a_range_read_comes_in_time_order_then_device_and_seq(two: tuple[HubState, HubState]) -> None:
    """What `edge-hub export` streams: the same rows in the same order from either store."""
    now = time.time()
    stamps = {("d1", 1): now - 30, ("d1", 2): now - 10, ("d2", 1): now - 20, ("d2", 2): now - 10,
              ("d2", 3): now + 5}  # the last: at the range's end, excluded
    for device in ("d1", "d2"):
        mine = sorted((s, ts) for (d, s), ts in stamps.items() if d == device)
        await two[0].commit_ingest(IngestWork(now=now, telemetry=[(device, s, ts, "m", 0.0) for s, ts in mine],
                                              ranges={device: [(0, len(mine), False)]}))
    got = [(r.device, r.seq) async for r in two[1].read_telemetry(now - 60, now + 5)]
    assert got == [("d1", 1), ("d2", 1), ("d1", 2), ("d2", 2)]
    assert [(r.device, r.seq) async for r in two[1].read_telemetry(now - 60, now + 5, "d2")] == [("d2", 1), ("d2", 2)]


async def test_a_seq_used_by_an_event_is_not_stored_again_as_a_reading(two: tuple[HubState, HubState]) -> None:
    a, b = two
    await a.commit_ingest(IngestWork(now=time.time(), events=[("d1", 5, time.time(), "alert", "{}")],
                                     ranges={"d1": [(4, 5, False)]}))
    work = IngestWork(now=time.time(), telemetry=[("d1", s, time.time(), "m", 1.0) for s in range(1, 8)],
                      ranges={"d1": [(0, 7, False)]})
    assert (await b.commit_ingest(work))["d1"] == 7
    assert await rows_of(a, "d1") == [1, 2, 3, 4, 6, 7]
    assert (await a.reject_counts())["seq_conflict"] == 1


async def test_one_leader_among_replicas(two: tuple[HubState, HubState]) -> None:
    a = Leadership(two[0], "hub.r", ttl_s=60.0)
    b = Leadership(two[1], "hub.r.b", ttl_s=60.0)
    results = await asyncio.gather(a.renew(), b.renew())
    assert sorted(results) == [False, True]  # both asked at once: one leads
    leader, follower = (a, b) if a.leading else (b, a)
    assert not await follower.renew()
    assert follower.leader == leader.holder
    assert await leader.renew()
    await two[0 if leader is a else 1].release_leadership("region", leader.holder, time.time())  # a clean stop
    assert await follower.renew()  # takes over at once
    assert not await leader.renew()


async def test_two_replicas_granting_one_lease_at_once_never_pass_its_limit(two: tuple[HubState, HubState]) -> None:
    """Twenty devices ask for a lease of limit 3 through two replicas at once, then release it as they get it:
    never more than 3 holders, every device granted once, fencing tokens 1..20 each given once."""
    a, b = two
    devices = [f"d{i:02}" for i in range(20)]
    for d in devices:
        await a.register(d, "sim", {})
        assert await a.apply_presence(d, Presence(state="online", session="s"), time.time())
    replicas = [Coordination(a, "hub.r"), Coordination(b, "hub.r")]
    granted: dict[str, int] = {}

    def note(replies: Replies) -> list[tuple[str, LeaseGrant]]:
        grants = [(d, m) for d, m in replies.messages if isinstance(m, LeaseGrant)]
        for d, m in grants:
            assert d not in granted
            granted[d] = m.token
        return grants

    asks = [replicas[i % 2].handle([(d, LeaseRequest(id=f"r-{d}", name="L", limit=3, ttl_s=600.0, rule="r",
                                                     policy_version=1))]) for i, d in enumerate(devices)]
    holding = [g for r in await asyncio.gather(*asks) for g in note(r)]
    while holding:
        assert len(holding) <= 3
        assert (await a.query("SELECT COUNT(*) FROM lease_holders WHERE name = 'L'"))[0][0] <= 3
        releases = [replicas[i % 2].handle([(d, LeaseRelease(id=m.id, name="L", token=m.token))])
                    for i, (d, m) in enumerate(holding)]
        holding = [g for r in await asyncio.gather(*releases) for g in note(r)]
    assert sorted(granted) == devices
    assert sorted(granted.values()) == list(range(1, 21))
    assert (await b.query("SELECT last_token FROM leases WHERE name = 'L'"))[0][0] == 20


async def test_hub_events_of_two_replicas_at_once_are_numbered_apart(two: tuple[HubState, HubState]) -> None:
    async def note(store: HubState, i: int) -> None:
        await store.atomically(lambda db: store.hub_event(db, "hub.r", "cert_issued", {"n": i}))

    await asyncio.gather(*(note(two[i % 2], i) for i in range(60)))
    seqs = [e.seq async for e in two[0].events(device="hub.r")]
    assert seqs == list(range(1, 61))


# --- PostgreSQL only -------------------------------------------------------------------


async def test_leadership_expires_on_the_database_clock(postgres_url: str) -> None:
    """The replicas' own clocks are not asked: a holder's row is valid until the database's now() passes it."""
    a, b = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        holder, expires = await a.claim_leadership("region", "hub.r", 0.5, now=0.0)  # a wrong local clock
        assert holder == "hub.r"
        assert abs(expires - time.time()) < 30
        assert (await b.claim_leadership("region", "hub.r.b", 60.0, now=1e12))[0] == "hub.r"  # "1e12" changes nothing
        deadline = time.monotonic() + 30
        while (await b.claim_leadership("region", "hub.r.b", 60.0, now=0.0))[0] != "hub.r.b":
            assert time.monotonic() < deadline, "the expired row was never taken over"
            await asyncio.sleep(0.1)  # waiting for the database's clock to pass the row's expiry
    finally:
        await a.close()
        await b.close()


async def test_an_older_schema_is_migrated_and_keeps_its_rows(postgres_url: str) -> None:
    old = await PostgresStore.open(postgres_url, target=1)
    try:
        assert await old.schema_version() == 1
        await old.register("d1", "sim", {})
        with pytest.raises(asyncpg.UndefinedTableError):
            await old.query("SELECT * FROM leadership")
    finally:
        await old.close()
    store = await PostgresStore.open(postgres_url)
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        assert await store.exists("d1")
        assert (await store.claim_leadership("region", "hub.r", 10.0, 0.0))[0] == "hub.r"
    finally:
        await store.close()


async def test_a_newer_schema_is_refused_and_left_alone(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    await store.query("UPDATE schema_version SET version = ? RETURNING version", (SCHEMA_VERSION + 1,))
    await store.close()
    with pytest.raises(StoreError, match=rf"has schema {SCHEMA_VERSION + 1}, newer than this edge-hub.*upgrade"):
        await PostgresStore.open(postgres_url)
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT version FROM schema_version") == SCHEMA_VERSION + 1
    finally:
        await conn.close()


async def test_replicas_starting_at_once_on_an_empty_database_migrate_it_once(postgres_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(3)))
    try:
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 3
        assert (await stores[0].query("SELECT COUNT(*) FROM schema_version"))[0][0] == 1
    finally:
        for s in stores:
            await s.close()


async def test_retention_drops_whole_old_days_and_never_a_newer_reading(postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    try:
        today = int(time.time() // DAY_S)
        stamps = [(today - 5) * DAY_S + 10, (today - 3) * DAY_S + 10, (today - 2) * DAY_S + 7,
                  today * DAY_S + 1, 5.0]  # the last: a clock never set, in the default partition
        await store.commit_ingest(IngestWork(now=time.time(), telemetry=[
            ("d1", i, float(ts), "m", 0.0) for i, ts in enumerate(stamps, start=1)], ranges={"d1": [(0, 5, False)]}))
        partitions = await store.query("SELECT relname FROM pg_class WHERE relname LIKE 'telemetry_d%'")
        assert {f"telemetry_d{d}" for d in (today - 5, today - 3, today - 2, today)} <= {r[0] for r in partitions}
        limit = (today - 2) * DAY_S + 5  # inside day today-2: that day's partition must stay
        assert await store.prune_telemetry(limit, 1000) == 3
        left = [(r.seq, r.ts) async for r in store.telemetry(device="d1")]
        assert [s for s, _ in left] == [3, 4]
        assert all(ts >= limit for _, ts in left)
        ranged = [r.seq async for r in store.read_telemetry(today * DAY_S, (today + 1) * DAY_S, "d1", None)]
        assert ranged == [4]
    finally:
        await store.close()


async def test_an_unreachable_database_is_a_transient_error_and_the_store_recovers(
        postgres_cluster: PostgresCluster, postgres_url: str) -> None:
    store = await PostgresStore.open(postgres_url)
    try:
        await store.register("d1", "sim", {})
        postgres_cluster.kill()
        with pytest.raises(StoreUnavailable):
            await store.commit_ingest(IngestWork(now=time.time(), telemetry=[("d1", 1, time.time(), "m", 1.0)],
                                                 ranges={"d1": [(0, 1, False)]}))
        postgres_cluster.start_again()
        deadline = time.monotonic() + 60
        while True:
            try:
                ack = await store.commit_ingest(IngestWork(
                    now=time.time(), telemetry=[("d1", 1, time.time(), "m", 1.0)], ranges={"d1": [(0, 1, False)]}))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store never reconnected"
                await asyncio.sleep(0.2)  # the pool's broken connections are replaced on the next attempt
        assert ack == {"d1": 1}
        assert await rows_of(store, "d1") == [1]
    finally:
        await store.close()


def time_in(*, days: float) -> Any:
    import datetime as dt
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
