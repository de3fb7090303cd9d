"""The link codec: bytes <-> frames, with no I/O.

Every frame has one fixed, big-endian header:

    | version u8 | type u8 | flags u16 | flow id u32 | length u32 | payload |

`FrameDecoder` takes bytes as they arrive and hands back whole frames; it
never trusts the peer and raises only `FrameError`. Structured payloads
(HELLO, OPEN, REDEEM...) are JSON documents read by a private cattrs
converter; their `*_untrusted` readers also raise only `FrameError`.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from ..errors import FrameError
from ..names import brief, check_name

FRAME_VERSION = 1  # the header layout; the link protocol version is in HELLO
PROTOCOL_MIN = 1  # link protocol versions this code speaks (HELLO negotiates)
PROTOCOL_MAX = 1

HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12 bytes
MAX_PAYLOAD = 1024 * 1024  # bytes; a larger length ends the link (DATA chunks are far smaller)
MAX_FLOW_ID = 2**32 - 1
# A site's mode, carried in HELLO and in its gossiped record.
INTERIOR = "interior"  # routes transit traffic for other sites
EDGE = "edge"  # only originates and terminates flows; never transit
MODES = frozenset({INTERIOR, EDGE})
# A link's configured cost, as HELLO, site records, tokens and site.yaml carry
# it (JSON numbers). A signed 32-bit integer, so any peer's JSON reader holds
# it; routes sum costs as floats, exact far beyond any real path.
MAX_COST = 2**31 - 1
_U64 = struct.Struct("!Q")
_REASON = struct.Struct("!H")
MAX_REASON_TEXT = 1024  # bytes of UTF-8 in a RESET/OPEN_FAIL/GOAWAY reason


class FrameType(enum.IntEnum):
    HELLO = 1
    PING = 2
    PONG = 3
    GOSSIP = 4
    OPEN = 5
    OPEN_OK = 6
    OPEN_FAIL = 7
    DATA = 8
    CREDIT = 9
    CLOSE = 10
    RESET = 11
    GOAWAY = 12
    REDEEM = 13
    REDEEM_OK = 14


_FRAME_TYPES = frozenset(int(t) for t in FrameType)
_TYPES = {int(t): t for t in FrameType}  # a dict lookup is cheaper than FrameType(n) per frame


class Reason(enum.IntEnum):
    """Why a flow was refused or reset, or a link went away."""

    UNSPECIFIED = 0
    NO_ROUTE = 1  # no path to the destination site
    NO_CONNECTOR = 2  # the destination has no connector for the routing key
    DIAL_FAILED = 3  # the connector could not reach its target
    HOP_LIMIT = 4
    LINK_LOST = 5  # a link on the path broke
    SHUTDOWN = 6  # a site on the path is stopping
    ENDPOINT_RESET = 7  # the client or the target reset its connection
    PROTOCOL = 8
    FLOW_LIMIT = 9  # a link has as many flows as it allows
    VERSION = 10  # no common link protocol version
    NOT_AUTHORIZED = 11  # e.g. a site without a certificate tried to link
    TOKEN_FORGED = 12
    TOKEN_EXPIRED = 13
    TOKEN_SPENT = 14
    TOKEN_INVALID = 15
    DUPLICATE_LINK = 16
    EDGE_TO_EDGE = 17  # an edge site links only to interior sites


@attrs.frozen
class Frame:
    type: FrameType
    flow_id: int = 0
    payload: bytes = b""
    flags: int = 0


def encode_header(type: FrameType, flow_id: int, length: int, flags: int = 0) -> bytes:
    """The 12-byte header alone, so a writer can send a payload without copying it."""
    return HEADER.pack(FRAME_VERSION, type, flags, flow_id, length)


def encode_frame(type: FrameType, flow_id: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte maximum")
    return encode_header(type, flow_id, len(payload), flags) + payload


class FrameDecoder:
    """Turns a byte stream into frames. Feed with `receive_data`, drain with iteration.

    Memory is bounded: at most one partial frame (header + `max_payload`) is
    held between calls, beyond what the caller fed in one go.

    Bytes fed while nothing is held are read in place, not copied into a
    buffer: a read that holds whole frames (the usual case on a busy link)
    costs one slice per payload and nothing else.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._max_payload = max_payload

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos >= len(self._buf):
            # Nothing held: read the caller's bytes where they are (bytes are immutable, so safe to keep).
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if type(self._buf) is not bytearray:
            self._buf = bytearray(memoryview(self._buf)[self._pos :])
        elif self._pos:
            del self._buf[: self._pos]
        self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive. Raises `FrameError`."""
        fields = self.next_fields()
        if fields is None:
            return None
        type_, flags, flow_id, payload = fields
        return Frame(_TYPES[type_], flow_id, payload, flags)

    def next_fields(self) -> tuple[int, int, int, bytes] | None:
        """`next_frame` as plain values (type, flags, flow id, payload): what a link's reader uses per frame.

        The type is one of `FrameType`'s values. Raises `FrameError`.
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        version, type_, flags, flow_id, length = HEADER.unpack_from(buf, pos)
        if version != FRAME_VERSION:
            raise FrameError(f"unsupported frame version {version} (this site reads {FRAME_VERSION})")
        if type_ not in _FRAME_TYPES:
            raise FrameError(f"unknown frame type {type_}")
        if length > self._max_payload:
            raise FrameError(f"frame length {length} is over the {self._max_payload}-byte maximum")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        payload = buf[pos + HEADER_SIZE : end] if type(buf) is bytes else bytes(memoryview(buf)[pos + HEADER_SIZE : end])
        self._pos = end
        return type_, flags, flow_id, payload

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


# -- fixed-layout payloads -------------------------------------------------


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64_untrusted(payload: bytes) -> int:
    if len(payload) != _U64.size:
        raise FrameError(f"expected an 8-byte payload, got {len(payload)} bytes")
    return _U64.unpack(payload)[0]


def encode_reason(code: Reason | int, text: str) -> bytes:
    raw = text.encode("utf-8")[:MAX_REASON_TEXT]
    return _REASON.pack(code) + raw


def decode_reason_untrusted(payload: bytes) -> tuple[int, str]:
    """(code, text) of a RESET, OPEN_FAIL or GOAWAY. Unknown codes pass through as ints."""
    if len(payload) < _REASON.size:
        raise FrameError("reason payload is shorter than its 2-byte code")
    (code,) = _REASON.unpack_from(payload)
    text = payload[_REASON.size : _REASON.size + MAX_REASON_TEXT].decode("utf-8", errors="replace")
    return code, text


# -- structured payloads (JSON through a private converter) ----------------

MAX_NAME = 255  # characters in a site name, site id or routing key on the wire


def _short_str(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ValueError(f"{attribute.name} must be a string of at most {MAX_NAME} characters")


def _name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    check_name(value, attribute.name)


def _non_negative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer")


def check_mode(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator of a site mode (HELLO, site records, site.yaml)."""
    if value not in MODES:
        raise ValueError(f"{attribute.name} must be one of {sorted(MODES)}, not {brief(value)}")


def check_cost(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator of a configured link cost (tokens, site.yaml): 1 to MAX_COST."""
    if type(value) is not int or not 1 <= value <= MAX_COST:
        raise ValueError(f"{attribute.name} must be an integer from 1 to {MAX_COST}")


def _advertised_cost(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # The accepting end advertises 0: the dialer's cost is the link's.
    if type(value) is not int or not 0 <= value <= MAX_COST:
        raise ValueError(f"{attribute.name} must be an integer from 0 to {MAX_COST}")


@attrs.frozen
class Hello:
    """First frame each way on a link: who I am and what I speak."""

    min_version: int = attrs.field(validator=_non_negative_int)
    max_version: int = attrs.field(validator=_non_negative_int)
    site_id: str = attrs.field(validator=_short_str)
    name: str = attrs.field(validator=_name)
    mode: str = attrs.field(validator=check_mode)
    incarnation: int = attrs.field(validator=_non_negative_int)
    flow_window: int = attrs.field(validator=_non_negative_int)  # bytes of credit each new flow starts with
    cost: int = attrs.field(validator=_advertised_cost)  # the dialer's configured link cost; both ends advertise it


@attrs.frozen
class Open:
    """Open a flow toward `dest` for `routing_key`; forwarded hop by hop."""

    dest: str = attrs.field(validator=_short_str)
    routing_key: str = attrs.field(validator=_name)
    origin: str = attrs.field(validator=_short_str)
    flow_uid: str = attrs.field(validator=_short_str)  # identity of the flow end to end
    hop_limit: int = attrs.field(validator=_non_negative_int)


@attrs.frozen
class Redeem:
    """A site without a certificate asks the issuer to sign its CSR."""

    token_id: str = attrs.field(validator=_short_str)
    secret: str = attrs.field(validator=_short_str)
    name: str = attrs.field(validator=_name)
    csr_pem: str = attrs.field(validator=attrs.validators.max_len(16384))
    mode: str = attrs.field(default=INTERIOR, validator=check_mode)  # of the redeeming site: edges link only to interiors


@attrs.frozen
class RedeemOk:
    cert_pem: str
    issuer_id: str
    issuer_name: str = attrs.field(validator=_name)


_converter = make_converter(forbid_extra_keys=False)  # unknown keys: newer peers may add fields
_T = TypeVar("_T", bound=attrs.AttrsInstance)


def encode_message(message: Any) -> bytes:
    return json.dumps(_converter.unstructure(message), separators=(",", ":")).encode()


def decode_message_untrusted(payload: bytes, cls: type[_T]) -> _T:
    """Read a structured payload; anything malformed is a `FrameError` naming the message."""
    try:
        raw = json.loads(payload)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        # Strict types: cattrs would turn "1" into 1, so check before structuring.
        for field in attrs.fields(cls):
            if field.name in raw and field.type in (int, "int") and type(raw[field.name]) is not int:
                raise ValueError(f"{field.name} must be an integer")
            if field.name in raw and field.type in (str, "str") and not isinstance(raw[field.name], str):
                raise ValueError(f"{field.name} must be a string")
        return _converter.structure(raw, cls)
    except (ValueError, TypeError, KeyError, RecursionError, cattrs.BaseValidationError) as exc:
        raise FrameError(f"malformed {cls.__name__.upper()} payload: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        leaves = [e for e in exc.exceptions]
        while leaves and isinstance(leaves[0], cattrs.BaseValidationError):
            leaves = list(leaves[0].exceptions)
        if leaves:
            return str(leaves[0]) or type(leaves[0]).__name__
    return str(exc) or type(exc).__name__
