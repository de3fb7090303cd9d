"""What every benchmark here does the same way: file-descriptor headroom, a process's memory and
descriptors, growth over a run, waiting for a count no event announces, and how a run ends."""

from __future__ import annotations

import inspect
import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

import fabric


async def poll_until(condition: Callable[[], object | Awaitable[object]], *, deadline: float, interval: float) -> bool:
    """Look at `condition()` (awaited if it is async) every `interval` seconds until it is true (True)
    or `deadline` seconds have passed (False). Only for what no event announces: a count in another
    process, the kernel's view of a socket; the tests' waits (tests/polling.py) use it too."""
    with trio.move_on_after(deadline):
        while not await _look(condition):  # noqa: ASYNC110 - the one polling loop: what it waits for has no event
            await trio.sleep(interval)
        return True
    return False


async def _look(condition: Callable[[], object | Awaitable[object]]) -> object:
    result = condition()
    return await result if inspect.isawaitable(result) else result


def raise_fd_limit(needed: int, *, what: str) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed`; exit with one line saying how if the hard limit is lower.

    `what` names the need in that line: "idle_flows: 1000 connections".
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))  # raising hard needs root
    except (ValueError, OSError):
        if hard != resource.RLIM_INFINITY and hard < needed:
            sys.exit(
                f"{what} need about {needed} file descriptors; the hard limit is {hard} "
                f"(raise it, e.g. `ulimit -Hn {needed}` as root, or ask for less)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    print(f"raised the soft RLIMIT_NOFILE from {soft} to {needed}")
    return needed


def finish(summary: dict, path: Path) -> int:
    """Write the results as JSON (to compare across commits); the exit status: 0 for PASS, 1 for FAIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {path}")
    return 0 if summary["pass"] else 1


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), MB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int | str = "self") -> int:
    """File descriptors a process (this one by default) holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def growth(samples: list[dict], limits: dict[str, tuple[float, float]]) -> list[str]:
    """Growth of any sampled quantity: the second half's median past the first half's maximum (with margins).

    `limits`: sample key -> (factor, slack): the second half's median may be
    up to the first half's maximum times factor plus slack. The first sample
    is left out (the load is still ramping up).
    """
    steady = samples[1:]
    if len(steady) < 4:
        return []
    half = len(steady) // 2
    first, second = steady[:half], steady[half:]
    found = []
    for key, (factor, slack) in limits.items():
        ceiling = max(s[key] for s in first) * factor + slack
        median = statistics.median(s[key] for s in second)
        if median > ceiling:
            found.append(f"{key} grew: median {median:g} in the second half, first half at most {ceiling / factor - slack / factor:g}")
    return found


def environment() -> dict:
    """What a run ran on, for its JSON."""
    return {
        "python": platform.python_version(),
        "trio": trio.__version__,
        "fabric": fabric.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
