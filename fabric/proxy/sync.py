"""Service sync's plan, without I/O: which routing keys offered elsewhere get an automatic listener here.

The site binds and closes what the plan says; the plan alone decides, so the
bounds below hold whatever records arrive: at most `per_site` listeners charged
to one offering site, `total` in all, no port below SYNC_MIN_PORT, and a
listener once open stays on its port while any site offers its key.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Mapping

import attrs

# Service sync takes no port below this: those belong to the host's own
# services (ssh, smtp, http), and a site that can bind them runs privileged.
SYNC_MIN_PORT = 1024
# Why service sync does not listen for a routing key that is offered.
SYNC_CAP = "cap"  # max_auto_listeners are held already
SYNC_SITE_LIMIT = "site limit"  # each site offering it is charged max_auto_listeners_per_site already
SYNC_LOW_PORT = "low port"  # each site offering it advertises a port below SYNC_MIN_PORT
SYNC_BIND = "bind"  # its port could not be bound (in use, mostly)


@attrs.frozen
class SyncHold:
    """A routing key service sync listens for, or tried to, charged to one site that offers it."""

    provider: str  # site id
    port: int
    protocol: str
    error: str | None = None  # why the port could not be bound; not tried again while that provider offers it there


@attrs.frozen
class SyncRefusal:
    """A routing key offered elsewhere that service sync does not listen for."""

    cause: str  # SYNC_CAP, SYNC_SITE_LIMIT or SYNC_LOW_PORT
    port: int  # the lowest the sites that could be charged advertise
    providers: tuple[str, ...]  # those sites' ids


@attrs.frozen
class SyncPlan:
    holds: dict[str, SyncHold]  # routing key -> hold: those kept, and the new ones
    new: tuple[str, ...]  # keys to listen for now
    refused: dict[str, SyncRefusal]


def plan_service_sync(
    offers: Mapping[str, Mapping[str, tuple[int, str]]],
    holds: Mapping[str, SyncHold],
    *,
    total: int,
    per_site: int,
) -> SyncPlan:
    """Which offered routing keys service sync holds: `offers` maps key -> site id -> (port, protocol).

    A hold stays, on its port and with its protocol, while any site offers its
    key: no provider's hint moves it, and none is closed to make room. Each is
    charged to one site offering it, at most `per_site` to a site and `total`
    in all. New keys go to the sites charged least first, each taking its own
    keys in name order, so a site offering many keys loses only keys that no
    site with room offers too. A failed bind stays charged, and is tried again
    only when its provider's offer changes.
    """
    kept: dict[str, SyncHold] = {}
    orphans: list[str] = []
    for key in sorted(holds):
        hold, offered = holds[key], offers.get(key)
        if not offered:
            continue
        if hold.provider in offered and (hold.error is None or offered[hold.provider][0] == hold.port):
            kept[key] = hold
        elif hold.error is None:
            orphans.append(key)
    charged = collections.Counter(hold.provider for hold in kept.values())
    for key in orphans:  # its provider withdrew it: the listener stays, charged to another
        provider = min(offers[key], key=lambda site: (charged[site], site))
        charged[provider] += 1
        kept[key] = attrs.evolve(holds[key], provider=provider)

    usable: dict[str, list[str]] = {}  # key -> sites whose port for it service sync would take
    queues: dict[str, list[str]] = {}  # site id -> keys it offers that are not held, in name order
    refused: dict[str, SyncRefusal] = {}
    for key in sorted(offers.keys() - kept.keys()):
        offered = offers[key]
        usable[key] = sorted(site for site, (port, _) in offered.items() if port >= SYNC_MIN_PORT)
        for site in usable[key]:
            queues.setdefault(site, []).append(key)
        if not usable[key]:
            refused[key] = SyncRefusal(SYNC_LOW_PORT, min(port for port, _ in offered.values()), tuple(sorted(offered)))
    new: dict[str, SyncHold] = {}
    taken = dict.fromkeys(queues, 0)  # site id -> how far into its queue
    ready = [(charged[site], site) for site in queues if charged[site] < per_site]
    heapq.heapify(ready)
    while ready and len(kept) + len(new) < total:
        _, site = heapq.heappop(ready)
        queue = queues[site]
        while taken[site] < len(queue) and queue[taken[site]] in new:
            taken[site] += 1
        if taken[site] == len(queue):
            continue
        key = queue[taken[site]]
        protocols = {protocol for _, protocol in offers[key].values()}  # HTTP only if every provider speaks it
        new[key] = SyncHold(site, offers[key][site][0], "http" if protocols == {"http"} else "tcp")
        charged[site] += 1
        if charged[site] < per_site:
            heapq.heappush(ready, (charged[site], site))
    for key, sites in usable.items():
        if sites and key not in new:
            cause = SYNC_SITE_LIMIT if all(charged[site] >= per_site for site in sites) else SYNC_CAP
            refused[key] = SyncRefusal(cause, min(offers[key][site][0] for site in sites), tuple(sites))
    return SyncPlan(holds={**kept, **new}, new=tuple(new), refused=refused)
