"""The agent daemon: presence, and (later) sensing, deciding, buffering and syncing."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import signal
import time

from edge_agent import __version__
from edge_agent.clock import unset_clock_warning
from edge_agent.config import AgentSettings
from edge_agent.link import Link
from edge_agent.mqtt import MqttSession, Will
from edge_agent.protocol import Presence, down_filter, encode, presence_topic

log = logging.getLogger("edge_agent")


class Agent:
    """One device. `await Agent(settings).run()` until cancelled or signalled."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device = settings.config.device_id
        self._session_id = ""
        self.link = Link(f"agent {self.device}", self._new_session, self._serve, logger=log)

    def _presence(self, state: str) -> bytes:
        c = self.settings.config
        return encode(Presence(
            state="online" if state == "online" else "offline", session=self._session_id,
            agent_version=__version__, profile=c.profile, tags=dict(c.tags), ts=time.time(),
        ))

    def _new_session(self) -> MqttSession:
        c = self.settings.config
        # A fresh id per connection: the hub ignores a late Last Will of an older one.
        self._session_id = secrets.token_hex(8)
        return MqttSession(
            client_id=self.device, host=c.broker.host, port=c.broker.port,
            tls=self.settings.tls.context(), keepalive=c.broker.keepalive,
            connect_timeout=c.broker.connect_timeout,
            will=Will(presence_topic(self.device), self._presence("offline")),
        )

    async def _serve(self, session: MqttSession) -> None:
        await session.subscribe([(down_filter(self.device), 1)])
        await session.publish(presence_topic(self.device), self._presence("online"), qos=1, retain=True)
        log.info("%s online (profile %s)", self.device, self.settings.config.profile)
        while True:
            message = await session.next_message()
            log.debug("message on %s (%d bytes) not handled yet", message.topic, len(message.payload))

    async def run(self) -> None:
        self._warn_about_clock()
        await self.link.run()

    def _warn_about_clock(self) -> None:
        # Not the certificate-based check of `edge-agent check`: parsing X.509 here would load
        # `cryptography` (about 15 MB of RSS) into the daemon for one log line.
        problem = unset_clock_warning(dt.datetime.now(dt.UTC))
        if problem:
            log.warning("%s", problem)

    async def stop(self) -> None:
        """Leave cleanly: the broker publishes our Last Will, so the hub sees us offline now."""
        if self.link.session is not None:
            await self.link.session.close(with_will=True)


async def run_agent(settings: AgentSettings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings)
    task = asyncio.create_task(agent.run(), name="agent")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        task.result()  # re-raise what ended it
    await agent.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
