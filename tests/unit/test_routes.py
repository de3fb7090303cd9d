"""Routes: shortest paths, loop-free next hops, edge sites, and the choices among them."""

import math
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.gossip.records import LinkInfo, SiteRecord
from fabric.router.frames import EDGE, INTERIOR
from fabric.router.routes import (
    BALANCED,
    CLOSEST,
    LATENCY_STEP,
    PENALTY,
    PENALTY_HALF_LIFE,
    PENALTY_MAX,
    Candidate,
    NextHop,
    Penalty,
    Route,
    choose_next_hop,
    choose_provider,
    compute_routes,
    hold_rtt,
    latency_units,
    link_cost,
)


def site(site_id: str, links: Mapping[str, int], mode: str = INTERIOR, rtts: Mapping[str, float] | None = None) -> SiteRecord:
    """A record advertising exactly `links` (peer -> cost), with `rtts` (peer -> seconds) where given."""
    rtts = rtts or {}
    return SiteRecord(
        site_id=site_id,
        name=site_id,
        incarnation=1,
        version=1,
        mode=mode,
        links=tuple(LinkInfo(peer, cost, rtts.get(peer)) for peer, cost in links.items()),
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


def test_line_of_five() -> None:
    routes = compute_routes("A", net({"A-B": 1, "B-C": 1, "C-D": 1, "D-E": 1}))
    assert summary(routes) == {
        "B": (1, [("B", 1)]),
        "C": (2, [("B", 2)]),
        "D": (3, [("B", 3)]),
        "E": (4, [("B", 4)]),
    }


def test_ring_of_four() -> None:
    routes = compute_routes("A", net({"A-B": 1, "B-C": 1, "C-D": 1, "D-A": 1}))
    # C is opposite: both ways round are loop-free. B and D are one hop: the
    # long way round (3) is not shorter than direct (1) from the far side.
    assert summary(routes) == {"B": (1, [("B", 1)]), "C": (2, [("B", 2), ("D", 2)]), "D": (1, [("D", 1)])}


def test_ring_of_five_uses_only_the_shorter_way() -> None:
    routes = compute_routes("A", net({"A-B": 1, "B-C": 1, "C-D": 1, "D-E": 1, "E-A": 1}))
    assert summary(routes) == {
        "B": (1, [("B", 1)]),
        "C": (2, [("B", 2)]),
        "D": (2, [("E", 2)]),
        "E": (1, [("E", 1)]),
    }


def test_full_mesh_uses_only_direct_links() -> None:
    names = "ABCDE"
    records = net({f"{a}-{b}": 1 for i, a in enumerate(names) for b in names[i + 1 :]})
    for me in names:
        routes = compute_routes(me, records)
        # Through any other site is 2 > 1: only the direct link is loop-free.
        assert summary(routes) == {d: (1, [(d, 1)]) for d in names if d != me}


def test_full_mesh_with_a_costly_link_goes_around_it_every_way() -> None:
    records = net({"A-B": 5, "A-C": 1, "A-D": 1, "B-C": 1, "B-D": 1, "C-D": 1})
    assert summary(compute_routes("A", records))["B"] == (2, [("C", 2), ("D", 2), ("B", 5)])


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


@pytest.mark.parametrize(
    ("rtt", "units"),
    [(None, 0), (0.0, 0), (0.0004, 0), (0.0099, 0), (0.010, 1), (0.0701, 7), (0.150, 15)],
)
def test_latency_units(rtt: float | None, units: int) -> None:
    assert latency_units(rtt) == units


@pytest.mark.parametrize(
    ("a", "b", "cost"),
    [
        (LinkInfo("B", 1, 0.0003), LinkInfo("A", 1, 0.0004), 1),  # a LAN adds nothing
        (LinkInfo("B", 1, 0.052), LinkInfo("A", 1, None), 6),  # one end measured: 1 + 5
        (LinkInfo("B", 2, 0.031), LinkInfo("A", 1, 0.072), 9),  # larger cost + larger latency term
        (LinkInfo("B", 1, None), LinkInfo("A", 1, None), 1),  # latency not measured or switched off
    ],
)
def test_link_cost_adds_the_latency_term(a: LinkInfo, b: LinkInfo, cost: float) -> None:
    assert link_cost(a, b) == link_cost(b, a) == cost


def test_a_slow_link_loses_its_routes_to_an_equal_cost_path() -> None:
    links = {"A": {"B": 1, "C": 1}, "B": {"A": 1, "D": 1}, "C": {"A": 1, "D": 1}, "D": {"B": 1, "C": 1}}
    fast = {s: site(s, peers, rtts={p: 0.0005 for p in peers}) for s, peers in links.items()}
    assert summary(compute_routes("A", fast))["D"] == (2, [("B", 2), ("C", 2)])
    slow = {**fast, "A": site("A", links["A"], rtts={"B": 0.100, "C": 0.0005})}  # A measures 100 ms to B
    # B is still loop-free (dist(B, D) = 1 < 2) but 10 units dearer: choices favour C.
    assert summary(compute_routes("A", slow))["D"] == (2, [("C", 2), ("B", 12)])


@pytest.mark.parametrize(
    ("held", "measured", "advertised"),
    [
        (None, None, None),
        (None, 0.0004, 0.0004),  # the first measurement is advertised
        (0.0004, None, 0.0004),
        (0.0004, 0.0031, 0.0004),  # same units (0): nothing to tell
        (0.0004, 0.009, 0.0004),
        (0.0004, 0.012, 0.012),  # 0 -> 1 unit and off by more than half a step
        (0.049, 0.051, 0.049),  # units differ, but by 2 ms of 49: jitter
        (0.049, 0.060, 0.049),  # still within 25%
        (0.049, 0.0615, 0.0615),  # past 25%: advertised
        (0.0615, 0.049, 0.0615),  # and back needs as much again
        (0.0615, 0.046, 0.046),
        (0.100, 0.0005, 0.0005),  # the delay went away
    ],
)
def test_hold_rtt(held: float | None, measured: float | None, advertised: float | None) -> None:
    assert hold_rtt(held, measured) == advertised


@given(st.lists(st.floats(0.045, 0.055), min_size=1, max_size=200))
def test_jitter_within_ten_percent_changes_what_is_advertised_at_most_once(samples: list[float]) -> None:
    held = None
    changes = 0
    for sample in samples:
        new = hold_rtt(held, sample)
        if held is not None and latency_units(new) != latency_units(held):
            changes += 1
        held = new
    assert changes <= 1


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
        ([Candidate("a", 1, 3), Candidate("b", 2, 1)], "b"),  # 3 + 1 > 1 + 2
        ([Candidate("a", 1, 3), Candidate("b", 9, 1)], "a"),  # a farther one waits until the nearer fill
        ([Candidate("a", 1, 10), Candidate("b", 9, 1)], "b"),  # ... which they have
        ([Candidate("a", 0, 0), Candidate("b", 2, 1)], "a"),  # this site itself (cost 0) first
        ([Candidate("a", 0, 3), Candidate("b", 2, 0)], "b"),
        ([Candidate("a", 4, 2), Candidate("b", 3, 2)], "b"),  # equal load: lower cost
        ([Candidate("b", 3, 2), Candidate("a", 3, 2)], "a"),  # all equal: site id
        ([Candidate("a", 3, 2, last_chosen=7), Candidate("b", 3, 2, last_chosen=5)], "b"),  # ... after least recent
        ([Candidate("a", 1, 0, penalty=PENALTY), Candidate("b", 3, 2)], "b"),  # a penalised provider is avoided
        ([Candidate("a", 1, 0, penalty=1.5), Candidate("b", 3, 0)], "a"),  # ... while its penalty matters
    ],
)
def test_choose_provider_balanced(candidates: list[Candidate], chosen: str | None) -> None:
    assert choose_provider(candidates, BALANCED) == chosen
    assert choose_provider(tuple(reversed(candidates))) == chosen


@pytest.mark.parametrize(
    ("candidates", "chosen"),
    [
        ([], None),
        ([Candidate("a", 1, 50), Candidate("b", 2, 0)], "a"),  # never the farther one, however loaded
        ([Candidate("a", 1, 5), Candidate("b", 1, 2), Candidate("c", 2, 0)], "b"),  # among the nearest: fewest flows
        ([Candidate("a", 1, 2, last_chosen=3), Candidate("b", 1, 2, last_chosen=2)], "b"),
        ([Candidate("a", 1, 0, penalty=PENALTY), Candidate("b", 2, 9)], "b"),  # penalised: no longer nearest
    ],
)
def test_choose_provider_closest(candidates: list[Candidate], chosen: str | None) -> None:
    assert choose_provider(candidates, CLOSEST) == chosen
    assert choose_provider(tuple(reversed(candidates)), CLOSEST) == chosen


def test_choosing_one_at_a_time_alternates_between_equals() -> None:
    chosen_at: dict[str, int] = {}
    picks = []
    for serial in range(1, 7):
        pick = choose_provider([Candidate(s, 2, 0, last_chosen=chosen_at.get(s, 0)) for s in "ab"])
        chosen_at[pick] = serial
        picks.append(pick)
    assert picks == ["a", "b", "a", "b", "a", "b"]


def test_penalty_decays_and_stacks_up_to_a_cap() -> None:
    p = Penalty().add(now=100.0)
    assert p.at(100.0) == PENALTY
    assert p.at(100.0 + PENALTY_HALF_LIFE) == pytest.approx(PENALTY / 2)
    assert p.at(100.0 + 10 * PENALTY_HALF_LIFE) < 0.01
    assert p.at(99.0) == PENALTY  # a clock read before the refusal: no decay, no growth
    again = p.add(now=100.0 + PENALTY_HALF_LIFE)
    assert again.at(again.since) == pytest.approx(PENALTY * 1.5)
    for _ in range(10):
        again = again.add(now=again.since)
    assert again.at(again.since) == PENALTY_MAX


_route = Route("D", 2.0, (NextHop("B", 2.0), NextHop("C", 2.0), NextHop("E", 3.0)))


@pytest.mark.parametrize(
    ("active", "exclude", "last", "chosen"),
    [
        ({}, (), {}, "B"),  # all idle: cost, then peer id
        ({"B": 1}, (), {}, "C"),  # fewest active flows plus cost
        ({"B": 1, "C": 1}, (), {}, "B"),  # 3, 3, 3: a tie, then lowest cost
        ({"B": 1, "C": 1}, (), {"B": 2, "C": 1}, "E"),  # 3, 3, 3: the least recently chosen
        ({"B": 2, "C": 2}, (), {}, "E"),  # the costlier hop takes flows as the cheaper ones fill
        ({}, (), {"B": 5}, "C"),  # one flow at a time alternates between equal hops
        ({}, ("B",), {}, "C"),  # never back where the flow came from
        ({"C": 5}, ("B",), {}, "E"),
        ({}, ("B", "C"), {}, "E"),  # paths that failed this flow are avoided
        ({}, ("X",), {}, "B"),  # excluding a non-hop changes nothing
    ],
)
def test_choose_next_hop(active: dict[str, int], exclude: tuple[str, ...], last: dict[str, int], chosen: str) -> None:
    assert choose_next_hop(_route, active, exclude, last) == chosen


def test_choose_next_hop_with_nothing_left() -> None:
    assert choose_next_hop(Route("D", 1.0, (NextHop("D", 1.0),)), {}, exclude=("D",)) is None
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
    rtts: dict[str, dict[str, float | None]] = {name: {} for name in names}
    rtt = st.one_of(st.none(), st.floats(0, 0.3))  # seconds: up to 30 units of latency
    for a, b in pairs:
        if a == b:
            continue
        who = draw(st.sampled_from(["both"] * 6 + ["a", "b"]))  # mostly two-sided
        if who in ("both", "a"):
            adverts[a][b] = draw(st.integers(0, 10))
            rtts[a][b] = draw(rtt)
        if who in ("both", "b"):
            adverts[b][a] = draw(st.integers(0, 10))
            rtts[b][a] = draw(rtt)
    modes = {name: draw(st.sampled_from([INTERIOR] * 3 + [EDGE])) for name in names}
    return {name: site(name, adverts[name], modes[name], rtts[name]) for name in names}


def oracle(records: Mapping[str, SiteRecord]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Edges and all-pairs distances by Floyd-Warshall, with only interior sites as intermediates."""
    said = {s: {link.peer: link for link in r.links} for s, r in records.items()}
    edges: dict[str, dict[str, float]] = {s: {} for s in records}
    for a in records:
        for b, there in said[a].items():
            if b in said and a in said[b]:
                back = said[b][a]
                latency = max(int((x.rtt or 0) / LATENCY_STEP) for x in (there, back))
                edges[a][b] = max(there.cost, back.cost, 1) + latency
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
