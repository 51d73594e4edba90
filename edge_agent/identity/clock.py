"""The wall clock the agent stamps records with, and what it does when that clock was not set.

A board without a real-time clock boots in 1970 (or, with fake-hwclock, at its last shutdown)
and keeps sampling until NTP steps the clock. The kernel's boot-time clock (CLOCK_BOOTTIME)
runs steadily through such a step; only the wall clock's offset from it changes. So while the
wall clock is not known good, the agent keeps a *frame*: the boot's id, the offset its records
were stamped with, and the first sequence number stamped so. When the offset changes (the
clock was stepped) every record of the frame is moved by the difference, and the frame ends
once the clock is known good: the kernel says it is synchronised, or a step landed past
CLOCK_FLOOR. A frame left open by an earlier boot cannot be corrected any more (boot time does
not survive a reboot): its records are flagged instead. See docs/store-and-forward.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

# No certificate of ours predates this: a clock before it has never been set (a board
# without a real-time clock boots in 1970 until NTP answers).
CLOCK_FLOOR: Final = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
FLOOR_TS: Final = CLOCK_FLOOR.timestamp()
# A change of the wall clock's offset from boot time larger than this is a step; NTP slews
# smaller errors away gradually (timesyncd steps from 0.4 s, chrony's usual makestep from 1 s).
STEP_TOLERANCE: Final = 1.0
# The kernel's synchronisation flag is asked at most this often (a syscall; stamps are frequent).
SYNC_POLL: Final = 1.0
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
_TIME_ERROR: Final = 5  # adjtimex(2): the clock is not synchronised
_TIMEX_SIZE: Final = 512  # struct timex is 208 bytes on 64-bit Linux; room to spare


def unset_clock_warning(now: dt.datetime) -> str | None:
    if now >= CLOCK_FLOOR:
        return None
    return (
        f"The system clock reads {now:%Y-%m-%d %H:%M} UTC: this board has no real-time clock or has "
        "not synced its time yet, so TLS certificates look invalid. Enable time sync (timedatectl "
        "set-ntp true); the agent keeps sampling and connects by itself once the clock is right."
    )


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def kernel_synchronised() -> bool:
    """What `timedatectl` shows as "System clock synchronized" (adjtimex, read-only)."""
    adjtimex = getattr(_libc(), "adjtimex", None)
    if adjtimex is None:  # not Linux: no way to know, so never "known good" by this
        return False
    return int(adjtimex(ctypes.create_string_buffer(_TIMEX_SIZE))) not in (-1, _TIME_ERROR)


def boot_time() -> float:
    """Seconds since boot, suspend included; only steps of the wall clock move it against time.time()."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def read_boot_id(path: Path = BOOT_ID_PATH) -> int:
    """This boot's id as a 63-bit number (it fits the outbox's INTEGER meta); 0 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip().replace("-", ""), 16) >> 65
    return 0


@dataclass(frozen=True)
class Probes:
    """The clocks a RecordClock reads; tests give their own."""

    realtime: Callable[[], float] = time.time
    boottime: Callable[[], float] = boot_time
    synchronised: Callable[[], bool] = kernel_synchronised
    boot_id: Callable[[], int] = read_boot_id


SYSTEM_CLOCKS: Final = Probes()


class Frame(NamedTuple):
    """Records from `first` on were stamped as boot time + `offset`, in boot `boot`."""

    boot: int
    offset: float
    first: int


class Shift(NamedTuple):
    """Move the records from `first` to the latest one by `seconds`: the clock was stepped."""

    first: int
    seconds: float
    closes: bool  # it is known good now: the frame ends


class Unknown(NamedTuple):
    """The records from `first` to the latest one were stamped in an earlier boot whose clock
    was never known good: flag them."""

    first: int
    boot: int


Change = Shift | Unknown


class RecordClock:
    """`now()` stamps a record. A change goes to `on_change(change, frame)` before that stamp is
    returned (None: only the frame changed), so it applies to every record stamped before;
    `next_seq()` is the sequence number the next record will take."""

    def __init__(self, frame: Frame | None, next_seq: Callable[[], int],
                 on_change: Callable[[Change | None, Frame | None], None], probes: Probes = SYSTEM_CLOCKS) -> None:
        self.frame = frame
        self._next_seq = next_seq
        self._on_change = on_change
        self._probes = probes
        self._synced_at = -SYNC_POLL

    def start(self) -> None:
        """Reconcile the frame an earlier run left with this boot (at open, before any stamp)."""
        frame, boot = self.frame, self._probes.boot_id()
        # An unknown boot id (0) may be another boot: flagging is safe, a wrong "correction" is not.
        if frame is not None and (frame.boot != boot or not boot):
            self.frame = None
            self._on_change(Unknown(frame.first, frame.boot) if self._next_seq() > frame.first else None, None)
            frame = None
        if frame is None:
            real, boottime = self._probes.realtime(), self._probes.boottime()
            if not self._good(real, boottime, stepped=False):
                self.frame = Frame(boot, real - boottime, self._next_seq())
                self._on_change(None, self.frame)
            return
        self.now()  # a step, or synchronisation, while the agent was not running

    def now(self) -> float:
        real = self._probes.realtime()
        frame = self.frame
        if frame is None:
            return real
        boottime = self._probes.boottime()
        offset = real - boottime
        stepped = abs(offset - frame.offset) > STEP_TOLERANCE
        closes = self._good(real, boottime, stepped)
        if stepped or closes:
            self.frame = None if closes else frame._replace(offset=offset)
            self._on_change(Shift(frame.first, offset - frame.offset, closes) if stepped else None, self.frame)
        return real

    def _good(self, real: float, boottime: float, stepped: bool) -> bool:
        if real < FLOOR_TS:
            return False
        if stepped:
            return True  # set past the floor: by NTP, ntpdate, or a person
        if boottime - self._synced_at < SYNC_POLL:
            return False
        self._synced_at = boottime
        return self._probes.synchronised()
