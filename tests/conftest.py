"""Fixtures shared by the tests: target servers, and sites linked as a pair or a chain.

Everything runs in this process, on 127.0.0.1 with port 0. Sites live in
`tmp_path`. Fixtures that open sites do it inside their own task (pytest-trio
runs each fixture's setup and teardown in one task), so a test gets running,
linked sites and never has to close them.

The hash exchange, spoken by `HashServer` and its `exchange` client, moves
random bytes both ways at once and checks them at both ends:

    client -> server:  header (upload size u64, download size u64),
                       the upload, SHA-256 of the upload, EOF
    server -> client:  the download, SHA-256 of the download,
                       then (once the whole upload and EOF are in)
                       the SHA-256 of what it received, EOF

The server checks the upload against the client's digest; the client checks
the download against the server's digest and the server's digest of the
upload against its own. Nothing may follow the last digest either way.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import fabric
from fabric.testing import CHUNK, abort, concurrently, connect, echo, echo_round_trip, send_random, serve

SETUP_DEADLINE = 20  # seconds to open sites, link them and see routes; ~0.1 s on loopback
HEADER = struct.Struct("!QQ")  # hash exchange: upload size, download size
DIGEST = hashlib.sha256().digest_size

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# -- byte streams -------------------------------------------------------------------


class Reader:
    """Exact-size reads over a stream; a stream that ends early raises EOFError."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(CHUNK)
        if not data:
            raise EOFError("the stream ended early")
        self._buffer += data

    async def receive_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def receive_hashed(self, size: int, digest: hashlib._Hash) -> None:
        """Read `size` bytes into `digest`, without keeping them."""
        left = size
        while left:
            if not self._buffer:
                await self._fill()
            take = min(left, len(self._buffer))
            digest.update(memoryview(self._buffer)[:take])
            del self._buffer[:take]
            left -= take

    async def receive_eof(self) -> None:
        """The stream must end here: no byte more."""
        extra = len(self._buffer) or len(await self.stream.receive_some(CHUNK))
        if extra:
            raise AssertionError(f"{extra} unexpected byte(s) after the end of the exchange")


def closed_port() -> int:
    """A port nothing listens on: bound, then released (the kernel does not hand it out again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def read_until_end(stream: trio.abc.ReceiveStream) -> tuple[int, BaseException | None]:
    """Read until EOF or a failure: (bytes read, the failure or None for a clean EOF)."""
    total = 0
    try:
        while data := await stream.receive_some(CHUNK):
            total += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return total, exc
    return total, None


def is_reset(error: BaseException | None) -> bool:
    """True for a connection reset (an RST from the other side)."""
    return isinstance(error, trio.BrokenResourceError) and isinstance(error.__cause__, ConnectionResetError)


class Tcp:
    """The client-side helpers above, for tests (which get them as the `tcp` fixture)."""

    connect = staticmethod(connect)
    abort = staticmethod(abort)
    closed_port = staticmethod(closed_port)
    concurrently = staticmethod(concurrently)
    read_until_end = staticmethod(read_until_end)
    is_reset = staticmethod(is_reset)
    echo_round_trip = staticmethod(echo_round_trip)


@pytest.fixture
def tcp() -> type[Tcp]:
    return Tcp


# -- servers ----------------------------------------------------------------------------


@pytest.fixture
def start_server(nursery: trio.Nursery) -> Callable[[Handler], Awaitable[int]]:
    """`port = await start_server(handler)`: a TCP server on 127.0.0.1, alive for the test."""

    async def start(handler: Handler) -> int:
        return await serve(nursery, handler)

    return start


@pytest.fixture
async def echo_server(start_server) -> int:
    """Port of an echo server."""
    return await start_server(echo)


@attrs.define
class CountingEcho:
    """An echo server that counts the connections it was given: which provider served how many."""

    port: int = 0
    connections: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        await echo(stream)


@pytest.fixture
def counting_echo(start_server) -> Callable[[], Awaitable[CountingEcho]]:
    """`server = await counting_echo()`: a new counting echo server, alive for the test."""

    async def start() -> CountingEcho:
        server = CountingEcho()
        server.port = await start_server(server.handle)
        return server

    return start


@attrs.define
class Exchange:
    upload: int
    download: int
    seconds: float


@attrs.define
class HashServer:
    """The server end of the hash exchange (see the module docstring), and its client."""

    port: int = 0
    verified: int = 0  # uploads received whole and matching the client's digest
    bytes_sent: int = 0  # download bytes written to clients, all connections together
    failures: list[str] = attrs.Factory(list)  # exchanges that broke or did not match, as lines

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc.__cause__ or exc}")

    async def _serve(self, stream: trio.SocketStream) -> None:
        reader = Reader(stream)
        upload, download = HEADER.unpack(await reader.receive_exactly(HEADER.size))
        received = hashlib.sha256()

        async def push() -> None:
            sent = hashlib.sha256()
            rng = random.Random()
            left = download
            while left:
                chunk = rng.randbytes(min(left, CHUNK))
                sent.update(chunk)
                await stream.send_all(chunk)
                self.bytes_sent += len(chunk)
                left -= len(chunk)
            await stream.send_all(sent.digest())

        async def pull() -> None:
            nonlocal claimed
            await reader.receive_hashed(upload, received)
            claimed = await reader.receive_exactly(DIGEST)
            await reader.receive_eof()

        claimed = b""
        await concurrently(push, pull)
        if claimed != received.digest():
            raise AssertionError(f"upload of {upload} bytes arrived changed")
        self.verified += 1
        await stream.send_all(received.digest())

    async def exchange(self, port: int, *, upload: int, download: int) -> Exchange:
        """Run one exchange through `port` (a listener); AssertionError/EOFError if bytes differ or stop."""
        started = time.perf_counter()
        stream = await connect(port)
        async with stream:
            reader = Reader(stream)
            sent, received = hashlib.sha256(), hashlib.sha256()

            async def send() -> None:
                await stream.send_all(HEADER.pack(upload, download))
                await send_random(stream, upload, sent, random.Random())
                await stream.send_all(sent.digest())
                await stream.send_eof()

            async def receive() -> None:
                nonlocal download_digest, upload_digest
                await reader.receive_hashed(download, received)
                download_digest = await reader.receive_exactly(DIGEST)
                upload_digest = await reader.receive_exactly(DIGEST)
                await reader.receive_eof()

            download_digest = upload_digest = b""
            await concurrently(send, receive)
        assert download_digest == received.digest(), f"download of {download} bytes arrived changed"
        assert upload_digest == sent.digest(), f"upload of {upload} bytes arrived changed"
        return Exchange(upload, download, time.perf_counter() - started)


@pytest.fixture
async def hash_server(start_server) -> HashServer:
    server = HashServer()
    server.port = await start_server(server.handle)
    return server


@attrs.define
class LinkProxy:
    """A TCP relay to a link port, whose open connections can be made silent or slow.

    `cut()` stops carrying bytes on every connection open now, both ways,
    and holds them open: to both sites the peer just stops answering, as
    when a cable is pulled. Connections made afterwards are carried as usual.

    `delay` (seconds, each way) holds every chunk that long before passing it
    on, give or take up to `jitter` seconds, in order: a long or a wobbly
    path. Both may change at any time.
    """

    target: int
    port: int = 0
    delay: float = 0.0
    jitter: float = 0.0
    _carrying: list[trio.CancelScope] = attrs.Factory(list)

    async def handle(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await connect(self.target)
        except OSError:
            return  # the site is down: the dialler sees its connection closed, as it would without us
        async with upstream:
            with trio.CancelScope() as carrying:
                self._carrying.append(carrying)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, downstream, upstream)
                    nursery.start_soon(self._pump, upstream, downstream)
            if carrying.cancelled_caught:
                await trio.sleep_forever()  # cut: hold both connections, carry nothing, until the test ends

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        # Chunks wait in a bounded queue until due; the reader stalls when it is full.
        send, receive = trio.open_memory_channel[tuple[float, bytes]](64)

        async def read() -> None:
            due = 0.0
            async with send:
                while data := await source.receive_some(CHUNK):
                    wobble = random.uniform(-self.jitter, self.jitter)
                    due = max(due, trio.current_time() + max(0.0, self.delay + wobble))  # never reorder
                    await send.send((due, data))

        async def write() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await sink.send_all(data)
            await sink.send_eof()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(sink)

    def cut(self) -> None:
        for scope in self._carrying:
            scope.cancel()
        self._carrying.clear()


@pytest.fixture
def link_proxy(start_server) -> Callable[[int], Awaitable[LinkProxy]]:
    """`proxy = await link_proxy(link_port)`: a cuttable relay to a site's link port, alive for the test."""

    async def start(target: int) -> LinkProxy:
        proxy = LinkProxy(target)
        proxy.port = await start_server(proxy.handle)
        return proxy

    return start


# -- sites ----------------------------------------------------------------------------------


async def expose(provider: fabric.Site, consumer: fabric.Site, key: str, target_port: int) -> int:
    """A connector for `key` at `provider`, a listener at `consumer`; returns the listener's port."""
    await provider.create_connector(key, target_port, host="127.0.0.1")
    listener = await consumer.create_listener(key, 0)
    with trio.fail_after(SETUP_DEADLINE):
        await consumer.wait_reachable(key)
    return listener.port


@attrs.define
class Network:
    """Opens sites under one directory and links them."""

    root: Path

    @asynccontextmanager
    async def site(self, name: str, **options) -> AsyncIterator[fabric.Site]:
        """`fabric.open_site` with the site directory under the test's tmp_path."""
        async with fabric.open_site(name, self.root / name, **options) as site:
            yield site

    async def link(self, dialer: fabric.Site, acceptor: fabric.Site, *, cost: int = 1, **token_options) -> None:
        """`dialer` redeems a token of `acceptor` and waits until the link is up both ways.

        `token_options` go to `issue_token` (say `link_urls=[...]`).
        """
        with trio.fail_after(SETUP_DEADLINE):
            token = await acceptor.issue_token(redemptions_allowed=1, expiration_window=60, **token_options)
            await dialer.redeem_token(token, cost=cost)
            await dialer.wait_linked(acceptor.site_id)
            await acceptor.wait_linked(dialer.site_id)

    expose = staticmethod(expose)


@pytest.fixture
def network(tmp_path: Path) -> Network:
    return Network(tmp_path)


@attrs.frozen
class Pair:
    hub: fabric.Site  # accepts the link
    edge: fabric.Site  # redeemed the hub's token

    async def expose(self, key: str, target_port: int) -> int:
        """Service at the hub, listener at the edge; returns the listener's port."""
        return await expose(self.hub, self.edge, key, target_port)


@attrs.frozen
class Chain:
    a: fabric.Site
    b: fabric.Site  # accepts links from both a and c
    c: fabric.Site

    async def expose(self, key: str, target_port: int) -> int:
        """Service at C, listener at A: flows go through B. Returns the listener's port."""
        return await expose(self.c, self.a, key, target_port)


@pytest.fixture
async def two_sites(network: Network) -> AsyncIterator[Pair]:
    async with network.site("hub", link_port=0) as hub, network.site("edge") as edge:
        await network.link(edge, hub)
        yield Pair(hub, edge)


@pytest.fixture
async def chain(network: Network) -> AsyncIterator[Chain]:
    """A - B - C: A and C redeem tokens of B; A and C are not linked to each other."""
    async with network.site("a") as a, network.site("b", link_port=0) as b, network.site("c") as c:
        await network.link(a, b)
        await network.link(c, b)
        yield Chain(a, b, c)


@pytest.fixture
async def ws_chain(network: Network) -> AsyncIterator[Chain]:
    """A - B - C with both links WebSockets into B's ws port (B has no TLS link port at all)."""
    async with network.site("a") as a, network.site("b", ws_port=0) as b, network.site("c") as c:
        ws_url = b.status().ws_address
        await network.link(a, b, link_urls=[ws_url])
        await network.link(c, b, link_urls=[ws_url])
        yield Chain(a, b, c)
