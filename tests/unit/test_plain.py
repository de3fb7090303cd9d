"""The fast path's module (fabric/proxy/plain.py): what it takes and declines, the lists it hands to
`_head.c`, and how `parse` is chosen: the compiled one when built and not turned off, else none (llhttp
reads every message). test_http1.py checks the fast path against llhttp on random messages.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fabric.proxy import plain

COMPILED = plain.compiled()
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="fabric/proxy/_head.c is not built")

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
def test_it_takes_a_plain_message_and_declines_another(request_, wire, expected):
    assert COMPILED(wire, 0, request_, 1000) == expected


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
    """Which parse plain.py chose in a fresh interpreter with `env` (after `code`): "compiled" or "none"."""
    script = code + "from fabric.proxy import plain; print('none' if plain.parse is None else 'compiled')"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@needs_compiled
def test_the_compiled_path_is_chosen_when_built_unless_it_is_turned_off():
    assert _chosen({plain.PURE_PYTHON: ""}) == "compiled"
    assert _chosen({plain.PURE_PYTHON: "0"}) == "compiled"
    assert _chosen({plain.PURE_PYTHON: "1"}) == "none"


def test_no_fast_path_is_chosen_when_the_compiled_one_is_not_built():
    not_built = "import sys; sys.modules['fabric.proxy._head'] = None; "  # (its import fails)
    assert _chosen({plain.PURE_PYTHON: ""}, not_built) == "none"
