"""The rollout tests of tests/unit/test_unit_rollout.py again, on PostgreSQL: versions, cohorts, waves,
gates and rollbacks behave the same whichever store holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.db.postgres import PostgresStore
from tests.unit import test_unit_rollout as on_sqlite
from tests.unit.test_unit_rollout import *  # noqa: F403  # the same tests, with the fixture below


class PostgresFleet(on_sqlite.Fleet):
    url: str = ""

    async def reopen(self) -> None:
        await self.store.close()
        self.store = await PostgresStore.open(self.url)  # type: ignore[assignment]  # the same HubState


@pytest.fixture
async def fleet(postgres_url: str, tmp_path: Path) -> AsyncIterator[on_sqlite.Fleet]:
    f = PostgresFleet(await PostgresStore.open(postgres_url), tmp_path / "unused.db")  # type: ignore[arg-type]
    f.url = postgres_url
    try:
        yield f
    finally:
        await f.store.close()
