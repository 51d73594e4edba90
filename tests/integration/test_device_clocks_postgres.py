"""The device-clock tests of tests/unit/test_unit_device_clocks.py again, on PostgreSQL: a clock event
corrects or flags its device's stored records the same whichever store holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.db.postgres import PostgresStore
from tests.unit import test_unit_device_clocks as on_sqlite
from tests.unit.test_unit_device_clocks import *  # noqa: F403  # the same tests, with the fixture below


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.open(postgres_url)
    await s.register(on_sqlite.DEVICE, "sim", {})
    try:
        yield s
    finally:
        await s.close()
