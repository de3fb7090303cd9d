"""Links over WebSockets (ws://): the same guarantees as a direct TLS link, with real sockets in one process.

Reverse proxies (nginx) and forward proxies (tinyproxy) in front of them are
tested with the real programs in tests/system/test_ws_proxies.py.
"""

from __future__ import annotations

import random

import pytest
import trio

MiB = 1024 * 1024
SETUP_DEADLINE = 20  # seconds to open sites and link them; ~0.1 s on loopback


def ws_url(site) -> str:
    return site.status().ws_address


async def test_links_are_websockets_and_status_says_so(ws_chain):
    (a_link,) = ws_chain.a.status().links
    assert (a_link.transport, a_link.address, a_link.up) == ("ws", ws_url(ws_chain.b), True)
    assert {(l.name, l.transport, l.direction) for l in ws_chain.b.status().links} == {
        ("a", "ws", "incoming"),
        ("c", "ws", "incoming"),
    }
    assert ws_chain.b.status().link_address is None


async def test_websocket_links_are_driven_directly_on_their_sockets(ws_chain):
    """tls_io.DirectTLS at both ends of each ws:// link: not trio's SSLStream over a WebSocketStream."""
    for site, peer in ((ws_chain.a, ws_chain.b), (ws_chain.b, ws_chain.a), (ws_chain.b, ws_chain.c)):
        assert site.router.links[peer.site_id].direct, (site.name, peer.name)


@pytest.mark.parametrize(
    ("upload", "download"),
    [(64 * MiB, 0), (0, 64 * MiB), (64 * MiB, 64 * MiB)],
    ids=["64MiB-up", "64MiB-down", "64MiB-both"],
)
async def test_64_mib_each_way_arrive_intact_over_websocket_links(ws_chain, hash_server, upload, download):
    with trio.fail_after(90):
        port = await ws_chain.expose("svc", hash_server.port)
        await hash_server.exchange(port, upload=upload, download=download)
    assert hash_server.failures == [] and hash_server.verified == 1


async def test_200_concurrent_connections_over_websocket_links(ws_chain, hash_server):
    sizes = random.Random(200)
    with trio.fail_after(60):
        port = await ws_chain.expose("svc", hash_server.port)
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                upload, download = sizes.randint(1_000, 64 * 1024), sizes.randint(1_000, 64 * 1024)
                nursery.start_soon(lambda u=upload, d=download: hash_server.exchange(port, upload=u, download=d))
    assert hash_server.failures == []
    assert hash_server.verified == 200


async def test_the_redeemer_tries_the_token_addresses_in_order_and_dials_the_one_that_worked_first(network, tcp):
    dead = f"tls://127.0.0.1:{tcp.closed_port()}"
    async with network.site("hub", ws_port=0) as hub:
        async with network.site("edge") as edge:
            await network.link(edge, hub, link_urls=[dead, ws_url(hub)])
            (link,) = edge.config.links
            assert link.addresses == (ws_url(hub), dead)  # remembered for the next start
        async with network.site("edge") as edge:
            with trio.fail_after(SETUP_DEADLINE):
                await edge.wait_linked(hub.site_id)
            assert edge.status().links[0].address == ws_url(hub)


async def test_a_link_that_dials_a_dead_address_first_moves_the_live_one_first(network, tcp):
    async with network.site("hub", ws_port=0, link_port=0) as hub, network.site("edge") as edge:
        await network.link(edge, hub, link_urls=[ws_url(hub)])
        (link,) = edge.config.links
        await edge.delete_link(link.name)
        # A link whose first address went away, as when the hub moved behind a proxy.
        dead = f"ws://127.0.0.1:{tcp.closed_port()}/fabric"
        await network.link(edge, hub, link_urls=[dead, hub.status().link_address])
        assert edge.config.links[0].addresses[0] == hub.status().link_address


async def test_a_cut_websocket_link_is_noticed_and_comes_back(network, link_proxy, echo_server, tcp):
    async with network.site("hub", ws_port=0) as hub, network.site("edge") as edge:
        relay = await link_proxy(hub.ws_port)
        await network.link(edge, hub, link_urls=[f"ws://127.0.0.1:{relay.port}/fabric"])
        port = await network.expose(hub, edge, "echo", echo_server)
        relay.cut()  # silent: only the link's keepalive can tell
        with trio.fail_after(10):
            while any(l.up for l in edge.status().links):
                await edge.wait_links_changed()
            await edge.wait_linked(hub.site_id)
            await edge.wait_reachable("echo")
            async with await tcp.connect(port) as stream:
                await tcp.echo_round_trip(stream, 100_000)


async def test_the_websocket_port_answers_other_requests_with_http_errors_and_goes_on(network, echo_server, tcp):
    async with network.site("hub", ws_port=0) as hub, network.site("edge") as edge:
        for request, status, text in (
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"404", b"fabric: links are at /fabric, not /\n"),
            (b"GET /fabric HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"fabric: this port takes WebSocket links only\n"),
            (b"\x16\x03\x01 not http at all\r\n\r\n", b"400", b"fabric: this port takes WebSocket links only\n"),
        ):
            async with await tcp.connect(hub.ws_port) as stream:
                await stream.send_all(request)
                answer = b""
                while data := await stream.receive_some(1000):
                    answer += data
            assert answer.startswith(b"HTTP/1.1 " + status) and answer.endswith(text), answer
        await network.link(edge, hub, link_urls=[ws_url(hub)])
        port = await network.expose(hub, edge, "echo", echo_server)
        async with await tcp.connect(port) as stream:
            await tcp.echo_round_trip(stream, 1000)
