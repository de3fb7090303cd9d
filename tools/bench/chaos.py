"""Chaos: a mesh of site processes under a steady connection load, with links cut and sites killed at random.

    python -m tools.bench.chaos [--sites 6] [--seconds 60] [--rate 50] [--seed 0] [--json PATH]

Every site is `fabric site run` in a process of its own, made and linked with
the CLI (`site create`, `token issue`, `token redeem`) as a user would. Every
pair of sites is linked (a full mesh), each link through a relay in this
process so that it can be cut. The first site has a listener; the last two
have connectors to echo servers in this process. Clients connect to the
listener at `--rate` per second; each sends 1000 bytes, reads them back and
closes, within 5 s, or it counts as failed.

For `--seconds`, every 1-3 s (from `--seed`) one fault is injected:

- cut (reset): a link's relay aborts its connection (RST both ways) and
  refuses new ones for 1-4 s, as a firewall or a crashed NAT would;
- cut (silent): a link's relay stops carrying bytes for 1-4 s, holding the
  connection open, as a pulled cable would; keepalive must notice;
- kill: a site process gets SIGKILL and is started again 2-5 s later. The
  listener's site is never killed (its clients would have nowhere to go),
  nor both providers at once.

Reported: the share of new connections that succeeded, and the longest gap
between two successful connections (from the start of the chaos to its end).
Targets (issue 4): at least 99% succeed, no gap over 3 s. The exit status is
0 when both are met. Results go to tools/bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

from fabric.pki import Token
from fabric.testing import abort, echo

from .common import finish, raise_fd_limit

FABRIC = (sys.executable, "-m", "fabric.cli")
ROUND_TRIP_DEADLINE = 5.0  # seconds for one client: connect, 1000 bytes there and back, close
MESSAGE = bytes(range(250)) * 4  # 1000 bytes
TARGET_SUCCESS = 0.99
TARGET_GAP = 3.0  # seconds


def run_cli(site_dir: Path, *args: str) -> str:
    result = subprocess.run([*FABRIC, "--site-dir", str(site_dir), *args], capture_output=True, text=True, timeout=90)
    if result.returncode != 0:
        sys.exit(f"`fabric {' '.join(args)}` at {site_dir.name} failed: {result.stderr.strip()}")
    return result.stdout


async def cli(site_dir: Path, *args: str) -> str:
    return await trio.to_thread.run_sync(functools.partial(run_cli, site_dir, *args))


@attrs.define
class Relay:
    """A TCP relay in front of one site's link port, for the link between two sites; cuttable."""

    name: str
    target: int
    port: int = 0
    down_until: float = 0.0  # new connections are refused until then
    silent_until: float = 0.0  # connections cut silently are held open, carrying nothing, until then
    _open: list[trio.CancelScope] = attrs.Factory(list)

    async def handle(self, downstream: trio.SocketStream) -> None:
        if trio.current_time() < self.down_until:
            abort(downstream)
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            abort(downstream)  # the site is down: the dialler sees a reset, as it would without us
            return
        try:
            with trio.CancelScope() as scope:
                self._open.append(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, downstream, upstream)
                        nursery.start_soon(self._pump, upstream, downstream)
                finally:
                    self._open.remove(scope)
            if scope.cancelled_caught:
                await trio.sleep_until(self.silent_until)  # 0 for a reset: at once
        finally:
            abort(downstream)
            abort(upstream)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(256 * 1024):
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def cut(self, kind: str, seconds: float) -> None:
        """Cut the link for `seconds`: its connections reset at once, or silent until then (and reset after)."""
        self.down_until = trio.current_time() + seconds
        self.silent_until = self.down_until if kind == "silent" else 0.0
        for scope in self._open:
            scope.cancel()


@attrs.define
class Load:
    port: int
    rate: float
    results: list[tuple[float, float, str | None]] = attrs.Factory(list)  # started, ended, error

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(self._one)
                await trio.sleep(1 / self.rate)

    async def _one(self) -> None:
        started = trio.current_time()
        error = None
        try:
            with trio.fail_after(ROUND_TRIP_DEADLINE):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with stream:
                    await stream.send_all(MESSAGE)
                    got = b""
                    while len(got) < len(MESSAGE):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise EOFError("closed early")
                        got += chunk
                    if got != MESSAGE:
                        raise ValueError("echo came back changed")
        except trio.TooSlowError:
            error = f"no answer within {ROUND_TRIP_DEADLINE:g} s"
        except (OSError, EOFError, ValueError, trio.BrokenResourceError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.results.append((started, trio.current_time(), error))


class Sites:
    """The site processes: started, killed, started again."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self.dirs = {name: root / name for name in names}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [*FABRIC, "--site-dir", str(self.dirs[name]), "site", "run"], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()

    async def wait_running(self, name: str) -> None:
        await cli(self.dirs[name], "site", "status", "--wait", "--timeout", "30s", "-o", "json")

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(10)

    def kill_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)


async def chaos(args: argparse.Namespace, root: Path) -> dict:
    rng = random.Random(args.seed)
    names = [f"s{i + 1}" for i in range(args.sites)]
    client_site, providers = names[0], names[-2:]
    sites = Sites(root, names)
    print(f"{args.sites} sites in {root}: full mesh, listener at {client_site}, connectors at {', '.join(providers)}")
    for name in names:
        await cli(sites.dirs[name], "site", "create", name, "--link-access", "--link-port", "0", "--no-service-sync")
    try:
        for name in names:
            sites.start(name)
        for name in names:
            await sites.wait_running(name)
        async with trio.open_nursery() as nursery:
            relays: list[Relay] = []
            for i, acceptor in enumerate(names):
                for dialer in names[i + 1 :]:
                    status = await cli(sites.dirs[acceptor], "site", "status", "-o", "json")
                    link_port = int(status.split('"link_address": "tls://127.0.0.1:')[1].split('"')[0])
                    relay = Relay(f"{dialer}-{acceptor}", link_port)
                    relay.port = (await nursery.start(functools.partial(trio.serve_tcp, relay.handle, 0, host="127.0.0.1")))[0].socket.getsockname()[1]
                    relays.append(relay)
                    token_path = root / f"{relay.name}.token"
                    await cli(sites.dirs[acceptor], "token", "issue", str(token_path))
                    token = Token.load(token_path)
                    attrs.evolve(token, addresses=(f"tls://127.0.0.1:{relay.port}",)).save(token_path)
                    await cli(sites.dirs[dialer], "token", "redeem", str(token_path), "--wait", "--timeout", "30s")
            print(f"{len(relays)} links up, each through a cuttable relay")
            for name in providers:
                server = (await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")))[0]
                await cli(sites.dirs[name], "connector", "create", "echo", str(server.socket.getsockname()[1]), "--host", "127.0.0.1")
            listen = (await cli(sites.dirs[client_site], "listener", "create", "echo", "0", "--wait", "--timeout", "30s"))
            port = int(listen.split("127.0.0.1:")[1].split(" ")[0])

            load = Load(port, args.rate)
            nursery.start_soon(load.run)
            await trio.sleep(2)  # warm: every provider has served
            began = trio.current_time()
            events: list[str] = []
            down: set[str] = set()

            async def restart_later(name: str, after: float) -> None:
                await trio.sleep(after)
                sites.start(name)
                await sites.wait_running(name)
                down.discard(name)

            def say(text: str) -> None:
                line = f"{trio.current_time() - began:6.1f} s  {text}"
                events.append(line)
                print(line, flush=True)

            while trio.current_time() - began < args.seconds:
                await trio.sleep(rng.uniform(1, 3))
                action = rng.choice(["cut (reset)", "cut (silent)", "kill"])
                if action == "kill":
                    killable = [n for n in names if n != client_site and n not in down]
                    if len(down & set(providers)) or len(down) >= 2:
                        killable = [n for n in killable if n not in providers]
                    if not killable:
                        continue
                    name = rng.choice(killable)
                    after = rng.uniform(2, 5)
                    down.add(name)
                    sites.kill(name)
                    say(f"kill {name}; back in {after:.1f} s")
                    nursery.start_soon(restart_later, name, after)
                else:
                    relay = rng.choice(relays)
                    seconds = rng.uniform(1, 4)
                    say(f"{action} link {relay.name} for {seconds:.1f} s")
                    relay.cut(action.split("(")[1].rstrip(")"), seconds)
            ended = trio.current_time()
            await trio.sleep(ROUND_TRIP_DEADLINE + 0.5)  # the last clients finish or fail
            nursery.cancel_scope.cancel()
    finally:
        sites.kill_all()

    during = [r for r in load.results if began <= r[0] <= ended]
    ok = sorted(end for start, end, error in during if error is None)
    marks = [began, *ok, ended]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    share = len(ok) / len(during) if during else 0.0
    failed = [f"{start - began:6.1f} s  {error}" for start, _, error in during if error]
    return {
        "sites": args.sites,
        "seconds": args.seconds,
        "rate": args.rate,
        "seed": args.seed,
        "connections": len(during),
        "succeeded": len(ok),
        "success_share": share,
        "longest_gap_s": gap,
        "faults": events,
        "failures": failed,
        "pass": share >= TARGET_SUCCESS and gap <= TARGET_GAP,
        "machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=6, help="sites in the mesh (at least 4)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long faults are injected")
    parser.add_argument("--rate", type=float, default=50.0, help="new connections per second")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    parser.add_argument("--json", type=Path, default=Path("tools/bench/results/chaos.json"))
    args = parser.parse_args()
    if args.sites < 4:
        parser.error("--sites must be at least 4: a listener site, two providers and a transit")
    raise_fd_limit(4096, what="chaos: relays and clients")
    with tempfile.TemporaryDirectory(prefix="fabric-chaos-") as root:
        summary = trio.run(chaos, args, Path(root))
    print()
    print(f"new connections:     {summary['connections']} ({summary['rate']:g}/s over {summary['seconds']:g} s, {len(summary['faults'])} faults)")
    print(f"succeeded:           {summary['succeeded']} ({summary['success_share']:.2%}; target >= {TARGET_SUCCESS:.0%})")
    print(f"longest gap:         {summary['longest_gap_s']:.2f} s (target <= {TARGET_GAP:g} s)")
    for line in summary["failures"][:20]:
        print(f"  failed: {line}")
    print("PASS" if summary["pass"] else "FAIL")
    return finish(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
