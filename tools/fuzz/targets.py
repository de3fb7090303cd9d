"""Fuzz targets: every place fabric parses bytes a peer (or a token's sender) chose.

Each target takes arbitrary bytes and returns normally when the parser took
them or refused them with its one documented error type; anything else it
raises is a finding. The same targets run under atheris (`python -m
tools.fuzz`) and under Hypothesis in the test suite (tests/unit/test_fuzz.py).

| target   | parser(s)                                                    | the one error type   |
| -------- | ------------------------------------------------------------ | -------------------- |
| frames   | FrameDecoder, fed in chunks                                  | FrameError           |
| payloads | decode_message_untrusted (HELLO, OPEN, REDEEM, REDEEM_OK), decode_u64/reason_untrusted | FrameError |
| hello    | read_hello_untrusted (any frame as the peer's first)         | LinkError            |
| gossip   | gossip decode_message_untrusted, then GossipEngine.receive   | ProtocolError (receive: none) |
| records  | decode_records_untrusted                                     | ProtocolError        |
| token    | Token.loads_untrusted                                        | TokenFormatError     |
| csr      | sign_csr (what the issuer does with a REDEEM's CSR)          | TokenError           |
| cert     | cert_site_id, cert_serial, check_issued_cert_untrusted, verify_signature_untrusted | ProtocolError / TokenError / none |
| link     | LinkProtocol.receive_data: what a peer sends on an established link | ProtocolError |
| http     | http1.Reader of requests, fed in chunks                      | HttpError (400, 431, 501, 505) |
| http-listener | an HTTP listener's client connection (a socket pair), a target answering 200 | none: it answers (200, or 400, 405, 431, 501, 505 with `connection: close`) or closes |
| http-fast | http1.Reader of requests or answers, its fast path (_head.c) on and off | none: both give the same events, and the same HttpError status |
"""

from __future__ import annotations

import functools
import json
import logging
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from fabric import pki
from fabric.config import Settings
from fabric.errors import (
    FrameError,
    LinkError,
    ProtocolError,
    TokenError,
    TokenFormatError,
)
from fabric.gossip import engine as gossip_engine
from fabric.gossip.records import SiteRecord, decode_records_untrusted, sign_record
from fabric.proxy import http1
from fabric.router import link as link_module
from fabric.router.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Open,
    Reason,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    decode_reason_untrusted,
    decode_u64_untrusted,
    encode_frame,
    encode_message,
    encode_u64,
)
from fabric.router.protocol import FlowOpened, FlowOverLimit, LinkProtocol

Target = Callable[[bytes], None]


# -- shared, made once per process ------------------------------------------------------------


@functools.cache
def identity(name: str = "fuzz") -> pki.Identity:
    """A site identity in a private temporary directory (key generation is slow: once)."""
    return pki.create_identity(Path(tempfile.mkdtemp(prefix=f"fabric-fuzz-{name}-")), name)


def _local_hello() -> Hello:
    return link_module.make_hello("a" * 32, "local", "interior", 1, Settings(), 1)


# -- targets -------------------------------------------------------------------------------------


def frames(data: bytes) -> None:
    """The first byte picks a chunk size; the rest is fed to a decoder in chunks of that size."""
    if not data:
        return
    step, data = data[0] + 1, data[1:]
    decoder = FrameDecoder()
    try:
        for pos in range(0, len(data), step):
            decoder.receive_data(data[pos : pos + step])
            for frame in decoder:
                assert isinstance(frame, Frame)
            # Bounded: at most one partial frame waits for more bytes.
            assert decoder.buffered < 12 + decoder._max_payload + step
    except FrameError:
        pass


_PAYLOAD_TYPES = (Hello, Open, Redeem, RedeemOk)


def payloads(data: bytes) -> None:
    for cls in _PAYLOAD_TYPES:
        try:
            message = decode_message_untrusted(data, cls)
        except FrameError:
            continue
        assert isinstance(message, cls)
        # What decodes must encode and decode to itself (nothing half-checked gets through).
        assert decode_message_untrusted(encode_message(message), cls) == message
    for decode in (decode_u64_untrusted, decode_reason_untrusted):
        try:
            decode(data)
        except FrameError:
            pass


def hello(data: bytes) -> None:
    """The first byte is the frame type; the rest its payload, as a peer's first frame."""
    if not data:
        return
    try:
        type_ = FrameType(data[0] % 15 or 1)
    except ValueError:
        return
    try:
        link_module.read_hello_untrusted(Frame(type_, 0, data[1:]), _local_hello())
    except LinkError:  # ProtocolError and FrameError included
        pass


@functools.cache
def _gossip_peer() -> pki.Identity:
    return identity("peer")


def _new_engine() -> gossip_engine.GossipEngine:
    me = identity()
    own = SiteRecord(site_id=me.site_id, name=me.name, incarnation=1, version=0, mode="interior")
    return gossip_engine.GossipEngine(
        own, sign=functools.partial(sign_record, identity=me), now=0.0, rng=random.Random(0)
    )


def gossip(data: bytes) -> None:
    try:
        message = gossip_engine.decode_message_untrusted(data)
    except ProtocolError:
        return
    engine = _new_engine()
    peer = _gossip_peer().site_id
    engine.link_up(peer, 0.0)
    # A hostile but well-formed message is the engine's to judge: it never raises.
    engine.receive(peer, message, 1.0)
    engine.tick(10.0)


def records(data: bytes) -> None:
    try:
        decode_records_untrusted(data)
    except ProtocolError:
        pass


def token(data: bytes) -> None:
    try:
        pki.Token.loads_untrusted(data.decode("utf-8", errors="replace"))
    except TokenFormatError:
        pass


def csr(data: bytes) -> None:
    try:
        pki.sign_csr(identity(), data)
    except TokenError:
        pass


def cert(data: bytes) -> None:
    for read in (pki.cert_site_id, pki.cert_serial):
        try:
            read(data)
        except ProtocolError:
            pass
    me = identity()
    try:
        pki.check_issued_cert_untrusted(me, data.decode("utf-8", errors="replace"), me.ca_cert_pem.decode())
    except TokenError:
        pass
    third = len(data) // 3
    result = pki.verify_signature_untrusted(data[:third], data[third : 2 * third], data[2 * third :])
    assert result is None or isinstance(result, str)


def link(data: bytes) -> None:
    """The first byte picks the role (dialer or not); the rest is what the peer sends on an established
    link, fed to the link protocol and answered as the router would. Only a protocol error may end it."""
    if not data:
        return
    settings = Settings(flow_window=4096, max_flows_per_link=8)
    protocol = LinkProtocol(
        dialer=bool(data[0] & 1), window=settings.flow_window, peer_window=settings.flow_window,
        max_flows=settings.max_flows_per_link, peer_name="peer",
    )
    try:
        for event in protocol.receive_data(data[1:]):
            if isinstance(event, FlowOpened):
                protocol.accept_flow(event.flow_id)
            elif isinstance(event, FlowOverLimit):
                protocol.refuse_flow(event.flow_id, Reason.FLOW_LIMIT, event.text)
    except ProtocolError:
        pass
    assert protocol.flow_count <= settings.max_flows_per_link


# -- the HTTP front -------------------------------------------------------------------------------

HTTP_ERROR_STATUSES = frozenset({400, 431, 501, 505})  # what http1.HttpError may say
# What an HTTP listener may answer a client with when its one provider's target answers every request 200.
LISTENER_STATUSES = frozenset({200, 405}) | HTTP_ERROR_STATUSES
HTTP_DEADLINE = 10  # seconds for one input through the listener: a hang is a finding


def http(data: bytes) -> None:
    """The first byte picks a chunk size; the rest is fed to a request Reader in chunks of that size.

    Events come in order (a Head, its body bytes, END; again), a head past
    MAX_HEAD is refused, and what the reader holds stays bounded."""
    if not data:
        return
    step, data = data[0] + 1, data[1:]
    reader = http1.Reader(http1.REQUEST)
    in_message = False
    try:
        for pos in range(0, len(data) + 1, step):
            reader.receive_data_untrusted(data[pos : pos + step])  # the last piece is b"": the client's EOF
            while (event := reader.next_event()) is not http1.NEED_DATA:
                if isinstance(event, http1.Head):
                    assert not in_message, "a head inside a message"
                    assert event.method and event.version in (b"1.0", b"1.1")
                    assert event.framing in (http1.NO_BODY, http1.LENGTH, http1.CHUNKED)
                    in_message = True
                elif event is http1.END:
                    assert in_message, "END outside a message"
                    in_message = False
                else:
                    assert isinstance(event, bytes) and in_message, "body bytes outside a message"
            if reader.switched:
                return
            assert reader._idle <= http1.MAX_HEAD + step, "more than a head and a read held"
    except http1.HttpError as exc:
        assert exc.status in HTTP_ERROR_STATUSES, exc.status


def http_fast(data: bytes) -> None:
    """The first byte picks requests or answers (its low bit) and a chunk size (the rest); the rest is read
    by three Readers in chunks of that size: with the fast path for plain messages, with it and
    `Reader.whole` tried on each chunk first (as the listener does), and with llhttp alone. They must
    read the same: the same messages, bodies, errors (by status) and state after. The fast path
    declines what it does not take whole, so it must never take what llhttp refuses or reads otherwise."""
    if not data:
        return
    kind = http1.RESPONSE if data[0] & 1 else http1.REQUEST
    step, data = (data[0] >> 1) + 1, data[1:]
    slow = _read_all(kind, data, step, fast=False)
    for whole in (False, True):
        fast = _read_all(kind, data, step, fast=True, whole=whole)
        assert fast == slow, f"the fast path (whole={whole}) read {fast!r}, llhttp {slow!r}"


def _read_all(kind: str, data: bytes, step: int, *, fast: bool, whole: bool = False) -> list:
    """What a Reader made of `data` fed in pieces of `step` bytes, then EOF: its events (a head as a
    tuple of its fields, body bytes joined), an error's status, and its state at the end. With
    `whole`: each piece is offered to `Reader.whole` first, and a message it takes is put down as
    its events would be."""
    reader = http1.Reader(kind, fast=fast)
    reader.expect_response(b"GET")
    got: list = []
    try:
        for pos in range(0, len(data) + 1, step):
            piece = data[pos : pos + step]
            message = reader.whole(piece) if whole else None
            if message is not None:
                head = http1.plain_head(message, kind == http1.REQUEST)
                got.append(tuple(getattr(head, name) for name in http1.Head.__slots__ if name != "lines"))
                if message[1] > 0:
                    got.append(piece[message[0] :])
                got.append(http1.END)
                continue
            reader.receive_data_untrusted(piece)
            while (event := reader.next_event()) is not http1.NEED_DATA:
                if isinstance(event, http1.Head):  # (but `lines`, which only the fast path gives)
                    got.append(tuple(getattr(event, name) for name in http1.Head.__slots__ if name != "lines"))
                elif type(event) is bytes and got and type(got[-1]) is bytes:
                    got[-1] += event  # (the fast path gives a body whole, llhttp as it was fed)
                else:
                    got.append(event)
            if reader.switched:
                break
    except http1.HttpError as exc:
        got.append(exc.status)
    got.append((reader.switched, reader.trailing, reader.keep_alive, reader.eof))
    return got


class _FakeTarget:
    """A flow to a target that answers every request it reads with 200 "ok" (it reads them with a Reader too).

    Its answers arrive as a link's reader delivers DATA: soon after, not within the call that sent the
    request, to the flow's sink if one is attached and nothing is queued, else queued for
    `receive_some` (then the sink waits until the queue was drained), so that the listener's sinks
    (`HttpListener._answer_in_sink`) are exercised as well as its tasks.
    """

    def __init__(self) -> None:
        self._requests = http1.Reader(http1.REQUEST)
        self._inbound: list[bytes] = []
        self._arrived = trio.Event()
        self._sink: Callable[[bytes], int] | None = None
        self._sink_held = False
        self.closed = False

    @property
    def quiet(self) -> bool:
        return not self._inbound and not self.closed

    def attach_sink(self, sink: Callable[[bytes], int] | None, at_eof: Callable[[], None] | None = None) -> None:
        self._sink = sink
        self._sink_held = bool(self._inbound)

    def on_failure(self, callback) -> None:
        pass  # (it never fails: the listener aborts it)

    def send_nowait(self, data: bytes, *, whole: bool = False) -> int:
        self._requests.receive_data_untrusted(bytes(data))
        try:
            while (event := self._requests.next_event()) is not http1.NEED_DATA:
                if isinstance(event, http1.Head):
                    # (to HEAD: a length of 0, so that the answers parse without knowing what was asked)
                    self._answer = b"0\r\n\r\n" if event.method == b"HEAD" else b"2\r\n\r\nok"
                elif event is http1.END:
                    answer = b"HTTP/1.1 200 OK\r\ncontent-length: " + self._answer
                    trio.lowlevel.current_trio_token().run_sync_soon(self._deliver, answer)
        except http1.HttpError as exc:  # the listener wrote a request its own reader refuses: a finding
            raise AssertionError(f"the listener forwarded a malformed request: {exc}") from None
        return len(data)

    def _deliver(self, answer: bytes) -> None:
        if self.closed:
            return
        if self._sink is not None and not self._sink_held:
            answer = answer[self._sink(answer) :]
            if not answer:
                return
            self._sink_held = True
        self._inbound.append(answer)
        self._arrived.set()

    async def send_all(self, data: bytes) -> None:
        self.send_nowait(data)
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._inbound:
            self._sink_held = False
            if self.closed:
                return b""
            await self._arrived.wait()
            self._arrived = trio.Event()
        return self._inbound.pop(0)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    def abort(self, code, text: str) -> None:
        self.closed = True
        self._arrived.set()

    async def aclose(self) -> None:
        self.abort(None, "closed")
        await trio.lowlevel.checkpoint()


class _FakeRouter:
    """What an HTTP listener asks of its router, with one provider whose flows are `_FakeTarget`s."""

    name = "fuzz"
    settings = Settings()

    def __init__(self) -> None:
        import collections

        self.outstanding: collections.Counter[str] = collections.Counter()

    def choose_provider(self, key, distribution, exclude=()):
        return None if "p" in exclude else "p"

    def providers(self, key):
        return ["p"]

    async def open_to(self, provider, key, tries):
        tries.take()
        await trio.lowlevel.checkpoint()
        return _FakeTarget(), None

    def release(self, hop) -> None:
        pass

    def using(self, provider):
        from fabric.router.router import Outstanding

        return Outstanding(self.outstanding, provider)

    def name_of(self, site) -> str:
        return site


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def http_listener(data: bytes) -> None:
    """The first byte picks a chunk size; the rest goes, in chunks of that size, to an HTTP listener's
    client handler over a socket pair, and the client half-closes. The listener must answer each
    request it read with a status it may give, and end the connection; it never logs a failure."""
    if not data:
        return
    step, data = data[0] + 1, data[1:]
    failures = _Failures()
    logger = logging.getLogger("fabric.proxy.http")
    logger.addHandler(failures)
    try:
        answer = trio.run(_through_listener, data, step)
    finally:
        logger.removeHandler(failures)
    assert not failures.records, failures.records[0].getMessage()
    responses = http1.Reader(http1.RESPONSE)
    responses.receive_data_untrusted(answer)
    responses.receive_data_untrusted(b"")
    closed = False
    try:
        while (event := responses.next_event()) is not http1.NEED_DATA:
            if isinstance(event, http1.Head):
                assert not closed, "an answer after one that closed the connection"
                assert event.status in LISTENER_STATUSES, event
                closed = event.get(b"connection") == b"close"
                assert closed or event.status == 200, f"{event.status} without connection: close"
    except http1.HttpError as exc:
        raise AssertionError(f"the listener's answer does not parse: {exc}: {answer[:200]!r}") from None


async def _through_listener(data: bytes, step: int) -> bytes:
    from fabric.config import ListenerConfig
    from fabric.proxy.http import HttpListener

    listener = HttpListener(ListenerConfig(name="web", routing_key="web", port=0, protocol="http"), _FakeRouter())
    ours, theirs = trio.socket.socketpair()  # no network; the listener reads and writes it as a client's socket
    client = trio.SocketStream(ours)
    answer = bytearray()
    with trio.fail_after(HTTP_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener._serve, trio.SocketStream(theirs))
            try:
                for pos in range(0, len(data), step):
                    await client.send_all(data[pos : pos + step])
                await client.send_eof()
            except trio.BrokenResourceError:
                pass  # the listener answered and closed before taking it all
            try:
                while chunk := await client.receive_some(65536):
                    answer += chunk
            except trio.BrokenResourceError:
                pass  # it reset the connection: allowed, after what it answered
            await client.aclose()
    return bytes(answer)


TARGETS: dict[str, Target] = {
    "frames": frames,
    "payloads": payloads,
    "hello": hello,
    "gossip": gossip,
    "records": records,
    "token": token,
    "csr": csr,
    "cert": cert,
    "link": link,
    "http": http,
    "http-listener": http_listener,
    "http-fast": http_fast,
}


# -- seeds: valid inputs the fuzzers start from --------------------------------------------------


def seeds(target: str) -> list[bytes]:
    """A few well-formed inputs for `target`, so mutation starts close to what parsers accept."""
    me = identity()
    peer = _gossip_peer()
    hello_msg = link_module.make_hello(peer.site_id, "peer", "interior", 1, Settings(), 1)
    open_msg = Open(dest=me.site_id, routing_key="db", origin=peer.site_id, flow_uid="u:1", hop_limit=8)
    tok, _ = pki.new_token(me, ["tls://127.0.0.1:7443"], now=0.0)
    record = sign_record(
        SiteRecord(site_id=peer.site_id, name="peer", incarnation=1, version=3, mode="interior"), peer
    )
    frame_stream = b"".join(
        [
            encode_frame(FrameType.HELLO, 0, encode_message(hello_msg)),
            encode_frame(FrameType.PING, 0, encode_u64(1)),
            encode_frame(FrameType.OPEN, 2, encode_message(open_msg)),
            encode_frame(FrameType.DATA, 2, b"hello"),
            encode_frame(FrameType.CREDIT, 2, encode_u64(1 << 20)),
            encode_frame(FrameType.CLOSE, 2),
            encode_frame(FrameType.RESET, 2, b"\x00\x07bye"),
        ]
    )
    if target == "frames":
        return [b"\x0f" + frame_stream, b"\x00" + frame_stream]
    if target == "payloads":
        redeem = Redeem(token_id=tok.token_id, secret=tok.secret, name="peer", csr_pem=pki.make_csr(peer).decode())
        return [encode_message(m) for m in (hello_msg, open_msg, redeem)]
    if target == "hello":
        return [bytes([FrameType.HELLO]) + encode_message(hello_msg), bytes([FrameType.GOAWAY]) + b"\x00\x0abad"]
    if target == "gossip":
        push = gossip_engine.Push((record,))
        summary = gossip_engine.Summary("0" * 32, 1)
        return [gossip_engine.encode_message(push), gossip_engine.encode_message(summary)]
    if target == "records":
        from fabric.gossip.records import encode_records

        return [encode_records([record])]
    if target == "token":
        return [tok.dumps().encode()]
    if target == "csr":
        return [pki.make_csr(peer)]
    if target == "cert":
        cert_pem, _ = pki.sign_csr(me, pki.make_csr(peer))
        return [pki.pem_to_der(cert_pem), cert_pem]
    if target == "link":
        return [b"\x00" + frame_stream[len(encode_frame(FrameType.HELLO, 0, encode_message(hello_msg))) :]]
    if target in ("http", "http-listener"):
        return [bytes([size]) + request for size in (255, 6) for request in HTTP_SEEDS]
    if target == "http-fast":
        return [bytes([size]) + request for size in (254, 6) for request in HTTP_SEEDS + PLAIN_REQUESTS] + [
            bytes([size]) + answer for size in (255, 7) for answer in PLAIN_ANSWERS
        ]
    return []


HTTP_SEEDS = (
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.0\r\nX-Forwarded-For: 10.0.0.1\r\nVia: 1.1 y\r\n\r\n",
)


# What the fast path takes (and what it must decline, a byte or two away).
PLAIN_REQUESTS = (
    b"GET /a/b?c=d&e=%20 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    b"POST /p HTTP/1.1\r\nhost: x\r\nconnection: Keep-Alive\r\ncontent-length: 2\r\nX-E:\t  a b \t\r\n\r\nok"
    b"DELETE /d HTTP/1.1\r\nHOST: x\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS /o HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PATCH /q HTTP/1.1\r\nHost: x\r\nContent-Length: 010\r\nProxy-Connection: keep-alive\r\n\r\n0123456789",
    b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-U: \xc3\xa9t\xc3\xa9\r\n\r\n",
)
PLAIN_ANSWERS = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 07:30:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 17\r\nConnection: keep-alive\r\n\r\nhello from nginx\n",
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\nHTTP/1.1 503 \r\nContent-Length: 3\r\nVia: 1.1 b\r\n\r\nbye",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\nuntil the end",
)


def seed_corpus(target: str) -> list[bytes]:
    """Seeds plus a JSON null and an empty input: the cheap edge cases."""
    return [*seeds(target), b"", b"null", json.dumps({}).encode()]
