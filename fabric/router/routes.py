"""Routes: from site records to shortest paths, loop-free next hops, and choices among them.

Pure: no I/O, no trio, no clock. Every site runs the same computation over the
same gossiped records, which is what makes the next hops of different sites
agree with each other and therefore loop-free.

The rules:

- An edge between A and B exists only when both records exist and each lists
  the other: a link one end no longer advertises is not used.
- Edge-mode sites are never transit: a path may start or end at one, never
  pass through one.
- Neighbour n is a next hop toward d when dist(n, d) < dist(self, d). Each hop
  strictly lowers the remaining distance, so a flow can never come back to a
  site it has passed, whichever of the allowed hops each site picks.
- A link's cost is its configured cost plus a latency term: one unit per
  LATENCY_STEP of round trip that either end advertises. What a site
  advertises moves only when its measurement leaves a band around the value
  advertised before (`hold_rtt`), so jitter does not move routes.

Choices among next hops and providers follow skupper-router's balanced
distribution: the score of a choice is its open flows plus its cost, so a
farther choice takes flows once the nearer ones carry that many more. Equal
scores go to the one chosen least recently, so even one flow at a time
spreads.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence

import attrs

from ..gossip.records import LinkInfo, SiteRecord
from .frames import EDGE

__all__ = [
    "BALANCED",
    "CLOSEST",
    "DISTRIBUTIONS",
    "LATENCY_STEP",
    "MIN_LINK_COST",
    "Candidate",
    "NextHop",
    "Penalty",
    "Route",
    "choose_next_hop",
    "choose_provider",
    "compute_routes",
    "hold_rtt",
    "latency_units",
    "link_cost",
]

# Dijkstra needs positive weights, and the loop-free rule needs every hop to
# lower the remaining distance: a zero-cost link would let two sites sit at
# the same distance and neither could use the other.
MIN_LINK_COST = 1

# Seconds of round trip per unit of cost. A hop costs 1 by default, so 10 ms
# of RTT weighs as much as one more site on the way: a LAN or a region
# (< 10 ms) adds nothing, crossing a continent (~70 ms) adds about 7.
LATENCY_STEP = 0.010
# What a site advertises for a link's RTT changes only when the measurement is
# off by more than this share of the advertised value (and by at least half a
# step): a route moves for a lasting change, not for jitter.
RTT_HYSTERESIS = 0.25

# Provider choice per listener.
BALANCED = "balanced"  # fewest outstanding flows plus cost: nearer first, farther as they fill
CLOSEST = "closest"  # only the lowest-cost providers
DISTRIBUTIONS = (BALANCED, CLOSEST)

# A provider whose target refused a dial counts as this much farther away,
# halving every PENALTY_HALF_LIFE seconds, and at most PENALTY_MAX: after a
# refusal new flows go elsewhere, and come back within seconds of a recovery.
PENALTY = 10.0  # cost units per refusal
PENALTY_MAX = 40.0  # cost units: four refusals in a row
PENALTY_HALF_LIFE = 2.0  # seconds

Graph = dict[str, dict[str, float]]
"""site id -> neighbour id -> cost of the edge, for edges both ends advertise."""


@attrs.frozen
class NextHop:
    """A neighbour allowed toward a destination, and the cost of going that way."""

    peer: str
    cost: float  # link cost self -> peer, plus dist(peer, dest)


@attrs.frozen
class Route:
    """How this site reaches one destination."""

    dest: str
    cost: float  # dist(self, dest)
    next_hops: tuple[NextHop, ...]  # loop-free; sorted by cost, then peer id; never empty


@attrs.frozen
class Candidate:
    """A site that could serve a flow, as seen from the ingress site."""

    site_id: str
    cost: float  # dist(ingress, site_id)
    outstanding: int  # flows this site has open toward it now
    penalty: float = 0.0  # cost units added after its target refused dials (see Penalty)
    last_chosen: int = 0  # when the ingress last chose it (a serial; 0: never): rotates equals


@attrs.frozen
class Penalty:
    """A decaying penalty: `value` cost units at time `since` (seconds, any clock)."""

    value: float = 0.0
    since: float = 0.0

    def at(self, now: float) -> float:
        """The penalty left at `now`."""
        return self.value * 0.5 ** (max(0.0, now - self.since) / PENALTY_HALF_LIFE)

    def add(self, now: float) -> Penalty:
        """One more refusal at `now`."""
        return Penalty(min(self.at(now) + PENALTY, PENALTY_MAX), now)


def latency_units(rtt: float | None) -> int:
    """Cost units for a round trip of `rtt` seconds (None: not measured, no cost)."""
    return 0 if rtt is None else int(rtt / LATENCY_STEP)


def hold_rtt(held: float | None, measured: float | None) -> float | None:
    """The RTT to advertise for a link, given the one advertised now and a new measurement.

    The advertised value follows the measurement only when the two differ in
    cost units and by more than the hysteresis band; otherwise it stays, and
    nothing needs to be gossiped.
    """
    if measured is None:
        return held
    if held is None:
        return measured
    band = max(RTT_HYSTERESIS * held, LATENCY_STEP / 2)
    if latency_units(measured) != latency_units(held) and abs(measured - held) > band:
        return measured
    return held


def link_cost(a: LinkInfo, b: LinkInfo) -> float:
    """Cost of the edge between two sites, from what each end advertises about it.

    `a` is what site A says about its link to B, `b` what B says about A.
    Links are symmetric; if the ends disagree the larger cost wins, so no one
    underestimates a path: the larger configured cost plus the larger latency
    term (a site that does not measure latency advertises no RTT).
    """
    return float(max(a.cost, b.cost, MIN_LINK_COST) + max(latency_units(a.rtt), latency_units(b.rtt)))


def _build_graph(records: Mapping[str, SiteRecord]) -> Graph:
    """The edges both ends advertise, each with its cost."""
    adverts: dict[str, dict[str, list[LinkInfo]]] = {}
    for site_id, record in records.items():
        by_peer: dict[str, list[LinkInfo]] = {}
        for link in record.links:
            if link.peer != site_id:  # a self-link carries nothing
                by_peer.setdefault(link.peer, []).append(link)
        adverts[site_id] = by_peer

    graph: Graph = {site_id: {} for site_id in records}
    for a, by_peer in adverts.items():
        for b, there in by_peer.items():
            back = adverts.get(b, {}).get(a)
            if not back:
                continue
            # Two sites may hold several links to each other (say TLS and
            # WebSocket); a flow takes the cheapest.
            graph[a][b] = min(link_cost(x, y) for x in there for y in back)
    return graph


def _distances(graph: Graph, edge_sites: frozenset[str], source: str) -> dict[str, float]:
    """Dijkstra from `source`; edge sites other than the source end paths, never extend them."""
    dist: dict[str, float] = {source: 0.0}
    done: set[str] = set()
    heap: list[tuple[float, str]] = [(0.0, source)]
    while heap:
        here, site = heapq.heappop(heap)
        if site in done:
            continue
        done.add(site)
        if site in edge_sites and site != source:
            continue
        for neighbour, cost in graph[site].items():
            there = here + cost
            if there < dist.get(neighbour, math.inf):
                dist[neighbour] = there
                heapq.heappush(heap, (there, neighbour))
    return dist


def compute_routes(self_id: str, records: Mapping[str, SiteRecord]) -> dict[str, Route]:
    """One Route per site reachable from `self_id` (itself excluded), by destination id.

    `records` is keyed by site id. Without a record of its own a site has no
    links anyone can confirm, so it reaches nothing: the result is empty.
    """
    if self_id not in records:
        return {}
    graph = _build_graph(records)
    edge_sites = frozenset(site_id for site_id, record in records.items() if record.mode == EDGE)
    own = _distances(graph, edge_sites, self_id)

    # dist(n, d) for each neighbour, over the same graph with the same rule,
    # i.e. what n itself computes from the same records.
    neighbours = graph[self_id]
    from_neighbour = {n: _distances(graph, edge_sites, n) for n in neighbours if n not in edge_sites}

    routes: dict[str, Route] = {}
    for dest, cost in own.items():
        if dest == self_id:
            continue
        hops = []
        for n, edge in neighbours.items():
            if n in edge_sites:
                # An edge neighbour is only ever a destination: using it
                # toward anything else would make it transit.
                if n == dest:
                    hops.append(NextHop(n, edge))
                continue
            remaining = from_neighbour[n].get(dest, math.inf)
            if remaining < cost:
                hops.append(NextHop(n, edge + remaining))
        hops.sort(key=lambda hop: (hop.cost, hop.peer))
        routes[dest] = Route(dest, cost, tuple(hops))
    return routes


def choose_provider(candidates: Sequence[Candidate], distribution: str = BALANCED) -> str | None:
    """The provider for a new flow, or None when there is no candidate.

    `balanced`: lowest outstanding + cost + penalty. `closest`: among the
    lowest cost + penalty only, fewest outstanding. Ties go to the one chosen
    least recently, then to the lowest site id, so the choice is deterministic.
    """
    if not candidates:
        return None
    if distribution == CLOSEST:
        nearest = min(c.cost + c.penalty for c in candidates)
        candidates = [c for c in candidates if c.cost + c.penalty == nearest]
        best = min(candidates, key=lambda c: (c.outstanding, c.last_chosen, c.site_id))
    else:
        best = min(candidates, key=lambda c: (c.outstanding + c.cost + c.penalty, c.last_chosen, c.site_id))
    return best.site_id


def choose_next_hop(
    route: Route,
    active: Mapping[str, int],
    exclude: Collection[str] = (),
    last_chosen: Mapping[str, int] | None = None,
) -> str | None:
    """The next hop for a new flow along `route`, spreading flows over the allowed hops.

    Lowest active flows + path cost (`active` maps peer -> flows open through
    it; absent means 0), then least recently chosen (`last_chosen` maps peer
    -> a serial), then lowest cost, then peer id. `exclude`: peers never to
    use, such as the one the flow came from. None when no hop is left.
    """
    allowed = [hop for hop in route.next_hops if hop.peer not in exclude]
    if not allowed:
        return None
    last_chosen = last_chosen or {}
    best = min(
        allowed,
        key=lambda hop: (active.get(hop.peer, 0) + hop.cost, last_chosen.get(hop.peer, 0), hop.cost, hop.peer),
    )
    return best.peer
