"""Which store a hub directory uses: `[database] url` in hub.toml, SQLite when it is empty."""

from __future__ import annotations

from pathlib import Path

from hub.db.interface import HubState, StoreError, is_postgres_url


async def open_store(url: str, default: Path) -> HubState:
    """The store `url` names: "" for the SQLite file `default`, or a postgresql:// URL.

    asyncpg is imported only here, when a PostgreSQL URL is configured."""
    if is_postgres_url(url):
        try:
            from hub.db.postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(f"[database] url names PostgreSQL, but its driver is not installed ({exc}): "
                             "install edgefleet[postgres] (asyncpg)") from exc
        return await PostgresStore.open(url)
    from hub.db.store import HubStore
    return await HubStore.open(default)
