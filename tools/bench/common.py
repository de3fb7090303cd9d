"""What every benchmark here does the same way: file-descriptor headroom, and how a run ends."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


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
