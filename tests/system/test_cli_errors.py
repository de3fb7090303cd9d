"""What a user sees when something is wrong: exit code 1 and one line on stderr, `error: ...`.

One hub runs for the whole module (`fabric site run` in a process); the sites
that redeem its tokens are created per test and mostly stay stopped: a
stopped site redeems a token, lists and changes its config just as well.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import SiteProcess, as_json, fabric, fails, free_port, ok, running

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteProcess]:
    """A running site that accepts links."""
    site_dir = tmp_path_factory.mktemp("errors") / "hub"
    ok(fabric(site_dir, "site", "create", "hub", "--link-access", "--link-port", "0"))
    with running(site_dir) as (process,):
        yield process


def new_site(tmp_path: Path, name: str, *options: str) -> Path:
    site_dir = tmp_path / name
    ok(fabric(site_dir, "site", "create", name, *options))
    return site_dir


def issue(hub: SiteProcess, token: Path, *options: str) -> Path:
    ok(fabric(hub.site_dir, "token", "issue", str(token), *options))
    return token


def test_a_token_redeemed_twice_is_refused(hub: SiteProcess, tmp_path: Path):
    token = issue(hub, tmp_path / "once.token")
    first, second = new_site(tmp_path, "first"), new_site(tmp_path, "second")
    out = ok(fabric(first, "token", "redeem", str(token)))
    assert "link hub created" in out and "the link comes up when it starts" in out  # `first` is stopped
    fails(fabric(second, "token", "redeem", str(token)), "refused the token")
    # The same site once more: it is linked already.
    fails(fabric(first, "token", "redeem", str(issue(hub, tmp_path / "again.token"))), "already has a link")


def test_an_expired_token_is_refused(hub: SiteProcess, tmp_path: Path):
    token = issue(hub, tmp_path / "short.token", "--expiration-window", "1s")
    late = new_site(tmp_path, "late")
    time.sleep(1.5)
    fails(fabric(late, "token", "redeem", str(token)), "expired")


def test_a_token_of_an_unreachable_issuer(tmp_path: Path):
    # A site whose link port is known but which never runs: nothing answers there.
    gone = new_site(tmp_path, "gone", "--link-port", str(free_port()))
    token = tmp_path / "gone.token"
    ok(fabric(gone, "token", "issue", str(token)))
    fails(fabric(new_site(tmp_path, "lonely"), "token", "redeem", str(token)), "cannot reach site gone")


def test_a_file_that_is_not_a_token(tmp_path: Path):
    bogus = tmp_path / "bogus.token"
    bogus.write_text("kind: something-else\n")
    site = new_site(tmp_path, "site")
    fails(fabric(site, "token", "redeem", str(bogus)), "not a fabric token")
    fails(fabric(site, "token", "redeem", str(tmp_path / "missing.token")), "cannot read token")


def test_a_listener_on_a_port_in_use(hub: SiteProcess):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        fails(fabric(hub.site_dir, "listener", "create", "busy", str(port)), "in use")
    # Nothing was left behind by the refusal.
    assert "busy" not in [item["name"] for item in as_json(fabric(hub.site_dir, "listener", "status", "-o", "json"))["listeners"]]


def test_a_missing_site_directory(tmp_path: Path):
    nowhere = tmp_path / "nowhere"
    for verb in (("site", "status"), ("site", "run"), ("listener", "create", "db", "5432"), ("network", "status"),
                 ("token", "issue", str(tmp_path / "t.token")), ("site", "delete", "--yes"), ("debug", "dump", str(tmp_path / "d.tgz"))):
        fails(fabric(nowhere, *verb), str(nowhere))
    assert not nowhere.exists()  # no verb but `site create` makes one


def test_a_hand_edited_config_with_an_unknown_key(tmp_path: Path):
    site = new_site(tmp_path, "typo")
    with open(site / "site.yaml", "a") as config:
        config.write("colour: blue\n")  # a key no fabric version knows
    for verb in (("site", "status"), ("site", "run"), ("listener", "status")):
        fails(fabric(site, *verb, timeout=30), "site.yaml", "unknown key colour")
    # A debug dump still works: a broken config is when one is needed.
    out = ok(fabric(site, "debug", "dump", str(tmp_path / "typo.tgz")))
    assert "unknown key colour" in out


def test_a_config_with_a_bad_value(tmp_path: Path):
    site = new_site(tmp_path, "bad")
    text = (site / "site.yaml").read_text().replace("mode: interior", "mode: outer")
    (site / "site.yaml").write_text(text)
    fails(fabric(site, "site", "run", timeout=30), "site.yaml", "mode")


@pytest.mark.parametrize(
    ("line", "value", "why"),
    [
        ("link_port: null", "link_port: true", "link_port: expected an integer, got True"),
        ("link_port: null", "link_port: 80.7", "link_port: expected an integer, got 80.7"),
        ("service_sync: true", 'service_sync: "yes"', "service_sync: expected true or false, got 'yes'"),
        ("name: typed", "name: 123", "name: expected text, got 123"),
        ("keepalive_interval: 1.0", "keepalive_interval: .nan", "keepalive_interval: expected a finite number"),
        ("keepalive_interval: 1.0", "keepalive_interval: .inf", "keepalive_interval: expected a finite number"),
        # YAML reads 1e-9 as text (a float needs its dot), which cattrs would have turned into a number.
        ("keepalive_timeout: 3.0", "keepalive_timeout: 1e-9", "keepalive_timeout: expected a finite number, got '1e-9'"),
        ("keepalive_timeout: 3.0", "keepalive_timeout: 1.0e-9", "must be longer than keepalive_interval"),
    ],
)
def test_a_hand_edited_value_of_the_wrong_kind_is_refused(tmp_path: Path, line: str, value: str, why: str):
    site = new_site(tmp_path, "typed")
    text = (site / "site.yaml").read_text()
    assert line in text
    (site / "site.yaml").write_text(text.replace(line, value))
    fails(fabric(site, "site", "status", timeout=30), "site.yaml", why)


def test_deleting_what_does_not_exist(hub: SiteProcess, tmp_path: Path):
    stopped = new_site(tmp_path, "stopped")
    for site_dir in (hub.site_dir, stopped):
        fails(fabric(site_dir, "listener", "delete", "nope"), "no listener named 'nope'")
        fails(fabric(site_dir, "connector", "delete", "nope"), "no connector named 'nope'")
        fails(fabric(site_dir, "link", "delete", "nope"), "nope")
        fails(fabric(site_dir, "link", "update", "nope", "--cost", "3"), "nope")


def test_creating_twice(hub: SiteProcess, tmp_path: Path):
    fails(fabric(hub.site_dir, "site", "create", "hub"), str(hub.site_dir))
    fails(fabric(hub.site_dir, "site", "delete", "--yes"), "running")
    port = str(free_port())
    ok(fabric(hub.site_dir, "connector", "create", "twice", port))
    fails(fabric(hub.site_dir, "connector", "create", "twice", port), "exists already")
    ok(fabric(hub.site_dir, "connector", "delete", "twice"))


def test_a_second_site_run_on_one_directory(hub: SiteProcess):
    fails(fabric(hub.site_dir, "site", "run", timeout=30), "already running")


def test_issuing_a_token_without_link_access(tmp_path: Path):
    fails(fabric(new_site(tmp_path, "closed"), "token", "issue", str(tmp_path / "t.token")), "accepts no links")


def test_usage_errors_exit_2(tmp_path: Path):
    site = new_site(tmp_path, "usage")
    for argv, words in (
        (("token", "issue", str(tmp_path / "t"), "--expiration-window", "soon"), "not a duration"),
        (("listener", "create", "db", "99999"), "99999"),
        (("listener", "create", "db", "5432", "--protocol", "udp"), "udp"),
        (("listener", "create", "db", "5432", "--distribution", "nearest"), "nearest"),
        (("link", "update", "hub"), "--cost"),
        (("site", "create", "x", "--no-link-access", "--link-port", "7443"), "--link-port"),
    ):
        result = fabric(site, *argv)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def test_a_revoked_site_cannot_link_again(hub: SiteProcess, tmp_path: Path):
    token = issue(hub, tmp_path / "revoked.token")
    site = new_site(tmp_path, "revoked")
    with running(site):
        ok(fabric(site, "token", "redeem", str(token), "--timeout", "30s"))
        out = ok(fabric(hub.site_dir, "link", "revoke", "revoked"))
        assert "revoked" in out
        deadline = time.monotonic() + 15
        while True:  # the link is dropped, and every reconnection refused
            links = as_json(fabric(site, "link", "status", "-o", "json"))["links"]
            if links and not links[0]["up"] and links[0]["error"]:
                break
            assert time.monotonic() < deadline, f"link still up or without an error after the revocation: {links}"
            time.sleep(0.2)
        fails(fabric(hub.site_dir, "link", "revoke", "revoked"), "revoked")
