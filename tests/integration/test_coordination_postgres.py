"""The coordination tests of tests/unit/test_unit_coordination.py again, on PostgreSQL: leases, fencing
tokens, approvals and tasks behave the same whichever store holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.db.postgres import PostgresStore
from hub.region.coordination import Coordination
from tests.unit import test_unit_coordination as on_sqlite
from tests.unit.test_unit_coordination import *  # noqa: F403  # the same tests, with the fixture below

HUB = on_sqlite.HUB


class PostgresHub(on_sqlite.Hub):
    url: str = ""

    async def reopen(self) -> None:
        await self.store.close()
        self.store = await PostgresStore.open(self.url)  # type: ignore[assignment]  # the same HubState
        self.coord = Coordination(self.store, HUB)


@pytest.fixture
async def hub(postgres_url: str, tmp_path: Path) -> AsyncIterator[on_sqlite.Hub]:
    store = await PostgresStore.open(postgres_url)
    h = PostgresHub(store, Coordination(store, HUB), tmp_path / "unused.db")  # type: ignore[arg-type]
    h.url = postgres_url
    try:
        yield h
    finally:
        await h.store.close()
