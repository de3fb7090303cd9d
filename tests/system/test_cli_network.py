"""A three-site network built and used only through the `fabric` command, as a new user would.

    a --link--> hub <--link-- b
    listener web                connector web -> python -m http.server

A and B redeem tokens the hub issued; each site is `fabric site run` in a
process of its own; curl at A fetches a file that the HTTP server next to B
serves; `network status` at A shows all three sites and the routing key; every
site exits 0 within 5 s of SIGTERM.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import (
    STOP_DEADLINE,
    as_json,
    background,
    fabric,
    free_port,
    ok,
    running,
    wait_port,
)

pytestmark = pytest.mark.system

CURL = "/usr/bin/curl"


def test_three_sites_linked_by_tokens_carry_http_from_a_to_b(tmp_path: Path):
    hub, a, b = tmp_path / "hub", tmp_path / "a", tmp_path / "b"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0"))
    ok(fabric(a, "site", "create", "a"))
    ok(fabric(b, "site", "create", "b", "--edge"))

    www = tmp_path / "www"
    www.mkdir()
    page = f"served at b, reached from a: {secrets.token_hex(16)}\n"
    (www / "page.txt").write_text(page)
    web_port, listener_port = free_port(), free_port()

    # A change to a stopped site is saved and takes effect when it starts.
    out = ok(fabric(b, "connector", "create", "web", str(web_port), "--host", "127.0.0.1"))
    assert f"routing key web -> 127.0.0.1:{web_port}" in out
    assert "site is not running: saved; takes effect when it starts" in out

    server = [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1", "--directory", str(www)]
    with background(*server), running(hub, a, b) as processes:
        wait_port(web_port)
        for site_dir, name in ((a, "a"), (b, "b")):
            token = tmp_path / f"{name}.token"
            out = ok(fabric(hub, "token", "issue", str(token), "--expiration-window", "5m"))
            assert f"token written to {token}" in out
            assert token.stat().st_mode & 0o777 == 0o600  # it holds a secret
            out = ok(fabric(site_dir, "token", "redeem", str(token), "--wait", "--timeout", "30s"))
            assert "waiting for link hub to come up..." in out and "link hub is up" in out

        out = ok(fabric(a, "listener", "create", "web", str(listener_port), "--wait", "--timeout", "30s"))
        assert f"127.0.0.1:{listener_port} -> routing key web" in out
        assert "routing key web is reachable at b" in out

        fetched = subprocess.run(
            [CURL, "-sf", "--max-time", "10", f"http://127.0.0.1:{listener_port}/page.txt"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert fetched.returncode == 0, f"curl exited {fetched.returncode}: {fetched.stderr}"
        assert fetched.stdout == page

        network = as_json(fabric(a, "network", "status", "-o", "json"))
        sites = {site["name"]: site for site in network["sites"]}
        assert set(sites) == {"hub", "a", "b"}
        assert all(site["reachable"] for site in sites.values())
        assert sites["b"]["mode"] == "edge" and sites["b"]["services"] == ["web"]
        assert {link["peer_name"] for link in sites["a"]["links"]} == {"hub"}
        services = {service["routing_key"]: service for service in network["services"]}
        assert services["web"]["providers"] == ["b"] and services["web"]["listeners"] == ["web"]

        links = as_json(fabric(hub, "link", "status", "-o", "json"))["links"]
        assert sorted((link["name"], link["direction"], link["up"]) for link in links) == [
            ("a", "incoming", True), ("b", "incoming", True)
        ]
        table = ok(fabric(a, "network", "status"))
        assert all(len(line) <= 80 for line in table.splitlines()), table
        assert "web" in table and "hub" in table

        # The same service through an HTTP listener: each request routed on its own, and counted.
        http_port = free_port()
        out = ok(fabric(a, "listener", "create", "web-http", str(http_port), "--routing-key", "web", "--protocol", "http"))
        assert f"127.0.0.1:{http_port} -> routing key web" in out
        for _ in range(3):
            fetched = subprocess.run(
                [CURL, "-sf", "--max-time", "10", f"http://127.0.0.1:{http_port}/page.txt"],
                capture_output=True, text=True, timeout=30, check=False,
            )
            assert fetched.returncode == 0 and fetched.stdout == page, fetched.stderr
        missing = subprocess.run(
            [CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{http_port}/nothing-here"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert missing.stdout == "404"
        listeners = ok(fabric(a, "listener", "status"))
        assert "HTTP requests (1):" in listeners and "web-http: GET 4; bodies 0 B in" in listeners, listeners
        (row,) = [line for line in listeners.splitlines() if line.startswith("web-http ") and "accepting" not in line]
        assert row.split()[1:8] == ["4", "0", "0", "3", "0", "1", "0"], row  # requests, active, broken, 2xx..5xx
        assert all(len(line) <= 80 for line in listeners.splitlines()), listeners

        for process in processes:
            code, seconds = process.stop()
            assert code == 0, f"site {process.site_dir.name} exited {code} after SIGTERM; log:\n{process.log_tail()}"
            assert seconds < STOP_DEADLINE
    for site_dir in (hub, a, b):
        assert ok(fabric(site_dir, "site", "status")).splitlines()[0].endswith("not running (start it with `fabric site run`)")
