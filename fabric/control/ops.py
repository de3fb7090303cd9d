"""The operations the CLI asks of a site, in one table.

The same table serves a running site (through its control socket) and a
stopped one (loaded from its directory), so every verb has one code path.
Results are plain JSON-able data.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cattrs

from ..config import (
    DEFAULT_CONNECTOR_HOST,
    DEFAULT_DISTRIBUTION,
    DEFAULT_LISTENER_HOST,
    DEFAULT_PROTOCOL,
    config_as_dict,
)
from ..errors import FabricError
from ..pki import DEFAULT_EXPIRATION_WINDOW, DEFAULT_REDEMPTIONS, Token
from ..site import Site

_plain = cattrs.Converter()


def _running(site: Site, what: str) -> None:
    if not site.running:
        raise FabricError(f"site {site.name} is not running: start it with `fabric site run` to {what}")


async def status(site: Site) -> dict:
    return {**_plain.unstructure(site.status()), "running": site.running}


async def network_status(site: Site) -> dict:
    return _plain.unstructure(site.network_status())


async def create_listener(
    site: Site,
    name: str,
    port: int,
    host: str = DEFAULT_LISTENER_HOST,
    routing_key: str | None = None,
    distribution: str = DEFAULT_DISTRIBUTION,
    protocol: str = DEFAULT_PROTOCOL,
    providers: list[str] | None = None,
) -> dict:
    made = await site.create_listener(
        name,
        port,
        host=host,
        routing_key=routing_key,
        distribution=distribution,
        protocol=protocol,
        providers=providers or (),
    )
    return _plain.unstructure(made)


async def delete_listener(site: Site, name: str) -> dict:
    await site.delete_listener(name)
    return {}


async def create_connector(
    site: Site,
    name: str,
    port: int,
    host: str = DEFAULT_CONNECTOR_HOST,
    routing_key: str | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    allow: list[str] | None = None,
) -> dict:
    made = await site.create_connector(name, port, host=host, routing_key=routing_key, protocol=protocol, allow=allow or ())
    return _plain.unstructure(made)


async def delete_connector(site: Site, name: str) -> dict:
    await site.delete_connector(name)
    return {}


async def issue_token(
    site: Site,
    redemptions_allowed: int = DEFAULT_REDEMPTIONS,
    expiration_window: float = DEFAULT_EXPIRATION_WINDOW,
    cost: int | None = None,
    link_urls: list[str] | None = None,
    offers: list[str] | None = None,
) -> dict:
    token = await site.issue_token(
        redemptions_allowed=redemptions_allowed,
        expiration_window=expiration_window,
        cost=cost,
        link_urls=link_urls,
        offers=offers,
    )
    return {"token": token.dumps(), "expires_at": token.expires_at, "redemptions_allowed": redemptions_allowed}


async def redeem_token(
    site: Site, token: str, name: str | None = None, cost: int | None = None, proxy: str | None = None
) -> dict:
    return {"link": await site.redeem_token(Token.loads_untrusted(token), name=name, cost=cost, proxy=proxy)}


async def wait_link(site: Site, name: str) -> dict:
    _running(site, "wait for its links")
    peer = next((l.peer_id for l in site.config.links if l.name == name), None)
    if peer is None:
        raise FabricError(f"no link named {name!r} at site {site.name}")
    await site.wait_linked(peer)
    return {}


async def wait_reachable(site: Site, routing_key: str, listener: str | None = None) -> dict:
    """Once a site offers the key (and this site's listeners for it accept); its providers, as listener
    `listener`'s provider policy admits them if one is named."""
    _running(site, "wait for a routing key")
    await site.wait_reachable(routing_key)
    policy = next((l.providers for l in site.config.listeners if l.name == listener), ())
    return {"providers": sorted(site.router.name_of(p) for p in site.router.within(policy).providers(routing_key))}


async def update_link(site: Site, name: str, **changes: Any) -> dict:
    """`cost`, `proxy` (None: the environment's) and/or `offers` (None: any routing key), as given."""
    await site.update_link(name, **{k: v for k, v in changes.items() if k in ("cost", "proxy", "offers")})
    return {}


async def delete_link(site: Site, name: str) -> dict:
    await site.delete_link(name)
    return {}


async def revoke_link(site: Site, name: str) -> dict:
    return {"revoked": await site.revoke_link(name)}


async def config(site: Site) -> dict:
    return config_as_dict(site.config)


OPS: dict[str, Callable[..., Awaitable[Any]]] = {
    op.__name__: op
    for op in (
        status,
        network_status,
        create_listener,
        delete_listener,
        create_connector,
        delete_connector,
        issue_token,
        redeem_token,
        wait_link,
        wait_reachable,
        update_link,
        delete_link,
        revoke_link,
        config,
    )
}


async def perform(site: Site, op: str, args: dict[str, Any], *, logs: Sequence[str] = ()) -> Any:
    """Run one operation; a bad op or bad arguments are a FabricError like any other refusal."""
    if op == "logs":
        return {"lines": list(logs)}
    handler = OPS.get(op)
    if handler is None:
        raise FabricError(f"unknown operation {op!r}")
    try:
        inspect.signature(handler).bind(site, **args)
    except TypeError as exc:
        raise FabricError(f"bad arguments for {op}: {exc}") from None
    try:
        return await handler(site, **args)
    except (ValueError, TypeError) as exc:  # attrs validators of configs built from the arguments
        raise FabricError(f"{op}: {exc}") from None
