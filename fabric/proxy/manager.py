"""ProxyManager: a site's listeners and connectors, made, deleted and kept in step with the network.

It owns the configured listeners and connectors (created and deleted here,
saved through the site's ConfigStore, offered to the router) and service
sync: an automatic listener on the service host for each routing key other
reachable sites offer and nothing here listens for, within the limits that
`plan_service_sync` (pure) enforces. Keys it does not listen for are kept
with why, for status, and logged one line per cause now and then.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .. import logs
from ..config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_DISTRIBUTION,
    DEFAULT_LISTENER_HOST,
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    ConnectorConfig,
    ListenerConfig,
    Settings,
)
from ..errors import ConfigError, FabricError
from ..router.policy import check_unambiguous
from ..router.router import Router
from ..router.routes import DISTRIBUTIONS
from ..status import ListenerState, ListenerStatus, listener_status, network_view
from ..store import ConfigStore
from .http import HttpListener
from .sync import (
    SYNC_BIND,
    SYNC_CAP,
    SYNC_LOW_PORT,
    SYNC_MIN_PORT,
    SyncHold,
    SyncPlan,
    SyncRefusal,
    plan_service_sync,
)
from .tcp import TcpConnector, TcpListener

log = logging.getLogger("fabric.site")

_LISTENERS = {"tcp": TcpListener, "http": HttpListener}  # listener class by protocol


def _checked(cls: Callable[..., Any], **fields: Any) -> Any:
    """A config object from values a caller gave, or one ConfigError line saying which is wrong."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise FabricError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")


class ProxyManager:
    """The listeners and connectors of the site whose config `store` keeps, routed by `router`."""

    def __init__(self, router: Router, store: ConfigStore) -> None:
        self.router = router
        self.store = store
        self.listeners: dict[str, TcpListener] = {}  # configured, running: name -> listener
        self.synced: dict[str, TcpListener] = {}  # service sync: routing key -> its listener here
        self.sync_refused: dict[str, tuple[int, str]] = {}  # routing key -> (port, why service sync does not listen)
        self._listener_errors: dict[str, str] = {}  # configured listener name -> why it did not start
        self._connectors: dict[str, TcpConnector] = {}
        self._claimed: set[str] = set()  # routing keys of configured listeners being made
        self._sync_holds: dict[str, SyncHold] = {}  # routing key -> what it is charged to, listening or not
        self._sync_unlogged: dict[str, tuple[int, str, str]] = {}  # cause -> (keys, one of them, why) not yet said
        self._sync_logged_at: dict[str, float] = {}  # cause -> when a line last said it
        self._listeners_changed = trio.Event()
        self._sync_wanted_again = trio.Event()
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<ProxyManager listeners={sorted(self.listeners)} synced={sorted(self.synced)}>"

    @property
    def settings(self) -> Settings:
        return self.store.config.settings

    async def run(self, *, task_status: trio.TaskStatus[ProxyManager] = trio.TASK_STATUS_IGNORED) -> None:
        """Offer the configured connectors, open the configured listeners, and run service sync if on."""
        config = self.store.config
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._add_connectors(config.connectors)  # one new version of this site's record for all
            for listener in config.listeners:
                try:
                    await self._start_listener(listener)
                except FabricError as exc:
                    self._listener_errors[listener.name] = str(exc)
                    log.error("%s", exc, extra=logs.event("listener_failed", reason=exc))
            if config.service_sync:
                nursery.start_soon(self._sync_services)
            task_status.started(self)
            await trio.sleep_forever()

    # -- connectors ---------------------------------------------------------------------------

    async def create_connector(
        self,
        name: str,
        port: int,
        *,
        host: str = DEFAULT_CONNECTOR_HOST,
        routing_key: str | None = None,
        protocol: str = DEFAULT_PROTOCOL,
        allow: Sequence[str] = (),
    ) -> ConnectorConfig:
        """Offer `host:port` to the network under `routing_key` (default: the name).

        `protocol="http"` tells other sites that it speaks HTTP, so that their
        service sync listens for it with an HTTP listener. `allow`: the only
        sites whose flows it takes, by site id or name (empty: any site);
        the others are refused, NOT_AUTHORIZED. This site's own listeners
        always reach it.
        """
        if any(c.name == name for c in self.store.config.connectors):
            raise FabricError(f"connector {name!r} exists already")
        _check_protocol(protocol)
        config = _checked(
            ConnectorConfig,
            name=name, routing_key=routing_key or name, port=port, host=host, protocol=protocol, allow=allow,
        )
        self._check_policy(config.allow)
        if self._nursery is not None:
            self._add_connectors([config])
        await self.store.update(lambda c: attrs.evolve(c, connectors=(*c.connectors, config)))
        self._resync()
        return config

    def _add_connectors(self, configs: Sequence[ConnectorConfig]) -> None:
        made = []
        for config in configs:
            connector = TcpConnector(config, dial_timeout=self.settings.dial_timeout)
            self._connectors[config.name] = connector
            made.append((config.routing_key, connector, config.allow))
        self.router.add_connectors(made)

    async def delete_connector(self, name: str) -> None:
        if not any(c.name == name for c in self.store.config.connectors):
            raise FabricError(f"no connector named {name!r}")
        connector = self._connectors.pop(name, None)
        if connector is not None:
            self.router.remove_connector(connector.config.routing_key, connector)
        await self.store.update(lambda c: attrs.evolve(c, connectors=tuple(x for x in c.connectors if x.name != name)))
        self._resync()

    # -- listeners ------------------------------------------------------------------------------

    async def create_listener(
        self,
        name: str,
        port: int,
        *,
        host: str = DEFAULT_LISTENER_HOST,
        routing_key: str | None = None,
        distribution: str = DEFAULT_DISTRIBUTION,
        protocol: str = DEFAULT_PROTOCOL,
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
        if any(l.name == name for l in self.store.config.listeners):
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
        self._claimed.add(config.routing_key)  # service sync leaves the key alone while this one is made
        try:
            if self._nursery is not None:
                if (synced := self.synced.pop(config.routing_key, None)) is not None:
                    await synced.aclose()  # a configured listener takes over from service sync (maybe its very port)
                await self._start_listener(config)
            await self.store.update(lambda c: attrs.evolve(c, listeners=(*c.listeners, config)))
        finally:
            self._claimed.discard(config.routing_key)
        self._resync()
        return listener_status(self._state(config), network_view(self.router))

    async def delete_listener(self, name: str) -> None:
        if not any(l.name == name for l in self.store.config.listeners):
            raise FabricError(f"no listener named {name!r}")
        listener = self.listeners.pop(name, None)
        self._listener_errors.pop(name, None)
        if listener is not None:
            await listener.aclose()
        await self.store.update(lambda c: attrs.evolve(c, listeners=tuple(x for x in c.listeners if x.name != name)))
        self._resync()

    def _check_policy(self, entries: tuple[str, ...]) -> None:
        """Refuse an entry that is a name several known sites carry: it would admit none of them."""
        try:
            check_unambiguous(entries, self.router.known_names())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    async def _start_listener(self, config: ListenerConfig) -> TcpListener:
        assert self._nursery is not None
        listener = _LISTENERS[config.protocol](config, self.router.within(config.providers), on_state=self._state_changed)
        await self._nursery.start(self._as_site, listener.run)
        self.listeners[config.name] = listener
        self._listener_errors.pop(config.name, None)
        log.info("listener %s on %s:%s for %r", config.name, config.host, listener.port, config.routing_key)
        return listener

    async def _as_site(self, run, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """`run(task_status=...)`, logging as this site even when a caller outside it started it."""
        logs.SITE.set(self.router.name)
        await run(task_status=task_status)

    def _state_changed(self) -> None:
        self._listeners_changed.set()
        self._listeners_changed = trio.Event()

    async def wait_listeners_changed(self) -> None:
        """Return at the next change to the listeners: made, deleted, accepting or not, failing."""
        await self._listeners_changed.wait()

    async def wait_listening(self, routing_key: str, *, accepting: bool = True) -> None:
        """Return once some listener accepts clients for the key (with accepting=False: once none does)."""
        while any(l.accepting for l in self._running() if l.config.routing_key == routing_key) != accepting:
            await self._listeners_changed.wait()

    async def wait_accepting(self, routing_key: str) -> None:
        """Return once each configured listener for the key accepts clients (or has said why it cannot)."""
        for listener in list(self.listeners.values()):
            if listener.config.routing_key == routing_key:
                await listener.wait_accepting()

    def _running(self) -> list[TcpListener]:
        return [*self.listeners.values(), *self.synced.values()]

    def _state(self, config: ListenerConfig, running: TcpListener | None = None) -> ListenerState:
        if running is None:
            running = self.listeners.get(config.name)
        if running is None:
            return ListenerState(config, running=False, port=config.port, error=self._listener_errors.get(config.name))
        return ListenerState(
            config,
            running=True,
            port=running.port,
            connections=running.connections,
            accepting=running.accepting,
            error=running.error,
            auto=running.auto,
            http=running.stats() if isinstance(running, HttpListener) else None,
        )

    def states(self) -> tuple[ListenerState, ...]:
        """Every listener, for status: the configured ones in config order, then service sync's."""
        configured = [self._state(config) for config in self.store.config.listeners]
        return (*configured, *(self._state(l.config, l) for l in self.synced.values()))

    # -- service sync -------------------------------------------------------------------------------

    def _resync(self) -> None:
        """Listeners or connectors changed here: service sync looks again at once (even if busy now)."""
        self._sync_wanted_again.set()

    def _sync_wanted(self) -> SyncPlan:
        """What service sync holds now, for the keys other reachable sites offer and nothing here listens for."""
        router = self.router
        configured = {l.routing_key for l in self.store.config.listeners} | self._claimed
        offers: dict[str, dict[str, tuple[int, str]]] = {}
        for record in router.gossip.table.values():
            if record.site_id == router.site_id or record.site_id not in router.routes:
                continue
            for service in record.services:
                key = service.routing_key
                if (
                    service.connectors
                    and service.port
                    and key not in configured
                    and key not in router.connectors
                    and router.accepts_offer(record.site_id, key)
                ):
                    offers.setdefault(key, {})[record.site_id] = (service.port, service.protocol)
        return plan_service_sync(
            offers,
            self._sync_holds,
            total=self.settings.max_auto_listeners,
            per_site=self.settings.max_auto_listeners_per_site,
        )

    async def _sync_services(self) -> None:
        """Keep a listener on the service host for each key offered elsewhere, within the limits."""
        assert self._nursery is not None
        host = self.store.config.service_host
        while True:
            # Taken before looking: a change while this pass runs (it awaits) wakes the next one.
            changed = self.router.next_change()
            self._sync_wanted_again = trio.Event()
            plan = self._sync_wanted()
            gone = [key for key in self.synced if key not in plan.holds]
            for key in gone:
                await self.synced.pop(key).aclose()
                self._state_changed()
            if gone:
                log.info("service sync: closed the listener(s) for %s (no site offers them any more)", ", ".join(map(repr, gone)))
            self._sync_holds = dict(plan.holds)
            opened: list[str] = []
            for key in plan.new:
                hold = plan.holds[key]
                config = ListenerConfig(name=key, routing_key=key, port=hold.port, host=host, protocol=hold.protocol)
                listener = _LISTENERS[config.protocol](config, self.router, auto=True, on_state=self._state_changed)
                try:
                    await self._nursery.start(listener.run)
                except FabricError as exc:
                    self._sync_holds[key] = attrs.evolve(hold, error=str(exc))
                    continue
                self.synced[key] = listener
                self._state_changed()  # it may have started accepting before it was listed
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
            if self.sync_refused.get(key) != errors[key]:  # newly refused, or for another reason
                cause, why = said[key]
                count = self._sync_unlogged.get(cause, (0, "", ""))[0]
                self._sync_unlogged[cause] = (count + 1, key, why)
        if errors != self.sync_refused:
            self.sync_refused = errors
            self._state_changed()
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
