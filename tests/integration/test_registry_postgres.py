"""The registry, certificate and presence tests of tests/unit/test_unit_store.py again, on PostgreSQL (the
SQLite file's own tests, integrity and migrations of hub.db, stay there:
tests/integration/test_store_engines.py has PostgreSQL's)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.db.postgres import PostgresStore
from tests.support.postgres import same_tests
from tests.unit import test_unit_store as on_sqlite

globals().update(same_tests(on_sqlite, "store"))


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.open(postgres_url)
    try:
        yield s
    finally:
        await s.close()
