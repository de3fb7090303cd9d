"""Dissemination of site records over links: the Trio side of the gossip engine.

`engine.py` decides what to send (push on change, forward once, anti-entropy
by digest, purge); this class feeds it link events, GOSSIP frames and the
clock, and sends what it returns on the links it names. It knows a link only
as a `Neighbour`: the router's links are that, and the site hands this class
to the router (router.Catalog), so neither imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import trio

from .. import logs
from ..config import Settings
from .engine import (
    GossipEngine,
    Outbox,
    Rejection,
    SiteStatus,
    decode_message_untrusted,
    encode_message,
)
from .records import LinkInfo, RecordTable, ServiceInfo, SiteRecord

log = logging.getLogger("fabric.gossip")


class Neighbour(Protocol):
    """What gossip needs of a link (router.link.Link): the site it reaches, and a way to send it a GOSSIP frame."""

    @property
    def peer_id(self) -> str: ...

    def send_gossip(self, payload: bytes) -> None: ...


class Gossip:
    def __init__(
        self,
        *,
        site_id: str,
        name: str,
        mode: str,
        incarnation: int,
        sign: Callable[[SiteRecord], SiteRecord],
        settings: Settings,
        links: Callable[[], Mapping[str, Neighbour]],
        on_change: Callable[[], None],
    ) -> None:
        self._rejections = logs.Throttle(logs.LINE_INTERVAL)  # a member can send bad records by the thousand
        self._engine = GossipEngine(
            SiteRecord(site_id=site_id, name=name, incarnation=incarnation, version=0, mode=mode),
            sign=sign,
            now=trio.current_time(),
            anti_entropy_interval=settings.anti_entropy_interval,
            purge_after=settings.purge_after,
            on_reject=self._rejected,
        )
        self._links = links
        self._on_change = on_change
        self._generation = self._engine.generation
        self._timer_moved = trio.Event()

    @property
    def table(self) -> RecordTable:
        return self._engine.table

    @property
    def record(self) -> SiteRecord:
        return self._engine.record

    def status(self) -> list[SiteStatus]:
        return self._engine.status(trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine's timer: anti-entropy rounds, follow-ups and purges."""
        task_status.started()
        while True:
            with trio.move_on_at(self._engine.next_deadline()):
                await self._timer_moved.wait()
            self._timer_moved = trio.Event()
            self._deliver(self._engine.tick(trio.current_time()))

    def publish(self, links: Iterable[LinkInfo], services: Iterable[ServiceInfo]) -> None:
        """Our links or services changed: a new version of our record, pushed to every neighbour."""
        self._send(self._engine.publish(trio.current_time(), links=links, services=services))

    def link_up(self, link: Neighbour) -> None:
        self._send(self._engine.link_up(link.peer_id, trio.current_time()))

    def link_down(self, link: Neighbour) -> None:
        self._send(self._engine.link_down(link.peer_id, trio.current_time()))

    def receive(self, link: Neighbour, payload: bytes) -> None:
        """A GOSSIP frame; raises ProtocolError (ending that link) if it does not decode."""
        message = decode_message_untrusted(payload)
        self._send(self._engine.receive(link.peer_id, message, trio.current_time()))

    def _send(self, outbox: Outbox) -> None:
        """After an event from outside the timer: deliver, and let the timer see its new deadline."""
        self._deliver(outbox)
        self._timer_moved.set()

    def _deliver(self, outbox: Outbox) -> None:
        links = self._links()
        for peer, message in outbox:
            if (link := links.get(peer)) is not None:
                link.send_gossip(encode_message(message))
        if self._engine.generation != self._generation:
            self._generation = self._engine.generation
            self._on_change()

    def _rejected(self, rejection: Rejection) -> None:
        """A record refused: a warning for the first from each neighbour per interval, the rest at debug."""
        about = f" about site {rejection.site_id[:8]}" if rejection.site_id else ""
        held = self._rejections.admit(rejection.peer, trio.current_time())
        log.log(
            logging.DEBUG if held is None else logging.WARNING,
            "gossip from site %s%s dropped: %s%s", rejection.peer[:8], about, rejection.reason, logs.held_back(held or 0),
            extra=logs.event("gossip_dropped", peer=rejection.peer[:8], reason=rejection.reason),
        )
