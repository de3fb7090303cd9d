"""An HTTP listener's answers written by a flow's sink, and what the sink gives back to a finisher task.

Sites in this process, a scripted HTTP/1.1 target behind a connector at
one, an HTTP listener at the other, raw clients on 127.0.0.1. Most answers
are read and written from the link's reader (`HttpListener._sinks`);
these tests hold the cases where it must give the answer back, or where
the client's task must learn that it is done: whatever path an answer
took, the client gets it whole or sees the connection broken, and the
listener's counts and the router's outstanding flows come back to rest.

The last tests hold what a client may keep (Settings.http_*), short here:
a head not whole in time is answered 408, an idle keep-alive connection is
closed, and at the cap a new client evicts the one that has waited
longest, or is refused (503) when every one has a request in progress; a
request in progress is never cut, however long its answer takes.
"""

from __future__ import annotations

import functools
import logging
import random
import socket
from contextlib import asynccontextmanager

import trio
from polling import wait_until

from fabric.config import Settings

DEADLINE = 20  # seconds for a test that waits on the network
SHORT = 0.5  # seconds: the header or idle timeout under test
SLACK = 0.5  # seconds a timer may fire late on a loaded machine
MiB = 1024 * 1024
BIG = random.Random(7).randbytes(8 * MiB)


async def _read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("closed in a head")
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    return head


async def target(stream: trio.SocketStream, release: trio.Event) -> None:
    """GET /small, /big (8 MiB), /close (a body the target's close ends), /reset (broken off), /bad (a
    malformed head), /switch (101, asked or not), /wait (answered once `release` is set); keep-alive otherwise."""
    buffer = bytearray()
    async with stream:
        while True:
            try:
                head = await _read_head(stream, buffer)
            except (EOFError, trio.BrokenResourceError):
                return
            path = head.split(b" ")[1]
            if path == b"/small":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
            elif path == b"/big":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG)
            elif path == b"/close":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close")
                return
            elif path == b"/reset":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # close: RST
                return
            elif path == b"/bad":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n")
            elif path == b"/switch":
                await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
                return
            elif path == b"/wait":
                await release.wait()
                try:
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
                except trio.BrokenResourceError:
                    return  # the listener dropped the flow: its client had gone


@asynccontextmanager
async def http_pair(network, start_server, release: trio.Event, settings: Settings | None = None):
    """Sites hub (connector "web", protocol http, to `target`) and edge (an HTTP listener, with `settings`
    if given): edge and its port."""
    port = await start_server(lambda stream: target(stream, release))
    options = {} if settings is None else {"settings": settings}
    async with network.site("hub", link_port=0) as hub, network.site("edge", **options) as edge:
        with trio.fail_after(DEADLINE):
            await network.link(edge, hub)
            await hub.create_connector("web", port, host="127.0.0.1", protocol="http")
            listener = await edge.create_listener("web", 0, protocol="http")
            await edge.wait_reachable("web")
        yield edge, listener.port


async def answer(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bytes]:
    """One answer with a Content-Length or chunked body: (head, body)."""
    head = await _read_head(stream, buffer)
    if b"content-length:" in head.lower():
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            data = await stream.receive_some(65536)
            assert data, "closed in a body"
            buffer += data
        body = bytes(buffer[:length])
        del buffer[:length]
        return head, body
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while True:
        while b"\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        size_line, _, rest = bytes(buffer).partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += await stream.receive_some(65536)
        body += rest[:size]
        buffer[:] = rest[size + 2 :]
        if size == 0:
            return head, bytes(body)


def http_stats(edge):
    (stats,) = [l.http for l in edge.status().listeners if l.http is not None]
    return stats


async def at_rest(edge):
    """The listener's stats once no request is in progress and no flow is outstanding (a sink may finish last)."""
    await wait_until(
        lambda: http_stats(edge).active == 0 and not +edge.router.outstanding, "no request in progress, no flow outstanding"
    )
    return http_stats(edge)


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: web\r\n\r\n"


async def test_keep_alive_answers_come_whole_and_in_order_and_the_counts_come_to_rest(network, start_server):
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                buffer = bytearray()
                for _ in range(200):
                    await stream.send_all(get(b"/small"))
                    head, body = await answer(stream, buffer)
                    assert head.startswith(b"HTTP/1.1 200 ") and body == b"small"
                # Pipelined: the second is read while the sink writes the first answer, and waits for it.
                await stream.send_all(get(b"/small") + get(b"/big") + get(b"/small"))
                assert [(await answer(stream, buffer))[1] for _ in range(3)] == [b"small", BIG, b"small"]
            stats = await at_rest(edge)
            assert (stats.requests, stats.statuses, stats.errors) == (203, {"2xx": 203}, 0)


async def test_an_answer_the_client_does_not_take_at_once_is_given_back_to_a_finisher(network, start_server):
    """8 MiB to a client that reads nothing for a while: the sink writes what the socket takes and gives the
    rest back (a finisher task writes it under flow control); the connection then carries the next request."""
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                buffer = bytearray()
                await stream.send_all(get(b"/big"))
                await trio.sleep(0.3)
                assert (await answer(stream, buffer))[1] == BIG
                await stream.send_all(get(b"/small"))
                assert (await answer(stream, buffer))[1] == b"small"
            stats = await at_rest(edge)
            assert (stats.requests, stats.errors) == (2, 0)


async def test_a_request_pipelined_behind_a_finished_answer_waits_for_it_and_then_goes(network, start_server):
    """The client's task reads the next request while a finisher writes the answer before it, and routes
    it once that one is done; then the client's half-close ends the connection after both answers."""
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                buffer = bytearray()
                await stream.send_all(get(b"/big") + get(b"/small"))
                await trio.sleep(0.3)  # (the socket fills: the sink gives the rest of /big back)
                await stream.send_eof()
                assert [(await answer(stream, buffer))[1] for _ in range(2)] == [BIG, b"small"]
                assert await stream.receive_some(65536) == b""
            stats = await at_rest(edge)
            assert (stats.requests, stats.statuses, stats.errors) == (2, {"2xx": 2}, 0)


async def test_a_switch_of_protocols_nobody_asked_for_is_a_broken_answer(network, start_server):
    """101 to a plain GET (RFC 9110 forbids it): never a tunnel, but a 502, once the request was tried twice."""
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(get(b"/switch"))
                received, _ = await until_closed(stream)
            assert received.startswith(b"HTTP/1.1 502 "), received
            assert b"asked for no upgrade" in received, received
            stats = await at_rest(edge)
            assert (stats.requests, stats.statuses) == (1, {"5xx": 1})


async def test_an_answer_the_targets_close_ends_reaches_the_client_through_the_sinks_eof(network, start_server):
    """No length: the answer ends with the target's close, which the flow tells its sink (the client's task
    waits for the next request, not for the flow). The client gets it chunked and its connection goes on."""
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                buffer = bytearray()
                for _ in range(3):
                    await stream.send_all(get(b"/close"))
                    head, body = await answer(stream, buffer)
                    assert head.startswith(b"HTTP/1.1 200 ") and body == b"until close", (head, body)
            stats = await at_rest(edge)
            assert (stats.requests, stats.statuses, stats.errors) == (3, {"2xx": 3}, 0)


async def test_an_answer_broken_off_by_the_target_is_never_passed_off_as_whole(network, start_server):
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(get(b"/reset"))
                received = b""
                try:
                    while data := await stream.receive_some(65536):
                        received += data
                except trio.BrokenResourceError:
                    pass  # reset: what a broken answer becomes
                assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"only ten.."), received
            stats = await at_rest(edge)
            assert (stats.requests, stats.errors) == (1, 1)


async def test_a_client_that_goes_while_the_sink_waits_for_its_answer(network, start_server):
    """The client's task ends (the client went) while its answer is still due: the flow is dropped and the
    request counted as broken; the late answer goes nowhere, and the listener serves the next client."""
    release = trio.Event()
    async with http_pair(network, start_server, release) as (edge, port):
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(get(b"/wait"))
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            await stream.aclose()  # an RST: the listener's task sees its client gone
            stats = await at_rest(edge)
            assert (stats.requests, stats.errors) == (1, 1)
            release.set()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(get(b"/small"))
                assert (await answer(stream, bytearray()))[1] == b"small"


async def test_a_malformed_answer_and_an_answer_that_closes_the_connection(network, start_server):
    """A malformed answer meets the sink first: given back, tried again on a new flow, then 502. An answer
    to HTTP/1.0 closes the connection after it: the sink that wrote it says so to the waiting task."""
    async with http_pair(network, start_server, trio.Event()) as (edge, port):
        with trio.fail_after(DEADLINE):
            for request, status, body in (
                (get(b"/bad"), b"502", None),
                (b"GET /small HTTP/1.0\r\n\r\n", b"200", b"small"),
            ):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request)
                    received = b""
                    while data := await stream.receive_some(65536):  # until the listener closes
                        received += data
                assert received.startswith(b"HTTP/1.1 " + status + b" "), received
                assert body is None or received.endswith(b"\r\n\r\n" + body), received
            stats = await at_rest(edge)
            assert (stats.requests, stats.statuses, stats.errors) == (2, {"2xx": 1, "5xx": 1}, 0)


async def until_closed(stream: trio.SocketStream) -> tuple[bytes, float]:
    """What the listener sends until it closes the connection, and when it closed it (a reset counts as a close)."""
    received = b""
    try:
        while data := await stream.receive_some(65536):
            received += data
    except trio.BrokenResourceError:
        pass
    return received, trio.current_time()


async def listener_stats(edge, **wanted: int):
    """The listener's stats once the counts named are as `wanted` (the listener has no event for them)."""
    await wait_until(lambda: all(getattr(http_stats(edge), name) == n for name, n in wanted.items()), f"counts {wanted}")
    return http_stats(edge)


async def slowloris(stream: trio.SocketStream, started: float, *, dribble: bool = True) -> tuple[bytes, float]:
    """The start of a head, then a line of it now and then, never the blank line that ends it (nothing at all
    if not `dribble`): what the listener sent until it closed the connection, and when, counted from `started`."""

    async def send() -> None:
        try:
            await stream.send_all(b"GET /small HTTP/1.1\r\nHost: web\r\n")
            while True:
                await trio.sleep(SHORT / 5)
                await stream.send_all(b"X-Dribble: 1\r\n")
        except trio.BrokenResourceError:
            pass  # cut

    async with trio.open_nursery() as nursery:
        if dribble:
            nursery.start_soon(send)
        received, closed = await until_closed(stream)
        nursery.cancel_scope.cancel()
    return received, closed - started


async def test_a_head_not_whole_within_the_header_timeout_is_answered_408_and_closed(network, start_server):
    """Slowloris: a head dribbled a line at a time is cut SHORT s after its first byte (of the accept, for
    a connection's first head), with a 408; a connection that sends nothing is closed, unanswered. A
    request whose answer takes longer than that is not cut."""
    release = trio.Event()
    settings = Settings(http_header_timeout=SHORT, http_idle_timeout=30.0)
    async with http_pair(network, start_server, release, settings) as (edge, port):
        with trio.fail_after(DEADLINE):
            results: list[tuple[bytes, float]] = []

            async def client(stream: trio.SocketStream | None, *, dribble: bool = True) -> None:
                started = trio.current_time()
                stream = stream or await trio.open_tcp_stream("127.0.0.1", port)
                results.append(await slowloris(stream, started, dribble=dribble))

            kept = await trio.open_tcp_stream("127.0.0.1", port)
            await kept.send_all(get(b"/small"))
            assert (await answer(kept, bytearray()))[1] == b"small"
            slow_answer = await trio.open_tcp_stream("127.0.0.1", port)
            await slow_answer.send_all(get(b"/wait"))
            await trio.sleep(SHORT / 2)  # (less than the timeout: a head after it is timed from its own first byte)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client, kept)  # a second head on a keep-alive connection
                nursery.start_soon(client, None)  # a connection's first head
                nursery.start_soon(functools.partial(client, None, dribble=False))
                await trio.sleep(2 * SHORT)
                release.set()  # an answer that took 2.5 times the header timeout
                assert (await answer(slow_answer, bytearray()))[1] == b"late"
            assert all(SHORT <= after <= SHORT + SLACK for _, after in results), results
            answers = sorted(received.split(b"\r\n")[0] for received, _ in results)
            assert answers == [b"", b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 408 Request Timeout"], results
            assert all(b"\r\nconnection: close\r\n" in received for received, _ in results if received)
            await slow_answer.send_all(get(b"/small"))  # (still open)
            assert (await answer(slow_answer, bytearray()))[1] == b"small"
            stats = await listener_stats(edge, header_timeouts=3)
            assert (stats.idle_closed, stats.evicted, stats.refused, stats.statuses) == (0, 0, 0, {"2xx": 3}), stats


async def test_a_keep_alive_connection_left_idle_is_closed_quietly(network, start_server):
    """A connection with no request begun for the idle timeout is closed with nothing said; one whose
    requests come more often than that stays open however long it lasts."""
    settings = Settings(http_header_timeout=30.0, http_idle_timeout=SHORT)
    async with http_pair(network, start_server, trio.Event(), settings) as (edge, port):
        with trio.fail_after(DEADLINE):
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            buffer = bytearray()
            await idle.send_all(get(b"/small"))
            assert (await answer(idle, buffer))[1] == b"small"
            answered = trio.current_time()
            closing = []

            async def watch() -> None:
                closing.append(await until_closed(idle))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for _ in range(4):  # 4 x SHORT / 2: longer than the idle timeout in all
                    await busy.send_all(get(b"/small"))
                    assert (await answer(busy, bytearray()))[1] == b"small"
                    await trio.sleep(SHORT / 2)
            ((received, closed),) = closing
            assert received == b"" and SHORT <= closed - answered <= SHORT + SLACK, (received, closed - answered)
            await busy.send_all(get(b"/small"))
            assert (await answer(busy, bytearray()))[1] == b"small"
            stats = await listener_stats(edge, idle_closed=1)
            assert (stats.header_timeouts, stats.evicted, stats.refused) == (0, 0, 0), stats


async def test_at_the_cap_a_new_client_evicts_the_longest_waiting_or_is_refused_when_all_are_busy(
    network, start_server, caplog
):
    """http_max_connections 4. All four with a request in progress: a fifth client gets 503 at once, and
    the four their answers. Three in a head and one idle: a new client's request closes the one that has
    waited longest (the first head), and is served; the others carry on. The log says so in one line."""
    caplog.set_level(logging.DEBUG, "fabric.proxy.http")
    release = trio.Event()
    settings = Settings(http_max_connections=4, http_header_timeout=30.0, http_idle_timeout=30.0)
    async with http_pair(network, start_server, release, settings) as (edge, port):
        with trio.fail_after(DEADLINE):
            busy = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
            for stream in busy:
                await stream.send_all(get(b"/wait"))
            await wait_until(lambda: edge.status().listeners[0].http.active >= 4, "4 requests in progress")
            refused = await trio.open_tcp_stream("127.0.0.1", port)
            await refused.send_all(get(b"/small"))
            received, _ = await until_closed(refused)
            assert received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), received
            assert b"\r\nconnection: close\r\n" in received and b"holds 4 connections, all busy" in received
            release.set()
            for stream in busy:
                assert (await answer(stream, bytearray()))[1] == b"late"
                await stream.aclose()
            await wait_until(lambda: not edge.status().listeners[0].connections, "every connection closed")

            heads = []
            for i in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"GET /small HTTP/1.1\r\nHost: web\r\n")
                heads.append(stream)
                # Accepted in this order: the first has waited longest.
                await wait_until(lambda n=i + 1: edge.status().listeners[0].connections >= n, f"{i + 1} connections")
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(get(b"/small"))
            assert (await answer(idle, bytearray()))[1] == b"small"
            new = await trio.open_tcp_stream("127.0.0.1", port)
            await new.send_all(get(b"/small"))
            assert (await answer(new, bytearray()))[1] == b"small"
            received, _ = await until_closed(heads[0])
            assert received == b"", received
            for stream in (*heads[1:], idle):
                await stream.send_all(b"\r\n" if stream is not idle else get(b"/small"))
                assert (await answer(stream, bytearray()))[1] == b"small"
            stats = await listener_stats(edge, evicted=1, refused=1)
            assert (stats.header_timeouts, stats.idle_closed, stats.statuses) == (0, 0, {"2xx": 9}), stats
    lines = [r.getMessage() for r in caplog.records if "client connections cut" in r.getMessage()]
    # The first cut is said at once; the eviction after it waits for the next line, logs.LINE_INTERVAL later.
    assert len(lines) == 1 and "1 refused at the cap of 4 connections" in lines[0], lines
