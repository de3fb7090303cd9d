"""Site records: what each site tells the network about itself, and how they merge.

Pure: no I/O, no trio. `gossip.py` moves these records over links; this module
decides which record wins, summarises a table for anti-entropy, and turns
records into bytes and back. Bytes from a peer are never trusted:
`decode_records_untrusted` checks every field and raises only `ProtocolError`,
so a bad peer costs its link and nothing else.

Validation lives on the attrs classes themselves, so a record built locally
obeys the same rules a peer's record is held to: a site can never flood a
record its neighbours would refuse.

Records are signed by the site they describe (`sign_record`): the record
carries the site's public key, the site id is that key's digest
(`pki.site_id_of`), and the signature covers every other field
(`signing_bytes`). `verify_record` checks both, so no site can rewrite
another site's services or links, and a relay cannot alter what it passes on.
"""

import base64
import binascii
import json
import math
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.gen import make_dict_structure_fn
from cattrs.preconf.json import JsonConverter, make_converter

from .. import pki
from ..errors import ProtocolError
from ..names import check_name
from ..router.frames import MAX_COST, check_mode

__all__ = [
    "MAX_COUNTER",
    "MAX_KEY_TEXT",
    "MAX_LINKS",
    "MAX_RECORDS",
    "MAX_RECORD_BYTES",
    "MAX_SERVICES",
    "MAX_SIGNATURE_TEXT",
    "MAX_TEXT",
    "SIGNING_CONTEXT",
    "LinkInfo",
    "RecordTable",
    "ServiceInfo",
    "SiteRecord",
    "Stamp",
    "decode_records_untrusted",
    "encode_record",
    "encode_record_batches",
    "encode_records",
    "parse_json_untrusted",
    "record_from_json_untrusted",
    "record_to_json",
    "sign_record",
    "signing_bytes",
    "verify_record",
    "why_unverified",
]


# Limits on what one gossip payload may hold. They bound the work and memory a
# peer can cause before the payload is refused; the frame codec's length limit
# bounds the bytes.
MAX_RECORDS = 4096  # records per payload: a network of this many sites fits in one push
MAX_LINKS = 1024  # links per site: far above any real mesh, small enough to stay cheap
MAX_SERVICES = 4096  # routing keys advertised by one site
MAX_TEXT = 255  # characters in a site id, name, routing key or protocol (a DNS-label-ish bound)
# Incarnation, version, connector count. 2**53 - 1 is the largest integer every
# JSON reader holds exactly (JavaScript, or any parser that reads numbers as
# doubles), and a version raised a million times a second takes 285 years to
# get there: a larger one is absurd, not just big, and is refused.
MAX_COUNTER = 2**53 - 1
MAX_PORT = 65535  # TCP port numbers
# One record, as compact JSON with its signature. Half a frame (MAX_PAYLOAD of
# the link codec is 1 MiB), so any record fits a push with room for the
# envelope; a site with 4096 services of ~100 bytes each still fits.
MAX_RECORD_BYTES = 512 * 1024
# Base64 text of a public key (SubjectPublicKeyInfo DER) and of a signature.
MAX_KEY_TEXT = 4 * math.ceil(pki.MAX_PUBLIC_KEY_DER / 3)
MAX_SIGNATURE_TEXT = 4 * math.ceil(pki.MAX_SIGNATURE / 3)
# What a signature covers starts with this, so a record signature can never be
# replayed as a signature of anything else the site key signs.
SIGNING_CONTEXT = b"fabric site record v1\n"

Stamp = tuple[int, int]
"""(incarnation, version): the order in which one site's records supersede each other."""


# -- validators ---------------------------------------------------------------
# Strict on purpose: JSON gives us str/int/float/bool/None/list/dict, and a bool
# is an int to Python, so `isinstance(x, int)` alone would let `true` through.

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text() -> _Validator:
    def check(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name} must be a string, not {_json_type(value)}")
        if not value:
            raise ValueError(f"{attribute.name} must not be empty")
        if len(value) > MAX_TEXT:
            raise ValueError(f"{attribute.name} is longer than {MAX_TEXT} characters")
        try:
            # JSON escapes can smuggle in lone surrogates, which would blow up
            # later when the record is forwarded, logged or printed.
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{attribute.name} is not valid Unicode text") from None

    return check


def _name(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
    check_name(value, attribute.name)


def _integer(low: int, high: int) -> _Validator:
    def check(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if not _is_int(value):
            raise TypeError(f"{attribute.name} must be an integer, not {_json_type(value)}")
        assert isinstance(value, int)
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be in [{low}, {high}], got {value}")

    return check


def _optional(check: _Validator) -> _Validator:
    def optional(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if value is not None:
            check(instance, attribute, value)

    return optional


def _seconds(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
    if not isinstance(value, float):
        raise TypeError(f"{attribute.name} must be a number, not {_json_type(value)}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value}")


_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def _base64_text(limit: int) -> _Validator:
    """Standard base64 with padding, or empty (an unsigned record)."""

    def check(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name} must be a string, not {_json_type(value)}")
        if len(value) > limit:
            raise ValueError(f"{attribute.name} is longer than {limit} characters")
        if not _BASE64.fullmatch(value):
            raise ValueError(f"{attribute.name} is not base64")

    return check


def _int_to_float(value: object) -> object:
    """Let JSON's `0` stand for `0.0`; anything else is left for the validator to judge."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _tuple_of(item_type: type, limit: int) -> _Validator:
    def check(instance: object, attribute: "attrs.Attribute[Any]", value: object) -> None:
        if not isinstance(value, tuple):
            raise TypeError(f"{attribute.name} must be a tuple, not {type(value).__name__}")
        if len(value) > limit:
            raise ValueError(f"{attribute.name} has more than {limit} entries")
        for item in value:
            if not isinstance(item, item_type):
                raise TypeError(f"{attribute.name} must hold {item_type.__name__}, not {type(item).__name__}")

    return check


def _json_type(value: object) -> str:
    """Name a value the way a peer author would: by its JSON type."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -- records ------------------------------------------------------------------


@attrs.frozen
class LinkInfo:
    """One link a site advertises. It counts for routing only if the peer advertises it back."""

    peer: str = attrs.field(validator=_text())  # site id at the other end
    cost: int = attrs.field(validator=_integer(0, MAX_COST))  # configured cost; routing treats < 1 as 1
    rtt: float | None = attrs.field(  # seconds, smoothed; None until measured
        default=None, converter=_int_to_float, validator=_optional(_seconds)
    )


@attrs.frozen
class ServiceInfo:
    """A routing key this site can serve, i.e. has connectors for."""

    routing_key: str = attrs.field(validator=_name)
    protocol: str = attrs.field(default="tcp", validator=_text())  # free text, so new protocols need no wire change
    port: int | None = attrs.field(default=None, validator=_optional(_integer(1, MAX_PORT)))  # hint for auto-listeners
    connectors: int = attrs.field(default=1, validator=_integer(0, MAX_COUNTER))


@attrs.frozen
class SiteRecord:
    """Everything one site says about itself. Only that site issues new versions of it."""

    site_id: str = attrs.field(validator=_text())
    name: str = attrs.field(validator=_name)
    incarnation: int = attrs.field(validator=_integer(0, MAX_COUNTER))  # raised at every start
    version: int = attrs.field(validator=_integer(0, MAX_COUNTER))  # raised at every change
    mode: str = attrs.field(validator=check_mode)  # INTERIOR or EDGE
    links: tuple[LinkInfo, ...] = attrs.field(default=(), validator=_tuple_of(LinkInfo, MAX_LINKS))
    services: tuple[ServiceInfo, ...] = attrs.field(default=(), validator=_tuple_of(ServiceInfo, MAX_SERVICES))
    # Base64 SubjectPublicKeyInfo DER of the site key, whose digest is site_id,
    # and the site's signature of `signing_bytes(self)`. Empty until signed:
    # `sign_record` fills both, `verify_record` checks both.
    public_key: str = attrs.field(default="", repr=False, validator=_base64_text(MAX_KEY_TEXT))
    signature: str = attrs.field(default="", repr=False, validator=_base64_text(MAX_SIGNATURE_TEXT))

    @property
    def stamp(self) -> Stamp:
        """(incarnation, version): a restart outranks every version of the previous run."""
        return (self.incarnation, self.version)

    def is_newer_than(self, other: "SiteRecord | None") -> bool:
        """True if this record supersedes `other` (another record of the same site, or nothing).

        Equal stamps are not newer, so a record seen twice is forwarded once.
        """
        if other is None:
            return True
        if other.site_id != self.site_id:
            raise ValueError(f"cannot order records of different sites ({self.site_id!r}, {other.site_id!r})")
        return self.stamp > other.stamp


class RecordTable:
    """The newest record known for each site: the merge rule of gossip, without the I/O.

    `apply` is idempotent and order-insensitive (the newest stamp wins), so any
    interleaving of floods and anti-entropy pulls ends in the same table.
    """

    def __init__(self, records: Iterable[SiteRecord] = ()) -> None:
        self._records: dict[str, SiteRecord] = {}
        for record in records:
            self.apply(record)

    def apply(self, record: SiteRecord) -> bool:
        """Keep `record` if it is newer than what is held; True means "changed, pass it on"."""
        if not record.is_newer_than(self._records.get(record.site_id)):
            return False
        self._records[record.site_id] = record
        return True

    def get(self, site_id: str) -> SiteRecord | None:
        return self._records.get(site_id)

    def remove(self, site_id: str) -> SiteRecord | None:
        """Forget a site (purge). Returns what was held, or None.

        A purged record that is still flooding somewhere will be accepted again:
        the caller decides when a site is gone for good.
        """
        return self._records.pop(site_id, None)

    @property
    def records(self) -> Mapping[str, SiteRecord]:
        """A read-only live view by site id, e.g. for `compute_routes`."""
        return MappingProxyType(self._records)

    def values(self) -> list[SiteRecord]:
        return list(self._records.values())

    def __iter__(self) -> Iterator[SiteRecord]:
        return iter(self.values())  # a snapshot, so callers may apply() while iterating

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, site_id: object) -> bool:
        return site_id in self._records

    def digest(self) -> dict[str, Stamp]:
        """Site id -> stamp of what is held: the summary neighbours swap in anti-entropy."""
        return {site_id: record.stamp for site_id, record in self._records.items()}

    def __repr__(self) -> str:
        held = ", ".join(f"{r.site_id}@{r.incarnation}.{r.version}" for _, r in sorted(self._records.items()))
        return f"<RecordTable {len(self)} sites: {held}>"


# -- wire encoding --------------------------------------------------------------

# Caps on lists checked before they are structured, so an oversized list is
# refused before any per-item work. The attrs validators check the same limits.
_MAX_ITEMS: dict[type, int] = {LinkInfo: MAX_LINKS, ServiceInfo: MAX_SERVICES}

# How many individual problems an error message lists before it summarises.
_MAX_REPORTED_ERRORS = 3


def _passthrough(value: Any, _type: Any) -> Any:
    """Hand JSON scalars to the attrs validators untouched.

    cattrs would otherwise coerce (`"7"` -> 7, `true` -> 1, `1.9` -> 1), which
    is right for config files and wrong for a peer's bytes.
    """
    return value


def _is_homogenous_tuple(type_: Any) -> bool:
    args = typing.get_args(type_)
    return typing.get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _make_converter() -> JsonConverter:
    converter = make_converter(
        detailed_validation=True,  # errors carry a path ($[3].links[0].cost) for the message
        # Unknown keys are refused: a signed record is checked over the fields
        # we know, so an unknown one would travel unsigned and unchecked. A
        # new field needs a new protocol version (HELLO negotiates it).
        forbid_extra_keys=True,
    )
    for scalar in (str, int, float, int | None, float | None):
        converter.register_structure_hook(scalar, _passthrough)

    def strict_tuple(type_: Any) -> Callable[[Any, Any], Any]:
        structure_items = homogenous_tuple_structure_factory(type_, converter)
        item_type = typing.get_args(type_)[0]
        limit = _MAX_ITEMS[item_type]

        def structure(value: Any, _type: Any) -> Any:
            # cattrs would accept any iterable: a string, or an object's keys.
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {_json_type(value)}")
            if len(value) > limit:
                raise ValueError(f"more than {limit} entries")
            return structure_items(value, type_)

        return structure

    def strict_class(cls: Any) -> Callable[[Any, Any], Any]:
        structure_fields = make_dict_structure_fn(cls, converter)

        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {_json_type(value)}")
            return structure_fields(value, cls)

        return structure

    converter.register_structure_hook_factory(_is_homogenous_tuple, strict_tuple)
    converter.register_structure_hook_factory(attrs.has, strict_class)
    return converter


_converter = _make_converter()


def _dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys
    ).encode("utf-8")


def record_to_json(record: SiteRecord) -> dict[str, Any]:
    """A record as a JSON-ready dict (a fresh one each call): the wire form of one record."""
    return _converter.unstructure(record, SiteRecord)


def encode_record(record: SiteRecord) -> bytes:
    """One record as compact UTF-8 JSON; its length is what MAX_RECORD_BYTES limits."""
    return _dumps(record_to_json(record))


def encode_records(records: Iterable[SiteRecord]) -> bytes:
    """Records as a UTF-8 JSON list, the GOSSIP frame payload.

    Raises ValueError past MAX_RECORDS: peers would refuse the payload, so the
    caller must split it.
    """
    batch = list(records)
    if len(batch) > MAX_RECORDS:
        raise ValueError(f"{len(batch)} records in one payload; the limit is {MAX_RECORDS}")
    return _dumps(_converter.unstructure(batch, list[SiteRecord]))


def encode_record_batches(records: Iterable[SiteRecord], max_bytes: int) -> Iterator[bytes]:
    """Records as as many GOSSIP payloads as it takes, each under `max_bytes` and MAX_RECORDS."""
    parts: list[bytes] = []
    size = 2  # the list's brackets
    for record in records:
        part = encode_records([record])[1:-1]
        if parts and (size + len(part) + 1 > max_bytes or len(parts) == MAX_RECORDS):
            yield b"[" + b",".join(parts) + b"]"
            parts, size = [], 2
        parts.append(part)
        size += len(part) + 1
    if parts:
        yield b"[" + b",".join(parts) + b"]"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _describe(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        names = ", ".join(repr(name[:MAX_TEXT]) for name in sorted(exc.extra_fields)[:_MAX_REPORTED_ERRORS])
        more = len(exc.extra_fields) - _MAX_REPORTED_ERRORS
        return f"unknown field {names}" + (f" and {more} more" if more > 0 else "")
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "missing field"
    return str(exc) or type(exc).__name__


def _malformed(why: str) -> ProtocolError:
    return ProtocolError(f"malformed gossip payload: {why}")


def parse_json_untrusted(data: bytes) -> Any:
    """Bytes from a peer as a JSON value. Raises ProtocolError, and only that."""
    try:
        return json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity and oversized integers.
        raise _malformed(f"not UTF-8 JSON ({type(exc).__name__}: {exc})") from exc


def _structure_untrusted(raw: Any, type_: Any, path: str) -> Any:
    try:
        return _converter.structure(raw, type_)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError, AttributeError) as exc:
        # Detailed validation gathers item errors into a BaseValidationError;
        # the bare types guard the promise of "ProtocolError only" if it ever doesn't.
        problems = cattrs.transform_error(exc, path=path, format_exception=_describe)
        why = "; ".join(problems[:_MAX_REPORTED_ERRORS])
        if len(problems) > _MAX_REPORTED_ERRORS:
            why += f"; and {len(problems) - _MAX_REPORTED_ERRORS} more"
        raise _malformed(why) from exc


def _check_record_size(raw: Any, path: str) -> None:
    """Refuse a record whose JSON is over MAX_RECORD_BYTES, before any per-field work."""
    try:
        # Measured as the sender's encoder writes it (compact, UTF-8), which
        # for a record we encoded is byte for byte what encode_record gives.
        size = len(json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError) as exc:  # pragma: no cover - json.loads output always dumps
        raise _malformed(f"record does not re-encode ({exc}) @ {path}") from exc
    if size > MAX_RECORD_BYTES:
        raise _malformed(f"record is {size} bytes; the limit is {MAX_RECORD_BYTES} @ {path}")


def record_from_json_untrusted(raw: Any, path: str = "$") -> SiteRecord:
    """One record from a peer, already parsed from JSON. Raises ProtocolError, and only that.

    `path` names where the record sat in its payload, for the error message.
    The signature is not checked here (see `verify_record`): only the shape.
    """
    _check_record_size(raw, path)
    return _structure_untrusted(raw, SiteRecord, path)


def decode_records_untrusted(data: bytes) -> list[SiteRecord]:
    """Records from a peer's GOSSIP payload. Raises ProtocolError, and only that, if anything is off."""
    raw = parse_json_untrusted(data)
    if not isinstance(raw, list):
        raise _malformed(f"expected a list of records, got {_json_type(raw)}")
    if len(raw) > MAX_RECORDS:
        raise _malformed(f"{len(raw)} records; the limit is {MAX_RECORDS}")
    for index, item in enumerate(raw):
        _check_record_size(item, f"$[{index}]")
    return _structure_untrusted(raw, list[SiteRecord], "$")


# -- signatures -------------------------------------------------------------------


def signing_bytes(record: SiteRecord) -> bytes:
    """What a record's signature covers: every field but the signature, canonically.

    Canonical means sorted keys and compact separators, after SIGNING_CONTEXT,
    so the signer and every verifier produce the same bytes from the same
    fields whatever order a peer's JSON had them in.
    """
    raw = record_to_json(record)
    del raw["signature"]
    return SIGNING_CONTEXT + _dumps(raw, sort_keys=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sign_record(record: SiteRecord, identity: "pki.Identity") -> SiteRecord:
    """`record` with the site's public key and its signature; only the site's own identity may sign it.

    Raises ValueError for a record of another site, or one peers would refuse
    as oversized (over MAX_RECORD_BYTES once signed).
    """
    if record.site_id != identity.site_id:
        raise ValueError(f"site {identity.site_id} cannot sign a record of site {record.site_id}")
    unsigned = attrs.evolve(record, public_key=_b64(pki.public_key_der(identity)), signature="")
    signed = attrs.evolve(unsigned, signature=_b64(pki.sign(identity, signing_bytes(unsigned))))
    size = len(encode_record(signed))
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"record of site {record.site_id} is {size} bytes signed; the limit is {MAX_RECORD_BYTES}")
    return signed


def why_unverified(record: SiteRecord) -> str | None:
    """Why `record` is not to be believed, in words for a log line; None if it is.

    Believed means: signed, by the key whose digest is the record's site id,
    over exactly these fields.
    """
    if not record.public_key or not record.signature:
        return "it is not signed"
    try:
        key = base64.b64decode(record.public_key, validate=True)
        signature = base64.b64decode(record.signature, validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - the field validators admit only base64
        return "its key or signature is not base64"
    signer = pki.verify_signature_untrusted(key, signing_bytes(record), signature)
    if signer is None:
        return "its signature does not match its fields and key (forged or altered)"
    if signer != record.site_id:
        return f"it is signed by the key of site {signer}, not of site {record.site_id}"
    return None


def verify_record(record: SiteRecord) -> bool:
    """True if the site it describes signed this record, as it is (see `why_unverified`)."""
    return why_unverified(record) is None
