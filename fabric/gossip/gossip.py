"""Dissemination of site records over links.

First version: a site pushes its own record to every neighbour when it
changes, forwards each record that is new to it once to every neighbour but
the one it came from, and sends its whole table to a neighbour when a link
comes up (which repairs whatever was missed while it was down).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..router.link import Link
from ..router.frames import MAX_PAYLOAD
from .records import (
    MAX_RECORDS,
    LinkInfo,
    RecordTable,
    ServiceInfo,
    SiteRecord,
    decode_records_untrusted,
    encode_record_batches,
)

log = logging.getLogger("fabric.gossip")

# Sites a site keeps records of. A peer could invent records without end;
# past this many, records of sites not yet known are dropped (and logged).
MAX_SITES = MAX_RECORDS


class Gossip:
    def __init__(
        self,
        *,
        site_id: str,
        name: str,
        mode: str,
        incarnation: int,
        links: Callable[[], Iterable[Link]],
        on_change: Callable[[], None],
    ) -> None:
        self.table = RecordTable()
        self._links = links
        self._on_change = on_change
        self._record = SiteRecord(site_id=site_id, name=name, incarnation=incarnation, version=0, mode=mode)
        self.table.apply(self._record)

    @property
    def record(self) -> SiteRecord:
        return self._record

    def publish(self, links: Iterable[LinkInfo], services: Iterable[ServiceInfo]) -> None:
        """Raise our version with new links and services, and push it to every neighbour."""
        links, services = tuple(sorted(links, key=lambda l: l.peer)), tuple(sorted(services, key=lambda s: s.routing_key))
        if (links, services) == (self._record.links, self._record.services):
            return
        record = SiteRecord(
            site_id=self._record.site_id,
            name=self._record.name,
            incarnation=self._record.incarnation,
            version=self._record.version + 1,
            mode=self._record.mode,
            links=links,
            services=services,
        )
        self._record = record
        self.table.apply(record)
        self._flood([record], exclude=None)
        self._on_change()

    def link_up(self, link: Link) -> None:
        for payload in encode_record_batches(self.table.values(), MAX_PAYLOAD):
            link.send_gossip(payload)

    def receive(self, link: Link, payload: bytes) -> None:
        """Apply a neighbour's records; raises ProtocolError (ending that link) if malformed."""
        records = decode_records_untrusted(payload)
        own = self._record.site_id
        fresh = [r for r in records if r.site_id != own and self._room_for(r) and self.table.apply(r)]
        if fresh:
            self._flood(fresh, exclude=link)
            self._on_change()

    def _room_for(self, record: SiteRecord) -> bool:
        if record.site_id in self.table or len(self.table) < MAX_SITES:
            return True
        log.warning("record of site %s dropped: this site already knows %d sites, its limit", record.name, MAX_SITES)
        return False

    def _flood(self, records: list[SiteRecord], exclude: Link | None) -> None:
        payloads = list(encode_record_batches(records, MAX_PAYLOAD))
        for link in self._links():
            if link is not exclude:
                for payload in payloads:
                    link.send_gossip(payload)
