"""Status builders: plain snapshots in, status objects out, with no site running."""

from __future__ import annotations

from fabric.config import ConnectorConfig, LinkConfig, ListenerConfig
from fabric.gossip.records import LinkInfo, ServiceInfo, SiteRecord
from fabric.router.routes import Candidate, NextHop, Route
from fabric.status import ListenerState, LiveLink, NetworkView, SiteView, network_status, site_status

HERE, NEAR, FAR, TWIN = "a" * 32, "b" * 32, "c" * 32, "d" * 32


def record(site_id: str, name: str, *, links=(), services=()) -> SiteRecord:
    return SiteRecord(site_id=site_id, name=name, incarnation=1, version=1, mode="interior", links=links, services=services)


def live(peer_id: str, name: str, *, dialer: bool, rtt: float | None = 0.002) -> LiveLink:
    return LiveLink(peer_id, name, dialer, cost=1, up=True, rtt=rtt, flows=2, transport="tls", address="127.0.0.1:9000")


def view(*, running: bool = True, listeners=(), outgoing=(), link_errors=None, sync_refused=None, connectors=()) -> SiteView:
    return SiteView(
        site_id=HERE, name="here", mode="interior", running=running, access=("tls://127.0.0.1:9000",),
        outgoing=tuple(outgoing), link_errors=link_errors or {}, listeners=tuple(listeners),
        sync_refused=sync_refused or {}, service_host="127.0.0.1", connectors=tuple(connectors),
    )


def network(**fields) -> NetworkView:
    """Here, linked to near (which this site dials), which links to far; far offers "db"."""
    defaults = dict(
        site_id=HERE,
        records=(
            record(HERE, "here", links=(LinkInfo(NEAR, 1),)),
            record(NEAR, "near", links=(LinkInfo(HERE, 1), LinkInfo(FAR, 2, rtt=0.01))),
            record(FAR, "far", links=(LinkInfo(NEAR, 2),), services=(ServiceInfo("db", port=5432),)),
        ),
        routes={NEAR: Route(NEAR, 1.0, (NextHop(NEAR, 1.0),)), FAR: Route(FAR, 3.0, (NextHop(NEAR, 3.0),))},
        links={NEAR: live(NEAR, "near", dialer=True)},
        active={NEAR: 2},
        providers={"db": (FAR,)},
        candidates={"db": (Candidate(FAR, 3.0, outstanding=1),)},
    )
    return NetworkView(**{**defaults, **fields})


def test_site_status_shows_links_sites_and_services_from_the_snapshot():
    outgoing = LinkConfig(name="to-near", peer_id=NEAR, addresses=("tls://127.0.0.1:9001",), cost=1)
    status = site_status(view(outgoing=[outgoing]), network())
    assert status.link_address == "tls://127.0.0.1:9000" and status.ws_address is None
    (link,) = status.links
    assert (link.name, link.direction, link.rtt_ms, link.flows, link.transport) == ("to-near", "outgoing", 2.0, 2, "tls")
    assert [s.name for s in status.sites] == ["far", "near"]  # this site is not among them
    far = status.sites[0]
    assert far.reachable and far.cost == 3.0 and far.services == ("db",)
    assert [(h.name, h.flows, h.rtt_ms) for h in far.next_hops] == [("near", 2, 2.0)]
    (service,) = status.services
    assert service.routing_key == "db" and [(p.name, p.outstanding) for p in service.providers] == [("far", 1)]


def test_a_link_that_is_down_shows_why_and_what_a_stopped_site_would_apply():
    outgoing = LinkConfig(name="to-far", peer_id=FAR, addresses=("wss://far.example:443/fabric",), cost=4, offers=("db",))
    stopped = site_status(view(running=False, outgoing=[outgoing], link_errors={"to-far": "refused"}), network())
    (far,) = (l for l in stopped.links if l.name == "to-far")
    assert not far.up and far.error == "refused" and far.transport == "wss" and far.offers == ("db",)
    running = site_status(view(outgoing=[outgoing]), network(offer_limits={FAR: frozenset({"web"})}))
    assert next(l for l in running.links if l.name == "to-far").offers == ("web",)  # as applied


def test_an_incoming_link_is_named_by_its_peer_and_shows_its_address():
    status = site_status(view(), network(links={NEAR: live(NEAR, "near", dialer=False, rtt=None)}))
    (link,) = status.links
    assert (link.name, link.direction, link.rtt_ms, link.address) == ("near", "incoming", None, "127.0.0.1:9000")


def test_a_listener_whose_policy_admits_no_provider_says_so():
    config = ListenerConfig(name="db", routing_key="db", port=7000, providers=("near",))
    running = ListenerState(config, running=True, port=7000)
    stopped = ListenerState(ListenerConfig(name="web", routing_key="web", port=0), running=False, port=0, error="in use")
    status = site_status(view(listeners=[running, stopped], sync_refused={"cache": (6379, "not listened for")}), network())
    db, web, cache = status.listeners
    assert db.error is not None and "provider policy admits" in db.error and "far (cccccccc) offers it" in db.error
    assert (web.port, web.accepting, web.error) == (0, False, "in use")
    assert cache.auto and (cache.port, cache.error, cache.host) == (6379, "not listened for", "127.0.0.1")


def test_connectors_show_refusals_by_the_origin_named():
    connector = ConnectorConfig(name="db", routing_key="db", port=5432, allow=("ghost",))
    (status,) = site_status(view(connectors=[connector]), network(refusals={"db": (3, FAR)})).connectors
    assert (status.refused, status.refused_from) == (3, "far (cccccccc)")
    assert status.policy_notes == ("'ghost' names no site known here yet",)


def test_network_status_lists_every_site_and_notes_shared_names_and_keys():
    records = (
        *network().records,
        record(TWIN, "far", services=(ServiceInfo("db"),)),
    )
    net = network(records=records, providers={"db": (FAR, TWIN)}, routes={**network().routes, TWIN: Route(TWIN, 5.0, ())})
    listener = ListenerState(ListenerConfig(name="db-in", routing_key="db", port=7000), running=False, port=7000)
    status = network_status(view(listeners=[listener]), net)
    assert [s.name for s in status.sites] == ["here", "near", "far", "far"]  # by cost, this site first
    assert status.sites[0].cost == 0.0 and status.sites[0].links[0].rtt_ms == 2.0  # its own link, measured here
    assert status.sites[2].name_shared and not status.sites[1].name_shared
    (db,) = status.services
    assert db.shared and db.listeners == ("db-in",) and db.providers == ("far (cccccccc)", "far (dddddddd)")
    assert any("offered by 2 sites" in n for n in status.notes) and any("2 sites are named far*" in n for n in status.notes)


def test_network_status_names_ignored_offers():
    net = network(providers={}, ignored={"db": frozenset({FAR})})
    (db,) = network_status(view(), net).services
    assert db.providers == () and db.ignored == ("far",) and not db.shared
