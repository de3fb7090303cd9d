"""Waiting for what no event announces: a count in a status, the kernel's view of a socket, another process's log.

Wait on an event where there is one (Site.wait_links_changed,
wait_listeners_changed, wait_listening, wait_reachable, wait_linked;
Router.wait_changed and next_change). This is for the rest, in one place, so
that every such wait has a deadline and says what it waited for.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

POLL_INTERVAL = 0.01  # seconds between looks: short against what a test waits for, long against one look
POLL_DEADLINE = 10  # seconds before giving up; a test's own fail_after may be shorter


async def wait_until(
    condition: Callable[[], object],
    what: str,
    *,
    deadline: float = POLL_DEADLINE,
    interval: float = POLL_INTERVAL,
) -> None:
    """Return once `condition()` is true; fail saying `what` was awaited if `deadline` seconds pass first."""
    with trio.move_on_after(deadline):
        while not condition():  # noqa: ASYNC110 - the one polling loop: what it waits for has no event
            await trio.sleep(interval)
        return
    raise AssertionError(f"waited {deadline} s for {what}")
