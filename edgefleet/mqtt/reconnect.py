"""Reconnect policy: capped, jittered exponential backoff that resets only after stability."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Final

INITIAL_DELAY: Final = 0.5  # first retry: quick enough to ride out a broker restart
MAX_DELAY: Final = 60.0  # a fleet of thousands must not hammer a hub that is coming back
# A connection must last this long before the backoff forgets past failures: a device
# whose session is kicked right after CONNACK (duplicate id, revoked) must not hammer.
STABLE_AFTER: Final = 30.0


class LinkState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt


@dataclass
class Backoff:
    initial: float = INITIAL_DELAY
    maximum: float = MAX_DELAY
    stable_after: float = STABLE_AFTER
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    state: LinkState = LinkState.IDLE
    _connected_at: float | None = None

    def connecting(self) -> None:
        self.state = LinkState.CONNECTING

    def connected(self, now: float) -> None:
        """CONNACK arrived. The failure count stays until the link proves stable."""
        self.state = LinkState.CONNECTED
        self._connected_at = now

    def lost(self, now: float, *, auth: bool = False) -> float:
        """The attempt failed or the connection dropped: return how long to wait."""
        if self._connected_at is not None and now - self._connected_at >= self.stable_after:
            self.failures = 0
        self._connected_at = None
        self.failures += 1
        self.state = LinkState.WAITING
        if auth:
            # Our identity was refused: retrying fast cannot help, and it shows up in
            # the broker's log as an attack. Wait the longest.
            return self.maximum
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self.failures - 1, 30))
        # "Equal jitter": never less than half the ceiling, so a storm still spreads out.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)
