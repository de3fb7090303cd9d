"""Fixtures of the in-process integration tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio.testing

IDLE_JUMP = 0.002  # real seconds the whole process must sit idle before virtual time jumps to the next deadline


@pytest.fixture
def timer_clock() -> trio.testing.MockClock:
    """The test's clock (pytest-trio takes it from the test's own parameters, so name it there, next to
    `skip_waits`): real time until the test calls `skip_waits()`."""
    return trio.testing.MockClock(rate=1.0)


@pytest.fixture
def skip_waits(timer_clock: trio.testing.MockClock) -> Callable[[], None]:
    """`skip_waits()`: from now on a wait on a timer (keepalive, backoff, a timeout, a relay's delay) ends
    as soon as nothing else is left to do.

    The sites here talk over real loopback sockets and start with work in threads (keys, files), during
    which the loop is idle but not done: a clock that jumped then would expire handshake and redemption
    deadlines that real time would not. So a test sets its sites up in real time and calls `skip_waits()`
    where it waits only on timers; even then the clock jumps only after IDLE_JUMP real seconds with
    nothing to run, long against what loopback takes to hand bytes back.
    """

    def skip() -> None:
        timer_clock.autojump_threshold = IDLE_JUMP

    return skip
