"""Routes: shortest paths, loop-free next hops, edge sites, and the choices among them."""

import math
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.gossip.records import EDGE, INTERIOR, LinkInfo, SiteRecord
from fabric.router.routes import (
    Candidate,
    NextHop,
    Route,
    choose_next_hop,
    choose_provider,
    compute_routes,
    link_cost,
)


def site(site_id: str, links: Mapping[str, int], mode: str = INTERIOR) -> SiteRecord:
    """A record advertising exactly `links` (peer -> cost)."""
    return SiteRecord(
        site_id=site_id,
        name=site_id,
        incarnation=1,
        version=1,
        mode=mode,
        links=tuple(LinkInfo(peer, cost) for peer, cost in links.items()),
    )


def net(links: Mapping[str, int], edge: str = "") -> dict[str, SiteRecord]:
    """Records for links both ends advertise, written {"A-B": cost}; sites in `edge` are edge mode."""
    adverts: dict[str, dict[str, int]] = {}
    for pair, cost in links.items():
        a, b = pair.split("-")
        adverts.setdefault(a, {})[b] = cost
        adverts.setdefault(b, {})[a] = cost
    return {s: site(s, peers, EDGE if s in edge else INTERIOR) for s, peers in adverts.items()}


def hops(route: Route) -> list[tuple[str, float]]:
    return [(hop.peer, hop.cost) for hop in route.next_hops]


def summary(routes: Mapping[str, Route]) -> dict[str, tuple[float, list[tuple[str, float]]]]:
    return {dest: (route.cost, hops(route)) for dest, route in routes.items()}


# -- topologies -------------------------------------------------------------------


def test_chain() -> None:
    routes = compute_routes("A", net({"A-B": 1, "B-C": 1}))
    assert summary(routes) == {"B": (1, [("B", 1)]), "C": (2, [("B", 2)])}
    assert routes["C"] == Route("C", 2.0, (NextHop("B", 2.0),))


def test_chain_from_the_middle() -> None:
    assert summary(compute_routes("B", net({"A-B": 1, "B-C": 3}))) == {"A": (1, [("A", 1)]), "C": (3, [("C", 3)])}


def test_link_advertised_by_one_end_is_not_used() -> None:
    records = {
        "A": site("A", {"B": 1}),
        "B": site("B", {"C": 1}),  # B does not advertise A back
        "C": site("C", {"B": 1}),
    }
    assert compute_routes("A", records) == {}
    assert summary(compute_routes("B", records)) == {"C": (1, [("C", 1)])}
    assert summary(compute_routes("C", records)) == {"B": (1, [("B", 1)])}


def test_link_to_a_site_without_record_is_not_used() -> None:
    records = {"A": site("A", {"B": 1, "X": 1}), "B": site("B", {"A": 1, "X": 1})}
    assert summary(compute_routes("A", records)) == {"B": (1, [("B", 1)])}


def test_self_without_record_reaches_nothing() -> None:
    assert compute_routes("Z", net({"A-B": 1})) == {}
    assert compute_routes("A", {}) == {}


def test_disconnected_sites_are_absent() -> None:
    routes = compute_routes("A", net({"A-B": 1, "C-D": 1}))
    assert set(routes) == {"B"}


@pytest.mark.parametrize(
    ("a_says", "b_says", "cost"),
    [
        (1, 1, 1),
        (1, 5, 5),  # ends disagree: the larger wins, so nobody underestimates
        (7, 2, 7),
        (0, 0, 1),  # costs below 1 count as 1
    ],
)
def test_edge_cost(a_says: int, b_says: int, cost: float) -> None:
    records = {"A": site("A", {"B": a_says}), "B": site("B", {"A": b_says})}
    assert summary(compute_routes("A", records)) == {"B": (cost, [("B", cost)])}
    assert summary(compute_routes("B", records)) == {"A": (cost, [("A", cost)])}
    assert link_cost(LinkInfo("B", a_says), LinkInfo("A", b_says)) == cost


def test_cheapest_of_several_links_between_two_sites() -> None:
    records = {
        "A": SiteRecord("A", "A", 1, 1, INTERIOR, links=(LinkInfo("B", 9), LinkInfo("B", 2))),
        "B": SiteRecord("B", "B", 1, 1, INTERIOR, links=(LinkInfo("A", 3), LinkInfo("A", 8))),
    }
    assert summary(compute_routes("A", records)) == {"B": (3, [("B", 3)])}


def test_diamond_with_equal_costs_has_two_next_hops() -> None:
    routes = compute_routes("A", net({"A-B": 1, "A-C": 1, "B-D": 1, "C-D": 1}))
    assert summary(routes)["D"] == (2, [("B", 2), ("C", 2)])


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        # dist(C, D) = 2 is not < dist(A, D) = 2: C is not loop-free.
        ({"A-B": 1, "B-D": 1, "A-C": 2, "C-D": 2}, (2, [("B", 2)])),
        # dist(C, D) = 2 < dist(A, D) = 3: C is a costlier but loop-free next hop.
        ({"A-B": 1, "B-D": 2, "A-C": 2, "C-D": 2}, (3, [("B", 3), ("C", 4)])),
        # Next hops sort by cost, then peer id; E is loop-free (dist(E, D) = 1) but costlier.
        ({"A-C": 1, "C-D": 1, "A-B": 1, "B-D": 1, "A-E": 2, "E-D": 1}, (2, [("B", 2), ("C", 2), ("E", 3)])),
    ],
)
def test_unequal_costs(links: dict[str, int], expected: tuple[float, list[tuple[str, float]]]) -> None:
    assert summary(compute_routes("A", net(links)))["D"] == expected


def test_neighbour_whose_path_comes_back_through_self_is_excluded() -> None:
    # B's shortest way to D is B-A-C-D (3), which goes through A: not < dist(A, D) = 2.
    routes = compute_routes("A", net({"A-B": 1, "A-C": 1, "C-D": 1, "B-D": 10}))
    assert summary(routes)["D"] == (2, [("C", 2)])


# -- edge sites ---------------------------------------------------------------------


def test_edge_site_is_not_transit() -> None:
    records = net({"A-E": 1, "E-C": 1}, edge="E")
    assert summary(compute_routes("A", records)) == {"E": (1, [("E", 1)])}
    assert summary(compute_routes("C", records)) == {"E": (1, [("E", 1)])}
    # The edge site itself reaches both ends: a path may start at it.
    assert summary(compute_routes("E", records)) == {"A": (1, [("A", 1)]), "C": (1, [("C", 1)])}


def test_edge_site_reachable_as_destination_through_interior() -> None:
    records = net({"A-B": 1, "B-E": 1}, edge="E")
    assert summary(compute_routes("A", records)) == {"B": (1, [("B", 1)]), "E": (2, [("B", 2)])}


def test_edge_neighbour_is_not_a_next_hop_toward_others() -> None:
    # Through E would be cheaper (2), but E may not carry traffic for A.
    records = net({"A-E": 1, "E-C": 1, "A-B": 5, "B-C": 5}, edge="E")
    routes = compute_routes("A", records)
    assert summary(routes)["C"] == (10, [("B", 10)])
    assert summary(routes)["E"] == (1, [("E", 1)])


def test_edge_neighbour_is_a_next_hop_to_itself_even_when_not_cheapest() -> None:
    records = net({"A-E": 5, "A-B": 1, "B-E": 1}, edge="E")
    assert summary(compute_routes("A", records))["E"] == (2, [("B", 2), ("E", 5)])


def test_edge_source_routes_through_its_interior_neighbours() -> None:
    records = net({"E-A": 1, "A-B": 1, "E-F": 1, "F-B": 3}, edge="EF")
    assert summary(compute_routes("E", records)) == {
        "A": (1, [("A", 1)]),
        "B": (2, [("A", 2)]),
        "F": (1, [("F", 1)]),
    }


# -- choices -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "chosen"),
    [
        ([], None),
        ([Candidate("a", 5, 0)], "a"),
        ([Candidate("a", 1, 3), Candidate("b", 9, 1)], "b"),  # fewest outstanding first
        ([Candidate("a", 4, 2), Candidate("b", 3, 2)], "b"),  # then lowest cost
        ([Candidate("b", 3, 2), Candidate("a", 3, 2)], "a"),  # then site id
        ([Candidate("c", 1, 0), Candidate("a", 2, 0), Candidate("b", 1, 0)], "b"),
    ],
)
def test_choose_provider(candidates: list[Candidate], chosen: str | None) -> None:
    assert choose_provider(candidates) == chosen
    assert choose_provider(tuple(reversed(candidates))) == chosen


_route = Route("D", 2.0, (NextHop("B", 2.0), NextHop("C", 2.0), NextHop("E", 3.0)))


@pytest.mark.parametrize(
    ("active", "exclude", "chosen"),
    [
        ({}, None, "B"),  # all idle: cost, then peer id
        ({"B": 1}, None, "C"),  # fewest active flows first
        ({"B": 1, "C": 1}, None, "E"),  # ... even on a costlier hop
        ({"B": 1, "C": 1, "E": 1}, None, "B"),
        ({"B": 2, "C": 1, "E": 1}, None, "C"),  # equal load: cost decides
        ({}, "B", "C"),  # never back where the flow came from
        ({"C": 5}, "B", "E"),
        ({}, "X", "B"),  # excluding a non-hop changes nothing
    ],
)
def test_choose_next_hop(active: dict[str, int], exclude: str | None, chosen: str) -> None:
    assert choose_next_hop(_route, active, exclude) == chosen


def test_choose_next_hop_with_nothing_left() -> None:
    assert choose_next_hop(Route("D", 1.0, (NextHop("D", 1.0),)), {}, exclude="D") is None
    assert choose_next_hop(Route("D", 1.0, ()), {}) is None


# -- properties on random networks -----------------------------------------------------


@st.composite
def networks(draw: st.DrawFn) -> dict[str, SiteRecord]:
    """A random connected topology; some links one-sided, some costs disputed, some sites edge."""
    size = draw(st.integers(2, 7))
    names = [f"s{i}" for i in range(size)]
    pairs = {(names[draw(st.integers(0, i - 1))], names[i]) for i in range(1, size)}  # spanning tree
    pairs |= draw(st.sets(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=size * 2))
    adverts: dict[str, dict[str, int]] = {name: {} for name in names}
    for a, b in pairs:
        if a == b:
            continue
        who = draw(st.sampled_from(["both"] * 6 + ["a", "b"]))  # mostly two-sided
        if who in ("both", "a"):
            adverts[a][b] = draw(st.integers(0, 10))
        if who in ("both", "b"):
            adverts[b][a] = draw(st.integers(0, 10))
    modes = {name: draw(st.sampled_from([INTERIOR] * 3 + [EDGE])) for name in names}
    return {name: site(name, adverts[name], modes[name]) for name in names}


def oracle(records: Mapping[str, SiteRecord]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Edges and all-pairs distances by Floyd-Warshall, with only interior sites as intermediates."""
    said = {s: {link.peer: link.cost for link in r.links} for s, r in records.items()}
    edges: dict[str, dict[str, float]] = {s: {} for s in records}
    for a in records:
        for b, cost in said[a].items():
            if b in said and a in said[b]:
                edges[a][b] = max(cost, said[b][a], 1)
    dist = {a: {b: 0.0 if a == b else edges[a].get(b, math.inf) for b in records} for a in records}
    for k in records:
        if records[k].mode == EDGE:
            continue
        for i in records:
            for j in records:
                dist[i][j] = min(dist[i][j], dist[i][k] + dist[k][j])
    return edges, dist


@given(networks())
def test_routes_match_oracle_and_are_loop_free(records: dict[str, SiteRecord]) -> None:
    edges, dist = oracle(records)
    for s in records:
        routes = compute_routes(s, records)
        assert set(routes) == {d for d in records if d != s and dist[s][d] < math.inf}
        for d, route in routes.items():
            assert route.dest == d
            assert route.cost == dist[s][d]
            assert route.next_hops, "every reachable destination has a next hop"
            assert list(route.next_hops) == sorted(route.next_hops, key=lambda h: (h.cost, h.peer))
            allowed = {
                n
                for n in edges[s]
                if (records[n].mode == INTERIOR or n == d) and dist[n][d] < dist[s][d]
            }
            assert {hop.peer for hop in route.next_hops} == allowed
            for hop in route.next_hops:
                assert dist[hop.peer][d] < dist[s][d]
                assert hop.cost == edges[s][hop.peer] + dist[hop.peer][d]


@given(networks())
def test_following_any_next_hops_reaches_destination(records: dict[str, SiteRecord]) -> None:
    tables = {s: compute_routes(s, records) for s in records}

    def walk(here: str, dest: str, path: tuple[str, ...]) -> None:
        if here == dest:
            return
        if here != path[0]:
            assert records[here].mode == INTERIOR, f"edge site {here} used as transit on {path}"
        route = tables[here].get(dest)
        assert route is not None, f"{here} is a next hop toward {dest} but has no route ({path})"
        for hop in route.next_hops:
            assert hop.peer not in path, f"loop: {path} -> {hop.peer}"
            walk(hop.peer, dest, (*path, hop.peer))

    for s, routes in tables.items():
        for d in routes:
            walk(s, d, (s,))
