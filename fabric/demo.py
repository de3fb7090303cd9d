"""`fabric demo`: three sites in this process, and checked traffic through them.

    edge  --WebSocket link-->  transit  --TLS link-->  hub
    client                                             echo service

The sites live in a temporary directory; traffic is fabric.testing's echo
exchanges (SHA-256 checked) and round trips.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import click
import trio

from .site import Site, open_site
from .testing import echo, echo_exchange, serve
from .testing import round_trips as round_trips_of

DEMO_KEY = "echo"
SETUP_DEADLINE = 60  # seconds to open, link and expose the three sites (well under one on loopback)


def say(text: str = "") -> None:
    click.echo(text)


def _show_routes(site: Site) -> None:
    for info in site.status().sites:
        hops = ", ".join(h.name for h in info.next_hops) or "-"
        state = f"cost {info.cost:g} via {hops}" if info.reachable else "unreachable"
        say(f"    {site.name} -> {info.name} ({info.mode}): {state}")


async def run(connections: int, size: int, round_trips: int) -> bool:
    """The demo: set up, send, print what it measured; True when every byte arrived intact."""
    say("fabric demo: three sites in one process, linked by mutual TLS on 127.0.0.1\n")
    say("    edge (edge) --WebSocket link--> transit (interior) --TLS link--> hub (interior)")
    say("    client                                                           echo service\n")
    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as root:
        async with trio.open_nursery() as nursery:
            echo_port = await serve(nursery, echo)
            with trio.fail_after(SETUP_DEADLINE):
                async with (
                    # One host for three sites: service sync would have each of them listen on
                    # the echo server's own port; the edge's listener is made explicitly instead.
                    open_site("hub", os.path.join(root, "hub"), link_port=0, service_sync=False) as hub,
                    open_site(
                        "transit", os.path.join(root, "transit"), link_port=0, ws_port=0, service_sync=False
                    ) as transit,
                    open_site("edge", os.path.join(root, "edge"), mode="edge", service_sync=False) as edge,
                ):
                    say(f"[1/4] sites created: hub {hub.site_id[:8]}, transit {transit.site_id[:8]}, edge {edge.site_id[:8]}")
                    await transit.redeem_token(await hub.issue_token())
                    ws_url = transit.status().ws_address
                    assert ws_url is not None  # transit runs with a ws port
                    await edge.redeem_token(await transit.issue_token(link_urls=[ws_url]))
                    say(
                        "[2/4] linked: transit redeemed a token of hub (TLS), "
                        f"edge redeemed a token of transit naming {ws_url} (TLS inside a WebSocket)"
                    )
                    await hub.create_connector(DEMO_KEY, echo_port, host="127.0.0.1")
                    listener = await edge.create_listener(DEMO_KEY, 0)
                    port = listener.port
                    assert port is not None  # bound: the edge runs
                    await edge.wait_reachable(DEMO_KEY)
                    say(
                        f"[3/4] hub offers routing key {DEMO_KEY!r} (echo server on 127.0.0.1:{echo_port}); "
                        f"edge listens on 127.0.0.1:{port}"
                    )
                    _show_routes(edge)
                    say(f"[4/4] sending {connections} connections x {size:,} bytes each way, then {round_trips} round trips")
                    results: list[bool] = []
                    start = trio.current_time()
                    async with trio.open_nursery() as clients:
                        for _ in range(connections):

                            async def one() -> None:
                                results.append(await echo_exchange(port, os.urandom(size)))

                            clients.start_soon(one)
                    elapsed = trio.current_time() - start
                    times = sorted(await round_trips_of(port, round_trips))
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
