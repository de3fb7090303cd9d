"""The benchmark suite: fabric against a direct connection, socat and haproxy, in one run.

    python -m tools.bench [--quick] [--only SCENARIO[,SCENARIO]] [--runs N] [--seconds S] [--paths P[,P]]

Starts the servers (iperf3, redis-server), the one-hop relays (socat,
haproxy) and three fabric sites as real processes (`fabric site run`, set up
through the `fabric` command), runs every scenario over every path for a
fixed time, `--runs` times (the paths taking turns within each run, so noise
falls on all of them), and prints the median, min and max of each, with
every fabric figure as a ratio to the baselines of the same run. The results
go to tools/bench/results/ as JSON (git-ignored), to compare across commits.
Installs nothing: a missing program is named with its Debian package.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from .common import environment, finish, raise_fd_limit
from .paths import PATHS, FabricNetwork, Relays
from .programs import (
    Background,
    BenchError,
    cpu_seconds,
    install_hint,
    missing_packages,
)
from .scenarios import REPO, SERVERS, Scenario, scenarios, start_server

RUNS = 3
SECONDS = 4.0  # per measurement: 5 scenarios x 6 paths + http-50 x 4 paths, x 3 runs ~ 8 minutes with start-up
QUICK_SECONDS = 2.0
PAUSE = 0.5  # seconds between measurements: closed connections settle, iperf3's server is ready again
FDS = 8192  # file descriptors: relays and clients hold a few hundred; idle-flows raises its own
RESULTS = Path(__file__).resolve().parent / "results"


@attrs.frozen
class Target:
    """One of issue 7's or 8's targets, checked on the medians of this run."""

    title: str
    scenario: str
    path: str
    versus: str | None = None  # a path: the figure is path / versus (for fabric-2 vs fabric-3: time per request)
    at_least: float | None = None
    at_most: float | None = None

    def check(self, medians: dict[tuple[str, str], float]) -> tuple[float | None, bool | None]:
        value = medians.get((self.scenario, self.path))
        if value is not None and self.versus is not None:
            other = medians.get((self.scenario, self.versus))
            value = value / other if other else None
        if value is None:
            return None, None
        ok = (self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
        return value, ok


TARGETS = (
    Target("bulk, 1 stream: fabric-2 / socat >= 0.5", "iperf3-P1", "fabric-2", "socat", at_least=0.5),
    Target("PING, 1 client: fabric-2 / socat >= 0.3", "ping-1", "fabric-2", "socat", at_least=0.3),
    Target("PING, 50 clients: fabric-2 / haproxy >= 0.2", "ping-50", "fabric-2", "haproxy", at_least=0.2),
    Target("new connections through 2 sites >= 2000/s", "connect", "fabric-2", at_least=2000),
    # Rates: fabric-2 / fabric-3 is the time per request of 3 sites over that of 2.
    Target("PING, 1 client: time per request 3 sites / 2 <= 1.6", "ping-1", "fabric-2", "fabric-3", at_most=1.6),
    Target("memory per idle flow < 64 KiB", "idle-flows", "fabric-2", at_most=64),
    # Issue 6: a WebSocket link against a TLS link, both 2 sites, same run.
    Target("bulk, 1 stream: fabric-ws / fabric-2 >= 0.7", "iperf3-P1", "fabric-ws", "fabric-2", at_least=0.7),
    # Issue 7: the HTTP listener against the TCP listener of the same two sites, nginx behind both.
    Target("HTTP, 50 clients: HTTP listener / TCP listener >= 0.8", "http-50", "fabric-2-http", "fabric-2", at_least=0.8),
    Target("HTTP, 50 clients: p99 HTTP listener / TCP listener <= 1.5", "http-50-p99", "fabric-2-http", "fabric-2", at_most=1.5),
    Target("HTTP, 50 clients, HTTP listener >= 5000 req/s", "http-50", "fabric-2-http", at_least=5000),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    names = [s.name for s in scenarios(quick=False)]
    parser.add_argument("--quick", action="store_true", help=f"1 run of {QUICK_SECONDS:g} s each: a smoke test")
    parser.add_argument("--only", help=f"comma-separated scenarios, of: {', '.join(names)}")
    parser.add_argument("--paths", help=f"comma-separated paths, of: {', '.join(p.name for p in PATHS)}")
    parser.add_argument("--runs", type=int, help=f"runs of each measurement (default {RUNS}; --quick: 1)")
    parser.add_argument("--seconds", type=float, help=f"seconds per measurement (default {SECONDS:g}; --quick: {QUICK_SECONDS:g})")
    parser.add_argument("--json", type=Path, help="where to write the results (default tools/bench/results/bench-TIME.json)")
    args = parser.parse_args(argv)
    for option, known in (("only", names), ("paths", [p.name for p in PATHS])):
        chosen = getattr(args, option)
        if chosen and (unknown := set(chosen.split(",")) - set(known)):
            parser.error(f"--{option}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    if (args.runs is not None and args.runs < 1) or (args.seconds is not None and args.seconds <= 0):
        parser.error("--runs must be at least 1 and --seconds positive")
    args.runs = args.runs or (1 if args.quick else RUNS)
    args.seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    return args


def git_commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in scenarios(quick=args.quick) if not args.only or s.name in args.only.split(",")]
    paths = [p for p in PATHS if not args.paths or p.name in args.paths.split(",")]

    needed = {p for s in chosen for p in s.programs} | {p for s in chosen if s.server for p in SERVERS[s.server].programs}
    if missing := missing_packages(needed):
        sys.exit(f"bench: missing Debian packages: {', '.join(missing)}; {install_hint(missing)}")
    for path in list(paths):
        if missing := missing_packages(set(path.programs)):
            print(f"bench: leaving out the {path.name} baseline: {install_hint(missing)}")
            paths.remove(path)
    raise_fd_limit(FDS, what="bench")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "logs").mkdir()
        background = Background(workdir / "logs")
        try:
            ports, network = setup(background, workdir, chosen, paths)
            print(f"bench: set up in {time.perf_counter() - started:.1f} s; {args.runs} run(s) of {args.seconds:g} s each\n")
            samples = measure_all(chosen, paths, ports, args, network)
        except BenchError as exc:
            sys.exit(f"bench: {exc}")
        finally:
            background.stop()
    elapsed = time.perf_counter() - started
    summary = report(chosen, paths, samples, args, elapsed)
    path = args.json or RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return finish(summary, path)


def setup(
    background: Background, workdir: Path, chosen: list[Scenario], paths: list
) -> tuple[dict[tuple[str, str], int], FabricNetwork | None]:
    """Start the servers, relays and sites; (server, path) -> the port a client dials, and the sites."""
    names = {p.name for p in paths}
    servers = sorted({s.server for s in chosen if s.server})
    targets = {name: start_server(background, SERVERS[name]) for name in servers}
    ports: dict[tuple[str, str], int] = {}
    network = None
    relays = Relays(background, workdir)
    for name, target in targets.items():
        ports[name, "direct"] = target
        if "socat" in names:
            ports[name, "socat"] = relays.socat(name, target)
    if "haproxy" in names and targets:
        http = frozenset(name for name in targets if SERVERS[name].http)
        for name, port in relays.haproxy(targets, http).items():
            ports[name, "haproxy"] = port
    if names & {"fabric-2", "fabric-3", "fabric-ws", "fabric-2-http"} and targets:
        network = FabricNetwork(background, workdir)
        network.start()
        for name, target in targets.items():
            for path, port in network.expose(name, target, http=SERVERS[name].http).items():
                ports[name, path] = port
    return ports, network


def measure_all(
    chosen: list[Scenario], paths: list, ports: dict, args: argparse.Namespace, network: FabricNetwork | None
) -> dict:
    """(figure, path) -> {"values": [...], "cpu": [{site: share of one core}, ...]}; a figure is named as in
    `Scenario.figures` (the scenario's name for its main one)."""
    samples: dict[tuple[str, str], dict] = {}
    for scenario in chosen:
        on = [p.name for p in paths if scenario.paths is None or p.name in scenario.paths]
        runs = scenario.runs or args.runs
        for run in range(runs):
            for path in on:
                port = ports.get((scenario.server, path)) if scenario.server else None
                if scenario.server and port is None:
                    continue
                sites = network.pids if network and path.startswith("fabric") and scenario.server else {}
                cpu_before = {site: cpu_seconds(pid) for site, pid in sites.items()}
                wall = time.perf_counter()
                try:
                    values = scenario.measure(port, args.seconds)
                except BenchError as exc:
                    print(f"  {scenario.name:10} {path:9} run {run + 1}/{runs}: FAILED: {exc}")
                    if network:
                        network.check()
                    continue
                wall = time.perf_counter() - wall
                cpu = {site: (cpu_seconds(pid) - cpu_before[site]) / wall for site, pid in sites.items()}
                if not isinstance(values, dict):
                    values = {"": values}
                for (figure, *_), key in zip(scenario.figures(), ["", *(f.key for f in scenario.more)]):
                    entry = samples.setdefault((figure, path), {"values": [], "cpu": []})
                    entry["values"].append(values[key])
                    entry["cpu"].append(cpu)
                load = " ".join(f"{site}={share:.0%}" for site, share in cpu.items() if share >= 0.02)
                more = "".join(f", {f.key} {values[f.key]:,.2f} {f.unit}" for f in scenario.more)
                print(f"  {scenario.name:10} {path:13} run {run + 1}/{runs}: {values['']:12,.2f} {scenario.unit:7}{more} {load}",
                      flush=True)
                time.sleep(PAUSE)
    return samples


def fmt(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def report(chosen: list[Scenario], paths: list, samples: dict, args: argparse.Namespace, elapsed: float) -> dict:
    medians = {key: statistics.median(entry["values"]) for key, entry in samples.items() if entry["values"]}
    baselines = [p.name for p in paths if p.baseline]
    header = f"{'scenario':24} {'path':13} {'median':>9} {'min':>9} {'max':>9} {'unit':7}" + "".join(
        f" {'/' + b:>8}" for b in baselines
    )
    print(f"\nmedians of {args.runs} run(s) of {args.seconds:g} s; fabric figures as ratios to the baselines of this run\n")
    print(header)
    print("-" * len(header))
    rows = []
    for name, title, unit in (figure for scenario in chosen for figure in scenario.figures()):
        for path in paths:
            entry = samples.get((name, path.name))
            if not entry or not entry["values"]:
                continue
            values = entry["values"]
            median = medians[name, path.name]
            ratios = {}
            if not path.baseline:
                for base in baselines:
                    if other := medians.get((name, base)):
                        ratios[base] = median / other
            line = f"{title[:24]:24} {path.name:13} {fmt(median):>9} {fmt(min(values)):>9} {fmt(max(values)):>9} {unit:7}"
            line += "".join(f" {ratios[b]:>7.2f}x" if b in ratios else f" {'':>8}" for b in baselines)
            print(line)
            cpu = {site: statistics.median(c[site] for c in entry["cpu"]) for site in (entry["cpu"][0] if entry["cpu"] else {})}
            rows.append(
                {
                    "scenario": name,
                    "path": path.name,
                    "unit": unit,
                    "median": median,
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                    "ratios": ratios,
                    "site_cpu_median": cpu,
                }
            )
    print("\ntargets (issues 7 and 8):")
    verdicts = []
    for target in TARGETS:
        value, ok = target.check(medians)
        if ok is None:
            continue
        verdicts.append({"target": target.title, "value": value, "met": ok})
        print(f"  {'met   ' if ok else 'MISSED'} {target.title}: {fmt(value)}")
    passed = all(v["met"] for v in verdicts)
    print(f"\nwhole run {elapsed / 60:.1f} min: {'PASS' if passed else 'FAIL'} ({sum(v['met'] for v in verdicts)}/{len(verdicts)} targets)")
    return {
        "benchmark": "bench",
        "commit": git_commit(),
        "runs": args.runs,
        "seconds": args.seconds,
        "rows": rows,
        "targets": verdicts,
        "pass": passed,
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_s": elapsed,
    }


if __name__ == "__main__":
    sys.exit(main())
