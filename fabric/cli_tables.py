"""The CLI's tables: status answers (plain JSON data) as text for people, 80 columns wide.

Pure: data in, text out. `fabric.cli` picks the table for each verb.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .config import DEFAULT_DISTRIBUTION, DEFAULT_PROTOCOL

TABLE_WIDTH = 80  # columns: a table must read well in a default terminal


def _age(seconds: float) -> str:
    """How long ago, to the largest whole unit: 4s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, width: int = TABLE_WIDTH) -> str:
    """Left-aligned columns two spaces apart; the widest columns shrink (ending in …) to fit `width`."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    gap = 2
    while sum(widths) + gap * (len(widths) - 1) > width:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= 6:  # nothing sensible left to shrink
            break
        widths[widest] -= 1
    lines = []
    for row in [list(headers), *cells]:
        lines.append((" " * gap).join(_clip(text, w).ljust(w) for text, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> str:
    if not rows:
        return f"{title}: {empty}"
    return f"{title} ({len(rows)}):\n" + table(headers, rows)


def _short_id(site_id: str | None) -> str:
    return site_id[:8] if site_id else "-"


def _rtt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def address(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{'-' if port is None else port}"


def _notes(items: Iterable[tuple[str, str | None]]) -> str:
    lines = [f"  {name}: {error}" for name, error in items if error]
    return ("\n" + "\n".join(lines)) if lines else ""


def _transport(link: dict) -> str:
    """`tls`, `ws`, `wss`, with `+proxy` when it goes through a forward proxy."""
    return (link.get("transport") or "-") + ("+proxy" if link.get("proxy") else "")


def _route_note(link: dict) -> str | None:
    """Where an outgoing link dials, and through which proxy; where an incoming one comes from."""
    if not link.get("address"):
        return None
    if link.get("direction") == "incoming":
        return f"from {link['address']}"
    return f"dials {link['address']}" + (f" through proxy {link['proxy']}" if link.get("proxy") else "")


def links_table(links: list[dict]) -> str:
    rows = [
        (
            link["name"],
            link["direction"],
            _short_id(link.get("peer_id")),
            link["cost"],
            "up" if link["up"] else "down",
            _rtt(link.get("rtt_ms")),
            link.get("flows", 0),
            _transport(link),
        )
        for link in links
    ]
    text = _section(
        "Links",
        ("NAME", "DIRECTION", "PEER", "COST", "STATE", "RTT", "FLOWS", "TRANSPORT"),
        rows,
        empty="none (see `fabric token --help`)",
    )
    notes = [(link["name"], _route_note(link)) for link in links] + [(link["name"], link.get("error")) for link in links]
    notes += [(link["name"], _offers_note(link)) for link in links]
    return text + _notes(notes)


def _offers_note(link: dict) -> str | None:
    """The routing keys a linked site may offer through its link, and those of its offers ignored for that."""
    if link.get("offers") is None:
        return None
    note = f"may offer only {', '.join(link['offers'])}" if link["offers"] else "may offer nothing"
    if link.get("ignored"):
        note += f"; ignored: {', '.join(link['ignored'])}"
    return note


def _policy_note(what: str, entries: list[str], notes: list[str]) -> str | None:
    """A listener's or connector's access policy, and its entries that admit no site now."""
    if not entries:
        return None
    return f"{what}: {', '.join(entries)}" + "".join(f"; {note}" for note in notes)


def _listener_state(item: dict) -> str:
    if item.get("accepting"):
        return "accepting"
    if (item.get("error") or "").startswith("no reachable site"):
        return "no provider"
    return "error" if item.get("error") else "stopped"


def listeners_table(listeners: list[dict]) -> str:
    rows = [
        (
            item["name"],
            item["routing_key"],
            address(item["host"], item.get("port")),
            item.get("protocol", DEFAULT_PROTOCOL)
            + ("" if item.get("distribution", DEFAULT_DISTRIBUTION) == DEFAULT_DISTRIBUTION else f", {item['distribution']}"),
            item.get("connections", 0),
            _listener_state(item),
        )
        for item in listeners
    ]
    headers = ("NAME", "ROUTING KEY", "ADDRESS", "PROTOCOL", "CONNECTIONS", "STATE")
    text = _section("Listeners", headers, rows, empty="none")
    text += _notes(
        [(item["name"], item.get("error")) for item in listeners]
        + [
            (item["name"], _policy_note("providers", item.get("providers", []), item.get("policy_notes", [])))
            for item in listeners
        ]
    )
    http = [item for item in listeners if item.get("http")]
    if http:
        text += "\n\n" + _http_table(http)
    return text


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _latency(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:g} ms" if ms != math.inf else "> 10 s")


def _http_table(listeners: list[dict]) -> str:
    """Requests of the HTTP listeners: by status class, broken off, latency; methods and bytes below."""
    rows = [
        (
            item["name"],
            stats["requests"],
            stats["active"],
            stats["errors"],
            *(stats.get("statuses", {}).get(f"{n}xx", 0) for n in (2, 3, 4, 5)),
            _latency(stats.get("p50_ms")),
            _latency(stats.get("p99_ms")),
        )
        for item in listeners
        for stats in (item["http"],)
    ]
    headers = ("NAME", "REQUESTS", "ACTIVE", "BROKEN", "2XX", "3XX", "4XX", "5XX", "P50", "P99")
    text = _section("HTTP requests", headers, rows, empty="none")
    notes = []
    for item in listeners:
        stats = item["http"]
        methods = ", ".join(f"{m} {n}" for m, n in sorted(stats.get("methods", {}).items())) or "none yet"
        cuts = ", ".join(
            f"{stats[key]} {what}"
            for key, what in (
                ("header_timeouts", "cut at the header timeout"),
                ("idle_closed", "closed idle"),
                ("evicted", "evicted at the connection cap"),
                ("refused", "refused at the cap"),
            )
            if stats.get(key)
        )
        notes.append(
            (
                item["name"],
                f"{methods}; bodies {_bytes(stats['bytes_in'])} in, {_bytes(stats['bytes_out'])} out"
                + (f"; connections {cuts}" if cuts else ""),
            )
        )
    return text + _notes(notes)


def connectors_table(connectors: list[dict]) -> str:
    rows = [(item["name"], item["routing_key"], address(item["host"], item.get("port"))) for item in connectors]
    text = _section("Connectors", ("NAME", "ROUTING KEY", "TARGET"), rows, empty="none")
    notes = [
        (item["name"], _policy_note("allowed sites", item.get("allow", []), item.get("policy_notes", [])))
        for item in connectors
    ]
    notes += [
        (item["name"], f"refused {item['refused']} flow(s) from sites not allowed, the latest from {item.get('refused_from')}")
        for item in connectors
        if item.get("refused")
    ]
    return text + _notes(notes)


def _site_name(site: dict) -> str:
    """A site's name, marked * when another known site carries it too (the ID column tells them apart)."""
    return site["name"] + ("*" if site.get("name_shared") else "")


def _lines(title: str, lines: list[str]) -> str:
    """Notes under a table, with a title; nothing when there are none."""
    return f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def _routes_table(sites: list[dict]) -> str:
    """One row per destination and next hop, best hop first: how new flows leave this site."""
    rows = [
        (s["name"] if i == 0 else "", h["name"], h["cost"], _rtt(h.get("rtt_ms")), h.get("flows", 0))
        for s in sites
        for i, h in enumerate(s.get("next_hops", []))
    ]
    return _section("Routes", ("TO", "VIA", "COST", "RTT", "FLOWS"), rows, empty="none")


def _providers(providers: list[dict]) -> list[str]:
    """Providers as `hub (cost 2, 3 open)`, with a penalty when its target refused lately."""
    shown = []
    for p in providers:
        notes = [f"cost {p['cost']:g}", f"{p['outstanding']} open"]
        if p.get("penalty"):
            notes.append(f"penalty {p['penalty']:g}: its target refused")
        shown.append(f"{p['name']} ({', '.join(notes)})")
    return shown


def site_line(status: dict) -> str:
    state = "running" if status.get("running") else "not running (start it with `fabric site run`)"
    return f"Site {status['name']} ({status['mode']}), id {_short_id(status.get('site_id'))}: {state}"


def _access_line(status: dict, config: dict | None) -> str:
    addresses = [a for a in (status.get("link_address"), status.get("ws_address")) if a]
    if addresses:
        return f"Link access: {', '.join(addresses)}" + ("" if status.get("running") else " (when running)")
    if config is not None and 0 in (config.get("link_port"), config.get("ws_port")):
        return f"Link access: on {config['link_host']}, port picked at the first start"
    return "Link access: none (this site links out but accepts no links)"


def site_status_table(status: dict, config: dict | None = None) -> str:
    parts = [
        site_line(status),
        _access_line(status, config),
        "",
        links_table(status.get("links", [])),
        "",
        _section(
            "Sites",
            ("NAME", "ID", "MODE", "REACHABLE", "AGE", "COST", "ROUTE CHANGES", "SERVICES"),
            [
                (
                    _site_name(s),
                    _short_id(s.get("site_id")),
                    s["mode"],
                    s["reachable"],
                    _age(s.get("age_s") or 0),
                    s.get("cost"),
                    s.get("route_changes", 0),
                    s.get("services"),
                )
                for s in status.get("sites", [])
            ],
            empty="no other site known yet",
        )
        + _lines("Names", status.get("notes", [])),
        "",
        _routes_table(status.get("sites", [])),
        "",
        _section(
            "Services",
            ("ROUTING KEY", "PROVIDERS"),
            [(s["routing_key"], _providers(s.get("providers", []))) for s in status.get("services", [])],
            empty="none",
        ),
        "",
        listeners_table(status.get("listeners", [])),
        "",
        connectors_table(status.get("connectors", [])),
    ]
    return "\n".join(parts)


def network_status_table(network: dict) -> str:
    sites = network.get("sites", [])
    links = [
        (site["name"], link.get("peer_name") or _short_id(link.get("peer")), link.get("cost"), _rtt(link.get("rtt_ms")))
        for site in sites
        for link in site.get("links", [])
    ]
    parts = [
        _section(
            "Sites",
            ("NAME", "ID", "MODE", "REACHABLE", "COST", "SERVICES"),
            [
                (_site_name(s), _short_id(s.get("site_id")), s["mode"], s["reachable"], s.get("cost"), s.get("services"))
                for s in sites
            ],
            empty="none known",
        ),
        "",
        _section("Links", ("SITE", "PEER", "COST", "RTT"), links, empty="none"),
        "",
        _section(
            "Routing keys",
            ("ROUTING KEY", "PROVIDERS", "LISTENERS HERE"),
            [(s["routing_key"], s.get("providers"), s.get("listeners")) for s in network.get("services", [])],
            empty="none (create a connector: `fabric connector create --help`)",
        )
        + _lines("Notes", network.get("notes", [])),
    ]
    return "\n".join(parts)
