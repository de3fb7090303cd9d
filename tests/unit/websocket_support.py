"""A WebSocket handshaken over a pair of streams, and bytes sent both ways through a pair of ends:
for the unit tests of transports.py and tls_io.py."""

from __future__ import annotations

import trio

from fabric.addresses import parse_address
from fabric.router.transports import WebSocketStream


async def websocket_pair(
    transports: tuple[trio.abc.Stream, trio.abc.Stream], keepalive: float = 25.0
) -> tuple[WebSocketStream, WebSocketStream]:
    """(client, server): a WebSocket handshaken over `transports` (client's, server's)."""
    results: dict[str, WebSocketStream] = {}

    async def server() -> None:
        results["server"] = await WebSocketStream.accept(transports[1], path="/fabric", keepalive=keepalive, peer="test")

    async def client() -> None:
        results["client"] = await WebSocketStream.connect(
            transports[0], parse_address("ws://hub:80/fabric"), keepalive=keepalive
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        nursery.start_soon(client)
    return results["client"], results["server"]


async def exchange(client, server, up: list[bytes], down: list[bytes], max_bytes: int) -> tuple[bytes, bytes]:
    """Send `up` from client to server and `down` back at once; (what the server got, what the client got).

    Each end needs `send_all(data)` and `receive_some(max_bytes)`, as a `trio.abc.Stream` has.
    """
    results: dict[str, bytes] = {}

    async def send(end, chunks: list[bytes]) -> None:
        for chunk in chunks:
            await end.send_all(chunk)

    async def receive(end, size: int, name: str) -> None:
        received = bytearray()
        while len(received) < size:
            data = await end.receive_some(max_bytes)
            assert data, "EOF before all the bytes came"
            received += data
        results[name] = bytes(received)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, client, up)
        nursery.start_soon(send, server, down)
        nursery.start_soon(receive, server, sum(map(len, up)), "up")
        nursery.start_soon(receive, client, sum(map(len, down)), "down")
    return results["up"], results["down"]
