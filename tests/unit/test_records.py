"""Site records: merge rule, digests, and the untrusted wire decoder."""

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.errors import ProtocolError
from fabric.gossip.records import (
    encode_record_batches,
    EDGE,
    INTERIOR,
    MAX_COST,
    MAX_COUNTER,
    MAX_LINKS,
    MAX_RECORDS,
    MAX_SERVICES,
    MAX_TEXT,
    LinkInfo,
    RecordTable,
    ServiceInfo,
    SiteRecord,
    decode_records_untrusted,
    encode_records,
)


def record(site_id: str = "a", incarnation: int = 1, version: int = 1, **kwargs: Any) -> SiteRecord:
    kwargs.setdefault("name", f"site {site_id}")
    kwargs.setdefault("mode", INTERIOR)
    return SiteRecord(site_id=site_id, incarnation=incarnation, version=version, **kwargs)


# -- merge rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "incoming", "applied", "kept"),
    [
        (None, (1, 1), True, (1, 1)),  # first record of a site
        ((1, 5), (1, 4), False, (1, 5)),  # older version
        ((1, 5), (1, 5), False, (1, 5)),  # duplicate
        ((1, 5), (1, 6), True, (1, 6)),  # newer version
        ((1, 5), (2, 0), True, (2, 0)),  # restart: new incarnation, lower version
        ((2, 0), (1, 9), False, (2, 0)),  # a late record of the previous run
    ],
)
def test_apply(held: tuple[int, int] | None, incoming: tuple[int, int], applied: bool, kept: tuple[int, int]) -> None:
    table = RecordTable()
    if held is not None:
        assert table.apply(record("a", *held, name="held"))
    assert table.apply(record("a", *incoming, name="incoming")) is applied
    held_now = table.get("a")
    assert held_now is not None
    assert held_now.stamp == kept
    assert held_now.name == ("incoming" if applied else "held")
    assert len(table) == 1


def test_equal_stamp_with_other_content_is_not_newer() -> None:
    """First seen wins for a (broken) reuse of a stamp, so a flood stops anyway."""
    first = record("a", 1, 1, name="one")
    assert not record("a", 1, 1, name="two").is_newer_than(first)
    assert record("a", 1, 1).is_newer_than(None)


def test_is_newer_than_refuses_other_sites() -> None:
    with pytest.raises(ValueError, match="different sites"):
        record("a").is_newer_than(record("b"))


def test_table_basics() -> None:
    a, b = record("a"), record("b", mode=EDGE)
    table = RecordTable([a, b])
    assert len(table) == 2
    assert "a" in table and "c" not in table
    assert table.get("c") is None
    assert set(table) == {a, b}
    assert set(table.values()) == {a, b}
    assert table.records == {"a": a, "b": b}
    assert table.remove("a") == a
    assert table.remove("a") is None
    assert table.digest() == {"b": (1, 1)}
    assert repr(table) == "<RecordTable 1 sites: b@1.1>"


def test_removed_site_can_come_back() -> None:
    table = RecordTable([record("a", 1, 3)])
    table.remove("a")
    assert table.apply(record("a", 1, 1))


# -- digests and anti-entropy -------------------------------------------------------


def test_digest() -> None:
    table = RecordTable([record("a", 1, 2), record("b", 3, 0)])
    assert table.digest() == {"a": (1, 2), "b": (3, 0)}
    assert RecordTable().digest() == {}


@pytest.mark.parametrize(
    ("digest", "expected"),
    [
        ({}, ["a", "b", "c"]),  # the peer knows nothing
        ({"a": (1, 2), "b": (2, 0), "c": (1, 1)}, []),  # in sync
        ({"a": (1, 1), "b": (2, 0), "c": (1, 1)}, ["a"]),  # older version
        ({"a": (1, 2), "b": (1, 9), "c": (1, 1)}, ["b"]),  # older incarnation
        ({"a": (1, 3), "b": (3, 0), "c": (1, 1)}, []),  # the peer is ahead: nothing to send
        ({"b": (2, 0), "z": (5, 5)}, ["a", "c"]),  # absent ones go; unknown ones are not ours to send
    ],
)
def test_newer_than(digest: dict[str, tuple[int, int]], expected: list[str]) -> None:
    table = RecordTable([record("c", 1, 1), record("a", 1, 2), record("b", 2, 0)])
    assert [r.site_id for r in table.newer_than(digest)] == expected


def test_anti_entropy_round_brings_tables_level() -> None:
    left = RecordTable([record("a", 1, 5), record("b", 1, 1)])
    right = RecordTable([record("a", 1, 3), record("b", 2, 0), record("c", 1, 1)])
    for r in right.newer_than(left.digest()):
        left.apply(r)
    for r in left.newer_than(right.digest()):
        right.apply(r)
    assert left.digest() == right.digest() == {"a": (1, 5), "b": (2, 0), "c": (1, 1)}


# Stamps for a handful of sites; the content of a record is a function of its
# stamp, as it is in a working network (one issuer per site).
_updates = st.dictionaries(
    keys=st.sampled_from("abcde"),
    values=st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=6),
    min_size=1,
).map(
    lambda stamps: [
        record(site, inc, ver, name=f"{site}-{inc}-{ver}") for site, pairs in stamps.items() for inc, ver in pairs
    ]
)


@given(data=st.data(), updates=_updates)
def test_any_order_with_duplicates_converges_to_newest(data: st.DataObject, updates: list[SiteRecord]) -> None:
    extra = data.draw(st.lists(st.sampled_from(updates), max_size=20), label="duplicates")
    order = data.draw(st.permutations(updates + extra), label="order")
    table = RecordTable()
    changes = 0
    for update in order:
        before = table.get(update.site_id)
        changed = table.apply(update)
        assert changed == (table.get(update.site_id) is not before)
        changes += changed
    newest = {}
    for update in updates:
        if update.site_id not in newest or update.stamp > newest[update.site_id].stamp:
            newest[update.site_id] = update
    assert table.records == newest
    assert table.newer_than(table.digest()) == []
    assert len(newest) <= changes <= len(updates)


# -- wire: round trip ------------------------------------------------------------

_text = st.text(min_size=1, max_size=12)
_links = st.builds(
    LinkInfo,
    peer=_text,
    cost=st.integers(0, MAX_COST),
    rtt=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
)
_services = st.builds(
    ServiceInfo,
    routing_key=_text,
    protocol=st.sampled_from(["tcp", "http"]) | _text,
    port=st.none() | st.integers(1, 65535),
    connectors=st.integers(0, MAX_COUNTER),
)
_records = st.builds(
    SiteRecord,
    site_id=_text,
    name=st.text(max_size=12),
    incarnation=st.integers(0, MAX_COUNTER),
    version=st.integers(0, MAX_COUNTER),
    mode=st.sampled_from([INTERIOR, EDGE]),
    links=st.lists(_links, max_size=4).map(tuple),
    services=st.lists(_services, max_size=4).map(tuple),
)


@given(st.lists(_records, max_size=5))
def test_round_trip(records: list[SiteRecord]) -> None:
    data = encode_records(records)
    assert isinstance(data, bytes)
    assert isinstance(json.loads(data.decode("utf-8")), list)
    assert decode_records_untrusted(data) == records


def test_wire_shape() -> None:
    """The field names are the wire: other implementations read them."""
    r = record("a", 2, 3, links=(LinkInfo("b", 5, 0.25),), services=(ServiceInfo("db", port=5432),))
    assert json.loads(encode_records([r])) == [
        {
            "site_id": "a",
            "name": "site a",
            "incarnation": 2,
            "version": 3,
            "mode": "interior",
            "links": [{"peer": "b", "cost": 5, "rtt": 0.25}],
            "services": [{"routing_key": "db", "protocol": "tcp", "port": 5432, "connectors": 1}],
        }
    ]


def test_encode_refuses_more_than_a_peer_accepts() -> None:
    with pytest.raises(ValueError, match="limit"):
        encode_records([record("a")] * (MAX_RECORDS + 1))


def test_unknown_keys_are_ignored_and_defaults_apply() -> None:
    raw = [
        {
            "site_id": "a",
            "name": "A",
            "incarnation": 1,
            "version": 0,
            "mode": "edge",
            "future": {"anything": [1, 2]},
            "links": [{"peer": "b", "cost": 1, "rtt": 0, "weight": 3}],
        }
    ]
    [decoded] = decode_records_untrusted(json.dumps(raw).encode())
    assert decoded == SiteRecord("a", "A", 1, 0, EDGE, links=(LinkInfo("b", 1, 0.0),))
    assert isinstance(decoded.links[0].rtt, float)


# -- wire: bad input ---------------------------------------------------------------


def valid_raw() -> dict[str, Any]:
    return {
        "site_id": "a",
        "name": "A",
        "incarnation": 1,
        "version": 2,
        "mode": "interior",
        "links": [{"peer": "b", "cost": 1, "rtt": 0.5}],
        "services": [{"routing_key": "db", "protocol": "tcp", "port": 5432, "connectors": 1}],
    }


def test_valid_raw_is_valid() -> None:
    """The mutations below each break something only because this one is sound."""
    assert len(decode_records_untrusted(json.dumps([valid_raw()]).encode())) == 1


def _set(path: tuple[str | int, ...], value: Any) -> bytes:
    raw = valid_raw()
    target: Any = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return json.dumps([raw]).encode()


def _drop(key: str) -> bytes:
    raw = valid_raw()
    del raw[key]
    return json.dumps([raw]).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        pytest.param(b"", "not UTF-8 JSON", id="empty"),
        pytest.param(b"\xff[]", "not UTF-8 JSON", id="not-utf8"),
        pytest.param(b"[{", "not UTF-8 JSON", id="truncated"),
        pytest.param(b"[NaN]", "not UTF-8 JSON", id="nan"),
        pytest.param(b"[" * 100_000, "not UTF-8 JSON", id="deep-nesting"),
        pytest.param(b"[" + b"9" * 5000 + b"]", "not UTF-8 JSON", id="huge-int"),
        pytest.param(b'{"site_id": "a"}', "expected a list of records, got object", id="not-a-list"),
        pytest.param(b"null", "got null", id="null"),
        pytest.param(b"[1]", r"expected an object, got integer @ \$\[0\]", id="record-not-object"),
        pytest.param(_drop("site_id"), "missing field 'site_id'", id="missing-site-id"),
        pytest.param(_drop("mode"), "missing field 'mode'", id="missing-mode"),
        pytest.param(_set(("site_id",), ""), "site_id must not be empty", id="empty-site-id"),
        pytest.param(_set(("site_id",), 7), "site_id must be a string, not integer", id="int-site-id"),
        pytest.param(_set(("site_id",), "x" * (MAX_TEXT + 1)), "longer than 255", id="long-site-id"),
        pytest.param(_set(("name",), "x" * (MAX_TEXT + 1)), "name is longer", id="long-name"),
        pytest.param(_set(("name",), "\ud800"), "not valid Unicode", id="lone-surrogate"),
        pytest.param(_set(("incarnation",), True), "incarnation must be an integer, not boolean", id="bool-int"),
        pytest.param(_set(("incarnation",), "1"), "incarnation must be an integer, not string", id="str-int"),
        pytest.param(_set(("version",), 1.0), "version must be an integer, not number", id="float-int"),
        pytest.param(_set(("version",), None), "version must be an integer, not null", id="null-int"),
        pytest.param(_set(("incarnation",), -1), "incarnation must be in", id="negative-incarnation"),
        pytest.param(_set(("version",), -1), "version must be in", id="negative-version"),
        pytest.param(_set(("version",), MAX_COUNTER + 1), "version must be in", id="version-past-64-bit"),
        pytest.param(_set(("mode",), "core"), "mode must be one of", id="bad-mode"),
        pytest.param(_set(("mode",), None), "mode must be one of", id="null-mode"),
        pytest.param(_set(("links",), {}), r"expected a list, got object @ \$\[0\]\.links", id="links-object"),
        pytest.param(_set(("links",), "ab"), "expected a list, got string", id="links-string"),
        pytest.param(
            _set(("links", 0), ["b", 1]), r"expected an object, got list @ \$\[0\]\.links\[0\]", id="link-list"
        ),
        pytest.param(_set(("links", 0, "cost"), -1), "cost must be in", id="negative-cost"),
        pytest.param(_set(("links", 0, "cost"), MAX_COST + 1), "cost must be in", id="huge-cost"),
        pytest.param(_set(("links", 0, "cost"), False), "cost must be an integer, not boolean", id="bool-cost"),
        pytest.param(_set(("links", 0, "peer"), ""), "peer must not be empty", id="empty-peer"),
        pytest.param(_set(("links", 0, "rtt"), -0.1), "rtt must be a finite number >= 0", id="negative-rtt"),
        pytest.param(_set(("links", 0, "rtt"), "1"), "rtt must be a number, not string", id="str-rtt"),
        pytest.param(_set(("links", 0, "rtt"), True), "rtt must be a number, not boolean", id="bool-rtt"),
        pytest.param(_set(("links", 0, "rtt"), 1e400), "not UTF-8 JSON", id="inf-rtt"),  # json.dumps writes Infinity
        pytest.param(_set(("services", 0, "routing_key"), ""), "routing_key must not be empty", id="empty-key"),
        pytest.param(_set(("services", 0, "routing_key"), "k" * 256), "routing_key is longer", id="long-key"),
        pytest.param(_set(("services", 0, "port"), 0), "port must be in", id="port-zero"),
        pytest.param(_set(("services", 0, "port"), 65536), "port must be in", id="port-too-big"),
        pytest.param(_set(("services", 0, "port"), "80"), "port must be an integer", id="str-port"),
        pytest.param(_set(("services", 0, "connectors"), -1), "connectors must be in", id="negative-connectors"),
        pytest.param(_set(("services", 0, "protocol"), None), "protocol must be a string", id="null-protocol"),
        pytest.param(
            _set(("links",), [{"peer": "b", "cost": 1}] * (MAX_LINKS + 1)), "more than 1024 entries", id="many-links"
        ),
        pytest.param(
            _set(("services",), [{"routing_key": "k"}] * (MAX_SERVICES + 1)),
            "more than 4096 entries",
            id="many-services",
        ),
        pytest.param(
            json.dumps([{}] * (MAX_RECORDS + 1)).encode(), "4097 records; the limit is 4096", id="many-records"
        ),
    ],
)
def test_decode_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match="^malformed gossip payload: .*" + why):
        decode_records_untrusted(data)


def test_error_message_stays_short() -> None:
    data = json.dumps([{}] * 50).encode()
    with pytest.raises(ProtocolError, match=r"and \d+ more$") as caught:
        decode_records_untrusted(data)
    assert len(str(caught.value)) < 400


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        records = decode_records_untrusted(data)
    except ProtocolError as exc:
        assert str(exc).startswith("malformed gossip payload: ")
    else:
        assert isinstance(records, list)
        assert all(isinstance(r, SiteRecord) for r in records)


@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(_json_values)
def test_decode_arbitrary_json(value: Any) -> None:
    _decode_or_protocol_error(json.dumps(value).encode())


_paths: list[tuple[str | int, ...]] = [
    (key,) for key in valid_raw()
] + [("links", 0, key) for key in ("peer", "cost", "rtt")] + [
    ("services", 0, key) for key in ("routing_key", "protocol", "port", "connectors")
] + [("links", 0), ("services", 0)]


@given(path=st.sampled_from(_paths), value=_json_values)
def test_decode_near_valid(path: tuple[str | int, ...], value: Any) -> None:
    """One field of a sound record replaced by anything: reaches every validator."""
    _decode_or_protocol_error(_set(path, value))


@given(st.lists(_records, max_size=30), st.integers(200, 5000))
def test_record_batches_stay_under_the_byte_limit_and_carry_every_record(records, max_bytes):
    batches = list(encode_record_batches(records, max_bytes))
    assert [r for batch in batches for r in decode_records_untrusted(batch)] == records
    for batch in batches:
        # Only a record too large on its own may make a batch pass the limit, and then it travels alone.
        assert len(batch) <= max_bytes or len(decode_records_untrusted(batch)) == 1
