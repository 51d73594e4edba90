"""Opening: an async factory that is also an async context manager (Agent.open)."""

from __future__ import annotations

import pytest

from edgefleet.runtime.lifecycle import Opening


class Thing:
    def __init__(self) -> None:
        self.closed = 0

    @classmethod
    def open(cls, fail: bool = False) -> Opening[Thing]:
        return Opening(cls._open(fail))

    @classmethod
    async def _open(cls, fail: bool) -> Thing:
        if fail:
            raise OSError("cannot open")
        return cls()

    async def close(self) -> None:
        self.closed += 1


async def test_awaited_it_is_the_caller_who_closes() -> None:
    thing = await Thing.open()
    assert thing.closed == 0


async def test_as_a_context_it_closes_once_however_the_block_ends() -> None:
    async with Thing.open() as thing:
        pass
    assert thing.closed == 1
    with pytest.raises(RuntimeError):
        async with Thing.open() as failing:
            raise RuntimeError("the work failed")
    assert failing.closed == 1


async def test_a_failed_open_has_nothing_to_close() -> None:
    with pytest.raises(OSError, match="cannot open"):
        async with Thing.open(fail=True):
            pytest.fail("the block must not run")
