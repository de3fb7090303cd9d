"""A deterministic network of gossip engines: a simulated clock, and links with delay, loss and cuts.

Used by tests/unit/test_gossip_engine.py and by the gossip_convergence
benchmark. Everything that varies comes from one seeded `random.Random`
(delays, drops, jitter of the engines' rounds, the sites' keys), so a seed
replays exactly.

Each message really goes through `encode_message` and
`decode_message_untrusted`, so sizes are the wire's and the codec is on the
path. A site handles one message at a time: with `measure_cpu` the time the
engine (and codec) actually took is added to the simulated clock before its
answers leave, so a busy site delays what goes through it, as on one core.
Links are FIFO like the TCP streams they stand for (unless `fifo=False`,
which reorders freely); a cut link loses what was in flight on it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from fabric import pki
from fabric.errors import ProtocolError
from fabric.gossip.engine import (
    GossipEngine,
    Message,
    Rejection,
    decode_message_untrusted,
    encode_message,
)
from fabric.gossip.records import (
    LinkInfo,
    ServiceInfo,
    SiteRecord,
    sign_record,
)
from fabric.router.frames import HEADER_SIZE, INTERIOR

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def make_identity(name: str, rng: random.Random) -> pki.Identity:
    """A site identity with a key drawn from `rng` (so site ids replay with the seed), without files.

    Only the site key matters to gossip; the CA key and certificates are not used.
    """
    key = ec.derive_private_key(rng.randrange(1, _P256_ORDER), ec.SECP256R1())
    return pki.Identity(
        site_id=pki.site_id_of(key.public_key()),
        name=name,
        site_dir=Path("/nonexistent") / name,
        ca_cert_pem=b"",
        cert_pem=b"",
        ca_key=key,
        site_key=key,
    )


@attrs.define(eq=False)
class SimSite:
    identity: pki.Identity
    engine: GossipEngine
    mode: str = INTERIOR
    services: dict[str, ServiceInfo] = attrs.Factory(dict)
    busy_until: float = 0.0  # the site handles one message at a time
    timer_at: float = math.inf  # the earliest tick queued for this engine
    epoch: int = 0  # raised at every restart: queued ticks of the old engine are void
    bytes_sent: int = 0  # GOSSIP frames: payload plus frame header
    messages_sent: int = 0
    cpu: float = 0.0  # seconds spent in the engine and codec (measured with measure_cpu)
    rejections: list[Rejection] = attrs.Factory(list)
    protocol_errors: list[str] = attrs.Factory(list)

    @property
    def site_id(self) -> str:
        return self.identity.site_id

    @property
    def name(self) -> str:
        return self.identity.name


_MESSAGE, _TICK = 0, 1


class Simulation:
    def __init__(
        self,
        *,
        seed: int = 0,
        delay: float = 0.001,  # seconds per hop
        jitter: float = 0.0005,  # seconds; each message's delay is delay +- jitter, uniform
        drop: float = 0.0,  # probability that a message is lost
        fifo: bool = True,
        measure_cpu: bool = False,
        anti_entropy_interval: float = 5.0,
        purge_after: float = 60.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.delay, self.jitter, self.drop, self.fifo = delay, jitter, drop, fifo
        self.measure_cpu = measure_cpu
        self.interval, self.purge_after = anti_entropy_interval, purge_after
        self.now = 0.0
        self.sites: dict[str, SimSite] = {}
        self.links: dict[frozenset[str], int] = {}  # live links -> epoch (messages of older epochs are lost)
        self._link_epochs = 0
        self._last_arrival: dict[tuple[str, str], float] = {}
        self._queue: list[tuple[float, int, int, tuple]] = []
        self._seq = 0
        self.delivered = 0
        self.dropped = 0
        # Called after a site handled a message or a tick, with the site and the
        # simulated time its answers left: how the benchmark watches convergence.
        self.after_step: Callable[[SimSite, float], None] | None = None

    # -- building the network ---------------------------------------------------------------

    def add_site(self, name: str, *, mode: str = INTERIOR, incarnation: int = 1,
                 identity: pki.Identity | None = None) -> SimSite:
        identity = identity or make_identity(name, self.rng)
        site = SimSite(identity=identity, engine=self._new_engine(identity, mode, incarnation), mode=mode)
        site.busy_until = self.now
        self.sites[site.site_id] = site
        self._schedule(site)
        return site

    def _new_engine(self, identity: pki.Identity, mode: str, incarnation: int, **kwargs) -> GossipEngine:
        own = SiteRecord(site_id=identity.site_id, name=identity.name, incarnation=incarnation, version=0, mode=mode)

        def on_reject(rejection: Rejection) -> None:
            self.sites[identity.site_id].rejections.append(rejection)

        return GossipEngine(
            own,
            sign=functools.partial(sign_record, identity=identity),
            now=self.now,
            anti_entropy_interval=self.interval,
            purge_after=self.purge_after,
            rng=random.Random(self.rng.random()),
            on_reject=on_reject,
            **kwargs,
        )

    def connect(self, edges: Iterable[tuple[SimSite, SimSite]], cost: int = 1) -> None:
        """Bring up many links at once, then let each touched site publish once."""
        touched: dict[str, SimSite] = {}
        for a, b in edges:
            self._link_up(a, b)
            touched[a.site_id], touched[b.site_id] = a, b
        for site in touched.values():
            self.publish(site)

    def link(self, a: SimSite, b: SimSite) -> None:
        self.connect([(a, b)])

    def cut(self, a: SimSite, b: SimSite) -> None:
        """The link between a and b goes down at both ends (what was in flight on it is lost)."""
        if self.links.pop(frozenset((a.site_id, b.site_id)), None) is None:
            return
        for site, peer in ((a, b), (b, a)):
            self._run(site, lambda engine, now, p=peer: engine.link_down(p.site_id, now))
            self.publish(site)

    def neighbours(self, site: SimSite) -> list[SimSite]:
        return [self.sites[p] for link in self.links for p in link if site.site_id in link and p != site.site_id]

    def publish(self, site: SimSite) -> None:
        links = [LinkInfo(peer.site_id, 1) for peer in self.neighbours(site)]
        self._run(site, lambda engine, now: engine.publish(now, links=links, services=site.services.values()))

    def set_service(self, site: SimSite, key: str, *, connectors: int = 1, port: int = 8080) -> None:
        if connectors:
            site.services[key] = ServiceInfo(key, port=port, connectors=connectors)
        else:
            site.services.pop(key, None)
        self.publish(site)

    def stop(self, site: SimSite) -> list[SimSite]:
        """The site's process ends: its links drop. Returns its neighbours (to restart it with)."""
        neighbours = self.neighbours(site)
        for peer in neighbours:
            self.cut(site, peer)
        del self.sites[site.site_id]
        return neighbours

    def restart(self, site: SimSite, *, incarnation: int | None = None, services: dict[str, ServiceInfo] | None = None,
                neighbours: Iterable[SimSite] | None = None) -> SimSite:
        """Stop the site and start it again with the same key: a new engine, a new incarnation by default."""
        old = self.stop(site) if site.site_id in self.sites else []
        incarnation = site.engine.record.incarnation + 1 if incarnation is None else incarnation
        site.engine = self._new_engine(site.identity, site.mode, incarnation)
        site.epoch += 1
        site.timer_at = math.inf
        site.busy_until = self.now
        site.services = dict(services or {})
        self.sites[site.site_id] = site
        self._schedule(site)
        self.connect([(site, peer) for peer in (old if neighbours is None else neighbours)])
        return site

    def _link_up(self, a: SimSite, b: SimSite) -> None:
        key = frozenset((a.site_id, b.site_id))
        if key in self.links:
            return
        self._link_epochs += 1
        self.links[key] = self._link_epochs
        for site, peer in ((a, b), (b, a)):
            self._run(site, lambda engine, now, p=peer: engine.link_up(p.site_id, now))

    # -- running ------------------------------------------------------------------------------

    def inject(self, src: SimSite, dst: SimSite, payload: bytes) -> None:
        """Deliver raw bytes from src to dst over their link, as src's gossip: for bad peers."""
        self._send_bytes(src, dst.site_id, payload, self.now)

    def _run(self, site: SimSite, call: Callable[[GossipEngine, float], list[tuple[str, Message]]],
             at: float | None = None) -> None:
        start = max(self.now if at is None else at, site.busy_until)
        began = time.perf_counter()
        outbox = call(site.engine, start)
        payloads = [(peer, encode_message(message)) for peer, message in outbox]
        spent = time.perf_counter() - began
        site.cpu += spent
        done = start + (spent if self.measure_cpu else 0.0)
        site.busy_until = done
        for peer, payload in payloads:
            self._send_bytes(site, peer, payload, done)
        self._schedule(site)
        if self.after_step is not None:
            self.after_step(site, done)

    def _send_bytes(self, src: SimSite, dst: str, payload: bytes, at: float) -> None:
        epoch = self.links.get(frozenset((src.site_id, dst)))
        if epoch is None:
            return  # no link (any more): the Trio layer has nothing to write on
        src.bytes_sent += len(payload) + HEADER_SIZE
        src.messages_sent += 1
        if self.drop and self.rng.random() < self.drop:
            self.dropped += 1
            return
        arrival = at + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        if self.fifo:
            arrival = max(arrival, self._last_arrival.get((src.site_id, dst), 0.0))
            self._last_arrival[(src.site_id, dst)] = arrival
        self._push(arrival, _MESSAGE, (src.site_id, dst, epoch, payload))

    def _push(self, when: float, kind: int, data: tuple) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, kind, data))

    def _schedule(self, site: SimSite) -> None:
        deadline = site.engine.next_deadline()
        if deadline < site.timer_at:
            site.timer_at = deadline
            self._push(deadline, _TICK, (site.site_id, site.epoch, deadline))

    def step(self) -> bool:
        """Handle the next event; False when there is none."""
        if not self._queue:
            return False
        when, _, kind, data = heapq.heappop(self._queue)
        self.now = max(self.now, when)
        if kind == _MESSAGE:
            src, dst, epoch, payload = data
            site = self.sites.get(dst)
            if site is None or self.links.get(frozenset((src, dst))) != epoch:
                return True  # the link went down while this was in flight
            self.delivered += 1

            def handle(engine: GossipEngine, now: float) -> list[tuple[str, Message]]:
                try:
                    message = decode_message_untrusted(payload)
                except ProtocolError as error:
                    site.protocol_errors.append(str(error))  # a real link would close here
                    return []
                return engine.receive(src, message, now)

            self._run(site, handle, at=when)
        else:
            site_id, epoch, deadline = data
            site = self.sites.get(site_id)
            if site is None or site.epoch != epoch or site.timer_at != deadline:
                return True  # void: restarted, stopped, or superseded by an earlier timer
            site.timer_at = math.inf
            self._run(site, lambda engine, now: engine.tick(now), at=when)
        return True

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, seconds)

    def run_until(self, done: Callable[[], bool], timeout: float, *, check_every: float = 0.01) -> bool:
        """Run until `done()` (looked at every `check_every` simulated seconds), or `timeout` seconds pass.

        Returns whether `done()` held; the clock stops at the first look where it did.
        """
        deadline = self.now + timeout
        next_check = self.now
        while True:
            upcoming = self._queue[0][0] if self._queue else math.inf
            if next_check <= min(upcoming, deadline):
                self.now = max(self.now, next_check)
                if done():
                    return True
                next_check = self.now + check_every
                continue
            if upcoming > deadline:
                self.now = deadline
                return done()
            self.step()

    # -- looking at it --------------------------------------------------------------------------

    def components(self) -> list[set[str]]:
        """The live sites grouped by the links between them."""
        adjacent: dict[str, list[str]] = {site_id: [] for site_id in self.sites}
        for link in self.links:
            a, b = link
            adjacent[a].append(b)
            adjacent[b].append(a)
        left, groups = set(self.sites), []
        while left:
            group, todo = set(), [left.pop()]
            while todo:
                site = todo.pop()
                group.add(site)
                for peer in adjacent[site]:
                    if peer in left:
                        left.discard(peer)
                        todo.append(peer)
            groups.append(group)
        return groups

    def converged(self) -> bool:
        """Every site holds exactly its component's records at their current stamps, and sees them present."""
        for group in self.components():
            truth = {site_id: self.sites[site_id].engine.record.stamp for site_id in group}
            for site_id in group:
                engine = self.sites[site_id].engine
                if engine.table.digest() != truth or engine.reachable() != group:
                    return False
        return True

    def catalogs(self) -> dict[str, dict[str, set[str]]]:
        return {site.name: site.engine.catalog() for site in self.sites.values()}

    def rejections(self) -> list[Rejection]:
        return [r for site in self.sites.values() for r in site.rejections]


# -- topologies ---------------------------------------------------------------------------------


def line(sites: list[SimSite]) -> list[tuple[SimSite, SimSite]]:
    return list(itertools.pairwise(sites))


def star(sites: list[SimSite]) -> list[tuple[SimSite, SimSite]]:
    return [(sites[0], leaf) for leaf in sites[1:]]


def random_mesh(sites: list[SimSite], rng: random.Random, extra: float = 1.0) -> list[tuple[SimSite, SimSite]]:
    """A random tree (each site links to one before it) plus `extra` * N random chords: connected, degree ~4."""
    edges: set[frozenset[int]] = set()
    for i in range(1, len(sites)):
        edges.add(frozenset((i, rng.randrange(i))))
    chords = int(extra * len(sites))
    while len(sites) > 2 and chords > 0 and len(edges) < len(sites) * (len(sites) - 1) // 2:
        a, b = rng.sample(range(len(sites)), 2)
        if frozenset((a, b)) not in edges:
            edges.add(frozenset((a, b)))
            chords -= 1
    return [(sites[min(e)], sites[max(e)]) for e in sorted(edges, key=sorted)]
