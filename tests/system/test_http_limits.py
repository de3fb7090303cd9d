"""Slowloris against an HTTP listener: a real `fabric site run` at a 1,024-descriptor limit keeps serving.

The site runs under `prlimit` at 1,024 descriptors, with an HTTP listener
and a connector to an HTTP target (tests/system/http_target.py), set up with
the CLI as a user would, its header timeout cut to HEADER_TIMEOUT in
site.yaml and its connection cap left at the default. The attack, from the
test's Trio loop: SLOW_CLIENTS connections at once, each sending the start
of a request head and then a header line every DRIBBLE s, never the blank
line that would end it. Meanwhile curl sends one request after another.

What is promised: every curl request is answered 200, in well under a
second; the site's open descriptors stay within the cap of its count before
the attack; no slow client holds its connection past the header timeout:
the ones the cap cannot hold are evicted at once, the others are answered
408 when their time is up; `site status` counts them; the log has no
EMFILE and says all that in two lines (the first cut at once, the rest in
one line logs.LINE_INTERVAL later) with the counts status shows.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from pathlib import Path

import attrs
import pytest
import trio
import yaml
from cli_support import (
    SiteProcess,
    as_json,
    background,
    fabric,
    free_port,
    ok,
    wait_port,
)
from polling import wait_until

from fabric.config import Settings

pytestmark = pytest.mark.system

FD_LIMIT = 1024  # the site's RLIMIT_NOFILE, soft and hard
SLOW_CLIENTS = 1000
HEADER_TIMEOUT = 2.0  # seconds: the site's http_header_timeout here (10 by default)
CAP = Settings().http_max_connections  # the default: 512 per listener
# Descriptors the site may hold beyond its count before the attack and the cap: a connection accepted
# before the one it evicts is closed, the target's connections for curl's requests, control-socket callers.
FD_MARGIN = 16
DRIBBLE = 0.5  # seconds between the header lines a slow client sends
LATE = 2.0  # seconds a cut may come after the header timeout, seen from a client on a loaded machine
LOAD_INTERVAL = 0.05  # seconds between curl's requests
CURL_DEADLINE = 5  # seconds for one of curl's requests (--max-time); ~10 ms on loopback
SERVED_WITHIN = 1.0  # seconds: the slowest of curl's requests during the attack
LOG_INTERVAL = 10.0  # seconds between the log's lines about cut connections (logs.LINE_INTERVAL)
LOG_LINES = 20  # most lines in the site's whole log, at debug level: a start, a listener, a connector, two cut lines
DEADLINE = 120  # seconds for the whole test; it takes ~20 s
LOOK_INTERVAL = 0.02  # seconds between looks at the site's descriptors (another process: no event)
TARGET = Path(__file__).with_name("http_target.py")
LINE = re.compile(r"client connections cut since the last such line: (.*)")


async def cli(site_dir: Path, *args: str) -> str:
    return ok(await trio.to_thread.run_sync(functools.partial(fabric, site_dir, *args)))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@attrs.frozen
class Cut:
    """What one slow client saw: how long after its first byte the listener answered or cut it, and the answer."""

    after: float
    answer: bytes


async def slow_client(port: int, cuts: list[Cut]) -> None:
    """The start of a head, then a header line every DRIBBLE s, until the listener answers or cuts."""
    started = trio.current_time()
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:  # accepted, and evicted before this task could see its connection made: a reset
        cuts.append(Cut(trio.current_time() - started, b""))
        return
    answer = b""
    cut = math.inf  # (held past HEADER_TIMEOUT + LATE: the listener did not cut it)
    async with stream:
        with trio.move_on_after(HEADER_TIMEOUT + LATE + DRIBBLE):
            try:
                await stream.send_all(b"GET /id HTTP/1.1\r\nHost: web\r\n")
                while True:
                    with trio.move_on_after(DRIBBLE):
                        data = await stream.receive_some(65536)
                        cut = min(cut, trio.current_time())
                        if not data:
                            break
                        answer += data
                        continue
                    await stream.send_all(b"X-Slow: 1\r\n")
            except trio.BrokenResourceError:
                cut = min(cut, trio.current_time())  # reset: evicted
    cuts.append(Cut(cut - started, answer))


async def curl(url: str) -> tuple[str, float]:
    done = await trio.run_process(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--max-time", str(CURL_DEADLINE), url],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    code, _, seconds = done.stdout.decode().partition(" ")
    return code, float(seconds or "inf")


async def test_slowloris_at_a_1024_descriptor_limit_is_cut_and_normal_requests_are_served(tmp_path: Path):
    site_dir = tmp_path / "lim"
    target_port, listen_port = free_port(), free_port()
    with trio.fail_after(DEADLINE), background(sys.executable, str(TARGET), str(target_port), "target"):
        await cli(site_dir, "site", "create", "lim", "--no-service-sync")
        config_file = site_dir / "site.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["settings"]["http_header_timeout"] = HEADER_TIMEOUT
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        await trio.to_thread.run_sync(wait_port, target_port)
        site = SiteProcess(site_dir, prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
        try:
            await trio.to_thread.run_sync(site.wait_running)
            await cli(site_dir, "connector", "create", "web", str(target_port), "--host", "127.0.0.1", "--protocol", "http")
            await cli(
                site_dir, "listener", "create", "web", str(listen_port), "--protocol", "http", "--wait", "--timeout", "30s"
            )
            url = f"http://127.0.0.1:{listen_port}/id"
            assert (await curl(url))[0] == "200"  # (its flow to the target is kept: counted in `before`)
            pid = site.process.pid
            before = open_fds(pid)

            cuts: list[Cut] = []
            served: list[tuple[str, float]] = []
            peak = before
            async with trio.open_nursery() as nursery:

                async def load() -> None:
                    while True:
                        served.append(await curl(url))
                        await trio.sleep(LOAD_INTERVAL)

                async def look() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, open_fds(pid))
                        await trio.sleep(LOOK_INTERVAL)

                nursery.start_soon(load)
                nursery.start_soon(look)
                async with trio.open_nursery() as attack:
                    for _ in range(SLOW_CLIENTS):
                        attack.start_soon(slow_client, listen_port, cuts)
                nursery.cancel_scope.cancel()

            assert len(served) >= 10 and all(code == "200" for code, _ in served), served
            assert max(seconds for _, seconds in served) < SERVED_WITHIN, served
            assert peak <= before + CAP + FD_MARGIN, (peak, before)
            assert len(cuts) == SLOW_CLIENTS
            assert not (held := [cut for cut in cuts if cut.after == math.inf]), f"{len(held)} slow clients held"
            timed_out = [cut for cut in cuts if cut.answer]
            evicted = [cut for cut in cuts if not cut.answer]
            assert all(cut.answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for cut in timed_out), timed_out[:1]
            assert all(HEADER_TIMEOUT <= cut.after <= HEADER_TIMEOUT + LATE for cut in timed_out), (
                min(cut.after for cut in timed_out), max(cut.after for cut in timed_out)
            )
            assert all(cut.after <= HEADER_TIMEOUT + LATE for cut in evicted), max(cut.after for cut in evicted)
            # The cap held the last CAP in (each of curl's requests may have evicted one more): they ran out of time.
            assert CAP - len(served) - 1 <= len(timed_out) <= CAP, len(timed_out)

            # Status counts them (a connection cut as its time ran out may have been evicted too, as may one of curl's).
            status = as_json(await trio.to_thread.run_sync(fabric, site_dir, "site", "status", "-o", "json"))
            (stats,) = [listener["http"] for listener in status["listeners"]]
            assert stats["header_timeouts"] >= len(timed_out) and stats["evicted"] >= len(evicted), stats
            assert stats["header_timeouts"] + stats["evicted"] <= SLOW_CLIENTS + len(served), stats
            table = await trio.to_thread.run_sync(fabric, site_dir, "listener", "status")
            assert f"{stats['header_timeouts']} cut at the header timeout" in table.stdout, table.stdout
            assert f"{stats['evicted']} evicted at the connection cap" in table.stdout, table.stdout
            assert (stats["refused"], stats["idle_closed"]) == (0, 0), stats

            # The log: the first cut said at once, the rest in one line LOG_INTERVAL later; nothing per connection.
            await wait_until(lambda: len(LINE.findall(site.log.read_text())) >= 2, "the log's two lines about cut connections", deadline=LOG_INTERVAL + 5)
            lines = LINE.findall(site.log.read_text())
            said = {"header_timeouts": 0, "evicted": 0}
            for line in lines:
                for part in line.split("; "):
                    number, _, what = part.partition(" ")
                    said["evicted" if what.startswith("evicted") else "header_timeouts"] += int(number)
            assert said == {"header_timeouts": stats["header_timeouts"], "evicted": stats["evicted"]}, lines
            log = site.log.read_text()
            assert "EMFILE" not in log and "Too many open files" not in log
            assert len(log.splitlines()) <= LOG_LINES, log
        finally:
            site.kill()
