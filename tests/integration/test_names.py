"""Names as an attacker hands them over: a token edited to climb out of `links/`, a link
name that points elsewhere, site names that are paths or too long.

Every name is one safe path component (fabric/names.py); nothing is ever written
or deleted outside the site directory's own folders, and a refused name leaves
the site exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio
import yaml

import fabric
from fabric import pki
from fabric.config import LINKS_DIR, config_path

DEADLINE = 15  # seconds


def files_under(path: Path) -> dict[str, bytes]:
    """Every file below `path` with its content: what an attack must leave unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def edited(token: pki.Token, path: Path, **fields) -> Path:
    """The token's file as an attacker edits it by hand: YAML fields replaced, nothing re-checked."""
    document = yaml.safe_load(token.dumps())
    document.update(fields)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("issuer_name", ["../identity", "/tmp/fabric-elsewhere", "..", "a/b", "-rf", "x" * 64, ""])
async def test_a_token_naming_a_path_is_refused_and_nothing_is_written(network, tmp_path, issuer_name):
    async with network.site("hub", link_port=0) as hub, network.site("victim") as victim:
        with trio.fail_after(DEADLINE):
            before = files_under(victim.site_dir)
            token = await hub.issue_token()
            forged = edited(token, tmp_path / "forged.token", issuer_name=issuer_name)
            with pytest.raises(fabric.TokenFormatError, match="issuer_name must be 1 to 63 letters"):
                await victim.redeem_token(forged)
            assert files_under(victim.site_dir) == before
            assert not await trio.Path("/tmp/fabric-elsewhere").exists()
            # The token was never sent: it is still good for a link under its real name.
            assert await victim.redeem_token(token) == "hub"
            await victim.wait_linked(hub.site_id)
    # And the victim still starts: its identity is its own.
    assert pki.load_identity(victim.site_dir).site_id == victim.site_id


async def test_a_link_name_given_by_the_user_is_checked_before_anything_is_sent(network):
    async with network.site("hub", link_port=0) as hub, network.site("victim") as victim:
        with trio.fail_after(DEADLINE):
            token = await hub.issue_token()
            before = files_under(victim.site_dir)
            for name in ("../identity", str(victim.site_dir / "identity"), "links/x", ".hidden"):
                with pytest.raises(fabric.ConfigError, match="link name must be 1 to 63 letters"):
                    await victim.redeem_token(token, name=name)
            assert files_under(victim.site_dir) == before
            assert await victim.redeem_token(token, name="uplink") == "uplink"  # not spent by the refusals


async def test_a_link_directory_planted_as_a_symbolic_link_is_not_followed(network, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("unrelated")
    async with network.site("hub", link_port=0) as hub, network.site("victim") as victim:
        with trio.fail_after(DEADLINE):
            (victim.site_dir / LINKS_DIR).mkdir(exist_ok=True)
            os.symlink(outside, victim.site_dir / LINKS_DIR / "hub")
            token = await hub.issue_token()
            with pytest.raises(fabric.ConfigError, match="leads out of"):
                await victim.redeem_token(token)
            assert files_under(outside) == {"keep.txt": b"unrelated"}


async def test_a_hand_edited_link_name_is_refused_at_load_and_never_deleted(network, tmp_path):
    async with network.site("hub", link_port=0) as hub, network.site("victim") as victim:
        with trio.fail_after(DEADLINE):
            await network.link(victim, hub)
    path = config_path(victim.site_dir)
    document = yaml.safe_load(path.read_text())
    document["links"][0]["name"] = ".."
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(fabric.ConfigError, match=r"site.yaml: links\[0\]: name must be 1 to 63 letters"):
        await fabric.load_site(victim.site_dir)
    assert files_under(victim.site_dir)  # nothing was removed


@pytest.mark.parametrize("name", ["..", ".", "a b", "a/b", "../x", "", "-x", "é", "x" * 64])
def test_a_site_name_that_is_not_a_name_is_refused_and_leaves_nothing(tmp_path, name):
    site_dir = tmp_path / "site"
    with pytest.raises(fabric.ConfigError, match="name must be 1 to 63 letters"):
        fabric.create_site(site_dir, name)
    assert not site_dir.exists()


def test_the_longest_site_name_makes_a_site_and_a_failed_create_can_be_retried(tmp_path, monkeypatch):
    longest = "n" * 63
    fabric.create_site(tmp_path / "long", longest)
    assert pki.load_identity(tmp_path / "long").name == longest

    # A failure half way (here: the disk refuses the config) leaves the directory as it was, empty.
    site_dir = tmp_path / "retry"
    site_dir.mkdir()

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(fabric.sitedir, "save_config", refuse)
        with pytest.raises(OSError):
            fabric.create_site(site_dir, "retry")
    assert list(site_dir.iterdir()) == []
    fabric.create_site(site_dir, "retry")


async def test_names_of_listeners_connectors_and_keys_are_checked(network):
    async with network.site("a") as a:
        with trio.fail_after(DEADLINE):
            for call in (
                a.create_listener("../x", 0),
                a.create_listener("web", 0, routing_key="a b"),
                a.create_connector("x/y", 80),
                a.create_connector("web", 80, routing_key=".."),
            ):
                with pytest.raises(fabric.ConfigError, match="must be 1 to 63 letters"):
                    await call
            assert a.config.listeners == () and a.config.connectors == ()


def test_a_token_names_its_issuer_by_the_rule_when_issued(tmp_path):
    # The issuer cannot make such a token: its own name passed the rule.
    fabric.create_site(tmp_path / "hub", "hub")
    identity = pki.load_identity(tmp_path / "hub")
    token, _ = pki.new_token(identity, ["tls://127.0.0.1:7443"], now=0.0)
    with pytest.raises(ValueError, match="issuer_name must be 1 to 63 letters"):
        attrs.evolve(token, issuer_name="../identity")
