"""The `fabric` command-line tool.

Every verb is a thin shell over the control API (`fabric.control`): it opens
a handle on the site directory — over the control socket when the site runs,
on the files when it is stopped — calls one operation, and prints the result
as a table (for people, 80 columns) or as JSON/YAML (for programs). Errors
that fabric raises on purpose (`FabricError`) and OS errors become one line
on stderr, `error: ...`, and exit code 1; usage errors exit 2 (click).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import ssl
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import click
import trio
import yaml

from . import __version__
from .addresses import hide_password
from .config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_DISTRIBUTION,
    DEFAULT_LINK_HOST,
    DEFAULT_LINK_PORT,
    DEFAULT_LISTENER_HOST,
    DEFAULT_PROTOCOL,
    PROTOCOLS,
)
from .errors import FabricError, sole_exception
from .files import write_private_atomic
from .pki import DEFAULT_EXPIRATION_WINDOW, DEFAULT_REDEMPTIONS, Token
from .router.frames import EDGE, INTERIOR, MAX_COST
from .router.routes import DISTRIBUTIONS
from .site import Site, open_site

DEMO_KEY = "echo"

DEFAULT_SITE_DIR = "~/.local/share/fabric/default"
TABLE_WIDTH = 80  # columns: a table must read well in a default terminal
DEFAULT_TIMEOUT = "60s"  # how long --wait waits, as Skupper's --timeout
# Seconds between status polls where no control operation waits for the
# condition itself (a routing key becoming reachable, a site starting).
POLL_INTERVAL = 0.2
PROXY_HELP = (
    "HTTP proxy to tunnel the link through (CONNECT): http://[user:password@]host:port, or `none` to go "
    "direct.  [default: HTTPS_PROXY (tls://, wss://) or HTTP_PROXY (ws://) from the environment, unless NO_PROXY "
    "names the host]"
)
NOT_RUNNING = "site is not running: saved; takes effect when it starts"

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


# -- errors ------------------------------------------------------------------------------


class Failure(click.ClickException):
    """An expected failure: one line on stderr, `error: ...`, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()) or "failed")  # one line, whatever the source said

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True, file=file)


def describe(error: BaseException) -> str:
    """The one line a user sees for an error fabric or the OS raised."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename
        return f"{error.strerror}: {where}" if where else error.strerror
    return str(error) or type(error).__name__


class FabricGroup(click.Group):
    """A click group that turns FabricError and OSError into `error: ...` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (FabricError, OSError) as error:
            raise Failure(describe(error)) from None
        except BaseExceptionGroup as group:  # trio nurseries wrap what their tasks raise
            leaf = sole_exception(group)
            if isinstance(leaf, (click.ClickException, click.exceptions.Exit, click.Abort)):
                raise leaf from None
            if isinstance(leaf, (FabricError, OSError)):
                raise Failure(describe(leaf)) from None
            raise


FabricGroup.group_class = FabricGroup


# -- option types ------------------------------------------------------------------------


class Duration(click.ParamType):
    """A duration: 90s, 15m, 2h, 1d, 1h30m, or plain seconds; converted to seconds (float)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        parts = _DURATION.findall(text)
        bare = len(parts) > 1 and any(not unit for _, unit in parts)  # "1m2": 2 what?
        if not text or "".join(a + u for a, u in parts) != text or bare:
            self.fail(f"{value!r} is not a duration: use a number with s, m, h or d, e.g. 90s, 15m, 2h", param, ctx)
        seconds = sum(float(amount) * _DURATION_UNITS[unit or "s"] for amount, unit in parts)
        if seconds <= 0 or not math.isfinite(seconds):
            self.fail(f"{value!r}: a duration must be more than 0", param, ctx)
        return seconds


DURATION = Duration()


def format_duration(seconds: float) -> str:
    """Seconds as people write them: 15m, 2h, 1d, 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _age(seconds: float) -> str:
    """How long ago, to the largest whole unit: 4s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def output_option(command: Callable) -> Callable:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json", "yaml"]),
        default="table",
        show_default=True,
        help="Output format: a table for people, json or yaml for programs.",
    )(command)


def wait_options(what: str, *, default: bool) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--timeout",
            type=DURATION,
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="How long --wait waits before giving up (exit code 1): 90s, 5m, ...",
        )(command)
        return click.option(
            "--wait/--no-wait",
            default=default,
            show_default=True,
            help=f"Wait until {what} (running site only), showing progress.",
        )(command)

    return decorate


# -- the control API ---------------------------------------------------------------------


def _control() -> Any:
    """fabric.control, imported when a verb needs it (so `--help`, `version`, `demo` never do)."""
    from . import control

    return control


class Cli:
    """What every verb gets from the top-level options."""

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = site_dir

    def call(self, op: str, **args: Any) -> tuple[bool, Any]:
        """Run one control operation; (whether the site runs, the result)."""

        async def one() -> tuple[bool, Any]:
            async with _control().open_handle(self.site_dir) as site:
                return site.running, await site.call(op, **args)

        return trio.run(one)

    def run(self, body: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `await body(site)` with a handle on the site: for verbs that make several calls."""

        async def session() -> Any:
            async with _control().open_handle(self.site_dir) as site:
                return await body(site)

        return trio.run(session)


pass_cli = click.make_pass_decorator(Cli)


def _say(text: str = "") -> None:
    click.echo(text)


def _emit(data: Any, output: str, table: Callable[[Any], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        plain = json.loads(json.dumps(data))  # tuples and the like as JSON has them, which safe_dump takes
        click.echo(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), nl=False)
    else:
        click.echo(table(data).rstrip("\n"))


# -- tables ------------------------------------------------------------------------------


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


def _section(title: str, headers: Sequence[str], rows: list[Sequence[Any]], *, empty: str) -> str:
    if not rows:
        return f"{title}: {empty}"
    return f"{title} ({len(rows)}):\n" + table(headers, rows)


def _short_id(site_id: str | None) -> str:
    return site_id[:8] if site_id else "-"


def _rtt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def _address(host: str, port: int | None) -> str:
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


def _links_table(links: list[dict]) -> str:
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


def _listeners_table(listeners: list[dict]) -> str:
    rows = [
        (
            item["name"],
            item["routing_key"],
            _address(item["host"], item.get("port")),
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


def _connectors_table(connectors: list[dict]) -> str:
    rows = [(item["name"], item["routing_key"], _address(item["host"], item.get("port"))) for item in connectors]
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


def _site_line(status: dict) -> str:
    state = "running" if status.get("running") else "not running (start it with `fabric site run`)"
    return f"Site {status['name']} ({status['mode']}), id {_short_id(status.get('site_id'))}: {state}"


def _access_line(status: dict, config: dict | None) -> str:
    addresses = [a for a in (status.get("link_address"), status.get("ws_address")) if a]
    if addresses:
        return f"Link access: {', '.join(addresses)}" + ("" if status.get("running") else " (when running)")
    if 0 in ((config or {}).get("link_port"), (config or {}).get("ws_port")):
        return f"Link access: on {config['link_host']}, port picked at the first start"
    return "Link access: none (this site links out but accepts no links)"


def site_status_table(status: dict, config: dict | None = None) -> str:
    parts = [
        _site_line(status),
        _access_line(status, config),
        "",
        _links_table(status.get("links", [])),
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
        _listeners_table(status.get("listeners", [])),
        "",
        _connectors_table(status.get("connectors", [])),
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


# -- the command tree --------------------------------------------------------------------


def _expand_site_dir(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    return Path(value).expanduser()


@click.group(cls=FabricGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--site-dir",
    envvar="FABRIC_SITE_DIR",
    default=DEFAULT_SITE_DIR,
    show_default=True,
    show_envvar=True,
    metavar="PATH",
    callback=_expand_site_dir,
    help="The site's directory: its identity, config (site.yaml) and state.",
)
@click.pass_context
def main(ctx: click.Context, site_dir: Path) -> None:
    """fabric: reach services in other places as if they were local.

    Sites link to each other over mutual TLS; a listener at one site carries
    each client connection, hop by hop, to a connector at the site that
    serves it. Try it all in one process with `fabric demo`.

    \b
    Getting started (one site per host; every verb has --help):
      hub$  fabric site create hub --link-access --link-host hub.example.com
      hub$  fabric token issue hub.token && fabric site run  # copy hub.token to here
      here$ fabric site create here && fabric token redeem hub.token
      here$ fabric site run                                  # here links to hub
      hub$  fabric connector create db 5432   # here now listens on 127.0.0.1:5432
    """
    ctx.obj = Cli(site_dir)


@main.command()
def version() -> None:
    """Print fabric's version and the versions it runs on."""
    click.echo(f"fabric {__version__}")
    click.echo(f"python {sys.version.split()[0]}, trio {trio.__version__}, {ssl.OPENSSL_VERSION}")


# -- site --------------------------------------------------------------------------------


@main.group()
def site() -> None:
    """Create, run, inspect and delete the site in --site-dir."""


@site.command("create")
@click.argument("name")
@click.option(
    "--link-access/--no-link-access",
    default=False,
    show_default=True,
    help="Accept links from other sites (needed to issue tokens). Nothing is exposed by default.",
)
@click.option(
    "--link-host",
    default=DEFAULT_LINK_HOST,
    show_default=True,
    help="Address to accept links on, which tokens tell other sites to dial: a name or IP they can reach.",
)
@click.option(
    "--link-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to accept links on; implies --link-access. 0 picks a free port at the first start and "
    f"keeps it.  [default: {DEFAULT_LINK_PORT} with --link-access]",
)
@click.option(
    "--ws-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also accept links as WebSockets on this port (path /fabric), for a reverse proxy (nginx) or a "
    "firewall that lets only HTTP through; 0 picks a free port at the first start. Issue tokens with "
    "--link-url to advertise the proxy's public wss:// address.",
)
@click.option("--edge", is_flag=True, help="Make an edge site: it never carries traffic for other sites.")
@click.option(
    "--service-sync/--no-service-sync",
    default=True,
    show_default=True,
    help="Listen here, on --service-host and the connector's port, for every routing key offered by another site.",
)
@click.option(
    "--service-host",
    default=DEFAULT_LISTENER_HOST,
    show_default=True,
    help="Address the service-sync listeners bind to (give each site on one host its own, e.g. 127.0.0.2).",
)
@pass_cli
@click.pass_context
def site_create(
    ctx: click.Context,
    cli: Cli,
    name: str,
    link_access: bool,
    link_host: str,
    link_port: int | None,
    ws_port: int | None,
    edge: bool,
    service_sync: bool,
    service_host: str,
) -> None:
    """Create a site named NAME in --site-dir.

    Writes its own CA, key pair and config (site.yaml). Refuses to overwrite
    a site that exists there. Run it with `fabric site run`.
    """
    explicit = ctx.get_parameter_source("link_access") is click.core.ParameterSource.COMMANDLINE
    if link_port is not None and explicit and not link_access:
        raise click.UsageError("--link-port makes the site accept links: drop --no-link-access or --link-port")
    if link_access and link_port is None:
        link_port = DEFAULT_LINK_PORT
    mode = EDGE if edge else INTERIOR
    _control().create_site(
        cli.site_dir,
        name,
        link_host=link_host,
        link_port=link_port,
        ws_port=ws_port,
        mode=mode,
        service_sync=service_sync,
        service_host=service_host,
    )
    access = []
    for what, port in (("links", link_port), ("WebSocket links", ws_port)):
        if port == 0:
            access.append(f"accepts {what} on {link_host}, port picked at its first start")
        elif port is not None:
            access.append(f"accepts {what} on {_address(link_host, port)}")
    access_text = "; ".join(access) or "accepts no links; it links out by redeeming tokens"
    _say(f"site {name} created in {cli.site_dir} ({mode}; {access_text})")
    _say("next: fabric site run")


@site.command("run")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log events to print (one line each, on stderr).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: for people; json: one object a line (ts, level, site, event, peer, reason, message).",
)
@pass_cli
def site_run(cli: Cli, log_level: str, log_format: str) -> None:
    """Run the site in the foreground until SIGINT (Ctrl-C) or SIGTERM.

    Logs one line per notable event on stderr: links up and down, services
    appearing and withdrawn, listeners bound or refused. On a signal it shuts
    down gracefully (flows reset, links closed, ports freed) and exits 0.
    While it runs, other `fabric` verbs talk to it over the control socket in
    --site-dir, and their changes take effect at once.
    """
    from . import logs

    handler = logs.stream_handler(sys.stderr, log_format)
    logger = logging.getLogger("fabric")
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    logger.propagate = False
    trio.run(_control().serve, cli.site_dir)


@site.command("status")
@output_option
@click.option(
    "--wait/--no-wait",
    default=False,
    show_default=True,
    help="Wait until the site runs (e.g. just after `fabric site run &`) before answering.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="How long --wait waits before giving up (exit code 1): 90s, 5m, ...",
)
@pass_cli
def site_status(cli: Cli, output: str, wait: bool, timeout: float) -> None:
    """Show the site, its links, services, listeners and connectors.

    Also every other site it knows of: reachable or not, at what cost, and
    how often its route changed while it stayed reachable (a count that
    keeps rising means a flapping path). Routes: for each site, the
    neighbours new flows to it may take, best first, each with the cost of
    the path through it, the link's round trip and the flows on it now. For
    each routing key, the sites that offer it, with the connections open to
    each and any penalty for a target that refused.

    A path costs the sum of its links' costs; a link costs its configured
    cost plus 1 per 10 ms of round trip (unless latency_cost is off).
    """
    if wait:
        _wait_running(cli, timeout, quiet=output != "table")

    async def body(site: Any) -> tuple[dict, dict | None]:
        status = await site.call("status")
        # A stopped site whose link port is picked at its first start has no address yet.
        config = None if site.running or output != "table" else await site.call("config")
        return status, config

    status, config = cli.run(body)
    _emit(status, output, functools.partial(site_status_table, config=config))


def _wait_running(cli: Cli, timeout: float, *, quiet: bool) -> None:
    async def body() -> None:
        told = False
        try:
            with trio.fail_after(timeout):
                while True:
                    async with _control().open_handle(cli.site_dir) as handle:
                        if handle.running:
                            return
                    if not told and not quiet:
                        _say(f"waiting for the site in {cli.site_dir} to run...")
                        told = True
                    await trio.sleep(POLL_INTERVAL)
        except trio.TooSlowError:
            raise Failure(
                f"the site in {cli.site_dir} is not running after {format_duration(timeout)}: "
                "start it with `fabric site run`"
            ) from None

    trio.run(body)


@site.command("delete")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
def site_delete(cli: Cli, yes: bool) -> None:
    """Delete the site in --site-dir: identity, config, links. Refused while it runs.

    Its peers lose their links to it; tokens it issued become useless.
    """
    if not yes and (cli.site_dir / "site.yaml").exists():  # no question about a site that is not there
        click.confirm(f"Delete the site in {cli.site_dir}, with its identity and links? This cannot be undone", abort=True)
    _control().delete_site(cli.site_dir)
    _say(f"site in {cli.site_dir} deleted")


# -- tokens ------------------------------------------------------------------------------


@main.group()
def token() -> None:
    """Link sites: issue a token at one site, redeem it at another.

    \b
    At the site that accepts links (created with --link-access):
      fabric token issue hub.token
    Copy hub.token to the other site (it holds a one-time secret: keep it
    private), then there:
      fabric token redeem hub.token
    """


@token.command("issue")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--redemptions-allowed",
    type=click.IntRange(1),
    default=DEFAULT_REDEMPTIONS,
    show_default=True,
    help="How many sites may redeem this token.",
)
@click.option(
    "--expiration-window",
    type=DURATION,
    default=format_duration(DEFAULT_EXPIRATION_WINDOW),
    show_default=True,
    help="How long the token can be redeemed: 90s, 15m, 2h, 1d.",
)
@click.option(
    "--cost",
    type=click.IntRange(1, MAX_COST),
    default=None,
    help="Cost of the link it makes, for routing (lower is preferred).  [default: the redeemer's choice, else 1]",
)
@click.option(
    "--link-url",
    "link_urls",
    multiple=True,
    metavar="URL",
    help="Address the redeemer dials, instead of this site's own: tls://host:port, ws://host:port/path or "
    "wss://host:port/path (say, what a reverse proxy in front of --ws-port exposes). Repeat it to give "
    "several; they are tried in order.",
)
@click.option(
    "--offer",
    "offers",
    multiple=True,
    metavar="KEY",
    help="A routing key the sites that redeem it may offer through their links here; their other services are "
    "ignored here. Repeat it to allow several.  [default: any routing key]",
)
@pass_cli
def token_issue(
    cli: Cli,
    file: Path,
    redemptions_allowed: int,
    expiration_window: float,
    cost: int | None,
    link_urls: tuple[str, ...],
    offers: tuple[str, ...],
) -> None:
    """Write a token FILE that lets other sites link to this one.

    The file (mode 0600) holds this site's link addresses, its CA certificate
    and a one-time secret, never a private key. This site must accept links
    (`site create --link-access` or `--ws-port`); one created with port 0
    must have run once, so that its port is known. It need not run now, but
    must when the token is redeemed.

    \b
    Behind a TLS-terminating reverse proxy that forwards /fabric to --ws-port:
      fabric token issue edge.token --link-url wss://hub.example.com/fabric
    """
    options: dict[str, Any] = {"link_urls": list(link_urls)} if link_urls else {}
    if offers:
        options["offers"] = list(offers)
    _, answer = cli.call(
        "issue_token", redemptions_allowed=redemptions_allowed, expiration_window=expiration_window, cost=cost, **options
    )
    Token.loads_untrusted(answer["token"]).save(file)
    allowed = answer.get("redemptions_allowed", redemptions_allowed)
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(answer["expires_at"]))
    _say(
        f"token written to {file}: {allowed} redemption{'s' if allowed != 1 else ''}, "
        f"valid for {format_duration(expiration_window)} (until {expires})"
    )
    if offers:
        _say(f"the sites that redeem it may offer only {', '.join(offers)} through their links here")
    _say(f"redeem it at the other site: fabric token redeem {file}")


@token.command("redeem")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Name of the new link.  [default: the issuing site's name]")
@click.option(
    "--cost",
    type=click.IntRange(1, MAX_COST),
    default=None,
    help="Cost of the new link, for routing (lower is preferred).  [default: the token's cost, else 1]",
)
@click.option("--proxy", default=None, metavar="URL", help=PROXY_HELP)
@wait_options("the link is up", default=True)
@pass_cli
def token_redeem(
    cli: Cli, file: Path, name: str | None, cost: int | None, proxy: str | None, wait: bool, timeout: float
) -> None:
    """Link this site to the site that issued the token FILE.

    The issuer must be running and reachable. The link is kept in --site-dir
    and comes back at every start; a token works once (or as often as it was
    issued for) and only before it expires. The token's addresses are tried
    in order; the one that works is tried first from then on.
    """
    token = Token.load(file)

    async def body(site: Any) -> None:
        _say(f"redeeming the token at site {token.issuer_name} ({', '.join(token.addresses)})...")
        args: dict[str, Any] = {"token": token.dumps()}
        if name is not None:
            args["name"] = name
        if cost is not None:
            args["cost"] = cost
        if proxy is not None:
            args["proxy"] = proxy
        answer = await site.call("redeem_token", **args)
        link = answer["link"]
        _say(f"token redeemed: link {link} created")
        if not site.running:
            _say("site is not running: the link comes up when it starts")
        elif wait:
            await _wait_link(site, link, timeout)

    cli.run(body)


async def _wait_for(
    site: Any, op: str, args: dict, *, timeout: float, waiting: str, too_slow: Callable[[str], str]
) -> Any:
    """A waiting operation with a progress line; past `timeout`, fails with too_slow("<timeout as 90s>")."""
    _say(waiting)
    try:
        with trio.fail_after(timeout):
            return await site.call(op, **args)
    except trio.TooSlowError:
        raise Failure(too_slow(format_duration(timeout))) from None


async def _wait_link(site: Any, link: str, timeout: float) -> None:
    await _wait_for(
        site,
        "wait_link",
        {"name": link},
        timeout=timeout,
        waiting=f"waiting for link {link} to come up...",
        too_slow=lambda after: f"link {link} is not up after {after} (it keeps trying: see `fabric link status`)",
    )
    _say(f"link {link} is up")


# -- links -------------------------------------------------------------------------------


@main.group()
def link() -> None:
    """Inspect and change links (made by redeeming tokens)."""


def _emit_part(cli: Cli, output: str, field: str, render: Callable[[list[dict]], str]) -> None:
    """One part of the site's status (its links, listeners or connectors), and whether it runs."""
    running, status = cli.call("status")
    data = {"running": running, field: status.get(field, [])}
    _emit(data, output, lambda d: render(d[field]) + ("" if running else "\n" + _site_line(status)))


@link.command("status")
@output_option
@pass_cli
def link_status(cli: Cli, output: str) -> None:
    """Show this site's links: direction, peer, cost, state, RTT, flows."""
    _emit_part(cli, output, "links", _links_table)


@link.command("update")
@click.argument("name")
@click.option("--cost", type=click.IntRange(1, MAX_COST), default=None, help="New cost of the link (lower is preferred).")
@click.option("--proxy", default=None, metavar="URL", help=PROXY_HELP + " `env`: back to the environment's.")
@click.option(
    "--offer",
    "offers",
    multiple=True,
    metavar="KEY",
    help="A routing key the linked site may offer through this link; its other services are ignored here. "
    "Repeat it to allow several.",
)
@click.option("--any-offer", is_flag=True, help="The linked site may offer any routing key again (the default).")
@pass_cli
def link_update(
    cli: Cli, name: str, cost: int | None, proxy: str | None, offers: tuple[str, ...], any_offer: bool
) -> None:
    """Change the cost of link NAME, how it gets out (--proxy), or what it may offer (--offer).

    NAME is a link this site made by redeeming a token. Routes prefer the
    lowest total cost; a running site applies a cost and offers at once, and
    a proxy the next time it dials the link.
    """
    if offers and any_offer:
        raise click.UsageError("--offer and --any-offer contradict each other: give one")
    if cost is None and proxy is None and not offers and not any_offer:
        raise click.UsageError("nothing to change: give --cost, --proxy, --offer or --any-offer")
    args: dict[str, Any] = {"name": name}
    if cost is not None:
        args["cost"] = cost
    if proxy is not None:
        args["proxy"] = None if proxy == "env" else proxy
    if offers or any_offer:
        args["offers"] = list(offers) if offers else None
    running, _ = cli.call("update_link", **args)
    changes = ([f"cost {cost}"] if cost is not None else []) + ([f"proxy {hide_password(proxy)}"] if proxy is not None else [])
    if offers or any_offer:
        changes.append(f"offers {', '.join(offers)}" if offers else "offers any routing key")
    _say(f"link {name}: {', '.join(changes)}")
    _not_running_note(running)


@link.command("delete")
@click.argument("name")
@pass_cli
def link_delete(cli: Cli, name: str) -> None:
    """Delete link NAME: stop dialling it, drop it if up.

    NAME is a link this site made by redeeming a token (see `fabric link
    status`); at the issuer, use `fabric link revoke`.
    """
    running, _ = cli.call("delete_link", name=name)
    _say(f"link {name} deleted")
    _not_running_note(running)


@link.command("revoke")
@click.argument("name")
@pass_cli
def link_revoke(cli: Cli, name: str) -> None:
    """Revoke site NAME at this site, the one that issued its token.

    NAME is the name (or id) of a site that redeemed a token of this site.
    From now on this site:

    \b
    - refuses its link certificates, and drops its live link;
    - refuses its redemptions, of any token (it is known by its key): it
      cannot link to this site again, not even with a new token;
    - withdraws the tokens it redeemed, so their unused redemptions are
      refused to every site (give other sites new tokens);
    - refuses flows to this site's connectors that say they come from it.

    It does not cut the site off the network: its links with other sites
    stay up, and through them it still reaches their services, offers its
    own (this site's listeners may still choose it) and carries traffic. A
    flow's origin is what the flow says: a site changed to lie about it is
    not stopped. To keep a site out, every site it links with must revoke it
    (where it redeemed their token) or delete the link (where they redeemed
    its token).
    """
    running, result = cli.call("revoke_link", name=name)
    _say(
        f"site {name} revoked ({result['revoked']} certificate(s)): it cannot link or redeem a token here any more, "
        "and the tokens it redeemed are withdrawn; other sites still link with it (see `fabric link revoke --help`)"
    )
    _not_running_note(running)


def _not_running_note(running: bool) -> None:
    if not running:
        _say(NOT_RUNNING)


# -- listeners and connectors ------------------------------------------------------------


@main.group()
def listener() -> None:
    """Reach a service of the network from this site.

    A listener accepts clients on a local host:port and carries each
    connection to a connector for its routing key, wherever it is.
    """


@listener.command("create")
@click.argument("name")
@click.argument("port", type=click.IntRange(0, 65535))
@click.option("--routing-key", default=None, help="Routing key of the service to reach.  [default: NAME]")
@click.option(
    "--host",
    default=DEFAULT_LISTENER_HOST,
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; beware, it exposes the service).",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default=DEFAULT_PROTOCOL,
    show_default=True,
    help="tcp: each connection goes to one site, byte for byte. http: each request of a connection picks its own "
    "site; failures become HTTP answers (502, 503); requests are counted in `listener status`.",
)
@click.option(
    "--distribution",
    type=click.Choice(DISTRIBUTIONS),
    default=DEFAULT_DISTRIBUTION,
    show_default=True,
    help="How each connection picks a site that offers the key: balanced (nearer sites first, farther ones as "
    "the nearer carry more connections) or closest (only the nearest).",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="SITE",
    help="A site this listener may carry clients to, by site id or name (a name that two known sites carry "
    "names neither). Repeat it to allow several.  [default: any site that offers the routing key]",
)
@wait_options("a site offers the routing key", default=False)
@pass_cli
def listener_create(
    cli: Cli,
    name: str,
    port: int,
    routing_key: str | None,
    host: str,
    protocol: str,
    distribution: str,
    providers: tuple[str, ...],
    wait: bool,
    timeout: float,
) -> None:
    """Listen on HOST:PORT for clients of a routing key.

    Each client is carried to a connector for the routing key, at whichever
    site offers it (with --provider: only at those sites). PORT 0 picks a
    free port (printed). Clients that connect while no such site offers the
    routing key are refused. A site whose target refuses a connection is
    avoided for a few seconds, and the client is carried to another site
    instead.
    """

    async def body(site: Any) -> None:
        options: dict[str, Any] = {"providers": list(providers)} if providers else {}
        made = await site.call(
            "create_listener",
            name=name,
            port=port,
            host=host,
            routing_key=routing_key,
            distribution=distribution,
            protocol=protocol,
            **options,
        )
        key = made.get("routing_key") or routing_key or name
        only = f" (providers: {', '.join(providers)})" if providers else ""
        _say(f"listener {name} created: {_address(made.get('host', host), made.get('port', port))} -> routing key {key}{only}")
        if not site.running:
            _say(NOT_RUNNING)
        elif wait:
            await _wait_routing_key(site, key, timeout, listener=name)

    cli.run(body)


async def _wait_routing_key(site: Any, key: str, timeout: float, *, listener: str) -> None:
    """Wait until a reachable site offers `key` (one that `listener`'s provider policy admits, if it has one)."""
    answer = await _wait_for(
        site,
        "wait_reachable",
        {"routing_key": key, "listener": listener},
        timeout=timeout,
        waiting=f"waiting for a site to offer routing key {key}...",
        too_slow=lambda after: f"no site offers routing key {key} after {after} "
        "(the listener stays; create a connector for the key at a linked site)",
    )
    _say(f"routing key {key} is reachable at {', '.join(answer['providers'])}")


@listener.command("status")
@output_option
@pass_cli
def listener_status(cli: Cli, output: str) -> None:
    """Show this site's listeners.

    For each: its address, routing key, protocol (and `closest` when it
    picks only the nearest providers), open connections, and why it could
    not listen, if so. For HTTP listeners also the requests since the site
    started: in progress (ACTIVE), broken off (BROKEN: the client or the
    target went away mid-request), answered by status class, the median and
    99th percentile latency (upper bounds of histogram buckets), and below,
    requests by method and body bytes in and out.
    """
    _emit_part(cli, output, "listeners", _listeners_table)


@listener.command("delete")
@click.argument("name")
@pass_cli
def listener_delete(cli: Cli, name: str) -> None:
    """Delete listener NAME; its open connections are reset."""
    running, _ = cli.call("delete_listener", name=name)
    _say(f"listener {name} deleted")
    _not_running_note(running)


@main.group()
def connector() -> None:
    """Offer a service at this site to the network.

    A connector names a host:port this site can reach, under a routing key;
    listeners anywhere in the network carry their clients to it.
    """


@connector.command("create")
@click.argument("name")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--routing-key", default=None, help="Routing key the service is offered under.  [default: NAME]")
@click.option("--host", default=DEFAULT_CONNECTOR_HOST, show_default=True, help="Host of the service, as this site reaches it.")
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default=DEFAULT_PROTOCOL,
    show_default=True,
    help="What the service speaks: tcp, or http (then other sites' service sync listens for it with HTTP).",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="SITE",
    help="A site whose clients may reach this connector, by site id or name (a name that two known sites "
    "carry names neither). Repeat it to allow several; this site's own listeners always may.  [default: any site]",
)
@pass_cli
def connector_create(
    cli: Cli, name: str, port: int, routing_key: str | None, host: str, protocol: str, allow: tuple[str, ...]
) -> None:
    """Offer HOST:PORT to every site of the network under a routing key.

    Each flow that arrives for the key is a new connection to HOST:PORT, made
    when the flow arrives (the service need not be up now). With --allow,
    flows from other sites are refused (their clients' connections are
    closed, and their site logs why).
    """
    options: dict[str, Any] = {"allow": list(allow)} if allow else {}
    running, made = cli.call(
        "create_connector", name=name, port=port, host=host, routing_key=routing_key, protocol=protocol, **options
    )
    key = made.get("routing_key") or routing_key or name
    only = f" (allowed sites: {', '.join(allow)})" if allow else ""
    _say(f"connector {name} created: routing key {key} -> {_address(made.get('host', host), made.get('port', port))}{only}")
    _not_running_note(running)


@connector.command("status")
@output_option
@pass_cli
def connector_status(cli: Cli, output: str) -> None:
    """Show this site's connectors: routing key and target."""
    _emit_part(cli, output, "connectors", _connectors_table)


@connector.command("delete")
@click.argument("name")
@pass_cli
def connector_delete(cli: Cli, name: str) -> None:
    """Delete connector NAME; its routing key is withdrawn.

    New flows for the key stop coming here (other sites' connectors for it
    are not affected).
    """
    running, _ = cli.call("delete_connector", name=name)
    _say(f"connector {name} deleted")
    _not_running_note(running)


# -- network -----------------------------------------------------------------------------


@main.group()
def network() -> None:
    """What this site knows of the whole network."""


@network.command("status")
@output_option
@pass_cli
def network_status(cli: Cli, output: str) -> None:
    """Show every site, link and routing key this site knows.

    Sites with their mode, reachability and cost; links with cost and RTT;
    routing keys with the sites that provide them and the listeners here.
    """
    running, data = cli.call("network_status")
    note = "" if running else "\nthis site is not running: it knows only itself (start it with `fabric site run`)"
    _emit(data, output, lambda d: network_status_table(d) + note)


# -- debug -------------------------------------------------------------------------------


@main.group()
def debug() -> None:
    """Collect what a bug report needs."""


@debug.command("dump")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_cli
def debug_dump(cli: Cli, file: Path) -> None:
    """Write FILE, a tar.gz of what a bug report needs (mode 0600).

    It holds the config, status, network status, recent log lines and versions.
    Of the site directory it copies site.yaml only, and lists the other files
    by name and mode: private keys (identity/) and the secrets of issued
    tokens (state/) never leave it, and proxy passwords are shown as ***, so
    the file can go with a bug report.
    """
    if not (cli.site_dir / "site.yaml").is_file():
        raise Failure(f"no site directory at {cli.site_dir}: create one with `fabric site create NAME`")
    members: dict[str, bytes] = {}
    problems: list[str] = []
    proxies: set[str] = {os.environ[name] for name in _PROXY_VARIABLES if os.environ.get(name)}

    raw = _read_quietly(cli.site_dir / "site.yaml", problems)
    if raw is not None:
        try:
            document = yaml.safe_load(raw)
        except yaml.YAMLError as error:  # its message quotes the file: say only where
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            why = getattr(error, "problem", None) or "unreadable"
            problems.append(f"site.yaml: not YAML{where} ({why}); left out, as it may hold a proxy password")
        else:
            hidden = _hide_proxies(document, proxies)
            members["site.yaml"] = raw if hidden == document else (
                "# site.yaml as read, with proxy passwords hidden (comments and layout are not the file's)\n"
                + yaml.safe_dump(hidden, sort_keys=False, allow_unicode=True)
            ).encode()

    async def gather(site: Any) -> bool:
        for op, member in (("status", "status.json"), ("network_status", "network-status.json"), ("config", "config.json")):
            try:
                result = _hide_proxies(await site.call(op), proxies)
                members[member] = json.dumps(result, indent=2).encode()
            except FabricError as error:
                problems.append(f"{op}: {describe(error)}")
        try:
            lines = (await site.call("logs")).get("lines", [])
            members["logs.txt"] = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
        except FabricError as error:
            problems.append(f"logs: {describe(error)}")
        return site.running

    try:
        running = cli.run(gather)
    except (FabricError, OSError) as error:  # a broken config is what a dump is often for: keep going
        problems.append(f"control: {describe(error)}")
        running = False
    members["versions.txt"] = _versions().encode()
    members["files.txt"] = _site_files(cli.site_dir).encode()
    # Belt and braces: a password that shows anywhere else (a log line, an error) is hidden too.
    secrets = _password_spellings(proxies)
    for member in list(members):
        members[member] = _scrub(members[member], secrets)
        if b"PRIVATE KEY" in members[member]:  # keys never leave the site directory
            members[member] = b"(left out: it contained a private key)\n"
            problems.append(f"{member}: it contained a private key")
    if problems:
        members["errors.txt"] = _scrub("".join(f"{p}\n" for p in problems).encode(), secrets)
    _write_tar(file, f"fabric-debug-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}", members)
    _say(f"debug dump written to {file}: {', '.join(sorted(members))}")
    if not running:
        _say("the site is not running: no live status, no log lines")
    for problem in problems:
        _say(f"  could not collect {problem}")


# The environment's proxy settings: a link without its own dials through them (addresses.proxy_for).
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def _hide_proxies(data: Any, seen: set[str]) -> Any:
    """`data` (plain JSON or YAML data) with every `proxy` setting's password hidden; the settings go to `seen`."""
    if isinstance(data, dict):
        hidden = {}
        for key, value in data.items():
            if key == "proxy" and isinstance(value, str):
                seen.add(value)
                hidden[key] = hide_password(value)
            else:
                hidden[key] = _hide_proxies(value, seen)
        return hidden
    if isinstance(data, list):
        return [_hide_proxies(value, seen) for value in data]
    return data


def _password_spellings(proxies: Iterable[str]) -> set[bytes]:
    """The passwords of these proxy settings, as they may show in text: as given, %-decoded, and JSON-escaped."""
    spellings = set()
    for setting in proxies:
        hidden = hide_password(setting)
        if hidden == setting:
            continue  # no password
        before, _, after = hidden.partition(":***@")
        given = setting[len(before) + 1 : len(setting) - len(after) - 1]
        for password in filter(None, {given, unquote(given)}):
            for text in (password, json.dumps(password)[1:-1], json.dumps(password, ensure_ascii=False)[1:-1]):
                spellings.add(text.encode())
    return spellings


def _scrub(data: bytes, secrets: Iterable[bytes]) -> bytes:
    for secret in sorted(secrets, key=len, reverse=True):  # the longest first: one may hold another
        data = data.replace(secret, b"***")
    return data


def _read_quietly(path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as error:
        problems.append(f"{path.name}: {describe(error)}")
        return None


def _versions() -> str:
    from importlib import metadata

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [
        ("fabric", __version__),
        ("python", sys.version.replace("\n", " ")),
        ("openssl", ssl.OPENSSL_VERSION),
        ("platform", platform.platform()),
        *((package, installed(package)) for package in ("trio", "cryptography", "attrs", "cattrs", "click", "pyyaml")),
    ]
    return "".join(f"{name}: {value}\n" for name, value in lines)


def _site_files(site_dir: Path) -> str:
    """The site directory's files (names, sizes, modes; no contents): what is there, and its permissions."""
    lines = []
    for path in sorted(site_dir.rglob("*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        kind = "d" if path.is_dir() else "-"
        lines.append(f"{kind}{info.st_mode & 0o777:04o} {info.st_size:>8} {path.relative_to(site_dir)}")
    return "\n".join(lines) + "\n"


def _write_tar(file: Path, top: str, members: dict[str, bytes]) -> None:
    now = time.time()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    try:
        write_private_atomic(file, buffer.getvalue())  # 0600 from the first byte: it tells a lot about the site
    except OSError as error:
        raise Failure(f"cannot write {file}: {describe(error)}") from None


# -- demo --------------------------------------------------------------------------------


@main.command()
@click.option("--connections", default=20, show_default=True, help="Concurrent client connections to send.")
@click.option("--size", default=1024 * 1024, show_default=True, help="Bytes each connection sends and gets back.")
@click.option("--round-trips", default=200, show_default=True, help="Small request/reply exchanges timed for latency.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the sites do (links, routes, flows).")
def demo(connections: int, size: int, round_trips: int, verbose: bool) -> None:
    """Run a three-site network in this process and send traffic through it.

    \b
      edge  --WebSocket link-->  transit  --TLS link-->  hub
      client                                             echo service

    The edge site reaches the hub's echo service through the transit site
    (edge and hub are not linked); the edge's link is a WebSocket, as through
    a firewall that lets only HTTP out, with the link's mutual TLS inside. Every byte is SHA-256 checked; the demo
    prints what it measured and exits 0 when everything arrived intact.
    Nothing is left behind: the sites live in a temporary directory.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="  [%(name)s] %(message)s")
    try:
        ok = trio.run(_demo, connections, size, round_trips)
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def _exchange(port: int, payload: bytes) -> bool:
    """Send payload, half-close, read the echo; True when it came back intact."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = hashlib.sha256()
    async with stream:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            while data := await stream.receive_some(65536):
                received.update(data)
    return received.digest() == hashlib.sha256(payload).digest()


async def _round_trips(port: int, count: int) -> list[float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    times = []
    async with stream:
        for i in range(count):
            message = b"ping %d\n" % i
            start = trio.current_time()
            await stream.send_all(message)
            got = b""
            while len(got) < len(message):
                got += await stream.receive_some(65536)
            times.append(trio.current_time() - start)
    return times


def _show_routes(site: Site) -> None:
    for info in site.status().sites:
        hops = ", ".join(h.name for h in info.next_hops) or "-"
        state = f"cost {info.cost:g} via {hops}" if info.reachable else "unreachable"
        click.echo(f"    {site.name} -> {info.name} ({info.mode}): {state}")


async def _demo(connections: int, size: int, round_trips: int) -> bool:
    say = click.echo
    say("fabric demo: three sites in one process, linked by mutual TLS on 127.0.0.1\n")
    say("    edge (edge) --WebSocket link--> transit (interior) --TLS link--> hub (interior)")
    say("    client                                                           echo service\n")
    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as root:
        async with trio.open_nursery() as nursery:
            servers = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
            echo_port = servers[0].socket.getsockname()[1]
            with trio.fail_after(60):
                async with (
                    # One host for three sites: service sync would have each of them listen on
                    # the echo server's own port; the edge's listener is made explicitly instead.
                    open_site("hub", os.path.join(root, "hub"), link_port=0, service_sync=False) as hub,
                    open_site(
                        "transit", os.path.join(root, "transit"), link_port=0, ws_port=0, service_sync=False
                    ) as transit,
                    open_site("edge", os.path.join(root, "edge"), mode="edge", service_sync=False) as edge,
                ):
                    say(f"[1/4] sites created: hub {hub.site_id[:8]}, transit {transit.site_id[:8]}, edge {edge.site_id[:8]}")
                    await transit.redeem_token(await hub.issue_token())
                    ws_url = transit.status().ws_address
                    await edge.redeem_token(await transit.issue_token(link_urls=[ws_url]))
                    say(
                        "[2/4] linked: transit redeemed a token of hub (TLS), "
                        f"edge redeemed a token of transit naming {ws_url} (TLS inside a WebSocket)"
                    )
                    await hub.create_connector(DEMO_KEY, echo_port, host="127.0.0.1")
                    listener = await edge.create_listener(DEMO_KEY, 0)
                    await edge.wait_reachable(DEMO_KEY)
                    say(
                        f"[3/4] hub offers routing key {DEMO_KEY!r} (echo server on 127.0.0.1:{echo_port}); "
                        f"edge listens on 127.0.0.1:{listener.port}"
                    )
                    _show_routes(edge)
                    say(f"[4/4] sending {connections} connections x {size:,} bytes each way, then {round_trips} round trips")
                    results: list[bool] = []
                    start = trio.current_time()
                    async with trio.open_nursery() as clients:
                        for _ in range(connections):

                            async def one() -> None:
                                results.append(await _exchange(listener.port, os.urandom(size)))

                            clients.start_soon(one)
                    elapsed = trio.current_time() - start
                    times = sorted(await _round_trips(listener.port, round_trips))
            nursery.cancel_scope.cancel()
    intact = sum(results)
    moved = 2 * connections * size
    say("\nresults:")
    say(f"    bytes intact:  {intact}/{connections} connections (SHA-256 of every byte, both ways)")
    say(f"    throughput:    {moved / elapsed / 2**20:,.1f} MiB/s through two links ({moved:,} bytes in {elapsed:.2f} s)")
    if times:
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        say(f"    round trip:    median {statistics.median(times) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    ok = intact == connections
    say("\n" + ("demo passed: every byte arrived intact." if ok else "demo FAILED: some connections lost data."))
    return ok


if __name__ == "__main__":
    main()
