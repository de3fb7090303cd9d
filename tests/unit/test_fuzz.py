"""Property tests for every parser of peer bytes: the fuzz targets of tools/fuzz, run by Hypothesis.

Each target (tools/fuzz/targets.py) returns when its parser accepted the
input or refused it with its one error type, and raises on anything else.
Here they get random bytes and mutations of valid inputs; `python -m
tools.fuzz` runs the same targets under atheris for as long as one likes.
FABRIC_FUZZ_EXAMPLES raises the example budget (default 150 per target).

Below them, structured properties the byte-level targets reach only by luck:
any sequence of well-formed frames on an established link, and the
REDEEM payloads. Findings of either fuzzer become regression tests at the end.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fabric import names
from fabric.errors import FrameError, ProtocolError
from fabric.router.frames import (
    Frame,
    FrameType,
    Open,
    Reason,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    encode_frame,
    encode_message,
    encode_reason,
    encode_u64,
)
from fabric.router.protocol import FlowOpened, GoAway, LinkProtocol
from tools.fuzz import targets

EXAMPLES = int(os.environ.get("FABRIC_FUZZ_EXAMPLES", "150"))
fuzz_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid input with a few bytes flipped, cut, or inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


def inputs(target: str) -> st.SearchStrategy[bytes]:
    seeds = [s for s in targets.seed_corpus(target) if s]
    return st.one_of(st.binary(max_size=2048), st.sampled_from(seeds), mutated(seeds))


def test_the_fuzz_command_knows_every_target():
    """`python -m tools.fuzz` names the targets before it imports them (atheris must import fabric itself)."""
    from tools.fuzz.__main__ import TARGET_NAMES

    assert TARGET_NAMES == tuple(targets.TARGETS)


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_every_parser_of_peer_bytes_raises_only_its_one_error_type(target):
    fuzz = targets.TARGETS[target]

    @fuzz_settings
    @given(inputs(target))
    def check(data: bytes) -> None:
        fuzz(data)

    check()


# -- structured: frame sequences on an established link --------------------------------------


flow_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 1001, 2**32 - 1])
open_payload = st.builds(
    Open,
    dest=st.text(max_size=8),
    routing_key=st.from_regex(names.PATTERN, fullmatch=True),
    origin=st.text(max_size=8),
    flow_uid=st.text(max_size=8),
    hop_limit=st.integers(0, 40),
).map(encode_message)
payload = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 2**64 - 1).map(encode_u64),
    st.builds(encode_reason, st.sampled_from(Reason), st.text(max_size=20)),
    open_payload,
)
frame = st.builds(Frame, st.sampled_from(FrameType), flow_ids, payload)


def _feed(dialer: bool, sequence: list[Frame]) -> str | None:
    """Feed the frames to a fresh link protocol; why the link ended, or None if it still stands."""
    protocol = LinkProtocol(dialer=dialer, window=4096, peer_window=4096, max_flows=4, peer_name="b")
    opened = []
    try:
        for f in sequence:
            for event in protocol.receive_data(encode_frame(f.type, f.flow_id, f.payload)):
                if isinstance(event, FlowOpened):
                    opened.append(event.flow_id)
                elif isinstance(event, GoAway):
                    return f"peer went away: {event.text}"
    except ProtocolError as exc:
        return f"protocol error: {exc}"
    # The link stands: every flow holds at most the credit it gave.
    assert protocol.flow_count <= 4
    for flow_id in opened:
        if (credit := protocol.flow_credit(flow_id)) is not None:
            assert credit.received - credit.consumed <= credit.recv_limit
    return None


@fuzz_settings
@given(st.booleans(), st.lists(frame, max_size=30))
def test_any_frame_sequence_on_a_link_ends_it_only_with_a_protocol_reason(dialer, sequence):
    ended = _feed(dialer, sequence)
    assert ended is None or ended.startswith(("protocol error: ", "peer went away: "))


def test_data_past_credit_ends_the_link_and_data_within_it_does_not():
    window = 4096
    open_ = encode_message(Open("b" * 32, "k", "a" * 32, "u", 3))
    within = [Frame(FrameType.OPEN, 2, open_), Frame(FrameType.DATA, 2, b"x" * window)]
    assert _feed(True, within) is None
    past = [*within, Frame(FrameType.DATA, 2, b"x")]
    assert "past its credit" in (_feed(True, past) or "")


# -- structured: REDEEM and REDEEM_OK payloads ------------------------------------------------


@given(
    st.builds(
        Redeem,
        token_id=st.text(max_size=40),
        secret=st.text(max_size=60),
        name=st.from_regex(names.PATTERN, fullmatch=True),
        csr_pem=st.text(max_size=400),
        mode=st.sampled_from(["interior", "edge"]),
    )
    | st.builds(RedeemOk, cert_pem=st.text(max_size=400), issuer_id=st.text(max_size=40), issuer_name=st.from_regex(names.PATTERN, fullmatch=True))
)
def test_redeem_payloads_round_trip(message):
    assert decode_message_untrusted(encode_message(message), type(message)) == message


@given(st.dictionaries(st.sampled_from(["token_id", "secret", "name", "csr_pem", "mode", "cert_pem", "issuer_id",
                                        "issuer_name", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.lists(st.integers())))
@example({"token_id": "t", "secret": "s", "name": "n", "csr_pem": "x" * 20000})
def test_near_valid_redeem_payloads_raise_only_frame_error(raw):
    for cls in (Redeem, RedeemOk):
        try:
            decode_message_untrusted(json.dumps(raw).encode(), cls)
        except FrameError:
            pass


# -- regressions: what the fuzzers found ---------------------------------------------------------


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    at = data.index(old)
    return data[:at] + new + data[at + len(old) :]


def _der_to_pem(der: bytes, label: str) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode()


@pytest.fixture(scope="module")
def site_identity(tmp_path_factory):
    from fabric import pki

    return pki.create_identity(tmp_path_factory.mktemp("fuzz-regressions"), "issuer")


# atheris (tools.fuzz cert, csr, token): cryptography raises x509.InvalidVersion, which is neither a
# ValueError nor a TypeError, for a certificate or CSR whose version field is out of range; it escaped
# cert_site_id/cert_serial (ProtocolError only), sign_csr (TokenError only) and Token.loads_untrusted
# (TokenFormatError only). DER of a v3 certificate starts its TBS with [0] { INTEGER 2 }: a0 03 02 01 02;
# a CSR's info starts with INTEGER 0: 02 01 00.


def test_regression_a_peer_certificate_with_an_unknown_x509_version_is_a_protocol_error(site_identity):
    from fabric import pki

    der = pki.pem_to_der(site_identity.cert_pem)
    bad = _patched(der, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x0a")
    for read in (pki.cert_site_id, pki.cert_serial):
        with pytest.raises(ProtocolError, match="does not parse"):
            read(bad)
    from fabric.errors import TokenError

    with pytest.raises(TokenError, match="unusable certificate"):
        pki.check_issued_cert_untrusted(site_identity, _der_to_pem(bad, "CERTIFICATE").decode(),
                                        site_identity.ca_cert_pem.decode())


def test_regression_a_csr_with_an_unknown_version_is_refused_as_invalid(site_identity, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fabric import pki
    from fabric.errors import TokenError

    redeemer = pki.create_identity(tmp_path / "redeemer", "redeemer")
    der = x509.load_pem_x509_csr(pki.make_csr(redeemer)).public_bytes(serialization.Encoding.DER)
    bad = _der_to_pem(_patched(der, b"\x02\x01\x00", b"\x02\x01\x15"), "CERTIFICATE REQUEST")
    with pytest.raises(TokenError, match="certificate request is invalid"):
        pki.sign_csr(site_identity, bad)


def test_regression_a_token_whose_ca_has_an_unknown_x509_version_is_not_a_token(site_identity):
    import yaml

    from fabric import pki
    from fabric.errors import TokenFormatError

    token, _ = pki.new_token(site_identity, ["tls://127.0.0.1:7443"], now=0.0)
    ca_der = pki.pem_to_der(site_identity.ca_cert_pem)
    bad_ca = _der_to_pem(_patched(ca_der, b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x0a"), "CERTIFICATE")
    document = yaml.safe_load(token.dumps())
    document["ca_pem"] = bad_ca.decode()
    with pytest.raises(TokenFormatError, match="not a fabric token: ca_pem is not a PEM certificate"):
        pki.Token.loads_untrusted(yaml.safe_dump(document))
