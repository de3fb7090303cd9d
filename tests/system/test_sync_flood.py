"""A linked site floods the network with routing keys; the victim, a real `fabric site run`, keeps its descriptors.

The victim runs at a 1,024-descriptor limit (`prlimit`) with service sync on,
as by default, and a configured listener for an echo server behind an honest
site. A third site, the flooder, starts with 1,100 connectors and links to
the victim: each of its keys would be a listening socket there. While it
does, a client makes one round trip after another through the configured
listener. What is promised: every round trip succeeds, the victim's open
descriptors stay within its limits (the flooder gets at most its per-site
share of listeners, max_auto_listeners_per_site), `listener status` says
why each other key is not listened for, and the victim's log has no EMFILE
and a line or two from service sync about the flood, not one per key.

All three sites are processes, set up with the CLI as a user would; the
flooder's connectors are written into its site.yaml (1,100 `connector
create` calls would each rewrite it). The echo server and the client run in
the test's Trio loop.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio
import yaml
from cli_support import SiteProcess, as_json, fabric, free_port, ok
from polling import wait_until

from fabric.testing import echo

pytestmark = pytest.mark.system

FLOOD = 1100  # routing keys the flooder offers
FLOOD_PORT = 22000  # its port hints: FLOOD_PORT + i, nothing behind them
FD_LIMIT = 1024  # the victim's RLIMIT_NOFILE, soft and hard
PER_SITE = 32  # max_auto_listeners_per_site, the default
# Descriptors the victim may hold beyond its count before the flood: the
# flooder's listeners, its link, and a few for the client's connection and
# the control socket's callers.
FD_MARGIN = PER_SITE + 16
SERVICE_HOST = "127.0.0.9"  # the victim's service host: its automatic listeners bind there
DEADLINE = 180  # seconds for the whole test; it takes ~20 s
WAIT_DEADLINE = 60  # seconds for a state another process reaches in a few
LOOK_INTERVAL = 0.2  # seconds between looks at another process (no event to wait on)
LOAD_INTERVAL = 0.05  # seconds between the client's round trips
ROUND_TRIP_DEADLINE = 5  # seconds for one connect + echo + close; ~ms on loopback
SYNC_LINES = 4  # most lines the victim may write about service sync during the flood


async def cli(site_dir: Path, *args: str) -> str:
    return ok(await trio.to_thread.run_sync(functools.partial(fabric, site_dir, *args)))


async def listeners(site_dir: Path) -> list[dict]:
    result = await trio.to_thread.run_sync(functools.partial(fabric, site_dir, "listener", "status", "-o", "json"))
    return as_json(result)["listeners"]


async def link(dialer: Path, acceptor: Path) -> None:
    token = dialer.parent / f"{dialer.name}-to-{acceptor.name}.token"
    await cli(acceptor, "token", "issue", str(token))
    await cli(dialer, "token", "redeem", str(token), "--wait", "--timeout", "30s")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def round_trip(port: int) -> None:
    data = os.urandom(1000)
    with trio.fail_after(ROUND_TRIP_DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert got == data, f"the echo came back with {len(got)} of {len(data)} bytes"


def write_flood(site_dir: Path) -> None:
    """The flooder's connectors, straight into its site.yaml (it may write what it likes there)."""
    path = site_dir / "site.yaml"
    config = yaml.safe_load(path.read_text())
    config["connectors"] = [
        {"name": f"flood-{i:04d}", "routing_key": f"flood-{i:04d}", "port": FLOOD_PORT + i, "host": "127.0.0.1"}
        for i in range(FLOOD)
    ]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


async def test_a_flood_of_1100_routing_keys_leaves_the_victim_its_descriptors(tmp_path: Path):
    victim_dir, honest_dir, flooder_dir = tmp_path / "victim", tmp_path / "honest", tmp_path / "flooder"
    listen_port = free_port()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            (server,) = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            echo_port = server.socket.getsockname()[1]
            await cli(victim_dir, "site", "create", "victim", "--link-access", "--link-port", "0",
                      "--service-host", SERVICE_HOST)
            await cli(victim_dir, "listener", "create", "echo", str(listen_port))
            await cli(honest_dir, "site", "create", "honest", "--no-service-sync")
            await cli(honest_dir, "connector", "create", "echo", str(echo_port), "--host", "127.0.0.1")
            await cli(flooder_dir, "site", "create", "flooder", "--no-service-sync")
            write_flood(flooder_dir)

            sites = []
            try:
                victim = SiteProcess(victim_dir, prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
                sites.append(victim)
                for site in (victim, SiteProcess(honest_dir)):
                    sites.append(site)
                    await trio.to_thread.run_sync(site.wait_running)
                await link(honest_dir, victim_dir)

                async def echo_accepting() -> bool:
                    return any(l["accepting"] for l in await listeners(victim_dir) if l["name"] == "echo")

                await wait_until(echo_accepting, "the echo listener accepting", deadline=WAIT_DEADLINE, interval=LOOK_INTERVAL)
                await round_trip(listen_port)
                before = open_fds(victim.process.pid)

                # The client's round trips, from now until the flood has been seen and dealt with.
                trips = 0
                load_done = trio.Event()

                async def load() -> None:
                    nonlocal trips
                    while not load_done.is_set():
                        try:
                            await round_trip(listen_port)
                        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                            raise AssertionError(
                                f"the configured listener failed after {trips} round trips: {exc!r}\n{victim.log_tail()}"
                            ) from exc
                        trips += 1
                        await trio.sleep(LOAD_INTERVAL)

                nursery.start_soon(load)
                flooder = SiteProcess(flooder_dir)
                sites.append(flooder)
                await trio.to_thread.run_sync(flooder.wait_running)
                await link(flooder_dir, victim_dir)

                most = before
                with trio.fail_after(WAIT_DEADLINE):
                    while len(rows := [l for l in await listeners(victim_dir) if l["auto"]]) < FLOOD:
                        most = max(most, open_fds(victim.process.pid))
                        await trio.sleep(LOOK_INTERVAL)
                trips_at_flood = trips
                with trio.fail_after(WAIT_DEADLINE):
                    while trips < trips_at_flood + 10:  # and on it goes, with the flood in place
                        most = max(most, open_fds(victim.process.pid))
                        await trio.sleep(LOOK_INTERVAL)
                load_done.set()
                assert len([l for l in rows if l["accepting"]]) <= PER_SITE
                limited = [l for l in rows if not l["accepting"] and "max_auto_listeners_per_site" in l["error"]]
                assert len(limited) == FLOOD - PER_SITE
                assert most <= before + FD_MARGIN, f"{most} descriptors open at the victim, {before} before the flood"
                assert victim.process.poll() is None

                table = await cli(victim_dir, "listener", "status")
                assert "flood-1099" in table and "max_auto_listeners_per_site" in table
            finally:
                for site in sites:
                    site.kill()
            nursery.cancel_scope.cancel()

    log = victim.log.read_text(errors="replace")
    assert "EMFILE" not in log and "Too many open files" not in log, victim.log_tail()
    about_sync = [line for line in log.splitlines() if "service sync" in line]
    assert 1 <= len(about_sync) <= SYNC_LINES, "\n".join(about_sync)
    # Nor does anything else write a line per key: the router sums up its service changes.
    about_flood = [line for line in log.splitlines() if "flood-" in line]
    assert len(about_flood) <= 2 * SYNC_LINES, "\n".join(about_flood[:20])
