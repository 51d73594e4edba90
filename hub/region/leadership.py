"""Which hub process runs the region's timed loops, when several share one hub (replicas).

This is the one place where the hub assumes that a thing is done by one process only.
Every replica ingests (an MQTT 5 shared subscription hands each device message to one of
them) and answers the coordination requests it receives: those are transactions that
re-read what they change, so it does not matter which replica runs them. The loops that act
on time rather than on a message run in the leader only:

- rollouts and policy publication (hub/rollout/distribution.py): one replica publishes, so a device
  is not sent its policy twice and a wave is judged once;
- coordination's timers (hub/region/coordination.py `tick`): lease expiries, approval expiries,
  task phases;
- the CRL upkeep: one writer of the file and one broker reload.

The leader holds a row of hub.db, renewed every LEADER_RENEW_S and valid LEADER_TTL_S. A
replica that finds it expired (its holder killed, hung, or cut off from the database) takes
it over; one whose renewal fails stops leading before its row can expire. A replica keeps its
name across restarts, so a restarted leader takes its row back at once. With PostgreSQL the row
is judged on the database's clock (`now()`), so replicas on separate machines need no synchronised
clocks for it (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from hub.db.interface import HubState, StoreUnavailable

LEADER_TTL_S: Final = 10.0  # a killed leader's loops resume in another replica within this (+ a renewal)
LEADER_RENEW_S: Final = 2.0  # several renewals fit in the TTL: one slow transaction does not lose it
ROLE: Final = "region"
CA_ROLE: Final = "ca"  # the CA's upkeep (CRL, the hub's own certificates), contested only where the CA key is

log = logging.getLogger("hub.leadership")


class Leadership:
    """`run()` is the renewal task; `while_leading(work)` runs `work` in the leader only."""

    def __init__(self, store: HubState, holder: str, *, ttl_s: float = LEADER_TTL_S,
                 renew_s: float = LEADER_RENEW_S, clock: Callable[[], float] = time.time, role: str = ROLE) -> None:
        self._store, self.holder, self._ttl_s, self._renew_s, self._clock = store, holder, ttl_s, renew_s, clock
        self.role = role
        self._failing = False  # the latest renewal failed: say so once, not every LEADER_RENEW_S
        self._leading, self._following = asyncio.Event(), asyncio.Event()
        self._following.set()
        self._held_until = 0.0
        self.leader: str | None = None  # as of the latest renewal

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    async def until_leading(self) -> None:
        await self._leading.wait()

    async def renew(self) -> bool:
        """One attempt to take or keep the lead; True while this replica leads."""
        now = self._clock()
        try:
            holder, expires_at = await self._store.claim_leadership(self.role, self.holder, self._ttl_s, now)
        except StoreUnavailable as exc:
            # The database is busy past its timeout: keep leading only while the row surely is ours.
            log.log(logging.DEBUG if self._failing else logging.WARNING, "cannot renew the hub's leadership (%s)", exc)
            self._failing = True
            self._set(self.leading and self._clock() < self._held_until - self._renew_s, self.leader)
            return self.leading
        self._failing = False
        if holder == self.holder:
            self._held_until = now + self._ttl_s
        self._set(holder == self.holder, holder, expires_at)
        return self.leading

    def _set(self, leading: bool, holder: str | None, expires_at: float | None = None) -> None:
        if leading != self.leading or holder != self.leader:
            if leading:
                log.info("this hub process (%s) leads the %s: %s", self.holder, self.role,
                         "rollouts, coordination timers" if self.role == ROLE else "CRL and hub certificates")
            elif holder is not None and self.role == ROLE:
                log.info("%s leads the region until at least %s; this process (%s) ingests and answers devices",
                         holder, time.strftime("%H:%M:%S", time.localtime(expires_at or 0)), self.holder)
        self.leader = holder
        (self._leading if leading else self._following).set()
        (self._following if leading else self._leading).clear()

    async def run(self) -> None:
        """Renew every LEADER_RENEW_S until cancelled; the row is released on the way out."""
        try:
            while True:
                try:
                    # A renewal that hangs (a database gone quiet) must not outlast the row it renews.
                    async with asyncio.timeout(max(self._held_until - self._renew_s - self._clock(), self._renew_s)
                                               if self.leading else self._ttl_s):
                        await self.renew()
                except TimeoutError:
                    log.warning("the hub's %s leadership could not be renewed in time: this process stops "
                                "leading before its row can expire", self.role)
                    self._set(False, self.leader)
                await asyncio.sleep(self._renew_s)
        finally:
            if self.leading:
                self._set(False, None)
                await asyncio.shield(self._release())

    async def _release(self) -> None:
        """A clean stop hands the lead over at once instead of after the TTL."""
        try:
            await self._store.release_leadership(self.role, self.holder, self._clock())
        except StoreUnavailable as exc:
            log.warning("could not hand the hub's leadership over (%s); it passes on in %.0f s", exc, self._ttl_s)

    async def while_leading(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work` whenever this process leads, cancel it when the lead is lost; its errors propagate."""
        while True:
            await self.until_leading()
            task = asyncio.create_task(work())
            lost = asyncio.create_task(self._following.wait())
            try:
                await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            if task.done() and not task.cancelled():
                return  # the work ended by itself
            log.info("leadership lost: the region's loops stop here")
