"""The hub-ingest tests of tests/unit/test_unit_hostile_input.py again, on PostgreSQL: malformed, hostile
and conflicting records are refused and counted the same whichever store holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.db.postgres import PostgresStore
from tests.support.postgres import same_tests
from tests.unit import test_unit_hostile_input as on_sqlite

globals().update(same_tests(on_sqlite, "store"))


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.open(postgres_url)
    try:
        await s.register("dev-a", "sim", {})
        yield s
    finally:
        await s.close()
