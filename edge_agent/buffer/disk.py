"""Why the outbox cannot be written just now: another process's lock, a full disk, a read-only one.

These pass by themselves (a lock is let go, space is freed, the file system is remounted
read-write), so the outbox waits and tries again. None of them is corruption: only a failed
integrity check (or a file that is not SQLite) is.
"""

from __future__ import annotations

import enum
import errno
import os
import sqlite3
from pathlib import Path

# SQLite's primary result codes (the low byte of an extended code).
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_FULL = sqlite3.SQLITE_FULL
# What SQLite answers when it cannot create or write its files: on a read-only file system,
# but also for a permission problem, which is not ours to wait out.
_UNWRITABLE = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}
_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class Trouble(enum.Enum):
    """What keeps the outbox from writing; the value reads in a sentence."""

    LOCKED = "another process holds a lock on it"
    FULL = "the disk is full"
    READ_ONLY = "the file system is read-only"


def trouble(error: BaseException, directory: Path) -> Trouble | None:
    """The passing trouble behind `error` (a write to the outbox in `directory`), or None."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        if code in _BUSY:
            return Trouble.LOCKED
        if code == _FULL:
            return Trouble.FULL
        return _from_file_system(directory) if code in _UNWRITABLE else None
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return Trouble.FULL
        if error.errno == errno.EROFS:
            return Trouble.READ_ONLY
        return _from_file_system(directory) if error.errno in (errno.EIO, errno.EACCES, errno.EPERM) else None
    return None


def corrupt(error: sqlite3.Error) -> bool:
    """SQLite found the file damaged or not a database (never a lock, a full or read-only disk)."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT


def _from_file_system(directory: Path) -> Trouble | None:
    """SQLite's 'cannot open' or 'readonly' means a read-only or full disk only when the file system says so."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return Trouble.READ_ONLY
    if fs.f_bavail == 0 or fs.f_favail == 0:
        return Trouble.FULL
    return None


class Ballast:
    """Disk space held back beside the outbox (a file of `size` bytes, allocated, not sparse),
    given up when the disk fills: a full disk otherwise leaves SQLite no room to checkpoint its
    WAL into the database, which it must do before it can delete anything to make room."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size

    def release(self) -> int:
        """Give the space back to the file system; return how many bytes (0: none was held)."""
        try:
            size = self.path.stat().st_size
            self.path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def restore(self) -> bool:
        """Hold the space back again; False (and nothing left behind) while the disk cannot spare it."""
        if self.size <= 0:  # none asked for: one left from before goes
            self.release()
            return True
        try:
            if self.path.stat().st_size >= self.size:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError:
            self.path.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)
        return True
