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
"""

import heapq
import math
from collections.abc import Mapping, Sequence

import attrs

from ..gossip.records import EDGE, LinkInfo, SiteRecord

__all__ = [
    "MIN_LINK_COST",
    "Candidate",
    "NextHop",
    "Route",
    "choose_next_hop",
    "choose_provider",
    "compute_routes",
    "link_cost",
]

# Dijkstra needs positive weights, and the loop-free rule needs every hop to
# lower the remaining distance: a zero-cost link would let two sites sit at
# the same distance and neither could use the other.
MIN_LINK_COST = 1

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


def link_cost(a: LinkInfo, b: LinkInfo) -> float:
    """Cost of the edge between two sites, from what each end advertises about it.

    `a` is what site A says about its link to B, `b` what B says about A.
    Links are symmetric; if the ends disagree the larger cost wins, so no one
    underestimates a path. This is the one place the latency term (from the
    `rtt` fields) will join the configured cost.
    """
    return float(max(a.cost, b.cost, MIN_LINK_COST))


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


def choose_provider(candidates: Sequence[Candidate]) -> str | None:
    """The provider for a new flow: fewest outstanding flows, then lowest cost, then site id.

    The last tie-break makes the choice deterministic, so tests and repeated
    runs agree. None when there is no candidate.
    """
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (c.outstanding, c.cost, c.site_id))
    return best.site_id


def choose_next_hop(route: Route, active: Mapping[str, int], exclude: str | None = None) -> str | None:
    """The next hop for a new flow along `route`, spreading flows over the allowed hops.

    Fewest active flows (`active` maps peer -> flows open through it; absent
    means 0), then lowest cost, then peer id. `exclude` is the peer the flow
    came from: never send it back. None when no hop is left.
    """
    allowed = [hop for hop in route.next_hops if hop.peer != exclude]
    if not allowed:
        return None
    best = min(allowed, key=lambda hop: (active.get(hop.peer, 0), hop.cost, hop.peer))
    return best.peer
