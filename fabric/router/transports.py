"""How a link's byte stream is made, in one interface for every transport.

- `tls://host:port`: TCP, then the link's mutual TLS.
- `ws://host:port/path` and `wss://host:port/path`: TCP (`wss`: plus an
  outer TLS, checked against the system's CAs), a WebSocket, then the link's
  mutual TLS inside the WebSocket's binary messages. Whoever terminates the
  outer TLS (a reverse proxy) sees only the inner TLS: it can neither read
  nor forge a link.
- Any of them through an HTTP forward proxy (CONNECT), given per link or by
  the usual `HTTPS_PROXY` (`tls`, `wss`), `HTTP_PROXY` (`ws`) and
  `NO_PROXY` environment variables.

The TLS context decides who is trusted (see pki.py); this module only dials,
accepts and translates OS, OpenSSL, proxy and WebSocket failures into
`LinkError` lines.

The WebSocket layer is the sans-I/O protocol of the `websockets` library,
driven in line by `WebSocketStream`: no reader task per connection (as
trio-websocket has), no whole-message reassembly (a link is a byte stream;
frames are passed on as they come), and its C masking (RFC 6455 makes
clients mask every byte they send), which is what keeps a WebSocket link
near a TLS link's throughput (a pure-Python mask is not). Once a link is up,
`tls_io.DirectTLS` does its framing on the socket itself, with the same
protocol object (`WebSocketStream.wrap`, `unwrap_untrusted`).
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl

import h11
import trio
import websockets.http11 as ws_http11
import websockets.protocol as ws_protocol
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from ..addresses import Address, Proxy
from ..errors import FabricError, LinkError

RECEIVE_SIZE = 64 * 1024  # bytes per read from the socket (or the outer TLS) under a WebSocket
MAX_PROXY_ANSWER = 16 * 1024  # bytes of a proxy's answer to CONNECT we read before giving up on it
MESSAGE_SIZE = 256 * 1024  # bytes of link stream per WebSocket message we send, at most
MAX_MESSAGE = 1024 * 1024  # bytes of a WebSocket message we receive, at most (it is held whole in memory)



async def _open_tunnel(tcp: trio.SocketStream, proxy: Proxy, address: Address) -> None:
    """Ask `proxy` (already connected) for a CONNECT tunnel to `address`; LinkError naming its refusal."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_PROXY_ANSWER)
    headers = [("Host", address.hostport)]
    if proxy.username is not None:
        credentials = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode("ascii")
        headers.append(("Proxy-Authorization", f"Basic {credentials}"))
    await tcp.send_all(conn.send(h11.Request(method="CONNECT", target=address.hostport, headers=headers)))
    answered = b""  # the start of the answer, to quote when it is not HTTP
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise LinkError(f"proxy {proxy} answered CONNECT with something that is not HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            data = await tcp.receive_some(RECEIVE_SIZE)
            if not data and answered:
                line = answered.split(b"\n")[0][:80].decode("latin-1").strip()
                raise LinkError(f"proxy {proxy} answered CONNECT with something that is not HTTP: {line!r}")
            if not data:
                raise LinkError(f"proxy {proxy} closed the connection instead of answering CONNECT {address.hostport}")
            answered = answered or data
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            break
    status, reason = event.status_code, event.reason.decode("latin-1")
    if 200 <= status < 300:
        if conn.trailing_data[0]:
            raise LinkError(f"proxy {proxy} sent data into the tunnel to {address.hostport} before it was used")
        return
    answer = f"{status} {reason}".strip()
    if status in (401, 407):  # 407 is the standard; tinyproxy, among others, answers 401
        why = "refused the credentials given" if proxy.username is not None else "requires credentials (http://user:password@host:port)"
        raise LinkError(f"proxy {proxy} {why}: {answer}")
    if status == 403:
        raise LinkError(f"proxy {proxy} does not allow a tunnel to {address.hostport}: {answer}")
    if status in (502, 503, 504):
        raise LinkError(f"proxy {proxy} could not reach {address.hostport}: {answer}")
    raise LinkError(f"proxy {proxy} refused the tunnel to {address.hostport}: {answer}")


# -- WebSocket ---------------------------------------------------------------------


# websockets' sans-I/O layer logs every frame at DEBUG: far too much for a link's log.
_WS_LOG = logging.getLogger("fabric.websocket")
_WS_LOG.setLevel(logging.WARNING)


class WebSocketStream(trio.abc.Stream):
    """A byte stream carried in WebSocket binary messages, over another stream.

    Made by `connect` (client) or `accept` (server), which do the opening
    handshake. Sends at most `MESSAGE_SIZE` bytes per message; answers pings
    and closes; sends a ping of its own with the data at most every
    `keepalive` seconds (the link's PINGs make sure there is data), for
    proxies that drop WebSockets they think idle.

    The framing itself is done without I/O by `wrap` and `unwrap_untrusted`,
    which an established link's `tls_io.DirectTLS` calls on the socket
    directly, instead of this stream's methods.
    """

    def __init__(self, transport: trio.abc.Stream, protocol: ws_protocol.Protocol, *, keepalive: float, peer: str) -> None:
        self.transport = transport
        self.peer = peer  # for logs: the far end, as the handshake told it
        self._ws = protocol
        self._keepalive = keepalive
        self._last_ping = trio.current_time()
        self._send_lock = trio.Lock()  # the sender and the receiver (answering pings and closes) both write
        self._pending: list[bytes] = []  # received payloads not yet returned, in order
        self.eof = False  # the peer's close frame, or the end of the connection, has come

    @classmethod
    async def connect(cls, transport: trio.abc.Stream, address: Address, *, keepalive: float) -> WebSocketStream:
        """Client handshake for `address`'s host and path; LinkError with the server's refusal."""
        ws = ClientProtocol(parse_uri(str(address)), max_size=MAX_MESSAGE, logger=_WS_LOG)
        ws.send_request(ws.connect())
        await transport.send_all(b"".join(ws.data_to_send()))
        while True:
            data = await transport.receive_some(RECEIVE_SIZE)
            if data:
                ws.receive_data(data)
            else:
                ws.receive_eof()
            response = next((e for e in ws.events_received() if isinstance(e, ws_http11.Response)), None)
            if response is not None or ws.handshake_exc is not None or not data:
                break
        if ws.handshake_exc is None and response is not None:
            return cls(transport, ws, keepalive=keepalive, peer=str(address))
        if response is None:
            why = "closed the connection" if not data else f"answered with something else: {ws.handshake_exc}"
            raise LinkError(f"{address} {why} during the WebSocket handshake")
        body = (response.body or b"").decode("utf-8", "replace").strip().splitlines()
        detail = f": {body[0][:200]}" if body and not body[0].lstrip().startswith("<") else ""
        if response.status_code == 101:
            detail = f": {ws.handshake_exc}"
        raise LinkError(f"{address} refused the WebSocket: HTTP {response.status_code} {response.reason_phrase}{detail}")

    @classmethod
    async def accept(cls, transport: trio.abc.Stream, *, path: str, keepalive: float, peer: str) -> WebSocketStream:
        """Server handshake: only a WebSocket request for `path` is accepted; anything else gets an HTTP error."""
        ws = ServerProtocol(max_size=MAX_MESSAGE, logger=_WS_LOG)
        request = None
        while request is None and ws.handshake_exc is None:
            data = await transport.receive_some(RECEIVE_SIZE)
            if not data:
                raise LinkError("the connection closed before a WebSocket request came")
            ws.receive_data(data)
            request = next((e for e in ws.events_received() if isinstance(e, ws_http11.Request)), None)
        if request is None:
            response = ws.reject(400, "fabric: this port takes WebSocket links only\n")
            why = f"not a WebSocket request: {ws.handshake_exc}"
        elif request.path.split("?")[0] != path:
            response = ws.reject(404, f"fabric: links are at {path}, not {request.path[:100]}\n")
            why = f"a WebSocket request for {request.path[:100]!r}, not {path!r}"
        else:
            response = ws.accept(request)
            why = f"not a WebSocket request: {ws.handshake_exc}"
            if response.status_code != 101:  # a plain HTTP request: say what this port is for
                response = ws.reject(400, "fabric: this port takes WebSocket links only\n")
        if response.status_code != 101:
            with trio.move_on_after(0.5):  # best effort: the protocol may have given up on the request already
                await transport.send_all(response.serialize())
            raise LinkError(why)
        ws.send_response(response)
        await transport.send_all(b"".join(ws.data_to_send()))
        assert request is not None  # (a response of 101 answers a request)
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            peer = f"{forwarded.split(',')[0].strip()[:100]} via {peer}"
        return cls(transport, ws, keepalive=keepalive, peer=peer)

    # -- the framing, without I/O: used by the methods below, and by tls_io.DirectTLS on the socket itself

    def wrap(self, data: bytes | bytearray | memoryview) -> bytes:
        """The bytes on the wire that carry `data`: binary messages, after a keepalive ping when one is due."""
        if self._ws.state is not ws_protocol.State.OPEN:
            raise trio.BrokenResourceError("the WebSocket is closed")
        now = trio.current_time()
        if now - self._last_ping >= self._keepalive:
            self._last_ping = now
            self._ws.send_ping(b"")
        view = memoryview(data)
        for start in range(0, len(view), MESSAGE_SIZE):
            self._ws.send_binary(view[start : start + MESSAGE_SIZE])
        return b"".join(self._ws.data_to_send())

    def unwrap_untrusted(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Bytes from the wire (b"": its end) -> the link bytes they complete, and what to send back.

        What to send back: pongs, the answer to a close. `eof` is True from
        the peer's close frame or the end of the connection on.
        BrokenResourceError for what a link cannot carry: text messages,
        malformed frames.
        """
        if data:
            self._ws.receive_data(data)
        else:
            self._ws.receive_eof()
            self.eof = True
        payloads: list[bytes] = []
        for event in self._ws.events_received():
            if not isinstance(event, Frame):
                continue  # (the handshake's request or response: handled before the stream exists)
            if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                if event.data:
                    payloads.append(bytes(event.data))  # (bytes already: no copy)
            elif event.opcode is Opcode.TEXT:
                raise trio.BrokenResourceError("the peer sent WebSocket text; a link carries binary messages only")
            elif event.opcode is Opcode.CLOSE:
                self.eof = True
        if self._ws.parser_exc is not None:
            raise trio.BrokenResourceError(f"WebSocket protocol error: {self._ws.parser_exc}")
        return payloads, b"".join(self._ws.data_to_send())

    def take_received(self) -> tuple[list[bytes], bytes]:
        """The payloads received and not read yet, which the caller takes over (tls_io.DirectTLS); nothing to send back."""
        taken, self._pending = self._pending, []
        return taken, b""

    # -- trio.abc.Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send(self.wrap(data))

    async def _send(self, out: bytes) -> None:
        if out:
            async with self._send_lock:
                await self.transport.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The payload received so far (at most `max_bytes`); trio.SSLStream asks without a limit and takes it all."""
        while not self._pending and not self.eof:
            data = await receive_batch(self.transport, RECEIVE_SIZE)  # the outer TLS's records, for wss
            payloads, reply = self.unwrap_untrusted(data)
            self._pending.extend(payloads)
            try:
                await self._send(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the next read finds out
        if not self._pending:
            return b""
        if max_bytes is None:  # no copy when one frame came, as with large messages
            chunk = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            return chunk
        chunk = self._pending[0]
        if len(chunk) > max_bytes:
            self._pending[0] = chunk[max_bytes:]
            return chunk[:max_bytes]
        del self._pending[0]
        return chunk

    async def aclose(self) -> None:
        try:
            if self._ws.state is ws_protocol.State.OPEN:
                self._ws.send_close(1000)
                with trio.move_on_after(0.5):
                    await self._send(b"".join(self._ws.data_to_send()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()


# -- dialling and accepting --------------------------------------------------------


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


def tune(stream: trio.SocketStream) -> None:
    """What every link connection gets: no Nagle delay on small frames."""
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


async def _open_tcp(host: str, port: int, what: str) -> trio.SocketStream:
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise LinkError(f"cannot reach {what}: {describe_connect_error(exc)}") from None
    tune(tcp)
    return tcp


async def dial(
    address: Address, context: ssl.SSLContext, *, proxy: Proxy | None = None, ws_keepalive: float = 25.0
) -> trio.SSLStream:
    """Connect (through `proxy` if given) and do every handshake up to the link's TLS; the caller bounds the time."""
    if proxy is None:
        tcp = await _open_tcp(address.host, address.port, str(address))
    else:
        tcp = await _open_tcp(proxy.host, proxy.port, f"proxy {proxy}")
    transport: trio.abc.Stream = tcp
    try:
        if proxy is not None:
            await _open_tunnel(tcp, proxy, address)
        if address.scheme == "wss":
            outer = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=address.host)
            transport = outer
            try:
                await outer.do_handshake()
            except trio.BrokenResourceError as exc:
                raise LinkError(f"TLS handshake with {address} (outer, WebSocket) failed: {describe_tls_error(exc)}") from None
        if address.websocket:
            transport = await WebSocketStream.connect(transport, address, keepalive=ws_keepalive)
        stream = trio.SSLStream(transport, context, server_hostname=None)
        transport = stream
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise LinkError(f"TLS handshake with {address} failed: {describe_tls_error(exc)}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(transport)
        raise LinkError(f"connection to {address} lost during the handshake: {describe_tls_error(exc)}") from None
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    return stream


async def accept_tls(transport: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream:
    """Server side of the link's TLS handshake on an accepted connection (TCP or WebSocket)."""
    stream = trio.SSLStream(transport, context, server_side=True)
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
        return bytes(data)  # (bytes already: no copy)
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
    return bytes(data) if len(parts) == 1 else b"".join(parts)


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


def transport_of(stream: trio.abc.Stream) -> str:
    """"tls", "ws" or "wss": what a link's stream runs on."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, WebSocketStream):
        return "wss" if isinstance(stream.transport, trio.SSLStream) else "ws"
    return "tls"


def peer_address(stream: trio.abc.Stream) -> str:
    """host:port of the far end of a (possibly TLS- or WebSocket-wrapped) socket stream, for logs."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, WebSocketStream):
        return stream.peer
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]  # (a socket stream, or none)
    except (AttributeError, OSError):
        return "unknown peer"
    return f"{host}:{port}"
