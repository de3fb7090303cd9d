"""Gossip convergence and gossip at rest, for 10, 50 and 100 sites in line, star and random-mesh topologies.

    python -m tools.bench.gossip_convergence [--sizes 10 50 100] [--topologies line star mesh]
                                             [--runs 3] [--json PATH]

The sites are `GossipEngine`s in one process on the simulated network of
tools/bench/gossip_sim.py: every message goes through the real codec, every
record is really signed and verified, each hop takes 1 ms +- 0.5 ms (uniform),
and the CPU time a site actually spends (decoding, verifying, encoding, and
recomputing its routes as the router does after each change) is added to the
simulated clock before its answers leave, one message at a time per site, as
on one core per site. Nothing is lost on the way.

Two measures per topology and size:

- convergence: a connector is added at one site (the far end of the line, a
  leaf of the star, a random site of the mesh); the time until every site's
  catalog holds the key with that provider AND `compute_routes` at every site
  has a route to it. Median and worst of `--runs` networks (seeds).
- gossip at rest: once settled, the GOSSIP frames (payload + 12-byte frame
  header; TLS adds its own ~22 bytes a record on top) each site sends in 10
  simulated minutes with the default 5 s anti-entropy interval, per site per
  minute: the mean over sites, and the busiest site (the hub of the star).

Targets (issue 3): convergence under 1 s for 100 sites, and gossip at rest
under 2 KiB per site per minute. The table ends with PASS or FAIL; the exit
status is 0 for PASS, 1 for FAIL. Results go to
tools/bench/results/gossip_convergence.json (git-ignored).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import fabric
from fabric.gossip.engine import ANTI_ENTROPY_INTERVAL
from fabric.router.routes import compute_routes

from .common import finish
from .gossip_sim import SimSite, Simulation, line, random_mesh, star

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tools" / "bench" / "results" / "gossip_convergence.json"

TARGET_CONVERGENCE = 1.0  # seconds, for 100 sites
TARGET_SIZE = 100  # the size the convergence target is held to
TARGET_AT_REST = 2048  # bytes per site per minute
HOP_DELAY = 0.001  # seconds a message takes over a link: a LAN or one machine
HOP_JITTER = 0.0005  # seconds, +- uniform
REST_MINUTES = 10  # simulated minutes measured at rest
SETTLE = 3 * ANTI_ENTROPY_INTERVAL  # simulated seconds left after forming, for follow-up rounds to die down
KEY = "bench-service"


def build(topology: str, size: int, seed: int) -> tuple[Simulation, list[SimSite], SimSite]:
    sim = Simulation(seed=seed, delay=HOP_DELAY, jitter=HOP_JITTER, measure_cpu=True)
    sites = [sim.add_site(f"site-{i:03d}") for i in range(size)]
    if topology == "line":
        edges, provider = line(sites), sites[-1]  # the far end: a change crosses size - 1 hops
    elif topology == "star":
        edges, provider = star(sites), sites[-1]  # a leaf: through the hub to every other leaf
    else:
        edges = random_mesh(sites, sim.rng)
        provider = sites[sim.rng.randrange(size)]
    sim.connect(edges)
    if not sim.run_until(sim.converged, 60.0, check_every=0.05):
        raise RuntimeError(f"{topology} of {size} did not form in 60 simulated seconds")
    sim.run_for(SETTLE)
    return sim, sites, provider


def measure_convergence(sim: Simulation, sites: list[SimSite], provider: SimSite) -> dict[str, float]:
    """Add a connector at `provider`; simulated seconds until every site can route to it."""
    done: dict[str, float] = {}
    generations = {site.site_id: site.engine.generation for site in sites}
    routing_cpu = 0.0

    def after_step(site: SimSite, at: float) -> None:
        nonlocal routing_cpu
        if site.engine.generation == generations[site.site_id]:
            return
        generations[site.site_id] = site.engine.generation
        # What the router does after a change: recompute routes and the
        # catalog. Its CPU time holds up the site's next message, not the
        # answers already sent.
        began = time.perf_counter()
        routes = compute_routes(site.site_id, site.engine.table.records)
        catalog = site.engine.catalog()
        spent = time.perf_counter() - began
        routing_cpu += spent
        site.busy_until = max(site.busy_until, at + spent)
        reached = site is provider or provider.site_id in routes
        if site.site_id not in done and reached and provider.site_id in catalog.get(KEY, ()):
            done[site.site_id] = at + spent

    start = sim.now
    sent_before = sum(site.messages_sent for site in sites)
    bytes_before = sum(site.bytes_sent for site in sites)
    cpu_before = sum(site.cpu for site in sites)
    sim.after_step = after_step
    try:
        sim.set_service(provider, KEY)
        finished = sim.run_until(lambda: len(done) == len(sites), 60.0, check_every=0.001)
    finally:
        sim.after_step = None
    if not finished:
        raise RuntimeError(f"only {len(done)} of {len(sites)} sites could route to the provider after 60 s")
    return {
        "seconds": max(done.values()) - start,
        "messages": sum(site.messages_sent for site in sites) - sent_before,
        "bytes": sum(site.bytes_sent for site in sites) - bytes_before,
        "gossip_cpu_s": sum(site.cpu for site in sites) - cpu_before,
        "routing_cpu_s": routing_cpu,
    }


def measure_at_rest(sim: Simulation, sites: list[SimSite]) -> dict[str, float]:
    """Bytes of gossip per site per minute when nothing changes."""
    sim.run_for(SETTLE)
    before = {site.site_id: site.bytes_sent for site in sites}
    messages = sum(site.messages_sent for site in sites)
    sim.run_for(REST_MINUTES * 60.0)
    per_site = [(site.bytes_sent - before[site.site_id]) / REST_MINUTES for site in sites]
    return {
        "mean_bytes_per_site_per_minute": statistics.fmean(per_site),
        "max_bytes_per_site_per_minute": max(per_site),
        "messages_per_site_per_minute": (sum(site.messages_sent for site in sites) - messages) / len(sites) / REST_MINUTES,
    }


def run(topology: str, size: int, runs: int) -> dict[str, object]:
    convergence, rest = [], []
    links = 0
    for seed in range(runs):
        sim, sites, provider = build(topology, size, seed)
        links = len(sim.links)
        convergence.append(measure_convergence(sim, sites, provider))
        rest.append(measure_at_rest(sim, sites))
        if not sim.converged():
            raise RuntimeError(f"{topology} of {size} fell out of convergence at rest")
    seconds = [c["seconds"] for c in convergence]
    return {
        "topology": topology,
        "sites": size,
        "links": links,
        "runs": runs,
        "convergence_s": {"median": statistics.median(seconds), "max": max(seconds), "each": seconds},
        "messages_per_change": statistics.median(c["messages"] for c in convergence),
        "bytes_per_change": statistics.median(c["bytes"] for c in convergence),
        "gossip_cpu_s_per_change": statistics.median(c["gossip_cpu_s"] for c in convergence),
        "routing_cpu_s_per_change": statistics.median(c["routing_cpu_s"] for c in convergence),
        "at_rest": {
            "mean_bytes_per_site_per_minute": statistics.fmean(r["mean_bytes_per_site_per_minute"] for r in rest),
            "max_bytes_per_site_per_minute": max(r["max_bytes_per_site_per_minute"] for r in rest),
            "messages_per_site_per_minute": statistics.fmean(r["messages_per_site_per_minute"] for r in rest),
        },
    }


def report(rows: list[dict], elapsed: float) -> dict[str, object]:
    print(
        f"\n{'topology':8} {'sites':>5} {'links':>5}   {'converge median':>15} {'worst':>8}   "
        f"{'msgs':>6} {'KiB':>7} {'cpu ms':>7}   {'at rest B/site/min':>18} {'busiest':>8}"
    )
    for row in rows:
        conv, rest = row["convergence_s"], row["at_rest"]
        cpu = (row["gossip_cpu_s_per_change"] + row["routing_cpu_s_per_change"]) * 1000
        print(
            f"{row['topology']:8} {row['sites']:>5} {row['links']:>5}   {conv['median'] * 1000:>12.1f} ms "
            f"{conv['max'] * 1000:>5.1f} ms   {row['messages_per_change']:>6.0f} {row['bytes_per_change'] / 1024:>7.1f} "
            f"{cpu:>7.1f}   {rest['mean_bytes_per_site_per_minute']:>18.0f} {rest['max_bytes_per_site_per_minute']:>8.0f}"
        )
    held = [row for row in rows if row["sites"] == TARGET_SIZE]
    worst = max((row["convergence_s"]["max"] for row in held), default=math.nan)
    rest = max(row["at_rest"]["mean_bytes_per_site_per_minute"] for row in rows)
    verdicts = {
        "convergence": bool(held) and worst < TARGET_CONVERGENCE,
        "at_rest": rest < TARGET_AT_REST,
    }
    passed = all(verdicts.values())
    print(
        f"\nconvergence = until every site's catalog holds the new connector and its routes reach the provider;"
        f"\n  msgs/KiB/cpu = what that change cost the whole network (cpu: gossip + route recomputation, all sites)."
        f"\nat rest = GOSSIP frames sent (payload + frame header), {REST_MINUTES} simulated minutes, "
        f"{ANTI_ENTROPY_INTERVAL:g} s anti-entropy interval; busiest = the site sending most."
    )
    print(f"whole run {elapsed:.1f} s")
    print(
        f"\ntargets: convergence < {TARGET_CONVERGENCE:g} s for {TARGET_SIZE} sites: worst {worst * 1000:.1f} ms "
        f"-> {'PASS' if verdicts['convergence'] else 'FAIL'}; at rest < {TARGET_AT_REST} B per site per minute: "
        f"highest mean {rest:.0f} B -> {'PASS' if verdicts['at_rest'] else 'FAIL'}\n"
    )
    return {
        "benchmark": "gossip_convergence",
        "targets": {
            "convergence_s_at_100_sites": TARGET_CONVERGENCE,
            "at_rest_bytes_per_site_per_minute": TARGET_AT_REST,
        },
        "pass": passed,
        "verdicts": verdicts,
        "model": {
            "hop_delay_s": HOP_DELAY,
            "hop_jitter_s": HOP_JITTER,
            "cpu": "measured, added per site, one message at a time",
            "anti_entropy_interval_s": ANTI_ENTROPY_INTERVAL,
            "rest_minutes": REST_MINUTES,
        },
        "results": rows,
        "environment": {
            "python": platform.python_version(),
            "fabric": fabric.__version__,
            "platform": platform.platform(),
        },
        "run_s": elapsed,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.gossip_convergence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100], help="network sizes (default 10 50 100)")
    parser.add_argument(
        "--topologies", nargs="+", choices=("line", "star", "mesh"), default=["line", "star", "mesh"],
        help="topologies (default all three)",
    )
    parser.add_argument("--runs", type=int, default=3, help="networks (seeds) per topology and size (default 3)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or any(size < 2 for size in args.sizes):
        parser.error("--runs must be at least 1 and every size at least 2")

    started = time.perf_counter()
    rows = []
    for topology in args.topologies:
        for size in args.sizes:
            print(f"gossip_convergence: {topology} of {size} sites, {args.runs} run(s) ...", flush=True)
            rows.append(run(topology, size, args.runs))
    summary = report(rows, time.perf_counter() - started)
    return finish(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
