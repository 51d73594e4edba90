"""The hub's coordination state machine on a real hub database: leases with fencing tokens,
operator approvals, tasks by bidding.

Devices are registered and brought online through the store; every call gets an explicit
`now`, so expiries, bid windows and award timeouts are exact and nothing sleeps. Replies are
read from what `handle`/`tick` return, state from the tables, hub events from the events
table under the hub's identity.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.mqtt.session import Message
from edgefleet.runtime.sdnotify import Watchdog
from edgefleet.wire.protocol import (
    ACK,
    COORD,
    TELEMETRY,
    Ack,
    ApprovalDecision,
    ApprovalRequest,
    Batch,
    Bid,
    CoordDown,
    CoordUp,
    LeaseGrant,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    Presence,
    TaskAward,
    TaskDone,
    TaskOffer,
    down_topic,
    encode,
    pack,
    pack_coord,
    presence_topic,
    unpack,
    unpack_down,
    unpack_up,
    up_topic,
)
from hub.config import HubConfig, HubPaths
from hub.db.store import HubStore
from hub.ingest.batches import Ingest
from hub.ingest.retained import RetainedSweeper
from hub.pki.renewal import CertificateDesk
from hub.region.coordination import BID_WINDOW_S, Coordination, CoordinationError, Replies
from hub.service import AckSender, HubService

HUB = "hub.eu-1"
T0 = 1_700_000_000.0
TTL = 60.0


@dataclass
class Hub:
    store: HubStore
    coord: Coordination
    path: Path

    async def device(self, device: str, profile: str = "sim", *, online: bool = True, **tags: str) -> None:
        await self.store.register(device, profile, dict(tags or {"site": "lab"}))
        if online:
            await self.online(device)

    async def online(self, device: str, now: float = T0 - 100) -> None:
        assert await self.store.apply_presence(device, Presence(state="online", session="s1"), now)

    async def offline(self, device: str, now: float = T0) -> None:
        assert await self.store.apply_presence(device, Presence(state="offline", session="s1"), now)

    async def handle(self, *requests: tuple[str, CoordUp], now: float = T0) -> Replies:
        # Through the wire format, as the hub receives them.
        return await self.coord.handle([(d, unpack_up(pack_coord(m))) for d, m in requests], now)

    async def tick(self, now: float) -> Replies:
        return await self.coord.tick(now)

    async def reopen(self) -> None:
        """A hub restart: close the database, open it again."""
        await self.store.close()
        self.store = await HubStore.open(self.path)
        self.coord = Coordination(self.store, HUB)

    async def hub_events(self, kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        return [(e.kind, e.body) async for e in self.store.events(device=HUB, kind=kind)]

    async def last_token(self, name: str) -> int | None:
        rows = await self.store.query("SELECT last_token FROM leases WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    async def holders(self, name: str) -> list[tuple[str, str, int]]:
        rows = await self.store.query(
            "SELECT device, request, token FROM lease_holders WHERE name = ? ORDER BY token", (name,))
        return [tuple(r) for r in rows]

    async def queue(self, name: str) -> list[tuple[str, str]]:
        rows = await self.store.query("SELECT device, request FROM lease_queue WHERE name = ? ORDER BY qid", (name,))
        return [tuple(r) for r in rows]

    async def task(self, task: int) -> dict[str, Any]:
        rows = await self.store.query("SELECT * FROM tasks WHERE id = ?", (task,))
        return dict(rows[0])

    async def bids(self, task: int) -> dict[str, dict[str, Any]]:
        rows = await self.store.query("SELECT * FROM bids WHERE task = ? ORDER BY device", (task,))
        return {r["device"]: dict(r) for r in rows}


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    path = tmp_path / "hub.db"
    store = await HubStore.open(path)
    h = Hub(store, Coordination(store, HUB), path)
    try:
        yield h
    finally:
        await h.store.close()


def req(rid: str, name: str = "L", limit: int = 1, ttl_s: float = TTL, rule: str = "r") -> LeaseRequest:
    return LeaseRequest(id=rid, name=name, limit=limit, ttl_s=ttl_s, rule=rule, policy_version=3)


def sent(replies: Replies, device: str | None = None, kind: type | None = None) -> list[Any]:
    """The messages of `replies` (to `device`, of `kind`), checked to survive the wire format."""
    out: list[CoordDown] = []
    for d, m in replies.messages:
        assert unpack_down(pack_coord(m)) == m
        if (device is None or d == device) and (kind is None or isinstance(m, kind)):
            out.append(m)
    return out


def awards(replies: Replies) -> list[tuple[str, int]]:
    """(device, attempt) of every TaskAward in `replies`; nothing else may be there."""
    out = []
    for d, m in replies.messages:
        assert isinstance(m, TaskAward)
        out.append((d, m.attempt))
    return out


def to(replies: Replies) -> list[tuple[str, str]]:
    """(device, message tag) of every reply, in order."""
    return [(d, type(m).__name__) for d, m in replies.messages]


# --- leases --------------------------------------------------------------------------------


async def test_grants_up_to_the_limit_then_queues_first_come_first_served(hub: Hub) -> None:
    for d in ("a", "b", "c", "d"):
        await hub.device(d)
    r = await hub.handle(("a", req("ra", limit=2)), ("b", req("rb", limit=2)), ("c", req("rc", limit=2)),
                         ("d", req("rd", limit=2)))
    assert sent(r, "a") == [LeaseGrant(id="ra", name="L", token=1, expires_in_s=TTL)]
    assert sent(r, "b") == [LeaseGrant(id="rb", name="L", token=2, expires_in_s=TTL)]
    # Each queued device hears its own place, and only its own.
    assert sent(r, "c") == [LeaseQueued(id="rc", name="L", position=1)]
    assert sent(r, "d") == [LeaseQueued(id="rd", name="L", position=2)]
    assert await hub.holders("L") == [("a", "ra", 1), ("b", "rb", 2)]
    assert await hub.queue("L") == [("c", "rc"), ("d", "rd")]
    [row] = await hub.store.query("SELECT * FROM lease_holders WHERE device = 'a'")
    assert {k: row[k] for k in ("lim", "rule", "policy_version", "granted_at", "expires_at")} == {
        "lim": 2, "rule": "r", "policy_version": 3, "granted_at": T0, "expires_at": T0 + TTL}

    # A latecomer goes to the back; only it is told, the others' places did not change.
    await hub.device("e")
    r = await hub.handle(("e", req("re", limit=2)), now=T0 + 1)
    assert to(r) == [("e", "LeaseQueued")]
    assert sent(r, "e") == [LeaseQueued(id="re", name="L", position=3)]

    # b releases: the head (c) is granted the next token; d and e are not told anything.
    r = await hub.handle(("b", LeaseRelease(id="rb", name="L", token=2)), now=T0 + 2)
    assert to(r) == [("c", "LeaseGrant")]
    assert sent(r, "c") == [LeaseGrant(id="rc", name="L", token=3, expires_in_s=TTL)]
    assert await hub.holders("L") == [("a", "ra", 1), ("c", "rc", 3)]
    assert await hub.queue("L") == [("d", "rd"), ("e", "re")]
    # A release that frees two places (both holders) grants two, in queue order.
    r = await hub.handle(("a", LeaseRelease(id="ra", name="L", token=1)),
                         ("c", LeaseRelease(id="rc", name="L", token=3)), now=T0 + 3)
    assert sent(r) == [LeaseGrant(id="rd", name="L", token=4, expires_in_s=TTL),
                       LeaseGrant(id="re", name="L", token=5, expires_in_s=TTL)]
    assert await hub.queue("L") == []


async def test_the_queue_order_is_arrival_order_across_cycles(hub: Hub) -> None:
    for d in ("h", "z", "a", "m"):
        await hub.device(d)
    await hub.handle(("h", req("rh")))
    for i, d in enumerate(("z", "a", "m"), start=1):  # not alphabetical: arrival decides
        r = await hub.handle((d, req(f"r{d}")), now=T0 + i)
        assert sent(r, d) == [LeaseQueued(id=f"r{d}", name="L", position=i)]
    granted = []
    holder, rid = "h", "rh"
    for i in range(3):
        r = await hub.handle((holder, LeaseRelease(id=rid, name="L")), now=T0 + 10 + i)
        [(holder, grant)] = r.messages
        assert isinstance(grant, LeaseGrant)
        rid = grant.id
        granted.append((holder, grant.token))
    assert granted == [("z", 2), ("a", 3), ("m", 4)]


async def test_fencing_tokens_only_grow_per_name_and_across_a_restart(hub: Hub) -> None:
    await hub.device("a")
    await hub.device("b")
    tokens = []
    for i in range(5):
        r = await hub.handle(("a", req(f"x{i}")), now=T0 + i)
        [grant] = sent(r, "a", LeaseGrant)
        tokens.append(grant.token)
        await hub.handle(("a", LeaseRelease(id=f"x{i}", name="L", token=grant.token)), now=T0 + i + 0.5)
    assert tokens == [1, 2, 3, 4, 5]
    assert await hub.last_token("L") == 5

    # a holds token 6, b is queued; the hub restarts.
    await hub.handle(("a", req("y1")), now=T0 + 10)
    await hub.handle(("b", req("y2")), now=T0 + 10)
    await hub.reopen()
    assert await hub.holders("L") == [("a", "y1", 6)]
    assert await hub.queue("L") == [("b", "y2")]
    # The waiting device asks again after the reconnect: the same place, no new entry.
    r = await hub.handle(("b", req("y2")), now=T0 + 11)
    assert sent(r) == [LeaseQueued(id="y2", name="L", position=1)]
    r = await hub.handle(("a", LeaseRelease(id="y1", name="L", token=6)), now=T0 + 12)
    assert sent(r) == [LeaseGrant(id="y2", name="L", token=7, expires_in_s=TTL)]
    # Even with no holder and no queue left, a later grant never reuses a token.
    await hub.handle(("b", LeaseRelease(id="y2", name="L", token=7)), now=T0 + 13)
    await hub.reopen()
    r = await hub.handle(("a", req("z1")), now=T0 + 14)
    assert [g.token for g in sent(r, "a", LeaseGrant)] == [8]


async def test_the_smallest_limit_of_the_holders_and_the_head_applies(hub: Hub) -> None:
    for d in ("a", "b", "c", "d"):
        await hub.device(d)
    # A holder that asked for limit 1 keeps out a head that would allow 3.
    await hub.handle(("a", req("ra", name="strict-holder", limit=1)))
    r = await hub.handle(("b", req("rb", name="strict-holder", limit=3)))
    assert sent(r) == [LeaseQueued(id="rb", name="strict-holder", position=1)]
    # A head that asks for limit 1 is not granted beside a holder of limit 3.
    await hub.handle(("a", req("ra2", name="strict-head", limit=3)))
    r = await hub.handle(("b", req("rb2", name="strict-head", limit=1)))
    assert sent(r) == [LeaseQueued(id="rb2", name="strict-head", position=1)]
    # ... and it blocks those behind it (first come, first served), even if they allow more.
    r = await hub.handle(("c", req("rc2", name="strict-head", limit=3)))
    assert sent(r) == [LeaseQueued(id="rc2", name="strict-head", position=2)]
    # Two holders of limit 3, a head of limit 2: full.
    await hub.handle(("a", req("ra3", name="mixed", limit=3)), ("b", req("rb3", name="mixed", limit=3)))
    r = await hub.handle(("c", req("rc3", name="mixed", limit=2)))
    assert sent(r) == [LeaseQueued(id="rc3", name="mixed", position=1)]
    # A head of limit 3 with holders of 3: granted.
    r = await hub.handle(("d", req("rd3", name="mixed", limit=3)))
    assert sent(r) == [LeaseQueued(id="rd3", name="mixed", position=2)]  # behind c, FIFO
    r = await hub.handle(("a", LeaseRelease(id="ra3", name="mixed")), now=T0 + 1)
    # a left: one holder of 3; c (limit 2) now fits, then d (limit 3) does not: min(2, 3, 3) = 2.
    assert [(m.id, m.token) for m in sent(r, kind=LeaseGrant)] == [("rc3", 3)]
    assert await hub.queue("mixed") == [("d", "rd3")]


async def test_a_repeated_request_gets_the_same_answer_and_no_new_token(hub: Hub) -> None:
    await hub.device("a")
    await hub.device("b")
    r = await hub.handle(("a", req("ra")), now=T0)
    assert sent(r) == [LeaseGrant(id="ra", name="L", token=1, expires_in_s=TTL)]
    r = await hub.handle(("b", req("rb")), now=T0)
    assert sent(r) == [LeaseQueued(id="rb", name="L", position=1)]
    # Both ask again (a reconnect): the same grant with the time it has left, the same place.
    r = await hub.handle(("a", req("ra")), ("b", req("rb")), now=T0 + 20)
    assert sent(r, "a") == [LeaseGrant(id="ra", name="L", token=1, expires_in_s=TTL - 20)]
    assert sent(r, "b") == [LeaseQueued(id="rb", name="L", position=1)]
    assert await hub.last_token("L") == 1
    assert await hub.holders("L") == [("a", "ra", 1)]
    assert await hub.queue("L") == [("b", "rb")]
    # Twice in the same cycle: still one grant and one token.
    await hub.device("c")
    r = await hub.handle(("c", req("rc", name="M")), ("c", req("rc", name="M")), now=T0 + 21)
    assert {m.token for m in sent(r, "c", LeaseGrant)} == {1}
    assert await hub.last_token("M") == 1
    # Asked again past its expiry, before the tick took it back: a tiny positive time, not negative.
    r = await hub.handle(("a", req("ra")), now=T0 + TTL + 5)
    [grant] = sent(r, "a", LeaseGrant)
    assert grant.token == 1
    assert 0 < grant.expires_in_s <= 0.01


async def test_release_of_a_queued_request_removes_it_from_the_queue(hub: Hub) -> None:
    for d in ("a", "b", "c"):
        await hub.device(d)
    await hub.handle(("a", req("ra")), ("b", req("rb")), ("c", req("rc")))
    # b gives up waiting (the agent's token-0 release): it leaves the queue, holders unchanged.
    r = await hub.handle(("b", LeaseRelease(id="rb", name="L")), now=T0 + 1)
    assert r.messages == []
    assert await hub.queue("L") == [("c", "rc")]
    assert await hub.holders("L") == [("a", "ra", 1)]
    r = await hub.handle(("c", req("rc")), now=T0 + 2)
    assert sent(r) == [LeaseQueued(id="rc", name="L", position=1)]
    r = await hub.handle(("a", LeaseRelease(id="ra", name="L", token=1)), now=T0 + 3)
    assert to(r) == [("c", "LeaseGrant")]


async def test_only_the_holder_can_release_its_own_request(hub: Hub) -> None:
    await hub.device("a")
    await hub.device("b")
    await hub.handle(("a", req("same-id")))
    await hub.handle(("b", req("same-id")))  # request ids are per device: b's is queued
    # b's release of "same-id" leaves b's queue entry, not a's grant; a wrong name frees nothing.
    r = await hub.handle(("b", LeaseRelease(id="same-id", name="L", token=1)), now=T0 + 1)
    assert r.messages == []
    assert await hub.holders("L") == [("a", "same-id", 1)]
    assert await hub.queue("L") == []
    await hub.handle(("a", LeaseRelease(id="same-id", name="other", token=1)), now=T0 + 2)
    assert await hub.holders("L") == [("a", "same-id", 1)]
    # A release of something never held or queued is harmless.
    r = await hub.handle(("a", LeaseRelease(id="never", name="L", token=99)), now=T0 + 3)
    assert r.messages == []
    assert await hub.last_token("L") == 1


async def test_an_abandoned_grant_released_with_token_zero_frees_the_place(hub: Hub) -> None:
    """The agent gave up just as the grant was made: its token-0 release still frees it."""
    await hub.device("a")
    await hub.device("b")
    await hub.handle(("a", req("ra")), ("b", req("rb")))
    r = await hub.handle(("a", LeaseRelease(id="ra", name="L", token=0)), now=T0 + 1)
    assert sent(r) == [LeaseGrant(id="rb", name="L", token=2, expires_in_s=TTL)]


async def test_a_lease_expires_at_its_ttl_not_before_and_the_next_is_granted(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    await hub.handle(("a", req("ra", ttl_s=TTL)), ("b", req("rb", ttl_s=90.0)), now=T0)
    r = await hub.tick(T0 + TTL - 0.001)
    assert r.messages == []
    assert await hub.holders("L") == [("a", "ra", 1)]
    assert await hub.hub_events("lease_expired") == []
    r = await hub.tick(T0 + TTL)
    assert sent(r) == [LeaseGrant(id="rb", name="L", token=2, expires_in_s=90.0)]
    assert await hub.hub_events("lease_expired") == [("lease_expired", {"lease": "L", "device": "a", "token": 1})]
    assert any("expired" in n for n in r.notes)
    # The new holder's TTL counts from its grant.
    assert (await hub.tick(T0 + TTL + 89.999)).messages == []
    assert await hub.holders("L") == [("b", "rb", 2)]
    await hub.tick(T0 + TTL + 90)
    assert await hub.holders("L") == []
    assert len(await hub.hub_events("lease_expired")) == 2
    # a's late release of the expired token changes nothing and grants nothing.
    r = await hub.handle(("a", LeaseRelease(id="ra", name="L", token=1)), now=T0 + 200)
    assert r.messages == []
    assert await hub.last_token("L") == 2


async def test_several_holders_expiring_in_one_tick_make_room_for_as_many(hub: Hub) -> None:
    for d in ("a", "b", "c", "d", "e"):
        await hub.device(d)
    await hub.handle(*[(d, req(f"r{d}", limit=2)) for d in ("a", "b", "c", "d", "e")], now=T0)
    r = await hub.tick(T0 + TTL)
    assert [(m.id, m.token) for m in sent(r, kind=LeaseGrant)] == [("rc", 3), ("rd", 4)]
    assert await hub.queue("L") == [("e", "re")]
    assert len(await hub.holders("L")) == 2


async def test_a_queued_device_that_went_offline_is_skipped_when_its_turn_comes(hub: Hub) -> None:
    for d in ("a", "b", "c"):
        await hub.device(d)
    await hub.handle(("a", req("ra")), ("b", req("rb")), ("c", req("rc")))
    await hub.offline("b", T0 + 1)
    r = await hub.handle(("a", LeaseRelease(id="ra", name="L", token=1)), now=T0 + 2)
    assert to(r) == [("c", "LeaseGrant")]
    assert sent(r, "c") == [LeaseGrant(id="rc", name="L", token=2, expires_in_s=TTL)]
    assert await hub.queue("L") == []  # b's request is dropped, not kept
    # Back online, b asks again (same id): it joins the queue at the back.
    await hub.online("b", T0 + 3)
    r = await hub.handle(("b", req("rb")), now=T0 + 4)
    assert sent(r) == [LeaseQueued(id="rb", name="L", position=1)]
    # The same happens on an expiry in the tick.
    await hub.offline("b", T0 + 5)
    r = await hub.tick(T0 + 2 + TTL)
    assert r.messages == []
    assert await hub.queue("L") == []
    assert await hub.holders("L") == []


async def test_a_request_from_a_device_that_is_not_online_is_dropped(hub: Hub) -> None:
    await hub.device("off", online=False)
    r = await hub.handle(("off", req("r1")), ("ghost", req("r2")))  # offline; never registered
    assert r.messages == []
    assert await hub.queue("L") == []
    assert await hub.holders("L") == []
    assert await hub.last_token("L") is None


async def test_two_lease_names_are_independent(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    r = await hub.handle(("a", req("a1", name="reboot")), ("b", req("b1", name="reflash")))
    assert sent(r, "a") == [LeaseGrant(id="a1", name="reboot", token=1, expires_in_s=TTL)]
    assert sent(r, "b") == [LeaseGrant(id="b1", name="reflash", token=1, expires_in_s=TTL)]
    r = await hub.handle(("b", req("b2", name="reboot")), now=T0 + 1)
    assert sent(r) == [LeaseQueued(id="b2", name="reboot", position=1)]
    # Freeing "reflash" grants nothing of "reboot".
    r = await hub.handle(("b", LeaseRelease(id="b1", name="reflash", token=1)), now=T0 + 2)
    assert r.messages == []
    r = await hub.handle(("a", req("a2", name="reflash")), now=T0 + 3)
    assert sent(r) == [LeaseGrant(id="a2", name="reflash", token=2, expires_in_s=TTL)]
    assert (await hub.last_token("reboot"), await hub.last_token("reflash")) == (1, 2)


async def test_handle_with_nothing_does_nothing(hub: Hub) -> None:
    r = await hub.coord.handle([], T0)
    assert (r.messages, r.notes) == ([], [])


# --- approvals -------------------------------------------------------------------------------


def areq(rid: str = "q1", expires_s: float = 600.0) -> ApprovalRequest:
    return ApprovalRequest(id=rid, rule="reflash", action="command", args='{"argv": ["x"]}',
                           policy_version=4, expires_s=expires_s)


async def approvals(hub: Hub) -> list[dict[str, Any]]:
    return [dict(r) for r in await hub.store.query("SELECT * FROM approvals ORDER BY id")]


async def test_an_approval_request_is_stored_pending_and_answered_later(hub: Hub) -> None:
    await hub.device("a")
    r = await hub.handle(("a", areq()), now=T0)
    assert r.messages == []
    [row] = await approvals(hub)
    assert {k: row[k] for k in ("device", "request", "rule", "action", "args", "policy_version", "requested_at",
                                "expires_at", "state", "decided_by", "sent")} == {
        "device": "a", "request": "q1", "rule": "reflash", "action": "command", "args": '{"argv": ["x"]}',
        "policy_version": 4, "requested_at": T0, "expires_at": T0 + 600, "state": "pending", "decided_by": None,
        "sent": 0}
    assert any(f"approvals approve|deny {row['id']}" in n for n in r.notes)
    # Asked again while pending: no second row, no answer yet.
    r = await hub.handle(("a", areq()), now=T0 + 5)
    assert r.messages == []
    assert len(await approvals(hub)) == 1
    assert (await hub.tick(T0 + 10)).messages == []


@pytest.mark.parametrize(("approved", "state"), [(True, "approved"), (False, "denied")])
async def test_a_decision_is_recorded_sent_once_and_is_a_hub_event(hub: Hub, approved: bool, state: str) -> None:
    await hub.device("a")
    await hub.handle(("a", areq()), now=T0)
    [row] = await approvals(hub)
    text = await hub.coord.decide(row["id"], approved, "alice", "checked the logs", now=T0 + 30)
    assert text == f"approval {row['id']} (command on a, rule reflash): {state} by alice"
    [row] = await approvals(hub)
    assert (row["state"], row["decided_by"], row["decided_at"], row["reason"]) == (
        state, "alice", T0 + 30, "checked the logs")
    assert await hub.hub_events() == [(f"approval_{state}", {
        "approval": row["id"], "device": "a", "action": "command", "by": "alice", "reason": "checked the logs"})]
    r = await hub.tick(T0 + 31)
    assert r.messages == [("a", ApprovalDecision(id="q1", approved=approved, by="alice", reason="checked the logs"))]
    assert (await approvals(hub))[0]["sent"] == 1
    assert (await hub.tick(T0 + 32)).messages == []  # once
    # The device asks again (it was offline when the decision went out): told again.
    r = await hub.handle(("a", areq()), now=T0 + 40)
    assert sent(r) == [ApprovalDecision(id="q1", approved=approved, by="alice", reason="checked the logs")]
    # Deciding again is refused, whatever the decision.
    for again in (True, False):
        with pytest.raises(CoordinationError, match=f"already {state}"):
            await hub.coord.decide(row["id"], again, "bob", "", now=T0 + 50)
    assert len(await hub.hub_events()) == 1


async def test_deciding_an_unknown_approval_is_refused(hub: Hub) -> None:
    with pytest.raises(CoordinationError, match="no approval request 42"):
        await hub.coord.decide(42, True, "alice", "", now=T0)
    assert await hub.hub_events() == []


async def test_an_undecided_approval_expires_at_its_time_as_a_denial(hub: Hub) -> None:
    await hub.device("a")
    await hub.handle(("a", areq(expires_s=120.0)), now=T0)
    [row] = await approvals(hub)
    assert (await hub.tick(T0 + 119.999)).messages == []
    assert (await approvals(hub))[0]["state"] == "pending"
    r = await hub.tick(T0 + 120)
    assert r.messages == [("a", ApprovalDecision(id="q1", approved=False, by="expired",
                                                 reason="nobody decided in time"))]
    [row] = await approvals(hub)
    assert (row["state"], row["decided_by"], row["decided_at"], row["sent"]) == ("expired", "expired", T0 + 120, 1)
    assert await hub.hub_events() == [("approval_expired", {"approval": row["id"], "device": "a", "by": "expired"})]
    assert (await hub.tick(T0 + 121)).messages == []
    with pytest.raises(CoordinationError, match="already expired"):
        await hub.coord.decide(row["id"], True, "alice", "too late", now=T0 + 122)
    # Asked again after the expiry: the denial again.
    r = await hub.handle(("a", areq(expires_s=120.0)), now=T0 + 130)
    assert sent(r) == [ApprovalDecision(id="q1", approved=False, by="expired", reason="nobody decided in time")]


async def test_approvals_of_two_devices_with_the_same_request_id_are_apart(hub: Hub) -> None:
    await hub.handle(("a", areq("same")), ("b", areq("same")), now=T0)
    rows = await approvals(hub)
    assert [(r["device"], r["request"]) for r in rows] == [("a", "same"), ("b", "same")]
    await hub.coord.decide(rows[1]["id"], True, "alice", "ok", now=T0 + 1)
    r = await hub.tick(T0 + 2)
    assert to(r) == [("b", "ApprovalDecision")]


async def test_a_denial_without_a_reason_says_denied(hub: Hub) -> None:
    await hub.handle(("a", areq()), now=T0)
    [row] = await approvals(hub)
    await hub.coord.decide(row["id"], False, "bob", "", now=T0 + 1)
    r = await hub.tick(T0 + 2)
    assert sent(r) == [ApprovalDecision(id="q1", approved=False, by="bob", reason="denied")]


# --- tasks --------------------------------------------------------------------------------------

LAB = {"profile": "sim", "tags": {"site": "lab"}}


async def offered(hub: Hub, target: dict[str, Any] | None = None, *, deadline: float | None = None,
                  timeout_s: float = 60.0, now: float = T0) -> tuple[int, Replies]:
    """Offer a task and run the tick that offers it."""
    task = await hub.coord.offer_task("record", {"n": 1}, LAB if target is None else target, deadline, timeout_s,
                                      now=now)
    return task, await hub.tick(now)


def bid(task: int, score: float, able: bool = True, detail: str = "") -> Bid:
    return Bid(task=task, able=able, score=score, detail=detail)


def done(task: int, attempt: int, ok: bool = True, *, refused: bool = False, detail: str = "") -> TaskDone:
    return TaskDone(task=task, attempt=attempt, ok=ok, refused=refused, detail=detail,
                    exit_code=0 if ok else 1)


async def test_a_task_is_offered_only_to_online_devices_matching_the_target(hub: Hub) -> None:
    await hub.device("lab-1")
    await hub.device("lab-2", site="lab", rack="7")
    await hub.device("other-site", site="plant")
    await hub.device("lab-offline", online=False)
    await hub.device("lab-rpi", "rpi-4")
    await hub.device("lab-revoked")
    await hub.store.revoke_device("lab-revoked")
    task = await hub.coord.offer_task("record", {"n": 1}, LAB, None, 60.0, now=T0)
    assert (await hub.task(task))["state"] == "new"
    assert await hub.hub_events() == [("task_offered", {"task": task, "kind": "record", "args": {"n": 1},
                                                        "target": LAB, "deadline": None})]
    r = await hub.tick(T0)
    offer = TaskOffer(task=task, kind="record", args='{"n": 1}', bid_by=T0 + BID_WINDOW_S)
    assert r.messages == [("lab-1", offer), ("lab-2", offer)]
    row = await hub.task(task)
    assert (row["state"], json.loads(row["offered"]), row["bid_by"]) == ("bidding", ["lab-1", "lab-2"],
                                                                         T0 + BID_WINDOW_S)
    # A tag filter of its own; no profile in the target: any profile.
    task2, r = await offered(hub, {"tags": {"rack": "7"}})
    assert [d for d, _ in r.messages] == ["lab-2"]
    task3, r = await offered(hub, {})
    assert [d for d, _ in r.messages] == ["lab-1", "lab-2", "lab-rpi", "other-site"]
    assert {task, task2, task3} == {1, 2, 3}


async def test_bidding_closes_when_every_device_answered_or_at_the_window(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("a", bid(task, 0.5)), now=T0 + 0.5)
    assert (await hub.tick(T0 + 1)).messages == []  # b has not answered, the window is open
    await hub.handle(("b", bid(task, 0.4)), now=T0 + 1.2)
    r = await hub.tick(T0 + 1.5)  # all answered: no need to wait for the window
    assert sent(r) == [TaskAward(task=task, attempt=1, kind="record", args='{"n": 1}', timeout_s=60.0)]
    assert to(r) == [("a", "TaskAward")]
    # Only a answers the next one: awarded at the end of the window, not before.
    task2, _ = await offered(hub, now=T0 + 10)
    await hub.handle(("a", bid(task2, 0.1)), now=T0 + 10.5)
    assert (await hub.tick(T0 + 10 + BID_WINDOW_S - 0.001)).messages == []
    r = await hub.tick(T0 + 10 + BID_WINDOW_S)
    assert to(r) == [("a", "TaskAward")]


async def test_the_best_score_wins_and_a_tie_goes_to_the_lower_device_id(hub: Hub) -> None:
    for d in ("a", "b", "c", "d"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("d", bid(task, 0.9)), ("c", bid(task, 0.9)), ("a", bid(task, 0.5)),
                     ("b", bid(task, 0.99, able=False, detail="not allowed")), now=T0 + 1)
    r = await hub.tick(T0 + 1)
    assert to(r) == [("c", "TaskAward")]
    row = await hub.task(task)
    assert (row["state"], row["attempt"], row["awarded_to"], row["award_expires"]) == ("awarded", 1, "c", T0 + 61)
    assert (await hub.bids(task))["c"]["outcome"] == "awarded"
    # A second bid from the same device does not replace its first.
    await hub.handle(("d", bid(task, 0.1)), now=T0 + 1.1)
    assert (await hub.bids(task))["d"]["score"] == 0.9


async def test_failure_refusal_and_timeout_pass_the_task_on_until_no_bidder_is_left(hub: Hub) -> None:
    for d in ("a", "b", "c", "x"):
        await hub.device(d)
    task, _ = await offered(hub, timeout_s=30.0)
    await hub.handle(("a", bid(task, 0.3)), ("b", bid(task, 0.9)), ("c", bid(task, 0.6)),
                     ("x", bid(task, 0.0, able=False, detail="no")), now=T0 + 1)
    r = await hub.tick(T0 + 1)
    assert sent(r) == [TaskAward(task=task, attempt=1, kind="record", args='{"n": 1}', timeout_s=30.0)]
    # b fails: c (next best) gets attempt 2.
    r = await hub.handle(("b", done(task, 1, ok=False, detail="exit 1")), now=T0 + 5)
    assert to(r) == [("c", "TaskAward")]
    assert sent(r, "c", TaskAward)[0].attempt == 2
    # Late or foreign news is ignored: b's old attempt again, a (not awarded), c with a wrong attempt.
    for device, message in (("b", done(task, 1)), ("a", done(task, 2)), ("c", done(task, 1)),
                            ("c", done(task + 99, 2))):
        r = await hub.handle((device, message), now=T0 + 6)
        assert r.messages == []
        assert (await hub.task(task))["state"] == "awarded"
    # c refuses: a gets attempt 3.
    r = await hub.handle(("c", done(task, 2, ok=False, refused=True, detail="busy")), now=T0 + 7)
    assert awards(r) == [("a", 3)]
    # a says nothing: at its award timeout (not before) the task has nobody left and fails.
    assert (await hub.tick(T0 + 7 + 30 - 0.001)).messages == []
    r = await hub.tick(T0 + 37)
    assert r.messages == []
    row = await hub.task(task)
    assert row["state"] == "failed"
    assert row["reason"] == "every bidder failed: a timeout: no answer in time; b failed: exit 1; c refused: busy"
    bids = await hub.bids(task)
    assert {d: b["outcome"] for d, b in bids.items()} == {"a": "timeout", "b": "failed", "c": "refused", "x": None}
    assert await hub.hub_events("task_failed") == [("task_failed", {"task": task, "reason": row["reason"]})]
    # A late success from anyone changes nothing.
    r = await hub.handle(("a", done(task, 3)), now=T0 + 40)
    assert r.messages == []
    assert (await hub.task(task))["state"] == "failed"


async def test_a_task_nobody_can_do_fails_with_the_declines(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("b", bid(task, 0, able=False, detail="actuator kind 'record' is not allowed")),
                     ("a", bid(task, 0, able=False, detail="busy")), now=T0 + 1)
    r = await hub.tick(T0 + 1)
    assert r.messages == []
    row = await hub.task(task)
    assert (row["state"], row["reason"]) == (
        "failed", "no device can do it (a: busy; b: actuator kind 'record' is not allowed)")
    # Nobody answers at all.
    task2, _ = await offered(hub, now=T0 + 10)
    await hub.tick(T0 + 10 + BID_WINDOW_S)
    assert (await hub.task(task2))["reason"] == "no device can do it (no device answered)"


async def test_a_task_with_no_online_matching_device_fails(hub: Hub) -> None:
    await hub.device("a", online=False)
    await hub.device("b", site="elsewhere")
    task, r = await offered(hub)
    assert r.messages == []
    await hub.tick(T0 + 0.5)  # offered to nobody: nobody to wait for
    row = await hub.task(task)
    assert (row["state"], row["reason"]) == ("failed", "no online device matches the target")
    assert await hub.hub_events("task_failed") == [("task_failed", {"task": task,
                                                                    "reason": "no online device matches the target"})]


async def test_a_task_fails_at_its_deadline_in_any_phase(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    # The deadline cuts the bid window and the award short.
    task, r = await offered(hub, deadline=T0 + 1, timeout_s=60.0)
    assert [m.bid_by for m in sent(r, kind=TaskOffer)] == [T0 + 1, T0 + 1]
    await hub.handle(("a", bid(task, 0.5)), now=T0 + 0.5)
    r = await hub.tick(T0 + 0.999)
    assert r.messages == []
    assert (await hub.task(task))["state"] == "bidding"
    r = await hub.tick(T0 + 1)
    assert r.messages == []
    row = await hub.task(task)
    assert (row["state"], row["reason"]) == ("failed", "its deadline passed")
    # Awarded, then the deadline comes before the device answers.
    task2, _ = await offered(hub, deadline=T0 + 30, timeout_s=60.0)
    await hub.handle(("a", bid(task2, 0.5)), ("b", bid(task2, 0.4)), now=T0 + 0.5)
    r = await hub.tick(T0 + 1)
    [award] = sent(r, "a", TaskAward)
    assert award.timeout_s == 29.0  # not beyond the deadline
    r = await hub.tick(T0 + 30)
    assert r.messages == []  # not handed on to b: the deadline ends it
    row = await hub.task(task2)
    assert (row["state"], row["reason"]) == ("failed", "its deadline passed")
    # A deadline already passed when it is first ticked.
    task3 = await hub.coord.offer_task("record", {}, LAB, T0 - 1, 60.0, now=T0 - 2)
    r = await hub.tick(T0)
    assert r.messages == []
    assert (await hub.task(task3))["reason"] == "its deadline passed"


async def test_a_done_task_is_a_hub_event_with_the_device(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("a", bid(task, 0.2)), ("b", bid(task, 0.8)), now=T0 + 1)
    await hub.tick(T0 + 1)
    r = await hub.handle(("b", done(task, 1, detail="recorded")), now=T0 + 3)
    assert r.messages == []
    assert any("done" in n and "on b" in n for n in r.notes)
    row = await hub.task(task)
    assert row["state"] == "done"
    assert json.loads(row["result"]) == {"device": "b", "detail": "recorded", "exit_code": 0}
    assert await hub.hub_events("task_done") == [("task_done", {"task": task, "reason": None, "device": "b",
                                                                "detail": "recorded", "exit_code": 0})]
    assert (await hub.bids(task))["b"]["outcome"] == "succeeded"
    # Done is final: ticks leave it, a repeat TaskDone changes nothing.
    assert (await hub.tick(T0 + 100)).messages == []
    await hub.handle(("b", done(task, 1, ok=False)), now=T0 + 101)
    assert (await hub.task(task))["state"] == "done"


async def test_a_bid_after_bidding_closed_is_not_stored(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("a", bid(task, 0.2)), now=T0 + 1)
    await hub.tick(T0 + BID_WINDOW_S)  # the window closed: a is awarded
    await hub.handle(("b", bid(task, 0.99)), now=T0 + BID_WINDOW_S + 0.1)
    assert set(await hub.bids(task)) == {"a"}
    # a fails: nobody else bid in time, so the task fails rather than going to the late bidder.
    r = await hub.handle(("a", done(task, 1, ok=False, detail="boom")), now=T0 + 5)
    assert r.messages == []
    assert (await hub.task(task))["reason"] == "every bidder failed: a failed: boom"
    # A bid for a task that does not exist is not stored either.
    await hub.handle(("a", bid(999, 1.0)), now=T0 + 6)
    assert await hub.bids(999) == {}


async def test_a_bid_after_its_bid_by_is_ignored_even_before_the_tick_closes_bidding(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, r = await offered(hub)
    [bid_by] = {m.bid_by for m in sent(r, kind=TaskOffer)}
    await hub.handle(("a", bid(task, 0.2)), now=T0 + 1)
    # b's bid is handled after bid_by (the TaskOffer says: "bids after this are not considered"),
    # in an ingest cycle that runs before the hub's next tick.
    await hub.handle(("b", bid(task, 0.99)), now=bid_by + 0.3)
    r = await hub.tick(bid_by + 0.4)
    assert to(r) == [("a", "TaskAward")]


async def test_a_bid_from_a_device_the_task_was_not_offered_to_is_ignored(hub: Hub) -> None:
    await hub.device("lab-1")
    await hub.device("lab-2")
    await hub.device("plant-1", site="plant")
    task, r = await offered(hub)
    assert [d for d, _ in r.messages] == ["lab-1", "lab-2"]
    await hub.handle(("lab-1", bid(task, 0.2)), ("plant-1", bid(task, 0.99)), now=T0 + 0.5)
    r = await hub.tick(T0 + 0.6)  # lab-2 has not answered yet: bidding stays open ...
    assert r.messages == []
    r = await hub.tick(T0 + BID_WINDOW_S)  # ... and the award goes to a device of the target
    assert to(r) == [("lab-1", "TaskAward")]


async def test_tasks_state_survives_a_restart(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub)
    await hub.handle(("a", bid(task, 0.7)), ("b", bid(task, 0.6)), now=T0 + 1)
    await hub.tick(T0 + 1)
    await hub.reopen()
    r = await hub.handle(("a", done(task, 1, ok=False, detail="crash")), now=T0 + 2)
    assert awards(r) == [("b", 2)]


async def test_no_award_is_made_after_the_deadline(hub: Hub) -> None:
    for d in ("a", "b"):
        await hub.device(d)
    task, _ = await offered(hub, deadline=T0 + 30, timeout_s=60.0)
    await hub.handle(("a", bid(task, 0.9)), ("b", bid(task, 0.5)), now=T0 + 0.5)
    await hub.tick(T0 + 1)
    # a reports its failure after the deadline, in an ingest cycle before the hub's next tick.
    r = await hub.handle(("a", done(task, 1, ok=False, detail="boom")), now=T0 + 30.2)
    assert sent(r, kind=TaskAward) == []  # b must not be asked to start work past the deadline
    row = await hub.task(task)
    assert (row["state"], row["reason"]) == ("failed", "its deadline passed")


# --- the hub service's ingest cycle -------------------------------------------------------------


class FakeSession:
    """The hub's MQTT session: one batch of messages, then nothing; publishes are recorded."""

    def __init__(self, messages: list[Message]) -> None:
        self._messages = messages
        self.published: list[tuple[str, CoordDown]] = []
        self.idle = asyncio.Event()  # set when the hub asks for more: its cycle is over
        self._never = asyncio.Event()

    async def next_message(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        self.idle.set()
        await self._never.wait()
        raise AssertionError("unreachable")

    async def one_cycle(self, service: HubService) -> None:
        """Run the hub's ingest loop until it has handled the batch, then stop it; the replies it
        queued go out through the hub's own reply sender."""
        outgoing: asyncio.Queue[Replies] = asyncio.Queue()
        task = asyncio.create_task(service._ingest(self, outgoing, AckSender(), RetainedSweeper()))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(5):
                await self.idle.wait()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        sender = asyncio.create_task(HubService._send_replies(self, outgoing))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(5):
                await outgoing.join()
        finally:
            sender.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sender

    def drain(self, limit: int) -> list[Message]:
        out, self._messages = self._messages[:limit], self._messages[limit:]
        return out

    def ack(self, message: Message) -> None:
        return None

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if topic.endswith("/down/coord"):
            self.published.append((topic, unpack_down(payload)))


def _ingest_only_service(hub: Hub) -> HubService:
    """The hub service's ingest cycle over the test's store (no broker, no CA: nothing here renews)."""
    service = HubService.__new__(HubService)
    service._store, service.ingest, service.coordination = hub.store, Ingest(hub.store), hub.coord
    service.certificates = CertificateDesk(HubPaths(Path("/nonexistent")), HubConfig(region="test"), hub.store)
    service.watchdog = Watchdog(None)
    return service


async def test_a_request_resent_with_the_reconnect_presence_is_answered(hub: Hub) -> None:
    """The agent reconnects: it publishes its presence, then at once sends its open requests again
    (HubCoordinator.on_connected). Both land in one ingest cycle of the hub."""
    await hub.device("a")
    await hub.offline("a", T0)  # its Last Will, when the connection dropped
    service = _ingest_only_service(hub)
    session = FakeSession([
        Message(presence_topic("a"), encode(Presence(state="online", session="s2")), 1, True, 1),
        Message(up_topic("a", COORD), pack_coord(req("ra")), 1, False, 2),
    ])
    await session.one_cycle(service)
    assert (await hub.store.devices("a"))[0].online
    # The agent does not ask again until its next reconnect: without this answer it waits wait_s for nothing.
    assert session.published == [(down_topic("a", COORD), LeaseGrant(id="ra", name="L", token=1, expires_in_s=TTL))]


async def test_the_ingest_cycle_answers_a_request_of_an_online_device(hub: Hub) -> None:
    """The same harness as above, with the device's presence already applied: the grant is published
    after the cycle (the control for the test above)."""
    await hub.device("a")
    service = _ingest_only_service(hub)
    session = FakeSession([Message(up_topic("a", COORD), pack_coord(req("ra")), 1, False, 2)])
    await session.one_cycle(service)
    assert session.published == [(down_topic("a", COORD), LeaseGrant(id="ra", name="L", token=1, expires_in_s=TTL))]


class StalledAcks:
    """A hub session whose ack publishes get no PUBACK until `puback` is set: as when the session
    has stopped reading its socket because more messages wait than it reads ahead."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.committed: list[int] = []  # mids the hub PUBACKed (it does so once they are in the database)
        self.acks: list[tuple[str, int]] = []  # (device, through) of each ack published
        self.puback = asyncio.Event()
        self.changed = asyncio.Event()  # set on each PUBACK and each publish

    async def next_message(self) -> Message:
        return await self.inbox.get()

    def drain(self, limit: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < limit and not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def ack(self, message: Message) -> None:
        self.committed.append(message.mid)
        self.changed.set()

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert topic.endswith(f"/down/{ACK}"), topic
        self.acks.append((topic.split("/")[3], unpack(payload, Ack).through))
        self.changed.set()
        await self.puback.wait()

    async def until(self, what: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not what():
                self.changed.clear()
                await self.changed.wait()


def batch(base: int, last: int, mid: int) -> Message:
    seqs = list(range(base + 1, last + 1))
    payload = pack(Batch(base=base, last=last, names=["t"], seq=seqs, ts=[T0 + s for s in seqs],
                         metric=[0] * len(seqs), value=[float(s) for s in seqs]))
    return Message(up_topic("a", TELEMETRY), payload, 1, False, mid)


async def test_the_ingest_goes_on_while_its_acks_wait_for_their_pubacks(hub: Hub) -> None:
    """The hub once awaited the PUBACKs of its acks before taking more messages; with the session
    no longer reading its socket those PUBACKs could not arrive, and the hub stalled until the
    broker dropped it. Now the ingest commits on, and the acks that wait are merged per device."""
    await hub.device("a")
    service, session = _ingest_only_service(hub), StalledAcks()
    acks = AckSender()
    outgoing: asyncio.Queue[Replies] = asyncio.Queue()
    tasks = [asyncio.create_task(service._ingest(session, outgoing, acks, RetainedSweeper())),  # type: ignore[arg-type]
             asyncio.create_task(acks.serve(session))]  # type: ignore[arg-type]
    try:
        session.inbox.put_nowait(batch(0, 3, mid=1))
        await session.until(lambda: session.acks == [("a", 3)])  # published; its PUBACK does not come
        session.inbox.put_nowait(batch(3, 6, mid=2))
        await session.until(lambda: 2 in session.committed)
        session.inbox.put_nowait(batch(6, 9, mid=3))
        await session.until(lambda: 3 in session.committed)
        assert session.acks == [("a", 3)]  # the later acks wait, as one
        session.puback.set()
        await session.until(lambda: len(session.acks) == 2)
        assert session.acks == [("a", 3), ("a", 9)]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [r[0] for r in await hub.store.query("SELECT seq FROM telemetry WHERE device = 'a' ORDER BY seq")] \
        == list(range(1, 10))
