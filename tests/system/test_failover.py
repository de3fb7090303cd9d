"""Failover with real processes: a site is killed (SIGKILL) under load, and service goes on.

Every site is `fabric site run` in a process of its own, set up with the CLI
as a user would. The echo target and the clients run in the test's Trio
loop. What is promised (issue 4, DESIGN.md "Routing"):

- with two paths up, connections use both;
- when a site on one path dies, the connections through it are reset, none
  hangs; new connections keep succeeding, the first within 3 s of the kill;
- an edge site linked to two interior sites keeps service when either dies.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import attrs
import pytest
import trio
from cli_support import SiteProcess, as_json, fabric, free_port, ok, running
from polling import wait_until

from fabric.testing import echo

pytestmark = pytest.mark.system

DEADLINE = 120  # seconds per test
ROUND_TRIP_DEADLINE = 5  # seconds for one client's connect + echo + close; ~ms on loopback
LOAD_INTERVAL = 0.05  # seconds between new clients of the steady load
FAILOVER_DEADLINE = 3.0  # seconds from a kill to the first new connection served another way
HELD = 100  # connections held open across the diamond
LOOK_INTERVAL = 0.1  # seconds between status looks: another process's state has no event to wait on
WAIT_DEADLINE = 30  # seconds for a state another process reaches in well under one


async def cli(site_dir: Path, *args: str) -> str:
    return ok(await trio.to_thread.run_sync(functools.partial(fabric, site_dir, *args)))


async def status(site_dir: Path) -> dict:
    return as_json(await trio.to_thread.run_sync(functools.partial(fabric, site_dir, "site", "status", "-o", "json")))


async def create(site_dir: Path, *options: str) -> None:
    await cli(site_dir, "site", "create", site_dir.name, "--no-service-sync", *options)


async def link(dialer: Path, acceptor: Path) -> None:
    token = dialer.parent / f"{dialer.name}-to-{acceptor.name}.token"
    await cli(acceptor, "token", "issue", str(token))
    await cli(dialer, "token", "redeem", str(token), "--wait", "--timeout", "30s")


async def wait_for(what: str, condition) -> None:
    """Look every LOOK_INTERVAL until `await condition()` holds; fail after WAIT_DEADLINE saying what."""
    await wait_until(condition, what, deadline=WAIT_DEADLINE, interval=LOOK_INTERVAL)


async def round_trip(stream: trio.SocketStream, size: int = 1000) -> None:
    data = bytes(range(256)) * math.ceil(size / 256)
    await stream.send_all(data[:size])
    got = b""
    while len(got) < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"echo ended after {len(got)} of {size} bytes")
        got += chunk
    assert got == data[:size], "echo came back changed"


@attrs.define
class Load:
    """New clients every LOAD_INTERVAL, each connect + echo + close; when each started, ended, and how."""

    port: int
    results: list[tuple[float, float, BaseException | None]] = attrs.Factory(list)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(self._one)
                await trio.sleep(LOAD_INTERVAL)

    async def _one(self) -> None:
        started = trio.current_time()
        error: BaseException | None = None
        try:
            with trio.fail_after(ROUND_TRIP_DEADLINE):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with stream:
                    await round_trip(stream)
        except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            error = exc
        self.results.append((started, trio.current_time(), error))

    def started_after(self, t: float) -> list[tuple[float, float, BaseException | None]]:
        return [r for r in self.results if r[0] >= t]


def failures(results) -> list[str]:
    return [f"{start:.2f}: {error!r}" for start, _, error in results if error is not None]


def first_success_after(results, t: float) -> float:
    return min(end for start, end, error in results if error is None and start >= t) - t


async def test_diamond_spreads_connections_and_fails_over_when_a_transit_site_is_killed(tmp_path: Path, nursery):
    """a - b - d and a - c - d: the service at d, clients at a. Kill b mid-run."""
    a, b, c, d = (tmp_path / name for name in "abcd")
    with trio.fail_after(DEADLINE):
        for site_dir in (b, c):
            await create(site_dir, "--link-access", "--link-port", "0")
        for site_dir in (a, d):
            await create(site_dir)
        target = (await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")))[0]
        target_port = target.socket.getsockname()[1]
        listen_port = free_port()
        with running(b, c, a, d) as processes:
            kill_b = processes[0].kill
            for transit in (b, c):
                await link(a, transit)
                await link(d, transit)
            await cli(d, "connector", "create", "echo", str(target_port), "--host", "127.0.0.1")
            await cli(a, "listener", "create", "echo", str(listen_port), "--wait", "--timeout", "30s")

            async def two_paths() -> bool:
                sites = {s["name"]: s for s in (await status(a))["sites"]}
                return "d" in sites and len(sites["d"]["next_hops"]) == 2

            await wait_for("two paths from a to d", two_paths)

            async def flows_to_d(transit: Path) -> int:
                return sum(l["flows"] for l in (await status(transit))["links"] if l["name"] == "d")

            held: list[trio.SocketStream] = []
            try:
                for _ in range(HELD):
                    stream = await trio.open_tcp_stream("127.0.0.1", listen_port)
                    held.append(stream)
                    await round_trip(stream)
                via_b, via_c = await flows_to_d(b), await flows_to_d(c)
                assert via_b + via_c == HELD and min(via_b, via_c) >= 0.3 * HELD, (via_b, via_c)

                load = Load(listen_port)
                nursery.start_soon(load.run)
                await trio.sleep(1)  # the load runs through both paths
                assert load.results and failures(load.results) == []

                killed_at = trio.current_time()
                kill_b()
                # Every held connection either still works (through c) or is reset: none hangs.
                outcomes = {"served": 0, "reset": 0}

                async def check(stream: trio.SocketStream) -> None:
                    with trio.fail_after(ROUND_TRIP_DEADLINE):
                        try:
                            await round_trip(stream)
                            outcomes["served"] += 1
                        except (trio.BrokenResourceError, EOFError):
                            outcomes["reset"] += 1

                async with trio.open_nursery() as checks:
                    for stream in held:
                        checks.start_soon(check, stream)
                assert outcomes == {"served": via_c, "reset": via_b}

                await trio.sleep(FAILOVER_DEADLINE + 1)
                after = load.started_after(killed_at)
                assert failures(after) == [], "new connections failed after the kill"
                assert first_success_after(load.results, killed_at) <= FAILOVER_DEADLINE
            finally:
                for stream in held:
                    stream.socket.close()

            async def one_path() -> bool:
                sites = {s["name"]: s for s in (await status(a))["sites"]}
                return [h["name"] for h in sites["d"]["next_hops"]] == ["c"]

            await wait_for("a's route to d through c only", one_path)


async def test_an_edge_site_with_two_interior_sites_keeps_service_when_either_dies(tmp_path: Path, nursery):
    """edge -> i1, i2 <- server: kill i1; bring it back; kill i2. The edge's clients are served throughout."""
    edge, i1, i2, server = (tmp_path / name for name in ("edge", "i1", "i2", "server"))
    with trio.fail_after(DEADLINE):
        for site_dir in (i1, i2):
            await create(site_dir, "--link-access", "--link-port", "0")
        await create(edge, "--edge")
        await create(server)
        target = (await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")))[0]
        listen_port = free_port()
        with running(i1, i2, edge, server) as processes:
            for interior in (i1, i2):
                await link(edge, interior)
                await link(server, interior)
            await cli(server, "connector", "create", "echo", str(target.socket.getsockname()[1]), "--host", "127.0.0.1")
            await cli(edge, "listener", "create", "echo", str(listen_port), "--wait", "--timeout", "30s")

            async def linked_to(*names: str) -> bool:
                return {l["name"] for l in (await status(edge))["links"] if l["up"]} == set(names)

            async def server_via(*names: str) -> bool:
                """The edge reaches the server through exactly these interior sites (both ends linked again)."""
                sites = {s["name"]: s for s in (await status(edge))["sites"]}
                return "server" in sites and {h["name"] for h in sites["server"]["next_hops"]} == set(names)

            load = Load(listen_port)
            nursery.start_soon(load.run)
            await trio.sleep(1)

            killed_at = trio.current_time()
            processes[0].kill()  # i1
            await wait_for("the edge's link to i1 down", functools.partial(linked_to, "i2"))
            await trio.sleep(FAILOVER_DEADLINE)
            assert failures(load.started_after(killed_at)) == [], "clients failed while i1 was down"
            assert first_success_after(load.results, killed_at) <= FAILOVER_DEADLINE

            back = SiteProcess(i1)  # i1 comes back on its port; edge and server link to it again
            try:
                await trio.to_thread.run_sync(back.wait_running)
                await wait_for("paths to the server through both again", functools.partial(server_via, "i1", "i2"))
                killed_at = trio.current_time()
                processes[1].kill()  # i2
                await wait_for("the edge's link to i2 down", functools.partial(linked_to, "i1"))
                await trio.sleep(FAILOVER_DEADLINE)
                assert failures(load.started_after(killed_at)) == [], "clients failed while i2 was down"
                assert first_success_after(load.results, killed_at) <= FAILOVER_DEADLINE
            finally:
                back.kill()
            assert len(load.results) > 100
