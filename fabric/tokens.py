"""Tokens: the grants this site issued, their redemption on both sides, and revocation.

An issuer keeps a grant per token (pki.TokenGrant) with the certificates it
signed for the sites that redeemed it. From the grants follow which
certificates and site keys are revoked, which routing keys a site that
redeemed tokens here may offer, and whether flows claiming to come from a
site are refused. The redeeming side (`redeem`) dials the issuer, sends
REDEEM and checks the certificate it gets back.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from . import logs, pki
from .config import STATE_DIR
from .errors import (
    FabricError,
    FrameError,
    IssuerUnreachableError,
    LinkError,
    TokenError,
    TokenExpiredError,
    TokenForgedError,
    TokenSpentError,
)
from .router.frames import (
    FrameDecoder,
    FrameType,
    Reason,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    decode_reason_untrusted,
    encode_frame,
    encode_message,
)
from .router.link import read_frame
from .router.policy import ambiguity

log = logging.getLogger("fabric.site")

REDEEM_TIMEOUT = 10.0  # seconds for a whole redemption, dial included
_TOKEN_ERRORS: dict[int, type[TokenError]] = {
    Reason.TOKEN_FORGED: TokenForgedError,
    Reason.TOKEN_EXPIRED: TokenExpiredError,
    Reason.TOKEN_SPENT: TokenSpentError,
}


def refusal_code(exc: TokenError) -> Reason:
    """The GOAWAY reason that tells a redeemer why its token was refused."""
    return Reason(next((code for code, cls in _TOKEN_ERRORS.items() if isinstance(exc, cls)), Reason.TOKEN_INVALID))


def grants_path(site_dir: Path) -> Path:
    return site_dir / STATE_DIR / "grants.json"


class Tokens:
    """The grants of the site `name`; `identity` signs the certificates redemptions get."""

    def __init__(self, identity: pki.Identity, site_dir: Path, name: str, grants: Mapping[str, pki.TokenGrant]) -> None:
        self.identity = identity
        self.name = name
        self.path = grants_path(site_dir)
        self.grants: Mapping[str, pki.TokenGrant] = dict(grants)  # replaced whole at each change, never mutated
        self._revoked_sites = pki.revoked_sites(self.grants)  # site id -> name, kept as grants change
        self._lock = trio.Lock()
        self._refusals_log = logs.Throttle(logs.LINE_INTERVAL)

    def __repr__(self) -> str:
        return f"<Tokens {self.name} grants={len(self.grants)}>"

    async def _change(self, grants: Mapping[str, pki.TokenGrant]) -> None:
        """Take and write the grants; one writer at a time, so an older snapshot never lands last."""
        self.grants = grants
        self._revoked_sites = pki.revoked_sites(grants)
        async with self._lock:
            await trio.to_thread.run_sync(pki.save_grants, self.path, self.grants)

    async def issue(self, addresses: Sequence[str], **terms) -> pki.Token:
        """A new token that points at `addresses`, kept as a grant; `terms` as pki.new_token takes them."""
        token, grant = pki.new_token(self.identity, addresses, now=time.time(), **terms)
        await self._change({**self.grants, grant.token_id: grant})
        return token

    async def grant(self, request: Redeem, where: str) -> RedeemOk:
        """Spend the token a REDEEM brings and sign the redeemer's certificate.

        LinkError (the token is not spent) or TokenError when refused."""
        peer_id = pki.csr_site_id(request.csr_pem.encode())
        if (revoked := self._revoked_sites.get(peer_id)) is not None:
            # Known by its key, whatever token it brings and whatever name it gives now.
            raise LinkError(f"site {revoked} ({peer_id[:8]}) was revoked by site {self.name}", code=Reason.NOT_AUTHORIZED)
        grant = pki.spend_grant(self.grants, request.token_id, request.secret, now=time.time())
        cert_pem, serial = pki.sign_csr(self.identity, request.csr_pem.encode())
        grant = attrs.evolve(grant, issued=(*grant.issued, pki.IssuedCert(serial=serial, site_id=peer_id, name=request.name)))
        await self._change({**self.grants, grant.token_id: grant})
        log.info(
            "token %s redeemed by site %s (%s); certificate serial %x", grant.token_id, request.name, where, serial,
            extra=logs.event("token_redeemed", peer=f"{request.name} ({where})"),
        )
        return RedeemOk(cert_pem=cert_pem.decode(), issuer_id=self.identity.site_id, issuer_name=self.name)

    async def revoke(self, name: str) -> tuple[int, set[str]]:
        """Revoke every certificate issued to site `name` (or id); how many, and the site ids they were for."""
        live_certs = [c for g in self.grants.values() for c in g.issued if not c.revoked]
        carriers = {c.site_id for c in live_certs if c.name == name}
        if len(carriers) > 1:
            raise FabricError(ambiguity(name, carriers))
        peers = carriers or {c.site_id for c in live_certs if c.site_id == name}
        if not peers:
            raise FabricError(f"site {self.name} issued no certificate to a site named {name!r} that is not revoked already")
        grants, revoked = {}, 0
        for token_id, grant in self.grants.items():
            issued = []
            for cert in grant.issued:
                if cert.site_id in peers and not cert.revoked:  # every certificate of the site, whatever name it gave
                    cert, revoked = attrs.evolve(cert, revoked=True), revoked + 1
                issued.append(cert)
            withdrawn = grant.withdrawn or any(c.site_id in peers for c in issued)
            grants[token_id] = attrs.evolve(grant, issued=tuple(issued), withdrawn=withdrawn)
        await self._change(grants)
        return revoked, peers

    def redeemers(self) -> set[str]:
        """The ids of the sites that redeemed tokens here."""
        return {c.site_id for g in self.grants.values() for c in g.issued}

    def granted_offers(self, site_id: str) -> frozenset[str] | None:
        """The routing keys a site that redeemed tokens here may offer through its link: what its
        tokens allowed, together (None: any, as soon as one of them allowed any, or none is in force)."""
        limits = [
            grant.offers
            for grant in self.grants.values()
            if any(c.site_id == site_id and not c.revoked for c in grant.issued)
        ]
        if not limits or None in limits:
            return None
        return frozenset(key for limit in limits for key in limit or ())

    def revoked(self, serial: int) -> bool:
        """Whether the certificate with this serial, issued here, was revoked."""
        return any(c.serial == serial and c.revoked for g in self.grants.values() for c in g.issued)

    def refused_origin(self, origin: str) -> str | None:
        """Why flows to this site's connectors from site `origin` are refused: it was revoked here (None: they are not).

        The origin is what the flow claims: this stops a revoked site that
        runs fabric as it is, not one changed to claim another site's id.
        """
        name = self._revoked_sites.get(origin)
        if name is None:
            return None
        why = f"site {self.name} revoked site {name} ({origin[:8]}): it takes no flows from it"
        if (held := self._refusals_log.admit(origin, trio.current_time())) is not None:
            log.warning(
                "flow from site %s refused: %s%s", name, why, logs.held_back(held),
                extra=logs.event("flow_refused", peer=name, reason=why),
            )
        return why


Dial = Callable[[str, ssl.SSLContext], Awaitable[trio.SSLStream]]  # address, TLS context -> a stream to it


async def redeem(token: pki.Token, request: Redeem, identity: pki.Identity, dial: Dial) -> tuple[RedeemOk, str]:
    """Redeem the token at its issuer, trying its addresses in order: the answer, and the address that gave it."""
    context = pki.client_context(token.ca_pem.encode())
    failures = []
    for text in token.addresses:
        try:
            with trio.fail_after(REDEEM_TIMEOUT):
                stream = await dial(text, context)
        except trio.TooSlowError:
            failures.append(f"{text}: no answer within {REDEEM_TIMEOUT:g} s")
            continue
        except (LinkError, ValueError) as exc:
            failures.append(str(exc))
            continue
        try:
            with trio.fail_after(REDEEM_TIMEOUT):
                if pki.cert_site_id(stream.getpeercert(binary_form=True)) != token.issuer_id:
                    raise TokenForgedError(f"{text} is not the site that issued this token")
                await stream.send_all(encode_frame(FrameType.REDEEM, 0, encode_message(request)))
                frame = await read_frame(stream, FrameDecoder())
        except (trio.TooSlowError, trio.BrokenResourceError, LinkError) as exc:
            failures.append(f"{text}: redemption did not finish: {exc}")
            continue
        finally:
            await trio.aclose_forcefully(stream)
        if frame.type is FrameType.REDEEM_OK:
            try:
                answer = decode_message_untrusted(frame.payload, RedeemOk)
            except FrameError as exc:
                raise TokenError(f"site {token.issuer_name} answered the redemption badly: {exc}") from None
            pki.check_issued_cert_untrusted(identity, answer.cert_pem, token.ca_pem)
            return answer, text
        if frame.type is FrameType.GOAWAY:
            code, text = decode_reason_untrusted(frame.payload)
            raise _TOKEN_ERRORS.get(code, TokenError)(f"site {token.issuer_name} refused the token: {text}")
        raise TokenError(f"site {token.issuer_name} answered the redemption with {frame.type.name}")
    raise IssuerUnreachableError(f"cannot reach site {token.issuer_name} to redeem the token: {'; '.join(failures)}")
