"""Convergence and gossip at rest of real sites: 10, 50 and 100 fabric sites in line, star and random-mesh topologies.

    python -m tools.bench.site_convergence [--sizes 10,50,100] [--topologies line,star,mesh]
                                           [--rest-seconds 20] [--repeats 3] [--seed 0] [--json PATH]

The counterpart of gossip_convergence.py with nothing simulated: every site is
a real `fabric.open_site` (its own directory, identity and link port on
127.0.0.1), linked by redeeming real tokens, gossiping over real mutual-TLS
sockets. All sites of a configuration run in this one process, in one
`trio.run`, so they share one core: a site's work waits for every other
site's, which a real deployment (one site per machine) does not do.

Per topology and size:

- setup: create the sites, link them (line: site i redeems a token of site
  i + 1; star: every site redeems a token of site 0; mesh: a random spanning
  tree plus N random chords, average degree ~4, fixed seed), and wait until
  every site has a route to every other (`router.routes`, woken by
  `router.wait_changed()`; no fixed sleeps).
- convergence: a connector is added at one site (the far end of the line, a
  leaf of the star, a random site of the mesh); the time (trio clock) until
  every site's `router.providers(key)` lists it. Then it is deleted and the
  time until every site has withdrawn it is taken too. `--repeats` times;
  median, min and max.
- gossip at rest: once no site has an anti-entropy follow-up pending, the
  GOSSIP frames every site sends (payload + 12-byte frame header; TLS adds
  its own ~22 bytes a record on top) over `--rest-seconds`, per site per
  minute: the mean over sites and the busiest site. Counted by wrapping
  `Link.send_gossip` in this process.

Targets (issue 3): convergence under 1 s for 100 sites, and gossip at rest
under 2 KiB per site per minute. The table ends with PASS or FAIL; the exit
status is 0 for PASS, 1 for FAIL. Results go to
tools/bench/results/site_convergence.json (git-ignored).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

import fabric
from fabric.errors import sole_exception
from fabric.router.frames import HEADER_SIZE
from fabric.router.link import Link

from .common import finish, poll_until, raise_fd_limit
from .gossip_sim import line, random_mesh, star

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tools" / "bench" / "results" / "site_convergence.json"
SIM_RESULTS = REPO / "tools" / "bench" / "results" / "gossip_convergence.json"

TARGET_CONVERGENCE = 1.0  # seconds, for 100 sites
TARGET_SIZE = 100  # the size the convergence target is held to
TARGET_AT_REST = 2048  # bytes per site per minute
KEY = "bench-service"
CONNECTOR_PORT = 5432  # nothing needs to listen there: no flow is opened, only the offer is gossiped
LINKING_AT_ONCE = 8  # token redemptions in flight at once (each is a TLS handshake and a CSR signature)
SETTLE_TIMEOUT = 300.0  # seconds for a new network to reach full reachability
CHANGE_TIMEOUT = 60.0  # seconds for one connector change to reach every site
QUIET_TIMEOUT = 60.0  # seconds for pending anti-entropy follow-ups to run out before the rest window
QUIET_POLL = 0.1  # seconds between looks at the follow-ups (no event says when they run out)
FDS_PER_SITE = 16  # link port, ~4 links * 2 ends, to_thread workers, margin
FD_MARGIN = 256


# -- counting gossip --------------------------------------------------------------------------


class GossipMeter:
    """Counts the GOSSIP frames each site sends, by wrapping `Link.send_gossip` for this process."""

    def __init__(self) -> None:
        self.bytes: collections.Counter[str] = collections.Counter()  # site id -> frame bytes sent
        self.frames: collections.Counter[str] = collections.Counter()  # site id -> frames sent
        self.kinds: collections.Counter[str] = collections.Counter()  # message type -> frames sent

    @contextlib.contextmanager
    def installed(self):
        original = Link.send_gossip
        meter = self

        def send_gossip(link: Link, payload: bytes) -> None:
            if not link.closed:  # a closed link drops what it is given to send
                sender = link.local.site_id
                meter.bytes[sender] += len(payload) + HEADER_SIZE
                meter.frames[sender] += 1
                meter.kinds[_kind(payload)] += 1
            original(link, payload)

        Link.send_gossip = send_gossip
        try:
            yield self
        finally:
            Link.send_gossip = original

    def snapshot(self) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
        return collections.Counter(self.bytes), collections.Counter(self.frames), collections.Counter(self.kinds)


def _kind(payload: bytes) -> str:
    """A gossip message's type, from the start of its JSON (`{"type":"summary",...`)."""
    end = payload.find(b'"', 9)
    return payload[9:end].decode("ascii", "replace") if payload.startswith(b'{"type":"') and end > 9 else "?"


# -- topology --------------------------------------------------------------------------------


def plan(topology: str, size: int, seed: int) -> tuple[list[tuple[int, int]], int]:
    """The links as (redeemer, issuer) index pairs, and the index of the site that gets the connector."""
    indices = list(range(size))
    if topology == "line":
        # i redeems a token of i + 1; the connector goes to the far end from site 0.
        return [(a, b) for a, b in line(indices)], size - 1
    if topology == "star":
        # Every site redeems a token of site 0, the hub; the connector goes to a leaf.
        return [(leaf, hub) for hub, leaf in star(indices)], size - 1
    rng = random.Random(seed * 1000 + size)
    # A random spanning tree (each site links to one before it) plus N random chords: average degree ~4.
    # The later site of each pair redeems a token of the earlier one.
    edges = [(b, a) for a, b in random_mesh(indices, rng)]
    return edges, rng.randrange(size)


def hops_from(start: int, size: int, edges: list[tuple[int, int]]) -> int:
    """The most hops from `start` to any site: how far a change made there must travel."""
    neighbours = collections.defaultdict(list)
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    depth = {start: 0}
    queue = collections.deque([start])
    while queue:
        here = queue.popleft()
        for there in neighbours[here]:
            if there not in depth:
                depth[there] = depth[here] + 1
                queue.append(there)
    if len(depth) != size:
        raise RuntimeError("the planned network is not connected")
    return max(depth.values())


# -- waiting on sites --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def watching(sites: list[fabric.Site], condition, timeout: float, what: str):
    """Watch every site until `condition(site)` holds there; yields site id -> trio time it first did.

    One task per site checks the condition and then waits for its router's
    next change, with no checkpoint between, so no change is missed. All of
    them are watching when the body starts; the block ends when every site
    is done, or raises after `timeout` seconds.
    """
    done: dict[str, float] = {}

    async def watch(site: fabric.Site, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.move_on_after(timeout):
            task_status.started()
            while not condition(site):
                await site.router.wait_changed()
            done[site.site_id] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for site in sites:
            await nursery.start(watch, site)
        yield done
    if len(done) < len(sites):
        missing = [s.name for s in sites if s.site_id not in done]
        raise RuntimeError(
            f"{what}: {len(missing)} of {len(sites)} sites not there after {timeout:g} s (e.g. {', '.join(missing[:5])})"
        )


def progress(text: str, *, end: str = "\n") -> None:
    print(text, end=end, flush=True)


# -- one configuration --------------------------------------------------------------------------


async def measure_change(sites: list[fabric.Site], provider: fabric.Site, meter: GossipMeter, *, add: bool) -> dict:
    """Add (or delete) the connector at `provider`; seconds until every site lists (or no longer lists) it."""
    if add:
        condition, what = (lambda site: bool(site.router.providers(KEY))), "adding the connector"
    else:
        condition, what = (lambda site: not site.router.providers(KEY)), "deleting the connector"
    bytes_before, frames_before, kinds_before = meter.snapshot()
    cpu_before = time.process_time()
    async with watching(sites, condition, CHANGE_TIMEOUT, what) as done:
        start = trio.current_time()
        if add:
            await provider.create_connector(KEY, CONNECTOR_PORT, host="127.0.0.1")
        else:
            await provider.delete_connector(KEY)
    cpu = time.process_time() - cpu_before
    bytes_after, frames_after, kinds_after = meter.snapshot()
    times = sorted(t - start for t in done.values())
    return {
        "seconds": times[-1],
        "half_seconds": times[len(times) // 2],  # when half the sites had it
        "cpu_s": cpu,  # of this whole process (all sites) while the change spread
        "bytes": sum(bytes_after.values()) - sum(bytes_before.values()),
        "frames": sum(frames_after.values()) - sum(frames_before.values()),
        "frames_by_type": dict(kinds_after - kinds_before),
    }


def _follow_ups_pending(site: fabric.Site) -> int:
    # The engine keeps no public count of these; read its private map if it is there.
    engine = getattr(site.router.gossip, "_engine", None)
    return len(getattr(engine, "_follow_ups", ()))


async def wait_quiet(sites: list[fabric.Site]) -> float:
    """Wait until no site has an anti-entropy follow-up pending (they are left over from the last change)."""
    start = trio.current_time()
    await poll_until(lambda: not any(_follow_ups_pending(site) for site in sites), deadline=QUIET_TIMEOUT, interval=QUIET_POLL)
    return trio.current_time() - start


def _stats(values: list[float]) -> dict[str, object]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


async def run_config(topology: str, size: int, args: argparse.Namespace, meter: GossipMeter) -> dict:
    edges, provider_index = plan(topology, size, args.seed)
    degree = collections.Counter(i for edge in edges for i in edge)  # site index -> links it should have
    label = f"{size} sites ({topology})"
    row: dict[str, object] = {
        "topology": topology,
        "sites": size,
        "links": len(edges),
        "provider": f"site-{provider_index:03d}",
        "hops": hops_from(provider_index, size, edges),
    }
    setup: dict[str, float] = {}
    row["setup_s"] = setup
    with tempfile.TemporaryDirectory(prefix="fabric-site-convergence-") as tmp, trio.CancelScope() as teardown:
        async with contextlib.AsyncExitStack() as stack:
            try:
                began = time.perf_counter()
                progress(f"starting {label}... ", end="")
                sites: list[fabric.Site] = []
                for i in range(size):
                    name = f"site-{i:03d}"
                    site = await stack.enter_async_context(
                        fabric.open_site(name, Path(tmp) / name, link_port=0, service_sync=False)
                    )
                    sites.append(site)
                setup["start"] = time.perf_counter() - began
                progress(f"done in {setup['start']:.1f} s")

                began = time.perf_counter()
                progress(f"linking {label}, {len(edges)} links... ", end="")
                limiter = trio.CapacityLimiter(LINKING_AT_ONCE)

                async def make_link(redeemer: int, issuer: int) -> None:
                    async with limiter:
                        token = await sites[issuer].issue_token()
                        await sites[redeemer].redeem_token(token)

                async with trio.open_nursery() as nursery:
                    for redeemer, issuer in edges:
                        nursery.start_soon(make_link, redeemer, issuer)
                setup["link"] = time.perf_counter() - began
                progress(f"done in {setup['link']:.1f} s")

                began = time.perf_counter()
                progress(f"settling {label}... ", end="")
                ids = {site.site_id for site in sites}
                links_wanted = {site.site_id: degree[i] for i, site in enumerate(sites)}

                def settled(site: fabric.Site) -> bool:
                    """All its links up, a route to every site, and every site's current record."""
                    router = site.router
                    if len(router.links) != links_wanted[site.site_id] or any(up.closed for up in router.links.values()):
                        return False
                    if not ids - {site.site_id} <= router.routes.keys():
                        return False
                    for other in sites:
                        record = router.record(other.site_id)
                        if record is None or record.stamp != other.router.gossip.record.stamp:
                            return False
                    return True

                # A site that was settled can fall behind again while others still
                # change their records: wait until all are settled at once.
                while not all(settled(site) for site in sites):
                    async with watching(sites, settled, SETTLE_TIMEOUT, f"settling {label}"):
                        pass
                setup["settle"] = time.perf_counter() - began
                progress(f"done in {setup['settle']:.1f} s")
                live = {(site.site_id, peer): up for site in sites for peer, up in site.router.links.items()}

                provider = sites[provider_index]
                adds, removes = [], []
                for repeat in range(args.repeats):
                    adds.append(await measure_change(sites, provider, meter, add=True))
                    removes.append(await measure_change(sites, provider, meter, add=False))
                    progress(
                        f"  change {repeat + 1}/{args.repeats}: added everywhere in {adds[-1]['seconds'] * 1000:.1f} ms "
                        f"(cpu {adds[-1]['cpu_s'] * 1000:.0f} ms), withdrawn everywhere in {removes[-1]['seconds'] * 1000:.1f} ms"
                    )
                row["convergence_s"] = _stats([a["seconds"] for a in adds])
                row["half_convergence_s"] = _stats([a["half_seconds"] for a in adds])
                row["withdrawal_s"] = _stats([r["seconds"] for r in removes])
                row["cpu_s_per_change"] = statistics.median(a["cpu_s"] for a in adds)
                row["bytes_per_change"] = statistics.median(a["bytes"] for a in adds)
                row["frames_per_change"] = statistics.median(a["frames"] for a in adds)
                row["changes"] = {"added": adds, "withdrawn": removes}

                quiet = await wait_quiet(sites)
                progress(f"  at rest for {args.rest_seconds:g} s (after {quiet:.1f} s for follow-ups to run out)... ", end="")
                bytes_before, frames_before, kinds_before = meter.snapshot()
                start = trio.current_time()
                await trio.sleep(args.rest_seconds)
                minutes = (trio.current_time() - start) / 60
                bytes_after, frames_after, kinds_after = meter.snapshot()
                per_site = [(bytes_after[s.site_id] - bytes_before[s.site_id]) / minutes for s in sites]
                busiest = max(range(size), key=lambda i: per_site[i])
                row["at_rest"] = {
                    "seconds": minutes * 60,
                    "quiet_wait_s": quiet,
                    "mean_bytes_per_site_per_minute": statistics.fmean(per_site),
                    "max_bytes_per_site_per_minute": per_site[busiest],
                    "busiest_site": sites[busiest].name,
                    "frames_per_site_per_minute": (sum(frames_after.values()) - sum(frames_before.values())) / size / minutes,
                    "frames_by_type": dict(kinds_after - kinds_before),
                }
                progress(
                    f"{row['at_rest']['mean_bytes_per_site_per_minute']:.0f} B/site/min, "
                    f"busiest {row['at_rest']['max_bytes_per_site_per_minute']:.0f}"
                )
                now = {(site.site_id, peer): up for site in sites for peer, up in site.router.links.items()}
                row["links_replaced"] = sum(1 for key, up in live.items() if now.get(key) is not up)
                row["still_settled"] = all(settled(site) for site in sites)
            finally:
                stopping = time.perf_counter()
                teardown.cancel()  # stop every site at once, not one by one while the rest react to each
    setup["stop"] = time.perf_counter() - stopping
    return row


# -- report ---------------------------------------------------------------------------------------


def simulated() -> dict[tuple[str, int], float]:
    """Median convergence per (topology, sites) from gossip_convergence.py's last results, if any."""
    try:
        results = json.loads(SIM_RESULTS.read_text())["results"]
        return {(r["topology"], r["sites"]): r["convergence_s"]["median"] for r in results}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def report(rows: list[dict], elapsed: float, args: argparse.Namespace) -> dict[str, object]:
    sim = simulated()
    print(
        f"\n{'topology':8} {'sites':>5} {'links':>5} {'hops':>4}  {'setup s':>7}   "
        f"{'converge median':>15} {'min':>8} {'max':>8} {'sim':>8}   {'withdraw':>8} {'cpu ms':>6} {'KiB':>6}   "
        f"{'at rest B/site/min':>18} {'busiest':>7}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['topology']:8} {row['sites']:>5}   FAILED: {row['error']}")
            continue
        conv, rest = row["convergence_s"], row["at_rest"]
        setup = sum(v for k, v in row["setup_s"].items() if k != "stop")
        expected = sim.get((row["topology"], row["sites"]))
        print(
            f"{row['topology']:8} {row['sites']:>5} {row['links']:>5} {row['hops']:>4}  {setup:>7.1f}   "
            f"{conv['median'] * 1000:>12.1f} ms {conv['min'] * 1000:>5.1f} ms {conv['max'] * 1000:>5.1f} ms "
            f"{'-' if expected is None else f'{expected * 1000:.1f} ms':>8}   "
            f"{row['withdrawal_s']['median'] * 1000:>5.1f} ms {row['cpu_s_per_change'] * 1000:>6.0f} "
            f"{row['bytes_per_change'] / 1024:>6.1f}   "
            f"{rest['mean_bytes_per_site_per_minute']:>18.0f} {rest['max_bytes_per_site_per_minute']:>7.0f}"
        )
    measured = [row for row in rows if "error" not in row]
    held = [row for row in measured if row["sites"] == TARGET_SIZE]
    worst = max((row["convergence_s"]["max"] for row in held), default=math.nan)
    rest = max((row["at_rest"]["mean_bytes_per_site_per_minute"] for row in measured), default=math.nan)
    busiest = max((row["at_rest"]["max_bytes_per_site_per_minute"] for row in measured), default=math.nan)
    verdicts = {
        "convergence": bool(held)
        and len(held) == sum(1 for r in rows if r["sites"] == TARGET_SIZE)  # none of them failed
        and worst < TARGET_CONVERGENCE,
        "at_rest": bool(measured) and rest < TARGET_AT_REST,
    }
    passed = all(verdicts.values()) and len(measured) == len(rows)
    flaps = sum(row.get("links_replaced", 0) for row in measured)
    print(
        f"\nconvergence = trio time from create_connector at the provider until every site's router.providers() lists it,"
        f"\n  {args.repeats} changes per network; sim = the median gossip_convergence.py gave"
        f" (simulated network, one core per site)."
        f"\nwithdraw = the same for delete_connector (median); cpu ms = process CPU while an addition spread (all sites share"
        f"\n  one core here); KiB = GOSSIP frame bytes all sites sent for it. setup = start + link + settle."
        f"\nat rest = GOSSIP frames sent (payload + 12-byte header, no TLS) in {args.rest_seconds:g} s, per site per minute;"
        f"\n  busiest = the site sending most."
    )
    if flaps:
        print(f"warning: {flaps} link(s) went down and were made again during the measurements")
    for row in measured:
        if not row["still_settled"]:
            print(f"warning: {row['topology']} of {row['sites']} was no longer settled after the rest window")
    print(f"whole run {elapsed:.1f} s")
    conv_text = (
        f"worst {worst * 1000:.1f} ms" if held else f"not measured at {TARGET_SIZE} sites"
    )
    print(
        f"\ntargets: convergence < {TARGET_CONVERGENCE:g} s for {TARGET_SIZE} sites: {conv_text} "
        f"-> {'PASS' if verdicts['convergence'] else 'FAIL'}; at rest < {TARGET_AT_REST} B per site per minute: "
        f"highest mean {rest:.0f} B (busiest site {busiest:.0f} B) -> {'PASS' if verdicts['at_rest'] else 'FAIL'}\n"
    )
    return {
        "benchmark": "site_convergence",
        "targets": {
            "convergence_s_at_100_sites": TARGET_CONVERGENCE,
            "at_rest_bytes_per_site_per_minute": TARGET_AT_REST,
        },
        "pass": passed,
        "verdicts": verdicts,
        "method": {
            "sites": "real fabric sites, one process, one trio.run, mutual TLS over 127.0.0.1",
            "repeats": args.repeats,
            "rest_seconds": args.rest_seconds,
            "seed": args.seed,
            "settings": "defaults (fabric.Settings())",
        },
        "results": rows,
        "environment": {
            "python": platform.python_version(),
            "fabric": fabric.__version__,
            "trio": trio.__version__,
            "platform": platform.platform(),
            "cpus": _cpus(),
        },
        "run_s": elapsed,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


# -- main -----------------------------------------------------------------------------------------



async def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    meter = GossipMeter()
    with meter.installed():
        for topology in args.topologies:
            for size in args.sizes:
                progress(f"site_convergence: {topology} of {size} sites")
                try:
                    rows.append(await run_config(topology, size, args, meter))
                except Exception as exc:
                    progress(f"\n  FAILED: {_describe(exc)}")
                    rows.append({"topology": topology, "sites": size, "error": _describe(exc)})
    return rows


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        exc = sole_exception(exc) or exc
    return f"{type(exc).__name__}: {exc}"


def _list(kind, choices=None):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.replace(",", " ").split()]
        for value in values:
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.site_convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=_list(int), nargs="+", default=[[10, 50, 100]], help="network sizes (default 10,50,100)"
    )
    parser.add_argument(
        "--topologies", type=_list(str, ("line", "star", "mesh")), nargs="+", default=[["line", "star", "mesh"]],
        help="topologies (default line,star,mesh)",
    )
    parser.add_argument("--rest-seconds", type=float, default=20.0, help="seconds gossip at rest is counted (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="connector additions per network (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random meshes and provider choice (default 0)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"where to write the results (default {RESULTS.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    args.sizes = [size for group in args.sizes for size in group]
    args.topologies = [topology for group in args.topologies for topology in group]
    if args.repeats < 1 or args.rest_seconds <= 0 or any(size < 2 for size in args.sizes):
        parser.error("--repeats must be at least 1, --rest-seconds above 0 and every size at least 2")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise_fd_limit(max(args.sizes) * FDS_PER_SITE + FD_MARGIN, what=f"site_convergence: {max(args.sizes)} sites")
    started = time.perf_counter()
    rows = trio.run(run_all, args)
    summary = report(rows, time.perf_counter() - started, args)
    return finish(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
