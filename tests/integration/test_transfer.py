"""Bytes through sites: intact, in order, half-closed, many at once, or reset — never silently cut.

Real sockets on 127.0.0.1: clients connect to a listener at one site, the
target server sits behind a connector at another. Every wait on the network
is under `trio.fail_after`.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time

import pytest
import trio
from polling import wait_until

import fabric

TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # tcpi_state values, linux/tcp_states.h

CHUNK = 64 * 1024  # bytes per read
MiB = 1024 * 1024
DEADLINE = 10  # seconds for a test that moves a few MB on loopback; they take well under 1 s


def open_flows(*sites) -> dict[str, int]:
    """Flows each site still holds on its links, by site name, from its status."""
    return {site.name: sum(link.flows for link in site.status().links) for site in sites}


async def test_echo_between_two_sites(two_sites, echo_server, tcp):
    with trio.fail_after(DEADLINE):
        port = await two_sites.expose("echo", echo_server)
        stream = await tcp.connect(port)
        async with stream:
            await tcp.echo_round_trip(stream, 1)
            await tcp.echo_round_trip(stream, 300 * 1024)
            await stream.send_eof()
            assert await tcp.read_until_end(stream) == (0, None)  # EOF came back as EOF, not a reset


async def test_chain_carries_flows_through_the_middle_site(chain, echo_server, hash_server, tcp):
    with trio.fail_after(DEADLINE):
        port = await chain.expose("svc", hash_server.port)
        await hash_server.exchange(port, upload=MiB, download=MiB)
        assert hash_server.verified == 1 and hash_server.failures == []

        status = chain.a.status()
        assert [link.name for link in status.links] == ["b"]  # A is not linked to C
        sites = {site.name: site for site in status.sites}
        assert sites["c"].reachable and sites["c"].cost == 2 and [h.name for h in sites["c"].next_hops] == ["b"]
        assert sites["b"].reachable and sites["b"].cost == 1

        # While a flow is open, B holds one hop of it on each of its links: it is the transit.
        echo_port = await chain.expose("echo", echo_server)
        stream = await tcp.connect(echo_port)
        async with stream:
            await tcp.echo_round_trip(stream, 1000)
            assert {link.name: link.flows for link in chain.b.status().links} == {"a": 1, "c": 1}


@pytest.mark.parametrize(
    ("connections", "smallest", "largest"),
    [(1, 10_000, MiB), (10, 10_000, MiB), (200, 1_000, 64 * 1024)],
)
async def test_concurrent_connections_through_a_chain(chain, hash_server, connections, smallest, largest):
    sizes = random.Random(connections)  # different sizes each way and each connection, same every run
    with trio.fail_after(30):
        port = await chain.expose("svc", hash_server.port)
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                upload, download = sizes.randint(smallest, largest), sizes.randint(smallest, largest)
                nursery.start_soon(lambda u=upload, d=download: hash_server.exchange(port, upload=u, download=d))
    assert hash_server.failures == []
    assert hash_server.verified == connections
    # Each client saw EOF only after every hop had closed both ways: no flow is left in any table.
    assert open_flows(chain.a, chain.b, chain.c) == {"a": 0, "b": 0, "c": 0}


@pytest.mark.parametrize(
    ("upload", "download"),
    [(0, 0), (1, 0), (0, 1), (1, 1), (64 * MiB, 0), (0, 64 * MiB), (64 * MiB, 64 * MiB)],
    ids=["nothing", "1B-up", "1B-down", "1B-both", "64MiB-up", "64MiB-down", "64MiB-both"],
)
async def test_transfer_sizes_through_a_chain(chain, hash_server, upload, download):
    with trio.fail_after(60):
        port = await chain.expose("svc", hash_server.port)
        started = time.perf_counter()
        await hash_server.exchange(port, upload=upload, download=download)
        seconds = time.perf_counter() - started
    assert hash_server.failures == [] and hash_server.verified == 1
    if upload + download >= MiB:
        print(f"{(upload + download) / MiB:.0f} MiB through 2 hops in {seconds:.2f} s")


async def test_connection_without_data_ends_cleanly(chain, echo_server, tcp):
    with trio.fail_after(DEADLINE):
        port = await chain.expose("echo", echo_server)
        stream = await tcp.connect(port)
        async with stream:
            await stream.send_eof()
            assert await tcp.read_until_end(stream) == (0, None)


async def test_half_close_by_client_then_reply(chain, start_server, tcp):
    """The client shuts its write side; the server sees EOF, then replies; the client reads it all.

    The reply is larger than a flow window, so credit must keep flowing after the half-close.
    """
    reply_size = 3 * MiB
    eof_seen_before_reply = trio.Event()

    async def digest_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            digest, total = hashlib.sha256(), 0
            while data := await stream.receive_some(CHUNK):
                digest.update(data)
                total += len(data)
            eof_seen_before_reply.set()
            await stream.send_all(digest.digest() + total.to_bytes(8, "big") + bytes(reply_size))

    with trio.fail_after(DEADLINE):
        port = await chain.expose("digest", await start_server(digest_after_eof))
        request = os.urandom(500_000)
        stream = await tcp.connect(port)
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            reply = bytearray()
            while data := await stream.receive_some(CHUNK):
                reply += data
    assert eof_seen_before_reply.is_set()
    assert len(reply) == 32 + 8 + reply_size
    assert reply[:32] == hashlib.sha256(request).digest()
    assert int.from_bytes(reply[32:40], "big") == len(request)


async def test_a_link_lost_after_a_half_close_still_ends_the_flow_at_both_ends(chain, start_server, tcp):
    """The target got the client's EOF and stays quiet, so nobody reads that flow any more.

    When the link on its path is lost, the flow must still end at both ends:
    the target's connection aborted (it sees an RST), the client's reset.
    """
    target: list[trio.SocketStream] = []
    target_got_eof = trio.Event()

    async def quiet_after_eof(stream: trio.SocketStream) -> None:
        target.append(stream)
        while await stream.receive_some(CHUNK):
            pass
        target_got_eof.set()
        await trio.sleep_forever()  # silent: only fabric can end this connection

    def tcp_state(stream: trio.SocketStream) -> int:
        return stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

    with trio.fail_after(DEADLINE):
        port = await chain.expose("quiet", await start_server(quiet_after_eof))
        stream = await tcp.connect(port)
        async with stream:
            await stream.send_all(b"request")
            await stream.send_eof()
            await target_got_eof.wait()
            assert tcp_state(target[0]) == TCP_CLOSE_WAIT  # fabric's side half-closed, as the client did
            chain.b.router.links[chain.c.site_id].close()  # B drops its link to C
            received, error = await tcp.read_until_end(stream)
            assert received == 0 and tcp.is_reset(error), f"expected a reset at the client, got {error!r}"
            # No event tells a silent server its peer reset: watch the kernel's view of the socket.
            await wait_until(lambda: tcp_state(target[0]) == TCP_CLOSE, "the target's socket closed by a reset")


async def test_half_close_by_server_then_client_keeps_sending(chain, start_server, tcp):
    """The server says all it has and shuts its write side; the client's bytes still get through."""
    greeting = os.urandom(100_000)
    server_got: list[bytes] = []
    done = trio.Event()

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(greeting)
            await stream.send_eof()
            digest = hashlib.sha256()
            while data := await stream.receive_some(CHUNK):
                digest.update(data)
            server_got.append(digest.digest())
            done.set()

    with trio.fail_after(DEADLINE):
        port = await chain.expose("greet", await start_server(greet_then_listen))
        stream = await tcp.connect(port)
        async with stream:
            heard = bytearray()
            while data := await stream.receive_some(CHUNK):
                heard += data
            assert bytes(heard) == greeting  # and the server's EOF arrived as an EOF
            request = os.urandom(3 * MiB)
            await stream.send_all(request)
            await stream.send_eof()
            await done.wait()
            assert await tcp.read_until_end(stream) == (0, None)
    assert server_got == [hashlib.sha256(request).digest()]


async def test_a_reader_that_never_reads_does_not_stall_other_flows(chain, hash_server, tcp):
    """One client asks for 64 MiB and reads none of it; another moves 24 MB meanwhile.

    Both go through the same listener, the same two links and the same transit site.
    """
    stalled_download = 64 * MiB
    with trio.fail_after(30):
        port = await chain.expose("svc", hash_server.port)
        sleeper = await tcp.connect(port)
        async with sleeper:
            await sleeper.send_all(b"".join([(0).to_bytes(8, "big"), stalled_download.to_bytes(8, "big")]))
            await sleeper.send_all(hashlib.sha256().digest())  # of the empty upload
            await sleeper.send_eof()

            with trio.fail_after(10):
                exchange = await hash_server.exchange(port, upload=4 * MiB, download=20 * MiB)
            # Flow control held the stalled flow back: what left the server is what kernel
            # buffers and one window per hop hold (about 1 MB here), not all it has to send.
            stalled_sent = hash_server.bytes_sent - exchange.download
            assert stalled_sent < 16 * MiB

            # The stalled flow was held, not harmed: it still delivers every byte.
            reader_digest = hashlib.sha256()
            left = stalled_download
            while left:
                data = await sleeper.receive_some(min(CHUNK, left))
                assert data, f"stalled flow ended with {left} bytes missing"
                reader_digest.update(data)
                left -= len(data)
            tail = bytearray()
            while data := await sleeper.receive_some(CHUNK):
                tail += data
            assert bytes(tail[:32]) == reader_digest.digest()
            assert bytes(tail[32:]) == hashlib.sha256().digest() and len(tail) == 64
    assert hash_server.failures == [] and hash_server.verified == 2


async def test_a_target_that_crashes_resets_the_client(two_sites, start_server, tcp):
    """The target aborts (RST): the client gets a reset too, never a clean EOF."""
    first_bytes = trio.Event()

    async def crash_on_first_bytes(stream: trio.SocketStream) -> None:
        await stream.receive_some(CHUNK)
        first_bytes.set()
        tcp.abort(stream)

    with trio.fail_after(DEADLINE):
        port = await two_sites.expose("fragile", await start_server(crash_on_first_bytes))
        stream = await tcp.connect(port)
        async with stream:
            await stream.send_all(b"hello")
            received, error = await tcp.read_until_end(stream)
    assert first_bytes.is_set()
    assert received == 0
    assert tcp.is_reset(error), f"expected a connection reset, got {error!r}"
    # The reset travelled target -> hub -> edge -> client: both hops of the flow are gone.
    assert open_flows(two_sites.hub, two_sites.edge) == {"hub": 0, "edge": 0}


async def test_a_target_that_crashes_mid_reply_resets_the_client(two_sites, start_server, tcp):
    """Some bytes then an RST from the target: the client sees a reset after at most those bytes."""
    reply = os.urandom(1_000_000)

    async def crash_mid_reply(stream: trio.SocketStream) -> None:
        await stream.receive_some(CHUNK)
        await stream.send_all(reply)
        tcp.abort(stream)

    with trio.fail_after(DEADLINE):
        port = await two_sites.expose("fragile", await start_server(crash_mid_reply))
        stream = await tcp.connect(port)
        async with stream:
            await stream.send_all(b"hello")
            received, error = await tcp.read_until_end(stream)
    assert received <= len(reply)
    assert tcp.is_reset(error), f"expected a connection reset after {received} bytes, got {error!r}"


async def test_a_connector_whose_target_is_down_resets_the_client_at_once(two_sites, tcp):
    with trio.fail_after(DEADLINE):
        port = await two_sites.expose("down", tcp.closed_port())
    with trio.fail_after(2):
        stream = await tcp.connect(port)
        async with stream:
            received, error = await tcp.read_until_end(stream)
    assert received == 0
    assert tcp.is_reset(error), f"expected a connection reset, got {error!r}"


async def test_a_key_nobody_serves_refuses_the_client_at_once_and_says_why(two_sites, tcp):
    """Without a provider the listener's socket is closed: a client is refused, not accepted and left hanging."""
    with trio.fail_after(DEADLINE):
        listener = await two_sites.edge.create_listener("nobody", 0)
    assert listener.port != 0  # the port is picked and kept for when a provider comes
    with trio.fail_after(1), pytest.raises(OSError):
        await tcp.connect(listener.port)
    (status,) = two_sites.edge.status().listeners
    assert status.port == listener.port and status.error == "no reachable site offers routing key 'nobody'"


async def test_a_provider_whose_target_is_down_is_skipped_for_one_that_works(network, echo_server, tcp):
    """Two sites serve the key; one's target is down. Every client still gets through (DESIGN: routing, 3)."""
    async with (
        network.site("broken", link_port=0) as broken,
        network.site("working", link_port=0) as working,
        network.site("edge") as edge,
    ):
        with trio.fail_after(DEADLINE):
            await network.link(edge, broken)
            await network.link(edge, working)
            port = await network.expose(broken, edge, "echo", tcp.closed_port())
            stream = await tcp.connect(port)
            async with stream:  # the broken site alone: refused
                received, error = await tcp.read_until_end(stream)
            assert received == 0 and tcp.is_reset(error), f"expected a reset, got {error!r}"

            await working.create_connector("echo", echo_server, host="127.0.0.1")
            await edge.wait_reachable("echo", providers=2)
            assert [p.name for p in edge.status().services[0].providers] == ["broken", "working"]
            # A flow held open makes the working site the busier one, so the balanced choice
            # offers each next flow to the broken site first: the ingress must fall back.
            held = await tcp.connect(port)
            async with held:
                await tcp.echo_round_trip(held, 1000)
                for _ in range(3):
                    stream = await tcp.connect(port)
                    async with stream:
                        await tcp.echo_round_trip(stream, 1000)
                await tcp.echo_round_trip(held, 1000)


async def test_flows_past_a_links_limit_are_refused_and_the_others_carry_on(network, echo_server, tcp):
    settings = fabric.Settings(max_flows_per_link=2)
    async with (
        network.site("hub", link_port=0, settings=settings) as hub,
        network.site("edge", settings=settings) as edge,
    ):
        with trio.fail_after(DEADLINE):
            await network.link(edge, hub)
            port = await network.expose(hub, edge, "echo", echo_server)
            first, second = await tcp.connect(port), await tcp.connect(port)
            async with first, second:
                await tcp.echo_round_trip(first, 1000)
                await tcp.echo_round_trip(second, 1000)
                third = await tcp.connect(port)
                async with third:
                    received, error = await tcp.read_until_end(third)
                assert received == 0 and tcp.is_reset(error), f"expected a reset, got {error!r}"
                await tcp.echo_round_trip(first, 100_000)
                await tcp.echo_round_trip(second, 100_000)
                await first.send_eof()
                assert await tcp.read_until_end(first) == (0, None)
            # A flow ended: room for a new one.
            stream = await tcp.connect(port)
            async with stream:
                await tcp.echo_round_trip(stream, 1000)
