"""The `fabric` command-line tool."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import statistics
import sys
import tempfile

import click
import trio

from . import __version__
from .errors import FabricError
from .site import Site, open_site

DEMO_KEY = "echo"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fabric: reach services in other places as if they were local.

    Sites link to each other over mutual TLS; a listener at one site carries
    each client connection, hop by hop, to a connector at the site that
    serves it. Start with `fabric demo`.
    """


@main.command()
def version() -> None:
    """Print fabric's version and the versions it runs on."""
    import ssl

    click.echo(f"fabric {__version__}")
    click.echo(f"python {sys.version.split()[0]}, trio {trio.__version__}, {ssl.OPENSSL_VERSION}")


@main.command()
@click.option("--connections", default=20, show_default=True, help="Concurrent client connections to send.")
@click.option("--size", default=1024 * 1024, show_default=True, help="Bytes each connection sends and gets back.")
@click.option("--round-trips", default=200, show_default=True, help="Small request/reply exchanges timed for latency.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the sites do (links, routes, flows).")
def demo(connections: int, size: int, round_trips: int, verbose: bool) -> None:
    """Run a three-site network in this process and send traffic through it.

    \b
      edge  --link-->  transit  --link-->  hub
      client                               echo service

    The edge site reaches the hub's echo service through the transit site
    (edge and hub are not linked). Every byte is SHA-256 checked; the demo
    prints what it measured and exits 0 when everything arrived intact.
    Nothing is left behind: the sites live in a temporary directory.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="  [%(name)s] %(message)s")
    try:
        ok = trio.run(_demo, connections, size, round_trips)
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def _exchange(port: int, payload: bytes) -> bool:
    """Send payload, half-close, read the echo; True when it came back intact."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = hashlib.sha256()
    async with stream:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            while data := await stream.receive_some(65536):
                received.update(data)
    return received.digest() == hashlib.sha256(payload).digest()


async def _round_trips(port: int, count: int) -> list[float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    times = []
    async with stream:
        for i in range(count):
            message = b"ping %d\n" % i
            start = trio.current_time()
            await stream.send_all(message)
            got = b""
            while len(got) < len(message):
                got += await stream.receive_some(65536)
            times.append(trio.current_time() - start)
    return times


def _show_routes(site: Site) -> None:
    for info in site.status().sites:
        hops = ", ".join(info.next_hops) or "-"
        state = f"cost {info.cost:g} via {hops}" if info.reachable else "unreachable"
        click.echo(f"    {site.name} -> {info.name} ({info.mode}): {state}")


async def _demo(connections: int, size: int, round_trips: int) -> bool:
    say = click.echo
    say("fabric demo: three sites in one process, linked by mutual TLS on 127.0.0.1\n")
    say("    edge (edge) --link--> transit (interior) --link--> hub (interior)")
    say("    client                                             echo service\n")
    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as root:
        async with trio.open_nursery() as nursery:
            servers = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
            echo_port = servers[0].socket.getsockname()[1]
            with trio.fail_after(60):
                async with (
                    open_site("hub", os.path.join(root, "hub"), link_port=0) as hub,
                    open_site("transit", os.path.join(root, "transit"), link_port=0) as transit,
                    open_site("edge", os.path.join(root, "edge"), mode="edge") as edge,
                ):
                    say(f"[1/4] sites created: hub {hub.site_id[:8]}, transit {transit.site_id[:8]}, edge {edge.site_id[:8]}")
                    await transit.redeem_token(await hub.issue_token())
                    await edge.redeem_token(await transit.issue_token())
                    say("[2/4] linked: transit redeemed a token of hub, edge redeemed a token of transit")
                    await hub.create_connector(DEMO_KEY, echo_port, host="127.0.0.1")
                    listener = await edge.create_listener(DEMO_KEY, 0)
                    await edge.wait_reachable(DEMO_KEY)
                    say(
                        f"[3/4] hub offers routing key {DEMO_KEY!r} (echo server on 127.0.0.1:{echo_port}); "
                        f"edge listens on 127.0.0.1:{listener.port}"
                    )
                    _show_routes(edge)
                    say(f"[4/4] sending {connections} connections x {size:,} bytes each way, then {round_trips} round trips")
                    results: list[bool] = []
                    start = trio.current_time()
                    async with trio.open_nursery() as clients:
                        for _ in range(connections):

                            async def one() -> None:
                                results.append(await _exchange(listener.port, os.urandom(size)))

                            clients.start_soon(one)
                    elapsed = trio.current_time() - start
                    times = sorted(await _round_trips(listener.port, round_trips))
            nursery.cancel_scope.cancel()
    intact = sum(results)
    moved = 2 * connections * size
    say("\nresults:")
    say(f"    bytes intact:  {intact}/{connections} connections (SHA-256 of every byte, both ways)")
    say(f"    throughput:    {moved / elapsed / 2**20:,.1f} MiB/s through two links ({moved:,} bytes in {elapsed:.2f} s)")
    if times:
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        say(f"    round trip:    median {statistics.median(times) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    ok = intact == connections
    say("\n" + ("demo passed: every byte arrived intact." if ok else "demo FAILED: some connections lost data."))
    return ok


if __name__ == "__main__":
    main()
