"""Multipath: flows spread over paths and providers, follow measured latency, and avoid refusing targets.

The sites run in this process with real TLS links on 127.0.0.1. Which way a
connection went is read from what the sites and the targets saw: the flows
on each transit site's links, the connections each target server accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

import fabric
from fabric.errors import TokenError

DEADLINE = 60  # seconds for a whole test that waits on the network
FAST = fabric.Settings(keepalive_interval=0.2, keepalive_timeout=0.6, reconnect_min=0.1, reconnect_max=0.5)


async def clients(tcp, port: int, count: int, *, at_once: int = 1) -> list[BaseException]:
    """`count` clients, `at_once` at a time, each doing one echo round trip; the failures."""
    failures: list[BaseException] = []
    slots = trio.Semaphore(at_once)

    async def one() -> None:
        async with slots:
            try:
                stream = await tcp.connect(port)
                async with stream:
                    await tcp.echo_round_trip(stream, 1000)
            except (OSError, EOFError, trio.BrokenResourceError) as exc:
                failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return failures


@asynccontextmanager
async def two_providers(
    network, targets: tuple[int, int], *, costs: tuple[int, int] = (1, 1), distribution: str = "balanced"
) -> AsyncIterator[tuple[fabric.Site, int]]:
    """Sites "near" and "far", each with a connector "echo" to its target, linked to site a at `costs`.

    Yields site a and the port of its listener for "echo", once both providers are reachable.
    """
    async with (
        network.site("near", link_port=0) as near,
        network.site("far", link_port=0) as far,
        network.site("a") as a,
    ):
        with trio.fail_after(DEADLINE):
            for provider, cost, target in zip((near, far), costs, targets):
                await network.link(a, provider, cost=cost)
                await provider.create_connector("echo", target)
            listener = await a.create_listener("echo", 0, distribution=distribution)
            await a.wait_reachable("echo", providers=2)
        yield a, listener.port


async def test_two_providers_at_equal_cost_share_connections(network, tcp, counting_echo):
    one, two = await counting_echo(), await counting_echo()
    async with two_providers(network, (one.port, two.port)) as (_, port):
        with trio.fail_after(DEADLINE):
            # One at a time: equals take turns.
            assert await clients(tcp, port, 100) == []
            assert 40 <= one.connections <= 60 and one.connections + two.connections == 100, (one, two)
            # Twenty at a time.
            assert await clients(tcp, port, 100, at_once=20) == []
            assert 80 <= one.connections <= 120 and one.connections + two.connections == 200, (one, two)


@pytest.mark.parametrize("distribution", ["balanced", "closest"])
async def test_a_nearer_provider_takes_all_with_closest_and_the_overflow_with_balanced(
    network, tcp, counting_echo, distribution
):
    near_echo, far_echo = await counting_echo(), await counting_echo()
    targets = (near_echo.port, far_echo.port)
    async with two_providers(network, targets, costs=(1, 3), distribution=distribution) as (a, port):
        with trio.fail_after(DEADLINE):
            assert await clients(tcp, port, 200, at_once=20) == []
            if distribution == "closest":
                assert (near_echo.connections, far_echo.connections) == (200, 0)
            else:  # the far one takes flows once the near one holds 2 more than it
                assert far_echo.connections > 0 and near_echo.connections > far_echo.connections
            assert a.status().listeners[0].distribution == distribution


async def test_when_the_nearer_providers_target_refuses_the_farther_one_serves_every_client(
    network, tcp, counting_echo
):
    far_echo = await counting_echo()
    targets = (tcp.closed_port(), far_echo.port)  # the near one's target is down
    async with two_providers(network, targets, costs=(1, 3), distribution="closest") as (a, port):
        with trio.fail_after(DEADLINE):
            assert await clients(tcp, port, 50, at_once=5) == []
            assert far_echo.connections == 50
            (service,) = a.status().services
            providers = {p.name: p for p in service.providers}
            assert providers["near"].penalty > 0 and providers["far"].penalty == 0
            assert providers["near"].cost == 1 and providers["far"].cost == 3


async def test_both_paths_of_a_diamond_carry_flows(network, tcp, echo_server):
    """A - B - D and A - C - D, service at D: 100 connections held open use B and C about equally."""
    async with (
        network.site("a") as a,
        network.site("b", link_port=0) as b,
        network.site("c", link_port=0) as c,
        network.site("d") as d,
    ):
        with trio.fail_after(DEADLINE):
            for transit in (b, c):
                await network.link(a, transit)
                await network.link(d, transit)
            port = await network.expose(d, a, "echo", echo_server)
            while len(a.router.routes[d.site_id].next_hops) < 2:
                await a.router.wait_changed()

            streams = []
            try:
                for _ in range(100):
                    stream = await tcp.connect(port)
                    streams.append(stream)
                    await tcp.echo_round_trip(stream, 100)
                via = {site.name: site.router.links[d.site_id].flow_count for site in (b, c)}
                assert via["b"] + via["c"] == 100 and min(via.values()) >= 30, via
                (to_d,) = [s for s in a.status().sites if s.name == "d"]
                assert sorted(h.name for h in to_d.next_hops) == ["b", "c"]
                assert sum(h.flows for h in to_d.next_hops) == 100
            finally:
                for stream in streams:
                    await stream.aclose()


async def test_a_link_whose_rtt_rises_loses_its_traffic_and_jitter_moves_nothing(
    network, tcp, echo_server, link_proxy, timer_clock, skip_waits
):
    """A - B - D and A - C - D, where A reaches B through a relay that adds delay."""
    async with (
        network.site("a", settings=FAST) as a,
        network.site("b", link_port=0, settings=FAST) as b,
        network.site("c", link_port=0, settings=FAST) as c,
        network.site("d", settings=FAST) as d,
    ):
        with trio.fail_after(DEADLINE):
            proxy = await link_proxy(b.link_port)
            token = await b.issue_token()
            await a.redeem_token(attrs.evolve(token, addresses=(f"tls://127.0.0.1:{proxy.port}",)))
            await a.wait_linked(b.site_id)
            await network.link(a, c)
            await network.link(d, b)
            await network.link(d, c)
            port = await network.expose(d, a, "echo", echo_server)
            skip_waits()  # from here on: links, keepalives and the relay's delays

            def to_d():
                return next(s for s in a.status().sites if s.name == "d")

            def hops():
                return {h.name: h for h in to_d().next_hops}

            while hops().keys() != {"b", "c"} or hops()["b"].cost != hops()["c"].cost:
                await a.router.wait_changed()

            proxy.delay, proxy.jitter = 0.050, 0.015  # 100 ms round trip, give or take 30
            while hops()["b"].cost < hops()["c"].cost + 5:
                await a.router.wait_changed()
            assert to_d().next_hops[0].name == "c" and hops()["b"].rtt_ms >= 60, hops()

            # New connections go the fast way; the slow one waits until C holds 5+ more flows than it.
            streams = []
            try:
                for _ in range(5):
                    stream = await tcp.connect(port)
                    streams.append(stream)
                    await tcp.echo_round_trip(stream, 100)
                assert c.router.links[d.site_id].flow_count == 5
                assert b.router.links[d.site_id].flow_count == 0
            finally:
                for stream in streams:
                    await stream.aclose()

        # The delay jitters around a fixed value: for 30 s the traffic stays on C, and the route
        # barely moves. Without the hysteresis, a round trip of 100 ms give or take 30 would move
        # B's cost between 7 and 13 units dozens of times; with it the route may settle once, and
        # on a loaded machine (where the delays the CPUs add come and go) once more there and back.
        changes_before = to_d().route_changes
        preferred = []
        with trio.move_on_after(30):
            while True:
                preferred.append(to_d().next_hops[0].name)
                await a.router.wait_changed()
        assert set(preferred) == {"c"}, preferred
        assert to_d().route_changes - changes_before <= 3, to_d()


async def test_an_edge_site_refuses_to_link_with_another_edge_site(network):
    async with (
        network.site("edge1", link_port=0, mode="edge") as edge1,
        network.site("edge2", mode="edge") as edge2,
        network.site("interior") as interior,
    ):
        with trio.fail_after(DEADLINE):
            token = await edge1.issue_token(redemptions_allowed=1)
            with pytest.raises(TokenError, match=r"both edge sites.*the token is not spent"):
                await edge2.redeem_token(token)
            assert edge2.config.links == ()
            await interior.redeem_token(token)  # not spent: an interior site may still use it
            await interior.wait_linked(edge1.site_id)


async def test_a_site_that_became_an_edge_is_refused_by_an_edge_and_stops_dialling(network):
    async with network.site("edge1", link_port=0, mode="edge") as edge1:
        with trio.fail_after(DEADLINE):
            async with network.site("other") as other:  # interior when it redeems
                await network.link(other, edge1)
            async with network.site("other", mode="edge") as other:  # then reopened as an edge
                while not (errors := [l.error for l in other.status().links if l.error and "not dialling" in l.error]):
                    await other.wait_links_changed()
            assert "both edge sites" in errors[0] and "delete this link" in errors[0], errors


async def test_new_connections_do_not_wait_for_a_silent_link_to_be_declared_dead(network, tcp, counting_echo, link_proxy, timer_clock, skip_waits):
    """Two providers, one behind a link that goes silent: every new client is served, well before keepalive gives up."""
    settings = fabric.Settings()  # PING every 1 s, dead after 3 s
    async with (
        network.site("p1", link_port=0, settings=settings) as p1,
        network.site("p2", link_port=0, settings=settings) as p2,
        network.site("a", settings=settings) as a,
    ):
        with trio.fail_after(DEADLINE):
            proxy = await link_proxy(p1.link_port)
            token = await p1.issue_token()
            await a.redeem_token(attrs.evolve(token, addresses=(f"tls://127.0.0.1:{proxy.port}",)))
            await network.link(a, p2)
            one, two = await counting_echo(), await counting_echo()
            await p1.create_connector("echo", one.port)
            await p2.create_connector("echo", two.port)
            listener = await a.create_listener("echo", 0)
            await a.wait_reachable("echo", providers=2)
            assert await clients(tcp, listener.port, 10) == [] and one.connections == two.connections == 5

            skip_waits()  # from here on the OPEN's and keepalive's timers
            cut_at = trio.current_time()
            proxy.cut()
            assert await clients(tcp, listener.port, 10, at_once=10) == []
            served_after = trio.current_time() - cut_at
            assert two.connections == 15
            # An OPEN waiting on the silent link gives up after 1.5 keepalive intervals, not 3.
            assert served_after < settings.keepalive_timeout, served_after


async def test_the_provider_choice_follows_providers_and_costs_as_they_change(network, echo_server):
    """The router keeps each key's providers and their costs between choices (an HTTP listener chooses per
    request): a provider that appears or goes, or a cost that changes, must reach the very next choice."""
    async with (
        network.site("near", link_port=0) as near,
        network.site("far", link_port=0) as far,
        network.site("a") as a,
    ):
        router = a.router

        async def until(condition) -> None:
            while not condition():
                await router.wait_changed()

        with trio.fail_after(DEADLINE):
            await network.link(a, near, cost=1)
            await network.link(a, far, cost=3)
            await near.create_connector("echo", echo_server)
            await a.wait_reachable("echo")
            assert router.choose_provider("echo", "closest") == near.site_id
            assert router.choose_provider("echo", exclude={near.site_id}) is None

            await far.create_connector("echo", echo_server)  # appears
            await a.wait_reachable("echo", providers=2)
            assert router.choose_provider("echo", "closest") == near.site_id
            assert router.choose_provider("echo", exclude={near.site_id}) == far.site_id

            (to_near,) = [link.name for link in a.config.links if link.peer_id == near.site_id]
            await a.update_link(to_near, cost=5)  # now the farther one
            await until(lambda: router.routes[near.site_id].cost == 5)
            assert router.choose_provider("echo", "closest") == far.site_id

            await far.delete_connector("echo")  # goes
            await until(lambda: router.providers("echo") == [near.site_id])
            assert router.choose_provider("echo", "closest") == near.site_id
            assert router.choose_provider("echo", exclude={near.site_id}) is None

            await near.delete_connector("echo")
            await until(lambda: not router.providers("echo"))
            assert router.choose_provider("echo") is None
