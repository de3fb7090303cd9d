"""The TLS byte stream of an established link, driven directly: the data plane's hot path.

A link is set up over a `trio.SSLStream` (handshake, HELLO). From then on
its reader and writer drive the same `ssl.SSLObject` here, on the socket's
non-blocking descriptor, because `trio.SSLStream` costs a trip through the
scheduler per TLS record received (each at most 16 KiB) and per send, and
a send cancelled half-way breaks it for good. Here:

- `receive` decrypts every record already received in one go, and after a
  short read of the socket waits for it to be readable instead of trying a
  read bound to fail;
- `write_nowait` encrypts and writes what the socket takes now, never
  waiting, and keeps the rest for `flush`: a frame can go out from whichever
  task queues it, with no task switch, and a cancelled `flush` loses nothing.

On a WebSocket link the TLS bytes travel in the binary messages of a
`transports.WebSocketStream` under the SSLStream: its sans-I/O framing
(`wrap`, `unwrap_untrusted`: the same websockets protocol object, so what
it had already parsed is not lost) sits here between the TLS object and the
socket, both ways; for a wss:// dialler, with the WebSocket's own TLS (the
SSLStream under it, which a reverse proxy ends) under the framing. Pings
are answered (the pong waits in `pending`, like a KeyUpdate's answer), the
WebSocket's own keepalive ping goes out with the data, a close frame ends
the stream as the end of the connection does, and a malformed frame or a
text message is a `trio.BrokenResourceError`.

`take_over` returns None for anything it does not know how to drive: memory
streams in tests, stream adapters it does not know, a newer trio. The link
then uses the stream as it is.
"""

from __future__ import annotations

import os
import ssl

import trio

from .transports import WebSocketStream

RECEIVE_SIZE = 256 * 1024  # bytes per read of the socket: up to ~16 TLS records


def _read_records(ssl_object: ssl.SSLObject, max_bytes: int) -> tuple[list[bytes], bool]:
    """The plaintext of the TLS records already received, up to `max_bytes`, and whether close_notify came.

    An error behind some plaintext is left for the next call (which raises
    it); BrokenResourceError when there is none before it.
    """
    parts: list[bytes] = []
    total = 0
    while total < max_bytes:
        try:
            chunk = ssl_object.read(max_bytes - total)
        except ssl.SSLWantReadError:
            break
        except ssl.SSLError as exc:
            if parts:
                break
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        if not chunk:
            return parts, True
        parts.append(chunk)
        total += len(chunk)
    return parts, False


def _tls_state(stream: trio.SSLStream) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None:
    """An established SSLStream's TLS object and its two BIOs; None if trio still holds something back."""
    ssl_object = getattr(stream, "_ssl_object", None)
    incoming = getattr(stream, "_incoming", None)
    outgoing = getattr(stream, "_outgoing", None)
    if ssl_object is None or incoming is None or outgoing is None:
        return None  # a trio that keeps them elsewhere
    # A TLS 1.3 server's SSLStream holds back what its handshake left (session
    # tickets) until its first send: b"" with none (fabric sends none), None once sent.
    if outgoing.pending or getattr(stream, "_delayed_outgoing", None):
        return None  # something trio has not sent yet: leave the stream to trio
    return ssl_object, incoming, outgoing


def _encrypt(ssl_object: ssl.SSLObject, outgoing: ssl.MemoryBIO, data: bytes, what: str) -> bytes:
    """`data` as records, after whatever the TLS object had to send (a KeyUpdate's answer)."""
    try:
        if data:
            ssl_object.write(data)
    except ssl.SSLError as exc:
        raise trio.BrokenResourceError(f"{what}: {exc}") from exc
    return outgoing.read()


class _WebSocketOverTLS:
    """A wss:// WebSocket's framing together with the TLS under it, as one framing (see `WebSocketStream.wrap`).

    That outer TLS is the dialler's own, to the reverse proxy in front of
    the hub, which ends it; the link's TLS travels inside, end to end.
    """

    def __init__(
        self, ws: WebSocketStream, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self._ws = ws
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing

    @property
    def eof(self) -> bool:
        return self._ws.eof

    def wrap(self, data: bytes) -> bytes:
        return self._encrypt(self._ws.wrap(data))

    def _encrypt(self, data: bytes) -> bytes:
        return _encrypt(self._ssl, self._outgoing, data, "TLS error (WebSocket's)")

    def unwrap_untrusted(self, data: bytes) -> tuple[list[bytes], bytes]:
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        return self._unwrap_buffered()

    def _unwrap_buffered(self) -> tuple[list[bytes], bytes]:
        payloads: list[bytes] = []
        replies: list[bytes] = []
        while True:
            parts, closed = _read_records(self._ssl, RECEIVE_SIZE)
            if parts:
                more, reply = self._ws.unwrap_untrusted(b"".join(parts))
                payloads += more
                replies.append(reply)
            if closed:  # the outer TLS ended: the end of the WebSocket's connection
                more, reply = self._ws.unwrap_untrusted(b"")
                payloads += more
                replies.append(reply)
            if closed or not parts:
                return payloads, self._encrypt(b"".join(replies))

    def take_received(self) -> tuple[list[bytes], bytes]:
        """What the WebSocket had received, then what the TLS under it had: see `WebSocketStream.take_received`."""
        payloads, reply = self._ws.take_received()
        more, more_reply = self._unwrap_buffered()
        return payloads + more, self._encrypt(reply) + more_reply


class DirectTLS:
    def __init__(
        self,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        sock,
        framing: WebSocketStream | _WebSocketOverTLS | None,
        max_pending: int,
    ) -> None:
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._socket = sock  # the trio socket under the SSLStream (closed by whoever closes the stream)
        self._framing = framing  # between the TLS bytes and the socket, if any: a WebSocket's (wss: and its TLS)
        self._max_pending = max_pending  # bytes (see take_over)
        self._pending = memoryview(b"")  # ciphertext not yet written to the socket
        self._empty = False  # the last read emptied the socket

    @classmethod
    def take_over(cls, stream: object, *, max_pending: int) -> DirectTLS | None:
        """Drive an established `trio.SSLStream`'s TLS state from now on; None if it is not one we can.

        `max_pending`: bytes that may wait for the socket (see `pending`) while
        `receive` reads on: past it, what reading makes us answer (pongs,
        KeyUpdates) is piling up for a peer that does not read, and
        `receive` raises BrokenResourceError instead.
        """
        if not isinstance(stream, trio.SSLStream):
            return None
        below = stream.transport_stream
        framing: WebSocketStream | _WebSocketOverTLS | None = None
        if type(below) is WebSocketStream:
            framing, below = below, below.transport
            if type(below) is trio.SSLStream:  # wss
                outer = _tls_state(below)
                if outer is None:
                    return None
                framing, below = _WebSocketOverTLS(framing, *outer), below.transport_stream
        # Only a TCP socket under it all: any other stream adapter frames or
        # encrypts its bytes, even if it exposes its socket (for logs).
        if type(below) is not trio.SocketStream:
            return None
        state = _tls_state(stream)
        if state is None:
            return None
        direct = cls(*state, below.socket, framing, max_pending)
        if framing is not None:  # what the layers under the SSLStream received that it has not asked for yet
            payloads, reply = framing.take_received()
            for payload in payloads:
                direct._incoming.write(payload)
            direct._queue(reply)
        return direct

    @property
    def pending(self) -> int:
        """Bytes of ciphertext waiting for the socket to take them (see `flush`).

        Counts what a read left to send (a KeyUpdate's answer in the TLS object's
        output, a WebSocket pong): the next `write_nowait` sends it, before its own bytes.
        """
        return len(self._pending) + self._outgoing.pending

    def _fd(self) -> int:
        fd = self._socket.fileno()
        if fd == -1:  # closed: never touch a descriptor number that may have been reused
            raise trio.ClosedResourceError("the link's socket was closed")
        return fd

    # -- receiving (one task only: the link's reader) ---------------------------------

    async def receive(self, max_bytes: int) -> bytes:
        """Plaintext, as much as is already here up to `max_bytes`; b"" when the peer closed TLS cleanly."""
        waited = False
        while True:
            parts, closed = _read_records(self._ssl, max_bytes)  # closed: b"" now, or at the next call
            if parts or closed:
                if not waited:
                    await trio.lowlevel.checkpoint()  # a busy link must not starve the other tasks
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._empty:
                await trio.lowlevel.wait_readable(self._socket)
                waited = True
            try:
                data = os.read(self._fd(), RECEIVE_SIZE)
            except BlockingIOError:
                self._empty = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc.strerror or exc}") from exc
            self._empty = len(data) < RECEIVE_SIZE
            if self._framing is not None:
                payloads, reply = self._framing.unwrap_untrusted(data)
                for payload in payloads:
                    self._incoming.write(payload)
                self._queue(reply)  # a pong, the answer to a close: the writer sends it (see `pending`)
                if self._framing.eof:
                    self._incoming.write_eof()
            elif data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()  # the next read says how: close_notify first, or not
            if self.pending > self._max_pending:  # answers to a peer that keeps asking and never reads
                raise trio.BrokenResourceError(f"peer is not reading: {self.pending} bytes are queued for it")

    # -- sending (any task, synchronously; `flush` in one task at a time) --------------------------

    def write_nowait(self, data: bytes) -> None:
        """Encrypt `data` and write what the socket takes now; the rest waits in `pending` for `flush`."""
        out = _encrypt(self._ssl, self._outgoing, data, "TLS error")
        if out and self._framing is not None:
            out = self._framing.wrap(out)
        self._queue(out)
        self._send_pending()

    def _queue(self, out: bytes) -> None:
        if out:
            self._pending = memoryview(bytes(self._pending) + out) if self._pending else memoryview(out)

    def _send_pending(self) -> None:
        while self._pending:
            try:
                n = os.write(self._fd(), self._pending)
            except BlockingIOError:
                return
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc.strerror or exc}") from exc
            self._pending = self._pending[n:]

    async def flush(self) -> None:
        """Wait until the socket has taken every pending byte. Cancelling it loses nothing."""
        while self._pending:
            await trio.lowlevel.wait_writable(self._socket)
            self._send_pending()
