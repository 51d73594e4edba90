"""Cumulative acknowledgment: the watermark, the ranges beyond a gap, and two replicas on one database."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from hub.db.store import HubStore, IngestWork
from hub.db.watermarks import MAX_PENDING_RANGES, Coverage


def test_in_order_batches_move_the_watermark() -> None:
    c = Coverage(0)
    c.add(0, 10, False)
    c.add(10, 25, False)
    assert (c.watermark, c.pending) == (25, [])


def test_a_batch_beyond_a_gap_waits_until_the_gap_closes() -> None:
    c = Coverage(0)
    c.add(20, 30, False)
    assert (c.watermark, c.pending) == (0, [(20, 30)])
    c.add(0, 10, False)
    assert c.watermark == 10
    c.add(10, 20, False)
    assert (c.watermark, c.pending) == (30, [])


def test_a_settled_batch_declares_its_base_acknowledged() -> None:
    c = Coverage(5)
    c.add(40, 50, True)  # everything to 40 was acknowledged before or shed
    assert c.watermark == 50
    c.add(10, 20, True)  # an old settled batch never moves the watermark back
    assert c.watermark == 50


def test_a_resent_or_overlapping_batch_changes_nothing_twice() -> None:
    c = Coverage(0)
    for base, last in ((0, 10), (0, 10), (5, 15), (15, 15)):
        c.add(base, last, False)
    assert (c.watermark, c.pending) == (15, [])


def test_a_batch_resent_beyond_a_gap_waits_once() -> None:
    c = Coverage(0)
    c.add(20, 30, False)
    c.add(20, 30, False)  # its ack was lost: sent again while the gap is still open
    assert (c.watermark, c.pending) == (0, [(20, 30)])


def test_ranges_waiting_are_bounded() -> None:
    c = Coverage(0)
    for i in range(MAX_PENDING_RANGES + 50):
        c.add(10 + 2 * i, 11 + 2 * i, False)  # never chains: a gap of one before each
    assert c.watermark == 0
    assert len(c.pending) == MAX_PENDING_RANGES
    assert c.pending[-1] == (10 + 2 * (MAX_PENDING_RANGES + 49), 11 + 2 * (MAX_PENDING_RANGES + 49))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_two_replicas_sharing_a_device_acknowledge_what_both_stored(tmp_path: Path, seed: int) -> None:
    """Batches of one device split at random between two stores on one database file (two hub
    replicas behind a shared subscription), in a shuffled order: the watermark ends at the last
    sequence number, never acknowledges a number not stored, and every row is there once."""
    rng = random.Random(seed)
    path = tmp_path / "hub.db"
    replicas = [await HubStore.open(path), await HubStore.open(path)]
    try:
        await replicas[0].register("d1", "sim", {})
        batches = list(itertools.pairwise(range(0, 2001, 20)))
        rng.shuffle(batches)
        stored: set[int] = set()
        for base, last in batches:
            seqs = range(base + 1, last + 1)
            store = rng.choice(replicas)
            ack = await store.commit_ingest(IngestWork(
                now=1000.0, telemetry=[("d1", s, 1.0, "m", float(s)) for s in seqs],
                ranges={"d1": [(base, last, False)]}, messages=1, hub=f"hub.t{replicas.index(store)}"))
            stored.update(seqs)
            assert set(range(1, ack["d1"] + 1)) <= stored  # never acknowledges what is not stored
        assert ack["d1"] == 2000
        rows = await replicas[1].query("SELECT COUNT(*), COUNT(DISTINCT seq) FROM telemetry WHERE device = 'd1'")
        assert tuple(rows[0]) == (2000, 2000)
        assert tuple((await replicas[1].query("SELECT COUNT(*) FROM ingest_ranges"))[0]) == (0,)  # nothing waits
        minutes = await replicas[0].query("SELECT hub, records, messages FROM ingest_minutes ORDER BY hub")
        assert sum(m[1] for m in minutes) == 2000  # each record committed by one of them
        assert sum(m[2] for m in minutes) == len(batches)
        assert [m[0] for m in minutes] == ["hub.t0", "hub.t1"]
    finally:
        for store in replicas:
            await store.close()
