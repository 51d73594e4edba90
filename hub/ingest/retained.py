"""Retained messages no device may keep at the broker: found and cleared (docs/security.md).

A device legitimately retains one message, its presence (at most MAX_PRESENCE_BYTES). The ACL
lets it publish only on the up/ kinds the hub defines, but cannot refuse the retain flag there:
the hub sees that flag (retain-as-published) and clears such a message, as it clears a presence
it rejects, by publishing an empty retained message on the topic. A message retained while no hub
listened reaches the hub when it subscribes: Mosquitto 2.0.11 hands a new shared subscription the
retained messages it matches (MQTT 5 says it should not; another broker must be checked for this,
docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from edgefleet.mqtt.session import MqttSession

log = logging.getLogger("hub.retained")


class RetainedSweeper:
    """Clears retained messages apart from the ingest loop, which must not wait for PUBACKs
    (hub.service.AckSender says why). Pending topics are a set: a device publishing the same
    retained message again and again costs one clear per round, not a growing queue."""

    def __init__(self) -> None:
        self._due: set[str] = set()
        self._news = asyncio.Event()

    def put(self, topics: Iterable[str]) -> None:
        self._due.update(topics)
        if self._due:
            self._news.set()

    async def serve(self, session: MqttSession) -> None:
        while True:
            await self._news.wait()
            self._news.clear()
            due, self._due = self._due, set()
            await asyncio.gather(*(self._clear(session, topic) for topic in sorted(due)))

    @staticmethod
    async def _clear(session: MqttSession, topic: str) -> None:
        await session.publish(topic, b"", qos=1, retain=True)
        log.debug("cleared the retained message on %s", topic)
