"""A linked site that mints thousands of sites: every other site still joins, and its services still work.

The attacker redeems a token of the hub as a site does, then speaks raw
frames on its link (as in test_hostile.py): HELLO, then GOSSIP frames
pushing records it signed with key pairs it made itself, one per fake site.
Each fake links to its parent in a tree under the attacker, and the
attacker's record links back, so every fake is present: more than a table
holds. A real site that links to the hub afterwards must be reachable from
a site beyond the hub, through a listener, in the usual convergence time,
while the attacker stays linked and floods again.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from pathlib import Path

import pytest
import trio
from test_hostile import RawLink, new_identity, redeem_raw

from fabric import pki
from fabric.addresses import Address
from fabric.gossip.engine import MAX_SITES, Push
from fabric.gossip.engine import encode_message as encode_gossip
from fabric.gossip.records import LinkInfo, SiteRecord, sign_record
from fabric.router.frames import FrameType
from tools.bench.gossip_sim import make_identity

FAKES = 4100  # more sites than a table holds (MAX_SITES, its neighbours aside)
FANOUT = 64  # fakes under each: 64 under the attacker, 64 under each of those
PER_PUSH = 500  # records per GOSSIP frame: well under a frame, whatever their links
CONVERGED = 5.0  # seconds a new site may take to be reachable across the hub; pushes take milliseconds
DEADLINE = 120  # seconds for the whole attack: minting, two floods, a join (generous: shared CPUs)


def mint(attacker: pki.Identity, hub: str, count: int) -> list[SiteRecord]:
    """The attacker's record linking to the hub and the first fakes, then one record per fake."""
    rng = random.Random(19)
    fakes = [make_identity(f"fake-{i}", rng) for i in range(count)]
    nodes = [attacker, *fakes]
    links: dict[str, list[str]] = {node.site_id: [] for node in nodes}
    links[attacker.site_id].append(hub)
    for index in range(1, len(nodes)):
        above = nodes[(index - 1) // FANOUT].site_id
        links[above].append(nodes[index].site_id)
        links[nodes[index].site_id].append(above)
    return [
        sign_record(
            SiteRecord(
                site_id=node.site_id,
                name=node.name,
                incarnation=1,
                version=1,
                mode="interior",
                links=tuple(LinkInfo(peer, 1) for peer in sorted(links[node.site_id])),
            ),
            node,
        )
        for node in nodes
    ]


async def flood(raw: RawLink, records: list[SiteRecord]) -> None:
    for start in range(0, len(records), PER_PUSH):
        await raw.send_frame(FrameType.GOSSIP, 0, encode_gossip(Push(tuple(records[start : start + PER_PUSH]))))


async def held(site, count: int) -> None:
    """Wait until `site` holds records of `count` other sites (its router hears of every change to them)."""
    while len(site.status().sites) < count:
        await site.router.wait_changed()


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.INFO, logger="fabric")
    return caplog


async def test_a_site_minting_thousands_of_sites_cannot_keep_a_new_site_out(
    network, echo_server, tcp, tmp_path: Path, caplog
) -> None:
    with trio.fail_after(DEADLINE):
        identity = await new_identity(tmp_path, "minter")
        async with (
            network.site("hub", link_port=0, service_sync=False) as hub,
            network.site("client", service_host="127.0.0.2") as client,
        ):
            await network.link(client, hub)
            started = time.perf_counter()
            records = await trio.to_thread.run_sync(mint, identity, hub.site_id, FAKES)
            minted = time.perf_counter() - started

            creds = await redeem_raw(hub, identity, tmp_path)
            raw = await RawLink.open(Address("tls", "127.0.0.1", hub.link_port), creds)
            assert isinstance(raw, RawLink), raw
            await hub.wait_linked(creds.site_id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.serve)  # answers the hub's PINGs: the link stays up
                started = time.perf_counter()
                await flood(raw, records)
                # Full: the client holds as many fakes as it can, besides the hub and itself.
                await held(client, MAX_SITES)
                filled = time.perf_counter() - started

                # A real site with a service links to the hub; the client gets a listener for it.
                async with network.site("late") as late:
                    await late.create_connector("echo", echo_server, host="127.0.0.1")
                    started = trio.current_time()
                    with trio.fail_after(CONVERGED):
                        await network.link(late, hub)
                        await client.wait_listening("echo")
                    joined = trio.current_time() - started

                    async def echo() -> None:
                        stream = await trio.open_tcp_stream("127.0.0.2", echo_server)
                        async with stream:
                            await tcp.echo_round_trip(stream, 200_000)

                    await tcp.concurrently(functools.partial(flood, raw, records[::-1]), echo)  # flooded again
                    assert hub.router.links.get(creds.site_id) is not None and raw.ended is None
                    for site in (hub, client, late):
                        names = {info.name for info in site.status().sites if info.reachable}
                        assert {"hub", "client", "late"} - {site.name} <= names
                        assert len(site.status().sites) <= MAX_SITES + len(site.status().links)
                nursery.cancel_scope.cancel()
            await raw.aclose()

    print(f"minted {FAKES} sites in {minted:.2f} s, tables full in {filled:.2f} s, new site reachable in {joined:.2f} s")
    # Told in a line now and then with counts, not a line per record: the whole attack, all sites
    # together, logs a few dozen lines.
    crowded = [r.getMessage() for r in caplog.records if "record(s) of new sites refused" in r.getMessage()]
    assert 0 < len(crowded) <= 12, crowded
    assert any(f"gossip from site {creds.site_id[:8]} dropped: this site holds" in line for line in crowded)
    assert len(caplog.records) < 200
