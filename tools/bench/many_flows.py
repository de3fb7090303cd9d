"""many_flows: ten thousand connections held through site processes for minutes, watched for growth.

    python -m tools.bench.many_flows [--connections 10000] [--seconds 600] [--interval 10]
                                     [--ping-every 30] [--json PATH]

The suite's sites (tools/bench/paths.py: a, b, c and w, `fabric site run`
processes, set up through the `fabric` command) and one redis-server behind
b and c. Half the connections take path fabric-2 (listener at a, the link
to b, b's connector), half fabric-3 (a -> b -> c, c's connector): site a
accepts them all, b carries them all and dials half, c dials the other half.
The sites' flows per link (`max_flows_per_link`) are raised to fit.

The connections are opened at most OPEN_CONCURRENCY at a time, each checked
with a first PING; then each sends a PING every `--ping-every` seconds (the
first at a random moment of that period, so the load is spread) and must
get its +PONG within PING_TIMEOUT. Every `--interval` seconds one line:
connections open, PINGs answered and failed, each site's RSS and open file
descriptors. Memory per flow at each site: RSS once all are open, minus RSS
before, over the connections.

It fails (exit status 1) on any failed or unanswered PING, on growth (the
second half's samples against the first half's, as tools/soak.py checks),
or if, once every connection is closed, a site's file descriptors do not
come back to where they were before.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

from .common import environment, finish, growth, open_fds, poll_until, raise_fd_limit, rss_mb
from .paths import FabricNetwork
from .programs import Background, BenchError, install_hint, missing_packages
from .scenarios import SERVERS, start_server

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tools" / "bench" / "results" / "many_flows.json"
SITES = ("a", "b", "c")  # w takes no part
OPEN_CONCURRENCY = 64  # connections being opened at once
PING_TIMEOUT = 30.0  # seconds for a PING's answer before it counts as unanswered (generous: shared CPUs)
DRAIN_DEADLINE = 30.0  # seconds, once every connection is closed, for the sites to close theirs
DRAIN_INTERVAL = 0.5  # seconds between looks at the sites' descriptors (another process: no event)
FD_SLACK = 16  # a site's fds after closing may exceed those before by this much
# Growth, per site: the second half's median may exceed the first half's maximum by this factor plus this much.
GROWTH = {"rss_mb": (1.05, 16.0), "fds": (1.01, 16)}
PONG = b"+PONG\r\n"


class Clients:
    def __init__(self, ports: list[int], args: argparse.Namespace, rng: random.Random) -> None:
        self.ports = ports
        self.args = args
        self.rng = rng
        self.open = 0
        self.pings = 0
        self.failures: list[str] = []
        self.all_open = trio.Event()

    async def ping(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(PING_TIMEOUT) as timer:
            await stream.send_all(b"PING\r\n")
            answer = b""
            while len(answer) < len(PONG):
                chunk = await stream.receive_some(len(PONG) - len(answer))
                if not chunk:
                    raise trio.BrokenResourceError("the connection was closed")
                answer += chunk
        if timer.cancelled_caught:
            raise trio.TooSlowError(f"no answer to PING within {PING_TIMEOUT:g} s")
        if answer != PONG:
            raise trio.BrokenResourceError(f"answered {answer!r}")
        self.pings += 1

    async def connection(self, index: int, opening: trio.CapacityLimiter, stop: trio.Event) -> None:
        rng = random.Random(self.rng.random())
        try:
            async with opening:
                stream = await trio.open_tcp_stream("127.0.0.1", self.ports[index % len(self.ports)])
                await self.ping(stream)
            self.open += 1
            if self.open == self.args.connections:
                self.all_open.set()
            async with stream:
                await trio.sleep(rng.uniform(0, self.args.ping_every))
                while not stop.is_set():
                    await self.ping(stream)
                    await trio.sleep(self.args.ping_every)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.failures.append(f"connection {index}: {exc}")
            self.all_open.set()  # it will never be open: do not wait for it


def sample(t: float, clients: Clients, pids: dict[str, int]) -> dict:
    row: dict = {"t": round(t), "open": clients.open, "pings": clients.pings, "failed": len(clients.failures)}
    for site, pid in pids.items():
        row[f"rss_mb_{site}"] = round(rss_mb(pid), 1)
        row[f"fds_{site}"] = open_fds(pid)
    sites = " ".join(f"{site}: {row[f'rss_mb_{site}']:6.1f} MB {row[f'fds_{site}']:5d} fds" for site in pids)
    print(f"t={row['t']:5d}s open={row['open']:5d} pings={row['pings']:7d} failed={row['failed']} | {sites}", flush=True)
    return row


async def run(ports: list[int], pids: dict[str, int], args: argparse.Namespace) -> dict:
    clients = Clients(ports, args, random.Random(args.seed))
    before = {site: {"rss_mb": rss_mb(pid), "fds": open_fds(pid)} for site, pid in pids.items()}
    samples: list[dict] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        opening = trio.CapacityLimiter(OPEN_CONCURRENCY)
        started = time.monotonic()
        for index in range(args.connections):
            nursery.start_soon(clients.connection, index, opening, stop)
        await clients.all_open.wait()
        ramp = time.monotonic() - started
        print(f"many_flows: {clients.open} connections open in {ramp:.1f} s; holding them {args.seconds:g} s", flush=True)
        at_load = {site: {"rss_mb": rss_mb(pid), "fds": open_fds(pid)} for site, pid in pids.items()}
        held_from = trio.current_time()
        while trio.current_time() + args.interval <= held_from + args.seconds + 0.5:
            await trio.sleep_until(held_from + args.interval * (len(samples) + 1))
            samples.append(sample(trio.current_time() - held_from, clients, pids))
        stop.set()
        nursery.cancel_scope.cancel()

    failures = [f"{len(clients.failures)} connection(s) failed; the first: {clients.failures[0]}"] if clients.failures else []
    failures += growth(samples, {f"{key}_{site}": limit for site in pids for key, limit in GROWTH.items()})

    def drained() -> bool:
        return all(open_fds(pid) <= before[site]["fds"] + FD_SLACK for site, pid in pids.items())

    await poll_until(drained, deadline=DRAIN_DEADLINE, interval=DRAIN_INTERVAL)  # what is left is a failure below
    after = {site: {"rss_mb": rss_mb(pid), "fds": open_fds(pid)} for site, pid in pids.items()}
    for site in pids:
        if after[site]["fds"] > before[site]["fds"] + FD_SLACK:
            failures.append(f"site {site} holds {after[site]['fds']} fds after closing, {before[site]['fds']} before")
    per_flow = {
        site: round((at_load[site]["rss_mb"] - before[site]["rss_mb"]) * 1024 / max(1, clients.open), 1) for site in pids
    }
    print("RSS per connection (KiB): " + ", ".join(f"{site} {kib}" for site, kib in per_flow.items()))
    print("after closing: " + ", ".join(f"{site} {a['rss_mb']:.1f} MB {a['fds']} fds" for site, a in after.items()))
    verdict = "PASS" if not failures else "FAIL: " + "; ".join(failures)
    print(f"many_flows: {verdict}")
    return {
        "pass": not failures,
        "failures": failures,
        "connections": args.connections,
        "seconds": args.seconds,
        "ping_every": args.ping_every,
        "ramp_seconds": round(ramp, 1),
        "pings": clients.pings,
        "before": before,
        "at_load": at_load,
        "after": after,
        "rss_kib_per_connection": per_flow,
        "samples": samples,
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.many_flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000, help="connections to hold (default 10000)")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to hold them (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--ping-every", type=float, default=30.0, help="seconds between one connection's PINGs (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="for the PINGs' timing (default: random)")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if args.connections < 2 or args.seconds <= 0 or args.interval <= 0 or args.ping_every <= 0:
        parser.error("--connections must be at least 2, and --seconds, --interval and --ping-every positive")
    if missing := missing_packages(set(SERVERS["redis"].programs)):
        sys.exit(f"many_flows: missing Debian packages: {', '.join(missing)}; {install_hint(missing)}")
    # This process holds one socket per connection; so does site a (the sites inherit the limit).
    raise_fd_limit(args.connections + 1024, what=f"many_flows: {args.connections} connections")
    with tempfile.TemporaryDirectory(prefix="fabric-many-flows-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        background = Background(workdir / "logs")
        try:
            redis = SERVERS["redis"]
            maxclients = ["--maxclients", str(args.connections + 100)]  # the last of two --maxclients counts
            port = start_server(background, attrs.evolve(redis, argv=lambda *a: [*redis.argv(*a), *maxclients]))
            network = FabricNetwork(background, workdir, settings={"max_flows_per_link": args.connections + 100})
            network.start()
            paths = network.expose("redis", port)
            pids = {site: network.pids[site] for site in SITES}
            summary = trio.run(run, [paths["fabric-2"], paths["fabric-3"]], pids, args)
            network.check()
        except BenchError as exc:
            sys.exit(f"many_flows: {exc}")
        finally:
            background.stop()
    return finish(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
