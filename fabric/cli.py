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
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from . import __version__
from .addresses import hide_password
from .cli_session import (
    DEFAULT_TIMEOUT,
    DURATION,
    NOT_RUNNING,
    Cli,
    FabricGroup,
    control,
    emit,
    emit_part,
    format_duration,
    not_running_note,
    output_option,
    pass_cli,
    say,
    wait_link,
    wait_options,
    wait_routing_key,
    wait_running,
)
from .cli_tables import (
    address,
    connectors_table,
    links_table,
    listeners_table,
    network_status_table,
    site_status_table,
)
from .config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_DISTRIBUTION,
    DEFAULT_LINK_HOST,
    DEFAULT_LINK_PORT,
    DEFAULT_LISTENER_HOST,
    DEFAULT_PROTOCOL,
    PROTOCOLS,
)
from .debug import write_dump
from .demo import run as demo_run
from .errors import FabricError
from .pki import DEFAULT_EXPIRATION_WINDOW, DEFAULT_REDEMPTIONS, Token
from .router.frames import EDGE, INTERIOR, MAX_COST
from .router.routes import DISTRIBUTIONS

DEFAULT_SITE_DIR = "~/.local/share/fabric/default"
PROXY_HELP = (
    "HTTP proxy to tunnel the link through (CONNECT): http://[user:password@]host:port, or `none` to go "
    "direct.  [default: HTTPS_PROXY (tls://, wss://) or HTTP_PROXY (ws://) from the environment, unless NO_PROXY "
    "names the host]"
)
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
    control().create_site(
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
            access.append(f"accepts {what} on {address(link_host, port)}")
    access_text = "; ".join(access) or "accepts no links; it links out by redeeming tokens"
    say(f"site {name} created in {cli.site_dir} ({mode}; {access_text})")
    say("next: fabric site run")


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
    trio.run(control().serve, cli.site_dir)


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
        wait_running(cli, timeout, quiet=output != "table")

    async def body(site: Any) -> tuple[dict, dict | None]:
        status = await site.call("status")
        # A stopped site whose link port is picked at its first start has no address yet.
        config = None if site.running or output != "table" else await site.call("config")
        return status, config

    status, config = cli.run(body)
    emit(status, output, functools.partial(site_status_table, config=config))


@site.command("delete")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
def site_delete(cli: Cli, yes: bool) -> None:
    """Delete the site in --site-dir: identity, config, links. Refused while it runs.

    Its peers lose their links to it; tokens it issued become useless.
    """
    if not yes and (cli.site_dir / "site.yaml").exists():  # no question about a site that is not there
        click.confirm(f"Delete the site in {cli.site_dir}, with its identity and links? This cannot be undone", abort=True)
    control().delete_site(cli.site_dir)
    say(f"site in {cli.site_dir} deleted")


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
    say(
        f"token written to {file}: {allowed} redemption{'s' if allowed != 1 else ''}, "
        f"valid for {format_duration(expiration_window)} (until {expires})"
    )
    if offers:
        say(f"the sites that redeem it may offer only {', '.join(offers)} through their links here")
    say(f"redeem it at the other site: fabric token redeem {file}")


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
        say(f"redeeming the token at site {token.issuer_name} ({', '.join(token.addresses)})...")
        args: dict[str, Any] = {"token": token.dumps()}
        if name is not None:
            args["name"] = name
        if cost is not None:
            args["cost"] = cost
        if proxy is not None:
            args["proxy"] = proxy
        answer = await site.call("redeem_token", **args)
        link = answer["link"]
        say(f"token redeemed: link {link} created")
        if not site.running:
            say("site is not running: the link comes up when it starts")
        elif wait:
            await wait_link(site, link, timeout)

    cli.run(body)


# -- links -------------------------------------------------------------------------------


@main.group()
def link() -> None:
    """Inspect and change links (made by redeeming tokens)."""


@link.command("status")
@output_option
@pass_cli
def link_status(cli: Cli, output: str) -> None:
    """Show this site's links: direction, peer, cost, state, RTT, flows."""
    emit_part(cli, output, "links", links_table)


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
    say(f"link {name}: {', '.join(changes)}")
    not_running_note(running)


@link.command("delete")
@click.argument("name")
@pass_cli
def link_delete(cli: Cli, name: str) -> None:
    """Delete link NAME: stop dialling it, drop it if up.

    NAME is a link this site made by redeeming a token (see `fabric link
    status`); at the issuer, use `fabric link revoke`.
    """
    running, _ = cli.call("delete_link", name=name)
    say(f"link {name} deleted")
    not_running_note(running)


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
    say(
        f"site {name} revoked ({result['revoked']} certificate(s)): it cannot link or redeem a token here any more, "
        "and the tokens it redeemed are withdrawn; other sites still link with it (see `fabric link revoke --help`)"
    )
    not_running_note(running)


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
        say(f"listener {name} created: {address(made.get('host', host), made.get('port', port))} -> routing key {key}{only}")
        if not site.running:
            say(NOT_RUNNING)
        elif wait:
            await wait_routing_key(site, key, timeout, listener=name)

    cli.run(body)


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
    emit_part(cli, output, "listeners", listeners_table)


@listener.command("delete")
@click.argument("name")
@pass_cli
def listener_delete(cli: Cli, name: str) -> None:
    """Delete listener NAME; its open connections are reset."""
    running, _ = cli.call("delete_listener", name=name)
    say(f"listener {name} deleted")
    not_running_note(running)


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
    say(f"connector {name} created: routing key {key} -> {address(made.get('host', host), made.get('port', port))}{only}")
    not_running_note(running)


@connector.command("status")
@output_option
@pass_cli
def connector_status(cli: Cli, output: str) -> None:
    """Show this site's connectors: routing key and target."""
    emit_part(cli, output, "connectors", connectors_table)


@connector.command("delete")
@click.argument("name")
@pass_cli
def connector_delete(cli: Cli, name: str) -> None:
    """Delete connector NAME; its routing key is withdrawn.

    New flows for the key stop coming here (other sites' connectors for it
    are not affected).
    """
    running, _ = cli.call("delete_connector", name=name)
    say(f"connector {name} deleted")
    not_running_note(running)


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
    emit(data, output, lambda d: network_status_table(d) + note)


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
    running, members, problems = write_dump(cli.site_dir, file, cli.run)
    say(f"debug dump written to {file}: {', '.join(members)}")
    if not running:
        say("the site is not running: no live status, no log lines")
    for problem in problems:
        say(f"  could not collect {problem}")


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
        ok = trio.run(demo_run, connections, size, round_trips)
    except FabricError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
