"""Who may take the hub's messages: the secret name of its shared subscription group, and a
watch on the subscriptions devices make (docs/security.md, "Subscriptions").

Mosquitto 2.0.11's acl_file grants every SUBSCRIBE and checks read access per message at
delivery. A device that joined the hub's share group would be handed its turn of the devices'
messages, and the broker would drop them at delivery while the publishers got PUBACK Success.
So the group's name is a secret of the hub directory: no device can name it, and a device in a
group of its own receives only what the read ACL lets it read, its own down/ topics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefleet.runtime.files import sync_directory, write_atomic
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import NAME_PATTERN, down_topic
from hub.config import HubConfig, HubPaths
from hub.db.interface import UNAVAILABLE, HubState, Tx
from hub.errors import HubError

GROUP_PATTERN: Final = re.compile(r"ingest-[0-9a-f]{32}")  # 128 random bits: not guessable
# Mosquitto's `log_type subscribe` line: "<time>: <client id> <qos> <topic filter>". The client
# id is the certificate CN (use_username_as_clientid), so it names who subscribed.
SUBSCRIBE_LINE: Final = re.compile(r"\d+: (?P<client>\S+) (?P<qos>[0-2]) (?P<filter>.+)")
FOREIGN: Final = EventKind.FOREIGN_SUBSCRIPTION  # the hub event's kind
# One event per device and filter this often: a device that subscribes in a loop is told of
# once per interval, and cannot fill the hub database.
NOTICE_INTERVAL_S: Final = 600.0
MAX_REMEMBERED: Final = 10_000  # (device, filter) pairs remembered for that; forgotten all at once past it
MAX_PENDING: Final = 1_000  # events waiting for the database; more are logged but not recorded
DB_RETRY_WAIT: Final = 1.0

log = logging.getLogger("hub.subscriptions")


def share_group(paths: HubPaths) -> str:
    """The hub's share group, made now (by whichever hub process comes first) if there is none."""
    path = paths.share_group
    if not path.exists():
        _create_group(path)
    try:
        name = path.read_text().strip()
    except OSError as exc:
        raise HubError(f"cannot read {path} ({exc.strerror}): run edge-hub as the account that owns "
                       "the hub directory") from None
    if not GROUP_PATTERN.fullmatch(name):
        raise HubError(f"{path} does not hold a subscription group name: delete it, then start every hub "
                       "process of this region again (they make and share a new one)")
    return name


def _create_group(path: Path) -> None:
    """Create-if-absent in one step: a primary and a replica starting together agree on one name."""
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    write_atomic(draft, f"ingest-{secrets.token_hex(16)}\n".encode(), 0o600)
    try:
        os.link(draft, path)  # fails if another process was first: its name counts
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)
    sync_directory(path.parent)


def own_filter(device: str, topic_filter: str) -> bool:
    """A filter within the device's own down/ topics, the only ones the ACL lets it read."""
    prefix = down_topic(device, "")
    kind = topic_filter.removeprefix(prefix)
    return kind != topic_filter and (kind == "+" or NAME_PATTERN.fullmatch(kind) is not None)


@dataclass(frozen=True, slots=True)
class Subscription:
    device: str
    filter: str
    qos: int


class SubscriptionWatch:
    """Reads the broker's subscribe lines; a device subscribing outside its own down/ topics is
    logged (WARNING) and recorded as a `foreign_subscription` hub event naming it."""

    def __init__(self, store: HubState, config: HubConfig) -> None:
        self._store, self._hub = store, config.identity
        self._hubs = frozenset(config.hub_identities)
        self._noticed: dict[tuple[str, str], float] = {}
        self._pending: asyncio.Queue[Subscription] = asyncio.Queue(MAX_PENDING)

    def line(self, line: str) -> None:
        """One line of the broker's log."""
        match = SUBSCRIBE_LINE.fullmatch(line)
        if match is None or match["client"] in self._hubs:
            return
        seen = Subscription(match["client"], match["filter"], int(match["qos"]))
        if own_filter(seen.device, seen.filter):
            return
        now, key = time.monotonic(), (seen.device, seen.filter)
        if now - self._noticed.get(key, -NOTICE_INTERVAL_S) < NOTICE_INTERVAL_S:
            log.debug("device %s subscribed to %s again", seen.device, seen.filter)
            return
        if len(self._noticed) >= MAX_REMEMBERED:
            self._noticed.clear()
        self._noticed[key] = now
        log.warning("device %s subscribed to %s, outside its own %s: the broker delivers it nothing from there, "
                    "and no agent does this, so find out who uses its certificate (hub event %s)",
                    seen.device, seen.filter, down_topic(seen.device, "+"), FOREIGN)
        if self._pending.full():
            log.debug("not recorded (%d events waiting for the database): %s", MAX_PENDING, seen)
        else:
            self._pending.put_nowait(seen)

    async def serve(self) -> None:
        """Record what `line` noticed, as hub events."""
        while True:
            batch = [await self._pending.get()]
            while not self._pending.empty():
                batch.append(self._pending.get_nowait())
            await self._record(batch)
            for _ in batch:
                self._pending.task_done()

    async def recorded(self) -> None:
        """Wait until everything noticed so far is in the database (`serve` must be running)."""
        await self._pending.join()

    async def _record(self, batch: list[Subscription]) -> None:
        async def work(db: Tx) -> None:
            for seen in batch:
                await self._store.hub_event(db, self._hub, FOREIGN,
                                            {"device": seen.device, "filter": seen.filter, "qos": seen.qos})
        while True:
            try:
                await self._store.atomically(work)
                return
            except UNAVAILABLE as exc:
                log.warning("hub database unavailable for %s events (%s); retrying", FOREIGN, exc)
                await asyncio.sleep(DB_RETRY_WAIT)
