"""A link: one authenticated byte stream between two sites, carrying frames; the Trio side.

The protocol itself (flow ids, credit, frame validation) is `protocol.LinkProtocol`,
which does no I/O. A `Link` is the shell around it: a reader task that feeds it
what the stream (or `tls_io.DirectTLS`) delivers and acts on its events without
ever blocking (flows buffer at most their credit), one writer that coalesces
what it returns into large writes, and a pinger. Silence longer than the
keepalive timeout ends the link; so does any protocol error, with a GOAWAY
that says why.

A `FlowEnd` is one hop of a flow on a link: a half-closeable byte stream whose
readers and writers wait on the credit the protocol keeps.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Protocol

import trio

from ..config import Settings
from ..errors import FlowRefused, FlowReset, LinkError, ProtocolError
from .frames import (
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Open,
    Reason,
    decode_message_untrusted,
    decode_reason_untrusted,
    encode_frame,
    encode_reason,
)
from .protocol import (
    Data,
    FlowAccepted,
    FlowClosed,
    FlowCredit,
    FlowOpened,
    FlowOverLimit,
    FlowRefusedByPeer,
    FlowResetByPeer,
    GoAway,
    Gossip,
    LinkProtocol,
    Ping,
    Pong,
    RoundTrips,
    WindowUpdate,
)
from .tls_io import DirectTLS
from .transports import receive_batch

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024  # bytes per read from the link stream
MAX_DATA = 64 * 1024  # bytes of payload per DATA frame: one TCP read of a client
GOAWAY_GRACE = 0.5  # seconds for the writer to finish its frame and send a last GOAWAY once the link ends
# Bytes of control frames (PONG, CREDIT, RESET, OPEN_FAIL..., and a WebSocket
# link's pongs) that may queue past `link_write_buffer`. Data waits for the
# writer; control frames cannot (the reader must never block), so a peer that
# sends but never reads would grow the queue forever: past this allowance the
# link is ended instead.
CONTROL_ALLOWANCE = 1024 * 1024
# Seconds after a frame was written at once (by the task that queued it) during
# which the next frames are left to the writer task instead, which writes all
# that queued meanwhile in one go: one frame alone goes out with no task switch
# (a request and its answer), a burst (many flows answering at once) in one
# TLS write. Once the window has passed, the next frame goes out at once with
# all that queued before it, even while the burst goes on: the peer starts on a
# long burst's first frames while this site makes the rest. Shorter and longer
# windows did worse in tools.bench (docs/performance.md).
COALESCE_WINDOW = 100e-6
# Drive an established link's TLS directly (tls_io.DirectTLS) instead of through
# trio.SSLStream: no writer task hop per frame, whole socket reads decrypted at
# once (on WebSocket links too, with the framing between the TLS and the socket).
DIRECT_TLS = True


class LinkHandler(Protocol):
    """What a link needs from the router above it. Called from the reader: must not block."""

    def on_open(self, link: Link, flow: FlowEnd, request: Open) -> None: ...

    def on_gossip(self, link: Link, payload: bytes) -> None: ...

    def on_rtt(self, link: Link) -> None:
        """A new RTT sample arrived (`link.rtt`, `link.rtt_floor`)."""


# -- handshake ----------------------------------------------------------------


async def read_frame(stream: trio.abc.ReceiveStream, decoder: FrameDecoder) -> Frame:
    """The next frame during a handshake (the caller bounds the time)."""
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise LinkError("peer closed the connection during the handshake")
        decoder.receive_data(data)
    return frame


def read_hello_untrusted(frame: Frame, local: Hello) -> Hello:
    """The peer's HELLO; refuses a peer with no protocol version in common."""
    if frame.type is FrameType.GOAWAY:
        code, text = decode_reason_untrusted(frame.payload)
        raise LinkError(f"peer refused the link: {text}", code=code)
    if frame.type is not FrameType.HELLO:
        raise ProtocolError(f"expected HELLO, got {frame.type.name}")
    peer = decode_message_untrusted(frame.payload, Hello)
    if max(peer.min_version, local.min_version) > min(peer.max_version, local.max_version):
        raise LinkError(
            code=Reason.VERSION,
            message=f"no common link protocol version: this site speaks {local.min_version}-{local.max_version}, "
            f"site {peer.name} speaks {peer.min_version}-{peer.max_version}"
        )
    return peer


def make_hello(site_id: str, name: str, mode: str, incarnation: int, settings: Settings, cost: int) -> Hello:
    return Hello(PROTOCOL_MIN, PROTOCOL_MAX, site_id, name, mode, incarnation, settings.flow_window, cost)


def goaway_frame(code: Reason, text: str) -> bytes:
    return encode_frame(FrameType.GOAWAY, 0, encode_reason(code, text))


# -- the link -----------------------------------------------------------------


class _LinkEnded(Exception):
    """Internal: why the link ended, as one line."""


class Link(trio.abc.AsyncResource):
    """The Trio side of a link: reads the stream into a `LinkProtocol`, acts on its events, writes its bytes."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        decoder: FrameDecoder,
        *,
        local: Hello,
        peer: Hello,
        dialer: bool,
        cost: int,
        settings: Settings,
        handler: LinkHandler,
    ) -> None:
        self.stream = stream
        self.local = local
        self.peer = peer
        self.dialer = dialer
        self.cost = cost
        self.settings = settings
        self.round_trips = RoundTrips(trio.current_time(), settings.keepalive_timeout)
        self._handler = handler
        self._protocol = LinkProtocol(
            dialer=dialer,
            window=settings.flow_window,
            peer_window=peer.flow_window,
            max_flows=settings.max_flows_per_link,
            peer_name=peer.name,
            decoder=decoder,
        )
        self._flows: dict[int, FlowEnd] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._closed = False
        self._reason: str | None = None
        self._goaway: bytes | None = None
        self._scope = trio.CancelScope()  # the whole link (see run)
        self._serving = trio.CancelScope()  # its reader and pinger
        # None: the stream is used through its own methods
        max_pending = settings.link_write_buffer + CONTROL_ALLOWANCE
        self._tls = DirectTLS.take_over(stream, max_pending=max_pending) if DIRECT_TLS else None
        self._last_direct = -1.0  # trio time of the last frame written at once by the task that queued it

    def __repr__(self) -> str:
        role = "dialed" if self.dialer else "accepted"
        return f"<Link {role} peer={self.peer.name} flows={len(self._flows)} queued={self.queued}B>"

    @property
    def queued(self) -> int:
        """Bytes queued for the peer: frames not yet encrypted, and TLS bytes the socket has not taken yet."""
        return self._out_bytes + (self._tls.pending if self._tls is not None else 0)

    @property
    def direct(self) -> bool:
        """Whether the link drives its TLS itself (tls_io.DirectTLS) rather than through the stream's methods."""
        return self._tls is not None

    @property
    def peer_id(self) -> str:
        return self.peer.site_id

    @property
    def closed(self) -> bool:
        """True from the moment the link is told to end (it may still be flushing a GOAWAY)."""
        return self._closed or self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why the link ended, as one line; None while it is up."""
        return self._reason

    @property
    def flow_count(self) -> int:
        return len(self._flows)

    @property
    def rtt(self) -> float | None:
        """Seconds, smoothed; None before the first PONG."""
        return self.round_trips.smoothed

    @property
    def rtt_floor(self) -> float | None:
        """Seconds: what routing uses (see `RoundTrips.floor`)."""
        return self.round_trips.floor

    @property
    def answered_at(self) -> float:
        """When the peer last answered a PING (or the link began), in trio time."""
        return self.round_trips.answered_at

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Link] = trio.TASK_STATUS_IGNORED) -> str:
        """Serve the link until it ends; returns why, as one line."""
        try:
            with self._scope:  # cancelled from outside, or when the writer's grace is over
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._writer)
                    with self._serving:  # cancelled at once when the link is told to end
                        async with trio.open_nursery() as serving:
                            serving.start_soon(self._guard, self._reader)
                            serving.start_soon(self._guard, self._pinger)
                            task_status.started(self)
                    # The link is ending. The writer is never cancelled mid-send (trio
                    # would mark the TLS stream broken, and the GOAWAY could not follow):
                    # it stops at a frame boundary, sends the GOAWAY and returns, or
                    # is cancelled when the grace is over (a peer that does not read).
                    self._scope.deadline = min(self._scope.deadline, trio.current_time() + GOAWAY_GRACE)
                    self._out_ready.set()
        finally:
            self._closed = True
            reason = self._reason or "link closed"
            for flow in list(self._flows.values()):
                flow._on_link_lost(reason)
            self._flows.clear()
            self._drained.set()
            with trio.move_on_after(GOAWAY_GRACE, shield=True):
                await trio.aclose_forcefully(self.stream)
        return reason

    def close(self, code: Reason = Reason.SHUTDOWN, text: str = "site is shutting down") -> None:
        """End the link, telling the peer why. Returns at once; `run` does the rest."""
        self._end(f"closed here: {text}", goaway=self._protocol.goaway(code, text))

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _end(self, reason: str, goaway: bytes | None = None) -> None:
        if self._reason is None:
            self._reason = reason
            self._goaway = goaway
        self._serving.cancel()
        self._out_ready.set()  # the writer sends the GOAWAY, then returns (see run)

    async def _guard(self, task) -> None:
        try:
            await task()
        except _LinkEnded as exc:
            self._end(str(exc))
        except ProtocolError as exc:
            self._end(f"protocol error: {exc}", self._protocol.goaway(Reason.PROTOCOL, str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            self._end(f"connection lost: {cause}" if str(cause) else "connection lost")
        except OSError as exc:
            self._end(f"connection lost: {exc.strerror or exc}")

    async def _reader(self) -> None:
        timeout = self.settings.keepalive_timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as silence:
            self._receive(b"")  # frames that came with the handshake
            while True:
                if self._tls is not None:
                    data = await self._tls.receive(RECEIVE_SIZE)
                    if self._tls.pending:  # reading made output (a key update, a WebSocket pong): the writer sends it
                        self._out_ready.set()
                else:
                    data = await receive_batch(self.stream, RECEIVE_SIZE)
                if not data:
                    raise _LinkEnded("peer closed the connection")
                silence.deadline = trio.current_time() + timeout
                self._receive(data)
        raise _LinkEnded(f"no frames from peer for {timeout:g} s (keepalive timeout)")

    def _receive(self, data: bytes) -> None:
        """Feed the protocol; act on its events (synchronously: the reader never blocks)."""
        flows = self._flows
        for event in self._protocol.receive_data(data):
            if type(event) is Data:  # (type(...) is: cheaper than isinstance, and mypy narrows it)
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._on_data(event.payload)
            elif type(event) is WindowUpdate:
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._wake()
            elif type(event) is FlowAccepted:
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._opened.set()
            elif type(event) is FlowClosed:
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._on_close()
            elif type(event) is FlowResetByPeer:
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._fail(FlowReset(event.code, event.text))
            elif type(event) is FlowRefusedByPeer:
                if (flow := flows.get(event.flow_id)) is not None:
                    flow._fail(FlowRefused(event.code, event.text))
            elif type(event) is FlowOpened:
                flow = FlowEnd(self, event.flow_id, event.request.flow_uid, opener=False)
                flows[event.flow_id] = flow
                self._handler.on_open(self, flow, event.request)
            elif type(event) is FlowOverLimit:
                self._send(self._protocol.refuse_flow(event.flow_id, Reason.FLOW_LIMIT, event.text))
            elif type(event) is Ping:
                self._send(self._protocol.pong(event.payload))
            elif type(event) is Pong:
                if self.round_trips.on_pong(event, trio.current_time()):
                    self._handler.on_rtt(self)
            elif type(event) is Gossip:
                self._handler.on_gossip(self, event.payload)
            elif type(event) is GoAway:
                raise _LinkEnded(f"peer went away: {event.text}")

    async def _writer(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            if self._reason is not None:
                break
            chunks, self._out = self._out, []
            data = b"".join(chunks)
            if self._tls is not None:
                self._out_bytes -= len(data)
                if data:  # (_send may have written all that was queued)
                    self._tls.write_nowait(data)
                await self._tls.flush()
            else:
                await self.stream.send_all(data)
                self._out_bytes -= len(data)
            if self.queued < self.settings.link_write_buffer:
                self._drained.set()
        # Told to end, between two frames: what is still queued is dropped (the
        # flows are reset at both ends anyway), the last frame says why.
        self._out.clear()
        self._out_bytes = 0
        if self._goaway is not None:
            try:
                if self._tls is not None:
                    self._tls.write_nowait(self._goaway)
                    await self._tls.flush()
                else:
                    await self.stream.send_all(self._goaway)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the peer will notice by the stream ending instead

    async def _pinger(self) -> None:
        while True:
            self._send(self._protocol.ping(trio.current_time()))
            await trio.sleep(self.settings.keepalive_interval)

    # -- sending -----------------------------------------------------------------

    def _send(self, frame: bytes, payload: bytes = b"") -> None:
        """Queue what the protocol returned: a frame, or a DATA header and its payload. Never blocks.

        Ends the link if the peer has stopped reading.
        """
        if self.closed:
            return
        if self.queued > self.settings.link_write_buffer + CONTROL_ALLOWANCE:
            self._end(f"peer is not reading: {self.queued} bytes are queued for it")
            return
        tls = self._tls
        if tls is not None and not tls.pending:
            # The socket has taken all before it: write it now, with whatever queued meanwhile,
            # unless frames are coming in a burst and the last went out less than the window ago.
            now = trio.current_time()
            if now - self._last_direct > COALESCE_WINDOW:
                self._last_direct = now
                data = frame + payload if payload else frame
                if self._out:  # (the writer is due to run, and finds nothing left, or less)
                    self._out.append(data)
                    data = b"".join(self._out)
                    self._out = []
                    self._out_bytes = 0
                try:
                    tls.write_nowait(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    cause = exc.__cause__ or exc
                    self._end(f"connection lost: {cause}")
                    return
                if tls.pending:
                    self._out_ready.set()  # the writer waits for the socket to take the rest
                return
        self._out.append(frame)
        if payload:
            self._out.append(payload)
        self._out_bytes += len(frame) + len(payload)
        self._out_ready.set()

    async def wait_writable(self) -> None:
        """Wait while the writer has more than `link_write_buffer` bytes queued."""
        while self.queued >= self.settings.link_write_buffer and not self._closed:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    def send_gossip(self, payload: bytes) -> None:
        self._send(self._protocol.gossip(payload))

    # -- flows -------------------------------------------------------------------

    def open_flow(self, request: Open) -> FlowEnd:
        """Send OPEN for a new flow; `await flow.wait_opened()` for the answer."""
        if self._closed:
            raise FlowRefused(Reason.LINK_LOST, f"link to {self.peer.name} is down")
        try:
            flow_id, frame = self._protocol.open_flow(request)
        except FlowRefused:
            if self._protocol.out_of_flow_ids:
                # Ids are never reused on a link, so when they run out the link is made
                # again: closed here, redialled by the dialling site. Its flows are reset.
                self.close(Reason.FLOW_LIMIT, "the link has used all its flow ids")
            raise
        flow = FlowEnd(self, flow_id, request.flow_uid, opener=True)
        self._flows[flow_id] = flow
        self._send(frame)
        return flow

    def _forget(self, flow: FlowEnd) -> None:
        self._flows.pop(flow.flow_id, None)


class FlowEnd(trio.abc.HalfCloseableStream):
    """One hop of a flow on one link, as a half-closeable byte stream.

    Receiving buffers at most `flow_window` bytes: the peer may send only up to
    the offset we granted, and we grant more only as bytes are consumed (the
    link's protocol keeps the counts: `credit`).
    """

    def __init__(self, link: Link, flow_id: int, uid: str, *, opener: bool) -> None:
        self.link = link
        self.flow_id = flow_id
        self.uid = uid
        # None: the flow ended in the same read that opened it (its RESET follows in the events).
        self.credit = link._protocol.flow_credit(flow_id) or FlowCredit(0, 0)
        self._protocol = link._protocol
        self.settings_write_buffer = link.settings.link_write_buffer
        self._inbound: collections.deque[bytes] = collections.deque()
        self._recv_closed = False
        self._send_closed = False
        self._error: FlowReset | FlowRefused | None = None
        # Where DATA goes straight from the link's reader, while nothing is queued (see attach_sink).
        self._sink: Callable[[bytes], int] | None = None
        self._sink_eof: Callable[[], None] | None = None  # told of the peer's CLOSE once the sink has had every byte
        self._on_failed: Callable[[FlowReset | FlowRefused], None] | None = None
        self._sink_held = False  # bytes were queued for the reader of this flow: the sink waits for it to catch up
        self._changed = trio.Event()
        self._opened = trio.Event()
        self._failed = trio.Event()  # set once _error is: reset, refused or link lost
        if not opener:
            self._opened.set()

    def __repr__(self) -> str:
        return f"<FlowEnd {self.flow_id} on {self.link.peer.name} {self.credit!r}>"

    @property
    def finished(self) -> bool:
        return self._error is not None or (self._send_closed and self._recv_closed)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _fail(self, error: FlowReset | FlowRefused) -> None:
        self._error = error
        self.link._forget(self)
        self._opened.set()
        self._failed.set()
        self._wake()
        if (callback := self._on_failed) is not None:
            self._on_failed = None
            callback(error)

    def on_failure(self, callback: Callable[[FlowReset | FlowRefused], None] | None) -> None:
        """Call `callback(error)` once, when the flow is reset, refused or its link is lost (at once if it was).

        What a relay uses instead of a task per flow waiting in `wait_failed`.
        """
        self._on_failed = callback
        if callback is not None and self._error is not None:
            self._on_failed = None
            callback(self._error)

    async def wait_failed(self) -> FlowReset | FlowRefused:
        """Wait until the flow is reset, refused or its link is lost; returns why.

        A relay watches this, so a flow that has already delivered its EOF
        (nobody reads it any more) still passes a later reset on.
        """
        await self._failed.wait()
        assert self._error is not None
        return self._error

    def _maybe_forget(self) -> None:
        if self.finished:
            self.link._forget(self)

    # -- opening -----------------------------------------------------------------

    async def wait_opened(self) -> None:
        """Wait for OPEN_OK; raises FlowRefused on OPEN_FAIL, FlowReset if the link broke."""
        await self._opened.wait()
        if self._error is not None:
            raise self._error

    def accept(self) -> None:
        self.link._send(self._protocol.accept_flow(self.flow_id))

    def refuse(self, code: Reason | int, text: str) -> None:
        if self._error is None:
            self.link._send(self._protocol.refuse_flow(self.flow_id, code, text))
            self._fail(FlowRefused(code, text))

    # -- stream interface ------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        # A call that waited has been through the scheduler (a cancel point and a schedule
        # point): only one that did not wait takes a checkpoint of its own, at the end.
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while not self._inbound:
            self._sink_held = False  # the reader has sent all it took: the sink may deliver again
            if self._error is not None:
                raise self._error
            if self._recv_closed:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return b""
            await self._changed.wait()
            waited = True
        if self._error is not None:
            raise self._error
        chunk = self._inbound.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._inbound.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._consume(len(chunk))
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return chunk

    def _consume(self, n: int) -> None:
        """`n` more bytes were taken by the reader of this flow: the protocol may grant more credit."""
        if credit := self._protocol.consumed(self.flow_id, n):
            self.link._send(credit)

    @property
    def quiet(self) -> bool:
        """Nothing is queued for `receive_some`, and the flow has neither ended this way nor failed."""
        return not self._inbound and not self._recv_closed and self._error is None

    def attach_sink(self, sink: Callable[[bytes], int] | None, at_eof: Callable[[], None] | None = None) -> None:
        """Deliver DATA to `sink` from the link's reader, with no task switch, while nothing is queued.

        `sink(payload)` takes what it can at once, never blocking, and returns
        how many bytes it took (the other end's `send_nowait`). What it does
        not take is queued for `receive_some`, as without a sink, and the sink
        is not used again until the reader has drained the queue and comes
        back for more (so bytes never overtake each other). A relay attaches
        one; it changes nothing else: credit is granted as the sink takes bytes.

        Bytes that arrived before the sink was attached (DATA right behind
        OPEN_OK, before the relay started; what an HTTP upgrade left unread)
        are queued: the sink waits for the reader to take them first, as if
        it had queued them itself.

        `at_eof()`, if given, is called from the reader when the peer's CLOSE
        comes while the sink has had every byte (nothing queued): a sink
        that is the only reader of the flow (an HTTP listener's answers)
        learns of the end as it learns of the bytes. A relay gives none: its
        pump meets the EOF in `receive_some`. (A failure is `on_failure`'s.)
        """
        self._sink = sink
        self._sink_eof = at_eof
        self._sink_held = bool(self._inbound)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_closed:
            raise trio.ClosedResourceError("this flow was half-closed for sending")
        await trio.lowlevel.checkpoint_if_cancelled()
        credit = self.credit
        total, pos = len(data), 0
        while pos < total:
            if self._error is not None:
                raise self._error
            if credit.send_limit <= credit.sent:
                await self._changed.wait()
                continue
            await self.link.wait_writable()
            if self._error is not None:
                raise self._error
            n = min(credit.send_limit - credit.sent, total - pos, MAX_DATA)
            chunk = data if (pos == 0 and n == total and isinstance(data, bytes)) else bytes(data[pos : pos + n])
            self.link._send(self._protocol.send_data(self.flow_id, chunk), chunk)
            pos += n
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes, *, whole: bool = False) -> int:
        """Queue what credit and the link's write buffer allow now, without waiting; bytes taken.

        A transit relay's sink: DATA from one link goes on to the next from the
        reader, with no task switch, while the way on is open. With `whole`:
        all of `data` or nothing (0).
        """
        if self._error is not None or self._send_closed or self.link.closed:
            return 0
        if self.link.queued >= self.settings_write_buffer:
            return 0
        credit = self.credit
        n = min(credit.send_limit - credit.sent, len(data), MAX_DATA)
        if n <= 0 or (whole and n < len(data)):
            return 0
        chunk = data if n == len(data) else data[:n]
        self.link._send(self._protocol.send_data(self.flow_id, chunk), chunk)
        return n

    async def wait_send_all_might_not_block(self) -> None:
        while self.credit.send_limit <= self.credit.sent and self._error is None:
            await self._changed.wait()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error
        if not self._send_closed:
            self._send_closed = True
            self.link._send(self._protocol.close_flow(self.flow_id))
            self._maybe_forget()

    def reset(self, code: Reason | int, text: str) -> None:
        """Abandon the flow in both directions and tell the peer why. Idempotent."""
        if self.finished:
            return
        self.link._send(self._protocol.reset_flow(self.flow_id, code, text))
        self._fail(FlowReset(code, text))

    abort = reset

    async def aclose(self) -> None:
        self.reset(Reason.ENDPOINT_RESET, "flow closed before it finished")
        await trio.lowlevel.checkpoint()

    # -- from the link's reader (synchronous, never blocks) ------------------------------

    def _on_data(self, payload: bytes) -> None:
        if self._sink is not None and not self._sink_held:
            taken = self._sink(payload)
            if taken:
                self._consume(taken)
                if taken == len(payload):
                    return
                payload = payload[taken:]
            self._sink_held = True
        self._inbound.append(payload)
        self._wake()

    def _on_close(self) -> None:
        self._recv_closed = True
        self._maybe_forget()
        self._wake()
        if self._sink_eof is not None and not self._sink_held and not self._inbound:
            self._sink_eof()

    def _on_link_lost(self, reason: str) -> None:
        if not self.finished:
            self._fail(FlowReset(Reason.LINK_LOST, f"link to {self.link.peer.name} lost: {reason}"))
