"""HTTP listener: every request of a client routed on its own, over flows kept warm between requests.

A TCP listener carries a client's connection to one provider for its whole
life: one keep-alive client then sticks to one provider. An HTTP listener
reads the client's requests (http1.py: llhttp, strict, behind a fast path
for plain messages) and, for each one, picks a provider (the same
`balanced` / `closest` choice as flows) and sends the request over a flow
to it. The flow carries HTTP/1.1 itself: at the provider it is a plain
connection to the target (an HTTP connector is a TCP connector that says
`http` in gossip), so a flow is a keep-alive connection
to the target, and idle flows are kept per provider (`IDLE_FLOWS`,
`IDLE_TIMEOUT`) for the next requests: no OPEN round trip per request, and
the target keeps its connections.

Bodies stream both ways under flow control (nothing is buffered whole);
chunked bodies are re-framed, HEAD and 1xx (`Expect: 100-continue`) pass
through, and an `Upgrade` (WebSocket) answered with 101 turns the connection
into a plain tunnel. The listener adds X-Forwarded-For, Forwarded and Via,
sets X-Forwarded-Proto to `http` (what it takes: a client's own value would
tell the target it came over TLS), and drops hop-by-hop headers (RFC 9110,
7.6.1).

A client holds a connection, and a descriptor, only while it uses it
(Settings.http_*): a request's head must come whole within the header
timeout of its first byte (of the accept, for a connection's first
request), else it is answered 408 and the connection closes (closed
unanswered, if nothing came); a keep-alive connection with no request
begun for the idle timeout is closed; and at the connection cap
a new client closes the connection that has waited longest, idle or in a
head, or is turned away (503) when every one has a request in progress.
One task per listener keeps those timers (`_sweep`), so a request pays
for them with a few stores and no timer of its own; what it cut is
counted (`HttpStats`) and said in the log at most once per
logs.LINE_INTERVAL, never a line per connection.

Failures become answers: 503 when no reachable site offers the key, 502
when the providers' targets refuse or fail before answering (a request that
is safe to repeat, with no body byte sent yet, is first retried on another
provider or a fresh flow), 400 for a malformed request, 431 for a head over
MAX_HEAD bytes, 501 for a transfer coding other than chunked, 505 for a
version other than HTTP/1.0 and 1.1, 405 for CONNECT. Each listener counts
requests by method and status class, bytes and latency (`HttpStats`).

What a request costs is kept small, because it is paid per request and not
per connection: a head is parsed once (in one call into C when it is plain)
and written once, by hand; a plain request or answer that comes whole in one
read is handled straight from that call (`Reader.whole`), with no events; a
request read whole and its answer take no task of their own and one write
each way; reads and writes of the client's socket do not go through the
scheduler when they need not wait (`SocketEnd`); and the answer is read and
written to the client by the flow's sink, from the link's reader, as a TCP
relay's is, so that a request wakes the client's task once, not twice (the
answer is given back to a task of its own for anything out of the ordinary:
see `HttpListener._sinks`).

Each client's connection is a `_Client` in one `_Phase` at a time (waiting
for a head, its request routed by its task, its answer written by a sink or
finished by a finisher task, or ended and how), changed only by its own
methods; the provider a request goes to counts it (`Router.using`) until its
answer is done.
"""

from __future__ import annotations

import bisect
import collections
import enum
import http
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
import trio

from .. import logs
from ..errors import FlowError, sole_exception
from ..router.frames import Reason
from ..router.relay import End, SocketEnd, relay
from ..router.router import Outstanding, Tries
from .http1 import (
    CHUNKED,
    END,
    LAST_CHUNK,
    MAX_HEAD,
    NEED_DATA,
    NO_BODY,
    REQUEST,
    RESPONSE,
    UNTIL_CLOSE,
    Head,
    HttpError,
    Reader,
    chunk,
    plain_head,
    write_head,
)
from .plain import FORWARDING, HOP_BY_HOP, SPECIAL
from .tcp import TcpListener

__all__ = ["MAX_HEAD", "HttpListener", "HttpStats"]

log = logging.getLogger("fabric.proxy.http")

CHUNK = 64 * 1024  # bytes per read from a client or a flow, and of answer bytes gathered before a write
IDLE_FLOWS = 128  # idle flows kept per provider by one listener: enough for as many clients at once
IDLE_TIMEOUT = 30.0  # seconds an idle flow is kept (targets close theirs after 60-75 s)
LINGER = 1.0  # seconds to drain a client's unread bytes after the last answer, before closing
# Methods a request may be repeated with (RFC 9110, 9.2.2) when its first
# try failed before an answer began and before any body byte was sent.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# The lengths of the names the listener filters: a header of another length needs no lower() to be passed on.
_SPECIAL_LENGTHS = frozenset(map(len, SPECIAL))
# What a Connection header usually says, which names no other header to drop.
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # upper bounds
_BUCKETS_S = tuple(bound / 1000 for bound in LATENCY_BUCKETS_MS)
_FLOW_FAILURES = (FlowError, trio.BrokenResourceError, trio.ClosedResourceError)
# What reading an answer needs next (HttpListener._take_answer).
_MORE = "more"  # bytes from the upstream
_FLUSH = "flush"  # the bytes gathered written to the client, before going on
_DONE = "done"  # the answer is whole (its last bytes wait to be written)
_SWITCHED = "switched"  # 101: the connection is a tunnel from now on
_SOCKET_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError)
# Connections cut or turned away, as HttpStats counts them.
_CUT_KINDS = ("header_timeouts", "idle_closed", "evicted", "refused")
# The clock for latencies and idle times: paid several times per request, and trio.current_time()
# costs three Python calls on top of this one.
_now = time.perf_counter


@attrs.frozen
class HttpStats:
    """What an HTTP listener has carried since it started."""

    requests: int = 0
    active: int = 0  # requests in progress now
    methods: dict[str, int] = attrs.Factory(dict)  # by request method
    statuses: dict[str, int] = attrs.Factory(dict)  # by status class: "2xx", "5xx"...
    errors: int = 0  # requests that got no complete answer (client or upstream broke)
    bytes_in: int = 0  # request body bytes
    bytes_out: int = 0  # response body bytes
    latency_ms: dict[str, int] = attrs.Factory(dict)  # "<=N" (N in LATENCY_BUCKETS_MS) or ">10000": requests
    p50_ms: float | None = None  # from the buckets: an upper bound
    p99_ms: float | None = None
    # Client connections cut or turned away, so that slow or idle ones cannot hold every descriptor:
    header_timeouts: int = 0  # no whole request head within http_header_timeout (answered 408 if one began)
    idle_closed: int = 0  # no request begun within http_idle_timeout
    evicted: int = 0  # closed at http_max_connections for a new one: waiting the longest, idle or in a head
    refused: int = 0  # turned away at http_max_connections (503): every connection had a request in progress


class _Metrics:
    """Counters bumped per request: plain attributes and lists, turned into HttpStats only when asked."""

    def __init__(self) -> None:
        self.requests = 0
        self.active = 0
        self.methods: collections.Counter[bytes] = collections.Counter()
        self.statuses = [0] * 6  # by status // 100 (0: none of 1xx-5xx)
        self.errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def answered(self, status: int, started: float) -> None:
        """Count an answer to a request that began at `started` (_now()): before its last byte goes,
        so that whoever sees the answer sees it counted."""
        self.statuses[status // 100 if 100 <= status < 600 else 0] += 1
        self.buckets[bisect.bisect_left(_BUCKETS_S, _now() - started)] += 1  # the first bound >= its latency

    def _quantile(self, q: float) -> float | None:
        total = sum(self.buckets)
        if not total:
            return None
        seen = 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= math.ceil(q * total):
                return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else math.inf
        return math.inf

    def snapshot(self, cuts: dict[str, int]) -> HttpStats:
        names = [f"<={b}" for b in LATENCY_BUCKETS_MS] + [f">{LATENCY_BUCKETS_MS[-1]}"]
        return HttpStats(
            requests=self.requests,
            active=self.active,
            methods={method.decode("ascii", "replace"): n for method, n in self.methods.items()},
            statuses={f"{i}xx": n for i, n in enumerate(self.statuses) if n and i},
            errors=self.errors,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            latency_ms={name: n for name, n in zip(names, self.buckets) if n},
            p50_ms=self._quantile(0.5),
            p99_ms=self._quantile(0.99),
            **cuts,
        )


class _Cuts:
    """Client connections a listener cut or turned away: counted for its stats, and said in the log with
    the counts since the last such line, at most once per logs.LINE_INTERVAL: an attack of thousands of
    connections makes a line or two, not one per connection."""

    def __init__(self, listener: str, routing_key: str, phrases: dict[str, str]) -> None:
        self.total = dict.fromkeys(_CUT_KINDS, 0)
        self._unsaid = dict.fromkeys(_CUT_KINDS, 0)
        self._pending = False  # some counted are not said yet
        self._said_at = -math.inf
        self._listener = listener
        self._routing_key = routing_key
        self._phrases = phrases  # kind -> what happened to that many connections

    def count(self, kind: str) -> None:
        self.total[kind] += 1
        self._unsaid[kind] += 1
        self._pending = True
        if _now() - self._said_at >= logs.LINE_INTERVAL:
            self.say()

    def due(self) -> float:
        """When the counts not said yet may be (_now()); inf when there are none."""
        return self._said_at + logs.LINE_INTERVAL if self._pending else math.inf

    def say(self) -> None:
        """One line with the counts since the last: a warning, unless only idle connections were closed (routine)."""
        unsaid = self._unsaid
        parts = "; ".join(f"{n} {self._phrases[kind]}" for kind, n in unsaid.items() if n)
        quiet = unsaid["idle_closed"] == sum(unsaid.values())
        (log.debug if quiet else log.warning)(
            "listener %s: client connections cut since the last such line: %s", self._listener, parts,
            extra=logs.event("http_connections_cut", reason=parts, routing_key=self._routing_key),
        )
        self._unsaid = dict.fromkeys(_CUT_KINDS, 0)
        self._pending = False
        self._said_at = _now()


class _Phase(enum.Enum):
    """Where a client's connection stands: its timers and the cap, who has its current answer, how it ended.

    FRESH or IDLE -> HEAD -> ROUTING (the client's task) -> IDLE, or -> SINKING (a flow's sink) -> IDLE,
    or -> FINISHING (a task of its own) -> IDLE or SINKING again; and from any, once, to an end.
    Each member says whether its timers run (`waiting`: `_sweep` may cut it, `_evict` may close it),
    whether its answer is out of the client task's hands (`pending`), and whether it is over (`ended`).
    """

    # (name, waiting, pending, ended)
    FRESH = ("fresh", True, False, False)  # accepted, nothing read: a head is due within the header timeout
    HEAD = ("head", True, False, False)  # part of a head read: the rest is due within the header timeout of its first byte
    IDLE = ("idle", True, False, False)  # between requests: the next is due to begin within the idle timeout
    ROUTING = ("routing", False, False, False)  # the client's task carries a request and its answer
    SINKING = ("sinking", False, True, False)  # a flow's sink writes the answer; the client's task reads on
    FINISHING = ("finishing", False, True, False)  # a task of its own finishes an answer the sink gave back
    CLOSING = ("closing", False, False, True)  # the last answer went (or none can come): closed gracefully
    TIMED_OUT = ("timed out", False, False, True)  # no head begun in time: closed unanswered
    HEAD_TIMED_OUT = ("head timed out", False, False, True)  # a head not whole in time: answered 408, closed
    EVICTED = ("evicted", False, False, True)  # closed at the cap to make room for a new connection
    BROKEN = ("broken", False, False, True)  # the client's or an upstream's connection broke: reset

    def __init__(self, label: str, waiting: bool, pending: bool, ended: bool) -> None:
        self.label = label
        self.waiting = waiting
        self.pending = pending
        self.ended = ended


# How a connection that ended as these closes: with a FIN and what the client still sends read, not an RST.
_CLEAN_ENDS = (_Phase.CLOSING, _Phase.TIMED_OUT, _Phase.HEAD_TIMED_OUT)


class _Broken(Exception):
    """The client's or the upstream's connection broke off a request.

    `repeatable`: it broke before any byte of an answer or of a request body
    moved, so the request may be tried again where its method allows.
    """

    def __init__(self, text: str, *, repeatable: bool = False, head_lost: bool = False, status: int | None = None) -> None:
        super().__init__(text)
        self.repeatable = repeatable
        self.head_lost = head_lost  # even the request never wholly reached a flow: any method may be tried again
        self.status = status  # the client's fault: the answer it gets, if none has begun (never tried again)


class _Client:
    """A client's connection: its socket, its requests as read, the answer bytes waiting to be written,
    and where it stands (`phase`), which only its methods below change, with what goes with it.

    While a flow's sink writes an answer (SINKING), the client holds that request (`exchange`), the
    flow (`upstream`) and the provider's count (`use`); nothing points back at the client but the
    sink's callbacks, attached to that flow only for as long.
    """

    __slots__ = (
        "answering",
        "end",
        "exchange",
        "forwarding",
        "forwarding_lines",
        "give_back",
        "ip",
        "out",
        "out_bytes",
        "phase",
        "reader",
        "settled",
        "since",
        "sink",
        "started",
        "tasks",
        "upstream",
        "use",
    )

    def __init__(self, stream: trio.SocketStream, ip: str) -> None:
        self.end = SocketEnd(stream, "client")
        self.ip = ip
        self.reader = Reader(REQUEST)
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.started = 0.0  # when its current request began
        self.answering = False  # a final answer's head went out for the current request
        self.phase = _Phase.FRESH
        self.since = _now()  # when it began to wait in that phase (for a `waiting` one)
        self.tasks: trio.Nursery | None = None  # its task, and a finisher's: cancelled when the connection ends
        self.settled: trio.Event | None = None  # set when a pending answer is done, if its task waits for that
        # While a flow's sink writes an answer (SINKING): the request, the flow, the provider's count.
        self.exchange: _Exchange | None = None
        self.upstream: _Upstream | None = None
        self.use: Outstanding | None = None
        # The flow's sink and what gives its answer back to a task (HttpListener._sinks): made once per client.
        self.sink: Callable[[bytes], int] | None = None
        self.give_back: Callable[..., None] | None = None
        address = ip.encode()
        node = b'"[' + address + b']"' if b":" in address else address
        self.forwarding = (address, b"for=" + node + b";proto=http")  # its parts of X-Forwarded-For, Forwarded
        self.forwarding_lines: bytes | None = None  # those headers for a request that came with none of its own

    def __repr__(self) -> str:
        return f"<_Client {self.ip} {self.phase.label}>"

    def began_head(self) -> None:
        """FRESH or IDLE -> HEAD: part of a head came (timed from the accept, for the first)."""
        phase = self.phase
        if phase is _Phase.IDLE:
            self.phase, self.since = _Phase.HEAD, _now()
        elif phase is _Phase.FRESH:
            self.phase = _Phase.HEAD

    def route(self) -> None:
        """A whole head read, and no answer pending: its task carries the request (ROUTING)."""
        self.phase = _Phase.ROUTING
        self.started = _now()

    def routed(self) -> None:
        """ROUTING -> IDLE: its task is done with the answer (a sink that has it says so itself)."""
        if self.phase is _Phase.ROUTING:
            self.phase, self.since = _Phase.IDLE, _now()

    def hold(self, exchange: _Exchange, upstream: _Upstream, use: Outstanding) -> None:
        """ROUTING or FINISHING -> SINKING: the answer to `exchange`, which went over `upstream`, is left
        to that flow's sink (its flow is `quiet`)."""
        flow = upstream.flow
        assert flow is not None
        self.exchange, self.upstream, self.use = exchange, upstream, use
        exchange.away = True
        self.phase = _Phase.SINKING
        flow.attach_sink(self.sink, self.give_back)
        flow.on_failure(self.give_back)

    def let_go(self) -> tuple[_Exchange, _Upstream, Outstanding]:
        """What the sink held, detached from the flow (its phase is for the caller to change)."""
        exchange, upstream, use = self.exchange, self.upstream, self.use
        assert exchange is not None and upstream is not None and use is not None and upstream.flow is not None
        self.exchange = self.upstream = self.use = None
        upstream.flow.attach_sink(None)
        upstream.flow.on_failure(None)
        return exchange, upstream, use

    def take_back(self) -> tuple[_Exchange, _Upstream, Outstanding]:
        """SINKING -> FINISHING: the answer the sink held, for a finisher task to go on with."""
        held = self.let_go()
        self.phase = _Phase.FINISHING
        return held

    def answer_done(self, keep: bool) -> None:
        """The answer is whole at the client: the next request may come (IDLE), or the connection closes."""
        if keep:
            self.phase, self.since = _Phase.IDLE, _now()
        else:
            self.end_as(_Phase.CLOSING)
        if self.settled is not None:
            self.settled.set()
            self.settled = None

    def end_as(self, phase: _Phase) -> None:
        """The connection is over, as `phase` says (unless it was already): its tasks end."""
        if not self.phase.ended:
            self.phase = phase
            if self.tasks is not None:
                self.tasks.cancel_scope.cancel()

    async def receive(self) -> bytes:
        """What the client sent next (b"" at its EOF), for its reader to read."""
        try:
            return await self.end.receive_some(CHUNK)
        except _SOCKET_FAILURES as exc:
            raise _Broken(f"client connection lost: {exc}") from None

    async def flush(self) -> None:
        if self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.out_bytes = 0
            try:
                await self.end.send_all(data)
            except _SOCKET_FAILURES as exc:
                raise _Broken(f"client connection lost: {exc}") from None

    def flush_nowait(self) -> bool:
        """Write what the socket takes now of the answer bytes waiting; whether all went (an error: not all)."""
        out = self.out
        if not out:
            return True
        data = b"".join(out) if len(out) > 1 else out[0]
        taken = self.end.send_nowait(data)
        out.clear()
        if taken < len(data):
            out.append(data[taken:])
            self.out_bytes = len(data) - taken
            return False
        self.out_bytes = 0
        return True


@attrs.define(eq=False)
class _Upstream:
    """A flow to a provider, speaking HTTP/1.1 to its target; kept between requests while both ends allow."""

    end: End
    provider: str
    hop: str | None
    reader: Reader = attrs.Factory(lambda: Reader(RESPONSE))
    fresh: bool = True  # has carried no request yet
    idle_since: float = 0.0
    # The same end, when it is a flow with a sink (not a local target's socket): see `_Client.hold`.
    flow: _Flow | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.flow = cast(_Flow, self.end) if hasattr(self.end, "attach_sink") else None


class _Flow(Protocol):
    """What the listener asks of a flow beyond `End`, to leave an answer to its sink (router/link.py's FlowEnd)."""

    @property
    def quiet(self) -> bool: ...

    def send_nowait(self, data: bytes, *, whole: bool = False) -> int: ...

    def attach_sink(self, sink: Callable[[bytes], int] | None, at_eof: Callable[[], None] | None = None) -> None: ...

    def on_failure(self, callback: Callable[[Any], None] | None) -> None: ...


class _Exchange:
    """One request: what goes to the target, the tries so far, and its progress over the current upstream.

    Made per request: only what differs from the class's defaults is set.
    """

    payload = b""  # the request's head and the body bytes read with it, as they go to the target
    body_sent = False
    body_done = False
    answered: int | None = None  # the final answer's status, once its head went to the client
    status = 0  # of the answer being read (a 1xx until the final one comes)
    chunked = False  # the answer's body goes to the client chunked
    whole = False  # the answer is all read (or it was a 101)
    tries: Tries | None = None  # new flows opened for it (made at the first)
    refused: set[str] | None = None  # providers that cannot serve it (made at the first)
    failure = "no answer"  # why the last try failed
    chosen: str | None = None  # the provider for its first try, chosen before `_route` (_send_at_once)
    away = False  # left to a sink (and maybe given back to a finisher): no longer the routing task's to count

    def __init__(self, head: Head) -> None:
        self.head = head
        self.close = not head.keep_alive  # the client's connection closes after the answer


async def _send(end: End, data: bytes) -> None:
    """All of `data` to a flow (or a local target's socket): at once while credit and buffers allow."""
    taken = end.send_nowait(data)  # type: ignore[attr-defined]  # FlowEnd and SocketEnd both have it
    if taken < len(data):
        await end.send_all(data[taken:])


def _filtered(headers: list[tuple[bytes, bytes]], keep_upgrade: bool) -> tuple[list[bytes], dict[bytes, bytes] | None]:
    """The header lines to pass on (b"name: value"): not the hop-by-hop ones, nor those a Connection
    header lists (RFC 9110, 7.6.1), nor the forwarding ones, which come back apart (lower-case name ->
    their values joined; None if there were none) to be extended."""
    lines = []
    special: dict[bytes, bytes] | None = None
    named = None
    for name, value in headers:
        if len(name) in _SPECIAL_LENGTHS:  # a header of another length is none of them: no lower()
            lower = name.lower()
            if lower in HOP_BY_HOP:
                if lower == b"connection":
                    named = value if named is None else named + b"," + value
                if not (keep_upgrade and lower == b"upgrade"):
                    continue
            elif lower in FORWARDING:
                if special is None:
                    special = {}
                special[lower] = special[lower] + b", " + value if lower in special else value
                continue
        lines.append(name + b": " + value)
    if named is not None and named.strip().lower() not in _CONNECTION_OPTIONS:
        tokens = {token.strip().lower() for token in named.split(b",")} - _CONNECTION_OPTIONS
        if tokens:
            lines = [line for line in lines if line[: line.index(b":")].lower() not in tokens]
    return lines, special


class _Pool:
    """Idle flows per provider, newest last; at most IDLE_FLOWS each, none older than IDLE_TIMEOUT."""

    def __init__(self, release: Callable[[str | None], None]) -> None:
        self._idle: dict[str, collections.deque[_Upstream]] = collections.defaultdict(collections.deque)
        self._release = release

    def take(self, provider: str, now: float) -> _Upstream | None:
        idle = self._idle.get(provider)
        if not idle:
            return None
        while idle:
            upstream = idle.pop()
            if now - upstream.idle_since <= IDLE_TIMEOUT:
                return upstream
            self.discard(upstream)
            while idle:  # the rest are older still
                self.discard(idle.popleft())
        return None

    def put(self, upstream: _Upstream) -> None:
        upstream.idle_since = _now()
        upstream.fresh = False
        idle = self._idle[upstream.provider]
        idle.append(upstream)
        if len(idle) > IDLE_FLOWS:
            self.discard(idle.popleft())

    def discard(self, upstream: _Upstream) -> None:
        upstream.end.abort(Reason.UNSPECIFIED, "HTTP connection not reused")
        self._release(upstream.hop)

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                self.discard(idle.popleft())


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """FIN, then read what the client still sends (for up to LINGER s) before closing.

    Closing with unread bytes in the socket (the rest of a refused request)
    would send an RST, and the client could lose the answer it has not read.
    """
    with trio.move_on_after(LINGER, shield=True):
        try:
            await stream.send_eof()
            while await stream.receive_some(CHUNK):
                pass
        except _SOCKET_FAILURES:
            pass
    await trio.aclose_forcefully(stream)


class HttpListener(TcpListener):
    """A listener with `protocol="http"`: see the module's docstring. It accepts clients even while no
    site offers its routing key, and answers them 503, which says more than a refused connection."""

    answers_without_provider = True

    def __init__(self, config, router, **options) -> None:
        super().__init__(config, router, **options)
        self._metrics = _Metrics()
        self._pool = _Pool(router.release)
        self._via = f"1.1 {router.name}".encode()
        self._via_line = b"via: " + self._via
        settings = router.settings
        self._header_timeout = settings.http_header_timeout
        self._idle_timeout = settings.http_idle_timeout
        self._max_connections = settings.http_max_connections
        self._clients: set[_Client] = set()  # the open connections that hold a place under the cap
        self._arrived = trio.Event()  # set when a connection comes while none is open (`_sweep` waits for it)
        cap = self._max_connections
        self._cuts = _Cuts(config.name, config.routing_key, {
            "header_timeouts": f"sent no whole request head within {self._header_timeout:g} s (408)",
            "idle_closed": f"closed after {self._idle_timeout:g} s idle",
            "evicted": f"evicted at the cap of {cap} connections (the one idle or in a head the longest)",
            "refused": f"refused at the cap of {cap} connections, every one busy (503)",
        })
        self._timeout_answer = self._own_answer(408, f"no whole request head within {self._header_timeout:g} s")
        self._full_answer = self._own_answer(503, f"listener {config.name} holds {cap} connections, all busy")

    def stats(self) -> HttpStats:
        return self._metrics.snapshot(self._cuts.total)

    async def run(self, *, task_status: trio.TaskStatus[TcpListener] = trio.TASK_STATUS_IGNORED) -> None:
        """TcpListener.run, with the task that keeps the clients' timers (`_sweep`) beside it."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep)
                try:
                    await super().run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if (sole := sole_exception(group)) is not None:
                raise sole from None  # (a port in use is the caller's FabricError, not a group)
            raise

    async def aclose(self) -> None:
        await super().aclose()
        self._pool.close()

    async def _serve(self, stream: trio.SocketStream) -> None:
        clients = self._clients
        if len(clients) >= self._max_connections and not self._evict():
            await self._refuse(stream)
            return
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = None
        ip = peer[0] if isinstance(peer, tuple) else "unknown"  # (a unix socket's peer is a path, often "")
        self.connections += 1
        client = _Client(stream, ip)
        client.sink, client.give_back = self._sinks(client)
        try:
            async with trio.open_nursery() as tasks:  # its task (this one) and a finisher's, when one runs
                client.tasks = tasks
                if not clients:
                    self._arrived.set()
                clients.add(client)
                try:
                    await self._requests(client)
                    client.end_as(_Phase.CLOSING)
                except _Broken as exc:
                    if client.phase is not _Phase.EVICTED:
                        log.debug("listener %s: client %s: %s", self.config.name, ip, exc)
                    client.end_as(_Phase.BROKEN)
                except Exception:
                    log.exception("listener %s: connection from %s failed", self.config.name, ip)
                    client.end_as(_Phase.BROKEN)
                finally:
                    if client.exchange is not None:  # (before the sink can start a finisher where none may start)
                        self._abandon(client)
                    tasks.cancel_scope.cancel()  # a finisher ends with the connection
            if client.phase is _Phase.HEAD_TIMED_OUT:
                client.end.send_nowait(self._timeout_answer)  # (the socket takes it: nothing else is waiting)
        finally:
            self.connections -= 1
            try:
                if stream.socket.fileno() == -1:
                    pass  # a tunnel closed it already, or it was evicted
                elif client.phase in _CLEAN_ENDS:
                    await _close_gracefully(stream)
                else:
                    client.end.abort(Reason.UNSPECIFIED, "connection ended")
            finally:
                clients.discard(client)  # (only now: while it lingers, it still holds a descriptor)

    async def _requests(self, client: _Client) -> None:
        """Serve the client's requests, one after the other, until the connection may carry no more.

        The answer to one may still be on its way, written by a flow's sink or
        a finisher: the next is read meanwhile, and routed once that is done.
        """
        reader = client.reader
        metrics = self._metrics
        while True:
            message = None  # a plain request that came whole in one read (Reader.whole): no events
            while not reader.has_events():
                if reader.eof:
                    await self._settle(client)
                    return
                data = await client.receive()
                if client.phase.ended:
                    return  # cut while it read (`_sweep`), or the last answer closes the connection
                message = reader.whole(data)
                if message is not None:
                    break
                reader.receive_data_untrusted(data)
                client.began_head()
            if client.phase.pending:
                await self._settle(client)
                if client.phase.ended:
                    return
            client.route()
            metrics.requests += 1
            if message is not None:
                head = plain_head(message, True)
            else:
                try:
                    head = reader.next_event()
                except HttpError as exc:
                    await self._answer(client, exc.status, "request head too large" if exc.status == 431 else str(exc))
                    return
                assert type(head) is Head, head
            client.answering = False
            metrics.methods[head.method] += 1
            if head.method == b"CONNECT":
                await self._answer(client, 405, "CONNECT is not served by an HTTP listener")
                return
            metrics.active += 1
            exchange = _Exchange(head)
            if message is not None:
                end, length = message[0], message[1]
                exchange.payload = self._upstream_head(head, client)
                if length > 0:
                    exchange.payload += data[end:]
                    exchange.body_sent = True  # (once it went)
                    metrics.bytes_in += length
                exchange.body_done = True
            elif head.framing is NO_BODY and not head.upgrade:
                event = reader.next_event()
                assert event is END, event  # (a request without a body ends with its head)
                exchange.payload = self._upstream_head(head, client)
                exchange.body_done = True
            if exchange.body_done and self._send_at_once(client, exchange):
                continue
            if not await self._counted(client, exchange):
                return
            client.routed()

    def _send_at_once(self, client: _Client, exchange: _Exchange) -> bool:
        """The common request, sent with no task switch: read whole (its `payload` made), its first
        choice of provider has a warm flow, and the flow takes the whole request now; the answer is
        left to the flow's sink. False, with nothing sent, for anything else: `_route` serves it."""
        router = self._router
        provider = exchange.chosen = router.choose_provider(self.config.routing_key, self.config.distribution)
        if provider is None:
            return False
        upstream = self._pool.take(provider, client.started)
        if upstream is None:
            return False
        flow = upstream.flow
        if flow is None or not flow.quiet:  # a local target's socket, or something came on the flow while idle
            self._pool.put(upstream)
            return False
        if not flow.send_nowait(exchange.payload, whole=True):  # no credit, or the link's buffer is full: `_route` waits
            self._pool.put(upstream)
            return False
        exchange.chosen = None
        upstream.reader.expect_response(exchange.head.method)
        with router.using(provider) as use:
            client.hold(exchange, upstream, use.hand_off())
        return True

    async def _counted(
        self, client: _Client, exchange: _Exchange, upstream: _Upstream | None = None, use: Outstanding | None = None
    ) -> bool:
        """`_route`, counted in progress until its answer is done (by a sink, if it takes it), and broken if it broke."""
        exchange.away = False
        try:
            return await self._route(client, exchange, upstream, use)
        except _Broken:
            self._metrics.errors += 1
            raise
        finally:
            if not exchange.away:
                self._metrics.active -= 1

    async def _settle(self, client: _Client) -> None:
        """Wait until the answer a sink or a finisher has is done (the phase then says whether another may follow)."""
        while client.phase.pending:
            settled = client.settled = trio.Event()
            await settled.wait()

    def _abandon(self, client: _Client) -> None:
        """The client's task ends while a sink writes an answer to it: the flow goes, the request counts as broken."""
        _, upstream, use = client.let_go()
        self._pool.discard(upstream)
        use.release()
        self._metrics.active -= 1
        self._metrics.errors += 1

    def _upstream_head(self, head: Head, client: _Client) -> bytes:
        """The request head as it goes to the target: hop-by-hop headers out, forwarding headers in."""
        if head.lines is not None:  # (from the fast path: HTTP/1.1, no chunks, no upgrade, nothing to filter)
            forwarding = client.forwarding_lines or self._usual_forwarding(client)
            return b"%s %s HTTP/1.1\r\n%s%s\r\n\r\n" % (head.method, head.target, head.lines, forwarding)
        lines, seen = _filtered(head.headers, head.upgrade)
        if head.upgrade:
            lines.append(b"connection: upgrade")
        if head.framing is CHUNKED:
            lines.append(b"transfer-encoding: chunked")  # the chunks are framed again
        if seen is None:
            lines.append(self._usual_forwarding(client))
        else:
            ip, forwarded = client.forwarding
            get = seen.get
            lines.append(self._forwarding_lines(ip, get(b"x-forwarded-for"), forwarded, get(b"forwarded"), get(b"via")))
        if head.version == b"1.0" and not any(len(name) == 4 and name.lower() == b"host" for name, _ in head.headers):
            # Without a Host, HTTP/1.1 is malformed (a target answers 400): it goes on as it came, in HTTP/1.0.
            return write_head(b"%s %s HTTP/1.0" % (head.method, head.target), lines)
        return write_head(b"%s %s HTTP/1.1" % (head.method, head.target), lines)

    def _usual_forwarding(self, client: _Client) -> bytes:
        """The forwarding lines of a request that came with none: the same four for each of a client's requests."""
        if client.forwarding_lines is None:
            ip, forwarded = client.forwarding
            client.forwarding_lines = self._forwarding_lines(ip, None, forwarded, None)
        return client.forwarding_lines

    def _forwarding_lines(
        self, ip: bytes, prior_for: bytes | None, forwarded: bytes, prior_forwarded: bytes | None,
        prior_via: bytes | None = None,
    ) -> bytes:
        """X-Forwarded-For, X-Forwarded-Proto, Forwarded and Via as they go on: what came, extended by this hop;
        but the protocol is the one the client spoke here, plain HTTP, whatever it claims (a client's own
        `X-Forwarded-Proto: https` would tell the target that it came over TLS)."""
        return b"\r\n".join((
            b"x-forwarded-for: " + (prior_for + b", " + ip if prior_for else ip),
            b"x-forwarded-proto: http",
            b"forwarded: " + (prior_forwarded + b", " + forwarded if prior_forwarded else forwarded),
            b"via: " + (prior_via + b", " + self._via if prior_via else self._via),
        ))

    def _client_head(self, head: Head, request: Head, close: bool) -> tuple[bytes, bool, bool]:
        """The answer's head as it goes to the client; whether its body is chunked, and whether the
        connection closes after it (a body with no length, to an HTTP/1.0 client, ends with it)."""
        if head.lines is not None:  # (from the fast path: 200-599 with a Content-Length, nothing to filter)
            return self._plain_client_head(head.status, head.reason, head.lines, close), False, close
        lines, seen = _filtered(head.headers, head.status == 101)
        via = None
        if seen is not None:  # X-Forwarded-* and Forwarded in an answer are the target's business: passed on
            via = seen.pop(b"via", None)
            lines.extend(name + b": " + value for name, value in seen.items())
        chunked = False
        if head.framing is CHUNKED or head.framing is UNTIL_CLOSE:
            if request.version == b"1.1":
                lines.append(b"transfer-encoding: chunked")
                chunked = True
            else:
                close = True
        lines.append(b"via: " + via + b", " + self._via if via else self._via_line)
        if head.status == 101:
            lines.append(b"connection: upgrade")
        elif close and head.status >= 200:
            lines.append(b"connection: close")
        return write_head(b"HTTP/1.1 %d %s" % (head.status, head.reason), lines), chunked, close

    def _plain_client_head(self, status: int, reason: bytes, lines: bytes, close: bool) -> bytes:
        """`_client_head` for a plain answer, from its header lines (`Head.lines`)."""
        end = b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n"
        return b"HTTP/1.1 %d %s\r\n%s%s%s" % (status, reason, lines, self._via_line, end)

    def _take_body(self, client: _Client, head: Head, out: list[bytes], exchange: _Exchange) -> bool:
        """The request body bytes already read, framed for the target, onto `out`; whether the body is all there.

        Raises HttpError for a malformed body.
        """
        reader = client.reader
        chunked = head.framing is CHUNKED
        while reader.has_events():
            event = reader.next_event()
            if event is END:
                if chunked:
                    out.append(LAST_CHUNK)
                exchange.body_done = True
                return True
            assert type(event) is bytes, event
            self._metrics.bytes_in += len(event)
            out.append(chunk(event) if chunked else event)
        return False

    async def _route(
        self, client: _Client, exchange: _Exchange, upstream: _Upstream | None = None, use: Outstanding | None = None
    ) -> bool:
        """Carry one request to a provider and its answer back; whether the client may send another.

        `upstream`: one that carries the request already (a sink gave its answer back), with its
        provider's count (`use`): that answer is read first.
        """
        router, key = self._router, self.config.routing_key
        head = exchange.head
        if not exchange.payload:  # (else: read whole, made in `_requests`)
            first = [self._upstream_head(head, client)]
            try:
                self._take_body(client, head, first, exchange)
            except HttpError as exc:
                return await self._answer(client, exc.status, f"bad request body: {exc}")
            exchange.payload = b"".join(first) if len(first) > 1 else first[0]
            exchange.body_sent = len(first) > 1  # once it went
        retryable = head.method in IDEMPOTENT
        if exchange.refused is None:
            exchange.refused = set()
        refused = exchange.refused
        while True:
            sent = upstream is not None
            if not sent:
                provider, exchange.chosen = exchange.chosen, None
                if provider is None:
                    provider = router.choose_provider(key, self.config.distribution, exclude=refused)
                if provider is None:
                    if not router.providers(key):
                        return await self._answer(client, 503, f"no reachable site offers routing key {key!r}")
                    return await self._answer(client, 502, exchange.failure)
                upstream = self._pool.take(provider, client.started)
                if upstream is None:
                    tries = exchange.tries = exchange.tries or Tries()
                    if not tries.left():
                        return await self._answer(client, 502, exchange.failure)
                    try:
                        end, hop = await router.open_to(provider, key, tries)
                    except FlowError as exc:
                        refused.add(provider)
                        exchange.failure = str(exc)
                        continue
                    upstream = _Upstream(end, provider, hop)
                use = router.using(provider)
            assert upstream is not None and use is not None
            provider = upstream.provider
            with use:  # (counted until the answer is done here, or by the sink it is handed off to)
                try:
                    return await self._exchange(client, exchange, upstream, sent, use)
                except _Broken as exc:
                    if exc.status is not None and not client.answering:
                        return await self._answer(client, exc.status, str(exc))
                    if not exc.repeatable:
                        raise
                    exchange.failure = f"site {router.name_of(provider)}: {exc}"
                    if not (retryable or exc.head_lost):
                        return await self._answer(client, 502, exchange.failure)
                    if upstream.fresh:
                        refused.add(provider)  # a new flow failed: this provider's target is in trouble
                    # else a kept flow had gone stale: try again, on another kept flow or a new one
            upstream = use = None

    async def _exchange(
        self, client: _Client, exchange: _Exchange, upstream: _Upstream, sent: bool, use: Outstanding
    ) -> bool:
        """One request and its answer over `upstream`; raises _Broken if it breaks. True, with the
        answer left to a sink (`_Client.hold`, with `use` handed off to it), means: as far as the
        request says. `sent`: the request went already (a sink gave its answer back)."""
        head = exchange.head
        if not sent:
            exchange.status, exchange.chunked, exchange.close, exchange.whole = 0, False, not head.keep_alive, False
            upstream.reader.expect_response(head.method)
            try:
                await _send(upstream.end, exchange.payload)
            except _FLOW_FAILURES as exc:
                self._pool.discard(upstream)
                raise _Broken(f"upstream lost: {exc}", repeatable=True, head_lost=True) from None
            if exchange.body_done and not head.upgrade and upstream.flow is not None and upstream.flow.quiet:
                client.hold(exchange, upstream, use.hand_off())
                return True
        try:
            if exchange.body_done:
                await self._relay_answer(client, exchange, upstream)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_body, client, head, upstream, exchange)
                    await self._relay_answer(client, exchange, upstream)
                    # Answered before the whole body came (or switched protocols): stop reading it.
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            self._pool.discard(upstream)
            broke, _ = group.split(_Broken)
            if broke is not None:
                raise broke.exceptions[0] from None
            raise
        except BaseException:
            self._pool.discard(upstream)
            raise
        if exchange.status == 101:
            await self._tunnel(client, upstream)
            return False
        return self._answer_done(client, exchange, upstream)

    def _answer_done(self, client: _Client, exchange: _Exchange, upstream: _Upstream) -> bool:
        """The answer went whole: the flow is kept for the next request if it can be; whether the client may send another."""
        if client.reader.switched:
            client.reader.resume()  # an upgrade asked for and not granted: the connection stays HTTP
        if exchange.body_done and upstream.reader.reusable():
            self._pool.put(upstream)
        else:
            self._pool.discard(upstream)
        return exchange.body_done and not exchange.close

    def _sinks(self, client: _Client) -> tuple[Callable[[bytes], int], Callable[..., None]]:
        """The sink through which a flow writes the client's answers, and what gives an answer back, made once per client.

        `_Client.hold` attaches them to the flow that carries a request (one
        that is `quiet`: nothing came on it since its last answer). The answer
        is then read and written to the client from the link's reader as its
        bytes come, with no task switch (as a TCP relay's sink writes them),
        while the client's task reads on. Anything but an answer that the
        client's socket takes at once and whole (a failure, the target's EOF,
        a client that does not read as fast) is given back, as it stands, to
        a task of its own (`_finish`), which goes on with it in `_route`.
        """
        metrics = self._metrics

        def give_back(*_: object) -> None:
            if client.exchange is not None:
                exchange, upstream, use = client.take_back()
                assert client.tasks is not None
                client.tasks.start_soon(self._finish, client, exchange, upstream, use)

        def sink(data: bytes) -> int:
            exchange, upstream = client.exchange, client.upstream
            if exchange is None or upstream is None:
                return 0  # (detached: leave them queued)
            reader = upstream.reader
            message = reader.whole(data)
            if message is not None:
                step = self._whole_answer(client, exchange, message, data)
            else:
                reader.receive_data_untrusted(data)
                try:
                    step = self._take_answer(client, exchange, reader)
                    while step is _FLUSH and client.flush_nowait():
                        step = self._take_answer(client, exchange, reader)
                except _Broken:
                    give_back()  # the finisher meets the same error where the reader keeps it
                    return len(data)
            if step is _DONE and client.flush_nowait():
                _, _, use = client.let_go()
                metrics.active -= 1
                use.release()
                client.answer_done(self._answer_done(client, exchange, upstream))
            elif step is not _MORE or not client.flush_nowait():
                give_back()
            return len(data)

        return sink, give_back

    async def _finish(self, client: _Client, exchange: _Exchange, upstream: _Upstream, use: Outstanding) -> None:
        """An answer a sink gave back, read and written on (or the request tried again) as the client's
        task would, while that task reads on; it ends the connection if it broke."""
        try:
            keep = await self._counted(client, exchange, upstream, use)
        except _Broken as exc:
            log.debug("listener %s: client %s: %s", self.config.name, client.ip, exc)
            client.end_as(_Phase.BROKEN)
            return
        except Exception:
            log.exception("listener %s: connection from %s failed", self.config.name, client.ip)
            client.end_as(_Phase.BROKEN)
            return
        if client.phase is _Phase.FINISHING:  # (else a sink has it again: that one says when it is done)
            client.answer_done(keep)

    async def _pump_body(self, client: _Client, head: Head, upstream: _Upstream, exchange: _Exchange) -> None:
        """The rest of the request's body, client -> upstream, as it arrives."""

        while True:
            out: list[bytes] = []
            try:
                done = self._take_body(client, head, out, exchange)
            except HttpError as exc:
                # The client's fault: trying again elsewhere would fail the same way.
                raise _Broken(f"client sent a malformed body: {exc}", status=exc.status) from None
            if out:
                try:
                    await _send(upstream.end, b"".join(out))
                except _FLOW_FAILURES as exc:
                    raise self._broken_answer(exchange, exc, "upstream lost") from None
                exchange.body_sent = True
            if done:
                return
            data = await client.receive()  # the client gone: nothing to answer, nothing to try again
            client.reader.receive_data_untrusted(data)

    async def _relay_answer(self, client: _Client, exchange: _Exchange, upstream: _Upstream) -> None:
        """The upstream's answer, head and body, to the client (until its end, or a 101)."""
        reader = upstream.reader
        while True:
            step = self._take_answer(client, exchange, reader)
            if step is _MORE:
                if client.out:
                    await client.flush()
                try:
                    data = await upstream.end.receive_some(CHUNK)
                except _FLOW_FAILURES as exc:
                    raise self._broken_answer(exchange, exc) from None
                reader.receive_data_untrusted(data)
            else:
                await client.flush()  # (a 1xx too: the client may wait for 100 Continue before it sends more)
                if step is not _FLUSH:
                    return

    def _take_answer(self, client: _Client, exchange: _Exchange, reader: Reader) -> str:
        """The answer's events read so far, onto `client.out` as they go to the client; what is needed next
        (_MORE, _FLUSH, _DONE, _SWITCHED). Raises _Broken for an answer that broke off or is malformed."""
        if exchange.whole:  # (a sink gave it back with its last bytes still to write)
            return _SWITCHED if exchange.status == 101 else _DONE
        if exchange.status == 101:  # (refused where a sink read it first: refused again where it is given back)
            raise self._unasked_switch(exchange)
        out = client.out
        while True:
            try:
                event = reader.next_event()
            except HttpError as exc:
                raise self._broken_answer(exchange, exc) from None
            if event is NEED_DATA:
                if reader.eof:
                    raise self._broken_answer(exchange, EOFError("connection closed"))
                return _MORE
            if type(event) is bytes:
                self._metrics.bytes_out += len(event)
                out.append(chunk(event) if exchange.chunked else event)
                client.out_bytes += len(event)
                if client.out_bytes >= CHUNK:
                    return _FLUSH
            elif event is END:
                if exchange.status < 200:
                    continue  # a 1xx: the final answer follows
                if exchange.chunked:
                    out.append(LAST_CHUNK)
                exchange.whole = True
                self._metrics.answered(exchange.status, client.started)
                return _DONE
            else:
                status = exchange.status = event.status
                if status == 101 and not exchange.head.upgrade:
                    raise self._unasked_switch(exchange)
                data, exchange.chunked, exchange.close = self._client_head(event, exchange.head, exchange.close)
                out.append(data)
                if status == 101:
                    exchange.answered = 101
                    exchange.whole = True
                    self._metrics.answered(101, client.started)
                    return _SWITCHED
                if status < 200:
                    return _FLUSH
                exchange.answered = status
                client.answering = True

    def _whole_answer(self, client: _Client, exchange: _Exchange, message: tuple, data: bytes) -> str:
        """A plain answer that came whole in one read (`Reader.whole`), onto `client.out` as `_take_answer`
        puts it there from its events, with none made; _DONE."""
        end, length, status, reason, _, lines = message
        if lines is not None:
            head = self._plain_client_head(status, reason, lines, exchange.close)
        else:
            head, _, exchange.close = self._client_head(  # (never chunked: it has a Content-Length)
                plain_head(message, False), exchange.head, exchange.close
            )
        client.out.append(head)
        if length:
            client.out.append(data[end:])
            self._metrics.bytes_out += length
        exchange.status = exchange.answered = status
        client.answering = exchange.whole = True
        self._metrics.answered(status, client.started)
        return _DONE

    def _unasked_switch(self, exchange: _Exchange) -> _Broken:
        # RFC 9110, 15.2.2: only to a request that asked for it; and only the client's task makes a tunnel.
        return self._broken_answer(exchange, HttpError("101 to a request that asked for no upgrade"))

    def _broken_answer(self, exchange: _Exchange, exc: BaseException, what: str = "the target's answer broke off") -> _Broken:
        return _Broken(f"{what}: {exc}", repeatable=exchange.answered is None and not exchange.body_sent)

    async def _tunnel(self, client: _Client, upstream: _Upstream) -> None:
        """After 101: bytes both ways, as they are, until both ends close."""
        try:
            if client.reader.trailing:
                await upstream.end.send_all(client.reader.trailing)
            if upstream.reader.trailing:
                await client.end.send_all(upstream.reader.trailing)
            await relay(client.end, upstream.end)
        except _FLOW_FAILURES as exc:
            log.debug("listener %s: tunnel ended: %s", self.config.name, exc)
        finally:
            self._router.release(upstream.hop)

    async def _answer(self, client: _Client, status: int, text: str) -> bool:
        """A short answer of the listener's own; False: the connection closes after it."""
        (log.info if status >= 500 else log.debug)("listener %s: %d %s", self.config.name, status, text)
        if client.answering:
            raise _Broken(f"cannot answer {status} mid-response: {text}")
        self._metrics.answered(status, client.started)
        client.answering = True
        client.out.append(self._own_answer(status, text))
        await client.flush()
        return False

    def _own_answer(self, status: int, text: str) -> bytes:
        """The bytes of a short answer of the listener's own, after which the connection closes."""
        body = f"{status} {text}\n".encode()
        lines = [
            b"content-type: text/plain; charset=utf-8",
            b"content-length: %d" % len(body),
            b"connection: close",
            self._via_line,
        ]
        return write_head(b"HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase.encode()), lines) + body

    # -- what a client may hold: timers and the connection cap ---------------------------------------

    async def _sweep(self) -> None:
        """Close the connections that waited too long: a head not whole within the header timeout of its
        first byte (or of the accept), or no request begun within the idle timeout of the last answer.

        One task for all of a listener's clients, which wakes when the first of their timers is due, or
        when counts are due in the log: a request pays a few stores for its timers, not a timer's
        upkeep. A timer that starts after a pass runs out no sooner than the shorter timeout after
        it, so sleeping at most that long misses none.
        """
        header, idle = self._header_timeout, self._idle_timeout
        cuts = self._cuts
        while True:
            now = _now()
            if cuts.due() <= now:
                cuts.say()
            wake = min(now + min(header, idle), cuts.due())
            for client in self._clients:
                phase = client.phase
                if not phase.waiting:
                    continue
                due = client.since + (idle if phase is _Phase.IDLE else header)
                if due <= now:
                    # Its task ends, and `_serve` answers 408 if a head began, and closes.
                    client.end_as(_Phase.HEAD_TIMED_OUT if phase is _Phase.HEAD else _Phase.TIMED_OUT)
                    cuts.count("idle_closed" if phase is _Phase.IDLE else "header_timeouts")
                elif due < wake:
                    wake = due
            if self._clients or cuts.due() < math.inf:
                await trio.sleep(wake - now)
            else:
                await self._arrived.wait()
                self._arrived = trio.Event()

    def _evict(self) -> bool:
        """Make room under the cap: close at once the connection that has waited longest, idle or in a
        head (never one with a request in progress); False if every one has a request in progress."""
        victim = None
        oldest = math.inf
        for client in self._clients:
            if client.phase.waiting and client.since < oldest:
                victim, oldest = client, client.since
        if victim is None:
            return False
        self._clients.discard(victim)
        victim.end_as(_Phase.EVICTED)
        victim.end.abort(Reason.UNSPECIFIED, "evicted")  # (its descriptor goes now; its task then ends)
        self._cuts.count("evicted")
        return True

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Turn a connection away at once: a 503 (taken by the socket now, or never) and closed."""
        self._cuts.count("refused")
        sock = stream.socket
        try:
            os.write(sock.fileno(), self._full_answer)
            sock.shutdown(socket.SHUT_WR)
            os.read(sock.fileno(), MAX_HEAD)  # what came of a request: unread, closing would reset the answer
        except OSError:
            pass  # (BlockingIOError: nothing came yet)
        await trio.aclose_forcefully(stream)
