"""`fabric debug dump`: what a bug report needs, and never a private key or a token's secret."""

from __future__ import annotations

import json
import stat
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from cli_support import as_json, fabric, free_port, ok, running

pytestmark = pytest.mark.system


def members(dump: Path) -> dict[str, bytes]:
    """The files of the tarball by name, without the top directory (there is exactly one)."""
    with tarfile.open(dump, "r:gz") as tar:
        files = [info for info in tar.getmembers() if info.isfile()]
        tops = {info.name.split("/")[0] for info in tar.getmembers()}
        assert len(tops) == 1 and tops.pop().startswith("fabric-debug-")
        return {info.name.split("/", 1)[1]: tar.extractfile(info).read() for info in files}


def secrets_of(site_dir: Path, *tokens: Path) -> list[bytes]:
    """Strings that must never leave the site: its private keys, token secrets."""
    found = [path.read_bytes() for path in (site_dir / "identity").glob("*.key")]
    found += [yaml.safe_load(token.read_text())["secret"].encode() for token in tokens]
    assert found
    return found


def assert_nothing_secret(files: dict[str, bytes], secrets: list[bytes]) -> None:
    for name, data in files.items():
        assert b"PRIVATE KEY" not in data, f"{name} holds a private key"
        for secret in secrets:
            assert secret.strip() not in data, f"{name} holds a secret"
        assert not name.startswith(("identity/", "state/")), name


def test_a_dump_of_a_running_site(tmp_path: Path):
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0"))
    ok(fabric(edge, "site", "create", "edge", "--edge"))
    with running(hub, edge):
        used, unused = tmp_path / "used.token", tmp_path / "unused.token"
        ok(fabric(hub, "token", "issue", str(used)))
        ok(fabric(hub, "token", "issue", str(unused), "--redemptions-allowed", "3"))
        ok(fabric(edge, "token", "redeem", str(used), "--timeout", "30s"))
        ok(fabric(hub, "connector", "create", "db", str(free_port())))
        dump = tmp_path / "hub.tar.gz"
        out = ok(fabric(hub, "debug", "dump", str(dump)))
    assert f"debug dump written to {dump}" in out

    files = members(dump)
    assert {"site.yaml", "config.json", "status.json", "network-status.json", "logs.txt", "versions.txt", "files.txt"} <= set(files)
    assert "errors.txt" not in files
    assert yaml.safe_load(files["site.yaml"])["name"] == "hub"
    status = json.loads(files["status.json"])
    assert status["running"] and [link["name"] for link in status["links"]] == ["edge"]
    assert [s["name"] for s in json.loads(files["network-status.json"])["sites"]] == ["hub", "edge"]
    assert b"edge" in files["logs.txt"] and b"up" in files["logs.txt"]  # the link came up, and the log says so
    versions = files["versions.txt"].decode()
    for name in ("fabric:", "python:", "trio:", "openssl:", "platform:"):
        assert name in versions
    assert "identity/site.key" in files["files.txt"].decode()  # listed by name, with its mode; never its content
    assert_nothing_secret(files, secrets_of(hub, used, unused))


def test_a_dump_of_a_stopped_site(tmp_path: Path):
    site = tmp_path / "quiet"
    ok(fabric(site, "site", "create", "quiet", "--link-port", str(free_port())))
    token = tmp_path / "quiet.token"
    ok(fabric(site, "token", "issue", str(token)))
    dump = tmp_path / "quiet.tgz"
    out = ok(fabric(site, "debug", "dump", str(dump)))
    assert "the site is not running" in out
    files = members(dump)
    assert json.loads(files["status.json"])["running"] is False
    assert files["logs.txt"] == b""
    assert_nothing_secret(files, secrets_of(site, token))


@pytest.mark.parametrize(
    "password, meant",
    [
        ("S3cret-proxy-pw", "S3cret-proxy-pw"),
        ("S3cr/et@pw:x", "S3cr/et@pw:x"),  # "/", "@" and ":" unquoted: the credentials end at the last "@"
        ("S3cr%40et%2Fpw", "S3cr@et/pw"),  # %-quoted, as a URL has it
    ],
)
def test_a_dump_never_holds_the_password_of_a_links_proxy_and_is_0600(tmp_path: Path, password: str, meant: str):
    """The edge's link to the hub goes through a proxy with a password (nothing listens there, so
    every dial fails and the log talks about the proxy). The password is in site.yaml; the dump
    of the edge shows it as *** in every file, holds no private key, and is 0600 even where a
    0644 file was before."""
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0"))
    ok(fabric(edge, "site", "create", "edge"))
    proxy = f"http://alice:{password}@127.0.0.1:{free_port()}"
    token = tmp_path / "hub.token"
    with running(hub):
        ok(fabric(hub, "token", "issue", str(token)))
        ok(fabric(edge, "token", "redeem", str(token)))  # the edge is stopped: the link comes up when it starts
    said = ok(fabric(edge, "link", "update", "hub", "--proxy", proxy))
    assert "alice:***@" in said and password not in said and meant not in said
    assert password in (edge / "site.yaml").read_text()  # where a dump would find it
    dump = tmp_path / "edge.tar.gz"
    dump.write_bytes(b"an older file, world-readable")
    dump.chmod(0o644)
    with running(edge):
        deadline = time.monotonic() + 30
        while not (links := as_json(fabric(edge, "link", "status", "-o", "json"))["links"])[0].get("error"):
            assert time.monotonic() < deadline, f"the link through the proxy did not fail: {links}"
            time.sleep(0.2)
        out = ok(fabric(edge, "debug", "dump", str(dump)))
    assert password not in out and meant not in out
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600

    files = members(dump)
    assert {"site.yaml", "config.json", "status.json", "logs.txt"} <= set(files)
    assert_nothing_secret(files, secrets_of(edge) + [password.encode(), meant.encode()])
    assert yaml.safe_load(files["site.yaml"])["links"][0]["proxy"].startswith("http://alice:***@127.0.0.1:")
    assert json.loads(files["config.json"])["links"][0]["proxy"].startswith("http://alice:***@127.0.0.1:")
    assert b"alice:***@" in files["logs.txt"]  # the log speaks of the proxy, without its password
