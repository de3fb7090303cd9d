"""Plain HTTP/1.1 messages: the ones the HTTP listener's fast path reads in one call.

A plain message is a keep-alive HTTP/1.1 request with no body or a
Content-Length one, or an answer with a Content-Length, whole in the bytes
at hand (http1.py says why such a path, and how it stays safe). `parse`
reads one or declines it (None); it is the compiled module `_head.c`, and
None where that is not built: then llhttp reads every message, which is
also faster than the same grammar in Python would be. Setting
FABRIC_PURE_PYTHON=1 in the environment runs as if it were not built, so
the tests can run both ways on one build.

The lists the grammar rests on are defined here once and handed to the
compiled module at import (`_head.init`): the methods it takes, the headers
a proxy does not pass on as they came (SPECIAL: a message with one of them
gets no `lines`), and those that make it decline (DECLINED). Host,
Connection and Content-Length it reads itself: their values matter.

Declined: a head not whole in `data`, or over `max_head` bytes; a body not
whole in `data`; a method not in METHODS; a target other than an
origin-form path and query of plain characters; a version other than
HTTP/1.1; obsolete line folding, bare CR or LF, a header name or value
character outside RFC 9110's grammar; a header in DECLINED; a Connection
other than "keep-alive"; a Content-Length other than up to 15 digits, or
more than one; a request without exactly one Host; an answer without a
Content-Length, or with a status other than 200-599 (204 and 304 too: they
have no body whatever their headers say).
"""

from __future__ import annotations

import os
from collections.abc import Callable

# The methods a plain request has: the common ones, most common first (the compiled path tries them in turn).
METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
# RFC 9110, 7.6.1: these describe one connection, never forwarded as they are.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Headers the listener writes itself from what came (and its own part).
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via"})
# A plain message with one of these (but a `Connection: keep-alive`) gets no `lines`: the listener filters its headers.
SPECIAL = HOP_BY_HOP | FORWARDING
# Headers that change how llhttp frames or ends the message, or what follows it: left to llhttp.
DECLINED = frozenset({b"transfer-encoding", b"upgrade", b"proxy-connection"})
# The environment variable that, set to anything but "" or "0", leaves the compiled module unused.
PURE_PYTHON = "FABRIC_PURE_PYTHON"

# The plain message that begins at data[start], if it is whole in `data`: (end of its head, Content-Length
# or -1, method or status, target or reason, headers, lines); its body follows the head. `lines`: the
# header lines as a proxy passes them on (Connection left out) when none is in SPECIAL but Connection.
Parse = Callable[[bytes, int, bool, int], "tuple | None"]


def compiled() -> Parse | None:
    """The compiled `parse` (_head.c), handed this module's lists; None when it is not built."""
    try:
        from . import _head
    except ImportError:
        return None
    _head.init(METHODS, SPECIAL, DECLINED)
    return _head.parse


parse: Parse | None = None if os.environ.get(PURE_PYTHON, "") not in ("", "0") else compiled()
