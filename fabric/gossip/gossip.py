"""Dissemination of site records over links.

First version: a site pushes its own record to every neighbour when it
changes, forwards each record that is new to it once to every neighbour but
the one it came from, and sends its whole table to a neighbour when a link
comes up (which repairs whatever was missed while it was down).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..router.link import Link
from .records import LinkInfo, RecordTable, ServiceInfo, SiteRecord, decode_records_untrusted, encode_records


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
        link.send_gossip(encode_records(self.table.values()))

    def receive(self, link: Link, payload: bytes) -> None:
        """Apply a neighbour's records; raises ProtocolError (ending that link) if malformed."""
        records = decode_records_untrusted(payload)
        own = self._record.site_id
        fresh = [r for r in records if r.site_id != own and self.table.apply(r)]
        if fresh:
            self._flood(fresh, exclude=link)
            self._on_change()

    def _flood(self, records: list[SiteRecord], exclude: Link | None) -> None:
        payload = encode_records(records)
        for link in self._links():
            if link is not exclude:
                link.send_gossip(payload)
