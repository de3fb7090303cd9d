"""Waiting for what no event announces: a count in a status, the kernel's view of a socket, another process's log.

Wait on an event where there is one (Site.wait_links_changed,
wait_listeners_changed, wait_listening, wait_reachable, wait_linked;
Router.wait_changed and next_change). This is for the rest, so that every
such wait has a deadline and says what it waited for; the loop itself is the
benchmarks' (tools/bench/common.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tools.bench.common import poll_until

POLL_INTERVAL = 0.01  # seconds between looks: short against what a test waits for, long against one look
POLL_DEADLINE = 10  # seconds before giving up; a test's own fail_after may be shorter


async def wait_until(
    condition: Callable[[], object | Awaitable[object]],
    what: str | Callable[[], str],
    *,
    deadline: float = POLL_DEADLINE,
    interval: float = POLL_INTERVAL,
) -> None:
    """Return once `condition()` is true (awaited, if it is an async function, as a look at another
    process is); fail saying `what` was awaited (a function: what it says then) if `deadline` seconds pass first."""
    if not await poll_until(condition, deadline=deadline, interval=interval):
        raise AssertionError(f"waited {deadline} s for {what() if callable(what) else what}")
