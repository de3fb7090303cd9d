"""The third-party programs the suite starts, the Debian packages they come in, and their processes.

Nothing here installs anything: a missing program is named with its package
and the `apt-get` line that installs it. Every process the suite starts is a
`Background` child with its output in a log file, ended in a `finally`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = {  # program -> the Debian package that has it
    "iperf3": "iperf3",
    "socat": "socat",
    "haproxy": "haproxy",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "nginx": "nginx",
    "wrk": "wrk",
}
SBIN = ("/usr/sbin", "/sbin")  # haproxy and nginx live here, often not on a user's PATH
PORT_DEADLINE = 10  # seconds for a server the suite started to accept connections
STOP_GRACE = 5  # seconds a child may take to exit after SIGTERM before it is killed


class BenchError(Exception):
    """Something the suite needs did not work; one line says what."""


def which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


def missing_packages(programs: set[str]) -> list[str]:
    """The Debian packages of the programs that are not installed, sorted."""
    return sorted({PACKAGES.get(p, p) for p in programs if which(p) is None})


def install_hint(packages: list[str]) -> str:
    return f"install with: sudo apt-get install -y {' '.join(packages)}"


def free_port() -> int:
    """A port free now on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]




class Background:
    """Child processes, each with its output in `logs/NAME.log`; `stop()` ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None) -> subprocess.Popen:
        path = which(argv[0]) or argv[0]
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [path, *argv[1:]], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, start_new_session=True
            )
        self.processes[name] = process
        return process

    def wait_port(self, name: str, port: int, deadline: float = PORT_DEADLINE) -> None:
        """Return once the named process accepts connections on 127.0.0.1:port; BenchError if it exits first."""
        end = time.monotonic() + deadline
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                self.check(name)
                if time.monotonic() > end:
                    raise BenchError(f"{name}: nothing listens on 127.0.0.1:{port} after {deadline} s") from None
                time.sleep(0.05)  # a child process has no event to wait on

    def check(self, name: str) -> None:
        """BenchError with the log's tail if the named process has exited."""
        process = self.processes[name]
        if process.poll() is not None:
            raise BenchError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, size: int = 2000) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for process in self.processes.values():
            try:
                process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
