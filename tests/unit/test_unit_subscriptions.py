"""The hub's secret share group and its watch on devices' subscriptions, without a broker."""

from __future__ import annotations

import asyncio
import json
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgefleet.wire.protocol import UP_FILTER, down_filter, shared_filter
from hub.config import HubConf, HubConfig, HubPaths
from hub.db.store import HubStore
from hub.errors import HubError
from hub.ingest.subscriptions import FOREIGN, GROUP_PATTERN, SubscriptionWatch, own_filter, share_group

CONFIG = HubConfig(region="r1", hub=HubConf(replicas=("b",)))


def test_share_group_is_made_once_private_and_kept(tmp_path: Path) -> None:
    paths = HubPaths(tmp_path)
    first = share_group(paths)
    assert GROUP_PATTERN.fullmatch(first)
    assert stat.S_IMODE(paths.share_group.stat().st_mode) == 0o600
    assert share_group(paths) == first
    assert share_group(HubPaths(tmp_path / "other")) != first  # another hub, another secret
    assert shared_filter(first, UP_FILTER) == f"$share/{first}/{UP_FILTER}"
    assert [p.name for p in paths.pki.iterdir()] == ["share-group"]  # no drafts left behind


def test_hub_processes_starting_together_agree_on_one_group(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        names = set(pool.map(lambda _: share_group(HubPaths(tmp_path)), range(32)))
    assert len(names) == 1


def test_a_damaged_group_file_is_refused_in_words(tmp_path: Path) -> None:
    paths = HubPaths(tmp_path)
    paths.pki.mkdir()
    paths.share_group.write_text("hub-r1\n")  # the old, guessable name: never accepted
    with pytest.raises(HubError, match=r"does not hold a subscription group name: delete it"):
        share_group(paths)


@pytest.mark.parametrize(("device", "topic_filter", "own"), [
    ("dev-a", down_filter("dev-a"), True),
    ("dev-a", "edgefleet/v1/dev/dev-a/down/ack", True),
    ("dev-a", down_filter("dev-b"), False),
    ("dev-a", "edgefleet/v1/dev/dev-a/down/#", False),
    ("dev-a", "edgefleet/v1/dev/dev-a/down/ack/more", False),
    ("dev-a", "edgefleet/v1/dev/dev-a/up/+", False),
    ("dev-a", f"$share/x/{down_filter('dev-a')}", False),
    ("dev-a", "#", False),
])
def test_own_filter(device: str, topic_filter: str, own: bool) -> None:
    assert own_filter(device, topic_filter) is own


async def test_a_foreign_subscription_becomes_one_hub_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = await HubStore.open(tmp_path / "hub.db")
    try:
        await _foreign_subscriptions(store, caplog)
    finally:
        await store.close()


async def _foreign_subscriptions(store: HubStore, caplog: pytest.LogCaptureFixture) -> None:
    watch = SubscriptionWatch(store, CONFIG)
    steal = f"$share/hub-r1/{UP_FILTER}"
    for line in [
        "1796539738: New client connected from 127.0.0.1:36553 as dev-a (p5, c1, k30, u'dev-a').",
        f"1796539738: dev-a 1 {down_filter('dev-a')}",  # its own: fine
        f"1796539738: hub.r1 1 {steal}",  # the hub and its replicas subscribe to anything
        f"1796539738: hub.r1.b 1 {steal}",
        f"1796539739: dev-a 1 {steal}",
        f"1796539739: dev-a 1 {steal}",  # again, at once: noticed once
        "1796539739: dev-a 0 a topic with spaces",
        "1796539740: Client dev-a disconnected.",
    ]:
        watch.line(line)
    serving = asyncio.create_task(watch.serve())
    try:
        async with asyncio.timeout(5):
            await watch.recorded()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    rows = await store.query("SELECT body FROM events WHERE device = 'hub.r1' AND kind = ?", (FOREIGN,))
    assert [json.loads(r[0]) for r in rows] == [{"device": "dev-a", "filter": steal, "qos": 1},
                                                {"device": "dev-a", "filter": "a topic with spaces", "qos": 0}]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"device dev-a subscribed to {steal}, outside its own edgefleet/v1/dev/dev-a/down/+")
