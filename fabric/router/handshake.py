"""Link handshakes: accepting connections on the link ports, and what both ends of a HELLO share.

`LinkSetup` is this site's side of any handshake: its HELLO, the checks of
the peer's, and the `Link` made from them. `Handshakes` serves the link
ports: it takes a connection only while a handshake slot is free (in all,
and per source), does TLS (in a WebSocket for the WebSocket port) and then
either a HELLO, which makes a link the router runs, or a REDEEM, which it
answers with what the site's tokens grant. A connection's failure ends that
connection alone, and is logged now and then per cause, as strangers can
make handshakes fail at will.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import ssl
from typing import Any

import attrs
import trio

from .. import logs, pki
from ..addresses import WS_PATH, Address
from ..config import Settings
from ..errors import FabricError, LinkError, TokenError
from ..store import ConfigStore
from ..tokens import Tokens, refusal_code
from .frames import EDGE, FrameDecoder, FrameType, Hello, Reason, Redeem, decode_message_untrusted, encode_frame, encode_message
from .link import Link, goaway_frame, make_hello, read_frame, read_hello_untrusted
from .router import Router
from .transports import WebSocketStream, accept_tls, listen_tcp, peer_address, tune

log = logging.getLogger("fabric.site")

PORTS = {"link_port": "link port", "ws_port": "WebSocket link port"}  # config field -> what: TLS, TLS in WebSocket
MAX_PENDING_HANDSHAKES = 128  # concurrent unauthenticated connections on the link ports, in all
# Of those, from one IP address (IPv6: one /64), so that one host flooding the
# link port cannot take every slot: the other sites still link meanwhile.
# Behind a reverse proxy every WebSocket link comes from the proxy's address.
MAX_PENDING_PER_SOURCE = 16
GOAWAY_GRACE = 0.5  # seconds to tell a refused peer why before the connection is dropped


def source_of(tcp: trio.SocketStream) -> str:
    """Who a connection counts against for handshake slots: its IP address, or an IPv6 address's /64."""
    try:
        host = tcp.socket.getpeername()[0]
    except OSError:
        return "unknown"
    address = ipaddress.ip_address(host)
    if address.version == 4:
        return host
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{host}/64", strict=False))


class LinkSetup:
    """This site's side of a link handshake, either end: its HELLO, the checks of the peer's, the Link."""

    def __init__(self, router: Router, *, mode: str, incarnation: int, settings: Settings) -> None:
        self.router = router
        self.mode = mode
        self.incarnation = incarnation
        self.settings = settings

    def __repr__(self) -> str:
        return f"<LinkSetup {self.router.name}>"

    def hello(self, cost: int) -> Hello:
        router = self.router
        return make_hello(router.site_id, router.name, self.mode, self.incarnation, self.settings, cost)

    def check_peer(self, peer: Hello, der: bytes, *, code: int | None = None) -> None:
        """A peer's HELLO must name the site its certificate is for; LinkError otherwise."""
        if peer.site_id != (certified_id := pki.cert_site_id(der)):
            raise LinkError(f"HELLO names site {peer.site_id[:8]} but its certificate is for {certified_id[:8]}")
        # Names bind to keys, as ids do: a peer cannot call itself other than its certificate says.
        if peer.name != (certified := pki.cert_site_name(der)):
            raise LinkError(f"HELLO names site {peer.name!r} but its certificate is for site {certified!r}", code=code)
        self.check_mode(peer.mode, peer.name)

    def check_mode(self, peer_mode: str, peer_name: str) -> None:
        """Edge sites link only to interior sites: two edges would have no one to carry their traffic."""
        if self.mode == EDGE and peer_mode == EDGE:
            raise LinkError(
                f"site {self.router.name} and site {peer_name} are both edge sites; an edge site links only to interior sites",
                code=Reason.EDGE_TO_EDGE,
            )

    def link(self, stream: trio.SSLStream, decoder: FrameDecoder, *, local: Hello, peer: Hello, dialer: bool, cost: int) -> Link:
        return Link(
            stream, decoder, local=local, peer=peer, dialer=dialer, cost=cost, settings=self.settings, handler=self.router
        )

    async def serve(self, link: Link, label: str, peer: str) -> str:
        """Serve the link until it ends; returns why it ended. `peer` names the other end in the log."""
        log.info("%s up", label, extra=logs.event("link_up", peer=peer))
        try:
            reason = await self.router.run_link(link)
        except Exception as exc:
            # A bug while serving one link must not take the site down with it.
            log.exception("%s failed", label, extra=logs.event("link_failed", peer=peer, reason=repr(exc)))
            reason = "internal error (see the site's log)"
        log.info("%s down: %s", label, reason, extra=logs.event("link_down", peer=peer, reason=reason))
        return reason


class Handshakes:
    """The accepting side of links and token redemptions, on the ports the config in `store` names."""

    def __init__(self, router: Router, setup: LinkSetup, tokens: Tokens, store: ConfigStore, identity: pki.Identity) -> None:
        self.router = router
        self.setup = setup
        self.tokens = tokens
        self.store = store
        self.identity = identity
        self.settings = setup.settings
        self.ports: dict[str, int] = {}  # config field ("link_port", "ws_port") -> the port bound, while running
        self.pending: collections.Counter[str] = collections.Counter()  # source -> handshakes under way
        self._running = False
        self._refusals_log = logs.Throttle(logs.LINE_INTERVAL)  # what strangers can make fail at will, by cause

    def __repr__(self) -> str:
        return f"<Handshakes ports={self.ports} pending={self.pending.total()}>"

    async def run(self, *, task_status: trio.TaskStatus[Handshakes] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links on the ports the config names until cancelled; started once they are bound."""
        self._running = True
        config = self.store.config
        context = await trio.to_thread.run_sync(pki.server_context, self.identity)
        async with trio.open_nursery() as nursery:
            for field, what in PORTS.items():
                if (port := getattr(config, field)) is not None:
                    listener = await listen_tcp(config.link_host, port, what=f"site {config.name}'s {what}")
                    await self._bound(field, port, listener.socket.getsockname()[1])
                    accept = functools.partial(self._accept, context=context, websocket=field == "ws_port")
                    nursery.start_soon(trio.serve_listeners, accept, [listener])
            task_status.started(self)

    async def _bound(self, field: str, port: int, bound: int) -> None:
        self.ports[field] = bound
        if port == 0:
            # Keep the port that was picked: tokens and peers' links point at it,
            # so the next start must listen there again.
            change: dict[str, Any] = {field: bound}
            await self.store.update(lambda c: attrs.evolve(c, **change))

    def known_ports(self) -> dict[str, int]:
        """Config field -> the port links are accepted on: the bound one while running, else the
        configured one (0: picked at the first start, not known yet); fields with no port left out."""
        configured = {f: p for f in PORTS if (p := getattr(self.store.config, f)) is not None}
        return {f: self.ports.get(f, 0) for f in configured} if self._running else configured

    def addresses(self) -> tuple[str, ...]:
        """Where this site accepts links, as tokens and status give them: TLS first, then WebSocket."""
        ports, host = self.known_ports(), self.store.config.link_host
        addresses = []
        if port := ports.get("link_port"):
            addresses.append(str(Address("tls", host, port)))
        if port := ports.get("ws_port"):
            addresses.append(str(Address("ws", host, port, WS_PATH)))
        return tuple(addresses)

    async def _accept(self, tcp: trio.SocketStream, *, context: ssl.SSLContext, websocket: bool) -> None:
        """One connection to a link port, from its first byte to the link's end. Whatever goes
        wrong with it ends it alone: an exception out of here would end the site (serve_listeners)."""
        where = peer_address(tcp)  # (never raises: the one line outside the try)
        stream: trio.abc.Stream = tcp
        try:
            source = source_of(tcp)
            pending = self.pending
            if pending.total() >= MAX_PENDING_HANDSHAKES or pending[source] >= MAX_PENDING_PER_SOURCE:
                self._refuse(source)
                return
            tune(tcp)
            pending[source] += 1
            try:
                with trio.fail_after(self.settings.handshake_timeout):
                    if websocket:
                        stream = await WebSocketStream.accept(
                            tcp, path=WS_PATH, keepalive=self.settings.ws_keepalive_interval, peer=where
                        )
                        where = stream.peer
                    stream = tls = await accept_tls(stream, context)
                    decoder = FrameDecoder()
                    first = await read_frame(tls, decoder)
                    if first.type is FrameType.REDEEM:
                        await self._answer_redeem(tls, first.payload, where)
                        return
                    link = await self._accept_hello(tls, decoder, first)
            finally:
                pending[source] -= 1
                if not pending[source]:
                    del pending[source]
            await self.setup.serve(link, f"link from {link.peer.name} ({where})", f"{link.peer.name} ({where})")
        except trio.TooSlowError:
            why = f"handshake did not finish within {self.settings.handshake_timeout:g} s"
            self._failed(("timeout", websocket), logging.WARNING, "link from %s: %s", where, why, "handshake_timeout")
        except LinkError as exc:  # ProtocolError and FrameError included
            if isinstance(stream, trio.SSLStream):
                # A certified peer is a cause of its own: a flood from strangers cannot hide that a
                # site this one knows (say, a revoked one) is being refused.
                cause: tuple = ("refused", websocket, exc.code, stream.getpeercert(binary_form=True))
            else:
                cause = ("tls", websocket)  # TLS, or the WebSocket upgrade before it, failed
            self._failed(cause, logging.WARNING, "link from %s refused: %s", where, exc, "link_refused")
            if isinstance(stream, trio.SSLStream):  # tell the peer why, inside TLS; never in clear text
                with trio.move_on_after(GOAWAY_GRACE, shield=True):
                    try:
                        await stream.send_all(goaway_frame(Reason(exc.code or Reason.PROTOCOL), str(exc)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # Whoever connected went away mid-handshake: their loss, nobody else's.
            self._failed(
                ("lost", websocket), logging.INFO, "link from %s: connection lost during the handshake: %s", where,
                exc.__cause__ or exc, "handshake_lost",
            )
        except FabricError as exc:
            self._failed(("error", websocket), logging.WARNING, "link from %s: %s", where, exc, "link_refused")
        except Exception as exc:
            self._failed(
                ("bug", websocket), logging.ERROR,
                "link from %s: unexpected failure; this connection is dropped, the site goes on: %s", where, repr(exc),
                "link_failed", exc_info=True,
            )
        finally:
            await trio.aclose_forcefully(stream)

    def _failed(
        self, cause: tuple, level: int, message: str, where: str, why: object, event: str, *, exc_info: bool = False
    ) -> None:
        """Log a failed handshake: the first of its cause in logs.LINE_INTERVAL at `level`, saying how
        many were held back before it, the others at debug."""
        held = self._refusals_log.admit(cause, trio.current_time())
        log.log(
            logging.DEBUG if held is None else level, message + "%s", where, why, logs.held_back(held or 0),
            exc_info=exc_info, extra=logs.event(event, peer=where, reason=why),
        )

    def _refuse(self, source: str) -> None:
        """Count a connection refused for want of a handshake slot; say so now and then, not per connection."""
        held = self._refusals_log.admit("slots", trio.current_time())
        if held is None:
            return
        pending = self.pending
        why = (
            f"{pending[source]} handshakes from {source} already pending (at most {MAX_PENDING_PER_SOURCE} per source)"
            if pending[source] >= MAX_PENDING_PER_SOURCE
            else f"{pending.total()} handshakes already pending (at most {MAX_PENDING_HANDSHAKES})"
        )
        log.warning(
            "link port: refused %d connection(s) since the last such line, the latest from %s: %s", held + 1, source, why,
            extra=logs.event("handshakes_refused", peer=source, reason=why),
        )

    async def _accept_hello(self, stream: trio.SSLStream, decoder: FrameDecoder, first) -> Link:
        der = stream.getpeercert(binary_form=True)
        if not der:
            raise LinkError("a site without a certificate may only redeem a token", code=Reason.NOT_AUTHORIZED)
        peer_id = pki.cert_site_id(der)
        if self.tokens.revoked(pki.cert_serial(der)):
            raise LinkError(f"the certificate of site {peer_id[:8]} was revoked here", code=Reason.NOT_AUTHORIZED)
        local = self.setup.hello(cost=0)
        peer = read_hello_untrusted(first, local)
        # Its certificate says the name it redeemed the token with: it cannot call itself anything else.
        self.setup.check_peer(peer, der, code=Reason.NOT_AUTHORIZED)
        self.router.limit_offers(peer_id, self.tokens.granted_offers(peer_id))  # (the first link after a redemption)
        await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_message(local)))
        return self.setup.link(stream, decoder, local=local, peer=peer, dialer=False, cost=max(1, peer.cost))

    async def _answer_redeem(self, stream: trio.SSLStream, payload: bytes, where: str) -> None:
        request = decode_message_untrusted(payload, Redeem)
        try:
            self.setup.check_mode(request.mode, request.name)
            answer = await self.tokens.grant(request, where)
        except (LinkError, TokenError) as exc:
            if isinstance(exc, LinkError):
                code, why = Reason(exc.code or Reason.PROTOCOL), f"{exc}; the token is not spent"
            else:
                code, why = refusal_code(exc), str(exc)
            held = self._refusals_log.admit(("redeem", code), trio.current_time())
            log.log(
                logging.DEBUG if held is None else logging.WARNING,
                "token redemption from %s refused: %s%s", where, exc, logs.held_back(held or 0),
                extra=logs.event("redeem_refused", peer=where, reason=exc),
            )
            await stream.send_all(goaway_frame(code, why))
            return
        await stream.send_all(encode_frame(FrameType.REDEEM_OK, 0, encode_message(answer)))
