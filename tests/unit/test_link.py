"""Links and the router's link table over in-memory streams: no sockets, no TLS."""

from __future__ import annotations

import functools
import socket

import pytest
import trio
import trio.testing

from fabric import pki
from fabric.config import Settings
from fabric.gossip.records import sign_record
from fabric.router.frames import FrameDecoder, FrameType, encode_frame, encode_u64
from fabric.router.link import CONTROL_ALLOWANCE, FlowEnd, Link, make_hello
from fabric.router.router import Router

SETTINGS = Settings()


def hello(site: str, settings: Settings = SETTINGS):
    return make_hello(site, site, "interior", 1, settings, 1)


def link_pair(dialer: str, acceptor: str, dialer_handler, acceptor_handler):
    """Both ends of one link, `dialer` having dialled `acceptor`."""
    a, b = trio.testing.memory_stream_pair()
    common = dict(cost=1, settings=SETTINGS)
    dialed = Link(a, FrameDecoder(), local=hello(dialer), peer=hello(acceptor), dialer=True, handler=dialer_handler, **common)
    accepted = Link(b, FrameDecoder(), local=hello(acceptor), peer=hello(dialer), dialer=False, handler=acceptor_handler, **common)
    return dialed, accepted


def router(tmp_path, name: str, settings: Settings = SETTINGS) -> Router:
    identity = pki.create_identity(tmp_path / name, name)
    return Router(
        site_id=identity.site_id, name=name, mode="interior", incarnation=1, settings=settings,
        sign=functools.partial(sign_record, identity=identity),
    )


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


async def test_a_peer_that_sends_but_never_reads_ends_the_link_instead_of_growing_its_queue():
    settings = Settings(link_write_buffer=64 * 1024, keepalive_timeout=60)
    ours, theirs = trio.testing.lockstep_stream_pair()  # our writes block while the peer does not read
    link = Link(
        ours, FrameDecoder(), local=hello("A", settings), peer=hello("B", settings),
        dialer=True, cost=1, settings=settings, handler=_Quiet(),
    )
    pings = encode_frame(FrameType.PING, 0, encode_u64(0)) * 1000  # each answered by a PONG
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
            except trio.BrokenResourceError:
                pass  # the link ended and closed its stream: what this test wants
            await trio.sleep_forever()
    assert reason and reason[0].startswith("peer is not reading"), reason
    assert link._out_bytes <= settings.link_write_buffer + CONTROL_ALLOWANCE + 64


async def test_bytes_queued_before_a_sink_is_attached_are_not_overtaken_by_later_ones():
    """DATA right behind OPEN_OK is queued before the relay attaches its sink: the next DATA must not jump it.

    (With DirectTLS, OPEN_OK and the first DATA frames of a talkative server
    come in one read: the half-close transfer test saw its greeting reordered.)
    """
    link, _ = link_pair("A", "B", _Quiet(), _Quiet())
    flow = FlowEnd(link, 2, "flow", opener=False)
    delivered = bytearray()  # what the relay's other end (a client's socket) gets, in order

    def sink(data: bytes) -> int:
        delivered.extend(data)
        return len(data)

    async def pump() -> None:  # the relay's pump: from the flow's queue to the same socket
        while data := await flow.receive_some():
            delivered.extend(data)

    with trio.fail_after(5):
        flow._on_data(b"1" * 10)  # before the relay started
        flow.attach_sink(sink)
        flow._on_data(b"2" * 10)  # from the link's reader, before the pump ran
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            flow._on_data(b"3" * 10)  # the queue is drained: straight through the sink
            assert not flow._inbound
            flow._on_close()
    assert bytes(delivered) == b"1" * 10 + b"2" * 10 + b"3" * 10


async def test_gossip_sleeps_at_rest(tmp_path, monkeypatch):
    """Two linked sites that agree send a digest hash now and then, and otherwise wait."""
    ra, rb = router(tmp_path, "A"), router(tmp_path, "B")
    ticks = []
    for r in (ra, rb):
        engine = r.gossip._engine
        monkeypatch.setattr(engine, "tick", functools.partial(lambda real, now: ticks.append(now) or real(now), engine.tick))
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
                a._rtt_samples.extend(samples)
                ra.on_rtt(a)

            measure(0.101, 0.100, 0.102)  # the floor of three samples: 100 ms
            assert advertised() == (0.100 if latency_cost else None)
            assert ra.routes[rb.site_id].cost == (11 if latency_cost else 1)  # 1 + a unit per 10 ms
            measure(0.091)  # 9 ms less: within the band, nothing to tell
            assert advertised() == (0.100 if latency_cost else None)
            a._rtt_samples.clear()
            measure(0.001, 0.001, 0.001)  # the delay went away
            assert advertised() == (0.001 if latency_cost else None)
            assert ra.routes[rb.site_id].cost == 1
            nursery.cancel_scope.cancel()


async def test_a_sink_is_told_of_the_eof_once_it_has_had_every_byte():
    """An HTTP listener's sink is the only reader of its flow: it learns of the peer's CLOSE as it learns of
    DATA. While bytes are queued for `receive_some` (the sink took only part), the end is theirs to meet."""
    link, _ = link_pair("A", "B", _Quiet(), _Quiet())
    taken, ends = bytearray(), []

    def sink(data: bytes) -> int:
        taken.extend(data)
        return len(data)

    flow = FlowEnd(link, 2, "flow", opener=False)
    assert flow.quiet
    flow.attach_sink(sink, lambda: ends.append("eof"))
    flow._on_data(b"answer")
    flow._on_close()
    assert (bytes(taken), ends, flow.quiet) == (b"answer", ["eof"], False)

    held = FlowEnd(link, 4, "held", opener=False)
    held.attach_sink(lambda data: 2, lambda: ends.append("held eof"))  # takes 2 bytes of each
    held._on_data(b"answer")
    held._on_close()
    assert ends == ["eof"] and not held.quiet
    with trio.fail_after(5):
        assert await held.receive_some() == b"swer"
        assert await held.receive_some() == b""


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
