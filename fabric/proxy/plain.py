"""Plain HTTP/1.1 messages: the ones the HTTP listener's fast path reads in one call, and how.

A plain message is a keep-alive HTTP/1.1 request with no body or a
Content-Length one, or an answer with a Content-Length, whole in the bytes
at hand (http1.py says why such a path, and how it stays safe). `parse`
reads one or declines it (None): `_head.c` when it is built, else
`parse_python`, the same grammar in Python, giving the same results (the
tests compare the two on random heads). Setting FABRIC_PURE_PYTHON=1 in the
environment forces the Python one even when the module is built, so the
tests can run both ways on one build.

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
import re
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
# The environment variable that, set to anything but "" or "0", makes `parse` the Python one.
PURE_PYTHON = "FABRIC_PURE_PYTHON"
MAX_LENGTH_DIGITS = 15  # a longer Content-Length is left to llhttp, which checks it against 64 bits

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"  # RFC 9110, 5.6.2: a header name
_VCHAR = rb"\t\x20-\x7e\x80-\xff"  # RFC 9110, 5.5: field-vchar, SP and HTAB: a header value, a reason phrase
_PCHAR = rb"\-._~!$&'()*+,;=:@/?%0-9A-Za-z"  # RFC 3986: pchar, "/" and "?": an origin-form target
# A whole head (first line, header lines, blank line) in one match; possessive (*+): no backtracking.
_FIELDS = rb"((?:[%s]++:[ \t]*+[%s]*+\r\n)*+)\r\n" % (_TCHAR, _VCHAR)
_REQUEST_HEAD = re.compile(rb"(%s) (/[%s]*+) HTTP/1\.1\r\n" % (b"|".join(map(re.escape, METHODS)), _PCHAR) + _FIELDS)
_RESPONSE_HEAD = re.compile(rb"HTTP/1\.1 ([0-9]{3}) ([%s]*+)\r\n" % _VCHAR + _FIELDS)
_FIELD = re.compile(rb"([%s]+):[ \t]*([%s]*)\r\n" % (_TCHAR, _VCHAR))
_METHOD = {method: method for method in METHODS}  # every request's Head shares these
# What a header name read specially does (lower-case name -> one of these); a header of a length none
# of them has needs no lower().
_HOST, _CONNECTION, _LENGTH, _DECLINE, _SPECIAL = range(5)
_READ = {name: _SPECIAL for name in SPECIAL} | {name: _DECLINE for name in DECLINED}
_READ |= {b"host": _HOST, b"connection": _CONNECTION, b"content-length": _LENGTH}
_LENGTHS = frozenset(map(len, _READ))


def parse_python(data: bytes, start: int, request: bool, max_head: int) -> tuple | None:
    """The plain message that begins at data[start], if it is whole in `data`: (end of its head,
    Content-Length or -1, method or status, target or reason, headers, lines); its body is
    data[end of head : end of head + Content-Length]. `lines`: the header lines as a proxy passes
    them on (b"name: value\\r\\n" each, Connection left out) when none is in SPECIAL but Connection,
    else None. None when the message is not plain (see the module's docstring)."""
    if start < 0 or start > len(data) or max_head < 0:
        return None
    head = (_REQUEST_HEAD if request else _RESPONSE_HEAD).match(data, start, start + max_head)
    if head is None:
        return None
    if request:
        first: bytes | int = _METHOD[head[1]]
    else:
        first = int(head[1])
        if first < 200 or first > 599 or first == 204 or first == 304:
            return None
    headers = _FIELD.findall(data, head.start(3), head.end(3))
    hosts = 0
    length = -1
    plain = True
    connection = False
    for name, value in headers:
        if len(name) in _LENGTHS:
            read = _READ.get(name.lower())
            if read is None:
                continue
            if read == _HOST:
                hosts += 1
            elif read == _CONNECTION:
                if value.lower() != b"keep-alive":  # (trailing whitespace kept, as llhttp keeps it)
                    return None
                connection = True
            elif read == _LENGTH:
                if length >= 0 or len(value) > MAX_LENGTH_DIGITS or not value.isdigit():
                    return None
                length = int(value)
            elif read == _DECLINE:
                return None
            else:
                plain = False
    if (request and hosts != 1) or (not request and length < 0):  # (a request needs one Host, an answer a length)
        return None
    end = head.end()
    if length > len(data) - end:  # (the body is not whole)
        return None
    lines = None
    if plain:
        kept = [(n, v) for n, v in headers if len(n) != 10 or n.lower() != b"connection"] if connection else headers
        lines = b"\r\n".join(map(b": ".join, kept)) + b"\r\n" if kept else b""
    return end, length, first, head[2], headers, lines


def compiled() -> Callable[[bytes, int, bool, int], tuple | None] | None:
    """The compiled `parse` (_head.c), handed this module's lists; None when it is not built."""
    try:
        from . import _head
    except ImportError:
        return None
    _head.init(METHODS, SPECIAL, DECLINED)
    return _head.parse


parse = parse_python if os.environ.get(PURE_PYTHON, "") not in ("", "0") else compiled() or parse_python
