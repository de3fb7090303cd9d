"""Access policy through the `fabric` command, as a user sets it: which sites a listener uses, which sites
reach a connector, which routing keys a linked site may offer.

    honest --link--> hub <--link-- evil (its token: --offer tools)
    connector web --allow hub       connector web, connector tools
    listener web --provider honest at the hub

Both honest and evil serve a page for `web` with `python -m http.server`; the
hub's clients (curl) must only ever get honest's page. Each site is `fabric
site run` in a process of its own.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import (
    as_json,
    background,
    fabric,
    fails,
    free_port,
    ok,
    running,
    wait_port,
)

pytestmark = pytest.mark.system

CURL = "/usr/bin/curl"
FETCHES = 10


def serve_page(root: Path, text: str, port: int) -> list[str]:
    """The argv of an HTTP server on 127.0.0.1:port whose /page.txt says `text`."""
    root.mkdir()
    (root / "page.txt").write_text(text)
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]


def fetch(port: int) -> str:
    fetched = subprocess.run(
        [CURL, "-sf", "--max-time", "10", f"http://127.0.0.1:{port}/page.txt"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert fetched.returncode == 0, f"curl exited {fetched.returncode}: {fetched.stderr}"
    return fetched.stdout


def test_provider_allow_and_offer_policies_set_from_the_command_line(tmp_path: Path):
    hub, honest, evil = tmp_path / "hub", tmp_path / "honest", tmp_path / "evil"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0"))
    ok(fabric(honest, "site", "create", "honest", "--no-service-sync"))
    ok(fabric(evil, "site", "create", "evil", "--no-service-sync"))
    page = f"served at honest: {secrets.token_hex(16)}\n"
    honest_port, evil_port, tools_port, listener_port = free_port(), free_port(), free_port(), free_port()

    # A policy entry is a site id or a name: anything else is refused with one line, and nothing is saved.
    fails(fabric(honest, "connector", "create", "web", str(honest_port), "--allow", "../hub"), "allow entry must be")
    out = ok(fabric(honest, "connector", "create", "web", str(honest_port), "--host", "127.0.0.1", "--allow", "hub"))
    assert f"routing key web -> 127.0.0.1:{honest_port} (allowed sites: hub)" in out
    ok(fabric(evil, "connector", "create", "web", str(evil_port), "--host", "127.0.0.1"))
    ok(fabric(evil, "connector", "create", "tools", str(tools_port), "--host", "127.0.0.1"))

    with (
        background(*serve_page(tmp_path / "honest-www", page, honest_port)),
        background(*serve_page(tmp_path / "evil-www", "served at evil\n", evil_port)),
        running(hub, honest, evil),
    ):
        wait_port(honest_port)
        wait_port(evil_port)
        ok(fabric(hub, "token", "issue", str(tmp_path / "honest.token")))
        ok(fabric(honest, "token", "redeem", str(tmp_path / "honest.token"), "--wait", "--timeout", "30s"))
        out = ok(fabric(hub, "token", "issue", str(tmp_path / "evil.token"), "--offer", "tools"))
        assert "the sites that redeem it may offer only tools through their links here" in out
        ok(fabric(evil, "token", "redeem", str(tmp_path / "evil.token"), "--wait", "--timeout", "30s"))

        out = ok(fabric(
            hub, "listener", "create", "web", str(listener_port), "--provider", "honest", "--wait", "--timeout", "30s"
        ))
        assert f"127.0.0.1:{listener_port} -> routing key web (providers: honest)" in out
        assert all(fetch(listener_port) == page for _ in range(FETCHES))

        # What the hub shows: the listener's policy, the link that may offer only tools, the key evil offers too.
        status = as_json(fabric(hub, "site", "status", "-o", "json"))
        (listener,) = [item for item in status["listeners"] if not item["auto"]]
        assert listener["providers"] == ["honest"] and listener["accepting"]
        evil_link = next(link for link in status["links"] if link["name"] == "evil")
        assert evil_link["offers"] == ["tools"] and evil_link["ignored"] == ["web"]
        assert "web: providers: honest" in ok(fabric(hub, "listener", "status"))
        assert "evil: may offer only tools; ignored: web" in ok(fabric(hub, "link", "status"))
        network = as_json(fabric(hub, "network", "status", "-o", "json"))
        web = next(service for service in network["services"] if service["routing_key"] == "web")
        assert web["providers"] == ["honest"] and web["ignored"] == ["evil"] and web["shared"]
        table = ok(fabric(hub, "network", "status"))
        assert "Notes:\n  routing key 'web' is offered by 2 sites: honest (" in table
        assert all(len(line) <= 80 for line in table.splitlines() if not line.startswith("  ")), table

        # At honest: its connector takes flows from the hub only, and its outgoing link's offers change.
        assert "web: allowed sites: hub" in ok(fabric(honest, "connector", "status"))
        assert "link hub: offers web" in ok(fabric(honest, "link", "update", "hub", "--offer", "web"))
        (link,) = as_json(fabric(honest, "link", "status", "-o", "json"))["links"]
        assert link["offers"] == ["web"]
        ok(fabric(honest, "link", "update", "hub", "--any-offer"))
        (link,) = as_json(fabric(honest, "link", "status", "-o", "json"))["links"]
        assert link["offers"] is None
        result = fabric(honest, "link", "update", "hub", "--offer", "web", "--any-offer")
        assert result.returncode == 2 and "--offer and --any-offer contradict each other" in result.stderr

        # Evil's clients are refused by honest's connector: a listener there for web gets no page.
        evil_listener = free_port()
        ok(fabric(evil, "listener", "create", "web-honest", str(evil_listener), "--routing-key", "web",
                  "--provider", "honest", "--wait", "--timeout", "30s"))
        refused = subprocess.run(
            [CURL, "-s", "--max-time", "10", f"http://127.0.0.1:{evil_listener}/page.txt"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert refused.returncode != 0 and refused.stdout == ""
        (connector,) = as_json(fabric(honest, "connector", "status", "-o", "json"))["connectors"]
        assert connector["allow"] == ["hub"] and connector["refused"] >= 1
        assert connector["refused_from"].startswith("evil (")
