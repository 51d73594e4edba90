"""Everything under tests/integration/ starts Mosquitto, a hub or an agent process: it is all marked
`integration`, so that `-m "not integration"` runs the fast layer alone."""

import pytest

from tests.support.postgres import postgres_cluster, postgres_url

__all__ = ["postgres_cluster", "postgres_url"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
