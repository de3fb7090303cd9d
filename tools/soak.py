"""Soak: a 4-site network under mixed traffic with links cut and restored, watched for growth.

    python -m tools.soak [--seconds 1800] [--interval 10] [--cut-every 4] [--seed N] [--json PATH]

Four sites run in this process (a, b, c, d), linked in a ring with one
diagonal (a-b, b-c, c-d, d-a, a-c), every link through a relay here that
can cut it. Services: a hash server (every transfer SHA-256 checked both
ways) offered at c and d as `bulk`; an echo server offered at b and c as
`echo`. Listeners: `bulk` and `echo` at a, `echo` at d. Traffic, all at once:

- bulk: 3 clients in a loop, each exchange 32 KiB - 1 MiB each way, checked;
- short: 4 clients in a loop, a new connection per 1-16 KiB echo round trip;
- idle: 40 connections held open, each sending one small echo per interval
  (opened again when a cut resets them).

Every `--cut-every` seconds (about) one link's relay is cut for 1-4 s,
either silently (bytes stop, connections held: keepalive must notice) or by
a reset (RST both ways); new connections are refused while it is down. The
dialling site links again by itself.

Every `--interval` seconds one line: RSS, trio tasks, open file
descriptors, flow-table entries (the sum of `link.flow_count` over every
link of every site), and client outcomes so far. An outcome is `done`
(bytes intact), `reset` (a reset, or refused while no provider was
reachable: a clean, visible error), `hung` (no answer within the client
timeout) or `corrupt` (bytes changed, or a stream that ended early).

It fails (exit status 1) on any corrupt or hung client, on growth (the
second half's samples against the first half's: median against maximum,
with a margin), or if, once traffic stops, the flow tables do not drain to
zero or the file descriptors do not come back to where they started.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import struct
import sys
import tempfile
from pathlib import Path

import attrs
import trio

import fabric
from fabric.testing import CHUNK, abort, echo, send_random, serve
from tools.bench.chaos import Relay
from tools.bench.common import growth, open_fds, rss_mb

HEADER = struct.Struct("!QQ")  # hash exchange: upload size, download size
DIGEST = 32
CLIENT_TIMEOUT = 60.0  # seconds for one client operation before it counts as hung (generous: shared CPUs)
SETUP_DEADLINE = 60.0  # seconds to open, link and expose the four sites
DRAIN_DEADLINE = 30.0  # seconds, once traffic stops, for flows to drain and links to come back
LINKS = (("a", "b"), ("b", "c"), ("c", "d"), ("d", "a"), ("a", "c"))  # (dialer, acceptor)
BULK_CLIENTS = 3
SHORT_CLIENTS = 4
IDLE_CONNECTIONS = 40
# Growth: the second half's median may exceed the first half's maximum by this factor plus this much.
GROWTH = {"rss_mb": (1.10, 24.0), "tasks": (1.5, 150), "fds": (1.5, 60), "flows": (1.5, 60)}
FD_SLACK = 16  # fds after the drain may exceed those before the load by this much (relay connections in flux)


# -- outcomes ---------------------------------------------------------------------------------


@attrs.define
class Outcomes:
    done: int = 0
    reset: int = 0
    hung: int = 0
    corrupt: int = 0
    notes: list[str] = attrs.Factory(list)  # the first few hung/corrupt, for the report

    def note(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.notes) < 20:
            self.notes.append(f"{kind}: {what}")


async def classify(outcomes: Outcomes, what: str, operation) -> bool:
    """Run one client operation; count how it ended. True if it completed intact."""
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            await operation()
    except trio.TooSlowError:
        outcomes.note("hung", f"{what}: no answer within {CLIENT_TIMEOUT:g} s")
    except Corrupt as exc:
        outcomes.note("corrupt", f"{what}: {exc}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        outcomes.reset += 1  # reset, or refused while no provider was reachable
    else:
        outcomes.done += 1
        return True
    return False


class Corrupt(Exception):
    """Bytes arrived changed, or the stream ended before all of them did."""


_TCP_CLOSE_WAIT = 8  # linux/tcp_states.h: the peer sent a FIN, we have not closed


def ended_early(stream, what: str) -> Exception:
    """The error for a stream that ended before `what` was whole: truncation, or a reset seen as EOF.

    A reset is reported once, to whichever call meets it first: when a
    concurrent send took it, the receive sees a plain end. The socket's TCP
    state tells them apart: CLOSE_WAIT is a FIN (a clean end: the bytes were
    truncated), anything else (CLOSE) a reset.
    """
    state = _TCP_CLOSE_WAIT
    try:
        state = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (AttributeError, OSError):
        pass
    if state == _TCP_CLOSE_WAIT:
        return Corrupt(f"the stream ended {what} (a clean end, not a reset: truncated)")
    return trio.BrokenResourceError(f"reset (reported to another call) {what}")


async def read_exactly(stream: trio.abc.ReceiveStream, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise ended_early(stream, f"after {len(buffer)} of {size} bytes")
        buffer += data
    out = bytes(buffer[:size])
    del buffer[:size]
    return out


async def read_hashed(stream, buffer: bytearray, size: int, digest) -> None:
    left = size
    while left:
        if not buffer:
            data = await stream.receive_some(CHUNK)
            if not data:
                raise ended_early(stream, f"{left} bytes early")
            buffer += data
        take = min(left, len(buffer))
        digest.update(memoryview(buffer)[:take])
        del buffer[:take]
        left -= take


async def read_end(stream, buffer: bytearray) -> None:
    if buffer or await stream.receive_some(CHUNK):
        raise Corrupt("bytes after the end of the exchange")


async def both(*tasks) -> None:
    """Run the tasks at once; a failure is raised as itself (a Corrupt first, when there are several)."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        _, failures = group.split(trio.Cancelled)
        if failures is None:
            raise
        leaves = list(failures.exceptions)
        if all(isinstance(e, Exception) and not isinstance(e, BaseExceptionGroup) for e in leaves):
            raise next((e for e in leaves if isinstance(e, Corrupt)), leaves[0]) from None
        raise


# -- servers ---------------------------------------------------------------------------------------


@attrs.define
class HashServer:
    """The far end of a bulk exchange: checks the upload, sends a download and both digests."""

    outcomes: Outcomes

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except Corrupt as exc:
                self.outcomes.note("corrupt", f"hash server: {exc}")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client saw the reset too, and counts it

    async def _serve(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        upload, download = HEADER.unpack(await read_exactly(stream, buffer, HEADER.size))
        received = hashlib.sha256()
        claimed = b""

        async def push() -> None:
            sent = hashlib.sha256()
            await send_random(stream, download, sent, random.Random())
            await stream.send_all(sent.digest())

        async def pull() -> None:
            nonlocal claimed
            await read_hashed(stream, buffer, upload, received)
            claimed = await read_exactly(stream, buffer, DIGEST)
            await read_end(stream, buffer)

        await both(push, pull)
        if claimed != received.digest():
            raise Corrupt(f"upload of {upload} bytes arrived changed")
        await stream.send_all(received.digest())


# -- clients ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(port: int):
    """A client connection; closed cleanly after a whole exchange, reset (RST) if anything cut it short.

    So a client cancelled when the soak ends is a reset to the server, not an end of data.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        yield stream
    except BaseException:
        abort(stream)
        raise
    await stream.aclose()


async def bulk_exchange(port: int, rng: random.Random) -> None:
    upload, download = rng.randint(32 * 1024, 1024 * 1024), rng.randint(32 * 1024, 1024 * 1024)
    async with client(port) as stream:
        buffer = bytearray()
        sent, received = hashlib.sha256(), hashlib.sha256()
        digests = {}

        async def send() -> None:
            await stream.send_all(HEADER.pack(upload, download))
            await send_random(stream, upload, sent, rng)
            await stream.send_all(sent.digest())
            await stream.send_eof()

        async def receive() -> None:
            await read_hashed(stream, buffer, download, received)
            digests["download"] = await read_exactly(stream, buffer, DIGEST)
            digests["upload"] = await read_exactly(stream, buffer, DIGEST)
            await read_end(stream, buffer)

        await both(send, receive)
    if digests["download"] != received.digest():
        raise Corrupt(f"download of {download} bytes arrived changed")
    if digests["upload"] != sent.digest():
        raise Corrupt(f"upload of {upload} bytes arrived changed (the server says)")


async def echo_round_trip(stream: trio.SocketStream, size: int, rng: random.Random) -> None:
    """Send, then read back (at most 16 KiB: it fits the socket buffers, so one after the other)."""
    data = rng.randbytes(size)
    await stream.send_all(data)
    if await read_exactly(stream, bytearray(), size) != data:
        raise Corrupt(f"echo of {size} bytes came back changed")


async def short_connection(port: int, rng: random.Random) -> None:
    async with client(port) as stream:
        await echo_round_trip(stream, rng.randint(1024, 16 * 1024), rng)
        await stream.send_eof()
        await read_end(stream, bytearray())


# -- the soak ------------------------------------------------------------------------------------


def trio_tasks() -> int:
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


class ErrorCounter(logging.Handler):
    """Counts what fabric logs at ERROR or above (a failure of one flow or link logged as a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@attrs.define
class Soak:
    args: argparse.Namespace
    root: Path
    rng: random.Random
    outcomes: Outcomes = attrs.Factory(Outcomes)
    sites: dict[str, fabric.Site] = attrs.Factory(dict)
    relays: list[Relay] = attrs.Factory(list)
    samples: list[dict] = attrs.Factory(list)
    cuts: int = 0
    started: float = 0.0

    def flows(self) -> int:
        return sum(link.flow_count for site in self.sites.values() for link in site.router.links.values())

    def sample(self) -> dict:
        o = self.outcomes
        row = {
            "t": round(trio.current_time() - self.started),
            "rss_mb": round(rss_mb(), 1),
            "tasks": trio_tasks(),
            "fds": open_fds(),
            "flows": self.flows(),
            "done": o.done,
            "reset": o.reset,
            "hung": o.hung,
            "corrupt": o.corrupt,
            "cuts": self.cuts,
        }
        print(
            f"t={row['t']:5d}s rss={row['rss_mb']:7.1f}MB tasks={row['tasks']:5d} fds={row['fds']:5d} "
            f"flows={row['flows']:4d} | done={o.done} reset={o.reset} hung={o.hung} corrupt={o.corrupt} "
            f"cuts={self.cuts}",
            flush=True,
        )
        return row

    async def setup(self, nursery: trio.Nursery) -> dict[str, int]:
        settings = fabric.Settings(reconnect_min=0.2, reconnect_max=2.0)
        for name in "abcd":
            self.sites[name] = await nursery.start(self._run_site, name, settings)
        for dialer, acceptor in LINKS:
            relay = Relay(f"{dialer}-{acceptor}", self.sites[acceptor].link_port)
            relay.port = await serve(nursery, relay.handle)
            self.relays.append(relay)
            token = await self.sites[acceptor].issue_token()
            token = attrs.evolve(token, addresses=(f"tls://127.0.0.1:{relay.port}",))
            await self.sites[dialer].redeem_token(token, name=acceptor)
        for dialer, acceptor in LINKS:
            await self.sites[dialer].wait_linked(self.sites[acceptor].site_id)
            await self.sites[acceptor].wait_linked(self.sites[dialer].site_id)
        hash_port = await serve(nursery, HashServer(self.outcomes).handle)
        echo_port = await serve(nursery, echo)
        for name in "cd":
            await self.sites[name].create_connector("bulk", hash_port, host="127.0.0.1")
        for name in "bc":
            await self.sites[name].create_connector("echo", echo_port, host="127.0.0.1")
        ports = {
            "bulk@a": (await self.sites["a"].create_listener("bulk", 0)).port,
            "echo@a": (await self.sites["a"].create_listener("echo", 0)).port,
            "echo@d": (await self.sites["d"].create_listener("echo", 0)).port,
        }
        await self.sites["a"].wait_reachable("bulk", providers=2)
        await self.sites["a"].wait_reachable("echo", providers=2)
        await self.sites["d"].wait_reachable("echo", providers=2)
        return ports

    async def _run_site(self, name: str, settings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with fabric.open_site(
            name, self.root / name, link_port=0, settings=settings, service_sync=False
        ) as site:
            task_status.started(site)
            await trio.sleep_forever()

    async def bulk_client(self, port: int) -> None:
        rng = random.Random(self.rng.random())
        while True:
            await classify(self.outcomes, "bulk exchange", lambda: bulk_exchange(port, rng))
            await trio.sleep(rng.uniform(0, 0.2))

    async def short_client(self, ports: list[int]) -> None:
        rng = random.Random(self.rng.random())
        while True:
            port = rng.choice(ports)
            await classify(self.outcomes, "short connection", lambda port=port: short_connection(port, rng))
            await trio.sleep(rng.uniform(0.05, 0.3))

    async def idle_client(self, port: int) -> None:
        rng = random.Random(self.rng.random())
        await trio.sleep(rng.uniform(0, self.args.interval))
        while True:
            try:
                async with client(port) as stream:
                    while await classify(self.outcomes, "idle connection", lambda: echo_round_trip(stream, 100, rng)):  # noqa: ASYNC110 (paced traffic, not a wait)
                        await trio.sleep(self.args.interval)  # held, idle, between round trips
            except OSError:
                self.outcomes.reset += 1  # refused: no provider reachable just now
                await trio.sleep(1)

    async def chaos(self) -> None:
        while True:
            await trio.sleep(self.rng.uniform(0.5, 1.5) * self.args.cut_every)
            relay = self.rng.choice(self.relays)
            kind = self.rng.choice(["silent", "reset"])
            relay.cut(kind, self.rng.uniform(1, 4))
            self.cuts += 1

    async def wait_all_linked(self) -> None:
        for dialer, acceptor in LINKS:
            await self.sites[dialer].wait_linked(self.sites[acceptor].site_id)
            await self.sites[acceptor].wait_linked(self.sites[dialer].site_id)

    async def wait_drained(self) -> None:
        """Until no flow is left in any flow table (no event says it: look every 0.2 s)."""
        while self.flows():  # noqa: ASYNC110 (flow tables have no event)
            await trio.sleep(0.2)

    async def run(self) -> dict:
        failures: list[str] = []
        async with trio.open_nursery() as nursery:
            with trio.fail_after(SETUP_DEADLINE):
                ports = await self.setup(nursery)
            await trio.sleep(1)
            fds_before = open_fds()
            self.started = trio.current_time()
            print(f"soak: 4 sites, {len(LINKS)} links through relays; {self.args.seconds:g} s, "
                  f"a sample every {self.args.interval:g} s; fds before the load: {fds_before}", flush=True)
            async with trio.open_nursery() as load:
                for _ in range(BULK_CLIENTS):
                    load.start_soon(self.bulk_client, ports["bulk@a"])
                for _ in range(SHORT_CLIENTS):
                    load.start_soon(self.short_client, [ports["echo@a"], ports["echo@d"]])
                for i in range(IDLE_CONNECTIONS):
                    load.start_soon(self.idle_client, ports["echo@a"] if i % 2 else ports["echo@d"])
                load.start_soon(self.chaos)
                deadline = self.started + self.args.seconds
                while trio.current_time() + self.args.interval <= deadline + 0.5:
                    await trio.sleep_until(self.started + self.args.interval * (len(self.samples) + 1))
                    self.samples.append(self.sample())
                load.cancel_scope.cancel()

            # Traffic stopped (clients cancelled mid-way reset their flows): everything must come back.
            try:
                with trio.fail_after(DRAIN_DEADLINE):
                    await self.wait_all_linked()
                    await self.wait_drained()
            except trio.TooSlowError:
                failures.append(f"flows did not drain within {DRAIN_DEADLINE:g} s: {self.flows()} left")
            await trio.sleep(1)
            fds_after = open_fds()
            print(f"after the load: flows={self.flows()} fds={fds_after} (before: {fds_before}) tasks={trio_tasks()}")
            if fds_after > fds_before + FD_SLACK:
                failures.append(f"{fds_after} fds open after the drain, {fds_before} before the load")
            nursery.cancel_scope.cancel()

        o = self.outcomes
        if o.corrupt:
            failures.append(f"{o.corrupt} corrupt transfer(s)")
        if o.hung:
            failures.append(f"{o.hung} client(s) hung past {CLIENT_TIMEOUT:g} s")
        if o.done == 0:
            failures.append("no client completed")
        failures += growth(self.samples, GROWTH)
        for line in o.notes:
            print(f"  {line}")
        verdict = "PASS" if not failures else "FAIL: " + "; ".join(failures)
        print(f"soak: {verdict}")
        return {
            "pass": not failures,
            "failures": failures,
            "seconds": self.args.seconds,
            "interval": self.args.interval,
            "seed": self.args.seed,
            "outcomes": attrs.asdict(o),
            "cuts": self.cuts,
            "samples": self.samples,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800.0, help="length of the load (default 1800: 30 min)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--cut-every", type=float, default=4.0, help="seconds between link cuts, about (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="for the cuts and the traffic (default: random)")
    parser.add_argument("--json", type=Path, help="also write the samples and the verdict here")
    parser.add_argument("--log", type=Path, help="write the sites' log lines (INFO and up) here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    print(f"soak: seed {args.seed}")
    # The sites' own log lines (links cut and made again, many a second) go to --log, or nowhere;
    # anything at ERROR is counted, printed, and fails the soak.
    logging.basicConfig(
        level=logging.INFO if args.log else logging.ERROR,
        filename=args.log or os.devnull,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    errors = ErrorCounter()
    logging.getLogger("fabric").addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="fabric-soak-") as root:
        summary = trio.run(Soak(args, Path(root), random.Random(args.seed)).run)
    if errors.lines:
        print(f"soak: FAIL: fabric logged {len(errors.lines)} error(s); the first: {errors.lines[0]}")
        summary["pass"] = False
        summary["failures"].append(f"{len(errors.lines)} error(s) logged")
        summary["errors"] = errors.lines[:20]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
