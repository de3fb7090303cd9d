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
