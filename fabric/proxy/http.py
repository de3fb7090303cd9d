"""HTTP listener: every request of a client routed on its own, over flows kept warm between requests.

A TCP listener carries a client's connection to one provider for its whole
life: one keep-alive client then sticks to one provider. An HTTP listener
parses the client's requests (h11) and, for each one, picks a provider (the
same `balanced` / `closest` choice as flows) and sends the request over a
flow to it. The flow carries HTTP/1.1 itself: at the provider it is a plain
connection to the target (an HTTP connector is a TCP connector that says
`http` in gossip), so a flow is a keep-alive connection to the target, and
idle flows are kept per provider (`IDLE_FLOWS`, `IDLE_TIMEOUT`) for the next
requests: no OPEN round trip per request, and the target keeps its
connections.

Bodies stream both ways under flow control (nothing is buffered whole);
chunked bodies are re-framed, HEAD and 1xx (`Expect: 100-continue`) pass
through, and an `Upgrade` (WebSocket) answered with 101 turns the connection
into a plain tunnel. The listener adds X-Forwarded-For, X-Forwarded-Proto,
Forwarded and Via, and drops hop-by-hop headers (RFC 9110, 7.6.1).

Failures become answers: 503 when no reachable site offers the key, 502
when the providers' targets refuse or fail before answering (a request that
is safe to repeat, with no body byte sent yet, is first retried on another
provider or a fresh flow), 400 for a malformed request, 431 for a head over
MAX_HEAD bytes. Each listener counts requests by method and status class,
bytes and latency (`HttpStats`).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterable

import attrs
import h11
import trio

from ..errors import FlowError
from ..router.frames import Reason
from ..router.relay import End, SocketEnd, relay
from ..router.router import Tries
from .tcp import TcpListener

log = logging.getLogger("fabric.proxy.http")

CHUNK = 64 * 1024  # bytes per read from a client or a flow
MAX_HEAD = 32 * 1024  # bytes of request line + headers; past it: 431
IDLE_FLOWS = 128  # idle flows kept per provider by one listener: enough for as many clients at once
IDLE_TIMEOUT = 30.0  # seconds an idle flow is kept (targets close theirs after 60-75 s)
LINGER = 1.0  # seconds to drain a client's unread bytes after the last answer, before closing
# Methods a request may be repeated with (RFC 9110, 9.2.2) when its first
# try failed before an answer began and before any body byte was sent.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# RFC 9110, 7.6.1: these describe one connection, never forwarded as they are.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)  # upper bounds


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


@attrs.define
class _Metrics:
    requests: int = 0
    active: int = 0
    methods: collections.Counter[str] = attrs.Factory(collections.Counter)
    statuses: collections.Counter[str] = attrs.Factory(collections.Counter)
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    buckets: list[int] = attrs.Factory(lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def answered(self, status: int, seconds: float) -> None:
        self.statuses[f"{status // 100}xx"] += 1
        ms = seconds * 1000
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS_MS) if ms <= bound), len(LATENCY_BUCKETS_MS))
        self.buckets[index] += 1

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

    def snapshot(self) -> HttpStats:
        names = [f"<={b}" for b in LATENCY_BUCKETS_MS] + [f">{LATENCY_BUCKETS_MS[-1]}"]
        return HttpStats(
            requests=self.requests,
            active=self.active,
            methods=dict(self.methods),
            statuses=dict(sorted(self.statuses.items())),
            errors=self.errors,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            latency_ms={name: n for name, n in zip(names, self.buckets) if n},
            p50_ms=self._quantile(0.5),
            p99_ms=self._quantile(0.99),
        )


class _Broken(Exception):
    """The client's or the upstream's connection broke off a request.

    `repeatable`: it broke before any byte of an answer or of a request body
    moved, so the request may be tried again where its method allows.
    """

    def __init__(self, text: str, *, repeatable: bool = False, head_lost: bool = False) -> None:
        super().__init__(text)
        self.repeatable = repeatable
        self.head_lost = head_lost  # even the request head never reached a flow: any method may be tried again


class _Peer:
    """One HTTP connection, as h11 sees it, over a byte stream: the client's, or a flow to a provider.

    What is sent waits in `_out` until a flush: an answer's head, body and end
    usually leave in one write (one system call, one DATA frame), not three.
    """

    def __init__(self, stream, role) -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)
        self.started = 0.0  # when its current request began (a client's)
        self._out: list[bytes] = []
        self._out_bytes = 0

    async def send(self, event, *, flush: bool = False) -> None:
        """Queue an event's bytes; write them all out with `flush`, at a message's end, or past CHUNK."""
        data = self.conn.send(event)
        if data:
            self._out.append(data)
            self._out_bytes += len(data)
        if flush or self._out_bytes >= CHUNK or isinstance(event, h11.EndOfMessage):
            await self.flush()

    async def flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_bytes = 0
            await self.stream.send_all(data)

    async def next_event(self, *, before_waiting: _Peer | None = None):
        """The next event; when it needs bytes from the network, `before_waiting`'s queued bytes go first."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if before_waiting is not None:
                await before_waiting.flush()
            self.conn.receive_data(await self.stream.receive_some(CHUNK))


@attrs.define(eq=False)
class _Upstream:
    """A flow to a provider, speaking HTTP/1.1 to its target; kept between requests while both ends allow."""

    peer: _Peer
    provider: str
    hop: str | None
    fresh: bool = True  # has carried no request yet
    idle_since: float = 0.0

    @property
    def end(self) -> End:
        return self.peer.stream

    def reusable(self) -> bool:
        return self.peer.conn.our_state is h11.DONE and self.peer.conn.their_state is h11.DONE


def _headers(headers: Iterable[tuple[bytes, bytes]], *, keep_upgrade: bool = False) -> list[tuple[bytes, bytes]]:
    """Headers minus the hop-by-hop ones, and minus those the Connection header names."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    drop = (HOP_BY_HOP | named) - ({b"upgrade"} if keep_upgrade else set())
    return [(name, value) for name, value in headers if name not in drop]


def _value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    return b", ".join(values) if values else None


def _head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers, as sent (give or take whitespace)."""
    return len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers)


def _wants_upgrade(request: h11.Request) -> bool:
    connection = _value(request.headers, b"connection") or b""
    return _value(request.headers, b"upgrade") is not None and b"upgrade" in connection.lower()


class _Pool:
    """Idle flows per provider, newest last; at most IDLE_FLOWS each, none older than IDLE_TIMEOUT."""

    def __init__(self, release) -> None:
        self._idle: dict[str, collections.deque[_Upstream]] = collections.defaultdict(collections.deque)
        self._release = release

    def take(self, provider: str) -> _Upstream | None:
        idle = self._idle.get(provider)
        now = trio.current_time()
        while idle:
            upstream = idle.pop()
            if now - upstream.idle_since <= IDLE_TIMEOUT:
                return upstream
            self.discard(upstream)
            while idle:  # the rest are older still
                self.discard(idle.popleft())
        return None

    def put(self, upstream: _Upstream) -> None:
        upstream.peer.conn.start_next_cycle()
        upstream.idle_since = trio.current_time()
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
        except (trio.BrokenResourceError, trio.ClosedResourceError):
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

    def stats(self) -> HttpStats:
        return self._metrics.snapshot()

    async def aclose(self) -> None:
        await super().aclose()
        self._pool.close()

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            peer = "unknown"
        self.connections += 1
        client = _Peer(stream, h11.SERVER)
        clean = False
        try:
            while await self._request(client, peer):
                client.conn.start_next_cycle()
            clean = True
        except _Broken as exc:
            log.debug("listener %s: client %s: %s", self.config.name, peer, exc)
        except Exception:
            log.exception("listener %s: connection from %s failed", self.config.name, peer)
        finally:
            self.connections -= 1
            if stream.socket.fileno() == -1:
                pass  # a tunnel closed it already
            elif clean:
                await _close_gracefully(stream)
            else:
                SocketEnd(stream, "client").abort(Reason.UNSPECIFIED, "connection ended")

    async def _request(self, client: _Peer, peer: str) -> bool:
        """Serve the client's next request; whether the connection may carry another."""
        try:
            event = await client.next_event()
        except h11.RemoteProtocolError as exc:
            client.started = trio.current_time()
            self._metrics.requests += 1
            status = exc.error_status_hint
            return await self._answer(client, status, "request head too large" if status == 431 else f"bad request: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Broken(f"connection lost: {exc}") from None
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        if _head_size(event) > MAX_HEAD:  # h11 bounds only a head that arrives in pieces
            client.started = trio.current_time()
            self._metrics.requests += 1
            return await self._answer(client, 431, "request head too large")
        metrics = self._metrics
        metrics.requests += 1
        metrics.active += 1
        metrics.methods[event.method.decode("ascii", "replace")] += 1
        client.started = trio.current_time()
        try:
            reusable = await self._route(client, event, peer)
        except _Broken:
            metrics.errors += 1
            raise
        finally:
            metrics.active -= 1
        return reusable and client.conn.our_state is h11.DONE and client.conn.their_state is h11.DONE

    def _upstream_request(self, request: h11.Request, peer: str) -> h11.Request:
        upgrade = _wants_upgrade(request)
        headers = _headers(request.headers, keep_upgrade=upgrade)
        if upgrade:
            headers.append((b"connection", b"upgrade"))
        if (_value(request.headers, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
            headers.append((b"transfer-encoding", b"chunked"))  # h11 frames the chunks again
        forwarded_for = _value(request.headers, b"x-forwarded-for")
        ip = peer.encode()
        headers = [(n, v) for n, v in headers if n not in (b"x-forwarded-for", b"forwarded", b"via")]
        headers.append((b"x-forwarded-for", forwarded_for + b", " + ip if forwarded_for else ip))
        if _value(request.headers, b"x-forwarded-proto") is None:
            headers.append((b"x-forwarded-proto", b"http"))
        node = b'"[' + ip + b']"' if b":" in ip else ip
        forwarded = _value(request.headers, b"forwarded")
        this = b"for=" + node + b";proto=http"
        headers.append((b"forwarded", forwarded + b", " + this if forwarded else this))
        via = _value(request.headers, b"via")
        headers.append((b"via", via + b", " + self._via if via else self._via))
        return h11.Request(method=request.method, target=request.target, headers=headers)

    def _answered(self, client: _Peer, status: int) -> None:
        """Count the answer before its last byte goes, so that whoever sees the answer sees it counted."""
        self._metrics.answered(status, trio.current_time() - client.started)

    async def _route(self, client: _Peer, request: h11.Request, peer: str) -> bool:
        """Carry one request to a provider and its answer back; whether the client may send another."""
        router, key = self._router, self.config.routing_key
        forward = self._upstream_request(request, peer)
        retryable = request.method in IDEMPOTENT
        tries = Tries()
        refused: set[str] = set()
        failure = "no answer"
        while True:
            provider = router.choose_provider(key, self.config.distribution, exclude=refused)
            if provider is None:
                if not router.providers(key):
                    return await self._answer(client, 503, f"no reachable site offers routing key {key!r}")
                return await self._answer(client, 502, failure)
            upstream = self._pool.take(provider)
            if upstream is None:
                if not tries.left():
                    return await self._answer(client, 502, failure)
                try:
                    end, hop = await router.open_to(provider, key, tries)
                except FlowError as exc:
                    refused.add(provider)
                    failure = str(exc)
                    continue
                upstream = _Upstream(_Peer(end, h11.CLIENT), provider, hop)
            router.outstanding[provider] += 1
            try:
                return await self._exchange(client, upstream, forward)
            except _Broken as exc:
                if not exc.repeatable:
                    raise
                failure = f"site {router.name_of(provider)}: {exc}"
                if not (retryable or exc.head_lost):
                    return await self._answer(client, 502, failure)
                if upstream.fresh:
                    refused.add(provider)  # a new flow failed: this provider's target is in trouble
                # else a kept flow had gone stale: try again, on another kept flow or a new one
            finally:
                router.outstanding[provider] -= 1

    async def _exchange(self, client: _Peer, upstream: _Upstream, request: h11.Request) -> bool:
        """One request and its answer over `upstream`; raises _Broken if it breaks."""
        body = {"sent": False, "done": False}
        answered: list[int] = []

        def broken(what: str, exc: BaseException) -> _Broken:
            return _Broken(f"{what}: {exc}", repeatable=not answered and not body["sent"])

        async def pump_body() -> None:
            """The request's body, client -> upstream, as it arrives."""
            while True:
                try:
                    event = await client.next_event(before_waiting=upstream.peer)
                except h11.RemoteProtocolError as exc:
                    raise broken("client sent a malformed body", exc) from None
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise broken("client connection lost", exc) from None
                if isinstance(event, h11.Data):
                    self._metrics.bytes_in += len(event.data)
                    body["sent"] = True
                elif isinstance(event, h11.EndOfMessage):
                    event = h11.EndOfMessage()  # trailers are not forwarded
                else:
                    raise broken("client", RuntimeError(f"unexpected {type(event).__name__} in a request body"))
                try:
                    await upstream.peer.send(event)
                except (FlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise broken("upstream lost", exc) from None
                if isinstance(event, h11.EndOfMessage):
                    body["done"] = True
                    return

        try:
            await upstream.peer.send(request)
        except (FlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._pool.discard(upstream)
            raise _Broken(f"upstream lost: {exc}", repeatable=True, head_lost=True) from None
        reusable = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_body)
                status = await self._relay_answer(client, upstream, answered, broken)
                if status == 101:
                    nursery.cancel_scope.cancel()
                elif not body["done"]:
                    # Answered before the whole body came: neither connection can carry another request.
                    reusable = False
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            self._pool.discard(upstream)
            broke, rest = group.split(_Broken)
            if broke is not None:
                raise broke.exceptions[0] from None
            raise
        except BaseException:
            self._pool.discard(upstream)
            raise
        if status == 101:
            await self._tunnel(client, upstream)
            return False
        if reusable and upstream.reusable():
            self._pool.put(upstream)
        else:
            self._pool.discard(upstream)
        return reusable

    async def _relay_answer(self, client: _Peer, upstream: _Upstream, answered: list[int], broken) -> int:
        """The upstream's answer, head and body, to the client; its status."""
        while True:
            try:
                event = await upstream.peer.next_event(before_waiting=client)
            except (h11.RemoteProtocolError, FlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise broken("the target's answer broke off", exc) from None
            if isinstance(event, h11.ConnectionClosed):
                raise broken("the target's answer broke off", EOFError("connection closed"))
            try:
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        answered.append(101)
                        self._answered(client, 101)
                        headers = _headers(event.headers, keep_upgrade=True) + [(b"connection", b"upgrade")]
                        await client.send(
                            h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason), flush=True
                        )
                        return 101
                    headers = _headers(event.headers)
                    await client.send(
                        h11.InformationalResponse(status_code=event.status_code, headers=headers, reason=event.reason),
                        flush=True,
                    )
                elif isinstance(event, h11.Response):
                    answered.append(event.status_code)
                    headers = _headers(event.headers)
                    if (_value(event.headers, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
                        headers.append((b"transfer-encoding", b"chunked"))
                    via = _value(event.headers, b"via")
                    headers = [(n, v) for n, v in headers if n != b"via"]
                    headers.append((b"via", via + b", " + self._via if via else self._via))
                    await client.send(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason))
                elif isinstance(event, h11.Data):
                    self._metrics.bytes_out += len(event.data)
                    await client.send(event)
                elif isinstance(event, h11.EndOfMessage):
                    self._answered(client, answered[-1])
                    await client.send(h11.EndOfMessage())
                    return answered[-1]
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Broken(f"client connection lost: {exc}") from None

    async def _tunnel(self, client: _Peer, upstream: _Upstream) -> None:
        """After 101: bytes both ways, as they are, until both ends close."""
        client_rest, _ = client.conn.trailing_data
        upstream_rest, _ = upstream.peer.conn.trailing_data
        client_end = SocketEnd(client.stream, "client")
        try:
            if client_rest:
                await upstream.end.send_all(bytes(client_rest))
            if upstream_rest:
                await client_end.send_all(bytes(upstream_rest))
            await relay(client_end, upstream.end)
        except (FlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("listener %s: tunnel ended: %s", self.config.name, exc)
        finally:
            self._router.release(upstream.hop)

    async def _answer(self, client: _Peer, status: int, text: str) -> bool:
        """A short answer of the listener's own; False: the connection closes after it."""
        (log.info if status >= 500 else log.debug)("listener %s: %d %s", self.config.name, status, text)
        body = f"{status} {text}\n".encode()
        if client.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Broken(f"cannot answer {status} mid-response: {text}")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"via", self._via),
        ]
        self._answered(client, status)
        try:
            await client.send(h11.Response(status_code=status, headers=headers))
            await client.send(h11.Data(data=body))
            await client.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            raise _Broken(f"client connection lost: {exc}") from None
        return False
