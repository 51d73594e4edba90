"""What the hub asks of its database, whichever engine holds it: SQLite (hub/db/store.py, the
embedded default) or PostgreSQL (hub/db/postgres.py, for replicas on separate machines).

`open_store` picks one from `[database] url`; the hub's logic holds a `HubState` and does not know
which. `Tx` is one transaction's connection, for the store's own helpers in hub/db/ that run
inside the ingest's transaction on either engine (hub/db/identities.py, hub/db/device_clocks.py).
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from hub.db.dialect import Dialect
from hub.errors import HubError

if TYPE_CHECKING:
    from edgefleet.wire.events import EventKind
    from edgefleet.wire.protocol import Presence
    from hub.db.rows import DeviceRow, EventRow, IngestWork, TelemetryRow

T = TypeVar("T")


class StoreError(HubError):
    """A database the hub cannot use as it is: a one-sentence reason and what to do."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or answer now (PostgreSQL down, SQLite locked past its timeout);
    transient: nothing was changed, the caller retries later."""


# What a caller retries later instead of blaming a message: SQLite locked past its busy timeout, or
# PostgreSQL unreachable. Nothing was committed.
UNAVAILABLE: Final = (sqlite3.OperationalError, StoreUnavailable)


class Tx(Protocol):
    """One open transaction. SQL uses `?` placeholders on both engines."""

    dialect: Dialect

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Every row; a row reads by index and by column name."""

    async def fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The first row, or None."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """The rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def lock(self, key: str) -> None:
        """Hold `key` until this transaction ends, against other hub processes' transactions that lock it
        (PostgreSQL: a transaction advisory lock, gone with the transaction or its connection; SQLite has one
        writer at a time anyway)."""


class HubState(Protocol):
    """Every piece of hub state the hub's logic reaches through methods (not SQL)."""

    dialect: Dialect

    async def close(self) -> None: ...

    # registry and certificates
    async def register(self, device: str, profile: str, tags: dict[str, str], *, readmit: bool = False) -> None: ...
    async def record_certificate(self, serial: int, device: str, purpose: str, not_after: dt.datetime) -> None: ...
    async def certificate_revoked(self, serial: int) -> bool: ...
    async def vouches_for(self, serial: int, device: str) -> bool | None: ...
    async def is_revoked(self, device: str) -> bool: ...
    async def exists(self, device: str) -> bool: ...
    async def revoke_device(self, device: str) -> int: ...
    async def revoke_serial(self, serial: int) -> None: ...
    async def revoked_serials(self) -> list[tuple[int, dt.datetime]]: ...

    # presence
    async def apply_presence(self, device: str, presence: Presence, now: float) -> bool: ...
    async def apply_presences(self, messages: Sequence[tuple[str, Presence]], now: float) -> list[int]: ...

    # ingest: telemetry, events, watermarks, outbox instances, device clocks
    async def watermarks(self) -> dict[str, int]: ...
    async def registered(self) -> set[str]: ...
    async def commit_ingest(self, work: IngestWork) -> dict[str, int]: ...

    # what the operator reads
    def telemetry(self, *, device: str | None = None, since: float | None = None, until: float | None = None,
                  metric: str | None = None, limit: int | None = None) -> AsyncGenerator[TelemetryRow, None]: ...
    def read_telemetry(self, since: float, until: float, device: str | None = None,
                       metric: str | None = None) -> AsyncGenerator[TelemetryRow, None]: ...
    def events(self, *, device: str | None = None, since: float | None = None,
               kind: str | None = None, limit: int | None = None) -> AsyncGenerator[EventRow, None]: ...
    async def latest_escalations(self) -> list[EventRow]: ...
    async def latest_alerts(self, since: float, severities: tuple[str, ...]) -> list[tuple[EventRow, int]]: ...
    async def known_device(self, device: str) -> bool: ...
    async def reject_counts(self) -> dict[str, int]: ...
    async def devices(self, device: str | None = None, *, drift_grace_s: float = 120.0,
                      now: float | None = None) -> list[DeviceRow]: ...

    # one transaction for the hub's logic (rollouts, coordination, renewal); cancellation cannot split it
    async def atomically(self, work: Callable[[Tx], Awaitable[T]]) -> T: ...
    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...
    async def hub_event(self, db: Tx, identity: str, kind: EventKind, body: dict[str, Any],
                        ts: float | None = None) -> None: ...

    # retention (hub/db/retention.py): at most `batch` rows stamped before `before`, how many went
    async def prune_telemetry(self, before: float, batch: int) -> int: ...
    async def prune_events(self, before: float, batch: int) -> int: ...

    # leadership among replicas (hub/region/leadership.py)
    async def claim_leadership(self, role: str, holder: str, ttl_s: float, now: float) -> tuple[str, float]: ...
    async def release_leadership(self, role: str, holder: str, now: float) -> None: ...


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", url)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))
