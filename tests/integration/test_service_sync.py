"""Service sync over real sockets: listeners appear where a key is offered elsewhere, and go with it.

Each site gets its own loopback address as its service host (127.0.0.2, .3,
...), as sites on separate hosts would each have 127.0.0.1.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import pytest
import trio

import fabric
from fabric import logs

DEADLINE = 15  # seconds; gossip on loopback converges in milliseconds


async def echo_once(host: str, port: int, tcp) -> None:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await tcp.echo_round_trip(stream, 10_000)


async def refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_listeners_follow_the_services_of_the_network(network, echo_server, tcp):
    """A and B get a listener for C's key on their service host; it goes and comes back with C's connector and C."""
    port = echo_server  # auto-listeners use the connector's port
    with trio.fail_after(DEADLINE):
        async with (
            network.site("a", service_host="127.0.0.2") as a,
            network.site("b", link_port=0, service_host="127.0.0.3") as b,
        ):
            await network.link(a, b)
            async with network.site("c", service_host="127.0.0.4") as c:
                await network.link(c, b)
                await c.create_connector("echo", port, host="127.0.0.1")
                for site, host in ((a, "127.0.0.2"), (b, "127.0.0.3")):
                    await site.wait_listening("echo")
                    await echo_once(host, port, tcp)
                (synced,) = a.status().listeners
                assert synced.auto and synced.accepting and (synced.host, synced.port) == ("127.0.0.2", port)
                assert not c.status().listeners  # the provider listens for nothing: it has the connector
                (seen,) = [info for info in a.status().sites if info.name == "c"]
                assert seen.reachable and seen.services == ("echo",) and 0 <= seen.age_s < DEADLINE

                await c.delete_connector("echo")  # the last provider goes: the listeners close
                for site, host in ((a, "127.0.0.2"), (b, "127.0.0.3")):
                    await site.wait_listening("echo", accepting=False)
                    assert await refused(host, port)
                assert a.status().listeners == ()

                await c.create_connector("echo", port, host="127.0.0.1")  # ...and come back with it
                await a.wait_listening("echo")
                await echo_once("127.0.0.2", port, tcp)
            # Site C stopped altogether: its services are withdrawn, the listeners close.
            await a.wait_listening("echo", accepting=False)
            assert await refused("127.0.0.2", port)
            (gone,) = [info for info in a.status().sites if info.name == "c"]  # kept until purge_after
            assert not gone.reachable and gone.cost is None
            async with network.site("c") as c:  # started again: its connector is in its site dir
                await a.wait_listening("echo")
                await b.wait_listening("echo")
                await echo_once("127.0.0.2", port, tcp)
                await echo_once("127.0.0.3", port, tcp)


async def test_a_port_in_use_is_reported_and_the_site_goes_on(network, echo_server, tcp):
    port = echo_server
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, lambda stream: stream.aclose(), port, host="127.0.0.2")
        squatter = (await nursery.start(serve))[0]
        with trio.fail_after(DEADLINE):
            async with network.site("a", service_host="127.0.0.2") as a, network.site("b", link_port=0) as b:
                await network.link(a, b)
                await b.create_connector("echo", port, host="127.0.0.1")
                await a.wait_reachable("echo")
                while not a.status().listeners:
                    await a.wait_listeners_changed()
                (synced,) = a.status().listeners
                assert synced.auto and not synced.accepting
                assert "cannot listen on 127.0.0.2" in synced.error and "in use" in synced.error
                # The site is fine otherwise: a configured listener for the key works.
                listener = await a.create_listener("echo", 0)
                await echo_once("127.0.0.1", listener.port, tcp)
        await squatter.aclose()
        nursery.cancel_scope.cancel()


async def test_without_service_sync_no_listener_appears(network, echo_server):
    with trio.fail_after(DEADLINE):
        async with network.site("a", service_sync=False, service_host="127.0.0.2") as a, network.site(
            "b", link_port=0
        ) as b:
            await network.link(a, b)
            await b.create_connector("echo", echo_server, host="127.0.0.1")
            await a.wait_reachable("echo")
            assert a.status().listeners == ()


async def test_a_connector_aimed_at_a_fabric_listener_refuses_instead_of_looping(network, tcp):
    """The connector's target is the listener that feeds it: each flow would make another, forever."""
    with trio.fail_after(DEADLINE):
        async with network.site("a", service_sync=False) as a, network.site("b", link_port=0, service_sync=False) as b:
            await network.link(a, b)
            listener = await a.create_listener("loop", 0)
            await b.create_connector("loop", listener.port, host="127.0.0.1")
            await a.wait_reachable("loop")
            with trio.fail_after(2):
                stream = await tcp.connect(listener.port)
                async with stream:
                    received, error = await tcp.read_until_end(stream)
            assert received == 0 and tcp.is_reset(error)
            assert sum(l.flows for l in a.status().links) <= 1


@pytest.mark.parametrize("host", ["127.0.0.2"])
async def test_the_service_host_is_kept_in_the_site_dir(network, host):
    async with network.site("a", service_host=host):
        pass
    async with network.site("a") as a:
        assert a.config.service_host == host and a.config.service_sync


async def test_deleting_a_configured_listener_lets_service_sync_take_over(network, echo_server, tcp):
    port = echo_server
    with trio.fail_after(DEADLINE):
        async with network.site("a", service_host="127.0.0.2") as a, network.site("b", link_port=0) as b:
            await network.link(a, b)
            await b.create_connector("echo", port, host="127.0.0.1")
            await a.create_listener("echo", 0)
            await a.wait_reachable("echo")
            assert [l.auto for l in a.status().listeners] == [False]  # configured: no second one
            await a.delete_listener("echo")
            await a.wait_listening("echo")
            (synced,) = a.status().listeners
            assert synced.auto and (synced.host, synced.port) == ("127.0.0.2", port)
            await echo_once("127.0.0.2", port, tcp)


async def test_a_listener_made_on_the_port_service_sync_holds_takes_it_over(network, echo_server, tcp):
    port = echo_server
    with trio.fail_after(DEADLINE):
        async with network.site("a", service_host="127.0.0.2") as a, network.site("b", link_port=0) as b:
            await network.link(a, b)
            await b.create_connector("echo", port, host="127.0.0.1")
            await a.wait_listening("echo")  # service sync holds 127.0.0.2:<port>
            listener = await a.create_listener("echo", port, host="127.0.0.2")  # the same address
            assert listener.port == port and not listener.auto
            (only,) = a.status().listeners
            assert not only.auto and only.accepting
            await echo_once("127.0.0.2", port, tcp)


async def test_a_service_that_speaks_http_gets_http_listeners(network, start_server):
    """A connector with protocol http: the other site's service sync listens with HTTP (per-request routing, 503s)."""

    async def answer_ok(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    port = await start_server(answer_ok)
    with trio.fail_after(DEADLINE):
        async with (
            network.site("a", service_host="127.0.0.2") as a,
            network.site("b", link_port=0, service_host="127.0.0.3") as b,
        ):
            await network.link(a, b)
            await b.create_connector("web", port, host="127.0.0.1", protocol="http")
            await a.wait_listening("web")
            (synced,) = a.status().listeners
            assert synced.auto and synced.protocol == "http"
            stream = await trio.open_tcp_stream("127.0.0.2", port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok")
            assert a.status().listeners[0].http.statuses == {"2xx": 1}


# -- a site that floods the network with routing keys ---------------------------------------

FLOOD_HOST = "127.0.0.5"  # the victim's service host
FLOOD_SETTINGS = fabric.Settings(max_auto_listeners=12, max_auto_listeners_per_site=5)  # a fraction of the flood
FLOOD = 100  # keys the flooder offers
FLOOD_PORT = 21000  # its port hints: FLOOD_PORT + i
FLOOD_DEADLINE = 60  # seconds; the flooder's 100 connectors take ~1 s, gossip converges in milliseconds
PRIVILEGED_PORT = 1000  # what a flooder advertises to make the victim bind a system port (tests run as root)


def auto_rows(site: fabric.Site) -> dict[str, fabric.ListenerStatus]:
    return {l.routing_key: l for l in site.status().listeners if l.auto}


async def wait_rows(site: fabric.Site, count: int) -> dict[str, fabric.ListenerStatus]:
    """Service sync's rows (listening or saying why not), once there are `count` of them."""
    while len(rows := auto_rows(site)) < count:
        await site.wait_listeners_changed()
    return rows


class Lines(logging.Handler):
    """Keeps the records of the loggers it is added to, each naming its site."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(logs.SiteFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, site: str, text: str = "", level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.site == site and text in r.getMessage() and r.levelno >= level]


@pytest.fixture
def site_log() -> Iterator[Lines]:
    """The sites' own log lines (fabric.site: links, tokens, service sync), from INFO up."""
    lines, logger = Lines(), logging.getLogger("fabric.site")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)


async def test_a_site_flooding_routing_keys_gets_its_share_of_listeners_and_no_more(
    network, echo_server, counting_echo, tcp, site_log
):
    """The attack: one linked site advertises many keys (one at a privileged port, one another site's at another
    port). The victim listens for at most its per-site share of them, says why not for the rest in status with one
    log line per cause, keeps its listener for the honest key where it was, and still listens for new honest keys."""
    per_site = FLOOD_SETTINGS.max_auto_listeners_per_site
    with trio.fail_after(FLOOD_DEADLINE):
        async with (
            network.site("victim", link_port=0, service_host=FLOOD_HOST, settings=FLOOD_SETTINGS) as victim,
            network.site("honest", service_sync=False) as honest,
            network.site("flooder", service_sync=False) as flooder,
        ):
            await network.link(honest, victim)
            await network.link(flooder, victim)
            await honest.create_connector("api", echo_server, host="127.0.0.1")
            await victim.wait_listening("api")
            held = await trio.open_tcp_stream(FLOOD_HOST, echo_server)  # a client of the honest key, open throughout
            async with held:
                await tcp.echo_round_trip(held, 1000)

                await flooder.create_connector("api", FLOOD_PORT - 1, host="127.0.0.1")  # "move" the honest listener
                await flooder.create_connector("low", PRIVILEGED_PORT, host="127.0.0.1")
                for i in range(FLOOD):
                    await flooder.create_connector(f"flood-{i:03d}", FLOOD_PORT + i, host="127.0.0.1")
                await flooder.create_connector("web", FLOOD_PORT - 100, host="127.0.0.1")  # the honest site's next key
                rows = await wait_rows(victim, 3 + FLOOD)  # api, low, web and the flood

                flood = [rows[f"flood-{i:03d}"] for i in range(FLOOD)]
                assert sum(l.accepting for l in flood) <= per_site
                limited = [l for l in flood if l.error and "max_auto_listeners_per_site" in l.error]
                assert len(limited) == FLOOD - per_site and not any(l.accepting for l in limited)
                assert not rows["web"].accepting and "max_auto_listeners_per_site" in rows["web"].error
                assert "site flooder, which offers it, has 5 automatic listeners here already" in limited[0].error
                assert not rows["low"].accepting and f"port {PRIVILEGED_PORT} is below 1024" in rows["low"].error
                assert await refused(FLOOD_HOST, PRIVILEGED_PORT)
                assert (rows["api"].port, rows["api"].accepting) == (echo_server, True)  # not moved
                assert await refused(FLOOD_HOST, FLOOD_PORT - 1)
                await tcp.echo_round_trip(held, 1000)

                # The flooder's records change, again and again: nothing the victim holds is bound again or moved.
                opened = site_log.of("victim", "service sync: listening")
                assert opened
                for i in range(FLOOD, FLOOD + 10):
                    await flooder.delete_connector("api")
                    await flooder.create_connector("api", FLOOD_PORT - 2 - i, host="127.0.0.1")
                    await flooder.create_connector(f"flood-{i:03d}", FLOOD_PORT + i, host="127.0.0.1")
                rows = await wait_rows(victim, 3 + FLOOD + 10)  # the last change seen
                assert site_log.of("victim", "service sync: listening") == opened
                assert sum(l.accepting for l in rows.values()) == 1 + per_site and rows["api"].port == echo_server
                await tcp.echo_round_trip(held, 1000)

                # The honest site offers another key, one the flooder offers too: charged to the honest site, which
                # has room, it gets its listener, on the honest site's port.
                web = await counting_echo()
                await honest.create_connector("web", web.port, host="127.0.0.1")
                await victim.wait_listening("web")
                assert auto_rows(victim)["web"].port == web.port
                await echo_once(FLOOD_HOST, web.port, tcp)
                assert len([l for l in victim.status().listeners if l.accepting]) <= FLOOD_SETTINGS.max_auto_listeners

    said = site_log.of("victim", level=logging.WARNING)
    assert 2 <= len(said) <= 3, said  # one per cause (per-site limit, low port; a flood port in use, perhaps)
    assert any("max_auto_listeners_per_site" in line for line in said), said


async def test_a_site_starting_with_many_connectors_offers_them_in_one_record(network):
    """Configured connectors are published together at start: one new version of the record for all of
    them, not one per connector (a flood of versions every neighbour would take in and pass on)."""
    keys = [f"key-{i}" for i in range(200)]
    async with network.site("many", service_sync=False) as site:
        for key in keys:
            await site.create_connector(key, 1024 + len(key))
    async with network.site("many") as site:
        record = site.router.gossip.record
        assert record.version == 1 and {s.routing_key for s in record.services} == set(keys)
