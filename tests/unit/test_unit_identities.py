"""Two machines, one certificate: the outbox's instance id, its renumbering, and the hub's regions
(hub/db/identities.py) — fast, against real SQLite files."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.buffer.machine import fingerprint, machine_number
from edge_agent.buffer.outbox import Outbox
from edge_agent.sense.sensors import Reading
from edgefleet.wire.protocol import MAX_SEQ, Batch, Renumber
from hub.db.identities import CONFLICT, REGION_STRIDE, STALE, Accept, Instance, Refuse, judge
from hub.db.store import HubStore, IngestWork

QUOTA = 64 * 1024 * 1024


def batch(instance: int, base: int, last: int, inherited: int = 0, settled: bool = False, machine: int = 0) -> Batch:
    seqs = list(range(base + 1, last + 1))
    return Batch(base=base, last=last, settled=settled, names=["m"], seq=seqs, ts=[float(s) for s in seqs],
                 metric=[0] * len(seqs), value=[float(s) for s in seqs], instance=instance, inherited=inherited,
                 machine=machine)


# --- the machine ----------------------------------------------------------------------------


def test_the_board_serial_wins_and_virtual_interfaces_do_not_count(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("0123abcd\n")
    assert fingerprint(root=tmp_path) == "machine-id:0123abcd"
    for nic, physical in (("eth0", True), ("docker0", False)):
        (tmp_path / "sys/class/net" / nic).mkdir(parents=True)
        (tmp_path / "sys/class/net" / nic / "address").write_text(f"02:00:00:00:00:0{int(physical)}\n")
        if physical:
            (tmp_path / "sys/class/net" / nic / "device").mkdir()
    assert fingerprint(root=tmp_path) == "mac:02:00:00:00:00:01"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nSerial\t\t: 10000000c0ffee00\n")
    assert fingerprint(root=tmp_path) == "serial:10000000c0ffee00"
    assert fingerprint("bench-7", root=tmp_path) == "configured:bench-7"
    assert 0 < machine_number("serial:1") <= MAX_SEQ
    assert machine_number("serial:1") != machine_number("serial:2")


# --- the outbox -----------------------------------------------------------------------------


async def test_an_outbox_found_on_another_machine_becomes_a_new_instance(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path, QUOTA, machine=1)
    first = outbox.instance
    outbox.add([Reading("m", 1.0, 1.0), Reading("m", 2.0, 2.0)])
    await outbox.close()
    outbox = await Outbox.open(tmp_path, QUOTA, machine=1)
    assert (outbox.instance, outbox.inherited) == (first, 0)  # the same board: the same instance
    await outbox.close()
    outbox = await Outbox.open(tmp_path, QUOTA, machine=2)  # the SD card in another board
    try:
        assert outbox.instance not in (0, first)
        assert outbox.inherited == 2  # its records so far were numbered on the first board
    finally:
        await outbox.close()


async def test_renumbering_moves_committed_and_buffered_records_once_and_survives_a_reopen(tmp_path: Path) -> None:
    outbox = await Outbox.open(tmp_path, QUOTA, machine=1)
    outbox.add([Reading("m", float(t), float(t)) for t in range(1, 6)])  # seqs 1..5
    await outbox.flush()
    outbox.acknowledge(2)
    await outbox.flush()
    outbox.add([Reading("m", 6.0, 6.0)])  # seq 6, still in memory
    assert await outbox.renumber(3, 1000) == 2  # 4 and 5 were committed; 6 moves in memory
    assert await outbox.renumber(3, 1000) is None  # an identical refusal of a batch in flight: done already
    await outbox.flush()
    records = await outbox.read_after(0, 100)
    assert [(r.seq, r.ts) for r in records] == [(3, 3.0), (1001, 4.0), (1002, 5.0), (1003, 6.0)]
    assert outbox.inherited == 3
    await outbox.close()
    outbox = await Outbox.open(tmp_path, QUOTA, machine=1)
    try:
        outbox.add([Reading("m", 7.0, 7.0)])
        await outbox.flush()
        assert (await outbox.read_after(1003, 10))[0].seq == 1004
        assert (outbox.inherited, outbox.last_seq) == (3, 1004)
    finally:
        await outbox.close()


# --- the hub's judgement ----------------------------------------------------------------------


def test_regions_first_owner_takeover_clone_and_stale_numbering() -> None:
    known: dict[int, Instance] = {}
    first = judge("d", batch(7, 0, 10), known, 0)
    assert isinstance(first, Accept)
    assert (first.stream, first.row.floor, first.ceiling) == ("d", 0, MAX_SEQ)
    known[7] = first.row
    clone = judge("d", batch(8, 4, 12, inherited=6), known, 10)  # cloned at seq 6; its 7.. are its own
    assert clone == Refuse(6, REGION_STRIDE, moved=True, clone=True, other=7)
    known[8] = Instance(8, "d/8", REGION_STRIDE, 6, REGION_STRIDE)
    assert judge("d", batch(8, 6, 14, inherited=6), known, 10) == Refuse(6, REGION_STRIDE, moved=False, clone=False)
    renumbered = Batch(base=4, last=REGION_STRIDE + 2, settled=True, names=["m"], seq=[5, 6, REGION_STRIDE + 1,
                       REGION_STRIDE + 2], ts=[0.0] * 4, metric=[0] * 4, value=[0.0] * 4, instance=8, inherited=6)
    accepted = judge("d", renumbered, known, 10)
    assert isinstance(accepted, Accept)
    assert accepted.stream == "d/8"
    assert isinstance(judge("d", batch(7, 10, 20), known, REGION_STRIDE + 2), Accept)  # the original goes on
    overflow = judge("d", batch(7, REGION_STRIDE - 1, REGION_STRIDE + 1), known, REGION_STRIDE + 2)
    assert overflow == Refuse(REGION_STRIDE, 2 * REGION_STRIDE, moved=True, clone=True, other=8)
    fresh = judge("d", batch(9, 3 * REGION_STRIDE, 3 * REGION_STRIDE + 5), known, REGION_STRIDE + 2)
    assert isinstance(fresh, Accept)  # a new outbox numbering past everything: a replaced one, not a clone
    assert (fresh.stream, fresh.row.floor) == ("d", 3 * REGION_STRIDE)


def test_a_new_outbox_on_the_same_board_below_its_old_numbers_is_moved_but_is_no_clone() -> None:
    known = {7: Instance(7, "d", 0, 0, 10, machine=5)}
    assert judge("d", batch(9, 0, 4, machine=5), known, 10) == Refuse(0, REGION_STRIDE, moved=True, clone=False,
                                                                       other=7)
    assert judge("d", batch(9, 0, 4, machine=6), known, 10) == Refuse(0, REGION_STRIDE, moved=True, clone=True,
                                                                       other=7)


async def test_the_store_refuses_an_overlap_records_it_and_acks_each_instance_apart(tmp_path: Path) -> None:
    store = await HubStore.open(tmp_path / "hub.db")
    try:
        await store.register("d", "sim", {})
        work = IngestWork(now=100.0, claims=[("d", batch(7, 0, 10, settled=True))], hub="hub.t")
        await store.commit_ingest(work)
        assert work.instance_acks == {("d", 7): 10}
        work = IngestWork(now=101.0, claims=[("d", batch(8, 4, 12, inherited=6, settled=True)),
                                             ("d", batch(7, 10, 15))], hub="hub.t")
        assert await store.commit_ingest(work) == {}  # no ack by device alone: each instance its own
        assert work.instance_acks == {("d", 7): 15}
        assert work.renumber == {("d", 8): Renumber(keep_through=6, resume_after=REGION_STRIDE,
                                                    reason=work.renumber[("d", 8)].reason)}
        rows = await store.query("SELECT COUNT(*), MAX(seq) FROM telemetry WHERE device = 'd'")
        assert tuple(rows[0]) == (15, 15)  # nothing of the refused batch was stored
        assert await store.reject_counts() == {CONFLICT: 1}
        events = [e async for e in store.events(kind=CONFLICT)]
        assert [(e.device, e.body["device"], e.body["resume_after"]) for e in events] == [
            ("hub.t", "d", REGION_STRIDE)]
        work = IngestWork(now=102.0, claims=[("d", batch(8, 6, 12, inherited=6))], hub="hub.t")  # still in flight
        await store.commit_ingest(work)
        assert set(work.renumber) == {("d", 8)}
        assert await store.reject_counts() == {CONFLICT: 1, STALE: 1}
        moved = Batch(base=4, last=REGION_STRIDE + 3, settled=True, names=["m"], seq=[5, 6, *range(
            REGION_STRIDE + 1, REGION_STRIDE + 4)], ts=[0.0] * 5, metric=[0] * 5, value=[-1.0] * 5, instance=8,
            inherited=6)
        work = IngestWork(now=103.0, claims=[("d", moved)], hub="hub.t")
        await store.commit_ingest(work)
        assert work.instance_acks == {("d", 8): REGION_STRIDE + 3}
        rows = await store.query("SELECT COUNT(*) FROM telemetry WHERE device = 'd'")
        assert rows[0][0] == 18  # 5 and 6 were the original's already: stored once
        state = await store.query("SELECT instance, stream, floor, conflicts FROM ingest_instances ORDER BY instance")
        assert [tuple(r) for r in state] == [(7, "d", 0, 0), (8, "d/8", REGION_STRIDE, 1)]
        assert json.loads(json.dumps(events[0].body))["other"] == "7"
    finally:
        await store.close()
