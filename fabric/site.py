"""Site: one Trio nursery that supervises a site's parts.

`open_site(...)` is the way in: it creates the site directory on first use
(identity, CA, config), starts everything, and yields a `Site` whose methods
are what the CLI does: issue and redeem tokens, create and delete listeners
and connectors, report status. The work is done by the parts it composes:
the router, the link handshakes, the dialer, the tokens, the listeners and
connectors, the config store; `Site` wires them and delegates to them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import logs, pki
from .config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_DISTRIBUTION,
    DEFAULT_LISTENER_HOST,
    DEFAULT_PROTOCOL,
    ConnectorConfig,
    Settings,
    SiteConfig,
)
from .errors import ConfigError, FabricError, TokenError, sole_exception
from .gossip.gossip import Gossip
from .gossip.records import sign_record
from .proxy.manager import ProxyManager
from .router.dialer import Dialer
from .router.frames import Reason
from .router.handshake import Handshakes, LinkSetup
from .router.router import Router
from .sitedir import SiteFiles, load, prepare
from .status import ListenerStatus, NetworkStatus, SiteStatus, SiteView, network_status, network_view, site_status
from .store import ConfigStore
from .tokens import Tokens

_UNSET = object()


class Site:
    """A site: running when made by `open_site`, stopped (config only) when made by `load_site`."""

    def __init__(self, files: SiteFiles) -> None:
        self.site_dir = files.site_dir
        self.identity = identity = files.identity
        self.incarnation = files.incarnation
        self.store = ConfigStore(files.site_dir, files.config)
        self.tokens = Tokens(identity, files.site_dir, files.config.name, files.grants)
        self.router = Router(
            site_id=identity.site_id, name=self.name, mode=self.config.mode, settings=self.settings,
            catalog=functools.partial(
                Gossip, site_id=identity.site_id, name=self.name, mode=self.config.mode, incarnation=self.incarnation,
                sign=functools.partial(sign_record, identity=identity), settings=self.settings,
            ),
            refuse_origin=self.tokens.refused_origin,
        )
        setup = LinkSetup(self.router, mode=self.config.mode, incarnation=self.incarnation, settings=self.settings)
        self.handshakes = Handshakes(self.router, setup, self.tokens, self.store, identity)
        self.dialer = Dialer(self.router, setup, self.store, identity)
        self.proxies = ProxyManager(self.router, self.store)
        self.running = False  # False for a site loaded with `load_site`: changes take effect at its next start

    def __repr__(self) -> str:
        return f"<Site {self.name} {self.site_id[:8]} links={len(self.router.links)}>"

    @property
    def link_port(self) -> int | None:
        """The port this running site accepts links on (TLS), if it does."""
        return self.handshakes.ports.get("link_port")

    @property
    def ws_port(self) -> int | None:
        """The port this running site accepts links on as WebSockets, if it does."""
        return self.handshakes.ports.get("ws_port")

    @property
    def config(self) -> SiteConfig:
        return self.store.config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def site_id(self) -> str:
        return self.identity.site_id

    @property
    def settings(self) -> Settings:
        return self.config.settings

    async def run(self, *, task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED) -> None:
        logs.SITE.set(self.name)  # every task started below logs as this site (they inherit the context)
        self.running = True
        async with trio.open_nursery() as nursery:
            await nursery.start(self.router.run)
            await nursery.start(self.handshakes.run)
            # What linked sites may offer here: as their tokens allowed, or as this site's own links say.
            for site_id in self.tokens.redeemers():
                self.router.limit_offers(site_id, self.tokens.granted_offers(site_id))
            for link in self.config.links:
                self.router.limit_offers(link.peer_id, link.offers)
            await nursery.start(self.dialer.run)
            await nursery.start(self.proxies.run)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self.router.close_links()

    # -- tokens and links ------------------------------------------------------------------

    async def issue_token(
        self,
        *,
        redemptions_allowed: int = pki.DEFAULT_REDEMPTIONS,
        expiration_window: float = pki.DEFAULT_EXPIRATION_WINDOW,
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
        if not (ports := self.handshakes.known_ports()):
            raise FabricError(
                f"site {self.name} accepts no links: create it with link access (or a WebSocket port) to issue tokens"
            )
        if link_urls and isinstance(link_urls, str):
            raise TokenError("link_urls must be a list of link addresses, not one string")
        if not link_urls and 0 in ports.values():
            raise FabricError(f"site {self.name} picks its link ports at its first start: start it once, then issue tokens")
        return await self.tokens.issue(
            list(link_urls or self.handshakes.addresses()),
            redemptions_allowed=redemptions_allowed, expiration_window=expiration_window, cost=cost, offers=offers,
        )

    async def redeem_token(
        self, token: pki.Token | str | os.PathLike, *, name: str | None = None, cost: int | None = None, proxy: str | None = None
    ) -> str:
        """Link to the token's issuer; returns the new link's name. The link is kept in the site dir.

        `proxy`: None, the proxy the environment names (HTTPS_PROXY, HTTP_PROXY,
        NO_PROXY); "none", directly; or "http://[user:password@]host:port".
        Kept with the link, which dials the same way.
        """
        return await self.dialer.redeem(token, name=name, cost=cost, proxy=proxy)

    async def update_link(
        self, name: str, *, cost: int | object = _UNSET, proxy: str | object | None = _UNSET,
        offers: Sequence[str] | object | None = _UNSET,
    ) -> None:
        """Change an outgoing link's cost, proxy setting or offers (see `redeem_token`).

        `offers`: the only routing keys the linked site may offer through this
        link (None: any); this site ignores its services outside them. A
        running site applies a cost and offers at once, without dropping the
        link, and a proxy setting the next time it dials the link.
        """
        changes = {k: v for k, v in dict(cost=cost, proxy=proxy, offers=offers).items() if v is not _UNSET}
        await self.dialer.update(name, **changes)

    async def delete_link(self, name: str) -> None:
        """Remove an outgoing link: stop dialling, drop it if up, forget its certificate."""
        await self.dialer.delete(name)

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
        revoked, peers = await self.tokens.revoke(name)
        for peer in peers:
            if (live := self.router.links.get(peer)) is not None and not live.dialer:
                live.close(Reason.NOT_AUTHORIZED, f"site {self.name} revoked the certificate of this link")
        return revoked

    async def wait_links_changed(self) -> None:
        """Return at the next change of an outgoing link's state: up, down, or why it failed."""
        await self.dialer.wait_links_changed()

    async def wait_linked(self, site_id: str, *, up: bool = True) -> None:
        """Return once a live link with the site is up, either direction; with `up=False`, once none is left."""
        await self.router.wait_linked(site_id, up=up)

    # -- listeners and connectors (see ProxyManager) ----------------------------------------------

    async def create_connector(
        self, name: str, port: int, *, host: str = DEFAULT_CONNECTOR_HOST, routing_key: str | None = None,
        protocol: str = DEFAULT_PROTOCOL, allow: Sequence[str] = (),
    ) -> ConnectorConfig:
        """Offer `host:port` to the network under `routing_key`: see `ProxyManager.create_connector`."""
        return await self.proxies.create_connector(
            name, port, host=host, routing_key=routing_key, protocol=protocol, allow=allow
        )

    async def delete_connector(self, name: str) -> None:
        await self.proxies.delete_connector(name)

    async def create_listener(
        self, name: str, port: int, *, host: str = DEFAULT_LISTENER_HOST, routing_key: str | None = None,
        distribution: str = DEFAULT_DISTRIBUTION, protocol: str = DEFAULT_PROTOCOL, providers: Sequence[str] = (),
    ) -> ListenerStatus:
        """Accept clients on `host:port` for `routing_key`: see `ProxyManager.create_listener`."""
        return await self.proxies.create_listener(
            name, port, host=host, routing_key=routing_key, distribution=distribution, protocol=protocol, providers=providers
        )

    async def delete_listener(self, name: str) -> None:
        await self.proxies.delete_listener(name)

    async def wait_listeners_changed(self) -> None:
        """Return at the next change to this site's listeners: made, deleted, accepting or not, failing."""
        await self.proxies.wait_listeners_changed()

    async def wait_listening(self, routing_key: str, *, accepting: bool = True) -> None:
        """Return once some listener here accepts clients for the key (with accepting=False: once none does)."""
        await self.proxies.wait_listening(routing_key, accepting=accepting)

    async def wait_reachable(self, routing_key: str, *, providers: int = 1) -> None:
        """Return once `providers` reachable sites (this one included) have a connector for the key,
        and this site's listeners for it accept clients (or have reported why they cannot)."""
        await self.router.wait_reachable(routing_key, providers=providers)
        await self.proxies.wait_accepting(routing_key)

    # -- status ------------------------------------------------------------------------------------

    def _view(self) -> SiteView:
        config = self.config
        return SiteView(
            site_id=self.site_id, name=self.name, mode=config.mode, running=self.running, access=self.handshakes.addresses(),
            outgoing=config.links, link_errors=dict(self.dialer.errors), listeners=self.proxies.states(),
            sync_refused=dict(self.proxies.sync_refused), service_host=config.service_host, connectors=config.connectors,
        )

    def status(self) -> SiteStatus:
        return site_status(self._view(), network_view(self.router, (l.peer_id for l in self.config.links)))

    def network_status(self) -> NetworkStatus:
        return network_status(self._view(), network_view(self.router))


async def load_site(site_dir: str | os.PathLike) -> Site:
    """A stopped site, to read its status or change its config (taking effect at its next start)."""
    return Site(await trio.to_thread.run_sync(load, Path(site_dir)))


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
    given = dict(link_port=link_port, ws_port=ws_port, link_host=link_host, mode=mode, settings=settings)
    given.update(service_sync=service_sync, service_host=service_host)
    overrides = {key: value for key, value in given.items() if value is not _UNSET}
    try:
        files = await trio.to_thread.run_sync(prepare, name, Path(site_dir), overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    site = Site(files)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(site.run)
            try:
                yield site
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure (the caller's, or the site's own) is raised as itself, not wrapped.
        if (sole := sole_exception(group)) is not None:
            raise sole from None
        raise

