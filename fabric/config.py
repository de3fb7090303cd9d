"""The site's configuration: attrs models, their cattrs converter, load/save of the site dir.

A site directory holds:

    site.yaml         this file's models, readable and editable by people
    identity/         CA and site key pair (see pki.py), keys mode 0600
    links/<name>/     per outgoing link: the peer's CA and our cert it signed
    state/            incarnation counter and issued-token grants
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml
from cattrs.preconf.pyyaml import make_converter

from .addresses import NO_PROXY, parse_address, parse_proxy
from .errors import ConfigError
from .files import write_private_atomic
from .names import brief, check_name, check_names
from .router.frames import INTERIOR, check_cost, check_mode
from .router.routes import BALANCED, DISTRIBUTIONS
from .strict import strict

CONFIG_FILE = "site.yaml"
STATE_DIR = "state"
LINKS_DIR = "links"

DEFAULT_LINK_HOST = "127.0.0.1"
DEFAULT_LISTENER_HOST = "127.0.0.1"  # nothing is exposed beyond the host unless asked
DEFAULT_CONNECTOR_HOST = "localhost"
# Port a site with link access accepts links on unless told otherwise: fixed, so
# tokens can be issued before the first start and firewalls can be opened for
# it; outside the ephemeral range (32768-60999), so an outgoing connection
# never holds it. Port 0 picks a free port at the first start instead.
DEFAULT_LINK_PORT = 7443


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a number greater than 0, not {value!r}")


def _name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    check_name(value, attribute.name)


def _port(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= 65535):
        raise ValueError(f"{attribute.name} must be a port number 0-65535, not {value!r}")


@attrs.frozen
class Settings:
    """Timers and limits. Each has a unit and a reason."""

    keepalive_interval: float = attrs.field(default=1.0, validator=_positive)  # seconds between PINGs
    keepalive_timeout: float = attrs.field(default=3.0, validator=_positive)  # seconds of silence -> link dead
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)  # seconds for TLS + HELLO
    dial_timeout: float = attrs.field(default=5.0, validator=_positive)  # seconds to reach a peer or a target
    reconnect_min: float = attrs.field(default=0.25, validator=_positive)  # seconds, first retry of a link
    reconnect_max: float = attrs.field(default=10.0, validator=_positive)  # seconds, cap of the backoff
    # Bytes a flow may have in flight per hop. 256 KiB fills a loopback or LAN
    # link from one stream; memory per flow per hop is at most this much.
    flow_window: int = attrs.field(default=256 * 1024, validator=_positive)
    # Flows per link; with flow_window this bounds a link's buffered bytes.
    max_flows_per_link: int = attrs.field(default=4096, validator=_positive)
    # Bytes queued for a link's writer before data senders wait for it to drain.
    link_write_buffer: int = attrs.field(default=1024 * 1024, validator=_positive)
    max_hops: int = attrs.field(default=32, validator=_positive)  # hop limit of a new flow
    # Whether links advertise their measured RTT, which adds one unit of cost
    # per 10 ms (routes.LATENCY_STEP). Off: the configured costs alone decide.
    # A link counts the RTT either end advertises: set it alike on all sites.
    latency_cost: bool = True
    # Seconds between anti-entropy rounds (a digest hash to one neighbour in
    # turn): repairs lost updates; at rest it costs ~1 KiB per site per minute.
    anti_entropy_interval: float = attrs.field(default=5.0, validator=_positive)
    # Seconds a site's record is kept after it became unreachable (its
    # services are withdrawn at once); then it is forgotten until it returns.
    purge_after: float = attrs.field(default=60.0, validator=_positive)
    # Seconds between WebSocket pings on a ws:// or wss:// link, sent with its
    # traffic, for proxies that cut WebSockets they think idle (many at 30-60 s).
    ws_keepalive_interval: float = attrs.field(default=25.0, validator=_positive)
    # Service sync: automatic listeners (one socket each) in all, and charged
    # to any one site (each is charged to one site that offers its key; a key
    # several sites offer goes to one with room), so that no member, however
    # many keys it advertises, can fill this site's descriptor table.
    # Configured listeners are never counted or touched.
    max_auto_listeners: int = attrs.field(default=128, validator=_positive)
    max_auto_listeners_per_site: int = attrs.field(default=32, validator=_positive)
    # HTTP listeners: seconds a client may take to send a request's head
    # (slowloris), seconds a keep-alive connection may sit idle between
    # requests, and client connections per listener (a descriptor each).
    http_header_timeout: float = attrs.field(default=10.0, validator=_positive)
    http_idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    http_max_connections: int = attrs.field(default=512, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError(
                f"keepalive_timeout ({self.keepalive_timeout:g} s) must be longer than keepalive_interval "
                f"({self.keepalive_interval:g} s), or every link is declared dead between two pings"
            )
        if self.reconnect_min > self.reconnect_max:
            raise ValueError(f"reconnect_min ({self.reconnect_min:g} s) must not be above reconnect_max ({self.reconnect_max:g} s)")


# How a listener or connector carries connections: "tcp", byte for byte, one
# provider per connection; "http", one provider per request (proxy/http.py).
PROTOCOLS = ("tcp", "http")
DEFAULT_PROTOCOL = "tcp"
DEFAULT_DISTRIBUTION = BALANCED  # see ListenerConfig.distribution


def _addresses(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must list at least one link address")
    for address in value:
        parse_address(address)


def _proxy(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value != NO_PROXY:
        parse_proxy(value)


def _listed(value: Any) -> Any:
    """A list given to the API, as the tuple the config holds (anything else is left to `_names`)."""
    return tuple(value) if isinstance(value, list) else value


def _names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A list of names: site ids (which are names too), site names or routing keys. None passes."""
    check_names(value, attribute.name)


@attrs.frozen
class LinkConfig:
    """An outgoing link, made by redeeming a token of the peer."""

    name: str = attrs.field(validator=_name)  # also its directory under links/
    peer_id: str
    # Tried in order; the one that worked last is moved first.
    addresses: tuple[str, ...] = attrs.field(validator=_addresses)
    cost: int = attrs.field(default=1, validator=check_cost)
    # How to get out: None, through the proxy the environment names (HTTPS_PROXY,
    # HTTP_PROXY, NO_PROXY); "none", directly; or "http://[user:password@]host:port".
    proxy: str | None = attrs.field(default=None, validator=_proxy)
    # The routing keys the linked site may offer through this link; its
    # services outside the list are ignored here. None: any key (open).
    offers: tuple[str, ...] | None = attrs.field(default=None, converter=_listed, validator=_names)


@attrs.frozen
class ListenerConfig:
    name: str = attrs.field(validator=_name)
    routing_key: str = attrs.field(validator=_name)
    port: int = attrs.field(validator=_port)
    host: str = DEFAULT_LISTENER_HOST
    protocol: str = attrs.field(default=DEFAULT_PROTOCOL, validator=attrs.validators.in_(PROTOCOLS))
    # How each new connection picks a provider: "balanced" (fewest outstanding
    # flows plus cost: farther providers take flows as nearer ones fill) or
    # "closest" (only the lowest-cost providers).
    distribution: str = attrs.field(default=DEFAULT_DISTRIBUTION, validator=attrs.validators.in_(DISTRIBUTIONS))
    # The only sites its clients are carried to, by site id or name (see
    # router/policy.py); empty: any site that offers the routing key.
    providers: tuple[str, ...] = attrs.field(default=(), converter=_listed, validator=_names)


@attrs.frozen
class ConnectorConfig:
    name: str = attrs.field(validator=_name)
    routing_key: str = attrs.field(validator=_name)
    port: int = attrs.field(validator=_port)
    host: str = DEFAULT_CONNECTOR_HOST
    protocol: str = attrs.field(default=DEFAULT_PROTOCOL, validator=attrs.validators.in_(PROTOCOLS))
    # The only sites whose flows it takes, by site id or name (see
    # router/policy.py); empty: any site. This site's own listeners always may.
    allow: tuple[str, ...] = attrs.field(default=(), converter=_listed, validator=_names)


@attrs.frozen
class SiteConfig:
    name: str = attrs.field(validator=_name)
    mode: str = attrs.field(default=INTERIOR, validator=check_mode)
    link_host: str = DEFAULT_LINK_HOST
    link_port: int | None = attrs.field(default=None, validator=_port)  # None: accepts no links
    # Port that accepts links as WebSockets (at addresses.WS_PATH), for reverse
    # proxies and firewalls that pass only HTTP; None: none.
    ws_port: int | None = attrs.field(default=None, validator=_port)
    # Service sync: a listener here for every routing key offered elsewhere, on
    # service_host and the connector's port, for as long as it is offered.
    service_sync: bool = True
    service_host: str = DEFAULT_LISTENER_HOST
    settings: Settings = Settings()
    links: tuple[LinkConfig, ...] = ()
    listeners: tuple[ListenerConfig, ...] = ()
    connectors: tuple[ConnectorConfig, ...] = ()


# A typo in site.yaml is an error, not ignored: an unknown key, or a value of the wrong type.
_converter = strict(make_converter(forbid_extra_keys=True))
_structure_names = _converter.get_structure_hook(tuple[str, ...])


def _structure_list(value: Any, type_: Any) -> tuple[str, ...]:
    """A list as written; one string would otherwise be taken as a list of its characters."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {brief(value)}")
    return _structure_names(value, type_)


_converter.register_structure_hook_func(lambda type_: type_ == tuple[str, ...], _structure_list)


def config_path(site_dir: Path) -> Path:
    return site_dir / CONFIG_FILE


def link_dir(site_dir: Path, name: str) -> Path:
    """Where outgoing link `name` keeps its certificates: links/<name>, and never anywhere else."""
    try:
        check_name(name, "link name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    links = (site_dir / LINKS_DIR).resolve()
    path = (links / name).resolve()
    if path.parent != links:  # a symbolic link planted there
        raise ConfigError(f"{site_dir / LINKS_DIR / name} leads out of {links}: refusing to use it")
    return path


def load_config(site_dir: Path) -> SiteConfig:
    path = config_path(site_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{site_dir} is not a fabric site directory: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {_first_line(exc)}") from None
    try:
        return _converter.structure(raw, SiteConfig)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None


def save_config(site_dir: Path, config: SiteConfig) -> None:
    """Write site.yaml atomically: a crash leaves the old file or the new one."""
    text = yaml.safe_dump(_converter.unstructure(config), sort_keys=False)
    write_private_atomic(config_path(site_dir), text.encode("utf-8"))


def config_as_dict(config: SiteConfig) -> dict[str, Any]:
    """The config as plain data, exactly as site.yaml holds it."""
    return _converter.unstructure(config)


def describe_validation_error(exc: BaseException) -> str:
    """One line naming the key at fault (`listeners[0].port: ...`), from a cattrs error tree."""
    where = ""
    while True:
        for note in getattr(exc, "__notes__", ()):
            if isinstance(note, cattrs.AttributeValidationNote):
                where += f".{note.name}" if where else note.name
            elif isinstance(note, cattrs.IterableValidationNote):
                where += f"[{note.index}]"
        if not (isinstance(exc, cattrs.BaseValidationError) and exc.exceptions):
            break
        exc = exc.exceptions[0]
    prefix = f"{where}: " if where else ""
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"{prefix}unknown key {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return f"{prefix}missing value"
    if isinstance(exc, (AttributeError, TypeError)) and not where:
        return "expected a mapping of keys to values"
    return prefix + _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
