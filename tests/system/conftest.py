"""Fixtures of the system tests: real third-party servers and clients, as processes.

A test here starts the server (redis-server) as a child process on a free
port of 127.0.0.1 and runs real clients (redis-cli, redis-benchmark) as
child processes too, with `trio.run_process`, so the sites, which run in the
test's own Trio loop, keep relaying while a client waits. A server is killed
in a `finally` whatever happens to the test.

The redis binaries come from Debian's redis-server and redis-tools (the
README's test command installs them); without them these tests are skipped,
saying which binary is missing, or fail in CI (prerequisites.py).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
from prerequisites import require_programs

REDIS_BINARIES = ("redis-server", "redis-cli", "redis-benchmark")
REDIS_START_DEADLINE = 10  # seconds for redis-server to answer PING; it takes ~0.05 s
REDIS_START_ATTEMPTS = 3  # a free port can be taken between our probe and redis binding it
PING_INTERVAL = 0.05  # seconds between PINGs while redis starts (a process has no event to wait on)
KILL_GRACE = 5  # seconds to reap a killed server


def free_port() -> int:
    """A port free now on 127.0.0.1 (bound to port 0, then released: redis cannot be given port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@attrs.frozen
class Run:
    """What a client process did."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    def describe(self) -> str:
        stderr = self.stderr.decode(errors="replace")[-2000:]
        return f"`{' '.join(self.argv)}` exited {self.returncode}; stderr: {stderr!r}"


async def run(*argv: str, stdin: bytes = b"") -> Run:
    """Run a client to its end, capturing its output; a cancelled test kills it."""
    done = await trio.run_process(list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    return Run(tuple(argv), done.returncode, done.stdout, done.stderr)


@attrs.define
class RedisServer:
    port: int
    log: Path

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


async def _start_redis(workdir: Path, port: int) -> tuple[trio.Process, RedisServer]:
    server = RedisServer(port, workdir / f"redis-{port}.log")
    argv = [
        "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",  # no RDB snapshots
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(server.log),
        "--daemonize", "no",
    ]
    # Logs go to the log file; stderr stays ours, so a refused option shows in the test report.
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return process, server


async def _wait_ready(process: trio.Process, server: RedisServer) -> bool:
    """PING until PONG (True), or until the server exits (False: its port was taken, most likely)."""
    while process.poll() is None:
        answer = await run("redis-cli", "-h", "127.0.0.1", "-p", str(server.port), "ping")
        if answer.returncode == 0 and answer.stdout.strip() == b"PONG":
            return True
        await trio.sleep(PING_INTERVAL)
    return False


class RedisTools:
    """redis-cli and redis-benchmark, pointed at a port (a listener's, usually)."""

    run = staticmethod(run)

    async def cli(self, port: int, *args: str, stdin: bytes = b"") -> bytes:
        """Run `redis-cli -p port args...`; its output, once it exited 0 and said nothing on stderr."""
        done = await run("redis-cli", "-h", "127.0.0.1", "-p", str(port), *args, stdin=stdin)
        assert done.returncode == 0 and not done.stderr, done.describe()
        return done.stdout

    async def benchmark(self, port: int, *args: str) -> Run:
        return await run("redis-benchmark", "-h", "127.0.0.1", "-p", str(port), *args)


@pytest.fixture
def redis_tools() -> RedisTools:
    require_programs(*REDIS_BINARIES)
    return RedisTools()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server on a free port of 127.0.0.1, no persistence; killed when the test ends."""
    require_programs(*REDIS_BINARIES)
    workdir = tmp_path / "redis"
    workdir.mkdir()
    for _ in range(REDIS_START_ATTEMPTS):
        process, server = await _start_redis(workdir, free_port())
        try:
            with trio.move_on_after(REDIS_START_DEADLINE) as starting:
                ready = await _wait_ready(process, server)
            if starting.cancelled_caught:
                raise AssertionError(
                    f"redis-server on port {server.port} did not answer PING within {REDIS_START_DEADLINE} s; "
                    f"log: {server.log_tail()}"
                )
            if ready:
                yield server
                return
        finally:
            if process.poll() is None:
                process.kill()
            with trio.move_on_after(KILL_GRACE, shield=True):
                await process.wait()
    raise AssertionError(
        f"redis-server exited at start {REDIS_START_ATTEMPTS} times; last log: {server.log_tail()}"
    )
