"""Tests of fabric.pki: identities, certificates, real TLS handshakes in memory, tokens, grants."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import os
import ssl
import stat
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric import names, pki
from fabric.errors import (
    ConfigError,
    ProtocolError,
    TokenError,
    TokenExpiredError,
    TokenForgedError,
    TokenFormatError,
    TokenSpentError,
)

HANDSHAKE_DEADLINE = 5  # seconds; an in-memory handshake takes milliseconds


# ---------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def alpha(tmp_path: Path) -> pki.Identity:
    return pki.create_identity(tmp_path / "alpha", "alpha")


@pytest.fixture
def beta(tmp_path: Path) -> pki.Identity:
    return pki.create_identity(tmp_path / "beta", "beta")


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> pki.Identity:
    """One identity shared by the Hypothesis tests (function fixtures do not mix with @given)."""
    return pki.create_identity(tmp_path_factory.mktemp("issuer"), "issuer")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def der_of(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def csr_pem(key: Any, common_name: str, name: str | None = None) -> bytes:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if name is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def pem_wrap(der: bytes, label: str = "CERTIFICATE REQUEST") -> bytes:
    body = base64.encodebytes(der).decode("ascii")
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n".encode("ascii")


def link_cert(issuer: pki.Identity, redeemer: pki.Identity, where: Path) -> Path:
    """The redeemer's certificate signed by the issuer, as a file (what a redemption leaves)."""
    cert_pem, _serial = pki.sign_csr(issuer, pki.make_csr(redeemer))
    path = where / f"{redeemer.name}-by-{issuer.name}.pem"
    path.write_bytes(cert_pem)
    return path


class Outcome:
    """What one side of a handshake saw: the peer certificate, or the error."""

    def __init__(self) -> None:
        self.peer_der: bytes | None = None
        self.error: BaseException | None = None


async def talk(stream: trio.SSLStream, outcome: Outcome, *, first: bool) -> None:
    """Handshake, then one byte each way, so the server has really read the client's certificate.

    In TLS 1.3 the client certificate arrives after the server's Finished:
    only application data proves the server accepted it. On failure the
    transport is closed so the other side sees EOF instead of waiting forever.
    """
    try:
        await stream.do_handshake()
        if first:
            await stream.send_all(b"?")
            assert await stream.receive_some(1) == b"!"
        else:
            assert await stream.receive_some(1) == b"?"
            await stream.send_all(b"!")
        outcome.peer_der = stream.getpeercert(binary_form=True)
    except (trio.BrokenResourceError, ssl.SSLError) as error:
        outcome.error = error
        await stream.aclose()


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Outcome, Outcome]:
    server_transport, client_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, server_ctx, server_side=True)
    client = trio.SSLStream(client_transport, client_ctx, server_hostname=None)
    server_outcome, client_outcome = Outcome(), Outcome()
    with trio.fail_after(HANDSHAKE_DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: talk(server, server_outcome, first=False))
            nursery.start_soon(lambda: talk(client, client_outcome, first=True))
    return server_outcome, client_outcome


# ---------------------------------------------------------------------------
# Identity


def test_identity_files_and_modes(alpha: pki.Identity) -> None:
    identity_dir = alpha.site_dir / "identity"
    assert mode_of(identity_dir) == 0o700
    for key_file in ("ca.key", "site.key"):
        assert mode_of(identity_dir / key_file) == 0o600
    for cert_file in ("ca.pem", "site.pem"):
        assert mode_of(identity_dir / cert_file) & 0o022 == 0  # nobody else may change a cert
    assert alpha.key_path == identity_dir / "site.key"
    assert alpha.cert_path == identity_dir / "site.pem"


def test_identity_site_id_is_the_key_digest(alpha: pki.Identity) -> None:
    key = serialization.load_pem_private_key(alpha.key_path.read_bytes(), password=None)
    assert alpha.site_id == pki.site_id_of(key.public_key())
    assert len(alpha.site_id) == 32 and int(alpha.site_id, 16) >= 0
    cert = x509.load_pem_x509_certificate(alpha.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == alpha.site_id
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "alpha"


def test_identity_ca_is_a_ca(alpha: pki.Identity) -> None:
    ca = x509.load_pem_x509_certificate(alpha.ca_cert_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fabric CA alpha"
    x509.load_pem_x509_certificate(alpha.cert_pem).verify_directly_issued_by(ca)


def test_identity_keys_stay_out_of_repr(alpha: pki.Identity) -> None:
    text = repr(alpha)
    assert alpha.site_id in text
    assert "ca_key" not in text and "site_key" not in text and "EllipticCurve" not in text


def test_load_identity_returns_the_same_site(alpha: pki.Identity) -> None:
    loaded = pki.load_identity(alpha.site_dir)
    assert loaded.site_id == alpha.site_id
    assert loaded.name == "alpha"
    assert loaded.ca_cert_pem == alpha.ca_cert_pem
    assert loaded.cert_pem == alpha.cert_pem


def test_create_identity_twice_refuses(alpha: pki.Identity) -> None:
    before = (alpha.site_dir / "identity" / "site.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a site identity") as caught:
        pki.create_identity(alpha.site_dir, "again")
    assert str(alpha.site_dir / "identity") in str(caught.value)
    assert (alpha.site_dir / "identity" / "site.key").read_bytes() == before


@pytest.mark.parametrize("name", ["", " padded", "a" * 65, "two\nlines", "tab\there"])
def test_create_identity_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="site name"):
        pki.create_identity(tmp_path / "site", name)


@pytest.mark.parametrize("file_name", ["ca.key", "site.key", "ca.pem", "site.pem"])
def test_load_identity_names_a_corrupt_file(alpha: pki.Identity, file_name: str) -> None:
    path = alpha.site_dir / "identity" / file_name
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as caught:
        pki.load_identity(alpha.site_dir)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message


def test_load_identity_names_a_missing_file(alpha: pki.Identity) -> None:
    (alpha.site_dir / "identity" / "ca.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca\.pem is missing"):
        pki.load_identity(alpha.site_dir)


def test_load_identity_refuses_files_from_two_sites(alpha: pki.Identity, beta: pki.Identity) -> None:
    (alpha.site_dir / "identity" / "site.pem").write_bytes(beta.cert_pem)
    with pytest.raises(ConfigError, match=r"site\.pem does not match"):
        pki.load_identity(alpha.site_dir)


def test_load_identity_of_an_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is missing"):
        pki.load_identity(tmp_path)


# ---------------------------------------------------------------------------
# CSR and certificates


def test_signed_csr_certifies_the_redeemer(alpha: pki.Identity, beta: pki.Identity) -> None:
    cert_pem, serial = pki.sign_csr(alpha, pki.make_csr(beta))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert pki.cert_site_id(der_of(cert_pem)) == beta.site_id
    assert pki.cert_serial(der_of(cert_pem)) == serial == cert.serial_number
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(alpha.ca_cert_pem))
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "beta"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_redeemer_checks_the_certificate_the_issuer_sent_back(
    alpha: pki.Identity, beta: pki.Identity, issuer: pki.Identity
) -> None:
    cert_pem = pki.sign_csr(alpha, pki.make_csr(beta))[0].decode()
    pki.check_issued_cert_untrusted(beta, cert_pem, alpha.ca_cert_pem.decode())  # the good answer passes
    with pytest.raises(TokenError, match="unusable certificate"):  # signed by another CA
        pki.check_issued_cert_untrusted(beta, cert_pem, issuer.ca_cert_pem.decode())
    with pytest.raises(TokenError, match="another key"):  # for someone else's key
        pki.check_issued_cert_untrusted(alpha, pki.sign_csr(alpha, pki.make_csr(beta))[0].decode(), alpha.ca_cert_pem.decode())
    with pytest.raises(TokenError, match="unusable certificate"):
        pki.check_issued_cert_untrusted(beta, "not a certificate", alpha.ca_cert_pem.decode())


def test_signed_certs_get_distinct_serials(alpha: pki.Identity, beta: pki.Identity) -> None:
    csr = pki.make_csr(beta)
    serials = {pki.sign_csr(alpha, csr)[1] for _ in range(5)}
    assert len(serials) == 5


def test_signed_cert_validity(alpha: pki.Identity, beta: pki.Identity) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    cert = x509.load_pem_x509_certificate(pki.sign_csr(alpha, pki.make_csr(beta), now=now)[0])
    assert cert.not_valid_before_utc < now
    assert cert.not_valid_after_utc - now >= dt.timedelta(days=3650)


def test_sign_csr_refuses_a_borrowed_site_id(alpha: pki.Identity, beta: pki.Identity) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenError, match=f"certificate request is invalid: it names site '{beta.site_id}'"):
        pki.sign_csr(alpha, csr_pem(impostor, beta.site_id, "beta"))


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"],
)
def test_sign_csr_refuses_garbage(alpha: pki.Identity, data: bytes) -> None:
    with pytest.raises(TokenError, match=r"^certificate request is invalid: "):
        pki.sign_csr(alpha, data)


def test_sign_csr_refuses_a_bad_signature(alpha: pki.Identity) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem(key, pki.site_id_of(key.public_key())))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    with pytest.raises(TokenError, match="signature does not match"):
        pki.sign_csr(alpha, pem_wrap(bytes(der)))


@pytest.mark.parametrize(
    "make_key, why",
    [
        (lambda: rsa.generate_private_key(65537, 1024), "too short"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "curve secp256k1 is not accepted"),
    ],
)
def test_sign_csr_refuses_weak_keys(alpha: pki.Identity, make_key: Any, why: str) -> None:
    key = make_key()
    with pytest.raises(TokenError, match=why):
        pki.sign_csr(alpha, csr_pem(key, pki.site_id_of(key.public_key())))


def test_sign_csr_accepts_rsa_2048(alpha: pki.Identity) -> None:
    key = rsa.generate_private_key(65537, 2048)
    cert_pem, _ = pki.sign_csr(alpha, csr_pem(key, pki.site_id_of(key.public_key()), "rsa-site"))
    assert pki.cert_site_id(der_of(cert_pem)) == pki.site_id_of(key.public_key())


def test_sign_csr_refuses_a_bad_name(alpha: pki.Identity) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenError, match="site name"):
        pki.sign_csr(alpha, csr_pem(key, pki.site_id_of(key.public_key()), "evil\x1b[2Jname"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=2000), st.binary(max_size=600).map(pem_wrap)))
def test_sign_csr_raises_only_token_error(issuer: pki.Identity, data: bytes) -> None:
    with pytest.raises(TokenError, match=r"^certificate request is invalid: "):
        pki.sign_csr(issuer, data)


def self_signed(key: Any, common_name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_cert_site_id_refuses_a_cert_naming_another_key() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    claimed, actual = pki.site_id_of(other.public_key()), pki.site_id_of(key.public_key())
    with pytest.raises(ProtocolError, match=f"^peer certificate names site {claimed} but its key is {actual}$"):
        pki.cert_site_id(self_signed(key, claimed))
    assert pki.cert_site_id(self_signed(key, actual)) == actual


def test_cert_site_id_refuses_garbage() -> None:
    with pytest.raises(ProtocolError, match="does not parse"):
        pki.cert_site_id(b"\x30\x03\x02\x01\x01")
    with pytest.raises(ProtocolError, match="does not parse"):
        pki.cert_serial(b"nonsense")


# ---------------------------------------------------------------------------
# TLS over memory streams


async def test_mutual_tls_identifies_the_client(alpha: pki.Identity, beta: pki.Identity, tmp_path: Path) -> None:
    cert_path = link_cert(alpha, beta, tmp_path)
    client_ctx = pki.client_context(alpha.ca_cert_pem, cert_path, beta.key_path)
    server, client = await handshake(pki.server_context(alpha), client_ctx)
    assert server.error is None and client.error is None
    assert server.peer_der is not None
    assert pki.cert_site_id(server.peer_der) == beta.site_id
    assert pki.cert_serial(server.peer_der) == x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    assert client.peer_der is not None
    assert pki.cert_site_id(client.peer_der) == alpha.site_id


async def test_client_refuses_a_server_of_another_ca(alpha: pki.Identity, beta: pki.Identity) -> None:
    client_ctx = pki.client_context(beta.ca_cert_pem)  # expects beta, reaches alpha
    server, client = await handshake(pki.server_context(alpha), client_ctx)
    assert isinstance(client.error, trio.BrokenResourceError)
    assert isinstance(client.error.__cause__, ssl.SSLCertVerificationError)
    assert isinstance(server.error, trio.BrokenResourceError)
    assert server.peer_der is None


async def test_server_refuses_a_client_cert_of_another_ca(alpha: pki.Identity, beta: pki.Identity) -> None:
    # beta presents its own CA's certificate, which alpha never signed.
    client_ctx = pki.client_context(alpha.ca_cert_pem, beta.cert_path, beta.key_path)
    server, client = await handshake(pki.server_context(alpha), client_ctx)
    assert isinstance(server.error, trio.BrokenResourceError)
    assert isinstance(server.error.__cause__, ssl.SSLError)
    assert server.peer_der is None
    assert isinstance(client.error, trio.BrokenResourceError)


async def test_client_without_cert_may_connect(alpha: pki.Identity) -> None:
    server, client = await handshake(pki.server_context(alpha), pki.client_context(alpha.ca_cert_pem))
    assert server.error is None and client.error is None
    assert not server.peer_der  # no certificate: the caller only lets it redeem a token
    assert client.peer_der is not None


def test_contexts_are_tls13_only(alpha: pki.Identity) -> None:
    for context in (pki.server_context(alpha), pki.client_context(alpha.ca_cert_pem)):
        assert context.minimum_version == context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.check_hostname is False
    assert pki.server_context(alpha).verify_mode == ssl.CERT_OPTIONAL
    assert pki.client_context(alpha.ca_cert_pem).verify_mode == ssl.CERT_REQUIRED


def test_client_context_refuses_a_bad_ca() -> None:
    with pytest.raises(ConfigError, match="CA certificate is not usable"):
        pki.client_context(b"not a certificate")


# ---------------------------------------------------------------------------
# Tokens

_hex = "0123456789abcdef"
_urlsafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_host = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
_address = st.builds(lambda host, port: f"tls://{host}:{port}", _host, st.integers(1, 65535))
_name = st.from_regex(names.PATTERN, fullmatch=True)


def token_fields(issuer: pki.Identity) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "issuer_id": st.text(_hex, min_size=32, max_size=32),
            "issuer_name": _name,
            "addresses": st.lists(_address, min_size=1, max_size=4).map(tuple),
            "ca_pem": st.just(issuer.ca_cert_pem.decode("ascii")),
            "token_id": st.text(_urlsafe, min_size=1, max_size=128),
            "secret": st.text(_urlsafe, min_size=1, max_size=128),
            "expires_at": st.floats(allow_nan=False, allow_infinity=False),
            "cost": st.none() | st.integers(1, 2**31 - 1),
        }
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_token_round_trip(issuer: pki.Identity, data: st.DataObject) -> None:
    token = pki.Token(**data.draw(token_fields(issuer)))
    text = token.dumps()
    document = yaml.safe_load(text)
    assert document["kind"] == "fabric-token" and document["version"] == 1
    assert pki.Token.loads_untrusted(text) == token


def test_token_holds_no_private_key(issuer: pki.Identity) -> None:
    token, _ = pki.new_token(issuer, ["tls://127.0.0.1:4433"], now=0.0)
    text = token.dumps()
    assert "PRIVATE" not in text
    assert token.secret not in repr(token)


def valid_document(issuer: pki.Identity) -> dict[str, Any]:
    token, _ = pki.new_token(issuer, ["tls://127.0.0.1:4433", "tls://[::1]:4433"], now=0.0, cost=3)
    return yaml.safe_load(token.dumps())


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("utf-8", "replace")),
        st.binary().map(lambda b: b.decode("latin-1")),
        st.sampled_from(["[" * 5000, "{a: " * 3000, "- " * 3000, "&a [*a]", "!!python/object:os.system {}", ""]),
    )
)
def test_loads_untrusted_raises_only_token_format_error(text: str) -> None:
    with pytest.raises(TokenFormatError, match=r"^not a fabric token: "):
        pki.Token.loads_untrusted(text)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_loads_untrusted_on_damaged_tokens(issuer: pki.Identity, data: st.DataObject) -> None:
    document = valid_document(issuer)
    key = data.draw(st.sampled_from([*document, "cost", "extra"]) | st.text(max_size=8))
    if data.draw(st.booleans()):
        document.pop(key, None)
    else:
        document[key] = data.draw(_junk)
    text = yaml.safe_dump(document)
    try:
        token = pki.Token.loads_untrusted(text)
    except TokenFormatError as error:
        assert str(error).startswith("not a fabric token: ")
        assert "\n" not in str(error)
    else:  # the damage happened to be harmless (an optional key dropped, a value kept valid)
        assert token == pki.Token.loads_untrusted(token.dumps())


@pytest.mark.parametrize(
    "change, why",
    [
        ({"kind": "fabric-grant"}, "kind"),
        ({"version": 2}, "version 2 is not supported"),
        ({"version": True}, "version True"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"secret": None}, "missing key 'secret'"),
        ({"addresses": "tls://a:1"}, "addresses must be a list"),
        ({"addresses": []}, "1 to 16 link addresses"),
        ({"addresses": ["http://a:1"]}, "must start with one of: tls://, ws://, wss://"),
        ({"addresses": ["tls://a:1/fabric"]}, "a tls:// address has no path"),
        ({"addresses": ["ws://a:1/a path"]}, "the path has characters"),
        ({"addresses": ["wss://a:0/fabric"]}, "port"),
        ({"addresses": ["tls://a"]}, "port"),
        ({"addresses": ["tls://a:0"]}, "port"),
        ({"addresses": ["tls://a:99999"]}, "port"),
        ({"addresses": ["tls://a b:1"]}, "host"),
        ({"addresses": ["tls://[::g]:1"]}, "IPv6"),
        ({"ca_pem": "hello"}, "ca_pem is not a PEM certificate"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": float("nan")}, "expires_at"),
        ({"cost": 0}, "cost"),
        ({"cost": True}, "cost"),
        ({"issuer_id": "ABC"}, "issuer_id"),
        ({"token_id": "has space"}, "token_id"),
    ],
)
def test_loads_untrusted_says_why(issuer: pki.Identity, change: dict[str, Any], why: str) -> None:
    document = valid_document(issuer)
    for key, value in change.items():
        if value is None:
            del document[key]
        else:
            document[key] = value
    with pytest.raises(TokenFormatError, match="^not a fabric token: .*" + why.replace("[", r"\[")):
        pki.Token.loads_untrusted(yaml.safe_dump(document))


def alias_bomb(depth: int = 8) -> str:
    """A token-shaped document of ~300 bytes whose `version`, built, would be 9 ** depth strings."""
    names = "abcdefghij"[:depth]
    lines = ["kind: fabric-token", f"{names[0]}: &{names[0]} [x,x,x,x,x,x,x,x,x]"]
    lines += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in itertools.pairwise(names)]
    return "\n".join([*lines, f"version: *{names[-1]}"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 400
    path = tmp_path / "bomb.token"
    path.write_text(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(TokenFormatError, match=r"^not a fabric token: it uses a YAML anchor"):
            pki.Token.loads_untrusted(bomb)
        with pytest.raises(TokenFormatError, match=r"bomb\.token is not a fabric token: it uses a YAML anchor"):
            pki.Token.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # bytes; built, the document takes hundreds of megabytes


@pytest.mark.parametrize(
    "old, new, why",
    [
        ("kind: fabric-token", "kind: &k fabric-token", "a YAML anchor"),
        ("kind: fabric-token", "kind: *k", "a YAML alias"),  # refused before it is found undefined
        ("kind: fabric-token", "kind: !!str fabric-token", "a YAML tag"),
        ("kind: fabric-token", "kind: ! fabric-token", "a YAML tag"),
        ("kind: fabric-token", "kind: !!python/object:os.system {}", "a YAML tag"),
    ],
)
def test_loads_untrusted_refuses_anchors_aliases_and_tags(issuer: pki.Identity, old: str, new: str, why: str) -> None:
    """A token never has them: refused even in a token that is otherwise valid."""
    token, _ = pki.new_token(issuer, ["tls://127.0.0.1:4433"], now=0.0)
    text = token.dumps()
    assert old in text and pki.Token.loads_untrusted(text) == token
    with pytest.raises(TokenFormatError, match=f"^not a fabric token: it uses {why}"):
        pki.Token.loads_untrusted(text.replace(old, new))


def test_loads_untrusted_refuses_a_leaf_cert_as_ca(issuer: pki.Identity) -> None:
    document = valid_document(issuer)
    document["ca_pem"] = issuer.cert_pem.decode("ascii")
    with pytest.raises(TokenFormatError, match="not a CA certificate"):
        pki.Token.loads_untrusted(yaml.safe_dump(document))


def test_token_save_and_load(alpha: pki.Identity, tmp_path: Path) -> None:
    token, _ = pki.new_token(alpha, ["tls://127.0.0.1:4433"], now=1000.0)
    (tmp_path / "tokens").mkdir()
    path = tmp_path / "tokens" / "alpha.token"
    token.save(path)
    assert mode_of(path) == 0o600
    assert pki.Token.load(path) == token
    path.chmod(0o644)
    token.save(path)  # overwriting an existing, looser file still leaves 0600
    assert mode_of(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["alpha.token"]  # no temp file left


def test_token_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.token"
    with pytest.raises(TokenError, match="No such file") as caught:
        pki.Token.load(missing)
    assert str(missing) in str(caught.value) and "\n" not in str(caught.value)
    garbage = tmp_path / "garbage.token"
    garbage.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(TokenFormatError, match="not UTF-8") as caught_format:
        pki.Token.load(garbage)
    assert str(garbage) in str(caught_format.value)
    garbage.write_text("kind: something-else\n")
    with pytest.raises(TokenFormatError, match="is not a fabric token: kind"):
        pki.Token.load(garbage)


def test_new_token_makes_a_matching_grant(alpha: pki.Identity) -> None:
    token, grant = pki.new_token(
        alpha, ["tls://127.0.0.1:4433"], now=1000.0, redemptions_allowed=3, expiration_window=60.0, cost=5
    )
    assert token.issuer_id == alpha.site_id and token.issuer_name == "alpha"
    assert token.ca_pem.encode("ascii") == alpha.ca_cert_pem
    assert token.expires_at == grant.expires_at == 1060.0
    assert grant.token_id == token.token_id
    assert (grant.redemptions_allowed, grant.redemptions_used, grant.cost) == (3, 0, 5)
    assert token.secret not in repr(grant)
    other, _ = pki.new_token(alpha, ["tls://127.0.0.1:4433"], now=1000.0)
    assert other.token_id != token.token_id and other.secret != token.secret


@pytest.mark.parametrize(
    "addresses, kwargs, why",
    [
        (["tls://127.0.0.1:4433"], {"redemptions_allowed": 0}, "at least 1 redemption"),
        (["tls://127.0.0.1:4433"], {"expiration_window": 0.0}, "positive number of seconds"),
        (["tls://127.0.0.1:4433"], {"expiration_window": float("inf")}, "positive number of seconds"),
        (["tls://127.0.0.1:4433"], {"cost": 0}, "cost"),
        ("tls://127.0.0.1:4433", {}, "not one string"),
        ([], {}, "link addresses"),
        (["127.0.0.1:4433"], {}, "must start with one of"),
    ],
)
def test_new_token_refuses_bad_requests(alpha: pki.Identity, addresses: Any, kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(TokenError, match=why):
        pki.new_token(alpha, addresses, now=0.0, **kwargs)


# ---------------------------------------------------------------------------
# Grants

EXPIRES = 1_795_262_400.0  # 2026-11-21 12:00:00 UTC


@pytest.fixture
def issued(alpha: pki.Identity) -> tuple[pki.Token, dict[str, pki.TokenGrant]]:
    token, grant = pki.new_token(
        alpha, ["tls://127.0.0.1:4433"], now=EXPIRES - 900.0, redemptions_allowed=2
    )
    return token, {grant.token_id: grant}


def spend_all(grants: dict[str, pki.TokenGrant], token: pki.Token, times: int, now: float) -> None:
    for _ in range(times):
        grants[token.token_id] = pki.spend_grant(grants, token.token_id, token.secret, now=now)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("unknown id", TokenForgedError, "token was not issued by this site"),
        ("wrong secret", TokenForgedError, "token secret does not match: the token is forged or damaged"),
        ("wrong secret, expired", TokenForgedError, "token secret does not match: the token is forged or damaged"),
        ("expired", TokenExpiredError, "token expired at 2026-11-21 12:00:00 UTC"),
        ("spent and expired", TokenExpiredError, "token expired at 2026-11-21 12:00:00 UTC"),
        ("spent", TokenSpentError, "token already redeemed: it allowed 2 redemption(s) and all are used"),
        ("withdrawn", TokenSpentError, "token withdrawn: a site that redeemed it was revoked; ask for a new token"),
        ("withdrawn and expired", TokenExpiredError, "token expired at 2026-11-21 12:00:00 UTC"),
        ("withdrawn, wrong secret", TokenForgedError, "token secret does not match: the token is forged or damaged"),
    ],
)
def test_spend_grant_refusals(
    issued: tuple[pki.Token, dict[str, pki.TokenGrant]], case: str, error: type[Exception], message: str
) -> None:
    token, grants = issued
    token_id, secret, now = token.token_id, token.secret, EXPIRES - 1.0
    if case == "unknown id":
        token_id = "0123456789abcdef"
    if "wrong secret" in case:
        secret = token.secret[:-1] + ("A" if token.secret[-1] != "A" else "B")
    if "spent" in case:
        spend_all(grants, token, 2, now)
    if "withdrawn" in case:
        grants[token.token_id] = attrs.evolve(grants[token.token_id], withdrawn=True)
    if "expired" in case:
        now = EXPIRES
    before = dict(grants)
    with pytest.raises(error) as caught:
        pki.spend_grant(grants, token_id, secret, now=now)
    assert str(caught.value) == message
    assert grants == before  # a refusal changes nothing


def test_spend_grant_messages_are_distinct(issued: tuple[pki.Token, dict[str, pki.TokenGrant]]) -> None:
    token, grants = issued
    good_time, late = EXPIRES - 1.0, EXPIRES + 1.0
    attempts = [
        ("ffffffffffffffff", token.secret, good_time),  # unknown id
        (token.token_id, "not-the-secret", good_time),  # wrong secret
        (token.token_id, token.secret, late),  # expired
    ]
    messages = []
    for token_id, secret, now in attempts:
        with pytest.raises(TokenError) as caught:
            pki.spend_grant(grants, token_id, secret, now=now)
        messages.append(str(caught.value))
    spend_all(grants, token, 2, good_time)
    with pytest.raises(TokenSpentError) as spent:
        pki.spend_grant(grants, token.token_id, token.secret, now=good_time)
    messages.append(str(spent.value))
    assert len(set(messages)) == 4, messages


def test_spend_grant_counts_uses(issued: tuple[pki.Token, dict[str, pki.TokenGrant]]) -> None:
    token, grants = issued
    original = grants[token.token_id]
    spent = pki.spend_grant(grants, token.token_id, token.secret, now=EXPIRES - 1.0)
    assert spent.redemptions_used == 1
    assert original.redemptions_used == 0  # grants are values: the caller stores the new one
    assert spent == pki.TokenGrant(
        token_id=original.token_id,
        secret_sha256=original.secret_sha256,
        redemptions_allowed=2,
        redemptions_used=1,
        expires_at=original.expires_at,
        cost=None,
    )


@pytest.mark.parametrize("token_id, secret", [(None, "x"), ("id", None), ("id", "\ud800"), ("", "")])
def test_spend_grant_with_odd_input_is_forged(
    issued: tuple[pki.Token, dict[str, pki.TokenGrant]], token_id: Any, secret: Any
) -> None:
    token, grants = issued
    with pytest.raises(TokenForgedError):
        pki.spend_grant(grants, token.token_id if token_id == "id" else token_id, secret, now=0.0)


def test_grants_round_trip(alpha: pki.Identity, tmp_path: Path) -> None:
    grants = {}
    for cost in (None, 7):
        _, grant = pki.new_token(alpha, ["tls://h:1"], now=1.5, redemptions_allowed=4, cost=cost)
        grants[grant.token_id] = grant
    path = tmp_path / "state" / "grants.json"
    path.parent.mkdir()
    pki.save_grants(path, grants)
    assert mode_of(path) == 0o600
    assert pki.load_grants(path) == grants
    pki.save_grants(path, {})  # replaces, atomically
    assert pki.load_grants(path) == {}
    assert [p.name for p in path.parent.iterdir()] == ["grants.json"]


def test_grants_keep_revocations_and_withdrawals(alpha: pki.Identity, beta: pki.Identity, tmp_path: Path) -> None:
    token, grant = pki.new_token(alpha, ["tls://h:1"], now=1.5, redemptions_allowed=3)
    issued = (
        pki.IssuedCert(serial=7, site_id=beta.site_id, name="beta", revoked=True),
        pki.IssuedCert(serial=8, site_id=alpha.site_id, name="other"),
    )
    grants = {token.token_id: attrs.evolve(grant, issued=issued, redemptions_used=2, withdrawn=True)}
    path = tmp_path / "grants.json"
    pki.save_grants(path, grants)
    loaded = pki.load_grants(path)
    assert loaded == grants
    assert pki.revoked_sites(loaded) == {beta.site_id: "beta"}


def test_missing_grants_file_is_no_grants(tmp_path: Path) -> None:
    assert pki.load_grants(tmp_path / "nothing.json") == {}


def good_grant_document(alpha: pki.Identity) -> dict[str, Any]:
    _, grant = pki.new_token(alpha, ["tls://h:1"], now=0.0)
    return {
        "kind": "fabric-grants",
        "version": 1,
        "grants": [
            {
                "token_id": grant.token_id,
                "secret_sha256": grant.secret_sha256,
                "redemptions_allowed": 1,
                "redemptions_used": 0,
                "expires_at": 900.0,
                "cost": None,
            }
        ],
    }


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"{not json",
        lambda d: b"\xff\xfe",
        lambda d: json.dumps({**d, "kind": "other"}).encode(),
        lambda d: json.dumps({**d, "version": 2}).encode(),
        lambda d: json.dumps({**d, "grants": [{**d["grants"][0], "redemptions_used": "0"}]}).encode(),
        lambda d: json.dumps({**d, "grants": [{**d["grants"][0], "surprise": 1}]}).encode(),
        lambda d: json.dumps({**d, "grants": [{**d["grants"][0], "redemptions_used": 2}]}).encode(),
        lambda d: json.dumps({**d, "grants": [{**d["grants"][0], "secret_sha256": "00"}]}).encode(),
        lambda d: json.dumps({**d, "grants": d["grants"] * 2}).encode(),
        lambda d: json.dumps({**d, "grants": "all of them"}).encode(),
        lambda d: json.dumps({**d, "grants": [{**d["grants"][0], "withdrawn": "yes"}]}).encode(),
    ],
)
def test_corrupt_grants_file(alpha: pki.Identity, tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "grants.json"
    document = good_grant_document(alpha)
    path.write_text(json.dumps(document))
    assert len(pki.load_grants(path)) == 1  # the undamaged document loads
    path.write_bytes(damage(document))
    with pytest.raises(ConfigError) as caught:
        pki.load_grants(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
