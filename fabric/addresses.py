"""Link addresses and HTTP forward proxies as users write them: parsing, checking and printing.

Pure: no sockets and no Trio, so that config and token files can be checked
without the transports that dial them (router/transports.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from urllib.parse import unquote

import attrs

SCHEMES = ("tls", "ws", "wss")
WS_PATH = "/fabric"  # where a site serves WebSocket links, and the path of a ws(s) address without one
DEFAULT_PORTS = {"ws": 80, "wss": 443}  # as in URLs; a tls:// address always names its port

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


@attrs.frozen
class Address:
    scheme: str
    host: str
    port: int
    path: str = ""  # ws and wss only

    @property
    def websocket(self) -> bool:
        return self.scheme != "tls"

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.hostport}{self.path}"


def parse_address(text: str) -> Address:
    """`tls://host:port`, `ws[s]://host[:port][/path]` -> Address; ValueError saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise ValueError("a link address must be text")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"link address {text[:100]!r} must start with one of: {', '.join(s + '://' for s in SCHEMES)}")
    hostport, slash, path = rest.partition("/")
    path = slash + path
    if scheme == "tls":
        if path:
            raise ValueError(f"link address {text[:100]!r}: a tls:// address has no path")
    elif not path or path == "/":
        path = WS_PATH
    elif not _PATH.fullmatch(path):
        raise ValueError(f"link address {text[:100]!r}: the path has characters a URL path cannot hold")
    host, port = _split_hostport(hostport, DEFAULT_PORTS.get(scheme))
    why = _why_host_refused(host) or (None if port is not None else "no port from 1 to 65535")
    if why or port is None:
        example = "tls://host:port" if scheme == "tls" else f"{scheme}://host:port/path"
        raise ValueError(f"link address {text[:100]!r} must look like {example}: {why}")
    return Address(scheme, host, port, path if scheme != "tls" else "")


def _split_hostport(text: str, default_port: int | None) -> tuple[str, int | None]:
    """"host:port", "[v6]:port" or (with a default port) "host" -> (host, port); port None when bad."""
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket:
            return text, None
        if not after:
            return host, default_port
        if not after.startswith(":"):
            return host, None
        port_text = after[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        return text, None  # an IPv6 address needs brackets around it
    else:
        return text, default_port
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return host, None
    return host, int(port_text)


def _why_host_refused(host: str) -> str | None:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "bad IPv6 address"
        return None
    if not host or len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in host.split(".")):
        return "bad host name"
    return None


# -- forward proxies ---------------------------------------------------------------


@attrs.frozen(repr=False)
class Proxy:
    """An HTTP forward proxy that links tunnel through with CONNECT."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never the password: this goes into logs and status
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}:***@" if self.username is not None else ""
        return f"http://{user}{host}:{self.port}"

    __repr__ = __str__


NO_PROXY = "none"  # a link's `proxy` setting that means: connect directly, whatever the environment says


def parse_proxy(text: str) -> Proxy:
    """`http://[user:password@]host:port` -> Proxy; ValueError saying what is wrong otherwise."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text  # curl's convention: a bare host:port is an HTTP proxy
    if scheme != "http":
        raise ValueError(f"proxy {hide_password(text)!r}: only http:// proxies are supported (CONNECT over plain HTTP)")
    rest = rest.rstrip("/")
    userinfo, at, hostport = rest.rpartition("@")
    host, port = _split_hostport(hostport, None)
    why = "no path" if "/" in hostport else _why_host_refused(host)
    why = why or (None if port is not None else "it needs a port from 1 to 65535")
    if why or port is None:
        raise ValueError(f"proxy {hide_password(text)!r} must look like http://[user:password@]host:port: {why}")
    if not at:
        return Proxy(host, port)
    username, _, password = userinfo.partition(":")
    return Proxy(host, port, unquote(username), unquote(password))


def hide_password(text: str) -> str:
    """A proxy setting fit for logs and terminals: `http://user:***@host:port`.

    Read as `parse_proxy` reads it (the credentials end at the last "@"), so
    a password with "/", "@" or ":" in it, or a setting without a scheme, is
    hidden as well.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    userinfo, at, hostport = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hostport}"


def proxy_for(address: Address, setting: str | None, environ: Mapping[str, str] = os.environ) -> Proxy | None:
    """The proxy to reach `address` through: the link's own `setting`, else the environment's.

    `setting` is a proxy URL, `"none"` (never a proxy), or None (the
    environment decides: `https_proxy`/`HTTPS_PROXY` for tls and wss,
    `http_proxy`/`HTTP_PROXY` for ws, unless `no_proxy`/`NO_PROXY` lists
    the host). ValueError for a malformed proxy URL.
    """
    if setting is not None:
        return None if setting == NO_PROXY else parse_proxy(setting)
    names = ("http_proxy", "HTTP_PROXY") if address.scheme == "ws" else ("https_proxy", "HTTPS_PROXY")
    text = next((environ[name] for name in names if environ.get(name)), None)
    if text is None or _bypassed(address, environ.get("no_proxy") or environ.get("NO_PROXY") or ""):
        return None
    try:
        return parse_proxy(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (from the environment)") from None


def _bypassed(address: Address, no_proxy: str) -> bool:
    """Whether NO_PROXY (comma-separated: `*`, host names matching as suffixes, IPs, CIDRs, optional :port) covers `address`."""
    host = address.host.lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if ip is not None and ip in network:
                return True
            continue
        name, port = _split_hostport(entry, 0)
        if port is None or (port and port != address.port):
            continue
        if ip is not None:
            if name.strip("[]") == host:
                return True
            continue
        name = name.lstrip("*").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False
