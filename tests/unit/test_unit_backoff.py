"""The reconnect policy with controlled time and a seeded random source."""

from __future__ import annotations

import random

import pytest

from edgefleet.mqtt.reconnect import INITIAL_DELAY, MAX_DELAY, STABLE_AFTER, Backoff, LinkState


def make(seed: int = 7, **kwargs: float) -> Backoff:
    return Backoff(rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


def ceiling(failures: int, initial: float = INITIAL_DELAY, maximum: float = MAX_DELAY) -> float:
    return min(maximum, initial * 2.0 ** (failures - 1))


def fail_times(backoff: Backoff, count: int, start: float = 0.0) -> list[float]:
    """`count` connection attempts that each fail before CONNACK."""
    now, delays = start, []
    for _ in range(count):
        backoff.connecting()
        delay = backoff.lost(now)
        delays.append(delay)
        now += delay
    return delays


def test_the_first_retry_is_quick() -> None:
    delay = make().lost(0.0)
    assert INITIAL_DELAY / 2 <= delay <= INITIAL_DELAY


def test_delays_grow_with_consecutive_failures() -> None:
    delays = fail_times(make(), 8)
    # Equal jitter: the floor of each step is the ceiling of the one before, so the
    # sequence never shrinks while failures continue.
    assert delays == sorted(delays)
    assert delays[-1] > 16 * delays[0]


@pytest.mark.parametrize("seed", range(20))
def test_every_delay_is_within_equal_jitter_bounds(seed: int) -> None:
    backoff = make(seed)
    for failures, delay in enumerate(fail_times(backoff, 40), start=1):
        top = ceiling(failures)
        assert top / 2 <= delay <= top, (failures, delay)
    assert backoff.failures == 40


def test_delays_are_capped_at_the_maximum_even_after_very_many_failures() -> None:
    backoff = make(maximum=10.0)
    delays = fail_times(backoff, 2000)
    assert max(delays) <= 10.0
    assert all(5.0 <= d <= 10.0 for d in delays[-100:])


def test_jitter_spreads_a_fleet_that_failed_together() -> None:
    # A thousand devices that lost the hub at the same moment must not all come back at once.
    delays = [fail_times(make(seed), 6)[-1] for seed in range(1000)]
    assert len({round(d, 3) for d in delays}) > 500
    assert min(delays) < ceiling(6) * 0.6
    assert max(delays) > ceiling(6) * 0.9


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert fail_times(make(3), 10) == fail_times(make(3), 10)


def test_a_connection_dropped_right_after_connack_keeps_backing_off() -> None:
    # A session kicked at once (duplicate client id, revoked certificate) must not turn
    # into a tight reconnect loop.
    backoff = make()
    now = 0.0
    fail_times(backoff, 3)
    for expected in range(4, 12):
        backoff.connecting()
        backoff.connected(now)
        assert backoff.state is LinkState.CONNECTED
        delay = backoff.lost(now + 1.0)
        assert backoff.failures == expected
        assert delay >= ceiling(expected) / 2
        now += 1.0 + delay
    assert delay >= min(MAX_DELAY, ceiling(11)) / 2


def test_a_connection_that_stayed_up_resets_the_backoff() -> None:
    backoff = make()
    fail_times(backoff, 10)
    backoff.connected(1000.0)
    delay = backoff.lost(1000.0 + STABLE_AFTER)
    assert backoff.failures == 1
    assert INITIAL_DELAY / 2 <= delay <= INITIAL_DELAY


def test_a_connection_just_short_of_stable_does_not_reset() -> None:
    backoff = make(stable_after=30.0)
    fail_times(backoff, 5)
    backoff.connected(100.0)
    delay = backoff.lost(129.9)
    assert backoff.failures == 6
    assert delay >= ceiling(6) / 2


def test_stability_is_measured_from_the_latest_connack() -> None:
    backoff = make(stable_after=30.0)
    fail_times(backoff, 5)
    backoff.connected(0.0)
    backoff.lost(10.0)
    # A failed attempt later on must not count the earlier connection's age.
    backoff.connecting()
    delay = backoff.lost(500.0)
    assert backoff.failures == 7
    assert delay >= ceiling(7) / 2


def test_an_authentication_failure_waits_the_longest() -> None:
    backoff = make(maximum=45.0)
    assert backoff.lost(0.0, auth=True) == 45.0
    assert backoff.lost(45.0, auth=True) == 45.0
    assert backoff.state is LinkState.WAITING


def test_an_authentication_failure_after_a_stable_connection_still_waits_the_longest() -> None:
    backoff = make()
    backoff.connected(0.0)
    assert backoff.lost(STABLE_AFTER + 100.0, auth=True) == MAX_DELAY


def test_states_follow_the_link() -> None:
    backoff = make()
    assert backoff.state is LinkState.IDLE
    backoff.connecting()
    assert backoff.state is LinkState.CONNECTING
    backoff.lost(0.0)
    assert backoff.state is LinkState.WAITING
    backoff.connecting()
    backoff.connected(1.0)
    assert backoff.state is LinkState.CONNECTED
