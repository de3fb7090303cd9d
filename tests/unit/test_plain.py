"""The fast path's two implementations (fabric/proxy/plain.py): compiled and Python give the same.

Hypothesis builds heads from the parts the grammar turns on, plain or a byte
off, and mutates them; each is read by `_head.c` and by `parse_python` from
a random start and under a random `max_head`, and the two results must be
equal, a decline included. (test_http1.py checks each against llhttp.) Then
how `parse` is chosen: the compiled one when built, else the Python one,
and the Python one whenever FABRIC_PURE_PYTHON says so.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.proxy import plain

COMPILED = plain.compiled()
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="fabric/proxy/_head.c is not built")

NAMES = [
    b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Connection", b"connection", b"X-A",
    b"Accept", b"Via", b"TE", b"Trailer", b"Keep-Alive", b"X-Forwarded-For", b"Forwarded", b"Upgrade",
    b"Transfer-Encoding", b"Proxy-Connection", b"Hosts", b"Content-Lengths", b"X A", b"", b"X:A",
]
VALUES = [
    b"x", b"keep-alive", b"Keep-Alive", b"keep-alive ", b"close", b"0", b"5", b"007", b"+5", b"5 ", b"",
    b"999999999999999", b"1000000000000000", b"0000000000000001", b"a\tb", b"\x80\xff", b"a\x00b", b"a\x7fb", b"chunked",
]
REQUEST_LINES = [
    b"GET / HTTP/1.1\r\n", b"POST /a?b=c HTTP/1.1\r\n", b"HEAD /%20 HTTP/1.1\r\n", b"TRACE /x HTTP/1.1\r\n",
    b"CONNECT x:1 HTTP/1.1\r\n", b"GET * HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"get / HTTP/1.1\r\n", b"GET /a b HTTP/1.1\r\n",
]
STATUS_LINES = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 599 \r\n", b"HTTP/1.1 204 No Content\r\n", b"HTTP/1.1 304 x\r\n", b"HTTP/1.1 199 x\r\n",
    b"HTTP/1.1 600 x\r\n", b"HTTP/1.1 200\r\n", b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 200 O\x80K\r\n",
]


def mostly(plain: bytes, others: list[bytes]) -> st.SearchStrategy[bytes]:
    """`plain` three times in four, else one of `others`."""
    return st.one_of(st.just(plain), st.just(plain), st.just(plain), st.sampled_from(others))


FIELD = st.tuples(
    st.sampled_from(NAMES),
    mostly(b": ", [b":", b":\t ", b" : "]),
    st.sampled_from(VALUES),
    mostly(b"\r\n", [b"\n", b"\r", b"\r\n "]),
).map(b"".join)


@st.composite
def messages(draw, request: bool) -> bytes:
    """A head of parts from the lists above, plain for the most part; a body and what follows; mutated at times."""
    first = draw(mostly(REQUEST_LINES[0], REQUEST_LINES) if request else mostly(STATUS_LINES[0], STATUS_LINES))
    needed = b"Host: x\r\n" if request else b"Content-Length: %d\r\n" % draw(st.integers(0, 8))
    fields = draw(st.lists(st.one_of(FIELD, st.just(b"X-A: b\r\n")), max_size=5))
    fields.insert(draw(st.integers(0, len(fields))), draw(mostly(needed, [b""])))
    blank = draw(mostly(b"\r\n", [b"\n", b""]))
    wire = first + b"".join(fields) + blank + draw(st.binary(max_size=12))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        pos = draw(st.integers(0, len(wire)))
        byte = bytes([draw(st.integers(0, 255))])
        wire = wire[:pos] + byte + wire[pos + draw(st.integers(0, 1)) :]
    return wire


@needs_compiled
@settings(max_examples=2000, deadline=None)
@given(
    prefix=st.binary(max_size=4),
    request=st.booleans(),
    max_head=st.one_of(st.integers(0, 120), st.just(32 * 1024), st.just(32 * 1024)),
    draws=st.data(),
)
def test_the_compiled_and_the_python_fast_path_read_every_head_the_same(prefix, request, max_head, draws):
    data = prefix + draws.draw(messages(request))
    assert COMPILED(data, len(prefix), request, max_head) == plain.parse_python(data, len(prefix), request, max_head)


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), start=st.integers(-2, 70), request=st.booleans(), max_head=st.integers(-1, 70))
def test_the_two_read_random_bytes_the_same(data, start, request, max_head):
    assert COMPILED(data, start, request, max_head) == plain.parse_python(data, start, request, max_head)


@needs_compiled
@pytest.mark.parametrize(
    "request_, wire, expected",
    [
        (True, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
         (52, -1, b"GET", b"/a", [(b"Host", b"x"), (b"Connection", b"keep-alive")], b"Host: x\r\n")),
        (True, b"PUT / HTTP/1.1\r\nhost: x\r\nVia: y\r\nContent-Length: 2\r\n\r\nokGET",
         (54, 2, b"PUT", b"/", [(b"host", b"x"), (b"Via", b"y"), (b"Content-Length", b"2")], None)),
        (False, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
         (45, 0, 404, b"Not Found", [(b"Content-Length", b"0")], b"Content-Length: 0\r\n")),
        (True, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n", None),
        (True, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nok", None),  # (the body is not whole)
        (False, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nx", None),
        (False, b"HTTP/1.1 200 OK\r\nContent-Length: 0000000000000001\r\n\r\nx", None),  # (16 digits)
        (False, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n", None),  # (no body whatever it says)
    ],
)
def test_both_take_a_plain_message_and_decline_another(request_, wire, expected):
    assert COMPILED(wire, 0, request_, 1000) == plain.parse_python(wire, 0, request_, 1000) == expected


@needs_compiled
@pytest.mark.parametrize("methods, special, declined", [
    ((b"GET", "POST"), (), ()),
    ((b"",), (), ()),
    ((b"GET",), (b"x" * 64,), ()),
    ((b"GET",), (), (b"",)),
    ((b"GET",), [b"x%d" % i for i in range(33)], ()),
])
def test_the_compiled_module_refuses_lists_it_cannot_hold(methods, special, declined):
    from fabric.proxy import _head

    try:
        with pytest.raises(ValueError):
            _head.init(methods, special, declined)
    finally:
        _head.init(plain.METHODS, plain.SPECIAL, plain.DECLINED)


def _chosen(env: dict[str, str], code: str = "") -> str:
    """Which parse plain.py chose in a fresh interpreter with `env` (after `code`): "compiled" or "python"."""
    script = code + "from fabric.proxy import plain; print('python' if plain.parse is plain.parse_python else 'compiled')"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@needs_compiled
def test_the_compiled_path_is_chosen_when_built_unless_the_python_one_is_asked_for():
    assert _chosen({plain.PURE_PYTHON: ""}) == "compiled"
    assert _chosen({plain.PURE_PYTHON: "0"}) == "compiled"
    assert _chosen({plain.PURE_PYTHON: "1"}) == "python"


def test_the_python_path_is_chosen_when_the_compiled_one_is_not_built():
    not_built = "import sys; sys.modules['fabric.proxy._head'] = None; "  # (its import fails)
    assert _chosen({plain.PURE_PYTHON: ""}, not_built) == "python"
