"""A site's identity (its own CA and key pair), certificates, TLS contexts and tokens.

Trust model (DESIGN.md, Security): every site is its own certificate
authority. A site that accepts links serves a certificate signed by its own CA;
a site that redeems a token gets its key certified by the issuer's CA, and from
then on the two verify each other by CA and by *site id*, never by host name.

The site id is a digest of the site's public key, so a certificate can only
claim the id of the key it certifies: `cert_site_id` checks exactly that.

Everything here is synchronous and takes time as an argument; callers on the
event loop run the key generation and file I/O in a thread. Functions that
read bytes from the network or from a file someone handed us end in
`_untrusted` or say so in their docstring, and raise one error type only.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .addresses import parse_address
from .errors import (
    ConfigError,
    ProtocolError,
    TokenError,
    TokenExpiredError,
    TokenForgedError,
    TokenFormatError,
    TokenSpentError,
)
from .files import write_new_file, write_private_atomic
from .names import brief as _brief
from .names import check_name, check_names
from .router.frames import check_cost
from .strict import strict

__all__ = [
    "Identity",
    "Token",
    "TokenGrant",
    "cert_serial",
    "cert_site_id",
    "cert_site_name",
    "client_context",
    "create_identity",
    "csr_site_id",
    "load_grants",
    "load_identity",
    "make_csr",
    "new_token",
    "public_key_der",
    "save_grants",
    "server_context",
    "sign",
    "sign_csr",
    "site_id_of",
    "spend_grant",
    "verify_signature_untrusted",
]

IDENTITY_DIR = "identity"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
SITE_KEY_FILE = "site.key"
SITE_CERT_FILE = "site.pem"

SITE_ID_LENGTH = 32  # hex digits = 128 bits of SHA-256: collisions need ~2**64 keys

# Links are ended by revocation (the issuer refuses the serial and drops the
# link), not by expiry: a certificate that expired would silently cut a
# network apart years after setup. So site certificates live 10 years, and the
# CA twice that so it outlives every certificate it signs for a decade.
SITE_CERT_VALIDITY = dt.timedelta(days=3653)  # 10 years
CA_CERT_VALIDITY = dt.timedelta(days=7305)  # 20 years
# Certificates start this long before "now" so a peer whose clock is a little
# behind does not see a certificate from the future.
CLOCK_SKEW = dt.timedelta(minutes=5)

MAX_CSR_BYTES = 16 * 1024  # a PEM CSR is < 1 KiB; anything larger is not ours
MIN_RSA_BITS = 2048  # below this an RSA key is breakable; refuse to certify it
# Curves whose keys a redeemer may ask us to certify. P-256 is what fabric
# makes; P-384 costs nothing to allow and some deployments mandate it.
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

TOKEN_KIND = "fabric-token"
TOKEN_VERSION = 1
MAX_TOKEN_TEXT = 64 * 1024  # characters; a real token is ~1.5 KB, mostly the CA cert
MAX_TOKEN_ADDRESSES = 16  # a site with more link addresses than this is misconfigured
TOKEN_SECRET_BYTES = 32  # 256 bits: guessing it is hopeless even without expiry
TOKEN_ID_BYTES = 8  # 64 bits: only has to be unique among one issuer's grants
DEFAULT_EXPIRATION_WINDOW = 900.0  # seconds; long enough to copy a file to another host
DEFAULT_REDEMPTIONS = 1  # a token links one site unless its issuer says more

GRANTS_KIND = "fabric-grants"
GRANTS_VERSION = 1

_HEX_ID = re.compile(r"[0-9a-f]{%d}" % SITE_ID_LENGTH)
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------
# Site ids and identity


def site_id_of(public_key: CertificatePublicKeyTypes) -> str:
    """The site id a key may claim: the SHA-256 of its SubjectPublicKeyInfo, in hex.

    Derived from the key alone, so no other key can claim it: a peer cannot
    borrow another site's id without that site's private key.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()[:SITE_ID_LENGTH]


@attrs.frozen
class Identity:
    """A site's own CA and key pair, as stored under `site_dir / "identity"`.

    The private keys are held as objects for signing and never shown:
    `repr=False` keeps them out of logs and tracebacks.
    """

    site_id: str
    name: str
    site_dir: Path
    ca_cert_pem: bytes = attrs.field(repr=False)
    cert_pem: bytes = attrs.field(repr=False)
    _ca_key: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False, eq=False)
    _site_key: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False, eq=False)

    @property
    def identity_dir(self) -> Path:
        return self.site_dir / IDENTITY_DIR

    @property
    def key_path(self) -> Path:
        """The site's private key (PEM), for `ssl.SSLContext.load_cert_chain`."""
        return self.identity_dir / SITE_KEY_FILE

    @property
    def cert_path(self) -> Path:
        """The site's certificate signed by its own CA (PEM), for `load_cert_chain`."""
        return self.identity_dir / SITE_CERT_FILE


def create_identity(site_dir: Path, name: str, *, now: dt.datetime | None = None) -> Identity:
    """Make a new CA and site key pair under `site_dir / "identity"`.

    Refuses to touch an existing identity: replacing keys would silently cut
    every link this site has. Key files are created mode 0600 from the start
    (never world-readable, even for an instant) and exclusively, so two
    processes racing to create the same identity cannot mix their files.
    """
    try:
        check_name(name, "site name")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    now = _utc(now)
    identity_dir = Path(site_dir) / IDENTITY_DIR
    paths = [identity_dir / f for f in (CA_KEY_FILE, CA_CERT_FILE, SITE_KEY_FILE, SITE_CERT_FILE)]
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        raise ConfigError(f"{identity_dir} already holds a site identity ({existing[0].name}); refusing to replace it")
    _make_private_dir(identity_dir)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    site_key = ec.generate_private_key(ec.SECP256R1())
    site_id = site_id_of(site_key.public_key())
    ca_cert = _make_ca_cert(ca_key, name, now)
    site_cert = _issue_site_cert(ca_key, ca_cert, site_key.public_key(), name, now)

    ca_cert_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    cert_pem = site_cert.public_bytes(serialization.Encoding.PEM)
    write_new_file(identity_dir / CA_KEY_FILE, _private_pem(ca_key), 0o600)
    write_new_file(identity_dir / SITE_KEY_FILE, _private_pem(site_key), 0o600)
    write_new_file(identity_dir / CA_CERT_FILE, ca_cert_pem, 0o644)
    write_new_file(identity_dir / SITE_CERT_FILE, cert_pem, 0o644)
    return Identity(
        site_id=site_id,
        name=name,
        site_dir=Path(site_dir),
        ca_cert_pem=ca_cert_pem,
        cert_pem=cert_pem,
        ca_key=ca_key,
        site_key=site_key,
    )


def load_identity(site_dir: Path) -> Identity:
    """Read a site's identity back, checking that its four files belong together.

    Every failure is a one-line `ConfigError` naming the file at fault, so a
    damaged site directory says which file to restore.
    """
    identity_dir = Path(site_dir) / IDENTITY_DIR
    ca_key = _load_private_key(identity_dir / CA_KEY_FILE)
    site_key = _load_private_key(identity_dir / SITE_KEY_FILE)
    ca_cert_path = identity_dir / CA_CERT_FILE
    site_cert_path = identity_dir / SITE_CERT_FILE
    ca_cert = _load_cert(ca_cert_path)
    site_cert = _load_cert(site_cert_path)

    if _spki(ca_cert.public_key()) != _spki(ca_key.public_key()):
        raise ConfigError(f"{ca_cert_path} does not match the key in {CA_KEY_FILE}")
    if _spki(site_cert.public_key()) != _spki(site_key.public_key()):
        raise ConfigError(f"{site_cert_path} does not match the key in {SITE_KEY_FILE}")
    try:
        site_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{site_cert_path} is not signed by the CA in {CA_CERT_FILE}") from None
    site_id = site_id_of(site_key.public_key())
    try:
        common_name = _single_attribute(site_cert.subject, NameOID.COMMON_NAME)
        name = _single_attribute(site_cert.subject, NameOID.ORGANIZATION_NAME)
    except ValueError as error:
        raise ConfigError(f"{site_cert_path} has a malformed subject: {error}") from None
    if common_name != site_id:
        raise ConfigError(f"{site_cert_path} does not name site {site_id}, the id of {SITE_KEY_FILE}")
    if name is None:
        raise ConfigError(f"{site_cert_path} has no site name (organizationName)")
    return Identity(
        site_id=site_id,
        name=name,
        site_dir=Path(site_dir),
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=site_cert.public_bytes(serialization.Encoding.PEM),
        ca_key=ca_key,
        site_key=site_key,
    )


# ---------------------------------------------------------------------------
# Certificates


def make_csr(identity: Identity) -> bytes:
    """A PEM certificate request for the site's own key, to send when redeeming a token."""
    subject = _site_subject(identity.site_id, identity.name)
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject)
    signed = csr.sign(identity._site_key, _hash_for(identity._site_key))
    return signed.public_bytes(serialization.Encoding.PEM)


def sign_csr(identity: Identity, csr_pem: bytes, *, now: dt.datetime | None = None) -> tuple[bytes, int]:
    """Certify a redeemer's key with this site's CA; returns (cert PEM, serial).

    `csr_pem` is untrusted (it comes off the network): anything wrong with it
    raises `TokenError("certificate request is invalid: ...")` and nothing
    else. Accepted keys: EC P-256 or P-384, Ed25519, RSA of 2048 bits or more.
    Only the key, the site id and the name are taken from the request; the
    issuer decides every extension, so a redeemer cannot ask to become a CA.
    """
    public_key, name = _check_csr_untrusted(csr_pem)
    ca_cert = x509.load_pem_x509_certificate(identity.ca_cert_pem)
    cert = _issue_site_cert(identity._ca_key, ca_cert, public_key, name, _utc(now))
    return cert.public_bytes(serialization.Encoding.PEM), cert.serial_number


def csr_site_id(csr_pem: bytes) -> str:
    """The site id of the key a redeemer's request asks to certify: who it is, before anything is signed.

    `csr_pem` is untrusted: raises `TokenError` as `sign_csr` does.
    """
    public_key, _ = _check_csr_untrusted(csr_pem)
    return site_id_of(public_key)


def cert_site_id(cert_der: bytes) -> str:
    """The site id of a peer certificate that TLS has already verified against a CA.

    The CA vouches for the certificate; this checks the certificate's claim:
    its subject CN must be the id of its own key. Raises `ProtocolError`.
    """
    cert = _load_peer_cert(cert_der)
    try:
        key_id = site_id_of(cert.public_key())
        claimed = _single_attribute(cert.subject, NameOID.COMMON_NAME)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ProtocolError(f"peer certificate is unusable: {error}") from None
    if claimed != key_id:
        raise ProtocolError(f"peer certificate names site {claimed} but its key is {key_id}")
    return key_id


def cert_site_name(cert_der: bytes) -> str | None:
    """The site name (organizationName) a peer certificate that TLS has already verified carries.

    The CA that signed it vouches for the name, as for the id. None when it
    carries none. Raises `ProtocolError`.
    """
    try:
        return _single_attribute(_load_peer_cert(cert_der).subject, NameOID.ORGANIZATION_NAME)
    except ValueError as error:
        raise ProtocolError(f"peer certificate is unusable: {error}") from None


def check_issued_cert_untrusted(identity: Identity, cert_pem: str, issuer_ca_pem: str) -> None:
    """The certificate an issuer sent back on redemption: for our key, signed by its CA.

    Checked before it is saved, so a broken answer is a `TokenError` now
    rather than a puzzling TLS failure at every dial later.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(issuer_ca_pem.encode())
        cert.verify_directly_issued_by(ca)
        if _spki(cert.public_key()) != _spki(identity._site_key.public_key()):
            raise ValueError("it certifies another key")
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature, x509.InvalidVersion) as error:
        raise TokenError(f"the issuer sent back an unusable certificate: {_one_line(str(error))}") from None


def pem_to_der(cert_pem: bytes) -> bytes:
    """A PEM certificate (one we made ourselves) in DER, the form the cert_* readers take."""
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def cert_serial(cert_der: bytes) -> int:
    """The serial number of a peer certificate: what revocation refuses."""
    return _load_peer_cert(cert_der).serial_number


def _make_ca_cert(ca_key: ec.EllipticCurvePrivateKey, name: str, now: dt.datetime) -> x509.Certificate:
    # Cut to a commonName's 64 characters: a long site name would not fit beside the prefix.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fabric CA {name}"[:64])])
    public_key = ca_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def _issue_site_cert(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    public_key: CertificatePublicKeyTypes,
    name: str | None,
    now: dt.datetime,
) -> x509.Certificate:
    """A site certificate: CN = the key's site id, O = the site's name, client+server auth."""
    # A certificate may not outlive its CA, or its chain breaks before it expires.
    not_after = min(now + SITE_CERT_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_site_subject(site_id_of(public_key), name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    return builder.sign(ca_key, _hash_for(ca_key))


def _site_subject(site_id: str, name: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, site_id)]
    if name is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, name))
    return x509.Name(attributes)


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_csr_untrusted(csr_pem: bytes) -> tuple[CertificatePublicKeyTypes, str | None]:
    """Parse and check a redeemer's CSR; returns its key and name, or raises TokenError."""

    def invalid(why: str) -> TokenError:
        return TokenError(f"certificate request is invalid: {why}")

    if not isinstance(csr_pem, bytes):
        raise invalid(f"expected PEM bytes, got {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise invalid(f"it is {len(csr_pem)} bytes long, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
        common_name = _single_attribute(csr.subject, NameOID.COMMON_NAME)
        name = _single_attribute(csr.subject, NameOID.ORGANIZATION_NAME)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as error:
        raise invalid(_one_line(str(error)) or "it does not parse") from None
    if not signature_ok:
        raise invalid("its signature does not match its key")
    why_not = _why_key_refused(public_key)
    if why_not:
        raise invalid(why_not)
    key_id = site_id_of(public_key)
    if common_name != key_id:
        raise invalid(f"it names site {_brief(common_name)} but its key is {key_id}")
    if name is not None:
        try:
            check_name(name, "site name")
        except ValueError as error:
            raise invalid(str(error)) from None
    return public_key, name


def _why_key_refused(public_key: CertificatePublicKeyTypes) -> str | None:
    """Why we will not certify this key, or None if it is strong enough."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ALLOWED_CURVES):
            return None
        return f"EC curve {public_key.curve.name} is not accepted (use P-256)"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= MIN_RSA_BITS:
            return None
        return f"RSA key of {public_key.key_size} bits is too short (at least {MIN_RSA_BITS})"
    return f"{type(public_key).__name__} keys are not accepted (use EC P-256)"


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519 hashes internally and refuses an external hash.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _single_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    """The one value of `oid` in `name`; None if absent. Two values is ambiguous: refuse."""
    values = name.get_attributes_for_oid(oid)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"the subject has {len(values)} {oid._name} attributes")
    value = values[0].value
    if not isinstance(value, str):
        raise ValueError(f"the subject's {oid._name} is not text")
    return value


def _load_peer_cert(cert_der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(cert_der)
    except (ValueError, TypeError, x509.InvalidVersion) as error:
        raise ProtocolError(f"peer certificate does not parse: {_one_line(str(error))}") from None


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    # Unencrypted: the site starts unattended. The file mode (0600) and the
    # directory mode (0700) are what protect it, as for an ssh host key.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_private_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    data = _read_config_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ConfigError(f"{path} is not a usable private key: {_one_line(str(error))}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{path} holds a {type(key).__name__}, which cannot sign certificates")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    data = _read_config_file(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as error:
        raise ConfigError(f"{path} is not a PEM certificate: {_one_line(str(error))}") from None


# ---------------------------------------------------------------------------
# TLS contexts


def server_context(identity: Identity) -> ssl.SSLContext:
    """TLS for accepting links: serve our own cert, ask for (not require) a client cert.

    A client without a certificate may only redeem a token; the caller checks
    `getpeercert()` and enforces that. A client certificate must chain to our
    own CA, which is the only CA that signs certificates we accept.
    """
    context = _tls13_context(ssl.PROTOCOL_TLS_SERVER)
    _load_cert_chain(context, identity.cert_path, identity.key_path)
    _load_ca(context, identity.ca_cert_pem)
    context.verify_mode = ssl.CERT_OPTIONAL
    # Links never resume sessions, so tickets would only be wasted bytes (and
    # a resumed session would skip the client-certificate check).
    context.num_tickets = 0
    return context


def client_context(
    ca_pem: bytes, cert_path: Path | None = None, key_path: Path | None = None
) -> ssl.SSLContext:
    """TLS for dialing a link: the server must chain to `ca_pem` (the CA from its token).

    Host names are not checked: the peer is identified by its CA and its site
    id, so a link keeps working through NAT, proxies and changed addresses.
    `cert_path`/`key_path` are our certificate signed by that peer's CA and our
    key; leave both None when redeeming a token (we have no certificate yet).
    """
    if (cert_path is None) != (key_path is None):
        raise ValueError("give both cert_path and key_path, or neither")
    context = _tls13_context(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, ca_pem)
    if cert_path is not None and key_path is not None:
        _load_cert_chain(context, cert_path, key_path)
    return context


def _tls13_context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    # TLS 1.3 only: one round trip, no legacy cipher suites, and the client's
    # certificate is encrypted (a passive observer cannot read site ids).
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    # RFC 5280 strictness: our certificates comply, so a malformed one is hostile.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _load_ca(context: ssl.SSLContext, ca_pem: bytes) -> None:
    try:
        # cadata takes str for PEM (bytes would be read as DER).
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as error:
        raise ConfigError(f"CA certificate is not usable: {_one_line(str(error))}") from None


def _load_cert_chain(context: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
    try:
        context.load_cert_chain(cert_path, key_path)
    except OSError as error:  # ssl.SSLError is an OSError
        reason = error.strerror or _one_line(str(error))
        raise ConfigError(f"cannot load certificate {cert_path} with key {key_path}: {reason}") from None


# ---------------------------------------------------------------------------
# Tokens


def _check_site_id(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _HEX_ID.fullmatch(value):
        raise ValueError(f"{attribute.name} must be {SITE_ID_LENGTH} lowercase hex digits")


def _check_site_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    check_name(value, attribute.name)


def _check_routing_keys(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    check_names(value, attribute.name)


def _check_urlsafe(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not _URLSAFE.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 1 to 128 characters of A-Z a-z 0-9 _ -")


def _check_sha256_hex(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 64 lowercase hex digits")


def _check_addresses(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_TOKEN_ADDRESSES:
        raise ValueError(f"{attribute.name} must list 1 to {MAX_TOKEN_ADDRESSES} link addresses")
    for address in value:
        parse_address(address)  # ValueError saying what is wrong with it


def _check_ca_pem(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_TOKEN_TEXT:
        raise ValueError(f"{attribute.name} must be a PEM certificate")
    try:
        certs = x509.load_pem_x509_certificates(value.encode("ascii"))
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is not a ValueError
        raise ValueError(f"{attribute.name} is not a PEM certificate") from None
    if len(certs) != 1:
        raise ValueError(f"{attribute.name} must hold exactly one certificate, not {len(certs)}")
    try:
        constraints = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ValueError(f"{attribute.name} is not a CA certificate") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise ValueError(f"{attribute.name} has malformed extensions") from None
    if not constraints.ca:
        raise ValueError(f"{attribute.name} is not a CA certificate")


def _check_count(minimum: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if type(value) is not int or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer of at least {minimum}")

    return check


def _to_time(value: Any) -> float:
    """A unix time from a number; bools and NaN/inf are refused (they are never times)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError("expires_at must be a finite number of seconds since 1970 (UTC)")
    return float(value)


@attrs.frozen
class Token:
    """What a token file carries: where the issuer listens, its CA, and a one-time secret.

    No private key: a stolen token only lets its holder link once, before it
    expires, and the issuer can see and revoke that link. The secret is kept
    out of `repr` so it does not end up in logs.
    """

    issuer_id: str = attrs.field(validator=_check_site_id)
    issuer_name: str = attrs.field(validator=_check_site_name)
    addresses: tuple[str, ...] = attrs.field(validator=_check_addresses)
    ca_pem: str = attrs.field(validator=_check_ca_pem, repr=False)
    token_id: str = attrs.field(validator=_check_urlsafe)
    secret: str = attrs.field(validator=_check_urlsafe, repr=False)
    expires_at: float = attrs.field(converter=_to_time)  # unix seconds, UTC
    cost: int | None = attrs.field(default=None, validator=attrs.validators.optional(check_cost))  # link cost; None: the redeemer's default

    def dumps(self) -> str:
        """The token as a small YAML document that people can read (and see it is a token)."""
        document: dict[str, Any] = {"kind": TOKEN_KIND, "version": TOKEN_VERSION}
        document.update(attrs.asdict(self, recurse=False))
        document["addresses"] = list(self.addresses)
        if self.cost is None:
            del document["cost"]
        return yaml.dump(document, Dumper=_TokenDumper, sort_keys=False, allow_unicode=True, width=1000)

    @classmethod
    def loads_untrusted(cls, text: str) -> Token:
        """Parse a token someone handed us. Raises `TokenFormatError` and nothing else."""
        try:
            return _parse_token(text)
        except _Malformed as error:
            raise TokenFormatError(f"not a fabric token: {error}") from None

    def save(self, path: Path) -> None:
        """Write the token, mode 0600: it holds a secret that lets its holder link."""
        try:
            write_private_atomic(Path(path), self.dumps().encode("utf-8"))
        except OSError as error:
            raise TokenError(f"cannot write token {path}: {error.strerror or error}") from None

    @classmethod
    def load(cls, path: Path) -> Token:
        """Read a token file: `TokenError` if unreadable, `TokenFormatError` if not a token."""
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_TOKEN_TEXT * 4 + 1)  # UTF-8 is at most 4 bytes a character
        except OSError as error:
            raise TokenError(f"cannot read token {path}: {error.strerror or error}") from None
        if len(data) > MAX_TOKEN_TEXT * 4:
            raise TokenFormatError(f"{path} is not a fabric token: it is far too large")
        try:
            return _parse_token(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenFormatError(f"{path} is not a fabric token: it is not UTF-8 text") from None
        except _Malformed as error:
            raise TokenFormatError(f"{path} is not a fabric token: {error}") from None


class _TokenDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line text (the CA certificate) as a readable block."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TokenDumper.add_representer(str, _represent_str)


class _Malformed(Exception):
    """Internal: why a token document was refused (becomes TokenFormatError)."""


class _TokenLoader(yaml.SafeLoader):
    """SafeLoader for plain data only: no anchors, aliases or explicit tags.

    A token never has them, and aliases let a few hundred bytes stand for a
    document of millions of nodes (a "billion laughs"): each event is refused
    before any node is built from it.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Malformed("it uses a YAML alias (*), which a token never does")
        if getattr(event, "anchor", None) is not None:
            raise _Malformed("it uses a YAML anchor (&), which a token never does")
        if getattr(event, "tag", None) is not None:
            raise _Malformed("it uses a YAML tag (!), which a token never does")
        return super().compose_node(parent, index)


_TOKEN_FIELDS = frozenset(field.name for field in attrs.fields(Token))
_TOKEN_REQUIRED = _TOKEN_FIELDS - {"cost"}


def _parse_token(text: str) -> Token:
    if not isinstance(text, str):
        raise _Malformed(f"expected text, got {type(text).__name__}")
    if len(text) > MAX_TOKEN_TEXT:
        raise _Malformed(f"it is {len(text)} characters long, more than {MAX_TOKEN_TEXT}")
    try:
        document = yaml.load(text, Loader=_TokenLoader)
    except yaml.YAMLError as error:
        raise _Malformed(f"not YAML ({_one_line(getattr(error, 'problem', None) or str(error))})") from None
    except RecursionError:
        raise _Malformed("not YAML (nested too deeply)") from None
    if not isinstance(document, dict):
        raise _Malformed("not a YAML mapping")
    if document.get("kind") != TOKEN_KIND:
        raise _Malformed(f"kind is not {TOKEN_KIND!r}")
    version = document.get("version")
    if type(version) is not int or version != TOKEN_VERSION:
        raise _Malformed(f"version {_brief(version)} is not supported (this fabric reads version {TOKEN_VERSION})")
    fields = {key: value for key, value in document.items() if key not in ("kind", "version")}
    unknown = [key for key in fields if key not in _TOKEN_FIELDS]
    if unknown:
        raise _Malformed(f"unknown key {_brief(unknown[0])}")
    missing = sorted(_TOKEN_REQUIRED - fields.keys())
    if missing:
        raise _Malformed(f"missing key {missing[0]!r}")
    addresses = fields["addresses"]
    if not isinstance(addresses, list):
        raise _Malformed("addresses must be a list")
    fields["addresses"] = tuple(addresses)
    try:
        return Token(**fields)
    except (ValueError, TypeError) as error:
        raise _Malformed(_one_line(str(error))) from None


@attrs.frozen
class IssuedCert:
    """A certificate this site's CA signed when a token was redeemed: whom for, and whether revoked."""

    serial: int = attrs.field(validator=_check_count(1))
    site_id: str = attrs.field(validator=_check_site_id)
    name: str = attrs.field(validator=_check_site_name)
    revoked: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@attrs.frozen
class TokenGrant:
    """The issuer's record of a token it issued. The secret itself is not kept, only its digest."""

    token_id: str = attrs.field(validator=_check_urlsafe)
    secret_sha256: str = attrs.field(validator=_check_sha256_hex)
    redemptions_allowed: int = attrs.field(validator=_check_count(1))
    redemptions_used: int = attrs.field(validator=_check_count(0))
    expires_at: float = attrs.field(converter=_to_time)  # unix seconds, UTC
    cost: int | None = attrs.field(default=None, validator=attrs.validators.optional(check_cost))
    issued: tuple[IssuedCert, ...] = ()  # one per redemption: the certificates this token led to
    # No more redemptions: a site that redeemed it was revoked, and may hold its secret still.
    withdrawn: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    # The only routing keys the sites that redeem it may offer through their
    # links here; their other services are ignored here. None: any key.
    offers: tuple[str, ...] | None = attrs.field(default=None, validator=_check_routing_keys)

    def __attrs_post_init__(self) -> None:
        if self.redemptions_used > self.redemptions_allowed:
            raise ValueError("redemptions_used is more than redemptions_allowed")


def new_token(
    identity: Identity,
    addresses: Sequence[str],
    *,
    now: float,
    redemptions_allowed: int = DEFAULT_REDEMPTIONS,
    expiration_window: float = DEFAULT_EXPIRATION_WINDOW,
    cost: int | None = None,
    offers: Sequence[str] | None = None,
) -> tuple[Token, TokenGrant]:
    """Issue a token (for the redeemer) and its grant (for us to keep and check against).

    Raises `TokenError` for a bad request: no or malformed addresses, fewer
    than one redemption, a window that is not a positive number of seconds,
    `offers` (the routing keys its redeemers may offer) that are not a list
    of routing keys.
    """
    if isinstance(offers, str):
        raise TokenError("offers must be a list of routing keys, not one string")
    if isinstance(addresses, str):
        raise TokenError("addresses must be a list of link addresses (tls://host:port, ws://host:port/path), not one string")
    if type(redemptions_allowed) is not int or redemptions_allowed < 1:
        raise TokenError(f"a token must allow at least 1 redemption, not {redemptions_allowed!r}")
    if type(expiration_window) not in (int, float) or not 0 < expiration_window < math.inf:
        raise TokenError(f"the expiration window must be a positive number of seconds, not {expiration_window!r}")
    secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
    expires_at = now + expiration_window
    try:
        token = Token(
            issuer_id=identity.site_id,
            issuer_name=identity.name,
            addresses=tuple(addresses),
            ca_pem=identity.ca_cert_pem.decode("ascii"),
            token_id=secrets.token_hex(TOKEN_ID_BYTES),
            secret=secret,
            expires_at=expires_at,
            cost=cost,
        )
    except ValueError as error:
        raise TokenError(f"cannot issue a token: {error}") from None
    try:
        grant = TokenGrant(
            token_id=token.token_id,
            secret_sha256=_sha256_hex(secret),
            redemptions_allowed=redemptions_allowed,
            redemptions_used=0,
            expires_at=token.expires_at,
            cost=cost,
            offers=None if offers is None else tuple(offers),
        )
    except (ValueError, TypeError) as error:
        raise TokenError(f"cannot issue a token: {error}") from None
    return token, grant


def spend_grant(grants: Mapping[str, TokenGrant], token_id: str, secret: str, *, now: float) -> TokenGrant:
    """Check a redemption against the grants; returns the grant with one more use.

    `token_id` and `secret` come from the redeemer (untrusted). The checks go
    from "who are you" to "may you still": forged, then expired, then spent
    (or withdrawn), so a forger learns nothing about a real token's state.
    The caller stores the returned grant before signing anything.
    """
    grant = grants.get(token_id) if isinstance(token_id, str) else None
    if grant is None:
        raise TokenForgedError("token was not issued by this site")
    offered = _sha256_hex(secret) if isinstance(secret, str) else ""
    if not hmac.compare_digest(offered, grant.secret_sha256):
        raise TokenForgedError("token secret does not match: the token is forged or damaged")
    if now >= grant.expires_at:
        raise TokenExpiredError(f"token expired at {_format_utc(grant.expires_at)}")
    if grant.withdrawn:
        raise TokenSpentError("token withdrawn: a site that redeemed it was revoked; ask for a new token")
    if grant.redemptions_used >= grant.redemptions_allowed:
        raise TokenSpentError(
            f"token already redeemed: it allowed {grant.redemptions_allowed} redemption(s) and all are used"
        )
    return attrs.evolve(grant, redemptions_used=grant.redemptions_used + 1)


def revoked_sites(grants: Mapping[str, TokenGrant]) -> dict[str, str]:
    """Site id -> name, for every site that a certificate revoked here was issued to."""
    return {cert.site_id: cert.name for grant in grants.values() for cert in grant.issued if cert.revoked}


def _sha256_hex(secret: str) -> str:
    # surrogatepass: any str from the wire hashes, instead of raising.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _format_utc(timestamp: float) -> str:
    try:
        return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp} (unix time)"


# ---------------------------------------------------------------------------
# Grants on disk


# JSON-shaped: no silent int("3") coercion, no unknown keys.
_grants_converter = strict(cattrs.Converter(forbid_extra_keys=True))


def save_grants(path: Path, grants: Mapping[str, TokenGrant]) -> None:
    """Write the issuer's grants atomically, mode 0600: a crash leaves the old file or the new one."""
    document = {
        "kind": GRANTS_KIND,
        "version": GRANTS_VERSION,
        "grants": [_grants_converter.unstructure(grant) for _, grant in sorted(grants.items())],
    }
    data = json.dumps(document, indent=2, allow_nan=False).encode("utf-8") + b"\n"
    try:
        write_private_atomic(Path(path), data)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None


def load_grants(path: Path) -> dict[str, TokenGrant]:
    """Read the issuer's grants; a missing file is no grants, a corrupt one a `ConfigError`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return _parse_grants(data)
    except _Malformed as error:
        raise ConfigError(f"{path} is corrupt: {error}") from None


def _parse_grants(data: bytes) -> dict[str, TokenGrant]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _Malformed(f"not JSON ({_one_line(str(error))})") from None
    if not isinstance(document, dict) or document.get("kind") != GRANTS_KIND:
        raise _Malformed(f"kind is not {GRANTS_KIND!r}")
    if document.get("version") != GRANTS_VERSION or set(document) != {"kind", "version", "grants"}:
        raise _Malformed(f"not a version {GRANTS_VERSION} grants file")
    try:
        grant_list = _grants_converter.structure(document["grants"], list[TokenGrant])
    except Exception as error:  # cattrs wraps field errors in an ExceptionGroup
        raise _Malformed(_describe_structure_error(error)) from None
    grants: dict[str, TokenGrant] = {}
    for grant in grant_list:
        if grant.token_id in grants:
            raise _Malformed(f"token {grant.token_id} is listed twice")
        grants[grant.token_id] = grant
    return grants


def _describe_structure_error(error: Exception) -> str:
    if isinstance(error, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(error, path="grants"))
    return _one_line(str(error))


# ---------------------------------------------------------------------------
# Files


def _make_private_dir(path: Path) -> None:
    """Create `path` (and its parents) with the leaf mode 0700."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        os.chmod(path, 0o700)  # an existing (empty) directory may have been looser
    except OSError as error:
        raise ConfigError(f"cannot create {path}: {error.strerror or error}") from None


def _read_config_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None


# ---------------------------------------------------------------------------
# Small helpers


def _utc(now: dt.datetime | None) -> dt.datetime:
    return dt.datetime.now(dt.UTC) if now is None else now


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Signatures: a site signs what it says about itself (its gossip record)
#
# The signer's public key travels with the signed data, and the site id is
# the digest of that key: whoever checks a signature learns which site made
# it without any certificate, and no key but the site's own can sign for its
# id. The algorithm follows the key type: ECDSA with SHA-256 for the P-256
# keys fabric makes (and P-384, which sign_csr also accepts), Ed25519, and
# RSA PKCS#1 v1.5 with SHA-256.

MAX_PUBLIC_KEY_DER = 1024  # bytes; a P-256 SubjectPublicKeyInfo is 91, RSA-4096 about 550
MAX_SIGNATURE = 1024  # bytes; an ECDSA P-256 signature is at most 72, RSA-4096 512
_VERIFY_KEY_CACHE = 4096  # parsed public keys kept: one per site of the largest network (MAX_RECORDS)


def public_key_der(identity: Identity) -> bytes:
    """The site key's SubjectPublicKeyInfo in DER: what `site_id_of` digests."""
    return _spki(identity._site_key.public_key())


def sign(identity: Identity, data: bytes) -> bytes:
    """Sign `data` with the site key (not the CA key), as `verify_signature_untrusted` checks it."""
    key = identity._site_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(f"cannot sign with a {type(key).__name__} site key")


def verify_signature_untrusted(public_key_der: bytes, data: bytes, signature: bytes) -> str | None:
    """The site id of `public_key_der` if `signature` is its valid signature of `data`, else None.

    All three come from the network: garbage of any kind (a key that does not
    parse, a weak key, a wrong signature, wrong types) is None, never an error.
    """
    if not (isinstance(public_key_der, bytes) and isinstance(data, bytes) and isinstance(signature, bytes)):
        return None
    if len(public_key_der) > MAX_PUBLIC_KEY_DER or len(signature) > MAX_SIGNATURE:
        return None
    loaded = _load_verify_key(public_key_der)
    if loaded is None:
        return None
    key, site_id = loaded
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:  # pragma: no cover - _load_verify_key admits only the three types above
            return None
    except (InvalidSignature, ValueError, TypeError):
        return None
    return site_id


@functools.lru_cache(maxsize=_VERIFY_KEY_CACHE)
def _load_verify_key(der: bytes) -> tuple[CertificatePublicKeyTypes, str] | None:
    """A parsed, acceptable public key and its site id, or None. Cached: the same keys come back in every push."""
    try:
        key = serialization.load_der_public_key(der)
        # Only the kinds _why_key_refused can accept (DH, X25519... keys never sign).
        if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)):
            return None
        if _why_key_refused(key) is not None:
            return None
        if _spki(key) != der:
            # A non-canonical encoding of a good key: the site id is the digest
            # of the canonical one, so accepting this would only confuse.
            return None
        return key, site_id_of(key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
