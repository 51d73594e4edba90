"""A device cannot fill the broker's memory with retained messages (issue 15, item 5).

Measured on the real broker: its RSS before and after a device publishes 200 retained messages
of 250 kB on up/ topics the hub does not define (before the fix: 10.8 → 60.1 MB, kept), one on
each up/ kind the hub does define, and an oversized presence; then what a new subscriber to
the whole tree is handed. Run with -s for the figures.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import psutil
import pytest

from edgefleet.errors import PublishRefused
from edgefleet.mqtt.session import Message, MqttSession
from edgefleet.wire.protocol import (
    MAX_PRESENCE_BYTES,
    TOPIC_ROOT,
    UP_KINDS,
    Presence,
    decode,
    down_topic,
    encode,
    presence_topic,
    up_topic,
)
from hub.config import HubPaths
from tests.integration.test_hub_session import start_external_broker
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, hub_tap, run_cli, start_hub

pytestmark = pytest.mark.integration

FILLER, HONEST = "filler", "honest"
COUNT, SIZE = 200, 250_000
NOT_AUTHORIZED = 135
PUBLISH_TIMEOUT = 60.0  # 200 x 250 kB over TLS on a loaded 2-core machine
CLEAR_TIMEOUT = 20.0
ARRIVAL = 10.0
# The broker's RSS may grow this much at most: it reads each refused 250 kB packet into memory
# before it refuses it, and the allocator keeps some of that. Before the fix it grew by ~50 MB.
RSS_GROWTH_LIMIT = 15 * 2**20
MARKER = down_topic("zz-marker", "end")  # published after subscribing: every retained copy came before it


def presence(session: str, **tags: str) -> bytes:
    return encode(Presence(state="online", session=session, agent_version="test", profile="sim", tags=tags))


def broker_rss(hub_dir: HubDir) -> int:
    return int(psutil.Process(int((hub_dir.dir / "run" / "mosquitto.pid").read_text())).memory_info().rss)


async def missing_clears(hub: Proc, topics: list[str], after: int) -> set[str]:
    """The topics whose retained message the hub has not cleared within CLEAR_TIMEOUT."""
    missing = set(topics)
    for topic in topics:
        try:
            await hub.wait_for(rf"cleared the retained message on {re.escape(topic)}\b", CLEAR_TIMEOUT, after)
        except AssertionError:
            continue
        missing.discard(topic)
    return missing


async def retained_copies(tap: MqttSession) -> list[Message]:
    """What the broker handed a new subscriber to the whole tree as retained."""
    await tap.publish(MARKER, b"end", qos=1)
    seen: list[Message] = []
    async with asyncio.timeout(ARRIVAL):
        while (message := await tap.next_message()).topic != MARKER:
            seen.append(message)
    return [m for m in seen if m.retain]


async def test_a_device_cannot_keep_large_retained_messages(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, FILLER, HONEST)
    before = broker_rss(hub_dir)
    mark = hub.mark()
    blob = b"\xa5" * SIZE
    honest = await connect(device_identity(bundles / HONEST), hub_dir.port, HONEST)
    filler = await connect(device_identity(bundles / FILLER), hub_dir.port, FILLER)
    try:
        # The one message a device retains legitimately: it stays (the positive control).
        await honest.publish(presence_topic(HONEST), presence("s-honest", site="lab"), qos=1, retain=True)
        refused: list[int] = []
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            for i in range(COUNT):
                try:
                    await filler.publish(up_topic(FILLER, f"x{i}"), blob, qos=1, retain=True)
                except PublishRefused as exc:
                    refused.append(exc.code)
            # The kinds the hub defines: the ACL must let them through, so the hub clears them.
            for kind in UP_KINDS:
                await filler.publish(up_topic(FILLER, kind), blob, qos=1, retain=True)
            oversized = presence("s-filler", junk="j" * SIZE)
            await filler.publish(presence_topic(FILLER), oversized, qos=1, retain=True)
    finally:
        await filler.close()
        await honest.close()
    kept = [up_topic(FILLER, kind) for kind in UP_KINDS] + [presence_topic(FILLER)]
    missing = await missing_clears(hub, kept, mark)
    after = broker_rss(hub_dir)
    async with hub_tap(hub_dir, hub, [f"{TOPIC_ROOT}/#"]) as tap:
        handed = await retained_copies(tap)
    print(f"broker RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MB after {COUNT} x {SIZE} B retained on "
          f"undefined up/ topics ({len(refused)} refused), {len(UP_KINDS)} on the defined kinds and a "
          f"{len(oversized)} B presence; a new subscriber was handed {len(handed)} retained message(s), "
          f"{sum(len(m.payload) for m in handed)} B: {[(m.topic, len(m.payload)) for m in handed][:3]}")

    assert refused == [NOT_AUTHORIZED] * COUNT
    assert not missing, f"never cleared: {sorted(missing)}"
    assert [m.topic for m in handed] == [presence_topic(HONEST)]
    assert decode(handed[0].payload, Presence).session == "s-honest"
    assert len(oversized) > MAX_PRESENCE_BYTES
    assert after - before < RSS_GROWTH_LIMIT, f"broker RSS grew by {(after - before) / 2**20:.1f} MB"
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert re.search(r"retained \d+", out), out  # the operator sees what the hub cleared, and why
    assert re.search(r"too_large \d+", out), out


async def test_the_hub_clears_what_a_device_retained_before_it_listened(hub_dir: HubDir, bundles: Path,
                                                                        workdir: Path) -> None:
    """A retained message left on an up/ topic while no hub was connected (an external broker,
    or one with persistence) reaches no shared subscription: the hub looks for it at connect."""
    paths = HubPaths(hub_dir.dir.resolve())
    await hub_dir.provision(bundles, FILLER)
    broker = await start_external_broker(paths, workdir)
    hub = None
    try:
        filler = await connect(device_identity(bundles / FILLER), hub_dir.port, FILLER)
        try:
            await filler.publish(up_topic(FILLER, "status"), b"\xa5" * SIZE, qos=1, retain=True)
        finally:
            await filler.close()
        hub = await start_hub(hub_dir)
        assert not await missing_clears(hub, [up_topic(FILLER, "status")], 0)
        async with hub_tap(hub_dir, hub, [f"{TOPIC_ROOT}/#"]) as tap:
            assert await retained_copies(tap) == []
    finally:
        for proc in (hub, broker):
            if proc is not None:
                await proc.stop()
