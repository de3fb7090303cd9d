"""tls_io.DirectTLS: an established link's TLS (and WebSocket framing) driven on a real socket pair."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import socket
import struct
import termios
import time

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websocket_support import exchange, websocket_pair
from websockets.frames import Frame, Opcode

from fabric import pki
from fabric.config import Settings
from fabric.router.frames import (
    FrameDecoder,
    FrameType,
    decode_u64_untrusted,
    encode_u64,
)
from fabric.router.link import COALESCE_WINDOW, CONTROL_ALLOWANCE, Link, make_hello
from fabric.router.tls_io import RECEIVE_SIZE, DirectTLS

SETTINGS = Settings()
take_over = functools.partial(DirectTLS.take_over, max_pending=SETTINGS.link_write_buffer)
HELLO = make_hello("b", "b", "interior", 1, SETTINGS, 1)  # a Link's own HELLO and its peer's: only logs read them


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> tuple:
    identity = pki.create_identity(tmp_path_factory.mktemp("pki") / "tls", "tls")
    return pki.server_context(identity), pki.client_context(identity.ca_cert_pem)


async def tls_pair(contexts, transports) -> tuple[trio.SSLStream, trio.SSLStream]:
    """(server, client): fabric's TLS 1.3 handshaken over `transports` (the server's, the client's)."""
    server = trio.SSLStream(transports[0], contexts[0], server_side=True)
    client = trio.SSLStream(transports[1], contexts[1], server_hostname=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


def socket_pair(buffer: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    if buffer is not None:
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return trio.SocketStream(a), trio.SocketStream(b)


async def link_streams(contexts, kind: str, *, buffer: int | None = None, keepalive: float = 25.0):
    """(server, client) SSLStreams of a link over a socket pair.

    The link's TLS right on it ("tls"), inside a WebSocket ("ws"), or inside
    a WebSocket inside a TLS of its own ("wss", the outer TLS with fabric's
    certificates too: only its being TLS matters here).
    """
    server_side, client_side = socket_pair(buffer)
    if kind == "tls":
        return await tls_pair(contexts, (server_side, client_side))
    if kind == "wss":
        server_side, client_side = await tls_pair(contexts, (server_side, client_side))
    client_ws, server_ws = await websocket_pair((client_side, server_side), keepalive)
    return await tls_pair(contexts, (server_ws, client_ws))


class Framed(trio.abc.Stream):
    """A stream adapter that frames its bytes and shows its socket (for logs), as a WebSocket might."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.inner = stream
        self.socket = stream.socket

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_direct_tls_takes_over_tls_on_a_socket_or_in_a_websocket_on_one_and_nothing_else(contexts):
    assert take_over(trio.testing.memory_stream_pair()[0]) is None
    with trio.fail_after(5):
        memory = await tls_pair(contexts, trio.testing.memory_stream_pair())
        assert take_over(memory[0]) is None and take_over(memory[1]) is None
        framed = await tls_pair(contexts, tuple(map(Framed, socket_pair())))
        assert take_over(framed[0]) is None
        client_ws, server_ws = await websocket_pair(tuple(map(Framed, socket_pair())))
        framed_ws = await tls_pair(contexts, (server_ws, client_ws))
        assert take_over(framed_ws[0]) is None
        for kind in ("tls", "ws", "wss"):
            streams = await link_streams(contexts, kind)
            assert all(isinstance(take_over(stream), DirectTLS) for stream in streams), kind


@pytest.mark.parametrize("kind", ["tls", "ws", "wss"])
async def test_direct_tls_carries_bytes_both_ways_intact_through_small_socket_buffers(contexts, kind):
    """Each end: one task reading, another writing, on one TLS object; the sockets take a few KiB at a time."""
    size = 4 * 1024 * 1024
    with trio.fail_after(20):
        ends = [take_over(stream) for stream in await link_streams(contexts, kind, buffer=4096)]
        sent = [hashlib.sha256(), hashlib.sha256()]
        received = [hashlib.sha256(), hashlib.sha256()]

        async def write(i: int) -> None:
            left = size
            while left:
                chunk = os.urandom(min(left, 100_000 + i))  # records end in the middle of writes
                sent[i].update(chunk)
                ends[i].write_nowait(chunk)
                left -= len(chunk)
                await ends[i].flush()

        async def read(i: int) -> None:
            left = size
            while left:
                data = await ends[i].receive(256 * 1024)
                assert data, f"end {i} saw the stream end with {left} bytes missing"
                received[i].update(data)
                left -= len(data)

        async with trio.open_nursery() as nursery:
            for i in (0, 1):
                nursery.start_soon(write, i)
                nursery.start_soon(read, i)
    assert received[1].digest() == sent[0].digest() and received[0].digest() == sent[1].digest()


class End:
    """One end of a link's stream, as the link uses it: through DirectTLS, or through the SSLStream itself."""

    def __init__(self, stream: trio.SSLStream, direct: bool) -> None:
        self.stream = stream
        self.tls = take_over(stream) if direct else None
        assert direct == (self.tls is not None)

    async def send_all(self, data: bytes) -> None:
        if self.tls is None:
            await self.stream.send_all(data)
        else:
            self.tls.write_nowait(data)
            await self.tls.flush()

    async def receive_some(self, max_bytes: int) -> bytes:
        if self.tls is None:
            return await self.stream.receive_some(max_bytes)
        data = await self.tls.receive(max_bytes)
        if self.tls.pending:
            self.tls.write_nowait(b"")  # pongs: what the socket takes now; the sender's next flush does the rest
        return data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    up=st.lists(st.binary(min_size=1, max_size=300_000), max_size=6),
    down=st.lists(st.binary(min_size=1, max_size=300_000), max_size=6),
    max_bytes=st.integers(1, 300_000),
    direct=st.sampled_from([(True, True), (True, False), (False, True)]),
    keepalive=st.sampled_from([0.0, 25.0]),
    kind=st.sampled_from(["ws", "wss"]),
)
def test_bytes_cross_a_direct_websocket_link_intact_whatever_the_message_and_read_sizes(
    contexts, up, down, max_bytes, direct, keepalive, kind
) -> None:
    """Also against an end that is not direct; keepalive 0: a ping with every write, answered by the other end."""

    async def main() -> None:
        with trio.fail_after(20):
            streams = await link_streams(contexts, kind, keepalive=keepalive)
            server, client = End(streams[0], direct[0]), End(streams[1], direct[1])
            assert await exchange(client, server, up, down, max_bytes) == (b"".join(up), b"".join(down))

    trio.run(main)


@pytest.mark.parametrize("kind", ["tls", "ws", "wss"])
async def test_bytes_received_before_the_take_over_and_not_read_yet_come_first(contexts, kind):
    """Whatever each layer under the SSLStream had buffered: the WebSocket's payloads, the outer TLS's records."""
    data = os.urandom(3 * 1024 * 1024)
    with trio.fail_after(10):
        server, client = await link_streams(contexts, kind)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, data)
            received = bytearray(await server.receive_some(1000))  # a little through trio's streams
            direct = take_over(server)
            assert direct is not None
            while len(received) < len(data):
                received += await direct.receive(256 * 1024)
    assert received == data


async def websocket_link(contexts) -> tuple[DirectTLS, trio.SSLStream]:
    """The server end of a ws link, taken over, and the client's SSLStream."""
    server, client = await link_streams(contexts, "ws")
    return take_over(server), client


async def test_a_ping_is_answered_with_a_pong_the_next_write_sends(contexts):
    with trio.fail_after(5):
        server, client = await websocket_link(contexts)
        raw = client.transport_stream.transport
        await raw.send_all(Frame(Opcode.PING, b"are you there").serialize(mask=True))
        await client.send_all(b"hello")
        assert await server.receive(100) == b"hello"
        assert server.pending == 15  # the pong, waiting for the writer
        server.write_nowait(b"")
        assert server.pending == 0
        assert await raw.receive_some(100) == b"\x8a\x0dare you there"  # FIN, PONG, no mask, 13 bytes: the ping's


async def test_a_message_in_fragments_with_a_ping_among_them_comes_through(contexts):
    """As a proxy between the sites may send it (RFC 6455 lets it fragment, and pings may come between fragments)."""
    with trio.fail_after(5):
        server, client = await websocket_link(contexts)
        client._ssl_object.write(b"hello, fragments")  # the client's TLS record, by hand (trio's SSLStream keeps them there)
        record = client._outgoing.read()
        frames = [
            Frame(Opcode.BINARY, record[:10], fin=False),
            Frame(Opcode.CONT, record[10:20], fin=False),
            Frame(Opcode.PING, b"!"),
            Frame(Opcode.CONT, record[20:], fin=True),
        ]
        await client.transport_stream.transport.send_all(b"".join(frame.serialize(mask=True) for frame in frames))
        assert await server.receive(100) == b"hello, fragments"
        assert server.pending == 3  # the pong


async def test_the_websocket_keepalive_ping_goes_out_with_the_data(contexts):
    with trio.fail_after(5):
        server, client = await link_streams(contexts, "ws", keepalive=0.0)  # a ping before every message
        direct = take_over(client)
        direct.write_nowait(b"hello")
        raw = server.transport_stream.transport
        received = await raw.receive_some(1000)
        assert received.startswith(b"\x89\x80") and received[6] == 0x82  # a masked, empty PING; then the data


async def test_a_close_frame_after_the_peers_close_notify_is_the_end_of_the_stream(contexts):
    with trio.fail_after(5):
        server, client = await websocket_link(contexts)
        await client.send_all(b"bye")
        await client.aclose()  # TLS close_notify, then the WebSocket's close frame, then the socket closes
        assert await server.receive(100) == b"bye"
        assert await server.receive(100) == b""


async def test_a_close_frame_without_the_peers_close_notify_breaks_the_stream(contexts):
    with trio.fail_after(5):
        server, client = await websocket_link(contexts)
        await client.transport_stream.aclose()  # the close frame only: the link's TLS was cut short
        with pytest.raises(trio.BrokenResourceError, match="TLS error"):
            await server.receive(100)


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("close", "TLS error"),  # a close frame, close_notify of the WebSocket's TLS: the link's TLS was cut short
        ("cut", "TLS error"),  # the socket closed under the WebSocket's TLS
        ("close_notify", "WebSocket protocol error: unexpected end of stream"),  # the WebSocket's TLS, no close frame
    ],
)
async def test_the_end_of_a_wss_connection_breaks_a_direct_dialler_saying_which_layer(contexts, how, why):
    with trio.fail_after(5):
        server, client = await link_streams(contexts, "wss")
        dialler = take_over(client)
        server_ws = server.transport_stream
        if how == "close":
            await server_ws.aclose()
        elif how == "cut":
            await server_ws.transport.transport_stream.aclose()
        else:
            await server_ws.transport.aclose()
        with pytest.raises(trio.BrokenResourceError, match=why):
            await dialler.receive(100)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"\x82\x05hello", "WebSocket protocol error: incorrect masking"),  # a client must mask
        (Frame(Opcode.TEXT, b"hi").serialize(mask=True), "the peer sent WebSocket text; a link carries binary messages only"),
        (b"\x8f\x80\x00\x00\x00\x00", "WebSocket protocol error: invalid opcode"),
    ],
)
async def test_a_bad_frame_ends_the_link_saying_what_was_wrong(contexts, frame, why):
    with trio.fail_after(5):
        server, client = await link_streams(contexts, "ws")
        link = Link(server, FrameDecoder(), local=HELLO, peer=HELLO, dialer=False, handler=None, cost=1, settings=SETTINGS)
        assert link.direct  # the direct path, not trio's streams
        await client.transport_stream.transport.send_all(frame)
        assert await link.run() == f"connection lost: {why}"


async def test_a_peer_that_pings_but_never_reads_ends_the_link_before_its_pongs_pile_up(contexts):
    """The pongs count against the link's allowance for control frames, checked as they are queued."""
    with trio.fail_after(10):
        server, client = await link_streams(contexts, "ws", buffer=4096)
        link = Link(server, FrameDecoder(), local=HELLO, peer=HELLO, dialer=False, handler=None, cost=1, settings=SETTINGS)
        raw = client.transport_stream.transport
        pings = Frame(Opcode.PING, b"x" * 125).serialize(mask=True) * 1000

        async def flood() -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # until the link closes the connection
                while True:
                    await raw.send_all(pings)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            reason = await link.run()
            nursery.cancel_scope.cancel()
    queued = int(reason.removeprefix("connection lost: peer is not reading: ").removesuffix(" bytes are queued for it"))
    limit = SETTINGS.link_write_buffer + CONTROL_ALLOWANCE
    assert limit < queued <= limit + RECEIVE_SIZE  # at most one socket read's pongs past it (not a keepalive interval's)


def unread(stream: trio.SocketStream) -> int:
    """Bytes that have reached `stream`'s socket and wait there to be read."""
    return struct.unpack("i", fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def test_a_long_burst_of_frames_reaches_the_peer_while_it_is_still_being_made(contexts):
    """One task queues frames without a pause (a site answering many flows at once): they are
    written in COALESCE_WINDOW-sized groups as they come, not all once the task yields, so the
    peer works on a burst's start while this site makes the rest. In order and intact."""
    count = 50
    with trio.fail_after(10):
        server, client = await link_streams(contexts, "tls")
        link = Link(server, FrameDecoder(), local=HELLO, peer=HELLO, dialer=False, handler=None, cost=1, settings=SETTINGS)
        for i in range(count):
            link.send_gossip(encode_u64(i))
            pause = time.perf_counter() + COALESCE_WINDOW / 4  # work between two frames, without a checkpoint
            while time.perf_counter() < pause:
                pass
        during = unread(client.transport_stream)  # before this task lets the link's writer run
        received: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            await trio.sleep(0.1)
            everything = unread(client.transport_stream)
            decoder = FrameDecoder()
            while len(received) < count:
                decoder.receive_data(await client.receive_some())
                received += [decode_u64_untrusted(f.payload) for f in decoder if f.type is FrameType.GOSSIP]
            nursery.cancel_scope.cancel()
    assert received[:count] == list(range(count))
    assert during > everything / 2, (during, everything)  # all but the last window's frames; at once: the first alone


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_malformed_websocket_frames_break_a_direct_link_and_nothing_else(contexts, garbage: bytes) -> None:
    async def main() -> None:
        with trio.fail_after(5):
            server, client = await websocket_link(contexts)
            raw = client.transport_stream.transport
            await raw.send_all(garbage)  # raw bytes, not frames
            await raw.aclose()
            with pytest.raises(trio.BrokenResourceError):
                await server.receive(100)  # garbage never decrypts into link bytes, nor into TLS's close_notify

    trio.run(main)
