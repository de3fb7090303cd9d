"""A real redis-server reached by real redis clients through sites.

The sites run in the test's Trio loop; redis-server, redis-cli and
redis-benchmark are child processes (see conftest.py). Each client checks
its replies: a 100 KB random value comes back byte for byte, counters count,
a pipelined batch of thousands of commands gets every reply in order, and
redis-benchmark's 20 parallel connections finish every request without an
error. Once every client has gone, no flow is left at any site and no
connection at redis: a close is carried through, never leaked.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from polling import wait_until

import fabric

pytestmark = pytest.mark.system

DEADLINE = 60  # seconds per test; each takes a few seconds on loopback
SETUP_DEADLINE = 20  # seconds to link sites and see the service; ~0.1 s on loopback
KEY = "redis"  # the routing key
BLOB_SIZE = 100 * 1024  # bytes: redis-cli -x takes it on stdin, GET prints it raw
PIPELINE = 2000  # SET + RPUSH pairs in the pipelined batch: 4000 commands, ~1.1 MB
BENCH_TESTS = {"PING_INLINE", "PING_MBULK", "SET", "GET"}  # what `-t ping,set,get` reports
BENCH_LINE = re.compile(r"^\s*([A-Z_]+): ([0-9.]+) requests per second")
SETTLE_DEADLINE = 10  # seconds for closed clients' flows to end at every site; ~10 ms on loopback
SETTLE_INTERVAL = 0.05  # seconds between looks: counts in other processes and sites have no event to wait on


# -- sites ---------------------------------------------------------------------------------


async def link(dialer: fabric.Site, acceptor: fabric.Site) -> None:
    token = await acceptor.issue_token(redemptions_allowed=1, expiration_window=900)
    await dialer.redeem_token(token, cost=1)


async def expose(provider: fabric.Site, consumer: fabric.Site, target_port: int) -> int:
    """Connector to redis at `provider`, listener at `consumer`; the listener's port once the key is reachable."""
    await provider.create_connector(KEY, target_port, host="127.0.0.1")
    listener = await consumer.create_listener(KEY, 0)
    with trio.fail_after(SETUP_DEADLINE):
        await consumer.wait_reachable(KEY)
    return listener.port


@asynccontextmanager
async def two_sites(root: Path) -> AsyncIterator[tuple[fabric.Site, fabric.Site]]:
    async with (
        fabric.open_site("hub", root / "hub", link_port=0) as hub,
        fabric.open_site("edge", root / "edge") as edge,
    ):
        await link(edge, hub)
        yield hub, edge


@asynccontextmanager
async def chain(root: Path, end_mode: str) -> AsyncIterator[tuple[fabric.Site, fabric.Site, fabric.Site]]:
    """A - B - C: A and C redeem tokens of B and are not linked to each other."""
    async with (
        fabric.open_site("a", root / "a", mode=end_mode) as a,
        fabric.open_site("b", root / "b", link_port=0) as b,
        fabric.open_site("c", root / "c", mode=end_mode) as c,
    ):
        await link(a, b)
        await link(c, b)
        yield a, b, c


# -- what the clients do -----------------------------------------------------------------------


def resp(*args: str | bytes | int) -> bytes:
    """One command in the redis protocol (RESP), as `redis-cli --pipe` reads it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def differs(got: bytes, want: bytes) -> str:
    """A short description of how two byte strings differ (not 100 KB of repr)."""
    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"got {len(got)} bytes, want {len(want)}; first difference at byte {at}"


def lines(*items: object) -> bytes:
    return b"".join(f"{item}\n".encode() for item in items)


async def check_values(tools, port: int) -> None:
    """A random 100 KB value round-trips byte for byte; counters count."""
    blob = os.urandom(BLOB_SIZE)
    assert await tools.cli(port, "-x", "SET", "blob", stdin=blob) == b"OK\n"
    got = await tools.cli(port, "GET", "blob")
    assert got == blob + b"\n", differs(got, blob + b"\n")  # redis-cli prints a value raw plus a newline
    assert await tools.cli(port, "STRLEN", "blob") == lines(BLOB_SIZE)

    for expected in (1, 2, 3):
        assert await tools.cli(port, "INCR", "counter") == lines(expected)
    assert await tools.cli(port, "INCRBY", "counter", "10") == lines(13)

    # Ten clients at once, each its own connection and flow.
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(tools.cli, port, "INCR", "shared")
    assert await tools.cli(port, "GET", "shared") == lines(10)


async def check_pipeline(tools, port: int) -> dict[int, str]:
    """Thousands of commands sent without waiting for replies: every reply comes, in order."""
    values = {i: f"{i}:{secrets.token_hex(256)}" for i in range(PIPELINE)}
    batch = b"".join(resp("SET", f"key:{i}", value) + resp("RPUSH", "order", i) for i, value in values.items())
    out = await tools.cli(port, "--pipe", stdin=batch)
    assert out.endswith(f"errors: 0, replies: {2 * PIPELINE}\n".encode()), out
    assert await tools.cli(port, "LLEN", "order") == lines(PIPELINE)
    got = await tools.cli(port, "LRANGE", "order", "0", "-1")
    assert got == lines(*range(PIPELINE)), "the pipelined RPUSHes were applied out of order or some were lost"
    sample = sorted({0, 1, PIPELINE // 2, PIPELINE - 1, *random.sample(range(PIPELINE), 20)})
    got = await tools.cli(port, "MGET", *(f"key:{i}" for i in sample))
    assert got == lines(*(values[i] for i in sample))
    return values


async def check_benchmark(tools, port: int) -> dict[str, float]:
    """redis-benchmark: 20 connections, 2000 requests per test; every test reports a rate, nothing fails."""
    done = await tools.benchmark(port, "-t", "ping,set,get", "-n", "2000", "-c", "20", "-q")
    assert done.returncode == 0, done.describe()
    assert not done.stderr, done.describe()  # e.g. "Could not connect", "WARNING: Could not fetch server CONFIG"
    text = done.stdout.decode(errors="replace")
    assert "error" not in text.lower(), text
    rates = {}
    for line in re.split(r"[\r\n]", text):  # -q rewrites a progress line with \r, then ends it with \n
        if match := BENCH_LINE.match(line):
            rates[match[1]] = float(match[2])
    assert set(rates) == BENCH_TESTS, f"redis-benchmark reported {sorted(rates)}: {text!r}"
    assert all(rate > 0 for rate in rates.values()), rates
    return rates


async def exercise(tools, port: int, label: str) -> None:
    started = time.perf_counter()
    assert await tools.cli(port, "PING") == b"PONG\n"
    await check_values(tools, port)
    values = await check_pipeline(tools, port)
    rates = await check_benchmark(tools, port)

    # What was written before the benchmark is still there, unchanged.
    assert await tools.cli(port, "STRLEN", "blob") == lines(BLOB_SIZE)
    assert await tools.cli(port, "GET", "counter") == lines(13)
    assert await tools.cli(port, "GET", f"key:{PIPELINE - 1}") == lines(values[PIPELINE - 1])
    summary = ", ".join(f"{name} {rate:,.0f}/s" for name, rate in sorted(rates.items()))
    print(f"{label}: redis-benchmark {summary}; all checks in {time.perf_counter() - started:.1f} s")


async def check_all_closed(tools, port: int, sites: list[fabric.Site]) -> None:
    """Clients that closed leave nothing behind: no flow at any site, no connection at redis.

    The `INFO clients` connection is itself a client, so redis counts one.
    """

    def leftovers(connected: int) -> dict[str, int]:
        counts = {"redis connections": connected - 1}
        for site in sites:
            status = site.status()
            counts.update({f"{site.name} flows on link {l.name}": l.flows for l in status.links})
            counts.update({f"{site.name} listener {l.name} connections": l.connections for l in status.listeners})
        return {what: n for what, n in counts.items() if n}

    left: dict[str, int] = {}

    async def settled() -> bool:
        nonlocal left
        info = (await tools.cli(port, "INFO", "clients")).decode()
        left = leftovers(int(re.search(r"connected_clients:(\d+)", info)[1]))
        return not left

    await wait_until(
        settled, lambda: f"everything closed after the clients ended; still open: {left}",
        deadline=SETTLE_DEADLINE, interval=SETTLE_INTERVAL,
    )


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("end_mode", ["interior", "edge"])
async def test_redis_through_a_three_site_chain(redis_server, redis_tools, tmp_path, end_mode):
    with trio.fail_after(DEADLINE):
        async with chain(tmp_path / "sites", end_mode) as (a, b, c):
            port = await expose(c, a, redis_server.port)

            status = a.status()
            assert [l.name for l in status.links] == ["b"], "A must reach C only through B"
            sites = {s.name: s for s in status.sites}
            assert sites["c"].reachable and [h.name for h in sites["c"].next_hops] == ["b"]
            assert [[p.name for p in s.providers] for s in status.services if s.routing_key == KEY] == [["c"]]

            await exercise(redis_tools, port, f"chain a-b-c ({end_mode} ends)")
            await check_all_closed(redis_tools, port, [a, b, c])


async def test_redis_through_a_direct_link(redis_server, redis_tools, tmp_path):
    with trio.fail_after(DEADLINE):
        async with two_sites(tmp_path / "sites") as (hub, edge):
            port = await expose(hub, edge, redis_server.port)
            await exercise(redis_tools, port, "direct link hub-edge")
            await check_all_closed(redis_tools, port, [hub, edge])
