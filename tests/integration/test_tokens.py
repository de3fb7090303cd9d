"""Tokens between real sites: redeemed once, refused when spent, expired, forged or unreachable.

Each refusal has its own error class and its own words, and a refused
redemption leaves the redeeming site as it was: no link, nothing saved.
"""

from __future__ import annotations

import attrs
import pytest
import trio

import fabric
from fabric.config import LINKS_DIR

DEADLINE = 15  # seconds; a redemption on loopback takes a few milliseconds


def assert_unlinked(site: fabric.Site) -> None:
    """A refused redemption left nothing behind."""
    assert site.config.links == ()
    assert site.status().links == ()
    assert not (site.site_dir / LINKS_DIR).exists() or not any((site.site_dir / LINKS_DIR).iterdir())


async def test_each_refused_token_says_why(network, tcp):
    async with network.site("hub", link_port=0) as hub, network.site("first") as first, network.site("late") as late:
        with trio.fail_after(DEADLINE):
            messages = {}

            token = await hub.issue_token(redemptions_allowed=1, expiration_window=60)
            await first.redeem_token(token)
            await first.wait_linked(hub.site_id)
            with pytest.raises(fabric.TokenSpentError, match="already redeemed") as spent:
                await late.redeem_token(token)
            messages["spent"] = str(spent.value)

            # expires_at is checked by the issuer against its own clock.
            short = await hub.issue_token(expiration_window=0.001)
            await trio.sleep(0.01)  # a real wait: the token must be past its time
            with pytest.raises(fabric.TokenExpiredError, match="expired") as expired:
                await late.redeem_token(short)
            messages["expired"] = str(expired.value)

            fresh = await hub.issue_token()
            with pytest.raises(fabric.TokenForgedError, match="secret") as forged:
                await late.redeem_token(attrs.evolve(fresh, secret="not-the-secret"))
            messages["forged"] = str(forged.value)

            nowhere = attrs.evolve(fresh, addresses=(f"tls://127.0.0.1:{tcp.closed_port()}",))
            with pytest.raises(fabric.IssuerUnreachableError, match="cannot reach") as unreachable:
                await late.redeem_token(nowhere)
            messages["unreachable"] = str(unreachable.value)
            assert str(unreachable.value).endswith(f"{nowhere.addresses[0]}: Connection refused")  # the cause, once

            assert_unlinked(late)
            # The forged and unreachable attempts did not use the real token up: it still works.
            await late.redeem_token(fresh)
            await late.wait_linked(hub.site_id)

    assert len(set(messages.values())) == len(messages), messages
    for kind, message in messages.items():
        assert "hub" in message, f"{kind}: the message should name the issuer: {message}"
        others = [m for k, m in messages.items() if k != kind]
        assert all(message not in other for other in others)


async def test_a_token_saved_to_a_file_is_redeemed_from_its_path(network, echo_server, tcp, tmp_path):
    async with network.site("hub", link_port=0) as hub, network.site("edge") as edge:
        with trio.fail_after(DEADLINE):
            token = await hub.issue_token(redemptions_allowed=1, expiration_window=900)
            path = tmp_path / "hub.token"
            token.save(path)
            assert (path.stat().st_mode & 0o777) == 0o600  # it holds a secret
            assert fabric.Token.load(path) == token
            assert token.secret not in repr(token)  # kept out of logs

            name = await edge.redeem_token(str(path), name="to-hub")
            assert name == "to-hub"
            await edge.wait_linked(hub.site_id)
            port = await network.expose(hub, edge, "echo", echo_server)
            stream = await tcp.connect(port)
            async with stream:
                await tcp.echo_round_trip(stream, 50_000)
            with pytest.raises(fabric.TokenError, match="already has a link"):
                await edge.redeem_token(path)


async def test_a_site_without_a_link_port_cannot_issue_tokens(network):
    async with network.site("closed") as closed:  # link_port defaults to None: accepts no links
        assert closed.link_port is None
        with pytest.raises(fabric.FabricError, match="accepts no links"):
            await closed.issue_token()


async def test_a_second_link_between_two_sites_is_refused_at_redemption(network):
    """Each site redeeming the other's token would make two links fight; the second is refused up front."""
    async with network.site("hub", link_port=0) as hub, network.site("edge", link_port=0) as edge:
        with trio.fail_after(DEADLINE):
            await network.link(edge, hub)
            with pytest.raises(fabric.TokenError, match="already has a link to site hub"):
                await edge.redeem_token(await hub.issue_token())
            with pytest.raises(fabric.TokenError, match="edge already links to site hub; one link carries traffic both ways"):
                await hub.redeem_token(await edge.issue_token())
            assert hub.config.links == ()


async def test_a_revocation_outlives_a_restart_of_the_issuer(network):
    """Revoked, then the issuer restarts: a new token for the site is refused all the same."""
    async with network.site("edge") as edge:
        with trio.fail_after(DEADLINE):
            async with network.site("hub", link_port=0) as hub:
                await network.link(edge, hub)
                await hub.revoke_link("edge")
                await edge.wait_linked(hub.site_id, up=False)
            async with network.site("hub") as hub:  # the same directory: a restart
                await edge.delete_link("hub")
                with pytest.raises(fabric.TokenError, match=f"site edge \\({edge.site_id[:8]}\\) was revoked by site hub"):
                    await edge.redeem_token(await hub.issue_token())
                assert_unlinked(edge)
