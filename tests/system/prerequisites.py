"""What a system test needs from the machine: programs, and root for network namespaces.

On a developer's machine a test whose needs are missing is skipped with the
reason. In CI (the environment variable CI set, as CI services do) it fails:
tools/test installs every program and CI runs as root, so there a missing
need is a broken setup, not a reason to pass quietly.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

INSTALL_HINT = "tools/test installs it; Debian: apt-get install redis-server redis-tools curl nginx wrk tinyproxy iptables"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(reason: str) -> NoReturn:
    """Fail the test in CI, skip it elsewhere; either way say why."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a system test may not skip)", pytrace=False)
    pytest.skip(reason)


def require_programs(*programs: str) -> None:
    """Each program by name (looked up on PATH) or by absolute path."""
    missing = [p for p in programs if shutil.which(p) is None and not os.path.exists(p)]
    if missing:
        unavailable(f"{', '.join(missing)} not installed ({INSTALL_HINT})")


def require_root(why: str) -> None:
    """`why`: what needs root, as the reason given when this process is not root."""
    if os.geteuid() != 0:
        unavailable(why)
