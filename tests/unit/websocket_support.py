"""A WebSocket handshaken over a pair of streams, for the unit tests of transports.py and tls_io.py."""

from __future__ import annotations

import trio

from fabric.router.transports import WebSocketStream, parse_address


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
