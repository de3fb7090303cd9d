"""Tokens on the issuer's side: issue, spend on REDEEM, revoke, and what follows, with no network."""

from __future__ import annotations

import pytest

from fabric import pki
from fabric.config import STATE_DIR
from fabric.errors import FabricError, LinkError, TokenSpentError
from fabric.router.frames import Reason, Redeem
from fabric.tokens import Tokens, refusal_code


@pytest.fixture
def sites(tmp_path):
    """An issuer's tokens, and the identity of a site that redeems them."""
    (tmp_path / "hub" / STATE_DIR).mkdir(parents=True)
    hub = pki.create_identity(tmp_path / "hub", "hub")
    spoke = pki.create_identity(tmp_path / "spoke", "spoke")
    return Tokens(hub, tmp_path / "hub", "hub", {}), spoke


def redeem_request(token: pki.Token, identity: pki.Identity, name: str = "spoke") -> Redeem:
    return Redeem(token.token_id, token.secret, name, pki.make_csr(identity).decode())


async def test_a_token_is_spent_once_and_its_grant_is_kept_on_disk(sites):
    tokens, spoke = sites
    token = await tokens.issue(["tls://127.0.0.1:9000"], offers=["db"])
    answer = await tokens.grant(redeem_request(token, spoke), "127.0.0.1")
    pki.check_issued_cert_untrusted(spoke, answer.cert_pem, token.ca_pem)
    assert answer.issuer_name == "hub" and tokens.redeemers() == {spoke.site_id}
    assert tokens.granted_offers(spoke.site_id) == frozenset({"db"})
    with pytest.raises(TokenSpentError) as refused:
        await tokens.grant(redeem_request(token, spoke), "127.0.0.1")
    assert refusal_code(refused.value) == Reason.TOKEN_SPENT
    assert pki.load_grants(tokens.path) == tokens.grants


async def test_revoking_a_site_refuses_its_certificate_its_key_and_its_flows(sites):
    tokens, spoke = sites
    token = await tokens.issue(["tls://127.0.0.1:9000"], redemptions_allowed=2)
    answer = await tokens.grant(redeem_request(token, spoke), "127.0.0.1")
    serial = pki.cert_serial(pki.pem_to_der(answer.cert_pem.encode()))
    assert not tokens.revoked(serial) and tokens.refused_origin(spoke.site_id) is None

    assert await tokens.revoke("spoke") == (1, {spoke.site_id})
    assert tokens.revoked(serial) and tokens.granted_offers(spoke.site_id) is None
    assert "site hub revoked site spoke" in (tokens.refused_origin(spoke.site_id) or "")
    with pytest.raises(LinkError, match="was revoked by site hub") as refused:  # whatever name it gives now
        await tokens.grant(redeem_request(token, spoke, name="other"), "127.0.0.1")
    assert refused.value.code == Reason.NOT_AUTHORIZED
    with pytest.raises(FabricError, match="issued no certificate to a site named 'spoke'"):
        await tokens.revoke("spoke")  # revoked already
