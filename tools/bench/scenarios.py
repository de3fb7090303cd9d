"""The servers the suite starts and the scenarios it measures against them: one table of each.

A scenario is one client run against one port for a fixed time, giving one
figure (or a few: `wrk` gives requests/s and latency percentiles of the same
run). To add one, add its server to `SERVERS` if it needs a new one, a
`measure` function, and a row to `scenarios()`; the suite runs it over its
paths and puts it in the table.
"""

from __future__ import annotations

import json
import os
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
HTTP_CONNECTIONS = 50  # wrk's keep-alive connections in the HTTP scenario (issue 7's targets are at 50)
NGINX_BODY = "hello from nginx\n"  # what nginx answers to GET /: a small response, so the figure is per-request cost


# -- servers ---------------------------------------------------------------------------------------


@attrs.frozen
class Server:
    name: str
    programs: tuple[str, ...]
    argv: Callable[[int, Path], list[str]]  # (port, a directory of its own) -> command line
    http: bool = False  # speaks HTTP: haproxy fronts it in mode http, and fabric has an HTTP listener for it too


def nginx_argv(port: int, workdir: Path) -> list[str]:
    """nginx, one worker (the machine's cores are shared with the client and the sites), answering GET / itself."""
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    user = "user root; " if os.geteuid() == 0 else ""  # as root its worker would run as nobody, locked out of prefix
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"""{user}worker_processes 1; daemon off; pid {prefix}/nginx.pid; error_log stderr;
events {{ worker_connections 4096; }}
http {{
  access_log off; {temp}
  keepalive_timeout 300s; keepalive_requests 100000000;
  server {{ listen 127.0.0.1:{port} backlog=1024; location / {{ return 200 "{NGINX_BODY.encode("unicode_escape").decode()}"; }} }}
}}
"""
    )
    return ["nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix)]


SERVERS = {
    server.name: server
    for server in (
        Server("iperf3", ("iperf3",), lambda port, _: ["iperf3", "--server", "--bind", "127.0.0.1", "--port", str(port)]),
        Server(
            "redis",
            ("redis-server",),
            lambda port, _: [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--maxclients", "10000", "--protected-mode", "no",
            ],
        ),
        Server("nginx", ("nginx",), nginx_argv, http=True),
    )
}


def start_server(background: Background, server: Server) -> int:
    port = free_port()
    background.start(f"server-{server.name}", server.argv(port, background.logs.parent))
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


_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
_WRK_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\b", re.M)
_WRK_ERRORS = re.compile(r"^\s+(Non-2xx or 3xx responses|Socket errors):.*$", re.M)
_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(connections: int) -> Callable[[int, float], dict[str, float]]:
    """wrk, keep-alive GET / with `connections` connections (one thread): requests/s, and p50/p99 in ms.

    Every answer must be a 2xx and no connection may break: a path that
    answers fast with errors does not get to count them.
    """

    def measure(port: int, seconds: float) -> dict[str, float]:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", f"http://127.0.0.1:{port}/"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + CLIENT_GRACE, check=False)
        out = done.stdout
        rate, percentiles = _WRK_RATE.search(out), dict((p, float(v) * _TO_MS[u]) for p, v, u in _WRK_PERCENTILE.findall(out))
        if done.returncode != 0 or rate is None or set(percentiles) != {"50", "99"}:
            raise BenchError(f"wrk exited {done.returncode} without its figures: {(done.stderr or out).strip()[-500:]}")
        if errors := [m.group(0).strip() for m in _WRK_ERRORS.finditer(out)]:
            raise BenchError(f"wrk: {'; '.join(errors)}")
        return {"": float(rate.group(1)), "p50": percentiles["50"], "p99": percentiles["99"]}

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
class Figure:
    """A further figure a scenario's run gives besides its main one (wrk's latency percentiles)."""

    key: str  # what `measure` returns it under; the figure is named SCENARIO-KEY in the table and targets
    title: str
    unit: str
    higher_is_better: bool = True


@attrs.frozen
class Scenario:
    name: str
    title: str
    unit: str
    server: str | None  # a key of SERVERS; None: the scenario brings its own (idle-flows)
    programs: tuple[str, ...]  # the clients it runs
    # (port, seconds) -> figure; or {"": figure, KEY: another, ...} with a `Figure` in `more` for each KEY
    measure: Callable[[int | None, float], float | dict[str, float]]
    paths: tuple[str, ...] | None = None  # None: every path
    higher_is_better: bool = True
    runs: int | None = None  # None: --runs; idle-flows is measured once (memory is not timing noise)
    more: tuple[Figure, ...] = ()

    def figures(self) -> list[tuple[str, str, str]]:
        """(name, title, unit) of every figure it gives, the main one first."""
        return [(self.name, self.title, self.unit)] + [(f"{self.name}-{f.key}", f"{self.title} {f.key}", f.unit) for f in self.more]


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
            "http-50",
            f"HTTP, {HTTP_CONNECTIONS} clients",
            "req/s",
            "nginx",
            ("wrk",),
            wrk(HTTP_CONNECTIONS),
            paths=("direct", "haproxy", "fabric-2", "fabric-2-http"),
            more=(Figure("p50", "latency p50", "ms", higher_is_better=False), Figure("p99", "latency p99", "ms", higher_is_better=False)),
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
