"""How a link's byte stream is made. Today: `tls://host:port`, TCP + TLS 1.3.

The TLS context decides who is trusted (see pki.py); this module only dials,
accepts and translates OS and OpenSSL failures into `LinkError` lines.
"""

from __future__ import annotations

import os
import socket
import ssl

import attrs
import trio

from ..errors import FabricError, LinkError

SCHEMES = ("tls",)


@attrs.frozen
class Address:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """`tls://host:port` -> Address; ValueError with the reason otherwise."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"link address {text!r} must start with one of: {', '.join(s + '://' for s in SCHEMES)}")
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"link address {text!r} must look like {scheme}://host:port")
    return Address(scheme, host, int(port))


async def listen_tcp(host: str, port: int, *, what: str) -> trio.SocketListener:
    """One listening socket on host:port; `what` ("listener db") names it in the error.

    With port 0 and a host name that resolves to several addresses, each
    socket would get its own port: only the first is kept, so one port is
    reported and used.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise FabricError(f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


def _tune(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


async def dial(address: Address, context: ssl.SSLContext) -> trio.SSLStream:
    """TCP connect and TLS handshake; the caller bounds the time."""
    try:
        tcp = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise LinkError(f"cannot reach {address}: {describe_connect_error(exc)}") from None
    _tune(tcp)
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise LinkError(f"TLS handshake with {address} failed: {describe_tls_error(exc)}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def accept_tls(tcp: trio.SocketStream, context: ssl.SSLContext) -> trio.SSLStream:
    """Server side of the TLS handshake on an accepted connection."""
    _tune(tcp)
    stream = trio.SSLStream(tcp, context, server_side=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise LinkError(f"TLS handshake failed: {describe_tls_error(exc)}") from None
    return stream


async def receive_batch(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
    """What `stream.receive_some(max_bytes)` returns, plus the TLS records already received behind it.

    `trio.SSLStream.receive_some` decrypts one TLS record (at most 16 KiB) per
    call, and each call is a trip through the scheduler, while one read from
    the socket (64 KiB) usually brings several records. The records already
    in its buffer are decrypted here, synchronously, up to `max_bytes` in all.

    Only for the one task that receives on the stream, right after its own
    `receive_some`: nobody else is inside the SSL object then. Reading only
    consumes buffered input (TLS 1.3 has no renegotiation), so what the
    writer does with the object is not disturbed. On anything but plain
    data (no whole record buffered, the peer's close_notify, an error) it
    stops, and the next `receive_some` meets it as usual.
    """
    data = await stream.receive_some(max_bytes)
    ssl_object = getattr(stream, "_ssl_object", None)  # trio.SSLStream keeps its ssl.SSLObject here
    if ssl_object is None or not data:
        return data
    parts = [data]
    total = len(data)
    while total < max_bytes:
        try:
            more = ssl_object.read(max_bytes - total)
        except ssl.SSLError:
            break
        if not more:
            break
        parts.append(more)
        total += len(more)
    return data if len(parts) == 1 else b"".join(parts)


def describe_connect_error(exc: OSError) -> str:
    """Why a TCP connect failed, in the OS's words ("Connection refused").

    trio.open_tcp_stream says only "all attempts to connect ... failed" and
    chains the real errors, one per address tried, underneath.
    """
    causes = getattr(exc.__cause__, "exceptions", ())
    reasons = list(dict.fromkeys(os.strerror(e.errno) if e.errno else str(e) for e in causes if isinstance(e, OSError)))
    return "; ".join(reasons) or exc.strerror or str(exc)


def describe_tls_error(exc: BaseException) -> str:
    """One line from a trio/OpenSSL error chain: the OpenSSL reason when there is one."""
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLError):
        return (cause.reason or str(cause)).replace("_", " ").lower()
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return str(cause) or "connection closed"


def peer_address(stream: trio.abc.Stream) -> str:
    """host:port of the far end of a (possibly TLS-wrapped) socket stream, for logs."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    try:
        host, port = stream.socket.getpeername()[:2]
    except (AttributeError, OSError):
        return "unknown peer"
    return f"{host}:{port}"
