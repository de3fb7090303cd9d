"""Graceful restart: a site stopped with SIGTERM and started again with `fabric site run` gets its
links and services back by itself; no other site is restarted or reconfigured.

    a --link--> hub <--link-- b
    listener web                connector web -> python -m http.server

First the hub restarts (the site both others dial, and the transit between them), then b (the
provider, which dials). Throughout, a and b keep running the same processes, and the site.yaml of
every site but the restarted one stays byte for byte what it was.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import (
    STOP_DEADLINE,
    SiteProcess,
    as_json,
    background,
    fabric,
    free_port,
    ok,
    wait_port,
)

pytestmark = pytest.mark.system

CURL = "/usr/bin/curl"
BACK_DEADLINE = 30  # seconds for links and services to come back after a restart (they take ~1 s)


def fetch(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CURL, "-sf", "--max-time", "10", f"http://127.0.0.1:{port}/page.txt"],
        capture_output=True, text=True, timeout=30, check=False,
    )


def wait_until(condition, what: str, processes: list[SiteProcess]) -> None:
    """Poll `condition` (each look is a `fabric` command: a child process has no event to wait on)."""
    end = time.monotonic() + BACK_DEADLINE
    while not condition():
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.site_dir.name}:\n{p.log_tail()}" for p in processes)
            raise AssertionError(f"{what}: not within {BACK_DEADLINE} s\n{logs}")
        time.sleep(0.2)


def links_up(site_dir: Path) -> dict[str, bool]:
    return {link["name"]: link["up"] for link in as_json(fabric(site_dir, "link", "status", "-o", "json"))["links"]}


def serves(site_dir: Path, key: str, provider: str) -> bool:
    network = as_json(fabric(site_dir, "network", "status", "-o", "json"))
    return any(s["routing_key"] == key and provider in s["providers"] for s in network["services"])


def test_a_restarted_site_gets_its_links_and_services_back_without_touching_the_others(tmp_path: Path):
    hub, a, b = tmp_path / "hub", tmp_path / "a", tmp_path / "b"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0", "--no-service-sync"))
    ok(fabric(a, "site", "create", "a", "--no-service-sync"))
    ok(fabric(b, "site", "create", "b", "--no-service-sync"))

    www = tmp_path / "www"
    www.mkdir()
    page = f"served at b, reached from a: {secrets.token_hex(16)}\n"
    (www / "page.txt").write_text(page)
    web_port, listener_port = free_port(), free_port()
    ok(fabric(b, "connector", "create", "web", str(web_port), "--host", "127.0.0.1"))
    ok(fabric(a, "listener", "create", "web", str(listener_port)))

    server = [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1", "--directory", str(www)]
    sites = {name: SiteProcess(path) for name, path in (("hub", hub), ("a", a), ("b", b))}
    try:
        with background(*server):
            wait_port(web_port)
            for site in sites.values():
                site.wait_running()
            for site_dir, name in ((a, "a"), (b, "b")):
                token = tmp_path / f"{name}.token"
                ok(fabric(hub, "token", "issue", str(token), "--expiration-window", "5m"))
                ok(fabric(site_dir, "token", "redeem", str(token), "--wait", "--timeout", "30s"))
            everyone = lambda: list(sites.values())  # noqa: E731 - the processes as they are now
            wait_until(lambda: serves(a, "web", "b"), "routing key web reachable at a", everyone())
            fetched = fetch(listener_port)
            assert fetched.returncode == 0 and fetched.stdout == page, fetched.stderr
            link_port = as_json(fabric(hub, "site", "status", "-o", "json"))["link_address"]

            for restarted in ("hub", "b"):
                others = [name for name in sites if name != restarted]
                configs = {name: (tmp_path / name / "site.yaml").read_bytes() for name in others}
                pids = {name: sites[name].process.pid for name in others}

                code, seconds = sites[restarted].stop()
                assert code == 0 and seconds < STOP_DEADLINE, sites[restarted].log_tail()
                # Meanwhile a client is refused or reset at once, never left hanging.
                down = fetch(listener_port)
                assert down.returncode != 0 and "timed out" not in down.stderr.lower(), down

                sites[restarted] = SiteProcess(tmp_path / restarted)
                sites[restarted].wait_running()
                wait_until(lambda: links_up(a) == {"hub": True}, f"a's link to the hub after {restarted} restarted",
                           everyone())
                wait_until(lambda: links_up(b) == {"hub": True}, f"b's link to the hub after {restarted} restarted",
                           everyone())
                wait_until(lambda: links_up(hub) == {"a": True, "b": True},
                           f"the hub's links after {restarted} restarted", everyone())
                wait_until(lambda: serves(a, "web", "b"), f"routing key web at a after {restarted} restarted",
                           everyone())
                fetched = fetch(listener_port)
                assert fetched.returncode == 0 and fetched.stdout == page, (restarted, fetched.stderr)

                # Nobody else was restarted or reconfigured.
                for name in others:
                    assert sites[name].process.pid == pids[name] and sites[name].process.poll() is None
                    assert (tmp_path / name / "site.yaml").read_bytes() == configs[name], f"{name} was reconfigured"
                assert as_json(fabric(hub, "site", "status", "-o", "json"))["link_address"] == link_port

            for site in sites.values():
                code, _ = site.stop()
                assert code == 0, site.log_tail()
    finally:
        for site in sites.values():
            site.kill()
