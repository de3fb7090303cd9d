"""The servers the suite starts and the scenarios it measures against them: one table of each.

A scenario is one client run against one port for a fixed time, giving one
figure. To add one (HTTP requests/s with `wrk` through nginx, say), add its
server to `SERVERS` if it needs a new one, a `measure` function, and a row to
`SCENARIOS`; the suite runs it over every path and puts it in the table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

from .programs import Background, BenchError, free_port

REPO = Path(__file__).resolve().parents[2]
CLIENT_GRACE = 30  # seconds a client may run past its fixed time (start-up, final report) before it is a failure
REQUESTS = 2_000_000_000  # redis-benchmark's -n: more than any fixed-time run gets through; it is stopped by time
NEW_CONNECTION_CLIENTS = 20  # redis-benchmark clients each reconnecting per request: the connect scenario's load


# -- servers ---------------------------------------------------------------------------------------


@attrs.frozen
class Server:
    name: str
    programs: tuple[str, ...]
    argv: Callable[[int], list[str]]  # port -> command line


SERVERS = {
    server.name: server
    for server in (
        Server("iperf3", ("iperf3",), lambda port: ["iperf3", "--server", "--bind", "127.0.0.1", "--port", str(port)]),
        Server(
            "redis",
            ("redis-server",),
            lambda port: [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--maxclients", "10000", "--protected-mode", "no",
            ],
        ),
    )
}


def start_server(background: Background, server: Server) -> int:
    port = free_port()
    background.start(f"server-{server.name}", server.argv(port))
    background.wait_port(f"server-{server.name}", port)
    return port


# -- clients: one run against one port, one figure -----------------------------------------------------


def iperf3(streams: int) -> Callable[[int, float], float]:
    """Bulk throughput, Gbit/s received, with `streams` parallel TCP streams (iperf3 -P)."""

    def measure(port: int, seconds: float) -> float:
        argv = ["iperf3", "--client", "127.0.0.1", "--port", str(port), "--time", str(max(1, round(seconds))),
                "--parallel", str(streams), "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + CLIENT_GRACE, check=False)
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 exited {done.returncode} without a report: {done.stderr.strip()}") from None
        if "error" in report:
            raise BenchError(f"iperf3: {report['error']}")
        return report["end"]["sum_received"]["bits_per_second"] / 1e9

    return measure


_OVERALL = re.compile(rb"rps=[0-9.]+ \(overall: ([0-9.]+)\)")


def redis_ping(clients: int, *, reconnect: bool = False) -> Callable[[int, float], float]:
    """redis-benchmark PING (multi-bulk), requests/s over a fixed time; with `reconnect`, a new connection per request."""

    def measure(port: int, seconds: float) -> float:
        argv = ["redis-benchmark", "-p", str(port), "-t", "ping_mbulk", "-n", str(REQUESTS), "-c", str(clients),
                "-k", "0" if reconnect else "1"]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            # It reports its running rate every 250 ms ("rps=... (overall: ...)"): stop it and read the last.
            # SIGTERM, not SIGINT: a shell runs background jobs with SIGINT ignored, and children inherit that.
            process.terminate()
            try:
                out, err = process.communicate(timeout=CLIENT_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                raise BenchError(f"redis-benchmark still ran {CLIENT_GRACE} s after SIGTERM") from None
        rates = _OVERALL.findall(out)
        if not rates:
            raise BenchError(f"redis-benchmark reported no rate: {(err or out)[-500:].decode(errors='replace').strip()}")
        if b"error" in err.lower() or b"could not connect" in out.lower():
            raise BenchError(f"redis-benchmark: {err[-500:].decode(errors='replace').strip()}")
        return float(rates[-1])

    return measure


def idle_flows(connections: int) -> Callable[[int | None, float], float]:
    """tools.bench.idle_flows: KiB two sites hold per idle flow (the larger of its tracemalloc and RSS figures)."""

    def measure(port: int | None, seconds: float) -> float:
        with tempfile.TemporaryDirectory(prefix="fabric-bench-idle-") as tmp:
            out = Path(tmp) / "idle_flows.json"
            argv = [sys.executable, "-m", "tools.bench.idle_flows", "--connections", str(connections), "--json", str(out)]
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
            if not out.exists():
                raise BenchError(f"idle_flows exited {done.returncode}: {done.stderr.strip()[-1000:]}")
            report = json.loads(out.read_text())
        return max(report[m]["fabric_net_per_connection"] for m in ("tracemalloc", "rss")) / 1024

    return measure


# -- the table ---------------------------------------------------------------------------------------------


@attrs.frozen
class Scenario:
    name: str
    title: str
    unit: str
    server: str | None  # a key of SERVERS; None: the scenario brings its own (idle-flows)
    programs: tuple[str, ...]  # the clients it runs
    measure: Callable[[int | None, float], float]  # (port, seconds) -> figure
    paths: tuple[str, ...] | None = None  # None: every path
    higher_is_better: bool = True
    runs: int | None = None  # None: --runs; idle-flows is measured once (memory is not timing noise)


def scenarios(*, quick: bool) -> tuple[Scenario, ...]:
    return (
        Scenario("iperf3-P1", "iperf3, 1 stream", "Gbit/s", "iperf3", ("iperf3",), iperf3(1)),
        Scenario("iperf3-P4", "iperf3, 4 streams", "Gbit/s", "iperf3", ("iperf3",), iperf3(4)),
        Scenario("ping-1", "redis PING, 1 client", "req/s", "redis", ("redis-benchmark",), redis_ping(1)),
        Scenario("ping-50", "redis PING, 50 clients", "req/s", "redis", ("redis-benchmark",), redis_ping(50)),
        Scenario(
            "connect",
            f"new connections ({NEW_CONNECTION_CLIENTS} clients: connect, PING, close)",
            "conn/s",
            "redis",
            ("redis-benchmark",),
            redis_ping(NEW_CONNECTION_CLIENTS, reconnect=True),
        ),
        Scenario(
            "idle-flows",
            "memory per idle flow (2 sites, one process)",
            "KiB",
            None,
            (),
            idle_flows(300 if quick else 1000),
            paths=("fabric-2",),
            higher_is_better=False,
            runs=1,
        ),
    )
