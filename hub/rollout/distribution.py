"""Sends each device its intended policy version, signed, and keeps rollouts moving.

Every device's intended version is a row in `assignments`. Once a second the publisher
lets `rollout.tick` advance or roll back each rollout in progress, then publishes, retained on the
device's own down/policy topic, every assignment that differs from what it last sent on
this connection: after a reconnect (the broker may have restarted without its retained
messages) that is all of them. A device that stays online but off its intended version for
longer than the drift grace period is sent it again, at most once per grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from edgefleet.mqtt.link import SESSION_ENDED
from edgefleet.mqtt.session import MqttSession
from edgefleet.wire.protocol import POLICY, PolicyDocument, down_topic, pack
from hub.config import HubConfig
from hub.db.interface import UNAVAILABLE, HubState
from hub.rollout import rollouts as rollout
from hub.rollout.signing import seal

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TICK_INTERVAL: Final = 1.0  # how soon a pushed policy, a breach or a baked wave is acted on
PUBLISH_CHUNK: Final = 200  # publishes awaited together: keeps within the session's in-flight window

log = logging.getLogger("hub.policy")


class PolicyPublisher:
    def __init__(self, config: HubConfig, store: HubState, signing_key: Ed25519PrivateKey) -> None:
        self._config, self._store, self._key = config, store, signing_key
        self._texts: dict[int, str | None] = {}  # policy versions never change: cache their text

    async def serve(self, session: MqttSession) -> None:
        """Until the session ends; `sent` is per connection, so a new one re-publishes everything."""
        sent: dict[str, tuple[int, float]] = {}  # device -> (version, when) last published
        while True:
            try:
                now = time.time()
                for transition in await rollout.tick(self._store, self._config.identity, self._config.rollout, now):
                    level = logging.WARNING if transition.kind == "rolled_back" else logging.INFO
                    log.log(level, "%s", transition.message)
                await self.publish_due(session, sent, now)
            except UNAVAILABLE as exc:  # the operator's CLI holds the database: next tick
                log.warning("hub database unavailable for rollouts (%s); trying again", exc)
            except SESSION_ENDED:
                raise
            except Exception:  # a rollout bug must not take the ingest down with it
                log.exception("policy distribution failed; trying again in %.0f s", TICK_INTERVAL)
            await asyncio.sleep(TICK_INTERVAL)

    async def publish_due(self, session: MqttSession, sent: dict[str, tuple[int, float]], now: float) -> int:
        grace = self._config.rollout.drift_grace_s
        due: list[tuple[str, str, int]] = []
        for device, profile, version, online, applied, since in await self._store.query(
            "SELECT a.device, d.profile, a.version, d.online, d.policy_version, "
            "CASE WHEN a.assigned_at > COALESCE(d.connected_at, 0) THEN a.assigned_at "
            "ELSE COALESCE(d.connected_at, 0) END FROM assignments a "
            "JOIN devices d ON d.device = a.device WHERE d.revoked_at IS NULL"
        ):
            last = sent.get(device)
            if last is None or last[0] != version:
                due.append((device, profile, version))
            elif online and applied != version and now - max(since, last[1]) > grace:
                log.warning("device %s drifted: on version %s, intended %d for %.0f s; sending it again",
                            device, applied, version, now - since)
                due.append((device, profile, version))
        began = time.monotonic()
        for start in range(0, len(due), PUBLISH_CHUNK):
            chunk = due[start:start + PUBLISH_CHUNK]
            await asyncio.gather(*(self._publish(session, *item) for item in chunk))
            for device, _, version in chunk:
                sent[device] = (version, now)
        if due:
            log.info("sent %d signed policies in %.2f s", len(due), time.monotonic() - began)
        return len(due)

    async def _publish(self, session: MqttSession, device: str, profile: str, version: int) -> None:
        doc = PolicyDocument(version=version, device=device, profile=profile, region=self._config.region,
                             text=await self._text(version), issued_at=time.time())
        envelope = seal(pack(doc), self._key)
        # Retained: a device that connects later (or reconnects) gets its version on subscribing.
        await session.publish(down_topic(device, POLICY), pack(envelope), qos=1, retain=True)

    async def _text(self, version: int) -> str | None:
        if version not in self._texts:
            rows = await self._store.query("SELECT text FROM policies WHERE version = ?", (version,))
            self._texts[version] = rows[0][0] if rows else None
        return self._texts[version]
