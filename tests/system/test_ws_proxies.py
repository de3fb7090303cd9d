"""WebSocket links through the proxies edge sites meet, all real programs, set up only with the `fabric` command.

- nginx terminating TLS in front of the hub's WebSocket port: the edge dials
  `wss://` (trusting nginx's certificate through SSL_CERT_FILE, as a system
  CA would) and reaches a service behind the hub;
- tinyproxy as an HTTP CONNECT forward proxy named by HTTPS_PROXY, with Basic
  authentication: right credentials link, wrong ones get an error that says
  so;
- a firewall: the edge site runs in a network namespace (made by the test)
  whose only way out is the proxy; it links, gossips and carries traffic both
  ways, and loses and regains its link as the proxy goes and comes back.

nginx and tinyproxy are Debian packages the README's test command installs;
without them, or without network namespaces (root, `ip`, `iptables`), a test
is skipped and says why (in CI it fails: prerequisites.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from cli_support import (
    SiteProcess,
    as_json,
    background,
    fabric,
    fails,
    free_port,
    ok,
    wait_port,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prerequisites import require_programs, require_root, unavailable

pytestmark = pytest.mark.system

NGINX = "/usr/sbin/nginx"
TINYPROXY = "/usr/bin/tinyproxy"
CURL = "/usr/bin/curl"
LINK_DEADLINE = 30  # seconds for a link to come up or go down; ~1 s here (the dialler backs off to 10 s)
PAGE = 2 * 1024 * 1024  # bytes of the file each way


# -- the programs around the sites ------------------------------------------------------


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for `host` and its key, as a reverse proxy in front of a hub would have."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "proxy-cert.pem", directory / "proxy-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@contextmanager
def nginx_tls_proxy(directory: Path, backend: int) -> Iterator[tuple[int, Path]]:
    """nginx on a free port: TLS for 127.0.0.1, /fabric passed as a WebSocket to 127.0.0.1:backend. (port, CA file)"""
    require_programs(NGINX)
    prefix = directory / "nginx"
    prefix.mkdir()
    cert, key = self_signed(prefix)
    port = free_port()
    (prefix / "nginx.conf").write_text(
        # As root, nginx's workers would run as www-data, which cannot enter pytest's 0700 tmp_path.
        f"""{"user root; " if os.geteuid() == 0 else ""}worker_processes 1; daemon off; pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {prefix}/access.log;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    location /fabric {{
      proxy_pass http://127.0.0.1:{backend};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_read_timeout 1h; proxy_send_timeout 1h;
    }}
    location / {{ return 404 "nothing here\\n"; }}
  }}
}}
"""
    )
    with background(NGINX, "-c", str(prefix / "nginx.conf"), "-p", str(prefix)):
        wait_port(port)
        yield port, cert


@contextmanager
def tinyproxy(directory: Path, port: int, *, listen: str = "127.0.0.1", auth: tuple[str, str] | None = None):
    """tinyproxy in the foreground on listen:port, CONNECT to any port, Basic auth if given."""
    require_programs(TINYPROXY)
    conf = directory / f"tinyproxy-{port}.conf"
    lines = [
        f"Port {port}",
        f"Listen {listen}",
        "Timeout 600",
        "MaxClients 100",
        f"LogFile \"{directory / f'tinyproxy-{port}.log'}\"",
        "LogLevel Connect",
        # No Allow and no ConnectPort lines: any client, CONNECT to any port.
    ]
    if os.geteuid() == 0:
        lines += ["User root", "Group root"]
    if auth:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    with background(TINYPROXY, "-d", "-c", str(conf)) as process:
        wait_port(port, host=listen)
        yield process


def web_root(directory: Path, name: str) -> tuple[Path, str]:
    """A directory with one random file of PAGE bytes; (directory, its SHA-256)."""
    root = directory / f"www-{name}"
    root.mkdir()
    data = secrets.token_bytes(PAGE)
    (root / "page.bin").write_bytes(data)
    return root, hashlib.sha256(data).hexdigest()


def fetch_sha(port: int, prefix: tuple[str, ...] = ()) -> str:
    """SHA-256 of what curl fetches from 127.0.0.1:port/page.bin (run under `prefix`, e.g. in a namespace)."""
    done = subprocess.run(
        [*prefix, CURL, "-sf", "--max-time", "20", f"http://127.0.0.1:{port}/page.bin"],
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, f"curl exited {done.returncode}: {done.stderr.decode(errors='replace')}"
    return hashlib.sha256(done.stdout).hexdigest()


def link_of(site_dir: Path, env: dict[str, str] | None = None) -> dict:
    (link,) = as_json(fabric(site_dir, "link", "status", "-o", "json", env=env))["links"]
    return link


def eventually(check, what: str):
    """check()'s value once it is truthy (it may raise AssertionError until then); fails after LINK_DEADLINE."""
    end = time.monotonic() + LINK_DEADLINE
    while True:
        try:
            if value := check():
                return value
        except AssertionError:
            if time.monotonic() > end:
                raise
        if time.monotonic() > end:
            raise AssertionError(f"not {what} after {LINK_DEADLINE} s")
        time.sleep(0.2)


@contextmanager
def sites(*processes: SiteProcess) -> Iterator[None]:
    try:
        for process in processes:
            process.wait_running()
        yield
    finally:
        for process in processes:
            process.kill()


# -- nginx terminating TLS ---------------------------------------------------------------


def test_an_edge_links_through_nginx_terminating_tls_and_reaches_a_service_behind_the_hub(tmp_path: Path):
    require_programs(CURL)
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ws_port = free_port()
    out = ok(fabric(hub, "site", "create", "hub", "--ws-port", str(ws_port)))
    assert f"accepts WebSocket links on 127.0.0.1:{ws_port}" in out
    ok(fabric(edge, "site", "create", "edge", "--edge"))
    www, sha = web_root(tmp_path, "hub")
    web, listener = free_port(), free_port()
    server = [sys.executable, "-m", "http.server", str(web), "--bind", "127.0.0.1", "--directory", str(www)]

    with nginx_tls_proxy(tmp_path, ws_port) as (public, ca), background(*server):
        trust = {"SSL_CERT_FILE": str(ca)}  # the edge trusts nginx's certificate as it would a public CA's
        with sites(SiteProcess(hub), SiteProcess(edge, env=trust)):
            status = as_json(fabric(hub, "site", "status", "-o", "json"))
            assert status["ws_address"] == f"ws://127.0.0.1:{ws_port}/fabric" and status["link_address"] is None
            url = f"wss://127.0.0.1:{public}/fabric"
            ok(fabric(hub, "token", "issue", str(tmp_path / "t"), "--link-url", url))
            out = ok(fabric(edge, "token", "redeem", str(tmp_path / "t"), "--timeout", "30s", env=trust))
            assert url in out and "link hub is up" in out

            link = link_of(edge)
            assert (link["transport"], link["address"], link["up"]) == ("wss", url, True)
            assert f"hub: dials {url}" in ok(fabric(edge, "link", "status"))
            (incoming,) = as_json(fabric(hub, "link", "status", "-o", "json"))["links"]
            assert incoming["transport"] == "ws" and incoming["address"].startswith("127.0.0.1 via 127.0.0.1:")

            ok(fabric(hub, "connector", "create", "web", str(web), "--host", "127.0.0.1"))
            ok(fabric(edge, "listener", "create", "web", str(listener), "--wait", "--timeout", "30s"))
            wait_port(web)
            assert fetch_sha(listener) == sha

        # nginx saw WebSocket upgrades, never the link's content: that is TLS inside.
        assert "GET /fabric HTTP/1.1\" 101" in (tmp_path / "nginx" / "access.log").read_text()


def test_an_edge_that_does_not_trust_the_proxys_certificate_says_so(tmp_path: Path):
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ws_port = free_port()
    ok(fabric(hub, "site", "create", "hub", "--ws-port", str(ws_port)))
    ok(fabric(edge, "site", "create", "edge"))
    with nginx_tls_proxy(tmp_path, ws_port) as (public, _), sites(SiteProcess(hub)):
        ok(fabric(hub, "token", "issue", str(tmp_path / "t"), "--link-url", f"wss://127.0.0.1:{public}/fabric"))
        fails(
            fabric(edge, "token", "redeem", str(tmp_path / "t")),
            f"wss://127.0.0.1:{public}/fabric (outer, WebSocket) failed: certificate verify failed",
        )


# -- a forward proxy ---------------------------------------------------------------------------


def test_an_edge_links_through_a_connect_proxy_named_by_https_proxy_and_wrong_credentials_say_so(tmp_path: Path):
    require_programs(CURL)
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", str(free_port())))
    ok(fabric(edge, "site", "create", "edge"))
    www, sha = web_root(tmp_path, "hub")
    web, listener, proxy_port = free_port(), free_port(), free_port()
    server = [sys.executable, "-m", "http.server", str(web), "--bind", "127.0.0.1", "--directory", str(www)]
    with tinyproxy(tmp_path, proxy_port, auth=("alice", "s3cret")), background(*server), sites(SiteProcess(hub)):
        ok(fabric(hub, "token", "issue", str(tmp_path / "t1")))
        proxy = f"http://127.0.0.1:{proxy_port}"
        wrong = fails(
            fabric(edge, "token", "redeem", str(tmp_path / "t1"), "--proxy", f"http://alice:wrong@127.0.0.1:{proxy_port}"),
            f"proxy http://alice:***@127.0.0.1:{proxy_port} refused the credentials given: 401",  # tinyproxy says 401
        )
        assert "wrong" not in wrong  # the password is never printed
        fails(
            fabric(edge, "token", "redeem", str(tmp_path / "t1"), env={"HTTPS_PROXY": proxy}),
            f"proxy {proxy} requires credentials",
        )
        # The refusals spent nothing: the same token works with the right credentials, from the environment.
        env = {"HTTPS_PROXY": f"http://alice:s3cret@127.0.0.1:{proxy_port}"}
        with sites(SiteProcess(edge, env=env)):
            ok(fabric(edge, "token", "redeem", str(tmp_path / "t1"), "--timeout", "30s", env=env))
            link = link_of(edge)
            assert link["up"] and link["proxy"] == f"http://alice:***@127.0.0.1:{proxy_port}"
            assert f"through proxy http://alice:***@127.0.0.1:{proxy_port}" in ok(fabric(edge, "link", "status"))
            ok(fabric(hub, "connector", "create", "web", str(web), "--host", "127.0.0.1"))
            ok(fabric(edge, "listener", "create", "web", str(listener), "--wait", "--timeout", "30s"))
            wait_port(web)
            assert fetch_sha(listener) == sha
    log = (tmp_path / f"tinyproxy-{proxy_port}.log").read_text()
    assert "CONNECT" in log and "127.0.0.1" in log


# -- a firewall that lets only the proxy through ------------------------------------------------


NS = "fabric-test-edge"
HOST_IP, EDGE_IP = "10.231.0.1", "10.231.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def firewalled_namespace(proxy_port: int) -> Iterator[tuple[str, ...]]:
    """A network namespace joined to this one by a veth pair, whose only way out is HOST_IP:proxy_port.

    Yields the prefix that runs a command inside it.
    """
    require_root("network namespaces need root")
    require_programs("ip", "iptables")
    name = f"{NS}-{os.getpid()}"
    host_if, edge_if = f"fh{os.getpid() % 100000}", f"fe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        unavailable(f"cannot create a network namespace here: {exc.stderr.decode(errors='replace').strip()}")
    inside = ("ip", "netns", "exec", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", edge_if)
        _ip("link", "set", edge_if, "netns", name)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{EDGE_IP}/30", "dev", edge_if)
        _ip("netns", "exec", name, "ip", "link", "set", edge_if, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        rules = [
            ["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
            ["-A", "OUTPUT", "-d", HOST_IP, "-p", "tcp", "--dport", str(proxy_port), "-j", "ACCEPT"],
            ["-A", "OUTPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
            ["-A", "OUTPUT", "-j", "REJECT"],
        ]
        for rule in rules:
            subprocess.run([*inside, "iptables", *rule], check=True, capture_output=True, timeout=30)
        yield inside
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)


def test_an_edge_behind_a_firewall_links_only_through_the_proxy_and_survives_the_proxy_restarting(tmp_path: Path):
    require_programs(CURL)
    proxy_port, ws_port, link_port = free_port(), free_port(), free_port()
    with firewalled_namespace(proxy_port) as inside:
        hub, edge = tmp_path / "hub", tmp_path / "edge"
        # The hub is reachable from the namespace on HOST_IP, but the firewall lets only the proxy's port through.
        ok(fabric(hub, "site", "create", "hub", "--link-host", HOST_IP, "--link-port", str(link_port), "--ws-port", str(ws_port)))
        ok(fabric(edge, "site", "create", "edge", "--edge", "--no-service-sync"))
        hub_www, hub_sha = web_root(tmp_path, "hub")
        edge_www, edge_sha = web_root(tmp_path, "edge")
        hub_web, edge_web, at_edge, at_hub = free_port(), free_port(), free_port(), free_port()
        env = {"HTTP_PROXY": f"http://{HOST_IP}:{proxy_port}", "HTTPS_PROXY": f"http://{HOST_IP}:{proxy_port}"}

        blocked = subprocess.run(
            [*inside, CURL, "-s", "--max-time", "5", f"http://{HOST_IP}:{ws_port}/fabric"], capture_output=True, timeout=30
        )
        assert blocked.returncode != 0, "the firewall let the edge reach the hub directly"

        hub_server = [sys.executable, "-m", "http.server", str(hub_web), "--bind", "127.0.0.1", "--directory", str(hub_www)]
        edge_server = [*inside, sys.executable, "-m", "http.server", str(edge_web), "--bind", "127.0.0.1", "--directory", str(edge_www)]
        with ExitStack() as proxy, background(*hub_server), background(*edge_server):
            proxy.enter_context(tinyproxy(tmp_path, proxy_port, listen=HOST_IP))
            with sites(SiteProcess(hub), SiteProcess(edge, env=env, prefix=inside)):
                # The edge is given the WebSocket address only, as by a hub behind an HTTP-only ingress.
                ok(fabric(hub, "token", "issue", str(tmp_path / "t"), "--link-url", f"ws://{HOST_IP}:{ws_port}/fabric"))
                ok(fabric(edge, "token", "redeem", str(tmp_path / "t"), "--timeout", "30s", env=env))
                link = link_of(edge)
                assert (link["transport"], link["proxy"]) == ("ws", f"http://{HOST_IP}:{proxy_port}")

                # Gossip and traffic both ways: a service at the hub used from the edge, and one at the edge from the hub.
                ok(fabric(hub, "connector", "create", "hub-web", str(hub_web), "--host", "127.0.0.1"))
                ok(fabric(edge, "connector", "create", "edge-web", str(edge_web), "--host", "127.0.0.1"))
                ok(fabric(edge, "listener", "create", "hub-web", str(at_edge), "--wait", "--timeout", "30s"))
                ok(fabric(hub, "listener", "create", "edge-web", str(at_hub), "--wait", "--timeout", "30s"))
                assert eventually(lambda: fetch_sha(at_edge, prefix=inside), "served at the edge") == hub_sha
                assert eventually(lambda: fetch_sha(at_hub), "served at the hub") == edge_sha

                # The proxy goes away: the link drops; it comes back: so does the link, and nobody restarted.
                proxy.close()
                eventually(lambda: not link_of(edge)["up"], "down without the proxy")
                eventually(lambda: "cannot reach proxy" in (link_of(edge).get("error") or ""), "saying the proxy is gone")
                proxy.enter_context(tinyproxy(tmp_path, proxy_port, listen=HOST_IP))
                eventually(lambda: link_of(edge)["up"], "up again with the proxy back")
                assert eventually(lambda: fetch_sha(at_edge, prefix=inside), "served at the edge again") == hub_sha
                assert eventually(lambda: fetch_sha(at_hub), "served at the hub again") == edge_sha
