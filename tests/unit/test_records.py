"""Site records: merge rule, digests, and the untrusted wire decoder."""

import base64
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import names, pki
from fabric.errors import ProtocolError
from fabric.gossip.records import (
    MAX_COUNTER,
    MAX_LINKS,
    MAX_RECORD_BYTES,
    MAX_RECORDS,
    MAX_SERVICES,
    MAX_SIGNATURE_TEXT,
    MAX_TEXT,
    SIGNING_CONTEXT,
    LinkInfo,
    RecordTable,
    ServiceInfo,
    SiteRecord,
    decode_records_untrusted,
    encode_record_batches,
    encode_records,
    record_from_json_untrusted,
    sign_record,
    signing_bytes,
    verify_record,
    why_unverified,
)
from fabric.router.frames import EDGE, INTERIOR, MAX_COST


def record(site_id: str = "a", incarnation: int = 1, version: int = 1, **kwargs: Any) -> SiteRecord:
    kwargs.setdefault("name", f"site-{site_id}")
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
    assert table.digest() == {site_id: record.stamp for site_id, record in newest.items()}
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
    routing_key=st.from_regex(names.PATTERN, fullmatch=True),
    protocol=st.sampled_from(["tcp", "http"]) | _text,
    port=st.none() | st.integers(1, 65535),
    connectors=st.integers(0, MAX_COUNTER),
)
_records = st.builds(
    SiteRecord,
    site_id=_text,
    name=st.from_regex(names.PATTERN, fullmatch=True),
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
            "name": "site-a",
            "incarnation": 2,
            "version": 3,
            "mode": "interior",
            "links": [{"peer": "b", "cost": 5, "rtt": 0.25}],
            "services": [{"routing_key": "db", "protocol": "tcp", "port": 5432, "connectors": 1}],
            "public_key": "",
            "signature": "",
        }
    ]


def test_encode_refuses_more_than_a_peer_accepts() -> None:
    with pytest.raises(ValueError, match="limit"):
        encode_records([record("a")] * (MAX_RECORDS + 1))


def test_defaults_apply() -> None:
    raw = [
        {
            "site_id": "a",
            "name": "A",
            "incarnation": 1,
            "version": 0,
            "mode": "edge",
            "links": [{"peer": "b", "cost": 1, "rtt": 0}],
        }
    ]
    [decoded] = decode_records_untrusted(json.dumps(raw).encode())
    assert decoded == SiteRecord("a", "A", 1, 0, EDGE, links=(LinkInfo("b", 1, 0.0),))
    assert isinstance(decoded.links[0].rtt, float)
    assert (decoded.public_key, decoded.signature) == ("", "")  # unsigned: decodes, but never verifies


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
        "public_key": "",
        "signature": "",
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
        pytest.param(_set(("name",), "x" * 64), "name must be 1 to 63 letters", id="long-name"),
        pytest.param(_set(("name",), "../identity"), "name must be 1 to 63 letters", id="path-name"),
        pytest.param(_set(("site_id",), "\ud800"), "not valid Unicode", id="lone-surrogate"),
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
        pytest.param(_set(("services", 0, "routing_key"), ""), "routing_key must be 1 to 63", id="empty-key"),
        pytest.param(_set(("services", 0, "routing_key"), "k" * 64), "routing_key must be 1 to 63", id="long-key"),
        pytest.param(_set(("services", 0, "routing_key"), "a/b"), "routing_key must be 1 to 63", id="path-key"),
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


# -- wire: strictness ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "where"),
    [((), r"\$\[0\]"), (("links", 0), r"\$\[0\]\.links\[0\]"), (("services", 0), r"\$\[0\]\.services\[0\]")],
)
def test_unknown_fields_are_refused(path: tuple[str | int, ...], where: str) -> None:
    """A signature covers the fields we know; an unknown one would travel unchecked."""
    raw = valid_raw()
    target: Any = raw
    for step in path:
        target = target[step]
    target["future"] = {"anything": [1, 2]}
    with pytest.raises(ProtocolError, match=f"unknown field 'future' @ {where}"):
        decode_records_untrusted(json.dumps([raw]).encode())


@pytest.mark.parametrize("field", ["incarnation", "version"])
def test_absurd_counters_are_refused(field: str) -> None:
    """2**53 - 1 is the largest integer every JSON reader holds exactly; past it is absurd."""
    assert MAX_COUNTER == 2**53 - 1
    assert decode_records_untrusted(_set((field,), MAX_COUNTER))[0].stamp[0 if field == "incarnation" else 1] == MAX_COUNTER
    with pytest.raises(ProtocolError, match=f"{field} must be in \\[0, {MAX_COUNTER}\\]"):
        decode_records_untrusted(_set((field,), MAX_COUNTER + 1))
    with pytest.raises(ValueError, match=f"{field} must be in"):
        record("a", **{"incarnation": 1, "version": 1, field: MAX_COUNTER + 1})


def test_oversized_record_is_refused_before_structuring() -> None:
    services = [{"routing_key": f"key-{i}-" + "k" * 50, "protocol": "p" * 250} for i in range(MAX_SERVICES)]
    data = _set(("services",), services)
    with pytest.raises(ProtocolError, match=rf"record is \d+ bytes; the limit is {MAX_RECORD_BYTES} @ \$\[0\]"):
        decode_records_untrusted(data)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("public_key", "not base64!", "public_key is not base64"),
        ("public_key", "QUJD", None),  # base64 of b"ABC": decodes; verification is another matter
        ("signature", "QUI", "signature is not base64"),  # unpadded
        ("signature", 7, "signature must be a string, not integer"),
        ("signature", "A" * (MAX_SIGNATURE_TEXT + 4), "signature is longer than"),
    ],
)
def test_key_and_signature_fields(field: str, value: Any, why: str | None) -> None:
    data = _set((field,), value)
    if why is None:
        assert getattr(decode_records_untrusted(data)[0], field) == value
    else:
        with pytest.raises(ProtocolError, match=why):
            decode_records_untrusted(data)


def test_record_from_json_untrusted() -> None:
    assert record_from_json_untrusted(valid_raw()) == decode_records_untrusted(json.dumps([valid_raw()]).encode())[0]
    with pytest.raises(ProtocolError, match=r"unknown field 'x' @ \$\.records\[3\]"):
        record_from_json_untrusted({**valid_raw(), "x": 1}, "$.records[3]")
    with pytest.raises(ProtocolError, match=r"expected an object, got list @ \$"):
        record_from_json_untrusted([])


# -- signatures ---------------------------------------------------------------------


def _identity(name: str, key: Any = None) -> pki.Identity:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return pki.Identity(
        site_id=pki.site_id_of(key.public_key()),
        name=name,
        site_dir=Path("/nonexistent"),
        ca_cert_pem=b"",
        cert_pem=b"",
        ca_key=key,
        site_key=key,
    )


@pytest.fixture(scope="module")
def alice() -> pki.Identity:
    return _identity("alice")


@pytest.fixture(scope="module")
def mallory() -> pki.Identity:
    return _identity("mallory")


def own_record(identity: pki.Identity, **kwargs: Any) -> SiteRecord:
    kwargs.setdefault("links", (LinkInfo("b" * 32, 3, 0.125),))
    kwargs.setdefault("services", (ServiceInfo("db", port=5432),))
    return record(identity.site_id, 2, 5, **kwargs)


def test_signed_record_verifies_and_survives_the_wire(alice: pki.Identity) -> None:
    signed = sign_record(own_record(alice), alice)
    assert base64.b64decode(signed.public_key) == pki.public_key_der(alice)
    assert signed.signature and verify_record(signed) and why_unverified(signed) is None
    [decoded] = decode_records_untrusted(encode_records([signed]))
    assert decoded == signed and verify_record(decoded)
    assert "signature" not in repr(signed) and "public_key" not in repr(signed)  # logs stay readable


def test_signing_bytes_are_canonical(alice: pki.Identity) -> None:
    signed = sign_record(own_record(alice), alice)
    data = signing_bytes(signed)
    assert data.startswith(SIGNING_CONTEXT)
    body = json.loads(data[len(SIGNING_CONTEXT) :])
    assert "signature" not in body and body["public_key"] == signed.public_key
    assert list(body) == sorted(body)
    assert signing_bytes(attrs.evolve(signed, signature="")) == data  # the signature is not signed
    # The order a peer wrote the fields in does not matter: the verifier re-encodes.
    raw = json.loads(encode_records([signed]))[0]
    shuffled = dict(reversed(list(raw.items())))
    [decoded] = decode_records_untrusted(json.dumps([shuffled]).encode())
    assert verify_record(decoded)


@pytest.mark.parametrize(
    "change",
    [
        {"version": 6},
        {"incarnation": 3},
        {"name": "someone-else"},
        {"mode": EDGE},
        {"services": (ServiceInfo("db", port=5433),)},
        {"services": ()},
        {"links": (LinkInfo("b" * 32, 3, 0.25),)},
        {"links": ()},
    ],
    ids=lambda change: next(iter(change)),
)
def test_altered_record_does_not_verify(alice: pki.Identity, change: dict[str, Any]) -> None:
    altered = attrs.evolve(sign_record(own_record(alice), alice), **change)
    assert not verify_record(altered)
    assert why_unverified(altered) == "its signature does not match its fields and key (forged or altered)"


def test_record_signed_by_another_key_does_not_verify(alice: pki.Identity, mallory: pki.Identity) -> None:
    """Mallory signs a record claiming Alice's id with her own key: the key is not Alice's."""
    forged = sign_record(own_record(mallory), mallory)
    forged = attrs.evolve(forged, site_id=alice.site_id)
    forged = attrs.evolve(forged, signature=base64.b64encode(pki.sign(mallory, signing_bytes(forged))).decode())
    assert why_unverified(forged) == f"it is signed by the key of site {mallory.site_id}, not of site {alice.site_id}"
    # With Alice's public key pasted in, Mallory's signature does not match it.
    pasted = attrs.evolve(forged, public_key=base64.b64encode(pki.public_key_der(alice)).decode())
    assert "does not match" in why_unverified(pasted)


def test_unsigned_record_does_not_verify() -> None:
    assert why_unverified(record("a")) == "it is not signed"
    assert not verify_record(record("a"))


def test_sign_record_refuses_other_sites_and_oversized_records(alice: pki.Identity, mallory: pki.Identity) -> None:
    with pytest.raises(ValueError, match="cannot sign a record of site"):
        sign_record(own_record(mallory), alice)
    big = tuple(ServiceInfo(f"key-{i}-" + "k" * 50, protocol="p" * 250) for i in range(1500))
    with pytest.raises(ValueError, match=f"bytes signed; the limit is {MAX_RECORD_BYTES}"):
        sign_record(own_record(alice, services=big), alice)


@settings(max_examples=25, deadline=None)
@given(_records)
def test_any_signed_record_round_trips_and_verifies(alice: pki.Identity, r: SiteRecord) -> None:
    signed = sign_record(attrs.evolve(r, site_id=alice.site_id), alice)
    [decoded] = decode_records_untrusted(encode_records([signed]))
    assert decoded == signed and verify_record(decoded)


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()],
    ids=["p384", "ed25519"],
)
def test_other_key_types_sign_and_verify(key: Any) -> None:
    identity = _identity("other", key)
    der = pki.public_key_der(identity)
    signature = pki.sign(identity, b"data")
    assert pki.verify_signature_untrusted(der, b"data", signature) == identity.site_id
    assert pki.verify_signature_untrusted(der, b"datA", signature) is None
    assert verify_record(sign_record(own_record(identity), identity))


def test_weak_keys_are_not_believed() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    identity = _identity("weak", weak)
    signature = pki.sign(identity, b"data")
    assert pki.verify_signature_untrusted(pki.public_key_der(identity), b"data", signature) is None


@given(st.binary(max_size=200), st.binary(max_size=80), st.binary(max_size=100))
def test_verify_signature_untrusted_never_raises(key: bytes, data: bytes, signature: bytes) -> None:
    assert pki.verify_signature_untrusted(key, data, signature) is None


def test_verify_signature_untrusted_refuses_wrong_types_and_sizes(alice: pki.Identity) -> None:
    der, signature = pki.public_key_der(alice), pki.sign(alice, b"data")
    assert pki.verify_signature_untrusted(der, b"data", signature) == alice.site_id
    assert pki.verify_signature_untrusted(der.hex(), b"data", signature) is None  # type: ignore[arg-type]
    assert pki.verify_signature_untrusted(der, "data", signature) is None  # type: ignore[arg-type]
    assert pki.verify_signature_untrusted(der, b"data", signature + b"\0" * pki.MAX_SIGNATURE) is None
    assert pki.verify_signature_untrusted(der + b"\0", b"data", signature) is None  # trailing bytes: not canonical
