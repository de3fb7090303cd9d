"""Links and the router's link table over in-memory streams: no sockets, no TLS.

The protocol's rules (ids, credit, validation) are test_protocol.py's; these
are the Trio side's: tasks, queues, sinks, and what the router makes of links.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio
import trio.testing

from fabric import pki
from fabric.config import Settings
from fabric.gossip.engine import GossipEngine
from fabric.gossip.gossip import Gossip
from fabric.gossip.records import sign_record
from fabric.router.frames import (
    FrameDecoder,
    FrameType,
    Open,
    Reason,
    encode_frame,
    encode_message,
    encode_reason,
    encode_u64,
)
from fabric.router.link import CONTROL_ALLOWANCE, FlowEnd, Link, make_hello
from fabric.router.protocol import Pong
from fabric.router.router import Router

SETTINGS = Settings()


def hello(site: str, settings: Settings = SETTINGS):
    return make_hello(site, site, "interior", 1, settings, 1)


def link_pair(dialer: str, acceptor: str, dialer_handler, acceptor_handler, settings: Settings = SETTINGS):
    """Both ends of one link, `dialer` having dialled `acceptor`."""
    a, b = trio.testing.memory_stream_pair()
    ours, theirs = hello(dialer, settings), hello(acceptor, settings)
    common = dict(cost=1, settings=settings)
    dialed = Link(a, FrameDecoder(), local=ours, peer=theirs, dialer=True, handler=dialer_handler, **common)
    accepted = Link(b, FrameDecoder(), local=theirs, peer=ours, dialer=False, handler=acceptor_handler, **common)
    return dialed, accepted


def router(tmp_path, name: str, settings: Settings = SETTINGS) -> Router:
    identity = pki.create_identity(tmp_path / name, name)
    catalog = functools.partial(
        Gossip, site_id=identity.site_id, name=name, mode="interior", incarnation=1, settings=settings,
        sign=functools.partial(sign_record, identity=identity),
    )
    return Router(site_id=identity.site_id, name=name, mode="interior", settings=settings, catalog=catalog)


async def test_a_second_link_from_the_other_direction_is_refused_and_the_first_stays(tmp_path):
    ra, rb = router(tmp_path, "A"), router(tmp_path, "B")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            await nursery.start(rb.run)
            a1, b1 = link_pair(ra.site_id, rb.site_id, ra, rb)
            nursery.start_soon(ra.run_link, a1)
            nursery.start_soon(rb.run_link, b1)
            await ra.wait_linked(rb.site_id)
            await rb.wait_linked(ra.site_id)
            # B dials A as well (both configured to link): the new link is the duplicate.
            b2, a2 = link_pair(rb.site_id, ra.site_id, rb, ra)
            reasons = []

            async def run(router, link):
                reasons.append(await router.run_link(link))

            async with trio.open_nursery() as duplicates:
                duplicates.start_soon(run, ra, a2)
                duplicates.start_soon(run, rb, b2)
            assert any("already has a link" in reason for reason in reasons), reasons
            assert ra.links[rb.site_id] is a1 and rb.links[ra.site_id] is b1
            assert not a1.closed and not b1.closed
            nursery.cancel_scope.cancel()


class _Quiet:
    def on_open(self, link, flow, request):
        flow.refuse(0, "no")

    def on_gossip(self, link, payload):
        pass

    def on_rtt(self, link):
        pass


class _Accepting(_Quiet):
    """Accepts every flow and hands it to the test."""

    def __init__(self) -> None:
        self.flows: list[FlowEnd] = []
        self.opened = trio.Event()

    def on_open(self, link, flow, request):
        flow.accept()
        self.flows.append(flow)
        self.opened.set()


async def test_a_peer_that_sends_but_never_reads_ends_the_link_instead_of_growing_its_queue():
    settings = Settings(link_write_buffer=64 * 1024, keepalive_timeout=60)
    ours, theirs = trio.testing.lockstep_stream_pair()  # our writes block while the peer does not read
    link = Link(
        ours, FrameDecoder(), local=hello("A", settings), peer=hello("B", settings),
        dialer=True, cost=1, settings=settings, handler=_Quiet(),
    )
    pings = encode_frame(FrameType.PING, 0, encode_u64(0)) * 1000  # each answered by a PONG
    most_queued = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reason = []

            async def run():
                reason.append(await link.run())
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            try:
                for _ in range(200):  # 200,000 PONGs (4 MB) if nothing stopped it
                    await theirs.send_all(pings)
                    most_queued = max(most_queued, link.queued)
            except trio.BrokenResourceError:
                pass  # the link ended and closed its stream: what this test wants
            await trio.sleep_forever()
    assert reason and reason[0].startswith("peer is not reading"), reason
    assert most_queued <= settings.link_write_buffer + CONTROL_ALLOWANCE + 64


async def opened_flow(nursery: trio.Nursery) -> tuple[FlowEnd, FlowEnd]:
    """A running pair of links, and both ends of one flow on it: (the opener's, the acceptor's)."""
    acceptor = _Accepting()
    dialed, accepted = link_pair("A", "B", _Quiet(), acceptor)
    await nursery.start(dialed.run)
    await nursery.start(accepted.run)
    ours = dialed.open_flow(Open("B", "key", "A", "flow", 3))
    await ours.wait_opened()
    await acceptor.opened.wait()
    return ours, acceptor.flows[0]


async def wait_queued(flow: FlowEnd) -> None:
    """Until bytes (or the end) are queued for the flow's `receive_some`."""
    while flow.quiet:
        await trio.testing.wait_all_tasks_blocked()


async def test_bytes_queued_before_a_sink_is_attached_are_not_overtaken_by_later_ones():
    """DATA right behind OPEN_OK is queued before the relay attaches its sink: the next DATA must not jump it.

    (With DirectTLS, OPEN_OK and the first DATA frames of a talkative server
    come in one read: the half-close transfer test saw its greeting reordered.)
    """
    delivered = bytearray()  # what the relay's other end (a client's socket) gets, in order
    through_sink = bytearray()

    def sink(data: bytes) -> int:
        delivered.extend(data)
        through_sink.extend(data)
        return len(data)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            sender, flow = await opened_flow(nursery)
            await sender.send_all(b"1" * 10)  # before the relay started
            await wait_queued(flow)
            flow.attach_sink(sink)
            await sender.send_all(b"2" * 10)  # the first bytes are still queued: these queue behind them
            await trio.testing.wait_all_tasks_blocked()
            assert through_sink == b""

            async def pump() -> None:  # the relay's pump: from the flow's queue to the same socket
                while data := await flow.receive_some():
                    delivered.extend(data)

            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            await sender.send_all(b"3" * 10)  # the queue is drained: straight through the sink
            await trio.testing.wait_all_tasks_blocked()
            assert through_sink == b"3" * 10 and flow.quiet
            await sender.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert bytes(delivered) == b"1" * 10 + b"2" * 10 + b"3" * 10


async def test_a_sink_is_told_of_the_eof_once_it_has_had_every_byte():
    """An HTTP listener's sink is the only reader of its flow: it learns of the peer's CLOSE as it learns of
    DATA. While bytes are queued for `receive_some` (the sink took only part), the end is theirs to meet."""
    taken, ends = bytearray(), []

    def sink(data: bytes) -> int:
        taken.extend(data)
        return len(data)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            sender, flow = await opened_flow(nursery)
            assert flow.quiet
            flow.attach_sink(sink, lambda: ends.append("eof"))
            await sender.send_all(b"answer")
            await sender.send_eof()
            await wait_queued(flow)
            assert (bytes(taken), ends, flow.quiet) == (b"answer", ["eof"], False)

            sender, held = await opened_flow(nursery)
            held.attach_sink(lambda data: 2, lambda: ends.append("held eof"))  # takes 2 bytes of each
            await sender.send_all(b"answer")
            await sender.send_eof()
            await wait_queued(held)
            await trio.testing.wait_all_tasks_blocked()
            assert ends == ["eof"] and not held.quiet
            assert await held.receive_some() == b"swer"
            assert await held.receive_some() == b""
            nursery.cancel_scope.cancel()


async def test_a_reader_that_consumes_grants_the_writer_more_credit():
    """More than a window goes through a flow: the writer waits for credit, the reader's consumption grants it."""
    settings = Settings(flow_window=4096)
    payload = bytes(range(256)) * 64  # four windows
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            acceptor = _Accepting()
            dialed, accepted = link_pair("A", "B", _Quiet(), acceptor, settings)
            await nursery.start(dialed.run)
            await nursery.start(accepted.run)
            sender = dialed.open_flow(Open("B", "key", "A", "flow", 3))
            await sender.wait_opened()
            nursery.start_soon(sender.send_all, payload)
            await trio.testing.wait_all_tasks_blocked()
            assert sender.credit.send_room == 0  # a window sent, and nothing read yet
            await acceptor.opened.wait()
            received = bytearray()
            while len(received) < len(payload):
                received += await acceptor.flows[0].receive_some()
            assert received == payload
            nursery.cancel_scope.cancel()


async def test_a_flow_reset_in_the_read_that_opened_it_is_opened_then_failed():
    """OPEN and RESET of one flow in one read: the router sees the flow, then its reset, as frame by frame."""
    seen = []

    class Watching(_Quiet):
        def on_open(self, link, flow, request):
            seen.append("open")
            flow.on_failure(lambda error: seen.append(f"failed: {error}"))

    ours, theirs = trio.testing.memory_stream_pair()
    link = Link(ours, FrameDecoder(), local=hello("A"), peer=hello("B"), dialer=True, cost=1, settings=SETTINGS, handler=Watching())
    open_ = encode_frame(FrameType.OPEN, 2, encode_message(Open("A", "key", "B", "flow", 3)))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await theirs.send_all(open_ + encode_frame(FrameType.RESET, 2, encode_reason(Reason.ENDPOINT_RESET, "gone")))
            await trio.testing.wait_all_tasks_blocked()
            assert seen == ["open", "failed: gone"] and link.flow_count == 0 and not link.closed
            nursery.cancel_scope.cancel()


async def test_gossip_sleeps_at_rest(tmp_path, monkeypatch):
    """Two linked sites that agree send a digest hash now and then, and otherwise wait."""
    ra, rb = router(tmp_path, "A"), router(tmp_path, "B")
    ticks = []
    real_tick = GossipEngine.tick
    monkeypatch.setattr(GossipEngine, "tick", lambda engine, now: ticks.append(now) or real_tick(engine, now))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            await nursery.start(rb.run)
            a, b = link_pair(ra.site_id, rb.site_id, ra, rb)
            nursery.start_soon(ra.run_link, a)
            nursery.start_soon(rb.run_link, b)
            await ra.wait_linked(rb.site_id)
            while ra.routes.keys() != {rb.site_id} or rb.routes.keys() != {ra.site_id}:
                await ra.wait_changed()
            ticks.clear()
            await trio.sleep(0.5)  # a tenth of an anti-entropy interval
            nursery.cancel_scope.cancel()
    assert len(ticks) <= 4, f"{len(ticks)} engine ticks in 0.5 s at rest"


@pytest.mark.parametrize("latency_cost", [True, False])
async def test_a_links_rtt_floor_is_advertised_only_when_it_moves_and_latency_counts(tmp_path, latency_cost):
    settings = Settings(latency_cost=latency_cost)
    ra, rb = router(tmp_path, "A", settings), router(tmp_path, "B", settings)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            await nursery.start(rb.run)
            a, b = link_pair(ra.site_id, rb.site_id, ra, rb)
            nursery.start_soon(ra.run_link, a)
            nursery.start_soon(rb.run_link, b)
            while ra.routes.keys() != {rb.site_id}:
                await ra.wait_changed()

            def advertised() -> float | None:
                (info,) = ra.record(ra.site_id).links
                return info.rtt

            def measure(*samples: float) -> None:
                now = trio.current_time()
                for sample in samples:
                    assert a.round_trips.on_pong(Pong(now - sample), now)
                ra.on_rtt(a)

            # (Half a millisecond over the round figures: clock arithmetic does not round them down a unit.)
            measure(0.1015, 0.1005, 0.1025)  # the floor of three samples: 100.5 ms
            assert advertised() == (pytest.approx(0.1005) if latency_cost else None)
            assert ra.routes[rb.site_id].cost == (11 if latency_cost else 1)  # 1 + a unit per 10 ms
            measure(0.0915)  # 9 ms less: within the band, nothing to tell
            assert advertised() == (pytest.approx(0.1005) if latency_cost else None)
            measure(*[0.0015] * 10)  # the delay went away (the floor's window holds only these)
            assert advertised() == (pytest.approx(0.0015) if latency_cost else None)
            assert ra.routes[rb.site_id].cost == 1
            nursery.cancel_scope.cancel()


async def test_a_cancelled_receive_from_a_socket_leaves_its_bytes_for_the_next():
    """An HTTP listener's client task is cancelled (by a sink giving an answer back) while it waits for the
    next request: a receive cancelled at its checkpoint must not have read what it cannot return."""
    from fabric.router.relay import SocketEnd

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        end = SocketEnd(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "client")
        theirs.sendall(b"GET / HTTP/1.1\r\n")
        with trio.CancelScope() as scope:
            scope.cancel()
            await end.receive_some()
        assert scope.cancelled_caught
        with trio.fail_after(5):
            assert await end.receive_some() == b"GET / HTTP/1.1\r\n"
