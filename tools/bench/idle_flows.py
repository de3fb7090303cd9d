"""Site memory per idle connection: what holding a flow open costs a site.

    python -m tools.bench.idle_flows [--connections 1000] [--json PATH]

Two sites run in one process, linked (an edge dials a hub). The hub has a
connector to a local TCP target that echoes and then holds each connection;
the edge has a listener. N clients connect through the listener, each sends
one small message and reads its echo back (so the flow is established at
both sites and carried end to end), and then stays idle.

The clients and the target live in the same process as the sites, so their
own cost is measured too, in the same process, as a baseline: N plain
connections straight to the target, also echoed once and left open. Both
sets are held at once (baseline first), so each delta is memory newly taken,
not memory another phase freed:

    baseline       = (after baseline - before) / N     client socket + target handler
    fabric raw     = (after fabric - after baseline) / N
    fabric net     = fabric raw - baseline             what the two sites hold per idle flow

Memory is measured twice, each in a fresh child process, because the two
tools disturb each other: with tracemalloc (bytes Python allocated, from
`get_traced_memory`, and per-line snapshot diffs showing where they go),
and without it, as RSS (VmRSS from /proc/self/status), which also counts
what tracemalloc cannot see (allocator slack, C buffers) but not kernel
socket buffers. The acceptance target is a net cost below 64 KiB per idle
connection by both measures.

Results are printed as a table and written as JSON to
tools/bench/results/idle_flows.json (git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import attrs
import trio

import fabric

from .common import environment, finish, poll_until, raise_fd_limit

TARGET_BYTES = 64 * 1024  # acceptance: site memory per idle connection, net of the baseline
DEFAULT_CONNECTIONS = 1000
OPENING_AT_ONCE = 64  # connections being opened concurrently: well under the listen backlog
WARMUP = 32  # connections opened and closed through both paths first, so caches and pools exist
SETTLE_DEADLINE = 30  # seconds for counts (flows, target connections) to reach what was opened
SETTLE_INTERVAL = 0.02  # seconds between looks at those counts (no event says them)
QUIET = 0.5  # seconds to leave the idle connections alone before measuring: keepalives, writers
SETUP_DEADLINE = 20  # seconds to link the sites and see the service
FDS_PER_CONNECTION = 6  # baseline: client + target; fabric: client, listener side, connector side, target
FD_MARGIN = 256  # link sockets, listeners, pipes, files
TOP_LINES = 12  # allocation sites shown for the fabric phase
REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "idle_flows.json"
KIB = 1024
RSS_MEANINGFUL = 500  # connections below which RSS deltas are mostly page and arena granularity


# -- the target: echo once, then hold -------------------------------------------------------


@attrs.define
class Target:
    """Echoes what arrives and holds the connection until the client closes it."""

    connections: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while data := await stream.receive_some(4096):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)


async def open_idle(port: int, count: int, tag: str) -> list[trio.SocketStream]:
    """`count` connections to `port`, each echoed one small message; returned open and idle."""
    streams: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(OPENING_AT_ONCE)

    async def one(i: int) -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            message = f"{tag} {i}\n".encode()
            await stream.send_all(message)
            echoed = b""
            while len(echoed) < len(message):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"{tag} connection {i}: closed before its echo came back")
                echoed += chunk
            if echoed != message:
                raise RuntimeError(f"{tag} connection {i}: echo {echoed!r} is not {message!r}")
            streams.append(stream)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return streams


async def close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await stream.aclose()
    streams.clear()


async def settle(what: str, current, expected: int) -> None:
    """Wait until `current()` is `expected` (counts in sites and the target have no event)."""
    if not await poll_until(lambda: current() == expected, deadline=SETTLE_DEADLINE, interval=SETTLE_INTERVAL):
        raise RuntimeError(f"{what}: {current()} after {SETTLE_DEADLINE} s, expected {expected}")


# -- measuring ----------------------------------------------------------------------------------


def vm_rss() -> int:
    """Resident set size of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no VmRSS in /proc/self/status")


@attrs.define
class Probe:
    """Measures at named points: traced bytes (tracemalloc pass) or RSS (rss pass)."""

    mode: str  # "tracemalloc" or "rss"
    workdir: Path
    points: dict[str, int] = attrs.Factory(dict)
    snapshots: dict[str, Path] = attrs.Factory(dict)

    def start(self) -> None:
        if self.mode == "tracemalloc":
            tracemalloc.start()

    def measure(self, point: str) -> None:
        gc.collect()
        if self.mode == "rss":
            self.points[point] = vm_rss()
            return
        self.points[point] = tracemalloc.get_traced_memory()[0]  # before the snapshot adds its own
        # Kept on disk, not in memory, so no snapshot inflates the next point.
        path = self.workdir / f"{point}.snapshot"
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(str(path))
        del snapshot
        self.snapshots[point] = path
        gc.collect()

    def top_lines(self, before: str, after: str, per: int) -> list[dict]:
        """Where the memory taken between two points went: the largest source lines, per connection."""
        if self.mode != "tracemalloc":
            return []
        tracemalloc.stop()  # loading and diffing snapshots is not part of what is measured
        old = tracemalloc.Snapshot.load(str(self.snapshots[before]))
        new = tracemalloc.Snapshot.load(str(self.snapshots[after]))
        packages: dict[str, float] = {}
        for stat in new.compare_to(old, "filename"):
            package = _package(stat.traceback[0].filename)
            packages[package] = packages.get(package, 0) + stat.size_diff / per
        top = [{"where": f"package {name}", "bytes_per_connection": size, "blocks_per_connection": None}
               for name, size in sorted(packages.items(), key=lambda item: -item[1]) if abs(size) >= 1]
        for stat in new.compare_to(old, "lineno")[:TOP_LINES]:
            frame = stat.traceback[0]
            top.append(
                {
                    "where": f"{_short(frame.filename)}:{frame.lineno}",
                    "bytes_per_connection": stat.size_diff / per,
                    "blocks_per_connection": stat.count_diff / per,
                }
            )
        return top


def _short(filename: str) -> str:
    """`trio/_sync.py`, `fabric/router/link.py`, `contextlib.py`: the path from where imports start."""
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    if match := re.search(r"/lib/python3\.\d+/(.*)", filename):
        return match[1]
    try:
        return str(Path(filename).resolve().relative_to(REPO))
    except ValueError:
        return filename


def _package(filename: str) -> str:
    """What a source file belongs to: fabric, tools, a third-party package, the standard library."""
    if filename.startswith("<"):
        return "generated (<attrs ...>, <frozen ...>)"
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if re.search(r"/lib/python3\.\d+/", filename):
        return "stdlib"
    short = _short(filename)
    return short.split("/", 1)[0] if short != filename else "other"


# -- one measuring pass (a child process) ----------------------------------------------------------


async def measure_pass(mode: str, connections: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fabric-idle-flows-") as tmp:
        root = Path(tmp)
        probe = Probe(mode, root)
        target = Target()
        # The default flow limit per link (4096) would cap N; memory does not depend on it.
        settings = fabric.Settings(max_flows_per_link=max(fabric.Settings().max_flows_per_link, connections + WARMUP))
        timings: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, target.handle, 0, host="127.0.0.1"))
            target_port = listeners[0].socket.getsockname()[1]
            async with (
                # Both sites on one host: no service sync (it would listen on the target's own port).
                fabric.open_site("hub", root / "hub", link_port=0, settings=settings, service_sync=False) as hub,
                fabric.open_site("edge", root / "edge", mode="edge", settings=settings, service_sync=False) as edge,
            ):
                with trio.fail_after(SETUP_DEADLINE):
                    token = await hub.issue_token(redemptions_allowed=1, expiration_window=900)
                    await edge.redeem_token(token, cost=1)
                    await hub.create_connector("target", target_port, host="127.0.0.1")
                    listener = await edge.create_listener("target", 0)
                    await edge.wait_reachable("target")

                def flows() -> tuple[int, int]:
                    return (
                        sum(l.flows for l in hub.status().links),
                        sum(l.flows for l in edge.status().links),
                    )

                # Warm up both paths, then let everything close.
                await close_all(await open_idle(target_port, WARMUP, "warmup-direct"))
                await close_all(await open_idle(listener.port, WARMUP, "warmup-fabric"))
                await settle("target connections after warm-up", lambda: target.connections, 0)
                await settle("flows after warm-up", flows, (0, 0))

                probe.start()
                await trio.sleep(QUIET)
                probe.measure("before")

                started = time.perf_counter()
                direct = await open_idle(target_port, connections, "direct")
                timings["open_baseline_s"] = time.perf_counter() - started
                await settle("target connections (baseline)", lambda: target.connections, connections)
                await trio.sleep(QUIET)
                probe.measure("baseline")

                started = time.perf_counter()
                through = await open_idle(listener.port, connections, "fabric")
                timings["open_fabric_s"] = time.perf_counter() - started
                await settle("target connections (baseline + fabric)", lambda: target.connections, 2 * connections)
                await settle("flows at hub and edge", flows, (connections, connections))
                await settle("listener connections", lambda: edge.status().listeners[0].connections, connections)
                await trio.sleep(QUIET)
                probe.measure("fabric")

                await close_all(through)
                await close_all(direct)
                await settle("target connections after close", lambda: target.connections, 0)
                await settle("flows after close", flows, (0, 0))
                await trio.sleep(QUIET)
                probe.measure("closed")
            nursery.cancel_scope.cancel()
        return {
            "mode": mode,
            "points": probe.points,
            "top_fabric": probe.top_lines("baseline", "fabric", connections),
            "timings": timings,
        }


# -- the whole run --------------------------------------------------------------------------------------



def run_child(mode: str, connections: int) -> dict:
    command = [sys.executable, "-m", "tools.bench.idle_flows", "--connections", str(connections), "--pass", mode]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"idle_flows: the {mode} pass failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_connection(points: dict[str, int], connections: int) -> dict[str, float]:
    baseline = (points["baseline"] - points["before"]) / connections
    raw = (points["fabric"] - points["baseline"]) / connections
    return {
        "baseline_total": points["baseline"] - points["before"],
        "fabric_raw_total": points["fabric"] - points["baseline"],
        "baseline_per_connection": baseline,
        "fabric_raw_per_connection": raw,
        "fabric_net_per_connection": raw - baseline,
        "fabric_net_total": (raw - baseline) * connections,
        "retained_after_close_total": points["closed"] - points["before"],
    }


def kib(n: float) -> str:
    return f"{n / KIB:,.1f} KiB"


def mib(n: float) -> str:
    return f"{n / KIB / KIB:,.2f} MiB"


def report(connections: int, results: dict[str, dict], elapsed: float) -> dict:
    traced = per_connection(results["tracemalloc"]["points"], connections)
    rss = per_connection(results["rss"]["points"], connections)
    measures = {"tracemalloc": traced, "RSS": rss}
    verdicts = {name: figures["fabric_net_per_connection"] < TARGET_BYTES for name, figures in measures.items()}
    passed = all(verdicts.values())

    rows = [
        ("baseline: direct client + target", "baseline_total", "baseline_per_connection"),
        ("fabric raw: through the link", "fabric_raw_total", "fabric_raw_per_connection"),
        ("fabric net: raw - baseline", "fabric_net_total", "fabric_net_per_connection"),
    ]
    print(f"\nidle flows: {connections} idle connections through an edge -> hub link (two sites, one process)\n")
    print(f"{'':36} {'tracemalloc':>24}   {'RSS':>24}")
    print(f"{'':36} {'total':>11} {'per conn':>12}   {'total':>11} {'per conn':>12}")
    for label, total, per in rows:
        print(f"{label:36} {mib(traced[total]):>11} {kib(traced[per]):>12}   {mib(rss[total]):>11} {kib(rss[per]):>12}")
    print(
        f"{'still held after closing them all':36} {mib(traced['retained_after_close_total']):>11} {'':>12}   "
        f"{mib(rss['retained_after_close_total']):>11} {'(RSS rarely shrinks)':>12}"
    )
    top = results["tracemalloc"]["top_fabric"]
    if top:
        print("\nwhere the fabric phase's bytes go (raw, per connection; tracemalloc by package, then by source line):")
        for entry in top:
            blocks = entry["blocks_per_connection"]
            count = "" if blocks is None else f"{blocks:6.1f} blocks"
            print(f"  {entry['bytes_per_connection']:>9,.0f} B {count:>13}  {entry['where']}")
    timings = results["rss"]["timings"]
    print(
        f"\nopening {connections} connections (rss pass): direct {timings['open_baseline_s']:.2f} s, "
        f"through fabric {timings['open_fabric_s']:.2f} s "
        f"({connections / timings['open_fabric_s']:,.0f} connections/s); whole run {elapsed:.1f} s"
    )
    marks = ", ".join(f"{name} {kib(figures['fabric_net_per_connection'])}" for name, figures in measures.items())
    if connections < RSS_MEANINGFUL:
        print(f"\nnote: below {RSS_MEANINGFUL} connections the RSS figures are mostly page and arena granularity")
    verdict = "PASS" if passed else "FAIL"
    print(f"\ntarget: < {kib(TARGET_BYTES)} of site memory per idle connection: {marks} -> {verdict}\n")
    return {
        "benchmark": "idle_flows",
        "connections": connections,
        "target_bytes_per_connection": TARGET_BYTES,
        "pass": passed,
        "verdicts": verdicts,
        "tracemalloc": {**traced, "points": results["tracemalloc"]["points"], "top_fabric_lines": top},
        "rss": {**rss, "points": results["rss"]["points"]},
        "timings": {"tracemalloc_pass": results["tracemalloc"]["timings"], "rss_pass": timings, "run_s": elapsed},
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.idle_flows", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections", "-n", type=int, default=DEFAULT_CONNECTIONS, help="idle connections to hold (default 1000)"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS.relative_to(REPO)})"
    )
    parser.add_argument("--pass", dest="mode", choices=("tracemalloc", "rss"), help=argparse.SUPPRESS)  # a child's job
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    raise_fd_limit(args.connections * FDS_PER_CONNECTION + FD_MARGIN, what=f"idle_flows: {args.connections} connections")

    if args.mode:  # a child: one pass, its numbers as one JSON line on stdout
        print(json.dumps(trio.run(measure_pass, args.mode, args.connections)))
        return 0

    started = time.perf_counter()
    results = {}
    for mode in ("rss", "tracemalloc"):
        print(f"idle_flows: {mode} pass, {args.connections} connections ...", flush=True)
        results[mode] = run_child(mode, args.connections)
    summary = report(args.connections, results, time.perf_counter() - started)
    return finish(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
