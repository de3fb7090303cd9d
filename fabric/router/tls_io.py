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

On a WebSocket link (ws://) the TLS bytes travel in the binary messages of
a `transports.WebSocketStream` under the SSLStream: its sans-I/O framing
(`wrap`, `unwrap_untrusted`: the same websockets protocol object, so what
it had already parsed is not lost) sits here between the TLS object and the
socket, both ways. Pings are answered (the pong waits in `pending`, like a
KeyUpdate's answer), the WebSocket's own keepalive ping goes out with the
data, a close frame ends the stream as the end of the connection does, and
a malformed frame or a text message is a `trio.BrokenResourceError`.

`take_over` returns None for anything it does not know how to drive: memory
streams in tests, a wss:// link (its WebSocket runs over a second TLS), a
newer trio. The link then uses the stream as it is.
"""

from __future__ import annotations

import os
import ssl

import trio

from .transports import WebSocketStream

RECEIVE_SIZE = 256 * 1024  # bytes per read of the socket: up to ~16 TLS records


class DirectTLS:
    def __init__(
        self,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        sock,
        ws: WebSocketStream | None,
        max_pending: int,
    ) -> None:
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._socket = sock  # the trio socket under the SSLStream (closed by whoever closes the stream)
        self._ws = ws  # the WebSocket framing between the TLS bytes and the socket, if any
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
        ws = below if type(below) is WebSocketStream else None
        if ws is not None:
            below = ws.transport
        # Only a TCP socket right under it (or under its WebSocket): any other stream adapter
        # frames or encrypts its bytes, even if it exposes its socket (for logs).
        if type(below) is not trio.SocketStream:
            return None
        parts = [getattr(stream, name, None) for name in ("_ssl_object", "_incoming", "_outgoing")]
        if any(p is None for p in parts):
            return None
        ssl_object, incoming, outgoing = parts
        # A TLS 1.3 server's SSLStream holds back what its handshake left (session
        # tickets) until its first send: b"" with none (fabric sends none), None once sent.
        if outgoing.pending or getattr(stream, "_delayed_outgoing", None):
            return None  # something trio has not sent yet: leave the stream to trio
        if ws is not None:  # payloads the WebSocket received that the SSLStream has not asked for yet
            for payload in ws.take_received():
                incoming.write(payload)
        return cls(ssl_object, incoming, outgoing, below.socket, ws, max_pending)

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
            parts: list[bytes] = []
            total = 0
            closed = False
            while total < max_bytes:
                try:
                    chunk = self._ssl.read(max_bytes - total)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLError as exc:
                    if parts:
                        break  # hand over what came before it; the next call raises
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                if not chunk:
                    closed = True  # close_notify: b"" now, or at the next call
                    break
                parts.append(chunk)
                total += len(chunk)
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
            if self._ws is not None:
                payloads, reply = self._ws.unwrap_untrusted(data)
                for payload in payloads:
                    self._incoming.write(payload)
                self._queue(reply)  # a pong, the answer to a close: the writer sends it (see `pending`)
                if self._ws.eof:
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
        try:
            if data:
                self._ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        out = self._outgoing.read()
        if out and self._ws is not None:
            out = self._ws.wrap(out)
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
