"""Status: what a site reports about itself and about the network, built from snapshots.

`site_status` and `network_status` are pure: they take a `SiteView` (the
site's own config and parts, as plain data) and a `NetworkView` (what the
router knows at one moment, as plain data) and return the frozen status
objects the CLI and the Python API show. `network_view` is the one function
here that reads a running router, to take that snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs

from .addresses import parse_address, proxy_for
from .config import ConnectorConfig, LinkConfig, ListenerConfig
from .gossip.records import SiteRecord
from .proxy.http import HttpStats
from .router.policy import by_name, site_label, sites_admitted
from .router.policy import notes as policy_notes
from .router.routes import BALANCED, Candidate, Route
from .router.transports import peer_address, transport_of

if TYPE_CHECKING:
    from .router.router import Router


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


# -- snapshots -------------------------------------------------------------------------------


@attrs.frozen
class LiveLink:
    """A link the router runs now, as status shows it."""

    peer_id: str
    peer_name: str
    dialer: bool
    cost: int
    up: bool
    rtt: float | None  # seconds, smoothed
    flows: int
    transport: str | None
    address: str | None


@attrs.frozen
class ListenerState:
    """A listener of this site, configured or made by service sync, as status needs it."""

    config: ListenerConfig
    running: bool
    port: int | None  # the bound one while running, else the configured one
    connections: int = 0
    accepting: bool = False
    error: str | None = None  # why it does not accept now, or why it did not start
    auto: bool = False
    http: HttpStats | None = None


@attrs.frozen
class NetworkView:
    """What the router knows at one moment: the records, routes and offers that status reads."""

    site_id: str
    records: tuple[SiteRecord, ...]  # every site known from gossip, this one included
    routes: Mapping[str, Route]  # site id -> its route, for the reachable ones
    links: Mapping[str, LiveLink]  # peer id -> the link with it
    # Site id -> seconds since its record arrived (or since it became unreachable).
    ages: Mapping[str, float] = attrs.field(factory=dict)
    active: Mapping[str, int] = attrs.field(factory=dict)  # next-hop site id -> flows through it now
    # Site id -> changes of its route while it stayed reachable.
    route_changes: Mapping[str, int] = attrs.field(factory=dict)
    # Routing key -> the reachable sites whose offer of it is taken here, and the ones whose offer is not.
    providers: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    ignored: Mapping[str, frozenset[str]] = attrs.field(factory=dict)
    candidates: Mapping[str, tuple[Candidate, ...]] = attrs.field(factory=dict)  # routing key -> providers, weighed
    offer_limits: Mapping[str, frozenset[str]] = attrs.field(factory=dict)  # linked site -> the only keys taken from it
    # Routing key -> (flows its connectors refused, the latest origin refused).
    refusals: Mapping[str, tuple[int, str | None]] = attrs.field(factory=dict)
    # Derived from the records: site id -> name, and name -> the ids that carry it.
    names: Mapping[str, str] = attrs.field(init=False)
    name_index: Mapping[str, tuple[str, ...]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        names = {record.site_id: record.name for record in self.records}
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "name_index", by_name(names))

    def name_of(self, site_id: str) -> str:
        return self.names.get(site_id, site_id[:8])

    def label(self, site_id: str) -> str:
        return site_label(site_id, self.names, self.name_index)

    def describe(self, site_id: str) -> str:
        """A site for a message about policy: its name and short id (the id alone while it is unknown)."""
        name = self.names.get(site_id)
        return f"{name} ({site_id[:8]})" if name is not None else site_id[:8]

    def sites_named(self, name: str) -> tuple[str, ...]:
        return self.name_index.get(name, ())

    def providers_within(self, routing_key: str, policy: tuple[str, ...]) -> tuple[str, ...]:
        providers = self.providers.get(routing_key, ())
        if not policy:
            return providers
        admitted = sites_admitted(policy, self.names, self.name_index)
        return tuple(site for site in providers if site in admitted)

    def name_notes(self) -> list[str]:
        """A line for each name that several known sites carry: by name, a policy admits none of them."""
        shared = {name: ids for name, ids in self.name_index.items() if len(ids) > 1}
        return [
            f"{len(ids)} sites are named {name}*: {', '.join(ids)} (name them by site id)"
            for name, ids in sorted(shared.items())
        ]


@attrs.frozen
class SiteView:
    """This site's own side of status: its config and what its parts hold, as plain data."""

    site_id: str
    name: str
    mode: str
    running: bool
    access: tuple[str, ...]  # where it accepts links: tls:// first, then ws://
    outgoing: tuple[LinkConfig, ...]  # the links it dials
    link_errors: Mapping[str, str]  # outgoing link name -> why it is not up
    listeners: tuple[ListenerState, ...]  # configured ones in config order, then service sync's
    sync_refused: Mapping[str, tuple[int, str]]  # routing key -> (port, why service sync does not listen for it)
    service_host: str
    connectors: tuple[ConnectorConfig, ...]


def network_view(router: Router, peers: Iterable[str] = ()) -> NetworkView:
    """A snapshot of what the router knows now; `peers`: sites whose offer limits to take besides the known ones."""
    records = tuple(router.gossip.table.values())
    keys = {s.routing_key for r in records for s in r.services}
    return NetworkView(
        site_id=router.site_id,
        records=records,
        routes=dict(router.routes),
        links={
            peer_id: LiveLink(
                peer_id=peer_id,
                peer_name=link.peer.name,
                dialer=link.dialer,
                cost=link.cost,
                up=not link.closed,
                rtt=link.rtt,
                flows=link.flow_count,
                transport=transport_of(link.stream),
                address=peer_address(link.stream),
            )
            for peer_id, link in router.links.items()
        },
        ages={s.site_id: s.age for s in router.gossip.status()},
        active=dict(router.active),
        route_changes=dict(router.route_changes),
        providers={key: tuple(router.providers(key)) for key in keys},
        candidates={key: tuple(router.candidates(key)) for key in keys},
        ignored={key: frozenset(sites) for key, sites in router.ignored_offers().items()},
        offer_limits={
            site_id: limit for site_id in {r.site_id for r in records} | set(router.links)
            if (limit := router.offer_limit(site_id)) is not None
        },
        refusals={key: (slot.refused, slot.refused_origin) for key, slot in router.connectors.items()},
    )


# -- builders ---------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _dial_status(config: LinkConfig) -> dict:
    """How an outgoing link is dialled: transport, first address, proxy (as the environment names it, if so)."""
    try:
        address = parse_address(config.addresses[0])
        proxy = proxy_for(address, config.proxy)
    except ValueError as exc:
        return {"address": config.addresses[0], "proxy": f"bad proxy setting: {exc}"}
    return {"transport": address.scheme, "address": str(address), "proxy": None if proxy is None else str(proxy)}


def _offers_status(site: SiteView, net: NetworkView, peer_id: str, config: LinkConfig | None) -> dict:
    """What a linked site may offer through its link (as applied, or as configured while stopped), and
    which of its offers are ignored for that."""
    if site.running:
        limit = net.offer_limits.get(peer_id)
        offers = None if limit is None else tuple(sorted(limit))
    else:
        offers = config.offers if config else None
    return {"offers": offers, "ignored": tuple(sorted(k for k, sites in net.ignored.items() if peer_id in sites))}


def listener_status(state: ListenerState, net: NetworkView) -> ListenerStatus:
    config = state.config
    error = state.error
    if state.running:
        error = _policy_error(config, net) or error
    return ListenerStatus(
        name=config.name,
        routing_key=config.routing_key,
        host=config.host,
        port=state.port,
        connections=state.connections,
        accepting=state.accepting,
        error=error,
        auto=state.auto,
        distribution=config.distribution,
        protocol=config.protocol,
        http=state.http,
        providers=config.providers,
        policy_notes=policy_notes(config.providers, net.names),
    )


def _policy_error(config: ListenerConfig, net: NetworkView) -> str | None:
    """Why a running listener has no provider, when sites offer its key but its policy admits none of them."""
    key = config.routing_key
    if not config.providers or net.providers_within(key, config.providers) or not (offered := net.providers.get(key)):
        return None
    return (
        f"no reachable site its provider policy admits offers routing key {key!r}; "
        f"{', '.join(net.describe(p) for p in offered)} {'offers' if len(offered) == 1 else 'offer'} it"
    )


def _connector_status(config: ConnectorConfig, net: NetworkView) -> ConnectorStatus:
    refused, refused_from = net.refusals.get(config.routing_key, (0, None))
    return ConnectorStatus(
        config.name,
        config.routing_key,
        config.host,
        config.port,
        allow=config.allow,
        policy_notes=policy_notes(config.allow, net.names),
        refused=refused,
        refused_from=None if refused_from is None else net.describe(refused_from),
    )


def _links(site: SiteView, net: NetworkView) -> list[LinkStatus]:
    outgoing = {l.peer_id: l for l in site.outgoing}
    links = []
    for link in net.links.values():
        config = outgoing.get(link.peer_id)
        links.append(
            LinkStatus(
                name=config.name if config else link.peer_name,
                peer_id=link.peer_id,
                direction="outgoing" if link.dialer else "incoming",
                cost=link.cost,
                up=link.up,
                rtt_ms=_ms(link.rtt),
                flows=link.flows,
                **(_dial_status(config) if config else {"transport": link.transport, "address": link.address}),
                **_offers_status(site, net, link.peer_id, config),
            )
        )
    for config in site.outgoing:
        if config.peer_id not in net.links:
            links.append(
                LinkStatus(
                    name=config.name,
                    peer_id=config.peer_id,
                    direction="outgoing",
                    cost=config.cost,
                    up=False,
                    rtt_ms=None,
                    flows=0,
                    error=site.link_errors.get(config.name),
                    **_dial_status(config),
                    **_offers_status(site, net, config.peer_id, config),
                )
            )
    return sorted(links, key=lambda l: l.name)


def _site_info(record: SiteRecord, net: NetworkView) -> SiteInfo:
    route = net.routes.get(record.site_id)
    hops = tuple(
        HopStatus(
            name=net.name_of(hop.peer),
            cost=hop.cost,
            rtt_ms=_ms(net.links[hop.peer].rtt if hop.peer in net.links else None),
            flows=net.active.get(hop.peer, 0),
        )
        for hop in (route.next_hops if route else ())
    )
    return SiteInfo(
        site_id=record.site_id,
        name=record.name,
        mode=record.mode,
        reachable=route is not None,
        cost=route.cost if route else None,
        next_hops=hops,
        age_s=round(net.ages.get(record.site_id, 0.0), 1),
        services=tuple(sorted(s.routing_key for s in record.services if s.connectors)),
        route_changes=net.route_changes.get(record.site_id, 0),
        name_shared=len(net.sites_named(record.name)) > 1,
    )


def site_status(site: SiteView, net: NetworkView) -> SiteStatus:
    """The site, its links, the sites and services it knows, its listeners and connectors."""
    keys = sorted({s.routing_key for r in net.records for s in r.services})
    services = tuple(
        ServiceStatus(
            routing_key=key,
            providers=tuple(
                sorted(
                    (
                        ProviderStatus(net.label(c.site_id), c.cost, c.outstanding, round(c.penalty, 1))
                        for c in net.candidates.get(key, ())
                    ),
                    key=lambda p: p.name,
                )
            ),
        )
        for key in keys
    )
    listeners = [listener_status(state, net) for state in site.listeners]
    listeners += [
        ListenerStatus(key, key, site.service_host, port, 0, False, error, auto=True)
        for key, (port, error) in sorted(site.sync_refused.items())
    ]
    return SiteStatus(
        site_id=site.site_id,
        name=site.name,
        mode=site.mode,
        link_address=next((a for a in site.access if a.startswith("tls:")), None),
        ws_address=next((a for a in site.access if a.startswith("ws:")), None),
        links=tuple(_links(site, net)),
        sites=tuple(sorted((_site_info(r, net) for r in net.records if r.site_id != site.site_id), key=lambda s: s.name)),
        services=services,
        listeners=tuple(listeners),
        connectors=tuple(_connector_status(c, net) for c in site.connectors),
        notes=tuple(net.name_notes()),
    )


def network_status(site: SiteView, net: NetworkView) -> NetworkStatus:
    """Every site known from gossip with its links and services, and every routing key with who offers it."""
    sites = []
    for record in net.records:
        me = record.site_id == site.site_id
        route = net.routes.get(record.site_id)
        links = []
        for info in record.links:
            live = net.links.get(info.peer) if me else None
            rtt = live.rtt if live is not None else info.rtt
            links.append(NetworkLink(info.peer, net.name_of(info.peer), info.cost, _ms(rtt)))
        sites.append(
            NetworkSite(
                site_id=record.site_id,
                name=record.name,
                mode=record.mode,
                reachable=me or route is not None,
                cost=0.0 if me else (route.cost if route else None),
                links=tuple(sorted(links, key=lambda l: l.peer_name)),
                services=tuple(sorted(s.routing_key for s in record.services if s.connectors)),
                name_shared=len(net.sites_named(record.name)) > 1,
            )
        )
    configured = [state.config for state in site.listeners if not state.auto]
    keys = sorted({s.routing_key for r in net.records for s in r.services} | {l.routing_key for l in configured})
    services = []
    notes = []
    for key in keys:
        providers = net.providers.get(key, ())
        ignored = sorted(net.ignored.get(key, ()))
        offering = [*providers, *ignored]
        service = NetworkService(
            routing_key=key,
            providers=tuple(sorted(net.label(p) for p in providers)),
            listeners=tuple(l.name for l in configured if l.routing_key == key),
            shared=len(offering) > 1,
            ignored=tuple(sorted(net.label(p) for p in ignored)),
        )
        services.append(service)
        if service.shared:
            notes.append(
                f"routing key {key!r} is offered by {len(offering)} sites: "
                + ", ".join(net.describe(p) for p in offering)
                + (f" (ignored here: {', '.join(service.ignored)})" if service.ignored else "")
            )
    return NetworkStatus(
        sites=tuple(sorted(sites, key=lambda s: (s.cost is None, s.cost or 0, s.name))),
        services=tuple(services),
        notes=(*notes, *net.name_notes()),
    )
