"""Dialer: this site's outgoing links, made by redeeming tokens, and kept up.

One task per configured link dials its addresses in order (through a proxy
where one is set), does the dialling side of the HELLO, serves the link
until it ends, and dials again with capped exponential backoff and jitter.
A refusal that no redial can change stops it, with advice. The address that
got through is remembered first in the link's config.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import ssl
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import logs, pki
from ..addresses import NO_PROXY, parse_address, parse_proxy, proxy_for
from ..config import LinkConfig, link_dir
from ..errors import ConfigError, FabricError, LinkError, TokenError
from ..store import ConfigStore
from ..tokens import redeem
from .frames import FrameDecoder, FrameType, Reason, Redeem, encode_frame, encode_message
from .handshake import LinkSetup
from .link import Link, read_frame, read_hello_untrusted
from .router import Router
from .transports import dial

log = logging.getLogger("fabric.site")

# Refusals of a link that no redial can change, with what the user can do.
FINAL_REFUSALS = {
    Reason.NOT_AUTHORIZED: "delete this link; it links again only if that site lets it (a new token, unless it revoked this site)",
    Reason.EDGE_TO_EDGE: "delete this link",
}


class Dialer:
    """The outgoing links of the site whose config `store` keeps, dialled with `setup`, run by `router`."""

    def __init__(self, router: Router, setup: LinkSetup, store: ConfigStore, identity: pki.Identity) -> None:
        self.router = router
        self.setup = setup
        self.store = store
        self.identity = identity
        self.settings = setup.settings
        self.errors: dict[str, str] = {}  # outgoing link name -> why it is not up, for status
        self._scopes: dict[str, trio.CancelScope] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Dialer links={sorted(self._scopes)}>"

    async def run(self, *, task_status: trio.TaskStatus[Dialer] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial every configured link, and the ones `start` adds, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for link in self.store.config.links:
                self.start(link)
            task_status.started(self)
            await trio.sleep_forever()

    def start(self, link: LinkConfig) -> None:
        """Keep the link up from now on; before `run`, that reads the config, nothing is done."""
        if self._nursery is None or link.name in self._scopes:
            return
        scope = trio.CancelScope()
        self._scopes[link.name] = scope
        self._nursery.start_soon(self._keep_up, link, scope)

    # -- outgoing links: made, changed, deleted ----------------------------------------------------

    async def redeem(
        self, token: pki.Token | str | os.PathLike, *, name: str | None, cost: int | None, proxy: str | None
    ) -> str:
        """Link to the token's issuer (a token, or its file), keep the link in the config and dial it; returns its name."""
        if proxy is not None and proxy != NO_PROXY:
            try:
                parse_proxy(proxy)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not isinstance(token, pki.Token):
            token = await trio.to_thread.run_sync(pki.Token.load, Path(token))
        router, config = self.router, self.store.config
        if token.issuer_id == router.site_id:
            raise TokenError("this token was issued by this site; redeem it at the site that should link here")
        if any(l.peer_id == token.issuer_id for l in config.links):
            raise TokenError(f"site {router.name} already has a link to site {token.issuer_name}")
        if token.issuer_id in router.links:
            raise TokenError(f"site {token.issuer_name} already links to site {router.name}; one link carries traffic both ways")
        name = name or token.issuer_name
        certs = await trio.to_thread.run_sync(link_dir, self.store.site_dir, name)  # before anything is sent or written
        if any(l.name == name for l in config.links):
            raise TokenError(f"a link named {name!r} exists already: choose another name")
        csr = await trio.to_thread.run_sync(pki.make_csr, self.identity)
        request = Redeem(
            token_id=token.token_id, secret=token.secret, name=router.name, csr_pem=csr.decode(), mode=self.setup.mode
        )
        answer, used = await redeem(token, request, self.identity, lambda text, context: self.dial(text, context, proxy))
        await trio.to_thread.run_sync(_write_certs, certs, token.ca_pem, answer.cert_pem)
        addresses = (used, *(a for a in token.addresses if a != used))  # the one that worked first
        cost = cost if cost is not None else (token.cost or 1)
        link = LinkConfig(name=name, peer_id=token.issuer_id, addresses=addresses, cost=cost, proxy=proxy)
        await self.store.update(lambda c: attrs.evolve(c, links=(*c.links, link)))
        self.start(link)
        return name

    def outgoing(self, name: str) -> LinkConfig:
        for link in self.store.config.links:
            if link.name == name:
                return link
        raise FabricError(
            f"no link named {name!r} at site {self.router.name} (links made with another site's token are changed there)"
        )

    async def update(self, name: str, **changes: Any) -> None:
        """Change an outgoing link's config; a cost and offers apply at once, a proxy at the next dial."""
        try:
            link = attrs.evolve(self.outgoing(name), **changes)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"link {name}: {exc}") from None
        await self.store.update(lambda c: attrs.evolve(c, links=tuple(link if l.name == name else l for l in c.links)))
        self.router.set_link_cost(link.peer_id, link.cost)
        if self._nursery is not None:
            self.router.limit_offers(link.peer_id, link.offers)

    async def delete(self, name: str) -> None:
        """Stop dialling the link, drop it if up, forget its certificate."""
        link, router = self.outgoing(name), self.router
        await self.store.update(lambda c: attrs.evolve(c, links=tuple(l for l in c.links if l.name != name)))
        if (scope := self._scopes.pop(name, None)) is not None:
            scope.cancel()
        self.errors.pop(name, None)
        if (live := router.links.get(link.peer_id)) is not None:
            live.close(Reason.SHUTDOWN, f"site {router.name} deleted its link")
        if self._nursery is not None:
            router.limit_offers(link.peer_id, None)
        await trio.to_thread.run_sync(_forget_certs, self.store.site_dir, name)

    async def wait_links_changed(self) -> None:
        """Return at the next change of an outgoing link's state: up, down, or why it failed."""
        await self._changed.wait()

    def _set_error(self, name: str, why: str | None) -> None:
        if why is None:
            self.errors.pop(name, None)
        else:
            self.errors[name] = why
        self._changed.set()
        self._changed = trio.Event()

    async def dial(self, text: str, context: ssl.SSLContext, proxy_setting: str | None) -> trio.SSLStream:
        """A TLS stream to address `text`, through the proxy the setting or the environment names."""
        address = parse_address(text)
        proxy = proxy_for(address, proxy_setting)
        return await dial(address, context, proxy=proxy, ws_keepalive=self.settings.ws_keepalive_interval)

    async def _keep_up(self, config: LinkConfig, scope: trio.CancelScope) -> None:
        """Dial, serve, and redial with capped exponential backoff and jitter."""
        logs.SITE.set(self.router.name)  # started by redeem_token too, from a task outside the site
        backoff = self.settings.reconnect_min
        with scope:
            while True:
                # The link's config as it is now: `update_link` may have changed its cost.
                config = next((l for l in self.store.config.links if l.name == config.name), config)
                started = trio.current_time()
                try:
                    link = await self._dial_link(config)
                except (FabricError, OSError) as exc:  # LinkError, or a damaged links/ directory
                    if (advice := FINAL_REFUSALS.get(getattr(exc, "code", None))) is not None:  # type: ignore[arg-type]
                        # Redialling would only be refused again, every time.
                        why = f"{exc}; not dialling again: {advice}"
                        self._set_error(config.name, why)
                        log.error("link %s: %s", config.name, why, extra=logs.event("link_refused", peer=config.name, reason=why))
                        await trio.sleep_forever()
                    self._set_error(config.name, str(exc))
                    log.warning("link %s: %s", config.name, exc, extra=logs.event("link_dial_failed", peer=config.name, reason=exc))
                else:
                    self._set_error(config.name, None)
                    # Keyed by the link's own name, which status shows (the peer's name may differ).
                    self._set_error(config.name, await self.setup.serve(link, f"link to {config.name}", config.name))
                if trio.current_time() - started > self.settings.reconnect_max:
                    backoff = self.settings.reconnect_min  # it was up a while: start over quickly
                await trio.sleep(random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, self.settings.reconnect_max)

    async def _dial_link(self, config: LinkConfig) -> Link:
        context = await trio.to_thread.run_sync(_client_context, self.store.site_dir, config.name, self.identity.key_path)
        errors = []
        for index, text in enumerate(config.addresses):
            try:
                with trio.fail_after(self.settings.handshake_timeout):
                    stream = await self.dial(text, context, config.proxy)
                    try:
                        link = await self._hello(stream, config)
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except trio.TooSlowError:
                errors.append(f"{text}: no answer within {self.settings.handshake_timeout:g} s")
            except (LinkError, ValueError) as exc:
                if getattr(exc, "code", None) in FINAL_REFUSALS:
                    raise  # the peer itself refuses this site: another address would say the same
                errors.append(str(exc))
            else:
                if index:
                    await self._dial_first(config.name, text)
                return link
        raise LinkError("; ".join(errors) or "the link has no addresses")

    async def _dial_first(self, name: str, text: str) -> None:
        """Remember that link `name` got through at address `text`: it is tried first from now on."""

        def first(links: tuple[LinkConfig, ...]) -> tuple[LinkConfig, ...]:
            return tuple(
                attrs.evolve(l, addresses=(text, *(a for a in l.addresses if a != text))) if l.name == name else l
                for l in links
            )

        await self.store.update(lambda config: attrs.evolve(config, links=first(config.links)))
        log.info("link %s: reached at %s, which is tried first from now on", name, text, extra=logs.event("link_address", peer=name))

    async def _hello(self, stream: trio.SSLStream, config: LinkConfig) -> Link:
        der = stream.getpeercert(binary_form=True)
        server_id = pki.cert_site_id(der)
        if server_id != config.peer_id:
            raise LinkError(f"expected site {config.peer_id[:8]} but reached site {server_id[:8]}")
        local = self.setup.hello(cost=config.cost)
        try:
            await stream.send_all(encode_frame(FrameType.HELLO, 0, encode_message(local)))
            decoder = FrameDecoder()
            peer = read_hello_untrusted(await read_frame(stream, decoder), local)
        except trio.BrokenResourceError as exc:
            raise LinkError(f"peer {config.name} ended the handshake: {exc.__cause__ or exc}") from None
        self.setup.check_peer(peer, der)
        return self.setup.link(stream, decoder, local=local, peer=peer, dialer=True, cost=config.cost)


def _write_certs(certs: Path, ca_pem: str, cert_pem: str) -> None:
    """Keep what a redemption brought: the issuer's CA and this site's certificate for the link. Blocking."""
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "ca.pem").write_text(ca_pem)
    (certs / "cert.pem").write_text(cert_pem)


def _forget_certs(site_dir: Path, name: str) -> None:
    shutil.rmtree(link_dir(site_dir, name), ignore_errors=True)


def _client_context(site_dir: Path, name: str, key_path: Path) -> ssl.SSLContext:
    """The TLS context link `name` dials with, from its certificates in the links/ directory. Blocking."""
    certs = link_dir(site_dir, name)
    return pki.client_context((certs / "ca.pem").read_bytes(), certs / "cert.pem", key_path)
