"""The one clock fact the daemon checks itself: was the wall clock ever set?"""

from __future__ import annotations

import datetime as dt
from typing import Final

# No certificate of ours predates this: a clock before it has never been set (a board
# without a real-time clock boots in 1970 until NTP answers).
CLOCK_FLOOR: Final = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def unset_clock_warning(now: dt.datetime) -> str | None:
    if now >= CLOCK_FLOOR:
        return None
    return (
        f"The system clock reads {now:%Y-%m-%d %H:%M} UTC: this board has no real-time clock or has "
        "not synced its time yet, so TLS certificates look invalid. Enable time sync (timedatectl "
        "set-ntp true); the agent keeps sampling and connects by itself once the clock is right."
    )
