"""Site: one Trio nursery that supervises a site's links, router and proxies.

`open_site(...)` is the way in: it creates the site directory on first use
(identity, CA, config), starts everything, and yields a `Site` whose methods
are what the CLI does: issue and redeem tokens, create and delete listeners
and connectors, report status.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from . import logs, pki
from .addresses import NO_PROXY, WS_PATH, Address, parse_address, parse_proxy, proxy_for
from .config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_LINK_HOST,
    DEFAULT_LISTENER_HOST,
    PROTOCOLS,
    STATE_DIR,
    ConnectorConfig,
    LinkConfig,
    ListenerConfig,
    Settings,
    SiteConfig,
    config_path,
    link_dir,
    load_config,
    save_config,
)
from .errors import (
    ConfigError,
    FabricError,
    FrameError,
    IssuerUnreachableError,
    LinkError,
    TokenError,
    TokenExpiredError,
    TokenForgedError,
    TokenSpentError,
)
from .files import write_private_atomic
from .gossip.records import sign_record
from .proxy.http import HttpListener, HttpStats
from .proxy.sync import (
    SYNC_BIND,
    SYNC_CAP,
    SYNC_LOW_PORT,
    SYNC_MIN_PORT,
    SyncHold,
    SyncPlan,
    SyncRefusal,
    plan_service_sync,
)
from .proxy.tcp import TcpConnector, TcpListener
from .router.frames import (
    EDGE,
    FrameDecoder,
    FrameType,
    Reason,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    decode_reason_untrusted,
    encode_frame,
    encode_message,
)
from .router.link import (
    Link,
    goaway_frame,
    make_hello,
    read_frame,
    read_hello_untrusted,
)
from .router.policy import ambiguity, check_unambiguous
from .router.policy import notes as policy_notes
from .router.router import Router
from .router.routes import BALANCED, DISTRIBUTIONS
from .router.transports import (
    WebSocketStream,
    accept_tls,
    dial,
    listen_tcp,
    peer_address,
    transport_of,
    tune,
)

log = logging.getLogger("fabric.site")

MAX_PENDING_HANDSHAKES = 128  # concurrent unauthenticated connections on the link ports, in all
# Of those, from one IP address (IPv6: one /64), so that one host flooding the
# link port cannot take every slot: the other sites still link meanwhile.
# Behind a reverse proxy every WebSocket link comes from the proxy's address.
MAX_PENDING_PER_SOURCE = 16
REDEEM_TIMEOUT = 10.0  # seconds for a whole redemption, dial included
_UNSET = object()
_TOKEN_ERRORS = {
    Reason.TOKEN_FORGED: TokenForgedError,
    Reason.TOKEN_EXPIRED: TokenExpiredError,
    Reason.TOKEN_SPENT: TokenSpentError,
}
# Refusals of a link that no redial can change, with what the user can do.
_LISTENERS = {"tcp": TcpListener, "http": HttpListener}  # listener class by protocol


def _source_of(tcp: trio.SocketStream) -> str:
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


def _checked(cls, **fields):
    """A config object from values a caller gave, or one ConfigError line saying which is wrong."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise FabricError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")


_FINAL_REFUSALS = {
    Reason.NOT_AUTHORIZED: "delete this link; it links again only if that site lets it (a new token, unless it revoked this site)",
    Reason.EDGE_TO_EDGE: "delete this link",
}


@attrs.frozen
class LinkStatus:
    name: str
    peer_id: str
    direction: str  # "outgoing" (this site dials) or "incoming"
    cost: int
    up: bool
    rtt_ms: float | None
    flows: int
    error: str | None = None  # why the last attempt failed or the link went down
    transport: str | None = None  # "tls", "ws" or "wss" (outgoing: of the address dialled first)
    address: str | None = None  # outgoing: the address dialled first (the one that worked last); incoming: the peer's
    proxy: str | None = None  # outgoing: the forward proxy it goes through, if any (without its password)
    offers: tuple[str, ...] | None = None  # the only routing keys the linked site may offer through it (None: any)
    ignored: tuple[str, ...] = ()  # routing keys the linked site offers that are ignored here for that


@attrs.frozen
class HopStatus:
    """A neighbour that new flows toward a site may take, best first."""

    name: str
    cost: float  # of the whole path through it
    rtt_ms: float | None  # measured on the link to it, smoothed
    flows: int  # flows through it now, toward any destination


@attrs.frozen
class SiteInfo:
    site_id: str
    name: str
    mode: str
    reachable: bool
    cost: float | None
    next_hops: tuple[HopStatus, ...]
    # Seconds: for a reachable site, since its current record arrived; for an
    # unreachable one, since it became so (its record is purged at purge_after).
    age_s: float = 0.0
    services: tuple[str, ...] = ()  # routing keys it has connectors for
    route_changes: int = 0  # times its route (cost or next hops) changed while it stayed reachable
    name_shared: bool = False  # another known site has the same name: name it by its id


@attrs.frozen
class ProviderStatus:
    """A reachable site with a connector for a routing key, as this site's ingress weighs it."""

    name: str
    cost: float  # of the path to it (0: this site)
    outstanding: int  # flows this site has open toward it for any key
    penalty: float = 0.0  # cost units added after its target refused dials; decays in seconds


@attrs.frozen
class ServiceStatus:
    routing_key: str
    providers: tuple[ProviderStatus, ...]  # reachable ones only, by name


@attrs.frozen
class ListenerStatus:
    name: str
    routing_key: str
    host: str
    port: int | None
    connections: int
    accepting: bool  # clients are accepted only while a provider of the key is reachable
    error: str | None  # why it does not accept, when it does not
    auto: bool = False  # made by service sync for a key offered elsewhere, not configured
    distribution: str = BALANCED  # how it picks a provider per connection
    protocol: str = "tcp"
    http: HttpStats | None = None  # requests, statuses, bytes and latency of an HTTP listener
    providers: tuple[str, ...] = ()  # its provider policy, as given: the only sites it uses (empty: any)
    policy_notes: tuple[str, ...] = ()  # entries of that policy that admit no site now, and why


@attrs.frozen
class ConnectorStatus:
    name: str
    routing_key: str
    host: str
    port: int
    allow: tuple[str, ...] = ()  # its policy, as given: the only sites whose flows it takes (empty: any)
    policy_notes: tuple[str, ...] = ()  # entries of that policy that admit no site now, and why
    refused: int = 0  # flows for its routing key refused since the start: no connector's policy took their origin
    refused_from: str | None = None  # the site the latest of them claimed to come from


@attrs.frozen
class SiteStatus:
    site_id: str
    name: str
    mode: str
    link_address: str | None  # tls://host:port, if it accepts links on TCP
    ws_address: str | None  # ws://host:port/fabric, if it accepts links as WebSockets
    links: tuple[LinkStatus, ...]
    sites: tuple[SiteInfo, ...]
    services: tuple[ServiceStatus, ...]
    listeners: tuple[ListenerStatus, ...]
    connectors: tuple[ConnectorStatus, ...]
    notes: tuple[str, ...] = ()  # names that several known sites carry


@attrs.frozen
class NetworkLink:
    peer: str  # site id
    peer_name: str
    cost: int
    rtt_ms: float | None  # measured here for this site's own links; None for others'


@attrs.frozen
class NetworkSite:
    site_id: str
    name: str
    mode: str
    reachable: bool  # from this site; this site itself counts as reachable
    cost: float | None  # of the best path from this site
    links: tuple[NetworkLink, ...]
    services: tuple[str, ...]  # routing keys it has connectors for
    name_shared: bool = False  # another known site has the same name: name it by its id


@attrs.frozen
class NetworkService:
    routing_key: str
    # Reachable sites with a connector for it whose offer this site takes: names,
    # with the short id for a name that several sites carry.
    providers: tuple[str, ...]
    listeners: tuple[str, ...]  # names of this site's listeners for it
    shared: bool = False  # more than one reachable site offers it (a listener's provider policy picks)
    ignored: tuple[str, ...] = ()  # reachable sites that offer it but whose link here may not


@attrs.frozen
class NetworkStatus:
    """The network as this site knows it from gossip."""

    sites: tuple[NetworkSite, ...]
    services: tuple[NetworkService, ...]
    notes: tuple[str, ...] = ()  # routing keys several sites offer, names several sites carry


class Site:
    """A site: running when made by `open_site`, stopped (config only) when made by `load_site`."""

    def __init__(self, site_dir: Path, identity: pki.Identity, config: SiteConfig, incarnation: int) -> None:
        self.site_dir = site_dir
        self.identity = identity
        self.config = config
        self.incarnation = incarnation
        self.router = Router(
            site_id=identity.site_id,
            name=config.name,
            mode=config.mode,
            incarnation=incarnation,
            settings=config.settings,
            sign=functools.partial(sign_record, identity=identity),
            refuse_origin=self._refused_origin,
        )
        self.link_port: int | None = None
        self.ws_port: int | None = None
        self._grants = pki.load_grants(self._grants_path)
        self._revoked_sites = pki.revoked_sites(self._grants)  # site id -> name, kept as grants change
        self._grants_lock = trio.Lock()
        self._server_context = pki.server_context(identity)
        self._pending_handshakes: collections.Counter[str] = collections.Counter()  # source -> how many
        self._refusals_log = logs.Throttle(logs.LINE_INTERVAL)  # what strangers can make fail at will, by cause
        self._listeners: dict[str, TcpListener] = {}
        self._listener_errors: dict[str, str] = {}
        self._synced: dict[str, TcpListener] = {}  # service sync: routing key -> its listener here
        self._sync_holds: dict[str, SyncHold] = {}  # routing key -> what it is charged to, listening or not
        self._sync_errors: dict[str, tuple[int, str]] = {}  # routing key -> (port, why it does not listen)
        self._sync_unlogged: dict[str, tuple[int, str, str]] = {}  # cause -> (keys, one of them, why) not yet said
        self._sync_logged_at: dict[str, float] = {}  # cause -> when a line last said it
        self._listeners_changed = trio.Event()
        self._sync_wanted_again = trio.Event()
        self._connectors: dict[str, TcpConnector] = {}
        self._dialers: dict[str, trio.CancelScope] = {}
        self._link_errors: dict[str, str] = {}
        self._links_changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Site {self.name} {self.site_id[:8]} links={len(self.router.links)}>"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        """False for a site loaded with `load_site`: changes are saved and take effect at its next start."""
        return self._nursery is not None

    @property
    def site_id(self) -> str:
        return self.identity.site_id

    @property
    def settings(self) -> Settings:
        return self.config.settings

    @property
    def _grants_path(self) -> Path:
        return self.site_dir / STATE_DIR / "grants.json"

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED) -> None:
        logs.SITE.set(self.name)  # every task started below logs as this site (they inherit the context)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.router.run)
            if self.config.link_port is not None:
                self.link_port = await nursery.start(self._serve_links, "link_port")
            if self.config.ws_port is not None:
                self.ws_port = await nursery.start(self._serve_links, "ws_port")
            for site_id in {c.site_id for g in self._grants.values() for c in g.issued}:
                self.router.limit_offers(site_id, self._granted_offers(site_id))
            for link in self.config.links:
                self.router.limit_offers(link.peer_id, link.offers)
                self._start_dialer(link)
            self._add_connectors(self.config.connectors)  # one new version of this site's record for all
            for listener in self.config.listeners:
                try:
                    await self._start_listener(listener)
                except FabricError as exc:
                    self._listener_errors[listener.name] = str(exc)
                    log.error("%s", exc, extra=logs.event("listener_failed", reason=exc))
            if self.config.service_sync:
                nursery.start_soon(self._sync_services)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self.router.close_links()

    # -- links: accepting --------------------------------------------------------------

    async def _serve_links(self, field: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links on the port config `field` names: "link_port" (TLS) or "ws_port" (TLS in WebSocket)."""
        port = getattr(self.config, field)
        websocket = field == "ws_port"
        what = "WebSocket link port" if websocket else "link port"
        listener = await listen_tcp(self.config.link_host, port, what=f"site {self.name}'s {what}")
        bound = listener.socket.getsockname()[1]
        if port == 0:
            # Keep the port that was picked: tokens and peers' links point at it,
            # so the next start must listen there again.
            self._save(attrs.evolve(self.config, **{field: bound}))
        task_status.started(bound)
        await trio.serve_listeners(functools.partial(self._accept_link, websocket=websocket), [listener])

    async def _accept_link(self, tcp: trio.SocketStream, *, websocket: bool = False) -> None:
        """One connection to a link port, from its first byte to the link's end. Whatever goes
        wrong with it ends it alone: an exception out of here would end the site (serve_listeners)."""
        where = peer_address(tcp)  # (never raises: the one line outside the try)
        stream: trio.abc.Stream = tcp
        try:
            source = _source_of(tcp)
            pending = self._pending_handshakes
            if pending.total() >= MAX_PENDING_HANDSHAKES or pending[source] >= MAX_PENDING_PER_SOURCE:
                self._refuse_handshake(source)
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
                    stream = await accept_tls(stream, self._server_context)
                    decoder = FrameDecoder()
                    first = await read_frame(stream, decoder)
                    if first.type is FrameType.REDEEM:
                        await self._answer_redeem(stream, first.payload, where)
                        return
                    link = await self._accept_hello(stream, decoder, first)
            finally:
                pending[source] -= 1
                if not pending[source]:
                    del pending[source]
            await self._serve_link(link, f"link from {link.peer.name} ({where})", f"{link.peer.name} ({where})")
        except trio.TooSlowError:
            why = f"handshake did not finish within {self.settings.handshake_timeout:g} s"
            self._handshake_failed(
                ("timeout", websocket), logging.WARNING, "link from %s: %s", where, why, "handshake_timeout"
            )
        except LinkError as exc:  # ProtocolError and FrameError included
            if isinstance(stream, trio.SSLStream):
                # A certified peer is a cause of its own: a flood from strangers cannot hide that a
                # site this one knows (say, a revoked one) is being refused.
                cause = ("refused", websocket, exc.code, stream.getpeercert(binary_form=True))
            else:
                cause = ("tls", websocket)  # TLS, or the WebSocket upgrade before it, failed
            self._handshake_failed(cause, logging.WARNING, "link from %s refused: %s", where, exc, "link_refused")
            if isinstance(stream, trio.SSLStream):  # tell the peer why, inside TLS; never in clear text
                with trio.move_on_after(0.5, shield=True):
                    try:
                        await stream.send_all(goaway_frame(exc.code or Reason.PROTOCOL, str(exc)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # Whoever connected went away mid-handshake: their loss, nobody else's.
            why = exc.__cause__ or exc
            self._handshake_failed(
                ("lost", websocket), logging.INFO, "link from %s: connection lost during the handshake: %s", where, why,
                "handshake_lost",
            )
        except FabricError as exc:
            self._handshake_failed(("error", websocket), logging.WARNING, "link from %s: %s", where, exc, "link_refused")
        except Exception as exc:
            self._handshake_failed(
                ("bug", websocket), logging.ERROR,
                "link from %s: unexpected failure; this connection is dropped, the site goes on: %s", where, repr(exc),
                "link_failed", exc_info=True,
            )
        finally:
            await trio.aclose_forcefully(stream)

    def _handshake_failed(
        self, cause: tuple, level: int, message: str, where: str, why: object, event: str, *, exc_info: bool = False
    ) -> None:
        """Log a failed handshake: the first of its cause in logs.LINE_INTERVAL at `level`, saying how
        many were held back before it, the others at debug. Strangers can fail handshakes at will."""
        held = self._refusals_log.admit(cause, trio.current_time())
        log.log(
            logging.DEBUG if held is None else level, message + "%s", where, why, logs.held_back(held or 0),
            exc_info=exc_info, extra=logs.event(event, peer=where, reason=why),
        )

    def _refuse_handshake(self, source: str) -> None:
        """Count a connection refused for want of a handshake slot; say so now and then, not per connection."""
        held = self._refusals_log.admit("slots", trio.current_time())
        if held is None:
            return
        pending = self._pending_handshakes
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
        if self._revoked(pki.cert_serial(der)):
            raise LinkError(f"the certificate of site {peer_id[:8]} was revoked here", code=Reason.NOT_AUTHORIZED)
        local = self._hello(cost=0)
        peer = read_hello_untrusted(first, local)
        if peer.site_id != peer_id:
            raise LinkError(f"HELLO names site {peer.site_id[:8]} but its certificate is for {peer_id[:8]}")
        # Its certificate says the name it redeemed the token with: it cannot call itself anything else.
        self._check_name_bound(peer.name, der, code=Reason.NOT_AUTHORIZED)
        self._check_modes(peer.mode, peer.name)
        self.router.limit_offers(peer_id, self._granted_offers(peer_id))  # (the first link after a redemption)
        await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_message(local)))
        return self._make_link(stream, decoder, local=local, peer=peer, dialer=False, cost=max(1, peer.cost))

    async def _answer_redeem(self, stream: trio.SSLStream, payload: bytes, where: str) -> None:
        request = decode_message_untrusted(payload, Redeem)
        try:
            self._check_modes(request.mode, request.name)
            peer_id = pki.csr_site_id(request.csr_pem.encode())
            if (revoked := self._revoked_sites.get(peer_id)) is not None:
                # Known by its key, whatever token it brings and whatever name it gives now.
                raise LinkError(f"site {revoked} ({peer_id[:8]}) was revoked by site {self.name}", code=Reason.NOT_AUTHORIZED)
            grant = pki.spend_grant(self._grants, request.token_id, request.secret, now=time.time())
            cert_pem, serial = pki.sign_csr(self.identity, request.csr_pem.encode())
        except (LinkError, TokenError) as exc:
            if isinstance(exc, LinkError):
                code, why = exc.code or Reason.PROTOCOL, f"{exc}; the token is not spent"
            else:
                code = next((c for c, cls in _TOKEN_ERRORS.items() if isinstance(exc, cls)), Reason.TOKEN_INVALID)
                why = str(exc)
            held = self._refusals_log.admit(("redeem", code), trio.current_time())
            log.log(
                logging.DEBUG if held is None else logging.WARNING,
                "token redemption from %s refused: %s%s", where, exc, logs.held_back(held or 0),
                extra=logs.event("redeem_refused", peer=where, reason=exc),
            )
            await stream.send_all(goaway_frame(code, why))
            return
        grant = attrs.evolve(grant, issued=(*grant.issued, pki.IssuedCert(serial=serial, site_id=peer_id, name=request.name)))
        self._grants = {**self._grants, grant.token_id: grant}
        await self._save_grants()
        log.info(
            "token %s redeemed by site %s (%s); certificate serial %x", grant.token_id, request.name, where, serial,
            extra=logs.event("token_redeemed", peer=f"{request.name} ({where})"),
        )
        answer = RedeemOk(cert_pem=cert_pem.decode(), issuer_id=self.site_id, issuer_name=self.name)
        await stream.send_all(encode_frame(FrameType.REDEEM_OK, 0, encode_message(answer)))

    # -- links: dialling -----------------------------------------------------------------

    def _start_dialer(self, link: LinkConfig) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._dialers[link.name] = scope
        self._nursery.start_soon(self._dial_loop, link, scope)

    def _link_error(self, name: str, why: str | None) -> None:
        """Why outgoing link `name` is not up (None: it is), as status shows it."""
        if why is None:
            self._link_errors.pop(name, None)
        else:
            self._link_errors[name] = why
        self._links_changed.set()
        self._links_changed = trio.Event()

    async def wait_links_changed(self) -> None:
        """Return at the next change of an outgoing link's state: up, down, or why it failed."""
        await self._links_changed.wait()

    async def _dial_loop(self, config: LinkConfig, scope: trio.CancelScope) -> None:
        """Keep one outgoing link up: dial, serve, and redial with capped exponential backoff and jitter."""
        logs.SITE.set(self.name)  # started by redeem_token too, from a task outside the site
        backoff = self.settings.reconnect_min
        with scope:
            while True:
                # The link's config as it is now: `update_link` may have changed its cost.
                config = next((l for l in self.config.links if l.name == config.name), config)
                started = trio.current_time()
                try:
                    link = await self._dial_link(config)
                except (FabricError, OSError) as exc:  # LinkError, or a damaged links/ directory
                    if (advice := _FINAL_REFUSALS.get(getattr(exc, "code", None))) is not None:
                        # Redialling would only be refused again, every time.
                        why = f"{exc}; not dialling again: {advice}"
                        self._link_error(config.name, why)
                        log.error("link %s: %s", config.name, why, extra=logs.event("link_refused", peer=config.name, reason=why))
                        await trio.sleep_forever()
                    self._link_error(config.name, str(exc))
                    log.warning("link %s: %s", config.name, exc, extra=logs.event("link_dial_failed", peer=config.name, reason=exc))
                else:
                    self._link_error(config.name, None)
                    # Keyed by the link's own name, which status shows (the peer's name may differ).
                    self._link_error(config.name, await self._serve_link(link, f"link to {config.name}", config.name))
                if trio.current_time() - started > self.settings.reconnect_max:
                    backoff = self.settings.reconnect_min  # it was up a while: start over quickly
                await trio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self.settings.reconnect_max)

    async def _dial_link(self, config: LinkConfig) -> Link:
        certs = link_dir(self.site_dir, config.name)
        context = pki.client_context((certs / "ca.pem").read_bytes(), certs / "cert.pem", self.identity.key_path)
        errors = []
        for index, text in enumerate(config.addresses):
            try:
                with trio.fail_after(self.settings.handshake_timeout):
                    stream = await self._dial(text, context, config.proxy)
                    try:
                        link = await self._dial_hello(stream, config)
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except trio.TooSlowError:
                errors.append(f"{text}: no answer within {self.settings.handshake_timeout:g} s")
            except (LinkError, ValueError) as exc:
                if getattr(exc, "code", None) in _FINAL_REFUSALS:
                    raise  # the peer itself refuses this site: another address would say the same
                errors.append(str(exc))
            else:
                if index:
                    self._dial_first(config.name, text)
                return link
        raise LinkError("; ".join(errors) or "the link has no addresses")

    async def _dial(self, text: str, context, proxy_setting: str | None) -> trio.SSLStream:
        """The link's TLS stream to address `text`, through the proxy the setting or the environment names."""
        address = parse_address(text)
        proxy = proxy_for(address, proxy_setting)
        return await dial(address, context, proxy=proxy, ws_keepalive=self.settings.ws_keepalive_interval)

    def _dial_first(self, name: str, text: str) -> None:
        """Remember that link `name` got through at address `text`: it is tried first from now on."""
        links = tuple(
            attrs.evolve(l, addresses=(text, *(a for a in l.addresses if a != text))) if l.name == name else l
            for l in self.config.links
        )
        self._save(attrs.evolve(self.config, links=links))
        log.info("link %s: reached at %s, which is tried first from now on", name, text, extra=logs.event("link_address", peer=name))

    async def _dial_hello(self, stream: trio.SSLStream, config: LinkConfig) -> Link:
        der = stream.getpeercert(binary_form=True)
        server_id = pki.cert_site_id(der)
        if server_id != config.peer_id:
            raise LinkError(f"expected site {config.peer_id[:8]} but reached site {server_id[:8]}")
        local = self._hello(cost=config.cost)
        try:
            await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_message(local)))
            decoder = FrameDecoder()
            peer = read_hello_untrusted(await read_frame(stream, decoder), local)
        except trio.BrokenResourceError as exc:
            raise LinkError(f"peer {config.name} ended the handshake: {exc.__cause__ or exc}") from None
        if peer.site_id != server_id:
            raise LinkError(f"HELLO names site {peer.site_id[:8]} but its certificate is for {server_id[:8]}")
        self._check_name_bound(peer.name, der)
        self._check_modes(peer.mode, peer.name)
        return self._make_link(stream, decoder, local=local, peer=peer, dialer=True, cost=config.cost)

    @staticmethod
    def _check_name_bound(name: str, der: bytes, *, code: int | None = None) -> None:
        """A HELLO's name must be the one in the peer's certificate: names bind to keys, as ids do."""
        certified = pki.cert_site_name(der)
        if name != certified:
            raise LinkError(f"HELLO names site {name!r} but its certificate is for site {certified!r}", code=code)

    def _check_modes(self, peer_mode: str, peer_name: str) -> None:
        """Edge sites link only to interior sites: two edges would have no one to carry their traffic."""
        if self.config.mode == EDGE and peer_mode == EDGE:
            raise LinkError(
                f"site {self.name} and site {peer_name} are both edge sites; an edge site links only to interior sites",
                code=Reason.EDGE_TO_EDGE,
            )

    def _hello(self, cost: int):
        return make_hello(self.site_id, self.name, self.config.mode, self.incarnation, self.settings, cost)

    def _make_link(self, stream, decoder, *, local, peer, dialer: bool, cost: int) -> Link:
        return Link(
            stream, decoder, local=local, peer=peer, dialer=dialer, cost=cost, settings=self.settings, handler=self.router
        )

    async def _serve_link(self, link: Link, label: str, peer: str) -> str:
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

    # -- tokens --------------------------------------------------------------------------

    async def issue_token(
        self,
        *,
        redemptions_allowed: int = 1,
        expiration_window: float = 900.0,
        cost: int | None = None,
        link_urls: Sequence[str] | None = None,
        offers: Sequence[str] | None = None,
    ) -> pki.Token:
        """A token another site redeems to link to this one (default: one use, 15 minutes).

        The token tells the redeemer where to dial: `link_urls` (say the
        `wss://` address a reverse proxy exposes for this site's WebSocket
        port), tried in order; by default this site's own addresses, its TLS
        link port first. Works while the site is stopped too, once its ports
        are known. `offers`: the only routing keys the sites that redeem it
        may offer through their links here (None: any); this site ignores
        their other services.
        """
        fields = [f for f in ("link_port", "ws_port") if getattr(self.config, f) is not None]
        if not fields:
            raise FabricError(
                f"site {self.name} accepts no links: create it with link access (or a WebSocket port) to issue tokens"
            )
        if link_urls:
            if isinstance(link_urls, str):
                raise TokenError("link_urls must be a list of link addresses, not one string")
            addresses = list(link_urls)
        else:
            if any(self._known_port(f) == 0 for f in fields):
                raise FabricError(f"site {self.name} picks its link ports at its first start: start it once, then issue tokens")
            addresses = self._access_addresses()
        token, grant = pki.new_token(
            self.identity,
            addresses,
            now=time.time(),
            redemptions_allowed=redemptions_allowed,
            expiration_window=expiration_window,
            cost=cost,
            offers=offers,
        )
        self._grants = {**self._grants, grant.token_id: grant}
        await self._save_grants()
        return token

    async def _save_grants(self) -> None:
        """Write the grants as they are now; one writer at a time, so an older snapshot never lands last."""
        async with self._grants_lock:
            await trio.to_thread.run_sync(pki.save_grants, self._grants_path, self._grants)

    def _access_addresses(self) -> list[str]:
        """Where this site accepts links, as tokens and status give them: TLS first, then WebSocket."""
        addresses = []
        if port := self._known_port("link_port"):
            addresses.append(str(Address("tls", self.config.link_host, port)))
        if port := self._known_port("ws_port"):
            addresses.append(str(Address("ws", self.config.link_host, port, WS_PATH)))
        return addresses

    async def redeem_token(
        self,
        token: pki.Token | str | os.PathLike,
        *,
        name: str | None = None,
        cost: int | None = None,
        proxy: str | None = None,
    ) -> str:
        """Link to the token's issuer; returns the new link's name. The link is kept in the site dir.

        `proxy`: None, the proxy the environment names (HTTPS_PROXY, HTTP_PROXY,
        NO_PROXY); "none", directly; or "http://[user:password@]host:port".
        Kept with the link, which dials the same way.
        """
        if proxy is not None and proxy != NO_PROXY:
            try:
                parse_proxy(proxy)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not isinstance(token, pki.Token):
            token = await trio.to_thread.run_sync(pki.Token.load, Path(token))
        if token.issuer_id == self.site_id:
            raise TokenError("this token was issued by this site; redeem it at the site that should link here")
        if any(l.peer_id == token.issuer_id for l in self.config.links):
            raise TokenError(f"site {self.name} already has a link to site {token.issuer_name}")
        if token.issuer_id in self.router.links:
            raise TokenError(
                f"site {token.issuer_name} already links to site {self.name}; one link carries traffic both ways"
            )
        name = name or token.issuer_name
        certs = link_dir(self.site_dir, name)  # before anything is sent or written
        if any(l.name == name for l in self.config.links):
            raise TokenError(f"a link named {name!r} exists already: choose another name")
        cost = cost if cost is not None else (token.cost or 1)
        csr = pki.make_csr(self.identity)
        context = pki.client_context(token.ca_pem.encode())
        request = Redeem(
            token_id=token.token_id, secret=token.secret, name=self.name, csr_pem=csr.decode(), mode=self.config.mode
        )
        answer, used = await self._redeem(token, context, request, proxy)
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "ca.pem").write_text(token.ca_pem)
        (certs / "cert.pem").write_text(answer.cert_pem)
        addresses = (used, *(a for a in token.addresses if a != used))  # the one that worked first
        link = LinkConfig(name=name, peer_id=token.issuer_id, addresses=addresses, cost=cost, proxy=proxy)
        self._save(attrs.evolve(self.config, links=(*self.config.links, link)))
        if self.running:
            self._start_dialer(link)
        return name

    async def _redeem(self, token: pki.Token, context, request: Redeem, proxy: str | None) -> tuple[RedeemOk, str]:
        """The issuer's answer, and the address that gave it."""
        failures = []
        for text in token.addresses:
            try:
                with trio.fail_after(REDEEM_TIMEOUT):
                    stream = await self._dial(text, context, proxy)
            except trio.TooSlowError:
                failures.append(f"{text}: no answer within {REDEEM_TIMEOUT:g} s")
                continue
            except (LinkError, ValueError) as exc:
                failures.append(str(exc))
                continue
            try:
                with trio.fail_after(REDEEM_TIMEOUT):
                    if pki.cert_site_id(stream.getpeercert(binary_form=True)) != token.issuer_id:
                        raise TokenForgedError(f"{text} is not the site that issued this token")
                    await stream.send_all(encode_frame(FrameType.REDEEM, 0, encode_message(request)))
                    frame = await read_frame(stream, FrameDecoder())
            except (trio.TooSlowError, trio.BrokenResourceError, LinkError) as exc:
                failures.append(f"{text}: redemption did not finish: {exc}")
                continue
            finally:
                await trio.aclose_forcefully(stream)
            if frame.type is FrameType.REDEEM_OK:
                try:
                    answer = decode_message_untrusted(frame.payload, RedeemOk)
                except FrameError as exc:
                    raise TokenError(f"site {token.issuer_name} answered the redemption badly: {exc}") from None
                pki.check_issued_cert_untrusted(self.identity, answer.cert_pem, token.ca_pem)
                return answer, text
            if frame.type is FrameType.GOAWAY:
                code, text = decode_reason_untrusted(frame.payload)
                raise _TOKEN_ERRORS.get(code, TokenError)(f"site {token.issuer_name} refused the token: {text}")
            raise TokenError(f"site {token.issuer_name} answered the redemption with {frame.type.name}")
        raise IssuerUnreachableError(f"cannot reach site {token.issuer_name} to redeem the token: {'; '.join(failures)}")

    # -- connectors and listeners -------------------------------------------------------------

    async def create_connector(
        self,
        name: str,
        port: int,
        *,
        host: str = DEFAULT_CONNECTOR_HOST,
        routing_key: str | None = None,
        protocol: str = "tcp",
        allow: Sequence[str] = (),
    ) -> ConnectorConfig:
        """Offer `host:port` to the network under `routing_key` (default: the name).

        `protocol="http"` tells other sites that it speaks HTTP, so that their
        service sync listens for it with an HTTP listener. `allow`: the only
        sites whose flows it takes, by site id or name (empty: any site);
        the others are refused, NOT_AUTHORIZED. This site's own listeners
        always reach it.
        """
        if any(c.name == name for c in self.config.connectors):
            raise FabricError(f"connector {name!r} exists already")
        _check_protocol(protocol)
        config = _checked(
            ConnectorConfig,
            name=name, routing_key=routing_key or name, port=port, host=host, protocol=protocol, allow=allow,
        )
        self._check_policy(config.allow)
        if self.running:
            self._add_connectors([config])
        self._save(attrs.evolve(self.config, connectors=(*self.config.connectors, config)))
        self._resync()
        await trio.lowlevel.checkpoint()
        return config

    def _add_connectors(self, configs: Sequence[ConnectorConfig]) -> None:
        made = []
        for config in configs:
            connector = TcpConnector(config, dial_timeout=self.settings.dial_timeout)
            self._connectors[config.name] = connector
            made.append((config.routing_key, connector, config.allow))
        self.router.add_connectors(made)

    async def delete_connector(self, name: str) -> None:
        if not any(c.name == name for c in self.config.connectors):
            raise FabricError(f"no connector named {name!r}")
        connector = self._connectors.pop(name, None)
        if connector is not None:
            self.router.remove_connector(connector.config.routing_key, connector)
        self._save(attrs.evolve(self.config, connectors=tuple(c for c in self.config.connectors if c.name != name)))
        self._resync()
        await trio.lowlevel.checkpoint()

    async def create_listener(
        self,
        name: str,
        port: int,
        *,
        host: str = DEFAULT_LISTENER_HOST,
        routing_key: str | None = None,
        distribution: str = BALANCED,
        protocol: str = "tcp",
        providers: Sequence[str] = (),
    ) -> ListenerStatus:
        """Accept clients on `host:port` for `routing_key` (default: the name).

        Port 0 picks a free port: the result's `.port` is the bound one. While
        the site is stopped the listener is saved and bound at the next start.
        `distribution` is how each connection picks a provider: "balanced"
        (nearer ones first, farther ones as they fill) or "closest" (only the
        nearest). With `protocol="http"` each request picks its own.
        `providers`: the only sites it carries clients to, by site id or name
        (empty: any site that offers the key); while none of them is
        reachable, it accepts no clients (an HTTP listener answers 503).
        """
        if any(l.name == name for l in self.config.listeners):
            raise FabricError(f"listener {name!r} exists already")
        if distribution not in DISTRIBUTIONS:
            raise FabricError(f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
        _check_protocol(protocol)
        config = _checked(
            ListenerConfig,
            name=name, routing_key=routing_key or name, port=port, host=host, distribution=distribution, protocol=protocol,
            providers=providers,
        )
        self._check_policy(config.providers)
        if self.running:
            if (synced := self._synced.pop(config.routing_key, None)) is not None:
                await synced.aclose()  # a configured listener takes over from service sync (maybe its very port)
            await self._start_listener(config)
        self._save(attrs.evolve(self.config, listeners=(*self.config.listeners, config)))
        self._resync()
        return self._listener_status(config, self._listeners.get(name))

    def _check_policy(self, entries: tuple[str, ...]) -> None:
        """Refuse an entry that is a name several known sites carry: it would admit none of them."""
        try:
            check_unambiguous(entries, self.router.known_names())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _listener_state_changed(self) -> None:
        self._listeners_changed.set()
        self._listeners_changed = trio.Event()

    async def wait_listeners_changed(self) -> None:
        """Return at the next change to this site's listeners: made, deleted, accepting or not, failing."""
        await self._listeners_changed.wait()

    async def wait_listening(self, routing_key: str, *, accepting: bool = True) -> None:
        """Return once some listener here accepts clients for the key (with accepting=False: once none does)."""
        while any(l.accepting for l in self._all_listeners() if l.config.routing_key == routing_key) != accepting:
            await self._listeners_changed.wait()

    def _all_listeners(self) -> list[TcpListener]:
        return [*self._listeners.values(), *self._synced.values()]

    def _sync_wanted(self) -> SyncPlan:
        """What service sync holds now, for the keys other reachable sites offer and nothing here listens for."""
        configured = {l.routing_key for l in self.config.listeners}
        offers: dict[str, dict[str, tuple[int, str]]] = {}
        for record in self.router.gossip.table.values():
            if record.site_id == self.site_id or record.site_id not in self.router.routes:
                continue
            for service in record.services:
                key = service.routing_key
                if (
                    service.connectors
                    and service.port
                    and key not in configured
                    and key not in self.router.connectors
                    and self.router.accepts_offer(record.site_id, key)
                ):
                    offers.setdefault(key, {})[record.site_id] = (service.port, service.protocol)
        return plan_service_sync(
            offers,
            self._sync_holds,
            total=self.settings.max_auto_listeners,
            per_site=self.settings.max_auto_listeners_per_site,
        )

    async def _sync_services(self) -> None:
        """Service sync: keep a listener on the service host for each key offered elsewhere, within the limits."""
        assert self._nursery is not None
        host = self.config.service_host
        while True:
            # Taken before looking: a change while this pass runs (it awaits) wakes the next one.
            changed = self.router.next_change()
            self._sync_wanted_again = trio.Event()
            plan = self._sync_wanted()
            gone = [key for key in self._synced if key not in plan.holds]
            for key in gone:
                await self._synced.pop(key).aclose()
                self._listener_state_changed()
            if gone:
                log.info("service sync: closed the listener(s) for %s (no site offers them any more)", ", ".join(map(repr, gone)))
            self._sync_holds = dict(plan.holds)
            opened: list[str] = []
            for key in plan.new:
                hold = plan.holds[key]
                config = ListenerConfig(name=key, routing_key=key, port=hold.port, host=host, protocol=hold.protocol)
                listener = _LISTENERS[config.protocol](config, self.router, auto=True, on_state=self._listener_state_changed)
                try:
                    await self._nursery.start(listener.run)
                except FabricError as exc:
                    self._sync_holds[key] = attrs.evolve(hold, error=str(exc))
                    continue
                self._synced[key] = listener
                self._listener_state_changed()  # it may have started accepting before it was listed
                opened.append(f"{key!r} on port {hold.port}")
            if opened:
                log.info("service sync: listening on %s for %s", host, ", ".join(opened))
            self._sync_refused(plan)
            if not self._sync_wanted_again.is_set():
                async with trio.open_nursery() as wait:  # for a gossip change, a change made here, or a line due

                    async def on(event_wait) -> None:
                        await event_wait()
                        wait.cancel_scope.cancel()

                    wait.start_soon(on, changed.wait)
                    wait.start_soon(on, self._sync_wanted_again.wait)
                    if self._sync_unlogged:
                        due = min(self._sync_logged_at[cause] for cause in self._sync_unlogged) + logs.LINE_INTERVAL
                        wait.start_soon(on, functools.partial(trio.sleep_until, due))

    def _sync_refused(self, plan: SyncPlan) -> None:
        """Keep the keys service sync does not listen for, with why, for status; log one line per cause, now and then."""
        errors: dict[str, tuple[int, str]] = {}  # routing key -> (port, why), for status
        said: dict[str, tuple[str, str]] = {}  # routing key -> (cause, why), for the log
        for key, hold in self._sync_holds.items():
            if hold.error is not None:
                errors[key], said[key] = (hold.port, hold.error), (SYNC_BIND, hold.error)
        for key, refusal in plan.refused.items():
            why = self._sync_refusal_text(refusal)
            errors[key], said[key] = (refusal.port, f"not listened for: {why}"), (refusal.cause, why)
        for key in sorted(errors):
            if self._sync_errors.get(key) != errors[key]:  # newly refused, or for another reason
                cause, why = said[key]
                count = self._sync_unlogged.get(cause, (0, "", ""))[0]
                self._sync_unlogged[cause] = (count + 1, key, why)
        if errors != self._sync_errors:
            self._sync_errors = errors
            self._listener_state_changed()
        now = trio.current_time()
        for cause, (count, key, why) in sorted(self._sync_unlogged.items()):
            if cause not in self._sync_logged_at or now - self._sync_logged_at[cause] >= logs.LINE_INTERVAL:
                log.warning(
                    "service sync: %d routing key(s) not listened for since the last such line, such as %r: %s",
                    count, key, why, extra=logs.event("sync_refused", reason=why, routing_key=key),
                )
                del self._sync_unlogged[cause]
                self._sync_logged_at[cause] = now

    def _sync_refusal_text(self, refusal: SyncRefusal) -> str:
        if refusal.cause == SYNC_LOW_PORT:
            return f"port {refusal.port} is below {SYNC_MIN_PORT} (service sync takes no privileged port)"
        if refusal.cause == SYNC_CAP:
            return f"{self.settings.max_auto_listeners} automatic listeners here already (max_auto_listeners)"
        names = ", ".join(self.router.name_of(site) for site in refusal.providers)
        one = len(refusal.providers) == 1
        return (
            f"{'site' if one else 'sites'} {names}, which {'offers' if one else 'offer'} it, "
            f"{'has' if one else 'each have'} {self.settings.max_auto_listeners_per_site} automatic listeners here "
            "already (max_auto_listeners_per_site)"
        )

    async def _as_site(self, run, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """`run(task_status=...)`, logging as this site even when a caller outside it started it."""
        logs.SITE.set(self.name)
        await run(task_status=task_status)

    def _resync(self) -> None:
        """Listeners or connectors changed here: service sync looks again at once (even if busy now)."""
        self._sync_wanted_again.set()

    async def _start_listener(self, config: ListenerConfig) -> TcpListener:
        assert self._nursery is not None
        router = self.router.within(config.providers)
        listener = _LISTENERS[config.protocol](config, router, on_state=self._listener_state_changed)
        await self._nursery.start(self._as_site, listener.run)
        self._listeners[config.name] = listener
        self._listener_errors.pop(config.name, None)
        log.info("listener %s on %s:%s for %r", config.name, config.host, listener.port, config.routing_key)
        return listener

    async def delete_listener(self, name: str) -> None:
        if not any(l.name == name for l in self.config.listeners):
            raise FabricError(f"no listener named {name!r}")
        listener = self._listeners.pop(name, None)
        self._listener_errors.pop(name, None)
        if listener is not None:
            await listener.aclose()
        self._save(attrs.evolve(self.config, listeners=tuple(l for l in self.config.listeners if l.name != name)))
        self._resync()

    async def wait_reachable(self, routing_key: str, *, providers: int = 1) -> None:
        """Return once `providers` reachable sites (this one included) have a connector for the key,
        and this site's listeners for it accept clients (or have reported why they cannot)."""
        await self.router.wait_reachable(routing_key, providers=providers)
        for listener in list(self._listeners.values()):
            if listener.config.routing_key == routing_key:
                await listener.wait_accepting()

    async def wait_linked(self, site_id: str, *, up: bool = True) -> None:
        """Return once a live link with the site is up, either direction; with `up=False`, once none is left."""
        await self.router.wait_linked(site_id, up=up)

    def network_status(self) -> NetworkStatus:
        router = self.router
        sites = []
        for record in router.gossip.table.values():
            me = record.site_id == self.site_id
            route = router.routes.get(record.site_id)
            links = []
            for info in record.links:
                live = router.links.get(info.peer) if me else None
                rtt = live.rtt if live is not None else info.rtt
                links.append(
                    NetworkLink(info.peer, router.name_of(info.peer), info.cost, None if rtt is None else round(rtt * 1000, 3))
                )
            sites.append(
                NetworkSite(
                    site_id=record.site_id,
                    name=record.name,
                    mode=record.mode,
                    reachable=me or route is not None,
                    cost=0.0 if me else (route.cost if route else None),
                    links=tuple(sorted(links, key=lambda l: l.peer_name)),
                    services=tuple(sorted(s.routing_key for s in record.services if s.connectors)),
                    name_shared=len(router.sites_named(record.name)) > 1,
                )
            )
        keys = sorted({s.routing_key for r in router.gossip.table.values() for s in r.services} | {
            l.routing_key for l in self.config.listeners
        })
        ignored = router.ignored_offers()
        services = []
        notes = []
        for key in keys:
            providers = router.providers(key)
            offering = [*providers, *sorted(ignored.get(key, ()))]
            service = NetworkService(
                routing_key=key,
                providers=tuple(sorted(router.label(p) for p in providers)),
                listeners=tuple(l.name for l in self.config.listeners if l.routing_key == key),
                shared=len(offering) > 1,
                ignored=tuple(sorted(router.label(p) for p in ignored.get(key, ()))),
            )
            services.append(service)
            if service.shared:
                notes.append(
                    f"routing key {key!r} is offered by {len(offering)} sites: "
                    + ", ".join(router.describe(p) for p in offering)
                    + (f" (ignored here: {', '.join(service.ignored)})" if service.ignored else "")
                )
        return NetworkStatus(
            sites=tuple(sorted(sites, key=lambda s: (s.cost is None, s.cost or 0, s.name))),
            services=tuple(services),
            notes=(*notes, *self._name_notes()),
        )

    def _name_notes(self) -> list[str]:
        """A line for each name that several known sites carry: by name, a policy admits none of them."""
        return [
            f"{len(ids)} sites are named {name}*: {', '.join(ids)} (name them by site id)"
            for name, ids in sorted(self.router.shared_names().items())
        ]

    @staticmethod
    def _dial_status(config: LinkConfig) -> dict:
        """How an outgoing link is dialled, for status: transport, first address, proxy."""
        try:
            address = parse_address(config.addresses[0])
            proxy = proxy_for(address, config.proxy)
        except ValueError as exc:
            return {"address": config.addresses[0], "proxy": f"bad proxy setting: {exc}"}
        return {"transport": address.scheme, "address": str(address), "proxy": None if proxy is None else str(proxy)}

    def _known_port(self, field: str) -> int | None:
        """The bound "link_port" or "ws_port"; for a stopped site, the configured one (0: not picked yet)."""
        return getattr(self, field) if self.running else getattr(self.config, field)

    def _listener_status(self, config: ListenerConfig, running: TcpListener | None) -> ListenerStatus:
        return ListenerStatus(
            name=config.name,
            routing_key=config.routing_key,
            host=config.host,
            port=running.port if running else config.port,
            connections=running.connections if running else 0,
            accepting=running.accepting if running else False,
            error=(self._policy_error(config) or running.error) if running else self._listener_errors.get(config.name),
            auto=running.auto if running else False,
            distribution=config.distribution,
            protocol=config.protocol,
            http=running.stats() if isinstance(running, HttpListener) else None,
            providers=config.providers,
            policy_notes=policy_notes(config.providers, self.router.known_names()),
        )

    def _policy_error(self, config: ListenerConfig) -> str | None:
        """Why a running listener has no provider, when sites offer its key but its policy admits none of them."""
        key, router = config.routing_key, self.router
        if not config.providers or router.providers(key, config.providers) or not (offered := router.providers(key)):
            return None
        return (
            f"no reachable site its provider policy admits offers routing key {key!r}; "
            f"{', '.join(router.describe(p) for p in offered)} {'offers' if len(offered) == 1 else 'offer'} it"
        )

    # -- links ---------------------------------------------------------------------------------

    def _outgoing(self, name: str) -> LinkConfig:
        for link in self.config.links:
            if link.name == name:
                return link
        raise FabricError(
            f"no link named {name!r} at site {self.name} (links made with another site's token are changed there)"
        )

    async def update_link(
        self,
        name: str,
        *,
        cost: int | object = _UNSET,
        proxy: str | object | None = _UNSET,
        offers: Sequence[str] | object | None = _UNSET,
    ) -> None:
        """Change an outgoing link's cost, proxy setting or offers (see `redeem_token`).

        `offers`: the only routing keys the linked site may offer through this
        link (None: any); this site ignores its services outside them. A
        running site applies a cost and offers at once, without dropping the
        link, and a proxy setting the next time it dials the link.
        """
        changes = {k: v for k, v in dict(cost=cost, proxy=proxy, offers=offers).items() if v is not _UNSET}
        try:
            link = attrs.evolve(self._outgoing(name), **changes)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"link {name}: {exc}") from None
        self._save(attrs.evolve(self.config, links=tuple(link if l.name == name else l for l in self.config.links)))
        self.router.set_link_cost(link.peer_id, link.cost)
        if self.running:
            self.router.limit_offers(link.peer_id, link.offers)
        await trio.lowlevel.checkpoint()

    async def delete_link(self, name: str) -> None:
        """Remove an outgoing link: stop dialling, drop it if up, forget its certificate."""
        link = self._outgoing(name)
        self._save(attrs.evolve(self.config, links=tuple(l for l in self.config.links if l.name != name)))
        if (dialer := self._dialers.pop(name, None)) is not None:
            dialer.cancel()
        if (live := self.router.links.get(link.peer_id)) is not None:
            live.close(Reason.SHUTDOWN, f"site {self.name} deleted its link")
        if self.running:
            self.router.limit_offers(link.peer_id, None)
        await trio.to_thread.run_sync(shutil.rmtree, link_dir(self.site_dir, name), True)

    async def revoke_link(self, name: str) -> int:
        """Revoke the certificates this site issued to site `name` (or id), and with them the site itself.

        From now on this site refuses those certificates (and drops the
        site's live link), any redemption by that site's key whatever the
        token, any further use of the tokens it redeemed (it knows their
        secret), and flows to this site's connectors that claim to come from
        it. Other sites still link with it and carry its traffic. Returns how
        many certificates were revoked. A name that certificates of several
        sites carry is refused: give the site id.
        """
        live_certs = [c for g in self._grants.values() for c in g.issued if not c.revoked]
        carriers = {c.site_id for c in live_certs if c.name == name}
        if len(carriers) > 1:
            raise FabricError(ambiguity(name, carriers))
        peers = carriers or {c.site_id for c in live_certs if c.site_id == name}
        if not peers:
            raise FabricError(f"site {self.name} issued no certificate to a site named {name!r} that is not revoked already")
        grants, revoked = {}, 0
        for token_id, grant in self._grants.items():
            issued = []
            for cert in grant.issued:
                if cert.site_id in peers and not cert.revoked:  # every certificate of the site, whatever name it gave
                    cert, revoked = attrs.evolve(cert, revoked=True), revoked + 1
                issued.append(cert)
            withdrawn = grant.withdrawn or any(c.site_id in peers for c in issued)
            grants[token_id] = attrs.evolve(grant, issued=tuple(issued), withdrawn=withdrawn)
        self._grants = grants
        self._revoked_sites = pki.revoked_sites(grants)
        await self._save_grants()
        for peer in peers:
            if (live := self.router.links.get(peer)) is not None and not live.dialer:
                live.close(Reason.NOT_AUTHORIZED, f"site {self.name} revoked the certificate of this link")
        return revoked

    def _granted_offers(self, site_id: str) -> frozenset[str] | None:
        """The routing keys a site that redeemed tokens here may offer through its link: what its
        tokens allowed, together (None: any, as soon as one of them allowed any, or none is in force)."""
        limits = [
            grant.offers
            for grant in self._grants.values()
            if any(c.site_id == site_id and not c.revoked for c in grant.issued)
        ]
        return None if not limits or None in limits else frozenset().union(*limits)

    def _revoked(self, serial: int) -> bool:
        return any(c.serial == serial and c.revoked for g in self._grants.values() for c in g.issued)

    def _refused_origin(self, origin: str) -> str | None:
        """Why flows to this site's connectors from site `origin` are refused: it was revoked here (None: they are not).

        The origin is what the flow claims: this stops a revoked site that
        runs fabric as it is, not one changed to claim another site's id.
        """
        name = self._revoked_sites.get(origin)
        if name is None:
            return None
        why = f"site {self.name} revoked site {name} ({origin[:8]}): it takes no flows from it"
        if (held := self._refusals_log.admit(("origin", origin), trio.current_time())) is not None:
            log.warning(
                "flow from site %s refused: %s%s", name, why, logs.held_back(held),
                extra=logs.event("flow_refused", peer=name, reason=why),
            )
        return why

    def _save(self, config: SiteConfig) -> None:
        self.config = config
        save_config(self.site_dir, config)

    # -- status ------------------------------------------------------------------------------

    def _hop_status(self, hop) -> HopStatus:
        link = self.router.links.get(hop.peer)
        rtt = link.rtt if link is not None else None
        return HopStatus(
            name=self.router.name_of(hop.peer),
            cost=hop.cost,
            rtt_ms=None if rtt is None else round(rtt * 1000, 3),
            flows=self.router.active[hop.peer],
        )

    def status(self) -> SiteStatus:
        router = self.router
        links = []
        outgoing = {l.peer_id: l for l in self.config.links}
        ignored = router.ignored_offers()
        for link in router.links.values():
            config = outgoing.get(link.peer_id)
            links.append(
                LinkStatus(
                    name=config.name if config else link.peer.name,
                    peer_id=link.peer_id,
                    direction="outgoing" if link.dialer else "incoming",
                    cost=link.cost,
                    up=not link.closed,
                    rtt_ms=None if link.rtt is None else round(link.rtt * 1000, 3),
                    flows=link.flow_count,
                    **(self._dial_status(config) if config else {
                        "transport": transport_of(link.stream), "address": peer_address(link.stream),
                    }),
                    **self._offers_status(link.peer_id, config, ignored),
                )
            )
        for config in self.config.links:
            if config.peer_id not in router.links:
                links.append(
                    LinkStatus(
                        name=config.name,
                        peer_id=config.peer_id,
                        direction="outgoing",
                        cost=config.cost,
                        up=False,
                        rtt_ms=None,
                        flows=0,
                        error=self._link_errors.get(config.name),
                        **self._dial_status(config),
                        **self._offers_status(config.peer_id, config, ignored),
                    )
                )
        sites = []
        ages = {s.site_id: s.age for s in router.gossip.status()}
        for record in router.gossip.table.values():
            if record.site_id == self.site_id:
                continue
            route = router.routes.get(record.site_id)
            sites.append(
                SiteInfo(
                    site_id=record.site_id,
                    name=record.name,
                    mode=record.mode,
                    reachable=route is not None,
                    cost=route.cost if route else None,
                    next_hops=tuple(self._hop_status(h) for h in route.next_hops) if route else (),
                    age_s=round(ages.get(record.site_id, 0.0), 1),
                    services=tuple(sorted(s.routing_key for s in record.services if s.connectors)),
                    route_changes=router.route_changes[record.site_id],
                    name_shared=len(router.sites_named(record.name)) > 1,
                )
            )
        keys = sorted({s.routing_key for r in router.gossip.table.values() for s in r.services})
        services = tuple(
            ServiceStatus(
                routing_key=key,
                providers=tuple(
                    sorted(
                        (
                            ProviderStatus(router.label(c.site_id), c.cost, c.outstanding, round(c.penalty, 1))
                            for c in router.candidates(key)
                        ),
                        key=lambda p: p.name,
                    )
                ),
            )
            for key in keys
        )
        listeners = [self._listener_status(c, self._listeners.get(c.name)) for c in self.config.listeners]
        listeners += [self._listener_status(l.config, l) for l in self._synced.values()]
        listeners += [
            ListenerStatus(key, key, self.config.service_host, port, 0, False, error, auto=True)
            for key, (port, error) in sorted(self._sync_errors.items())
        ]
        connectors = [self._connector_status(c) for c in self.config.connectors]
        access = self._access_addresses()
        return SiteStatus(
            site_id=self.site_id,
            name=self.name,
            mode=self.config.mode,
            link_address=next((a for a in access if a.startswith("tls:")), None),
            ws_address=next((a for a in access if a.startswith("ws:")), None),
            links=tuple(sorted(links, key=lambda l: l.name)),
            sites=tuple(sorted(sites, key=lambda s: s.name)),
            services=services,
            listeners=tuple(listeners),
            connectors=tuple(connectors),
            notes=tuple(self._name_notes()),
        )

    def _offers_status(self, peer_id: str, config: LinkConfig | None, ignored: dict[str, set[str]]) -> dict:
        """What a linked site may offer through its link (as applied, or as configured while stopped), and
        which of its offers are ignored for that, for status."""
        limit = self.router.offer_limit(peer_id)
        if self.running:
            offers = None if limit is None else tuple(sorted(limit))
        else:
            offers = config.offers if config else None
        return {"offers": offers, "ignored": tuple(sorted(k for k, sites in ignored.items() if peer_id in sites))}

    def _connector_status(self, config: ConnectorConfig) -> ConnectorStatus:
        slot = self.router.connectors.get(config.routing_key)
        refused_from = slot.refused_origin if slot else None
        return ConnectorStatus(
            config.name,
            config.routing_key,
            config.host,
            config.port,
            allow=config.allow,
            policy_notes=policy_notes(config.allow, self.router.known_names()),
            refused=slot.refused if slot else 0,
            refused_from=None if refused_from is None else self.router.describe(refused_from),
        )


# -- opening ------------------------------------------------------------------------------


def _load(site_dir: Path) -> tuple[pki.Identity, SiteConfig]:
    """A site directory's identity and config, checked. Blocking."""
    if not site_dir.is_dir():
        raise ConfigError(f"no site directory at {site_dir}: create one with `fabric site create NAME`")
    config = load_config(site_dir)
    return pki.load_identity(site_dir), config


def _incarnation(site_dir: Path, *, advance: bool) -> int:
    counter = site_dir / STATE_DIR / "incarnation"
    try:
        current = int(counter.read_text()) if counter.exists() else 0
    except ValueError:
        raise ConfigError(f"{counter} does not hold a number") from None
    if advance:
        counter.parent.mkdir(exist_ok=True)
        # Atomically: `site status` reads it while the site starts, and a kill must not leave it empty.
        write_private_atomic(counter, f"{current + 1}\n".encode())
        return current + 1
    return current


def create_site(
    site_dir: str | os.PathLike,
    name: str,
    *,
    link_host: str = DEFAULT_LINK_HOST,
    link_port: int | None = None,
    ws_port: int | None = None,
    mode: str = "interior",
    service_sync: bool = True,
    service_host: str = DEFAULT_LISTENER_HOST,
    settings: Settings | None = None,
) -> None:
    """Write a new site directory (identity, CA, config); refuses to touch an existing one. Blocking."""
    site_dir = Path(site_dir)
    if config_path(site_dir).exists() or (site_dir.exists() and any(site_dir.iterdir())):
        raise ConfigError(f"{site_dir} is not empty: a site is there already, or other files are")
    try:
        config = SiteConfig(
            name=name,
            link_host=link_host,
            link_port=link_port,
            ws_port=ws_port,
            mode=mode,
            service_sync=service_sync,
            service_host=service_host,
            settings=settings or Settings(),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    existed = site_dir.exists()
    site_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(site_dir, 0o700)
        pki.create_identity(site_dir, name)
        (site_dir / STATE_DIR).mkdir(exist_ok=True)
        save_config(site_dir, config)
    except BaseException:
        # Leave nothing half made, or a retry would find the directory "not empty".
        if not existed:
            shutil.rmtree(site_dir, ignore_errors=True)
        for child in site_dir.iterdir() if existed else ():  # it was empty
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise


async def load_site(site_dir: str | os.PathLike) -> Site:
    """A stopped site, to read its status or change its config (taking effect at its next start)."""
    site_dir = Path(site_dir)
    identity, config = await trio.to_thread.run_sync(_load, site_dir)
    return Site(site_dir, identity, config, await trio.to_thread.run_sync(functools.partial(_incarnation, site_dir, advance=False)))


def _prepare(name: str, site_dir: Path, overrides: dict) -> tuple[pki.Identity, SiteConfig, int]:
    """Create the site directory on first use, load it otherwise; raise the incarnation. Blocking."""
    if not config_path(site_dir).exists():
        create_site(site_dir, name, **overrides)
        overrides = {}
    identity, config = _load(site_dir)
    if config.name != name:
        raise ConfigError(f"{site_dir} holds site {config.name!r}, not {name!r}")
    if overrides:
        config = attrs.evolve(config, **overrides)
        save_config(site_dir, config)
    return identity, config, _incarnation(site_dir, advance=True)


@asynccontextmanager
async def open_site(
    name: str,
    site_dir: str | os.PathLike,
    *,
    link_port: int | object | None = _UNSET,
    ws_port: int | object | None = _UNSET,
    link_host: str | object = _UNSET,
    mode: str | object = _UNSET,
    settings: Settings | object = _UNSET,
    service_sync: bool | object = _UNSET,
    service_host: str | object = _UNSET,
) -> AsyncIterator[Site]:
    """Run a site for the duration of the block.

    The directory is created with a new identity on first use. `link_port=None`
    (the default for a new site) accepts no links; 0 picks a free port, see
    `site.link_port`. `ws_port` likewise accepts links as WebSockets (at
    /fabric), for reverse proxies and firewalls that let only HTTP through;
    see `site.ws_port`. Arguments given override what the directory's config holds.
    """
    overrides = {
        key: value
        for key, value in dict(
            link_port=link_port,
            ws_port=ws_port,
            link_host=link_host,
            mode=mode,
            settings=settings,
            service_sync=service_sync,
            service_host=service_host,
        ).items()
        if value is not _UNSET
    }
    try:
        identity, config, incarnation = await trio.to_thread.run_sync(_prepare, name, Path(site_dir), overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    site = Site(Path(site_dir), identity, config, incarnation)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(site.run)
            try:
                yield site
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure (the caller's, or the site's own) is raised as itself, not wrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise

