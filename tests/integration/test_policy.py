"""Access policy, written as the attacks it stops: a member that offers a routing key it should not serve,
a site that reaches a connector it should not, a HELLO that claims another site's name, two sites with one name.

The arena: a hub that accepts links; "honest" and "evil" both offer routing key
`web`, each to a target of its own; site "a" listens for `web`. All of them
link to the hub, so both providers are two links away from a, at equal cost.
By default (a network is one trust domain) evil takes part of a's clients;
with a listener's provider policy it takes none, and every byte that a's
clients send and get is checked at the honest target. Sites run in this
process with real TLS links on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

import fabric
from fabric import pki
from fabric.addresses import Address
from fabric.errors import ConfigError, FabricError, FlowRefused
from fabric.router.frames import (
    FrameDecoder,
    FrameType,
    Open,
    Reason,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    decode_reason_untrusted,
    encode_frame,
    encode_message,
)
from fabric.router.link import make_hello, read_frame
from fabric.router.transports import dial

DEADLINE = 60  # seconds for a test that waits on the network (generous: shared CPUs)
CLIENTS = 20  # connections a's clients make, as in the attack that was reported
AT_ONCE = 5  # of them at a time, so that balanced distribution weighs open flows too
TRANSFER = 64 * 1024  # bytes each way per checked exchange


@attrs.frozen
class Arena:
    network: object
    hub: fabric.Site
    honest: fabric.Site
    evil: fabric.Site
    a: fabric.Site


@pytest.fixture
async def arena(network):
    """hub, with honest, evil and a linked to it; no connectors or listeners yet."""
    options = dict(service_sync=False)
    async with (
        network.site("hub", link_port=0, **options) as hub,
        network.site("honest", **options) as honest,
        network.site("evil", **options) as evil,
        network.site("a", **options) as a,
    ):
        for site in (honest, evil, a):
            await network.link(site, hub)
        yield Arena(network, hub, honest, evil, a)


async def offer_web(arena: Arena, honest_port: int, evil_port: int, *, protocol: str = "tcp") -> None:
    """Both providers offer `web`; returns once a sees both."""
    await arena.honest.create_connector("web", honest_port, host="127.0.0.1", protocol=protocol)
    await arena.evil.create_connector("web", evil_port, host="127.0.0.1", protocol=protocol)
    with trio.fail_after(DEADLINE):
        await arena.a.router.wait_reachable("web", providers=2)


async def in_turns(count: int, one) -> None:
    """`count` calls of `one()`, AT_ONCE at a time."""
    slots = trio.Semaphore(AT_ONCE)

    async def task() -> None:
        async with slots:
            await one()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(task)


async def echo_clients(tcp, port: int) -> None:
    """CLIENTS echo round trips through the listener at `port`, AT_ONCE at a time, within DEADLINE."""

    async def client() -> None:
        stream = await tcp.connect(port)
        async with stream:
            await tcp.echo_round_trip(stream, 1000)

    with trio.fail_after(DEADLINE):
        await in_turns(CLIENTS, client)


# -- the hijack: a member offering the same routing key --------------------------------------------


async def test_by_default_a_second_site_offering_the_key_takes_some_of_the_clients(arena, counting_echo, tcp):
    """The threat, as reported: the open default lets any member serve any key (and status says the key is shared)."""
    honest, evil = await counting_echo(), await counting_echo()
    await offer_web(arena, honest.port, evil.port)
    listener = await arena.a.create_listener("web", 0)

    await echo_clients(tcp, listener.port)
    assert honest.connections + evil.connections == CLIENTS
    assert evil.connections > 0  # the hijacker served some of a's clients
    (web,) = [s for s in arena.a.network_status().services if s.routing_key == "web"]
    assert web.shared and web.providers == ("evil", "honest")
    assert any(note.startswith("routing key 'web' is offered by 2 sites: ") for note in arena.a.network_status().notes)


@pytest.mark.parametrize("distribution, by", [("balanced", "name"), ("closest", "id")])
async def test_a_listener_provider_policy_excludes_the_hijacker(arena, hash_server, counting_echo, distribution, by):
    """All 20 clients reach the honest target, whole: every byte checked there and back; evil sees none."""
    evil = await counting_echo()
    await offer_web(arena, hash_server.port, evil.port)
    honest = arena.honest.name if by == "name" else arena.honest.site_id
    listener = await arena.a.create_listener("web", 0, distribution=distribution, providers=[honest])
    assert listener.providers == (honest,) and listener.accepting

    async def client() -> None:
        await hash_server.exchange(listener.port, upload=TRANSFER, download=TRANSFER)

    with trio.fail_after(DEADLINE):
        await in_turns(CLIENTS, client)
    assert hash_server.failures == [] and hash_server.verified == CLIENTS
    assert evil.connections == 0
    (status,) = [l for l in arena.a.status().listeners if l.name == "web"]
    assert status.providers == (honest,) and status.policy_notes == ()


async def test_an_http_listener_with_a_provider_policy_sends_every_request_to_the_allowed_site(arena, start_server):
    """HTTP listeners pick a provider per request: each of them keeps to the policy too."""

    def named(body: bytes):
        async def serve(stream: trio.SocketStream) -> None:
            buffer = bytearray()
            async with stream:
                try:
                    while True:
                        while b"\r\n\r\n" not in buffer:
                            data = await stream.receive_some(65536)
                            if not data:
                                return
                            buffer += data
                        del buffer[: buffer.index(b"\r\n\r\n") + 4]
                        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                except trio.BrokenResourceError:
                    return

        return serve

    await offer_web(arena, await start_server(named(b"honest")), await start_server(named(b"evil")), protocol="http")
    listener = await arena.a.create_listener("web", 0, protocol="http", providers=["honest"])
    bodies = []

    async def receive(stream: trio.SocketStream, buffer: bytearray) -> None:
        data = await stream.receive_some(65536)
        assert data, "the listener closed the connection"
        buffer += data

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
        async with stream:
            buffer = bytearray()
            for _ in range(4):  # keep-alive: each request picks its provider anew
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                while b"\r\n\r\n" not in buffer:
                    await receive(stream, buffer)
                end = buffer.index(b"\r\n\r\n") + 4
                length = int(bytes(buffer[:end]).lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < end + length:
                    await receive(stream, buffer)
                bodies.append(bytes(buffer[end : end + length]))
                del buffer[: end + length]

    with trio.fail_after(DEADLINE):
        await in_turns(CLIENTS // 4, client)
    assert bodies == [b"honest"] * CLIENTS


async def test_a_listener_whose_allowed_providers_are_gone_refuses_clients_and_says_why(arena, echo_server, tcp):
    """The hijacker still offers the key, but it is not a provider this listener may use: no client is carried to it."""
    await offer_web(arena, echo_server, echo_server)
    listener = await arena.a.create_listener("web", 0, providers=["honest"])
    with trio.fail_after(DEADLINE):
        await arena.a.wait_reachable("web")
        await arena.honest.delete_connector("web")
        await arena.a.wait_listening("web", accepting=False)
    assert arena.a.router.providers("web") == [arena.evil.site_id]  # offered, but not by a site it may use
    (status,) = [l for l in arena.a.status().listeners if l.name == "web"]
    assert not status.accepting
    assert status.error.startswith("no reachable site its provider policy admits offers routing key 'web'; evil (")
    with pytest.raises(OSError):  # refused at once, as a listener without a provider does
        await tcp.connect(listener.port)


# -- a connector's allow list ----------------------------------------------------------------------


async def test_a_connector_refuses_a_site_it_does_not_allow_and_the_ingress_sees_why(arena, echo_server, tcp):
    await arena.hub.create_connector("db", echo_server, host="127.0.0.1", allow=["a"])
    with trio.fail_after(DEADLINE):
        await arena.a.wait_reachable("db")
        await arena.evil.wait_reachable("db")
        listener = await arena.a.create_listener("db", 0)
        stream = await tcp.connect(listener.port)
        async with stream:
            await tcp.echo_round_trip(stream, 10_000)  # a is allowed

        with pytest.raises(FlowRefused) as refused:
            async with arena.evil.router.connect("db"):
                pass
        assert refused.value.code == Reason.NOT_AUTHORIZED
        assert str(refused.value) == f"site hub takes no flows for 'db' from site evil ({arena.evil.site_id[:8]})"

        # Through a listener the client's connection is closed without a byte.
        theirs = await arena.evil.create_listener("db", 0)
        stream = await tcp.connect(theirs.port)
        async with stream:
            received, _ = await tcp.read_until_end(stream)
        assert received == 0
    (connector,) = arena.hub.status().connectors
    assert connector.allow == ("a",) and connector.refused == 2
    assert connector.refused_from == f"evil ({arena.evil.site_id[:8]})"


# -- origins that cannot be true -------------------------------------------------------------------


async def redeem_raw(issuer: fabric.Site, tmp_path: Path, name: str) -> tuple[pki.Identity, object]:
    """A certificate of `issuer` for a new key named `name`, redeemed by hand as a site does: (identity, TLS context)."""
    identity = await trio.to_thread.run_sync(pki.create_identity, tmp_path / name, name)
    token = await issuer.issue_token()
    stream = await dial(Address("tls", "127.0.0.1", issuer.link_port), pki.client_context(token.ca_pem.encode()))
    async with stream:
        request = Redeem(token_id=token.token_id, secret=token.secret, name=name, csr_pem=pki.make_csr(identity).decode())
        await stream.send_all(encode_frame(FrameType.REDEEM, 0, encode_message(request)))
        frame = await read_frame(stream, FrameDecoder())
    assert frame.type is FrameType.REDEEM_OK, frame
    cert_path = tmp_path / f"{name}-cert.pem"
    cert_path.write_text(decode_message_untrusted(frame.payload, RedeemOk).cert_pem)
    return identity, pki.client_context(issuer.identity.ca_cert_pem, cert_path, identity.key_path)


async def hello_raw(issuer: fabric.Site, identity: pki.Identity, context, *, name: str, mode: str = "interior"):
    """TLS and a HELLO that says `name` and `mode`: the issuer's first frame back, and the stream."""
    stream = await dial(Address("tls", "127.0.0.1", issuer.link_port), context)
    hello = make_hello(identity.site_id, name, mode, 1, fabric.Settings(), 1)
    await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_message(hello)))
    decoder = FrameDecoder()
    return await read_frame(stream, decoder), stream, decoder


async def test_a_hello_naming_another_site_than_its_certificate_is_refused(arena, tmp_path):
    """Mallory redeemed a token as "mallory"; a HELLO that says it is "a" is refused, and names nobody."""
    identity, context = await redeem_raw(arena.hub, tmp_path, "mallory")
    with trio.fail_after(DEADLINE):
        frame, stream, _ = await hello_raw(arena.hub, identity, context, name="a")
        await trio.aclose_forcefully(stream)
    assert frame.type is FrameType.GOAWAY
    assert decode_reason_untrusted(frame.payload) == (
        Reason.NOT_AUTHORIZED, "HELLO names site 'a' but its certificate is for site 'mallory'"
    )
    assert identity.site_id not in arena.hub.router.links
    assert arena.hub.router.sites_named("a") == (arena.a.site_id,)

    # Under its own name it links as usual: the refusal was for the name alone.
    with trio.fail_after(DEADLINE):
        frame, stream, _ = await hello_raw(arena.hub, identity, context, name="mallory")
        await trio.aclose_forcefully(stream)
    assert frame.type is FrameType.HELLO


async def test_flows_whose_origin_cannot_be_true_are_refused_at_the_first_hop(arena, tmp_path, echo_server):
    """A linked edge site may only send its own flows; no site may send flows that claim to come from the hub
    itself. Both lies would get past the hub's connector, which takes flows from a only."""
    await arena.hub.create_connector("db", echo_server, host="127.0.0.1", allow=["a"])
    identity, context = await redeem_raw(arena.hub, tmp_path, "mallory")
    answers = {}
    for mode, origin in (("edge", arena.a.site_id), ("interior", arena.hub.site_id), ("edge", identity.site_id)):
        with trio.fail_after(DEADLINE):
            frame, stream, decoder = await hello_raw(arena.hub, identity, context, name="mallory", mode=mode)
            assert frame.type is FrameType.HELLO, frame
            request = Open(dest=arena.hub.site_id, routing_key="db", origin=origin, flow_uid=f"{origin}:1", hop_limit=8)
            await stream.send_all(encode_frame(FrameType.OPEN, 1, encode_message(request)))
            while (frame := await read_frame(stream, decoder)).type not in (FrameType.OPEN_OK, FrameType.OPEN_FAIL):
                pass  # gossip and pings
            answers[mode, origin] = (frame.type, decode_reason_untrusted(frame.payload) if frame.payload else None)
            await trio.aclose_forcefully(stream)
            await arena.hub.wait_linked(identity.site_id, up=False)
    assert answers[("edge", arena.a.site_id)] == (
        FrameType.OPEN_FAIL,
        (Reason.NOT_AUTHORIZED, f"edge site mallory sent a flow that claims to come from site a ({arena.a.site_id[:8]})"),
    )
    assert answers[("interior", arena.hub.site_id)] == (
        FrameType.OPEN_FAIL, (Reason.NOT_AUTHORIZED, "site mallory sent a flow that claims to come from site hub")
    )
    # The truth is refused by the connector's own policy, not by the origin check (mallory sent no record:
    # the hub knows it by its id alone).
    assert answers[("edge", identity.site_id)] == (
        FrameType.OPEN_FAIL, (Reason.NOT_AUTHORIZED, f"site hub takes no flows for 'db' from site {identity.site_id[:8]}")
    )


# -- two sites with one name -----------------------------------------------------------------------


async def test_two_sites_with_one_name_are_shown_and_never_guessed_between(arena, tmp_path, echo_server, tcp):
    """Another site takes the name "honest". Status marks both; a policy by that name admits neither, and says
    so; a new policy or `revoke_link` by that name is refused, naming both ids; by id each works."""
    await arena.honest.create_connector("web", echo_server, host="127.0.0.1")
    listener = await arena.a.create_listener("web", 0, providers=["honest"])
    with trio.fail_after(DEADLINE):
        await arena.a.wait_reachable("web")
        stream = await tcp.connect(listener.port)
        async with stream:
            await tcp.echo_round_trip(stream, 1000)

    async with fabric.open_site("honest", tmp_path / "impostor", service_sync=False) as impostor:
        with trio.fail_after(DEADLINE):
            await arena.network.link(impostor, arena.hub)
            await impostor.create_connector("web", echo_server, host="127.0.0.1")
            await arena.a.router.wait_reachable("web", providers=2)
            await arena.a.wait_listening("web", accepting=False)  # "honest" now names two sites: neither
        both = sorted((arena.honest.site_id, impostor.site_id))
        ambiguous = f"2 sites are named honest: give the site id: {', '.join(both)}"

        (status,) = [l for l in arena.a.status().listeners if l.name == "web"]
        assert not status.accepting and status.policy_notes == (f"'honest' admits no site: {ambiguous}",)
        network = arena.a.network_status()
        assert sorted(s.site_id for s in network.sites if s.name_shared) == both
        assert f"2 sites are named honest*: {', '.join(both)} (name them by site id)" in network.notes
        (web,) = [s for s in network.services if s.routing_key == "web"]
        assert web.providers == tuple(sorted(f"honest ({i[:8]})" for i in both))

        with pytest.raises(ConfigError, match=ambiguous):
            await arena.a.create_listener("web2", 0, routing_key="web", providers=["honest"])
        with pytest.raises(ConfigError, match=ambiguous):
            await arena.a.create_connector("db", echo_server, allow=["honest"])
        with pytest.raises(FabricError, match=ambiguous):
            await arena.hub.revoke_link("honest")
        assert impostor.site_id in arena.hub.router.links and arena.honest.site_id in arena.hub.router.links

        by_id = await arena.a.create_listener("web2", 0, routing_key="web", providers=[arena.honest.site_id])
        assert by_id.accepting
        assert await arena.hub.revoke_link(impostor.site_id) == 1
        with trio.fail_after(DEADLINE):
            await arena.hub.wait_linked(impostor.site_id, up=False)
        assert arena.honest.site_id in arena.hub.router.links


# -- a link's offers ------------------------------------------------------------------------------


async def test_a_links_offers_keep_the_linked_sites_other_services_out(network, counting_echo, tcp):
    """a links to honest and to evil directly, and lets evil offer only `tools`: evil's `web` (and `admin`)
    are ignored here, by listeners and by service sync alike, while `tools` is used."""
    honest_echo, evil_echo = await counting_echo(), await counting_echo()
    async with (
        network.site("honest", link_port=0) as honest,
        network.site("evil", link_port=0) as evil,
        network.site("a") as a,
    ):
        with trio.fail_after(DEADLINE):
            await network.link(a, honest)
            await network.link(a, evil)
            await a.update_link("evil", offers=["tools"])
            await honest.create_connector("web", honest_echo.port, host="127.0.0.1")
            await evil.create_connector("web", evil_echo.port, host="127.0.0.1")
            await evil.create_connector("admin", tcp.closed_port(), host="127.0.0.1")
            await evil.create_connector("tools", tcp.closed_port(), host="127.0.0.1")
            await a.router.wait_reachable("tools")
            while not any(l.auto and l.routing_key == "tools" for l in a.status().listeners):
                await a.wait_listeners_changed()
        assert a.router.providers("web") == [honest.site_id]
        assert not any(l.routing_key == "admin" for l in a.status().listeners)  # service sync ignored it too
        (link,) = [l for l in a.status().links if l.name == "evil"]
        assert link.offers == ("tools",) and link.ignored == ("admin", "web")
        (web,) = [s for s in a.network_status().services if s.routing_key == "web"]
        assert web.providers == ("honest",) and web.ignored == ("evil",) and web.shared

        listener = await a.create_listener("web", 0)

        await echo_clients(tcp, listener.port)
        assert (honest_echo.connections, evil_echo.connections) == (CLIENTS, 0)

        # Back to the default: evil's `web` counts again, without a new link.
        await a.update_link("evil", offers=None)
        with trio.fail_after(DEADLINE):
            await a.router.wait_reachable("web", providers=2)
        (link,) = [l for l in a.status().links if l.name == "evil"]
        assert link.offers is None and link.ignored == ()


async def test_a_tokens_offers_keep_the_redeeming_sites_other_services_out(network, counting_echo, tcp):
    """The hub lets the site that redeems evil's token offer only `tools`: evil's `web` is ignored at the hub,
    from the first link on and after the hub restarts, while `tools` is used."""
    honest_echo, evil_echo = await counting_echo(), await counting_echo()
    async with network.site("honest") as honest, network.site("evil") as evil:
        for start in ("first", "again"):
            ports = dict(link_port=0) if start == "first" else {}  # then the port it picked, which the links dial
            async with network.site("hub", service_sync=False, **ports) as hub:
                with trio.fail_after(DEADLINE):
                    if start == "first":
                        await network.link(honest, hub)
                        token = await hub.issue_token(offers=["tools"])
                        await evil.redeem_token(token)
                        await honest.create_connector("web", honest_echo.port, host="127.0.0.1")
                        await evil.create_connector("web", evil_echo.port, host="127.0.0.1")
                        await evil.create_connector("tools", evil_echo.port, host="127.0.0.1")
                        await hub.create_listener("web", 0)
                    await hub.wait_linked(evil.site_id)
                    await hub.router.wait_reachable("tools")
                    await hub.wait_reachable("web")
                assert hub.router.providers("web") == [honest.site_id]
                (link,) = [l for l in hub.status().links if l.peer_id == evil.site_id]
                assert link.direction == "incoming" and link.offers == ("tools",) and link.ignored == ("web",)
                (listener,) = hub.status().listeners  # (port 0: another port at each start)

                await echo_clients(tcp, listener.port)
        assert (honest_echo.connections, evil_echo.connections) == (2 * CLIENTS, 0)
