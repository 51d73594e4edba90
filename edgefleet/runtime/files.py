"""Durable file replacement, for the small files both daemons keep beside their databases."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Final


def write_atomic(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data`, mode `mode` from its first byte: a reader, or the next start
    after a crash or power cut, sees the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)  # the rename itself survives a power cut


def sync_directory(path: Path) -> None:
    """Make the renames and deletions in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def permission_advice(path: str | os.PathLike[str] | None) -> str:
    """One sentence for an operator whose command was denied access to `path`: whose it is and what to do."""
    me = _account(os.geteuid())
    if path is None:
        return f"permission denied for user {me}: run the command as the account that owns its files"
    target = Path(path)
    for candidate in (target, *target.parents):
        try:
            owner = _account(candidate.stat().st_uid)
        except OSError:
            continue
        where = "it" if candidate == target else str(candidate)
        if owner == me:
            return (f"permission denied on {target} for user {me}, although {where} belongs to {me}: "
                    f"give the owner access again (chmod u+rwX {candidate})")
        return (f"permission denied on {target} for user {me} ({where} belongs to {owner}): run the command as "
                f"{owner} (sudo -u {owner} ...) or give {me} access with chown/chmod")
    return f"permission denied on {target} for user {me}: run the command as the account that owns it"


# What SQLite says when the file or its folder (for the journal) may not be opened or written.
_DENIED: Final = ("unable to open database file", "attempt to write a readonly database")


def database_access_denied(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed for want of permission rather than because the database is broken."""
    return str(exc) in _DENIED


def database_advice(db: Path) -> str:
    """permission_advice for an SQLite database, naming the one of its files (the database, its
    WAL and shared-memory files, its folder) that another account owns, when one does."""
    me = os.geteuid()
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), db.parent):
        try:
            if path.stat().st_uid != me:
                return permission_advice(path)
        except OSError:
            continue
    return permission_advice(db)


def _account(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
