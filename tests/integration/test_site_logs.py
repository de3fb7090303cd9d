"""Each site's log lines name the site, and link events name the peer and the reason."""

from __future__ import annotations

import io
import json
import logging

import trio

from fabric import logs


async def test_link_events_name_site_peer_and_reason_as_json(network, tcp):
    stream = io.StringIO()
    handler = logs.stream_handler(stream, "json")
    fabric_log = logging.getLogger("fabric")
    fabric_log.addHandler(handler)
    old_level = fabric_log.level
    fabric_log.setLevel(logging.INFO)
    try:
        async with network.site("hub", link_port=0) as hub, network.site("edge") as edge:
            await network.link(edge, hub)
            # Something that is not TLS on the link port: refused, and logged before it is closed.
            with trio.fail_after(10):
                junk = await tcp.connect(hub.link_port)
                async with junk:
                    await junk.send_all(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 600)
                    await tcp.read_until_end(junk)
    finally:
        fabric_log.removeHandler(handler)
        fabric_log.setLevel(old_level)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ups = {(l["site"], l["peer"].split(" ")[0]) for l in lines if l["event"] == "link_up"}
    assert ("hub", "edge") in ups and ("edge", "hub") in ups
    downs = [l for l in lines if l["event"] == "link_down"]
    assert downs and all(l["reason"] for l in downs)  # the sites stopped: each link says why it went down
    junk_lines = [l for l in lines if l["event"] in ("link_refused", "handshake_lost")]
    assert junk_lines and all(l["site"] == "hub" and l["peer"].startswith("127.0.0.1:") and l["reason"]
                              for l in junk_lines)
    redeemed = [l for l in lines if l["event"] == "token_redeemed"]
    assert redeemed and redeemed[0]["site"] == "hub" and redeemed[0]["peer"].startswith("edge")


class _Waiter(logging.Handler):
    """Keeps the records it sees; `await wait_for(test)` returns the first that passes `test`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()
        self._arrived = trio.Event()

    async def wait_for(self, test) -> logging.LogRecord:
        while not (found := [r for r in self.records if test(r)]):
            await self._arrived.wait()
        return found[0]


async def test_router_events_name_site_peer_reason_and_routing_key_as_json(network):
    stream = io.StringIO()
    handler = logs.stream_handler(stream, "json")
    waiter = _Waiter()
    waiter.addFilter(logs.SiteFilter())
    fabric_log = logging.getLogger("fabric")
    for h in (handler, waiter):
        fabric_log.addHandler(h)
    old_level = fabric_log.level
    fabric_log.setLevel(logging.INFO)

    def at_edge(event: str):
        return lambda r: r.site == "edge" and r.event == event

    try:
        with trio.fail_after(20):
            async with network.site("edge") as edge:
                async with network.site("hub", link_port=0) as hub:
                    await network.link(edge, hub)
                    await hub.create_connector("db", 5432, host="127.0.0.1")
                    await edge.wait_reachable("db")
                    await hub.delete_connector("db")
                    await waiter.wait_for(at_edge("service_withdrawn"))
                await waiter.wait_for(at_edge("site_unreachable"))
    finally:
        for h in (handler, waiter):
            fabric_log.removeHandler(h)
        fabric_log.setLevel(old_level)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    edge_lines = {l["event"]: l for l in lines if l["site"] == "edge"}
    reachable = edge_lines["site_reachable"]
    assert reachable["peer"] == "hub" and reachable["reason"] == "cost 1 via hub (cost 1)"
    available = edge_lines["service_available"]
    assert available["peer"] == "hub" and available["routing_key"] == "db"
    withdrawn = edge_lines["service_withdrawn"]
    assert withdrawn["peer"] == "hub" and withdrawn["routing_key"] == "db"
    assert withdrawn["reason"] == "its connectors are gone"
    unreachable = edge_lines["site_unreachable"]
    assert unreachable["peer"] == "hub" and unreachable["reason"]
    assert "routing_key" not in unreachable  # only service events carry one
