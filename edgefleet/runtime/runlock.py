"""One process per identity: an exclusive lock on a file, held from start to exit.

Two agents on one state directory would share an outbox (the same sequence numbers handed out
twice) and take the device's MQTT session from each other; two hubs on one directory would fight
over the managed broker and the hub's session. Each daemon takes `RunLock.acquire` before it
touches anything. The lock is `flock`: the kernel drops it when the process ends, however it
ends (kill -9 included), so a stale lock file never blocks a start. The holder's pid is written
in the file, for the message of the one refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Final

from edgefleet.errors import AlreadyRunning

AGENT_LOCK: Final = "agent.lock"  # in an agent's state directory: one agent per outbox and device session


class RunLock:
    """Held while the object lives (or until `release()`); the file itself stays."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: Path, what: str, where: Path) -> RunLock:
        """Take the lock at `path`, or raise AlreadyRunning naming the holder: "another `what` (pid N)
        is running on `where`"."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, writable = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(what, where, pid) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            mine = f"{os.getpid()}\n".encode()
            os.pwrite(fd, mine, 0)
            os.ftruncate(fd, len(mine))
        return cls(path, fd)

    @staticmethod
    def holder(path: Path) -> int | None:
        """The pid of the process holding the lock at `path` (0 when it holds it but its pid is
        unknown), or None when nobody does. Takes the lock for an instant when it is free."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd) or 0
            return None
        finally:
            os.close(fd)  # also releases the instant's lock

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """The lock file, read-write (to write our pid in it); on a read-only file system read-only
    (flock needs no write access: the lock holds all the same, only the pid is not written), and
    if it does not exist there either, the folder itself (nobody can have made the file, so nobody
    holds it; the daemon then waits for its disk as usual)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), True
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except FileNotFoundError:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
