"""Service sync over real sockets: listeners appear where a key is offered elsewhere, and go with it.

Each site gets its own loopback address as its service host (127.0.0.2, .3,
...), as sites on separate hosts would each have 127.0.0.1.
"""

from __future__ import annotations

import functools

import pytest
import trio

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
