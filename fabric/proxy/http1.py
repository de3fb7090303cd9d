"""HTTP/1.1 messages without I/O: requests or responses read from untrusted bytes, heads written.

The HTTP listener's one way to parse: llhttp (Node's parser, in C, through
httptools), strict as it comes (no leniency is turned on), plus the checks it
leaves to its user; and in front of it a fast path (plain.py) for the plain
messages that nearly every exchange is made of: a keep-alive HTTP/1.1
request with no body or a Content-Length one, an answer with a
Content-Length, each whole in one read. It reads those in one call instead
of llhttp's dozen-odd Python callbacks, from a grammar stricter than
llhttp's, and declines anything else, which llhttp then reads as before: it
never refuses a message and never takes one that llhttp would refuse or read
otherwise (the tests and the `http-fast` fuzz target read every message both
ways and compare). The fast path is the compiled module `_head.c`; where it
is not built (or FABRIC_PURE_PYTHON=1), llhttp reads every message. It runs
only while llhttp is between messages with nothing of the next one read.
`Reader.whole` offers the same call on a read that is one plain message and
nothing else, and gives it back with no events made: the HTTP listener's
common request and answer go that way. A `Reader` takes bytes as they arrive
(`receive_data_untrusted`) and gives events, in order, from `next_event()`:

- a `Head` (request line or status line and headers, with what frames the body),
- body bytes (`bytes`, as they arrive; chunked bodies come unframed),
- `END` when a message is over (a 1xx response is a message of its own),
- `NEED_DATA` when it needs more bytes,
- and, past an upgrade (101, or a request that asks for one), nothing more:
  `switched` is set and `trailing` holds the bytes that are no longer HTTP.

A malformed message raises `HttpError` (the one error type), with the status
a server answers it with (400, 431, 501, 505), once the events before it have
been taken: a bad request pipelined behind a good one does not cost the good
one its answer. What is buffered is bounded: bytes that give no event (a head,
or trailers, still incomplete) past `max_head` are an error (431), so a peer
cannot make a reader hold more than `max_head` plus one read.

Why not h11, as the listener first was: per request the listener parses a
request and a response, and h11, in Python, takes many times llhttp's CPU
for the two: at the request rates the listener serves, h11 alone would need
most of a core. This module keeps h11's strictness where it
matters for request smuggling: Content-Length with Transfer-Encoding,
duplicate or malformed Content-Length, a Transfer-Encoding other than
`chunked`, bad chunk sizes and chunk framing, bare CR or LF, obsolete line
folding, and a missing or repeated Host are all refused.
"""

from __future__ import annotations

import collections

import httptools

from . import plain

MAX_HEAD = 32 * 1024  # bytes of request line + headers (or of trailers); past it: 431
REQUEST = "request"
RESPONSE = "response"


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Marker("NEED_DATA")
END = _Marker("END")

# How a message's body is delimited (Head.framing), RFC 9112 section 6.
NO_BODY = "no body"
LENGTH = "content-length"
CHUNKED = "chunked"
UNTIL_CLOSE = "until close"


class HttpError(Exception):
    """A message that is not HTTP/1.1 as this proxy takes it; `status`: the answer a server gives it."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


class Head:
    """A request's or a response's first line and headers, and what follows from them.

    `headers` keeps names as they came (for forwarding); lookups are by
    lower-case name (`get`). `framing` is one of NO_BODY, LENGTH, CHUNKED,
    UNTIL_CLOSE; `keep_alive` whether the connection may carry another
    message after this one, as far as this message says. `lines`, from the
    fast path only: the header lines as a proxy passes them on
    (b"name: value\r\n" each), when none of them is hop-by-hop or a
    forwarding one (`plain.SPECIAL`) but a `Connection: keep-alive`, which
    they leave out; else None.
    """

    __slots__ = (
        "method", "target", "status", "reason", "version", "headers", "framing", "keep_alive", "upgrade", "lines",
    )

    def __init__(
        self,
        method: bytes = b"",
        target: bytes = b"",
        status: int = 0,
        reason: bytes = b"",
        version: bytes = b"1.1",
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        framing: str = NO_BODY,
        keep_alive: bool = True,
        upgrade: bool = False,
        lines: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.lines = lines

    def __repr__(self) -> str:
        first = f"{self.method.decode()} {self.target.decode(errors='replace')}" if self.method else str(self.status)
        return f"<Head {first} HTTP/{self.version.decode()} {self.framing} headers={len(self.headers)}>"

    def get(self, name: bytes) -> bytes | None:
        """The value of a header by lower-case name, several joined by ", "; None if absent."""
        values = [v for n, v in self.headers if n.lower() == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else b", ".join(values)


class Reader:
    """Requests (`Reader(REQUEST)`: a server's side of a connection) or responses (`Reader(RESPONSE)`).

    For responses, call `expect_response(method)` before each request's
    answer is read: the answer to a HEAD has no body, and a 2xx to CONNECT
    is never read (the listener refuses CONNECT).
    """

    def __init__(self, kind: str, *, max_head: int = MAX_HEAD, fast: bool = True) -> None:
        self.kind = kind
        self.max_head = max_head
        self.fast = fast  # plain messages read by the fast path (False: llhttp reads all; the tests compare the two)
        self.switched = False  # an upgrade happened: what follows `trailing` is not HTTP
        self.trailing = b""
        self.eof = False
        self.keep_alive = True  # the last message's head allows another on the connection
        self._events: collections.deque = collections.deque()
        self._error: HttpError | None = None  # raised once the events before it are taken
        self._skip_body = False
        self._skipping = False  # reading the answer to a HEAD past its head: whatever comes is out of turn
        self._idle = 0  # bytes fed since the last event: a head or trailers still incomplete
        self._progress = False
        self._in_head = False
        self._check_size = False  # a head that completes in this feed may be over max_head: count it
        self._current: Head | None = None  # the message being read
        self._new_parser()

    def _new_parser(self) -> None:
        self._fresh = self.fast  # nothing fed to this llhttp yet: a plain message may skip it (_take_plain)
        self._headers: list[tuple[bytes, bytes]] = []  # of the head being read (then its trailers, dropped)
        self._first: list[bytes] = []  # the request target's or the reason phrase's pieces
        # llhttp's callbacks for these pieces are the list's own append: a Python call less per piece.
        self.on_url = self.on_status = self._first.append
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser
        if self.kind == REQUEST:
            self._parser = httptools.HttpRequestParser(self)
        else:
            self._parser = httptools.HttpResponseParser(self)

    def __repr__(self) -> str:
        return f"<Reader {self.kind} events={len(self._events)} switched={self.switched} eof={self.eof}>"

    def expect_response(self, method: bytes) -> None:
        self._skip_body = method == b"HEAD"

    # -- bytes in -----------------------------------------------------------------

    def receive_data_untrusted(self, data: bytes) -> None:
        """Parse `data` (b"": the peer closed); events queue up for `next_event`. Never raises:
        a malformed message becomes an HttpError that `next_event` raises in its turn."""
        if self._error is not None:
            return
        if self.switched:
            self.trailing += data
            return
        if not data:
            self._receive_eof()
            return
        if self._fresh and not self._skip_body:
            taken = self._take_plain(data)
            if taken:
                if taken == len(data):
                    return
                data = data[taken:]
        self._fresh = False
        self._progress = False
        self._check_size = self._idle + len(data) > self.max_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops at the end of a message that switches protocols: the rest is not HTTP.
            self.switched = True
            self.trailing = data[upgrade.args[0] :]
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HttpError):
                self._fail(exc.__context__)
                return
            self._fail(HttpError(f"malformed {self.kind}: {exc}"))
            return
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"malformed {self.kind}: {exc}"))
            return
        finally:
            if self._skipping:
                # The answer to a HEAD ended with its head; llhttp, which reads what the head says
                # follows, is done with. A new one for the next answer.
                self._skipping = False
                self._new_parser()
        if self._progress:
            self._idle = 0
            if self.fast and self.keep_alive and not (
                self._fresh or self._in_head or self._current is not None or data.endswith(b"\r")
            ):
                # llhttp is between messages, after one that allows another (after one that does not, it
                # refuses what follows), with nothing of the next read (not even an empty line's CR): a
                # new one is the same, and the next message may take the fast path.
                self._new_parser()
        else:
            self._idle += len(data)
            if self._idle > self.max_head:
                what = "head" if self._in_head or not self._events else "trailers"
                self._fail(HttpError(f"{self.kind} {what} over {self.max_head} bytes", 431))

    def whole(self, data: bytes) -> tuple | None:
        """`data` read, when it is one plain message and nothing else, with the reader between messages
        and nothing pending: the fast path's tuple (end of head, Content-Length or -1, method or status,
        target or reason, headers, lines); the reader is then as after that message's events were taken.
        None, with nothing read, for anything else: `receive_data_untrusted(data)` reads it.

        For a caller that handles the common message on its own, with no event: the same message
        as the events would give (the tests compare the two)."""
        parse = plain.parse
        if parse is None or not self._fresh or self._skip_body or self._events or self._error is not None:
            return None
        message = parse(data, 0, self.kind == REQUEST, self.max_head)
        if message is None or message[0] + (message[1] if message[1] > 0 else 0) != len(data):
            return None
        self.keep_alive = True
        self._idle = 0
        return message

    def _take_plain(self, data: bytes) -> int:
        """The plain messages at the start of `data`, read by the fast path (plain.parse) into events;
        how many bytes they took. It declines at the first that is not plain: llhttp reads the rest."""
        parse = plain.parse
        if parse is None:
            return 0
        request = self.kind == REQUEST
        events = self._events
        taken = 0
        size = len(data)
        while taken < size and (message := parse(data, taken, request, self.max_head)) is not None:
            events.append(plain_head(message, request))
            end, length = message[0], message[1]
            if length > 0:
                events.append(data[end : end + length])
                end += length
            events.append(END)
            taken = end
        if taken:
            self.keep_alive = True
            self._idle = 0
        return taken

    def _receive_eof(self) -> None:
        self.eof = True
        if self._in_head:
            self._fail(HttpError(f"connection closed in the middle of a {self.kind} head"))
        elif self._current is not None and self._current.framing == UNTIL_CLOSE:
            self._current = None
            self._events.append(END)  # llhttp would need llhttp_finish to say it; this is the same rule
        elif self._current is not None:
            self._fail(HttpError(f"connection closed in the middle of a {self.kind} body"))

    def _fail(self, error: HttpError) -> None:
        self._error = error
        self._in_head = False

    # -- events out -----------------------------------------------------------------

    def next_event(self):
        """The next event (see the module's docstring); raises HttpError at a malformed message."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def has_events(self) -> bool:
        return bool(self._events) or self._error is not None

    def reusable(self) -> bool:
        """After END: whether the connection may carry another message (nothing unasked-for came, nothing broke)."""
        return self.keep_alive and not (self._events or self._error or self.eof or self.switched or self._in_head)

    def resume(self) -> None:
        """An upgrade was asked for and refused (the answer was not 101): what followed is HTTP after all."""
        rest, self.trailing, self.switched = self.trailing, b"", False
        if rest:
            self.receive_data_untrusted(rest)

    # -- llhttp's callbacks (through httptools) ------------------------------------------
    # (on_url and on_status are a list's append: see _new_parser)

    def on_message_begin(self) -> None:
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress = True
        parser = self._parser
        headers = self._headers
        self._headers = []  # what comes now are trailers
        first = self._first[0] if len(self._first) == 1 else b"".join(self._first)
        self._first.clear()
        # Bytes fed since the last event bound the head; only a feed that could hold a longer one counts it.
        if self._check_size and len(first) + sum(len(n) + len(v) + 4 for n, v in headers) > self.max_head:
            raise HttpError(f"{self.kind} head over {self.max_head} bytes", 431)
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(f"HTTP/{version} is not served here", 505)
        length = chunked = False
        hosts = 0
        for name, value in headers:
            size = len(name)  # the names looked for are 4, 14 and 17 bytes long: most others need no lower()
            if size == 4:
                if name.lower() == b"host":
                    hosts += 1
            elif size == 14:
                if name.lower() == b"content-length":
                    length = True  # llhttp has checked it: digits only, once, and not with transfer-encoding
            elif size == 17 and name.lower() == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # llhttp takes "gzip, chunked"; a proxy that re-frames bodies must not drop a coding.
                    raise HttpError(f"transfer-encoding {value.decode(errors='replace')!r} is not supported", 501)
                chunked = True
        if isinstance(parser, httptools.HttpRequestParser):
            if hosts != 1 and (hosts or version == "1.1"):
                raise HttpError("an HTTP/1.1 request needs one Host header (RFC 9112, 3.2)")
            framing = CHUNKED if chunked else LENGTH if length else NO_BODY
            keep_alive = version == "1.1" and parser.should_keep_alive()
            head = Head(parser.get_method(), first, 0, b"", _VERSIONS[version], headers, framing, keep_alive, parser.should_upgrade())
        else:
            status = parser.get_status_code()
            if self._skip_body or status < 200 or status == 204 or status == 304:
                framing = NO_BODY
            else:
                framing = CHUNKED if chunked else LENGTH if length else UNTIL_CLOSE
            keep_alive = version == "1.1" and framing is not UNTIL_CLOSE and parser.should_keep_alive()
            head = Head(b"", b"", status, first, _VERSIONS[version], headers, framing, keep_alive, parser.should_upgrade())
        self._current = head
        self.keep_alive = keep_alive
        self._events.append(head)
        if self._skip_body and status >= 200:
            # The whole answer to a HEAD: what llhttp would read as its body is a server talking out of turn.
            self._skip_body = False
            self._skipping = True
            self._current = None
            self._events.append(END)

    def on_body(self, body: bytes) -> None:
        if self._skipping:
            self._fail(HttpError("bytes after the answer to a HEAD"))
            return
        self._progress = True
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._skipping:
            return  # (its END went with its head)
        self._progress = True
        self._current = None
        self._headers.clear()  # trailers: never forwarded
        self._events.append(END)


def plain_head(message: tuple, request: bool) -> Head:
    """The Head of a plain message, from the fast path's tuple (`Reader.whole`)."""
    _, length, first, second, headers, lines = message
    if request:
        return Head(first, second, 0, b"", b"1.1", headers, NO_BODY if length < 0 else LENGTH, True, False, lines)
    return Head(b"", b"", first, second, b"1.1", headers, LENGTH, True, False, lines)


# -- writing ------------------------------------------------------------------------------------------


def write_head(first_line: bytes, lines: list[bytes]) -> bytes:
    """A head on the wire: the first line and the header lines (b"name: value"; without CRLF), then the blank line."""
    return b"\r\n".join([first_line, *lines, b"", b""])


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never an empty one: that is the last chunk, LAST_CHUNK)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
