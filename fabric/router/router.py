"""Forwarding: the links of a site, the routes over them, and every flow that crosses it.

A flow meets a site in one of three roles:

- ingress (`connect`): a listener's client wants a routing key; pick a
  provider site, open a flow toward it on a next hop, wait for OPEN_OK
  (trying another provider if one refuses);
- transit (`on_open`, destination elsewhere): forward the OPEN to a
  loop-free next hop (never back where it came from), then relay;
- egress (`on_open`, destination here): dial a connector's target, answer
  OPEN_OK or OPEN_FAIL, then relay.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from .. import logs
from ..config import Settings
from ..errors import FlowError, FlowRefused, NoProviderError
from ..gossip.records import LinkInfo, RecordTable, ServiceInfo, SiteRecord
from .frames import EDGE, Open, Reason
from .link import FlowEnd, Link
from .policy import OPEN, by_name, site_label, sites_admitted
from .relay import End, relay
from .routes import (
    BALANCED,
    Candidate,
    Penalty,
    Route,
    choose_next_hop,
    choose_provider,
    compute_routes,
    hold_rtt,
    latency_units,
)

if TYPE_CHECKING:
    from ..gossip.engine import SiteStatus

log = logging.getLogger("fabric.router")
# Changes of one kind in one recompute logged a line each; past this many they
# are one line, so a member offering thousands of keys or sites costs a line.
LOG_EACH = 8

# An ingress tries at most this many times (another provider, or another path
# to the same one) before failing its client, and starts no new try past
# RETRY_WINDOW seconds: a client waits for a failover, not for an outage.
MAX_TRIES = 3
RETRY_WINDOW = 2.0
# Refusals that say the provider itself cannot serve (its target refused);
# anything else is the path's fault, and another path may reach it.
_PROVIDER_FAULTS = frozenset({Reason.DIAL_FAILED, Reason.NO_CONNECTOR})
# Refusals that no other path to the provider changes: its faults, and its
# policy's "not from you" (not penalised: that says nothing of its target).
_PROVIDER_REFUSALS = _PROVIDER_FAULTS | {Reason.NOT_AUTHORIZED}
# Keepalive intervals without an answer to a PING after which an OPEN waiting
# on a link gives up on it and tries another way, before keepalive declares
# the link dead: a new client is not kept waiting on a path gone silent.
SILENT_INTERVALS = 1.5


@attrs.define
class Tries:
    """What is left of one client's budget of tries: at most MAX_TRIES, none started past RETRY_WINDOW."""

    count: int = 0
    deadline: float = attrs.Factory(lambda: trio.current_time() + RETRY_WINDOW)
    error: FlowError | None = None  # the last failure

    def left(self) -> bool:
        return self.count < MAX_TRIES and (self.count == 0 or trio.current_time() <= self.deadline)

    def take(self) -> None:
        self.count += 1


class Outstanding:
    """One flow or request counted in `Router.outstanding` at its provider, from `Router.using` until released.

    As a context manager it undoes itself: the count ends with the block, whatever ends it, unless
    the block hands it on (`hand_off`) to what holds the request past it (an HTTP answer that a
    flow's sink writes), which then calls `release`. Releasing again does nothing, so a count
    handed on and then undone by an exception in the block is taken off once.
    """

    __slots__ = ("_counts", "_handed", "provider")

    def __init__(self, counts: collections.Counter[str], provider: str) -> None:
        counts[provider] += 1
        self._counts: collections.Counter[str] | None = counts
        self._handed = False
        self.provider = provider

    def __repr__(self) -> str:
        held = "released" if self._counts is None else "handed off" if self._handed else "held"
        return f"<Outstanding {self.provider} {held}>"

    def __enter__(self) -> Outstanding:
        self._handed = False
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None or not self._handed:
            self.release()

    def hand_off(self) -> Outstanding:
        """Keep the count past the block: the caller now holds it, and releases it."""
        self._handed = True
        return self

    def release(self) -> None:
        counts = self._counts
        if counts is not None:
            self._counts = None
            counts[self.provider] -= 1


class Catalog(Protocol):
    """What the router needs of the gossip catalog (gossip.gossip.Gossip): the records, and the link events."""

    @property
    def table(self) -> RecordTable: ...

    @property
    def record(self) -> SiteRecord:
        """This site's own record, as last published."""
        ...

    def status(self) -> list[SiteStatus]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    def publish(self, links: Iterable[LinkInfo], services: Iterable[ServiceInfo]) -> None: ...

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link) -> None: ...

    def receive(self, link: Link, payload: bytes) -> None:
        """A GOSSIP frame from the link's peer; raises ProtocolError (ending the link) if it does not decode."""
        ...


class CatalogFactory(Protocol):
    """Makes the catalog once the router can give it its links and be told of changes (the site wires it)."""

    def __call__(self, *, links: Callable[[], Mapping[str, Link]], on_change: Callable[[], None]) -> Catalog: ...


class Connector(Protocol):
    """What the router needs of a connector (see proxy/tcp.py)."""

    port: int
    protocol: str

    async def dial(self) -> End:
        """Reach the target; raises FlowRefused(DIAL_FAILED, why) if it cannot."""
        ...


@attrs.define
class ConnectorSlot:
    """The connectors of one routing key at this site, used round robin."""

    connectors: list[Connector] = attrs.Factory(list)
    allow: list[tuple[str, ...]] = attrs.Factory(list)  # each connector's policy: the sites it takes flows from
    turn: itertools.count = attrs.Factory(itertools.count)
    refused: int = 0  # flows refused since the site started: no connector's policy took their origin
    refused_origin: str | None = None  # the origin of the latest of them

    def add(self, connector: Connector, allow: tuple[str, ...]) -> None:
        self.connectors.append(connector)
        self.allow.append(allow)

    def remove(self, connector: Connector) -> bool:
        if connector not in self.connectors:
            return False
        index = self.connectors.index(connector)
        del self.connectors[index], self.allow[index]
        return True

    def next(self, admits: Callable[[tuple[str, ...]], bool] = lambda allow: True) -> Connector | None:
        """The next connector, in turn, whose policy `admits` (None: none does)."""
        for _ in range(len(self.connectors)):
            index = next(self.turn) % len(self.connectors)
            if admits(self.allow[index]):
                return self.connectors[index]
        return None


class Router:
    def __init__(
        self,
        *,
        site_id: str,
        name: str,
        mode: str,
        settings: Settings,
        catalog: CatalogFactory,
        # Why flows from a site (by the origin they claim) may not reach connectors here; None: they may.
        refuse_origin: Callable[[str], str | None] = lambda origin: None,
    ) -> None:
        self.site_id = site_id
        self.name = name
        self.mode = mode
        self.settings = settings
        self.links: dict[str, Link] = {}
        self.routes: dict[str, Route] = {}
        self.connectors: dict[str, ConnectorSlot] = {}
        self.outstanding: collections.Counter[str] = collections.Counter()  # flows per provider site
        self.active: collections.Counter[str] = collections.Counter()  # flows per next-hop peer
        self.penalties: dict[str, Penalty] = {}  # provider site -> penalty for refused dials
        self.route_changes: collections.Counter[str] = collections.Counter()  # destination -> changes of its route
        self._held_rtt: dict[str, float] = {}  # peer -> the RTT advertised for the link (see routes.hold_rtt)
        self._chosen: dict[str, int] = {}  # provider or next-hop site -> serial of its last choice
        # Routing key -> its providers and their costs, as the routes and the catalog are now: asked
        # per flow (per request, by an HTTP listener), made again only after they change (_recompute).
        self._costs: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, float], ...]] = {}
        # Access policy, resolved against the sites known now (remade after changes, as _costs):
        # policy -> the sites it admits; and site id -> name, name -> site ids, of every known site.
        self._admitted: dict[tuple[str, ...], frozenset[str]] = {}
        self._names: dict[str, str] | None = None
        self._name_index: dict[str, tuple[str, ...]] = {}
        self._offer_limits: dict[str, frozenset[str]] = {}  # linked site -> the only routing keys taken from it
        self._choices = itertools.count(1)
        self.gossip = catalog(links=lambda: self.links, on_change=self._recompute)
        self._changed = trio.Event()
        self._offered: dict[str, set[str]] = {}  # the catalog as last logged
        self._flow_serial = itertools.count(1)
        self._refuse_origin = refuse_origin
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Router {self.name} links={sorted(l.peer.name for l in self.links.values())} routes={len(self.routes)}>"

    async def run(self, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that transit and egress flows run in."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.gossip.run)
            task_status.started(self)
            await trio.sleep_forever()

    # -- links -----------------------------------------------------------------

    async def run_link(self, link: Link) -> str:
        """Serve a handshaken link until it ends; returns why it ended."""
        old = self.links.get(link.peer_id)
        if old is not None and not old.closed:
            if old.dialer != link.dialer:
                # Both sites dialled each other: keep the link that is up, refuse the new one.
                link.close(Reason.DUPLICATE_LINK, f"site {self.name} already has a link with {link.peer.name}")
            else:
                # The same site dialled again (it saw the old link die first): the new one wins.
                old.close(Reason.DUPLICATE_LINK, "replaced by a new link from the same site")
        if not link.closed:
            self.links[link.peer_id] = link
            self._notify()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                if self.links.get(link.peer_id) is link:
                    self.gossip.link_up(link)
                    self._publish()
            return link.reason or "link closed"
        finally:
            if self.links.get(link.peer_id) is link:
                del self.links[link.peer_id]
                self._held_rtt.pop(link.peer_id, None)
                self.gossip.link_down(link)
                self._notify()
                self._publish()

    def linked(self, peer_id: str) -> bool:
        """Whether this site has a live link with the site now."""
        link = self.links.get(peer_id)
        return link is not None and not link.closed

    async def wait_linked(self, peer_id: str, *, up: bool = True) -> None:
        """Return once a live link with the site is up; with `up=False`, once no link with it is left.

        A link that is closing counts as down for `up=True` and as still there
        for `up=False`, so after the latter its flows are reset and it is gone.
        """

        def reached() -> bool:
            return self.linked(peer_id) if up else peer_id not in self.links

        while not reached():
            await self._changed.wait()

    def set_link_cost(self, peer_id: str, cost: int) -> None:
        """A configured cost changed: the live link takes it now and the network hears of it."""
        if (link := self.links.get(peer_id)) is not None and link.cost != cost:
            link.cost = cost
            self._publish()

    def _follow_dialer_costs(self) -> None:
        """An accepted link advertises the cost its dialer configured (and may change while it runs)."""
        for link in self.links.values():
            record = None if link.dialer else self.record(link.peer_id)
            for info in record.links if record else ():
                if info.peer == self.site_id and info.cost != link.cost:
                    self.set_link_cost(link.peer_id, info.cost)

    def close_links(self) -> None:
        for link in list(self.links.values()):
            link.close()

    # -- gossip and routes ---------------------------------------------------------

    def on_gossip(self, link: Link, payload: bytes) -> None:
        self.gossip.receive(link, payload)

    def on_rtt(self, link: Link) -> None:
        """Advertise a link's new RTT when it moved enough to matter (and latency counts at all)."""
        if not self.settings.latency_cost or self.links.get(link.peer_id) is not link:
            return
        held = self._held_rtt.get(link.peer_id)
        new = hold_rtt(held, link.rtt_floor)
        if new is not None and new != held:
            self._held_rtt[link.peer_id] = new
            if latency_units(new) != latency_units(held):
                self._publish()

    def _publish(self) -> None:
        links = [LinkInfo(peer=l.peer_id, cost=max(1, l.cost), rtt=self._held_rtt.get(l.peer_id)) for l in self.links.values()]
        services = [
            ServiceInfo(
                routing_key=key,
                protocol=slot.connectors[0].protocol,
                port=slot.connectors[0].port,
                connectors=len(slot.connectors),
            )
            for key, slot in self.connectors.items()
            if slot.connectors
        ]
        self.gossip.publish(links, services)

    def _recompute(self) -> None:
        self._follow_dialer_costs()  # may recompute (nested) as it republishes: compare with that
        before = self.routes
        self.routes = compute_routes(self.site_id, self.gossip.table.records)
        reachable, unreachable = [], []
        for site in sorted(self.routes.keys() ^ before.keys(), key=self.name_of):
            name = self.name_of(site)
            if site in self.routes:
                how = self._describe_route(site)
                reachable.append((f"site {name} reachable: {how}", dict(peer=name, reason=how)))
            else:
                why = "no path to it over links both ends advertise" if self.record(site) else "its record is gone"
                unreachable.append((f"site {name} unreachable: {why}", dict(peer=name, reason=why)))
        _say("site_reachable", reachable, "sites reachable")
        _say("site_unreachable", unreachable, "sites unreachable")
        for site in self.routes.keys() & before.keys():
            if self.routes[site] != before[site]:
                self.route_changes[site] += 1
                name, how = self.name_of(site), self._describe_route(site)
                log.debug("route to site %s: %s", name, how, extra=logs.event("route_changed", peer=name, reason=how))
        catalog = self._catalog()
        available, withdrawn = [], []
        for key in sorted(catalog.keys() | self._offered.keys()):
            for site in sorted(catalog.get(key, set()) - self._offered.get(key, set())):
                name = self.name_of(site)
                available.append((f"service {key!r} available from site {name}", dict(peer=name, routing_key=key)))
            for site in sorted(self._offered.get(key, set()) - catalog.get(key, set())):
                name = self.name_of(site)
                if not self.accepts_offer(site, key):
                    why = "its link here may not offer that routing key"
                elif site == self.site_id or site in self.routes:
                    why = "its connectors are gone"
                else:
                    why = "site unreachable"
                withdrawn.append((f"service {key!r} withdrawn by site {name}: {why}", dict(peer=name, reason=why, routing_key=key)))
        _say("service_available", available, "services available")
        _say("service_withdrawn", withdrawn, "services withdrawn")
        self._offered = catalog
        self._costs.clear()
        self._admitted.clear()
        self._names = None
        self._notify()

    def _describe_route(self, site: str) -> str:
        route = self.routes[site]
        hops = ", ".join(f"{self.name_of(h.peer)} (cost {h.cost:g})" for h in route.next_hops)
        return f"cost {route.cost:g} via {hops}"

    def _catalog(self) -> dict[str, set[str]]:
        """Routing key -> the sites reachable from here that have a connector for it (and may offer it)."""
        catalog: dict[str, set[str]] = {}
        for record in self.gossip.table.values():
            if record.site_id == self.site_id or record.site_id in self.routes:
                for service in record.services:
                    if service.connectors > 0 and self.accepts_offer(record.site_id, service.routing_key):
                        catalog.setdefault(service.routing_key, set()).add(record.site_id)
        return catalog

    # -- access policy (see policy.py) ---------------------------------------------------

    def limit_offers(self, site_id: str, routing_keys: Collection[str] | None) -> None:
        """Take only these routing keys from the linked site's services from now on (None: any)."""
        limit = None if routing_keys is None else frozenset(routing_keys)
        if self._offer_limits.get(site_id) == limit:
            return
        if limit is None:
            del self._offer_limits[site_id]
        else:
            self._offer_limits[site_id] = limit
        self._recompute()

    def offer_limit(self, site_id: str) -> frozenset[str] | None:
        """The only routing keys taken from the linked site (None: any)."""
        return self._offer_limits.get(site_id)

    def accepts_offer(self, site_id: str, routing_key: str) -> bool:
        """Whether a site's offer of the key is taken here (its link's policy may exclude it)."""
        limit = self._offer_limits.get(site_id)
        return limit is None or routing_key in limit

    def ignored_offers(self) -> dict[str, set[str]]:
        """Routing key -> the reachable sites that offer it but whose link here may not (for status)."""
        ignored: dict[str, set[str]] = {}
        for site_id in self._offer_limits:
            record = self.record(site_id)
            if record is not None and site_id in self.routes:
                for service in record.services:
                    if service.connectors > 0 and not self.accepts_offer(site_id, service.routing_key):
                        ignored.setdefault(service.routing_key, set()).add(site_id)
        return ignored

    def known_names(self) -> dict[str, str]:
        """Site id -> name, of every site known here (this one included)."""
        if self._names is None:
            self._names = {record.site_id: record.name for record in self.gossip.table.values()}
            self._name_index = by_name(self._names)
        return self._names

    def sites_named(self, name: str) -> tuple[str, ...]:
        """The ids of the known sites that carry the name (more than one: it names none of them)."""
        self.known_names()
        return self._name_index.get(name, ())

    def shared_names(self) -> dict[str, tuple[str, ...]]:
        """Name -> site ids, for each name that several known sites carry."""
        self.known_names()
        return {name: ids for name, ids in self._name_index.items() if len(ids) > 1}

    def admitted(self, policy: tuple[str, ...]) -> frozenset[str]:
        """The known sites a non-empty policy admits now."""
        sites = self._admitted.get(policy)
        if sites is None:
            sites = self._admitted[policy] = sites_admitted(policy, self.known_names(), self._name_index)
        return sites

    def admits(self, policy: tuple[str, ...], site_id: str) -> bool:
        return not policy or site_id in self.admitted(policy)

    def describe(self, site_id: str) -> str:
        """A site for a message about policy: its name and short id (the id alone while it is unknown)."""
        name = self.known_names().get(site_id)
        return f"{name} ({site_id[:8]})" if name is not None else site_id[:8]

    def label(self, site_id: str) -> str:
        """A site's name for status, with its short id when another known site has the same name."""
        return site_label(site_id, self.known_names(), self._name_index)

    def within(self, policy: tuple[str, ...]) -> Router | PolicyView:
        """The router as a listener with this provider policy sees it (the router itself for the open policy)."""
        return PolicyView(self, policy) if policy else self

    def _notify(self) -> None:
        """Wake the `wait_*` callers: links or routes changed."""
        self._changed.set()
        self._changed = trio.Event()

    def record(self, site_id: str) -> SiteRecord | None:
        return self.gossip.table.get(site_id)

    def providers(self, routing_key: str, policy: tuple[str, ...] = OPEN) -> list[str]:
        """Sites, reachable from here, that have a connector for the key (this site included), within the policy."""
        offered = self._offered.get(routing_key, ())
        if policy:
            admitted = self.admitted(policy)
            return sorted(site for site in offered if site in admitted)
        return sorted(offered)

    async def wait_unreachable(self, routing_key: str, policy: tuple[str, ...] = OPEN) -> None:
        """Return once no reachable site (within the policy) provides the key any more."""
        while self.providers(routing_key, policy):
            await self._changed.wait()

    def next_change(self) -> trio.Event:
        """The event set at the next change: take it before looking at the state, wait on it after,
        and a change that happens in between is not missed (as it would be by `wait_changed`)."""
        return self._changed

    async def wait_changed(self) -> None:
        """Return at the next change of links, routes or what the network advertises."""
        await self._changed.wait()

    async def wait_reachable(self, routing_key: str, *, providers: int = 1, policy: tuple[str, ...] = OPEN) -> None:
        """Return once at least `providers` reachable sites (within the policy) have a connector for the key."""
        while len(self.providers(routing_key, policy)) < providers:
            await self._changed.wait()

    # -- connectors ------------------------------------------------------------------

    def add_connectors(self, connectors: Iterable[tuple[str, Connector, tuple[str, ...]]]) -> None:
        """Offer each (routing key, connector, allow), as one change of this site's record; flows from
        other sites reach a connector only if its `allow` admits their origin."""
        for routing_key, connector, allow in connectors:
            self.connectors.setdefault(routing_key, ConnectorSlot()).add(connector, allow)
        self._publish()

    def remove_connector(self, routing_key: str, connector: Connector) -> None:
        slot = self.connectors.get(routing_key)
        if slot and slot.remove(connector):
            if not slot.connectors:
                del self.connectors[routing_key]
            self._publish()

    # -- ingress -------------------------------------------------------------------

    @asynccontextmanager
    async def connect(
        self, routing_key: str, distribution: str = BALANCED, policy: tuple[str, ...] = OPEN
    ) -> AsyncIterator[End]:
        """An open end toward a provider of the key (one the policy admits); counted as outstanding while held.

        A provider whose target refuses is penalised and another is tried; a
        path that fails is avoided and the provider tried again over another.
        At most MAX_TRIES tries, none started past RETRY_WINDOW seconds.
        """
        tries = Tries()
        refused: set[str] = set()  # providers that cannot serve this client
        while tries.left():
            provider = self.choose_provider(routing_key, distribution, exclude=refused, policy=policy)
            if provider is None:
                break
            with self.using(provider):
                try:
                    end, hop = await self.open_to(provider, routing_key, tries)
                except FlowError:
                    refused.add(provider)
                    continue
                try:
                    yield end
                finally:
                    self.release(hop)
                return
        if tries.error is not None:
            raise tries.error
        if policy and self.providers(routing_key):
            raise NoProviderError(f"no reachable site that the provider policy admits offers routing key {routing_key!r}")
        raise NoProviderError(f"no reachable site has a connector for routing key {routing_key!r}")

    def using(self, provider: str) -> Outstanding:
        """Count one more flow or request at `provider` (what `balanced` weighs) for a `with` block."""
        return Outstanding(self.outstanding, provider)

    async def open_to(self, provider: str, routing_key: str, tries: Tries) -> tuple[End, str | None]:
        """A flow to `provider` (or a dial here), and the next hop it holds: `release` it once the flow is over.

        A path that fails is avoided and another tried while `tries` allow. A
        provider whose target refused is penalised. FlowError when no try is
        left or no path: `tries.error` is the last failure.
        """
        avoid: set[str] = set()  # next hops whose path failed
        while tries.left():
            tries.take()
            local = provider == self.site_id
            hop = None if local else self._next_hop(self.routes.get(provider), avoid)
            try:
                if local:
                    return await self._dial_local(routing_key), None
                if hop is None:
                    raise FlowRefused(Reason.NO_ROUTE, f"no route to site {self.name_of(provider)}")
                return await self._open(provider, routing_key, hop), hop
            except FlowError as exc:
                tries.error = exc
                code = getattr(exc, "code", None)
                if code in _PROVIDER_REFUSALS:
                    if code in _PROVIDER_FAULTS:
                        self.penalize(provider)
                    raise
                if hop is None:
                    raise  # no path left to it from here
                avoid.add(hop)  # the path failed: the provider may be reached another way
        assert tries.error is not None
        raise tries.error

    def penalize(self, provider: str) -> None:
        """The provider's target refused: new flows avoid it for a while (see routes.Penalty)."""
        self.penalties[provider] = self.penalties.get(provider, Penalty()).add(trio.current_time())

    def release(self, hop: str | None) -> None:
        """A flow that `open_to` made is over: its next hop carries one flow less."""
        if hop is not None:
            self.active[hop] -= 1

    def _provider_costs(self, routing_key: str, policy: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
        """The providers of the key within the policy, and their costs (from the cache that `_recompute` empties)."""
        costs = self._costs.get((routing_key, policy))
        if costs is None:
            costs = tuple(
                (s, self.routes[s].cost if s in self.routes else 0.0) for s in self.providers(routing_key, policy)
            )
            self._costs[routing_key, policy] = costs
        return costs

    def candidates(self, routing_key: str, policy: tuple[str, ...] = OPEN) -> list[Candidate]:
        """The providers of the key (within the policy) as an ingress here weighs them now."""
        now = trio.current_time()
        return [
            Candidate(
                site_id=s,
                cost=cost,
                outstanding=self.outstanding[s],
                penalty=self.penalties[s].at(now) if s in self.penalties else 0.0,
                last_chosen=self._chosen.get(s, 0),
            )
            for s, cost in self._provider_costs(routing_key, policy)
        ]

    def choose_provider(
        self,
        routing_key: str,
        distribution: str = BALANCED,
        exclude: Collection[str] = (),
        policy: tuple[str, ...] = OPEN,
    ) -> str | None:
        """The provider for a new flow, one the policy admits (None: there is none), remembered as the latest choice."""
        costs = self._provider_costs(routing_key, policy)
        if len(costs) == 1:  # the only one is the choice, however it weighs: no candidates to weigh
            provider = costs[0][0] if costs[0][0] not in exclude else None
        else:
            candidates = self.candidates(routing_key, policy)
            provider = choose_provider([c for c in candidates if c.site_id not in exclude], distribution)
        if provider is not None:
            self._chosen[provider] = next(self._choices)
        return provider

    def _next_hop(self, route: Route | None, exclude: Collection[str]) -> str | None:
        hop = choose_next_hop(route, self.active, exclude, self._chosen) if route else None
        if hop is not None:
            self._chosen[hop] = next(self._choices)
        return hop

    async def _open(self, provider: str, routing_key: str, hop: str) -> End:
        """A flow toward `provider` through neighbour `hop`, once the provider accepted it."""
        if hop not in self.links:
            raise FlowRefused(Reason.NO_ROUTE, f"no route to site {self.name_of(provider)}")
        uid = f"{self.site_id}:{next(self._flow_serial)}:{secrets.token_hex(4)}"
        flow = self.links[hop].open_flow(
            Open(dest=provider, routing_key=routing_key, origin=self.site_id, flow_uid=uid, hop_limit=self.settings.max_hops)
        )
        self.active[hop] += 1
        try:
            await self._wait_opened(self.links[hop], flow, provider)
        except BaseException as exc:
            flow.reset(getattr(exc, "code", Reason.UNSPECIFIED), "open abandoned")
            self.active[hop] -= 1
            raise
        return flow

    async def _wait_opened(self, link: Link, flow: FlowEnd, provider: str) -> None:
        """Until the provider accepts the flow; FlowRefused if it refuses, does not answer, or the link goes silent."""
        silence = self.settings.keepalive_interval * SILENT_INTERVALS
        give_up = trio.current_time() + self.settings.dial_timeout * 2
        while True:
            with trio.move_on_after(silence):
                await flow.wait_opened()
                return
            if trio.current_time() - link.answered_at > silence:
                raise FlowRefused(Reason.LINK_LOST, f"the link to site {link.peer.name} went silent")
            if trio.current_time() > give_up:
                raise FlowRefused(Reason.UNSPECIFIED, f"site {self.name_of(provider)} did not answer in time")

    async def _dial_local(self, routing_key: str) -> End:
        slot = self.connectors.get(routing_key)
        connector = slot.next() if slot else None
        if connector is None:
            raise FlowRefused(Reason.NO_CONNECTOR, f"site {self.name} has no connector for {routing_key!r}")
        return await connector.dial()

    def name_of(self, site_id: str) -> str:
        """A site's name for messages and status (its id's start while its record is unknown)."""
        record = self.record(site_id)
        return record.name if record else site_id[:8]

    # -- transit and egress (called from a link's reader: must not block) -----------------

    def on_open(self, link: Link, flow: FlowEnd, request: Open) -> None:
        if self._nursery is None:
            flow.refuse(Reason.SHUTDOWN, f"site {self.name} is not ready")
        elif (why := self._false_origin(link, request)) is not None:
            flow.refuse(Reason.NOT_AUTHORIZED, why)
        elif request.dest == self.site_id:
            if (why := self._refuse_origin(request.origin)) is not None:
                flow.refuse(Reason.NOT_AUTHORIZED, why)
            else:
                self._nursery.start_soon(self._contained, self._egress, flow, request)
        else:
            self._transit(link, flow, request)

    async def _contained(self, handler, flow: FlowEnd, *args) -> None:
        """Run one flow's handler; a bug in it resets that flow, not the site."""
        try:
            await handler(flow, *args)
        except Exception:
            flow.reset(Reason.UNSPECIFIED, f"internal error at site {self.name}")
            log.exception(
                "flow %s from site %s failed", flow.uid, flow.link.peer.name,
                extra=logs.event("flow_failed", peer=flow.link.peer.name, reason="internal error"),
            )

    def _false_origin(self, link: Link, request: Open) -> str | None:
        """Why an OPEN's origin cannot be true, as far as the hop it arrives at can tell (None: it may be).

        The origin is what the first site claims, and connectors' policies go
        by it: a flow never comes back to where it began, and an edge site
        carries nobody else's flows, so from an edge the origin is the edge.
        """
        if request.origin == self.site_id:
            return f"site {link.peer.name} sent a flow that claims to come from site {self.name}"
        if link.peer.mode == EDGE and request.origin != link.peer_id:
            return f"edge site {link.peer.name} sent a flow that claims to come from site {self.describe(request.origin)}"
        return None

    async def _egress(self, flow: FlowEnd, request: Open) -> None:
        slot = self.connectors.get(request.routing_key)
        if not slot or not slot.connectors:
            flow.refuse(Reason.NO_CONNECTOR, f"site {self.name} has no connector for {request.routing_key!r}")
            return
        connector = slot.next(lambda allow: self.admits(allow, request.origin))
        if connector is None:
            slot.refused += 1
            slot.refused_origin = request.origin
            origin = self.describe(request.origin)
            why = f"site {self.name} takes no flows for {request.routing_key!r} from site {origin}"
            log.debug("flow %s refused: %s", flow.uid, why, extra=logs.event("flow_refused", peer=origin, reason=why))
            flow.refuse(Reason.NOT_AUTHORIZED, why)
            return
        try:
            target = await connector.dial()
        except FlowRefused as exc:
            flow.refuse(exc.code, str(exc))
            return
        flow.accept()
        await self._relay(flow, target)

    def _transit(self, link: Link, flow: FlowEnd, request: Open) -> None:
        dest = self.name_of(request.dest)
        if self.mode == EDGE:
            flow.refuse(Reason.NO_ROUTE, f"edge site {self.name} carries no transit traffic")
            return
        if request.hop_limit <= 1:
            flow.refuse(Reason.HOP_LIMIT, f"hop limit reached at site {self.name}")
            return
        hop = self._next_hop(self.routes.get(request.dest), exclude=(link.peer_id,))
        if hop is None or hop not in self.links:
            flow.refuse(Reason.NO_ROUTE, f"site {self.name} has no route to site {dest}")
            return
        try:
            onward = self.links[hop].open_flow(attrs.evolve(request, hop_limit=request.hop_limit - 1))
        except FlowRefused as exc:
            flow.refuse(exc.code, str(exc))
            return
        self.active[hop] += 1
        assert self._nursery is not None  # (on_open refuses flows until the router runs)
        self._nursery.start_soon(self._contained, self._carry, flow, onward, hop)

    async def _carry(self, flow: FlowEnd, onward: FlowEnd, hop: str) -> None:
        try:
            try:
                with trio.fail_after(self.settings.dial_timeout * 2):
                    await onward.wait_opened()
            except FlowError as exc:
                flow.refuse(getattr(exc, "code", Reason.UNSPECIFIED), str(exc))
                return
            except trio.TooSlowError:
                onward.reset(Reason.UNSPECIFIED, "no answer to OPEN in time")
                flow.refuse(Reason.UNSPECIFIED, f"no answer from the next hop of site {self.name} in time")
                return
            flow.accept()
            await self._relay(flow, onward)
        finally:
            self.active[hop] -= 1

    async def _relay(self, a: End, b: End) -> None:
        try:
            await relay(a, b)
        except FlowError as exc:
            peer = a.link.peer.name if isinstance(a, FlowEnd) else None
            log.debug("flow %s reset: %s", getattr(a, "uid", "?"), exc, extra=logs.event("flow_reset", peer=peer, reason=exc))


def _say(event: str, lines: list[tuple[str, dict]], what: str) -> None:
    """One log line per change, or one for them all past LOG_EACH (naming the first few)."""
    if len(lines) <= LOG_EACH:
        for text, fields in lines:
            log.info("%s", text, extra=logs.event(event, **fields))
        return
    sample = "; ".join(text for text, _ in lines[:3])
    log.info(
        "%d %s, such as: %s", len(lines), what, sample, extra=logs.event(event, reason=f"{len(lines)} {what}")
    )


class PolicyView:
    """The router as a listener with a provider policy sees it: it offers only the providers the policy admits.

    Listeners (proxy/) ask a router which sites provide their key, wait for
    one, pick one, connect: this answers each of those within the policy and
    hands everything else to the router, so a listener needs nothing else to
    keep to its policy.
    """

    def __init__(self, router: Router, policy: tuple[str, ...]) -> None:
        self._router = router
        self.policy = policy

    def __getattr__(self, name: str):
        return getattr(self._router, name)

    def __repr__(self) -> str:
        return f"<PolicyView {self._router.name} providers={list(self.policy)}>"

    def providers(self, routing_key: str) -> list[str]:
        return self._router.providers(routing_key, self.policy)

    def candidates(self, routing_key: str) -> list[Candidate]:
        return self._router.candidates(routing_key, self.policy)

    def choose_provider(self, routing_key: str, distribution: str = BALANCED, exclude: Collection[str] = ()) -> str | None:
        return self._router.choose_provider(routing_key, distribution, exclude, self.policy)

    def connect(self, routing_key: str, distribution: str = BALANCED):
        return self._router.connect(routing_key, distribution, self.policy)

    async def wait_reachable(self, routing_key: str, *, providers: int = 1) -> None:
        await self._router.wait_reachable(routing_key, providers=providers, policy=self.policy)

    async def wait_unreachable(self, routing_key: str) -> None:
        await self._router.wait_unreachable(routing_key, self.policy)
