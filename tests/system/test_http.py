"""HTTP listeners against real servers and clients: nginx and a keep-alive HTTP/1.1 target, curl and wrk.

The sites run in the test's Trio loop; nginx, the target (http_target.py),
curl and wrk are processes. What is held (issue 7):

- one keep-alive client's requests are spread over both providers, every
  body correct, over flows kept warm between requests;
- bodies stream both ways, chunked or not, a gigabyte each way in bounded
  memory; Expect: 100-continue, HEAD and Upgrade (WebSocket) pass;
- failures are HTTP answers (503, 502, 400, 431) and the listener goes on;
- forwarding headers are added (X-Forwarded-Proto set to http, whatever the
  client claims), hop-by-hop ones dropped; requests counted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket
from cli_support import free_port
from polling import wait_until
from prerequisites import require_programs

from fabric.proxy import plain

pytestmark = pytest.mark.system

DEADLINE = 120  # seconds per test
GiB = 1 << 30
MEMORY_BOUND = 64 << 20  # bytes the sites may grow by while a gigabyte goes through
TARGET = Path(__file__).with_name("http_target.py")
READY_DEADLINE = 10  # seconds for nginx or the target to listen
STOP_GRACE = 5  # seconds nginx or the target may take to stop after SIGTERM


def sparse_file(path: Path, size: int) -> None:
    """A file of `size` zeros that takes no disk."""
    with open(path, "wb") as out:
        out.truncate(size)


async def accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_listening(port: int) -> None:
    """Once the process the test started accepts connections on `port` (a process has no event to wait on)."""
    await wait_until(functools.partial(accepts, port), f"a server on port {port}", deadline=READY_DEADLINE, interval=0.05)


@pytest.fixture
def nginx(tmp_path: Path, nursery) -> Callable[..., object]:
    """`port, log = await nginx(name)`: nginx serving /id (its name), files from a root, keep-alive `keepalive` s."""
    require_programs("/usr/sbin/nginx")

    async def start(name: str, *, keepalive: float = 75, files: dict[str, int] | None = None) -> tuple[int, Path]:
        prefix = tmp_path / f"nginx-{name}"
        (prefix / "www").mkdir(parents=True)
        (prefix / "www" / "index.html").write_text(f"index of {name}\n")
        for file, size in (files or {}).items():
            await trio.to_thread.run_sync(sparse_file, prefix / "www" / file, size)
        port = free_port()
        log = prefix / "access.log"
        (prefix / "nginx.conf").write_text(
            # As root, nginx's workers would run as www-data, which cannot enter pytest's 0700 tmp_path.
            f"""{"user root; " if os.geteuid() == 0 else ""}worker_processes 1; daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {log};
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  keepalive_timeout {keepalive}s; keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}; root {prefix}/www; location = /id {{ return 200 "{name}"; }} }}
}}
"""
        )
        argv = ["/usr/sbin/nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix)]
        proc = await nursery.start(functools.partial(trio.run_process, argv, check=False, stderr=subprocess.DEVNULL))
        nursery.start_soon(_kill_at_end, proc)
        await wait_listening(port)
        return port, log

    return start


async def _kill_at_end(proc: trio.Process) -> None:
    """SIGTERM first: nginx's master then stops its workers (killed, it leaves them running, orphaned)."""
    try:
        await trio.sleep_forever()
    finally:
        proc.terminate()
        with trio.move_on_after(STOP_GRACE, shield=True):
            await proc.wait()
        proc.kill()


@pytest.fixture
def http_target(nursery) -> Callable[..., object]:
    """`port = await http_target(name)`: tests/system/http_target.py in a process of its own."""

    async def start(name: str) -> int:
        port = free_port()
        argv = [sys.executable, str(TARGET), str(port), name]
        proc = await nursery.start(functools.partial(trio.run_process, argv, check=False, stdout=subprocess.DEVNULL))
        nursery.start_soon(_kill_at_end, proc)
        await wait_listening(port)
        return port

    return start


async def run(*argv: str) -> subprocess.CompletedProcess:
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


@asynccontextmanager
async def serving(network, providers: list[int], *, name: str = "a") -> AsyncIterator[tuple[object, int, list]]:
    """Sites p0.. (a connector "web" to each port) linked to site `name`: (it, its HTTP listener's port, the p sites)."""
    async with network.site(name, service_sync=False) as a:
        async with trio.open_nursery() as nursery:
            sites = []
            for i, port in enumerate(providers):
                site = await nursery.start(_site, network, f"{name}-p{i}", port)
                await network.link(a, site)
                sites.append(site)
            listener = await a.create_listener("web", 0, protocol="http")
            with trio.fail_after(20):
                await a.wait_reachable("web", providers=len(providers))
            yield a, listener.port, sites
            nursery.cancel_scope.cancel()


async def _site(network, name: str, port: int, *, task_status) -> None:
    async with network.site(name, link_port=0, service_sync=False) as site:
        await site.create_connector("web", port, host="127.0.0.1", protocol="http")
        task_status.started(site)
        await trio.sleep_forever()


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


WRK_CHECK = """
local bad, seen = 0, {}
response = function(status, headers, body)
  if status ~= 200 or (body ~= "one" and body ~= "two") then bad = bad + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("bad responses: %d\\n", bad))
end
"""


async def test_one_keepalive_client_spreads_its_requests_over_both_providers(network, nginx, tmp_path):
    require_programs("curl", "wrk")
    (one, one_log), (two, two_log) = await nginx("one"), await nginx("two")
    with trio.fail_after(DEADLINE):
        async with serving(network, [one, two]) as (a, port, _):
            url = f"http://127.0.0.1:{port}/id"
            # curl: 100 requests on one connection (num_connects says whether it connected anew).
            result = await run("curl", "-s", "--write-out", " %{num_connects}\n", *[url] * 100)
            assert result.returncode == 0, result.stderr
            lines = result.stdout.decode().splitlines()
            bodies = [line.split()[0] for line in lines]
            assert set(bodies) <= {"one", "two"} and len(bodies) == 100
            assert [line.split()[1] for line in lines] == ["1"] + ["0"] * 99, "curl did not keep its connection"
            assert 40 <= bodies.count("one") <= 60, bodies.count("one")

            # wrk: 10 keep-alive connections for 3 s, every body checked.
            script = tmp_path / "check.lua"
            script.write_text(WRK_CHECK)
            before = [len(log.read_text().splitlines()) for log in (one_log, two_log)]
            result = await run("wrk", "-t1", "-c10", "-d3s", "-s", str(script), url)
            out = result.stdout.decode()
            assert result.returncode == 0 and "bad responses: 0" in out, out + result.stderr.decode()
            served = [len(log.read_text().splitlines()) - b for log, b in zip((one_log, two_log), before)]
            total = sum(served)
            assert total > 100 and 0.4 <= served[0] / total <= 0.6, served

            (stats,) = [l.http for l in a.status().listeners]
            # wrk stops with up to one request in flight per connection: those break off, nothing else.
            unanswered = stats.active + stats.errors
            assert stats.requests >= total + 100 and unanswered <= 10, stats
            # (one whose answer was counted can still break off while its last bytes go)
            assert set(stats.statuses) == {"2xx"} and stats.requests - unanswered <= stats.statuses["2xx"] <= stats.requests
            assert stats.methods == {"GET": stats.requests}
            # Warm flows carried them: far fewer flows than requests were ever opened.
            assert sum(l.flow_count for l in a.router.links.values()) <= 2 * (10 + 2)


async def test_a_kept_flow_whose_target_closed_it_is_replaced_without_a_failed_request(network, nginx):
    require_programs("curl")
    port, _ = await nginx("one", keepalive=1)
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (a, listen, _):
            url = f"http://127.0.0.1:{listen}/id"
            for _ in range(3):
                result = await run("curl", "-sf", url)
                assert result.returncode == 0 and result.stdout == b"one", result.stderr
                await trio.sleep(1.5)  # nginx closes the idle keep-alive connection behind the kept flow
            (stats,) = [l.http for l in a.status().listeners]
            assert stats.statuses == {"2xx": 3}


async def test_a_gigabyte_each_way_streams_in_bounded_memory(network, nginx, http_target, tmp_path):
    require_programs("curl")
    port, _ = await nginx("big", files={"big.bin": GiB})
    hasher = await http_target("hasher")
    zeros = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(GiB >> 20):
        zeros.update(block)
    upload = tmp_path / "upload.bin"
    await trio.to_thread.run_sync(sparse_file, upload, GiB)
    with trio.fail_after(DEADLINE * 2):
        async with serving(network, [port]) as (_, listen, _), serving(network, [hasher], name="b") as (b, hash_listen, _):
            peak = base = rss()

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss())
                    await trio.sleep(0.2)

            async with trio.open_nursery() as sampler:
                sampler.start_soon(sample)
                download = await run("bash", "-c", f"set -o pipefail; curl -sSf http://127.0.0.1:{listen}/big.bin | sha256sum")
                assert download.returncode == 0, download.stderr
                assert download.stdout.split()[0].decode() == zeros.hexdigest()
                sent = await run("curl", "-sf", "-T", str(upload), f"http://127.0.0.1:{hash_listen}/hash")
                assert sent.returncode == 0 and sent.stdout.decode() == zeros.hexdigest(), sent.stderr
                sampler.cancel_scope.cancel()
            assert peak - base < MEMORY_BOUND, f"the sites grew by {(peak - base) >> 20} MiB"
            (stats,) = [l.http for l in b.status().listeners]
            assert stats.bytes_in == GiB


async def test_chunked_bodies_and_expect_100_continue_pass_through(network, http_target, tmp_path):
    require_programs("curl")
    port = await http_target("chunky")
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (_, listen, _):
            base = f"http://127.0.0.1:{listen}"
            size = 10 * (1 << 20) + 12345
            got = await run("curl", "-sf", f"{base}/chunked?size={size}")
            assert got.returncode == 0 and got.stdout == random.Random(size).randbytes(size)

            body = tmp_path / "body.bin"
            data = random.randbytes(3 * (1 << 20) + 7)
            body.write_bytes(data)
            chunked = await run(
                "curl", "-sfv", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                "--data-binary", f"@{body}", f"{base}/hash",
            )
            assert chunked.returncode == 0, chunked.stderr
            assert chunked.stdout.decode() == hashlib.sha256(data).hexdigest()
            assert b"HTTP/1.1 100 Continue" in chunked.stderr  # the target's 100 came through


async def test_forwarding_headers_are_added_and_hop_by_hop_ones_dropped(network, http_target):
    require_programs("curl")
    port = await http_target("headers")
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (_, listen, _):
            got = await run(
                "curl", "-sf", "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1", "-H", "Keep-Alive: 5",
                "-H", "X-Forwarded-For: 10.1.2.3", "-H", "X-Forwarded-Proto: https", f"http://127.0.0.1:{listen}/headers",
            )
            headers = {}
            for line in got.stdout.decode().splitlines():
                name, _, value = line.partition(": ")
                headers[name.lower()] = value
            assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
            assert headers["x-forwarded-proto"] == "http"  # (what the client spoke here, not what it claimed)
            assert headers["forwarded"] == "for=127.0.0.1;proto=http"
            assert headers["via"] == "1.1 a"
            assert "x-secret" not in headers and "keep-alive" not in headers
            response = await run("curl", "-sfD", "-", "-o", "/dev/null", f"http://127.0.0.1:{listen}/id")
            assert re.search(rb"(?i)\r\nvia: 1.1 a\r\n", response.stdout), response.stdout


async def test_a_websocket_upgrade_becomes_a_tunnel(network, nursery):
    async def echo(request) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    server = await nursery.start(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None)
    with trio.fail_after(DEADLINE):
        async with serving(network, [server.port]) as (a, listen, _):
            async with trio_websocket.open_websocket("127.0.0.1", listen, "/", use_ssl=False) as ws:
                for size in (1, 1000, 300_000):
                    message = random.randbytes(size)
                    await ws.send_message(message)
                    assert await ws.get_message() == message
            (stats,) = [l.http for l in a.status().listeners]
            assert stats.statuses == {"1xx": 1}


async def raw_request(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; everything the listener answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_failures_become_http_answers_and_the_listener_goes_on(network, nginx, tcp):
    require_programs("curl")
    port, _ = await nginx("fine")
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (a, listen, providers):
            good = f"http://127.0.0.1:{listen}/id"

            async def still_serves() -> None:
                result = await run("curl", "-sf", good)
                assert result.returncode == 0 and result.stdout == b"fine", result.stderr

            head = await run("curl", "-sfI", good)  # HEAD: the length of a body that does not come
            assert head.returncode == 0 and re.search(rb"(?i)content-length: 4\r\n", head.stdout), head.stdout
            bad_line = await raw_request(listen, b"GARBAGE\r\n\r\n")
            assert bad_line.startswith(b"HTTP/1.1 400 "), bad_line
            await still_serves()
            huge = b"GET /id HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(64)) + b"\r\n"
            too_big = await raw_request(listen, huge)
            assert too_big.startswith(b"HTTP/1.1 431 "), too_big
            await still_serves()

            nobody = await a.create_listener("nobody", 0, protocol="http")
            no_provider = await run("curl", "-s", "-w", "%{http_code}", f"http://127.0.0.1:{nobody.port}/")
            assert no_provider.stdout.endswith(b"503") and b"no reachable site offers routing key 'nobody'" in no_provider.stdout

            (p0,) = providers
            await p0.create_connector("down", tcp.closed_port(), host="127.0.0.1", protocol="http")
            down = await a.create_listener("down", 0, protocol="http")
            await a.wait_reachable("down")
            refused = await run("curl", "-s", "-w", "%{http_code}", f"http://127.0.0.1:{down.port}/")
            assert refused.stdout.endswith(b"502") and b"Connection refused" in refused.stdout, refused.stdout
            await still_serves()
            stats = {l.name: l.http for l in a.status().listeners}
            assert stats["web"].statuses == {"2xx": 4, "4xx": 2} and stats["web"].requests == 6
            assert stats["nobody"].statuses == {"5xx": 1} and stats["down"].statuses == {"5xx": 1}


async def test_pipelined_requests_http_1_0_and_what_could_smuggle_a_request(network, nginx):
    port, log = await nginx("one")
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (_, listen, _):
            # Two requests in one write: two answers, in order, on the one connection.
            two = await raw_request(
                listen, b"GET /id HTTP/1.1\r\nHost: x\r\n\r\nGET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert two.count(b"HTTP/1.1 200 ") == 2 and two.index(b"\r\n\r\none") < two.index(b"index of one"), two
            # HTTP/1.0, with and without Host: answered, then closed.
            for request in (b"GET /id HTTP/1.0\r\nHost: x\r\n\r\n", b"GET /id HTTP/1.0\r\n\r\n"):
                answer = await raw_request(listen, request)
                assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\none"), answer
            # What could smuggle a second request past a proxy is refused, and the second never reaches nginx.
            served = len(log.read_text().splitlines())
            smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            for headers, body, status in (
                (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"400"),
                (b"Content-Length: 5\r\nContent-Length: 40\r\n", b"hello", b"400"),
                (b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n", b"501"),
                (b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n", b"400"),
            ):
                answer = await raw_request(listen, b"POST /id HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body + smuggled)
                assert answer.startswith(b"HTTP/1.1 " + status + b" ") and answer.count(b"HTTP/1.1") == 1, answer
            connect = await raw_request(listen, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            assert connect.startswith(b"HTTP/1.1 405 "), connect
            assert b"/smuggled" not in log.read_text().encode() and len(log.read_text().splitlines()) == served


# What a scripted target answers to GET /N, HEAD /N... (N: the index), and the requests that ask:
# plain ones (read whole, with no events), and ones with headers to filter, not plain, or to HEAD.
EXCHANGES = [
    (b"GET /0 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 5\r\n\r\nhello"),
    (b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody",
     b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nabc"),
    (b"GET /2 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\nVia: 1.0 c\r\n\r\n",
     b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
    (b"HEAD /3 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
    (b"DELETE /4 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nVia: 1.0 up\r\nX-Forwarded-For: 1.2.3.4\r\nContent-Length: 2\r\n\r\nok"),
    (b"GET /5 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    (b"PUT /6 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
     b"HTTP/1.1 201 Created\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nmade"),
    (b"GET /7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"),
]


@pytest.mark.skipif(plain.parse is None, reason="no fast path: the compiled module is not built or FABRIC_PURE_PYTHON is set")
async def test_plain_messages_read_whole_are_forwarded_as_the_events_would_forward_them(network, start_server, monkeypatch):
    """The listener reads a plain request, and its flow's sink a plain answer, whole (`Reader.whole`),
    without events: the target and the client get byte for byte what they get when every message is read
    as events, and the listener counts the same."""
    from fabric.proxy import http1

    seen = []  # the bytes the target got, request by request

    async def target(stream) -> None:
        reader = http1.Reader(http1.REQUEST)
        raw = b""
        with contextlib.suppress(trio.BrokenResourceError):  # (a flow not kept is reset)
            while data := await stream.receive_some(65536):
                raw += data
                reader.receive_data_untrusted(data)
                while (event := reader.next_event()) is not http1.NEED_DATA:
                    if isinstance(event, http1.Head):
                        index = int(event.target[1:])
                    elif event is http1.END:
                        seen.append(raw)
                        raw = b""
                        await stream.send_all(EXCHANGES[index][1])

    async def client(port: int) -> list[bytes]:
        got = []
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            for request, _ in EXCHANGES:
                await stream.send_all(request)
                reader = http1.Reader(http1.RESPONSE)
                reader.expect_response(request.split(b" ")[0])
                raw = b""
                done = False
                while not done:
                    data = await stream.receive_some(65536)
                    assert data, f"the listener closed before answering {request!r}: {raw!r}"
                    raw += data
                    reader.receive_data_untrusted(data)
                    while (event := reader.next_event()) is not http1.NEED_DATA:
                        done = done or event is http1.END
                got.append(raw)
            assert await stream.receive_some(65536) == b""  # (the last request asked to close)
        return got

    def counted(a) -> tuple:
        (stats,) = [listener.http for listener in a.status().listeners]
        return stats.requests, stats.methods, stats.statuses, stats.errors, stats.bytes_in, stats.bytes_out

    taken = []  # the messages read whole, by kind
    read_whole = http1.Reader.whole

    def spy(self, data: bytes):
        message = read_whole(self, data)
        if message is not None:
            taken.append(self.kind)
        return message

    port = await start_server(target)
    with trio.fail_after(DEADLINE):
        async with serving(network, [port]) as (a, listen, _):
            monkeypatch.setattr(http1.Reader, "whole", spy)
            whole = await client(listen), seen[:]
            once = counted(a)
            seen.clear()
            monkeypatch.setattr(http1.Reader, "whole", lambda self, data: None)
            as_events = await client(listen), seen[:]
            twice = counted(a)
    assert whole == as_events
    # Read whole: the plain requests (all but the one with Connection: close) and answers (all but the
    # one to HEAD and the chunked one). (The target and the client here read theirs as events.)
    assert taken.count(http1.REQUEST) == 7 and taken.count(http1.RESPONSE) == 6, taken
    answers, requests = whole
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\nServer: t\r\n") and answers[0].endswith(b"\r\n\r\nhello")
    assert answers[-1].endswith(b"connection: close\r\n\r\nbusy")
    assert b"\r\nx-forwarded-for: 10.0.0.9, 127.0.0.1\r\n" in requests[2]
    assert b"\r\nx-forwarded-proto: http\r\n" in requests[2] and b"https" not in requests[2]  # (plain HTTP here)
    assert requests[1].endswith(b"\r\n\r\nbody")
    assert once == (8, {"GET": 4, "POST": 1, "HEAD": 1, "DELETE": 1, "PUT": 1}, {"2xx": 6, "4xx": 1, "5xx": 1}, 0, 6, 21)
    assert twice == (16, {k: 2 * v for k, v in once[1].items()}, {k: 2 * v for k, v in once[2].items()}, 0, 12, 42)
