"""The paths a client's connection takes to a server: direct, through a one-hop relay, through fabric.

A path turns a target port (the server's) into the port a client dials. Each
kind is one row of `PATHS`; a path for a new transport (a WebSocket link,
say) is one more row and one more `open` method.

| path     | what is between the client and the server                                   |
| -------- | --------------------------------------------------------------------------- |
| direct   | nothing                                                                     |
| socat    | `socat` one hop (a process forked per connection, as it is usually run)     |
| haproxy  | `haproxy` one hop, its defaults (one thread per core); mode tcp, or mode http for an HTTP server |
| fabric-2 | a listener at site a, a TLS link a -> b, the connector at b                 |
| fabric-3 | the listener at a, links a -> b <- c, the connector at c (b is the transit) |
| fabric-ws | a listener at site w, a WebSocket link w -> b (ws://, TLS inside), the connector at b |
| fabric-2-http | as fabric-2, with an HTTP listener (`--protocol http`): HTTP servers only |

The fabric sites are real processes, `fabric site run`, set up only through
the `fabric` command, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import yaml

from .programs import Background, BenchError, free_port

FABRIC = (sys.executable, "-m", "fabric.cli")
COMMAND_TIMEOUT = 60  # seconds for one `fabric` command (the --wait ones wait at most 30 s)


@attrs.frozen
class PathKind:
    name: str
    baseline: bool  # fabric figures are shown as ratios to these
    programs: tuple[str, ...]  # what must be installed (else the path is left out, with the package named)
    description: str


PATHS = (
    PathKind("direct", True, (), "client -> server"),
    PathKind("socat", True, ("socat",), "socat one hop"),
    PathKind("haproxy", True, ("haproxy",), "haproxy one hop (mode tcp; mode http for an HTTP server)"),
    PathKind("fabric-2", False, (), "2 sites, one TLS link"),
    PathKind("fabric-3", False, (), "3 sites, one transit"),
    PathKind("fabric-ws", False, (), "2 sites, one WebSocket link"),
    PathKind("fabric-2-http", False, (), "2 sites, one TLS link, HTTP listener"),
)


class Relays:
    """The socat and haproxy relays in front of each target."""

    def __init__(self, background: Background, workdir: Path) -> None:
        self._background = background
        self._workdir = workdir

    def socat(self, name: str, target: int) -> int:
        port = free_port()
        self._background.start(
            f"socat-{name}",
            [
                "socat",
                f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay",
                f"TCP:127.0.0.1:{target},nodelay",
            ],
        )
        self._background.wait_port(f"socat-{name}", port)
        return port

    def haproxy(self, targets: dict[str, int], http: frozenset[str] = frozenset()) -> dict[str, int]:
        """One haproxy with a frontend per target (in mode http for those named in `http`); name -> its port."""
        ports = {name: free_port() for name in targets}
        lines = [
            "global",
            "  maxconn 4000",  # haproxy wants 2 fds per connection under the hard limit (often 20000 here)
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 5m",
            "  timeout server 5m",
            "  timeout http-keep-alive 5m",
        ]
        for name, target in targets.items():
            mode = "  mode http" if name in http else "  mode tcp"
            lines += [
                f"frontend in-{name}",
                mode,
                f"  bind 127.0.0.1:{ports[name]}",
                f"  default_backend out-{name}",
                f"backend out-{name}",
                mode,
                f"  server target 127.0.0.1:{target}",
            ]
        config = self._workdir / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        self._background.start("haproxy", ["haproxy", "-db", "-f", str(config)])
        for port in ports.values():
            self._background.wait_port("haproxy", port)
        return ports


class FabricNetwork:
    """Sites a, b, c, w as `fabric site run` processes: a, c and w link to b; connectors at b and c.

    Routing key `NAME-2` has its connector at b, with listeners at a (one TLS
    link) and at w (one WebSocket link); `NAME-3` at c, with a listener at a
    (through b). Service sync is off: all four sites share one host.
    """

    SITES = ("a", "b", "c", "w")

    def __init__(self, background: Background, workdir: Path, *, settings: dict | None = None) -> None:
        self._background = background
        self.root = workdir / "sites"
        self.pids: dict[str, int] = {}
        self._settings = settings or {}  # site.yaml `settings` to change at every site (names as there)

    def fabric(self, site: str, *args: str) -> str:
        """Run one `fabric` command at a site; its stdout. BenchError with its stderr if it fails."""
        argv = [*FABRIC, "--site-dir", str(self.root / site), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        if done.returncode != 0:
            raise BenchError(f"`fabric {' '.join(args)}` at site {site} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> None:
        self.root.mkdir()
        self.fabric("b", "site", "create", "b", "--link-access", "--link-port", "0", "--ws-port", "0", "--no-service-sync")
        for site in ("a", "c", "w"):
            self.fabric(site, "site", "create", site, "--no-service-sync")
        if self._settings:
            for site in self.SITES:
                config_file = self.root / site / "site.yaml"
                config = yaml.safe_load(config_file.read_text())
                config["settings"].update(self._settings)
                config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        for site in self.SITES:
            process = self._background.start(
                f"site-{site}", [*FABRIC, "--site-dir", str(self.root / site), "site", "run"]
            )
            self.pids[site] = process.pid
        for site in self.SITES:
            try:
                self.fabric(site, "site", "status", "--wait", "--timeout", "30s")
            except BenchError:
                self._background.check(f"site-{site}")
                raise
        status = json.loads(self.fabric("b", "site", "status", "-o", "json"))
        for site, address in (("a", status["link_address"]), ("c", status["link_address"]), ("w", status["ws_address"])):
            token = self.root / f"{site}.token"
            self.fabric("b", "token", "issue", str(token), "--link-url", address)
            self.fabric(site, "token", "redeem", str(token), "--wait", "--timeout", "30s")

    def expose(self, name: str, target: int, *, http: bool = False) -> dict[str, int]:
        """Connectors for the target at b and c; listeners at a (both) and w (`NAME-2`); path name -> listener port.

        With `http`, the connectors say so, and a second listener at a for
        `NAME-2` (`NAME-2h`) has `--protocol http`: path fabric-2-http.
        """
        protocol = ["--protocol", "http"] if http else []
        for key, site in ((f"{name}-2", "b"), (f"{name}-3", "c")):
            self.fabric(site, "connector", "create", key, str(target), "--host", "127.0.0.1", *protocol)
        ports = {}
        for path, site, key in (("fabric-2", "a", f"{name}-2"), ("fabric-3", "a", f"{name}-3"), ("fabric-ws", "w", f"{name}-2")):
            port = free_port()
            self.fabric(site, "listener", "create", key, str(port), "--wait", "--timeout", "30s")
            ports[path] = port
        if http:
            port = free_port()
            self.fabric("a", "listener", "create", f"{name}-2h", str(port), "--routing-key", f"{name}-2",
                        "--protocol", "http", "--wait", "--timeout", "30s")
            ports["fabric-2-http"] = port
        return ports

    def check(self) -> None:
        for site in self.SITES:
            self._background.check(f"site-{site}")
