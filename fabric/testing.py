"""Traffic for trying a network out: an echo server and clients that check what comes back.

Used by `fabric demo`, the tests and the tools (soak, chaos). Everything is on
127.0.0.1; servers run in a nursery the caller owns.
"""

from __future__ import annotations

import functools
import hashlib
import random
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from .errors import sole_exception

CHUNK = 64 * 1024  # bytes per read and per write of these clients and servers
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler, *, host: str = "127.0.0.1") -> int:
    """A TCP server for `handler` on `host`, port 0, alive as long as `nursery`; its port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
    return listeners[0].socket.getsockname()[1]


async def echo(stream: trio.SocketStream) -> None:
    """Send back what arrives; pass EOF on; a reset just ends it."""
    async with stream:
        try:
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


def abort(stream: trio.SocketStream) -> None:
    """Close with an RST, as the kernel does for a process that crashed with unread data (once)."""
    if stream.socket.fileno() == -1:
        return
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    stream.socket.close()


async def concurrently(*tasks: Callable[[], Awaitable[None]]) -> None:
    """Run the tasks at once. A single failure is raised as itself, not inside an exception group."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        failure = sole_exception(group, ignore=trio.Cancelled)
        if failure is not None:
            raise failure from failure.__cause__  # as itself, with its cause (e.g. ConnectionResetError)
        raise


async def send_random(stream: trio.abc.SendStream, size: int, digest: hashlib._Hash, rng: random.Random) -> None:
    """Send `size` random bytes in chunks, adding them to `digest`."""
    left = size
    while left:
        chunk = rng.randbytes(min(left, CHUNK))
        digest.update(chunk)
        await stream.send_all(chunk)
        left -= len(chunk)


async def echo_round_trip(stream: trio.SocketStream, size: int, rng: random.Random | None = None) -> None:
    """Send `size` random bytes to an echo and read the same bytes back, writing and reading at once.

    EOFError if the echo ends early, AssertionError if the bytes come back changed.
    """
    data = (rng or random).randbytes(size)
    back = bytearray()

    async def send() -> None:
        await stream.send_all(data)

    async def receive() -> None:
        while len(back) < size:
            chunk = await stream.receive_some(CHUNK)
            if not chunk:
                raise EOFError(f"echo ended after {len(back)} of {size} bytes")
            back.extend(chunk)

    await concurrently(send, receive)
    if bytes(back) != data:
        raise AssertionError(f"echo of {size} bytes came back changed")


async def echo_exchange(port: int, payload: bytes) -> bool:
    """Send `payload` to an echo through `port`, half-close, read it all back; True when it came back intact."""
    received = hashlib.sha256()
    async with await connect(port) as stream:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async def receive() -> None:
            while data := await stream.receive_some(CHUNK):
                received.update(data)

        await concurrently(send, receive)
    return received.digest() == hashlib.sha256(payload).digest()


async def round_trips(port: int, count: int) -> list[float]:
    """Seconds (trio's clock) each of `count` small messages takes to an echo through `port` and back."""
    times = []
    async with await connect(port) as stream:
        for i in range(count):
            message = b"ping %d\n" % i
            start = trio.current_time()
            await stream.send_all(message)
            got = b""
            while len(got) < len(message):
                data = await stream.receive_some(CHUNK)
                if not data:
                    raise EOFError(f"echo ended after {len(got)} of {len(message)} bytes")
                got += data
            times.append(trio.current_time() - start)
    return times
