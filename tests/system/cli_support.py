"""Helpers of the CLI system tests: `fabric` as a user runs it, in real processes.

Every command is `python -m fabric.cli --site-dir DIR ...` run to its end with
a timeout; `site run` is a background process (`SiteProcess`) whose stderr
(its log) goes to a file, killed in a `finally` whatever happens to the test.
Nothing here imports fabric's internals: the tests see what a user sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FABRIC = (sys.executable, "-m", "fabric.cli")
COMMAND_TIMEOUT = 90  # seconds for one command; --wait verbs wait at most 60 s by default
START_TIMEOUT = "30s"  # for `site status --wait`: a site starts in well under a second
STOP_DEADLINE = 5  # seconds a site may take to exit after SIGTERM (the promise)
HELPER_GRACE = 5  # seconds a helper server may take to exit after SIGTERM before it is killed


def fabric(
    site_dir: Path | None,
    *args: str,
    timeout: float = COMMAND_TIMEOUT,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run one `fabric` command to its end; its output as text, whatever its exit code. `env`: added variables."""
    argv = [*FABRIC, *(["--site-dir", str(site_dir)] if site_dir is not None else []), *args]
    environ = {k: v for k, v in os.environ.items() if k != "FABRIC_SITE_DIR"} | (env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=environ)


def describe(result: subprocess.CompletedProcess) -> str:
    args = " ".join(str(a) for a in result.args[len(FABRIC) :])
    return f"`fabric {args}` exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def ok(result: subprocess.CompletedProcess) -> str:
    """The command's stdout, once it exited 0 and said nothing on stderr."""
    assert result.returncode == 0 and result.stderr == "", describe(result)
    return result.stdout


def fails(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The error line of a command that failed as promised: exit 1, one line `error: ...` on stderr."""
    lines = result.stderr.splitlines()
    assert result.returncode == 1, describe(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), describe(result)
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in the error line\n{describe(result)}"
    return lines[0]


def as_json(result: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(result))


def free_port() -> int:
    """A port free now on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SiteProcess:
    """`fabric site run` in the background; its log (stderr) in a file beside the site directory.

    `env`: variables added to its environment; `prefix`: a command it runs
    under (`ip netns exec NS`).
    """

    def __init__(self, site_dir: Path, *, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.site_dir = site_dir
        self.log = site_dir.parent / f"{site_dir.name}.log"
        self._log_file = open(self.log, "ab")
        self.process = subprocess.Popen(
            [*prefix, *FABRIC, "--site-dir", str(site_dir), "site", "run", "--log-level", "debug"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
        )

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def wait_running(self) -> None:
        """Return once the site answers on its control socket."""
        result = fabric(self.site_dir, "site", "status", "--wait", "--timeout", START_TIMEOUT, "-o", "json")
        assert result.returncode == 0, f"{describe(result)}\nsite log:\n{self.log_tail()}"

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took to exit). AssertionError past STOP_DEADLINE."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"site {self.site_dir.name} still runs {STOP_DEADLINE} s after SIGTERM") from None
        finally:
            self.kill()
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()


@contextlib.contextmanager
def running(*site_dirs: Path) -> Iterator[list[SiteProcess]]:
    """`fabric site run` for each site, running once this yields; killed at the end whatever happened."""
    sites: list[SiteProcess] = []
    try:
        for site_dir in site_dirs:
            sites.append(SiteProcess(site_dir))
        for site in sites:
            site.wait_running()
        yield sites
    finally:
        for site in sites:
            site.kill()


@contextlib.contextmanager
def background(*argv: str, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A helper process (an HTTP server, a proxy), stopped at the end: SIGTERM first, so that a server with
    children stops them (nginx's master its workers: killed, it leaves them running, orphaned, and
    holding the port), then SIGKILL after HELPER_GRACE."""
    process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(HELPER_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


def wait_port(port: int, deadline: float = 10, *, host: str = "127.0.0.1") -> None:
    """Return once something accepts connections on host:port (a server the test started)."""
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise AssertionError(f"nothing listens on {host}:{port} after {deadline} s") from None
            time.sleep(0.05)  # a child process has no event to wait on

