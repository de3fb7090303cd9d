"""The link protocol with no I/O: two ends pass bytes to each other, and the tests read the events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.errors import FlowRefused, FrameError, ProtocolError
from fabric.router.frames import (
    MAX_PAYLOAD,
    FrameType,
    Hello,
    Open,
    Reason,
    encode_frame,
    encode_message,
    encode_reason,
    encode_u64,
)
from fabric.router.protocol import (
    RTT_MIN_SAMPLES,
    RTT_WINDOW,
    Data,
    Event,
    FlowAccepted,
    FlowClosed,
    FlowOpened,
    FlowOverLimit,
    FlowRefusedByPeer,
    FlowResetByPeer,
    GoAway,
    Gossip,
    LinkProtocol,
    Ping,
    Pong,
    RoundTrips,
    WindowUpdate,
)

WINDOW = 1000  # bytes of credit per flow in these tests
REQUEST = Open(dest="b" * 32, routing_key="echo", origin="a" * 32, flow_uid="uid", hop_limit=3)


def pair(window: int = WINDOW, max_flows: int = 4) -> tuple[LinkProtocol, LinkProtocol]:
    """A dialer and an acceptor with the same settings."""
    def end(dialer: bool) -> LinkProtocol:
        peer = "acceptor" if dialer else "dialer"
        return LinkProtocol(dialer=dialer, window=window, peer_window=window, max_flows=max_flows, peer_name=peer)

    return end(True), end(False)


def opened(dialer: LinkProtocol, acceptor: LinkProtocol) -> int:
    """A flow the dialer opened and the acceptor took."""
    flow_id, frame = dialer.open_flow(REQUEST)
    assert acceptor.receive_data(frame) == [FlowOpened(flow_id, REQUEST)]
    assert dialer.receive_data(acceptor.accept_flow(flow_id)) == [FlowAccepted(flow_id)]
    return flow_id


def data(protocol: LinkProtocol, flow_id: int, payload: bytes) -> bytes:
    return protocol.send_data(flow_id, payload) + payload


# -- flows -------------------------------------------------------------------------------


def test_a_flow_opens_carries_bytes_both_ways_and_ends_when_closed_both_ways():
    a, b = pair()
    flow = opened(a, b)
    assert flow % 2 == 1 and (a.flow_count, b.flow_count) == (1, 1)
    assert b.receive_data(data(a, flow, b"ping")) == [Data(flow, b"ping")]
    assert a.receive_data(data(b, flow, b"pong")) == [Data(flow, b"pong")]
    assert b.receive_data(a.close_flow(flow)) == [FlowClosed(flow)]
    assert b.flow_count == 1  # B may still send
    assert a.receive_data(b.close_flow(flow)) == [FlowClosed(flow)]
    assert (a.flow_count, b.flow_count) == (0, 0)
    assert a.flow_credit(flow) is None


def test_the_acceptor_opens_even_ids_and_ids_only_grow():
    a, b = pair()
    ids = [b.open_flow(REQUEST)[0] for _ in range(3)]
    assert ids == [2, 4, 6]
    assert [a.open_flow(REQUEST)[0] for _ in range(3)] == [1, 3, 5]


def test_credit_is_granted_as_the_reader_consumes_half_the_window():
    a, b = pair()
    flow = opened(a, b)
    credit = a.flow_credit(flow)
    assert credit is not None and credit.send_room == WINDOW
    b.receive_data(data(a, flow, b"x" * WINDOW))
    assert credit.send_room == 0
    assert b.consumed(flow, WINDOW // 2 - 1) == b""  # not yet half
    grant = b.consumed(flow, 1)
    assert a.receive_data(grant) == [WindowUpdate(flow)]
    assert credit.send_room == WINDOW // 2  # the offset moved by what was consumed
    assert credit.send_limit == WINDOW // 2 + WINDOW
    assert a.receive_data(grant) == []  # an old CREDIT (overtaken) says nothing new


def test_data_past_credit_ends_the_link():
    a, b = pair()
    flow = opened(a, b)
    b.receive_data(data(a, flow, b"x" * WINDOW))
    with pytest.raises(ProtocolError, match=f"past its credit on flow {flow}"):
        b.receive_data(encode_frame(FrameType.DATA, flow, b"x"))


def test_sending_past_credit_is_refused_before_it_leaves():
    a, b = pair()
    flow = opened(a, b)
    with pytest.raises(ValueError, match="past the credit"):
        a.send_data(flow, b"x" * (WINDOW + 1))
    with pytest.raises(ValueError, match="never opened"):
        a.send_data(99, b"x")


def test_data_after_close_ends_the_link():
    a, b = pair()
    flow = opened(a, b)
    b.receive_data(a.close_flow(flow))
    with pytest.raises(ProtocolError, match=f"DATA after CLOSE on flow {flow}"):
        b.receive_data(encode_frame(FrameType.DATA, flow, b"x"))
    with pytest.raises(ValueError, match="closed for sending"):
        a.send_data(flow, b"x")


def test_a_reset_ends_the_flow_at_both_ends_and_late_frames_are_dropped():
    a, b = pair()
    flow = opened(a, b)
    in_flight = data(b, flow, b"late") + b.consumed(flow, 0) + b.close_flow(flow)
    assert b.receive_data(a.reset_flow(flow, Reason.ENDPOINT_RESET, "client went away")) == [
        FlowResetByPeer(flow, Reason.ENDPOINT_RESET, "client went away")
    ]
    assert (a.flow_count, b.flow_count) == (0, 0)
    assert a.receive_data(in_flight) == []  # B sent them before it heard of the reset


def test_a_refused_flow_is_over():
    a, b = pair()
    flow, frame = a.open_flow(REQUEST)
    b.receive_data(frame)
    assert a.receive_data(b.refuse_flow(flow, Reason.NO_CONNECTOR, "nothing here")) == [
        FlowRefusedByPeer(flow, Reason.NO_CONNECTOR, "nothing here")
    ]
    assert (a.flow_count, b.flow_count) == (0, 0)


def test_the_flow_limit_holds_both_ways():
    a = LinkProtocol(dialer=True, window=WINDOW, peer_window=WINDOW, max_flows=2, peer_name="acceptor")
    b = LinkProtocol(dialer=False, window=WINDOW, peer_window=WINDOW, max_flows=3, peer_name="dialer")
    for _ in range(2):
        opened(a, b)
    with pytest.raises(FlowRefused, match="link to acceptor has 2 flows, its limit") as refused:
        a.open_flow(REQUEST)
    assert refused.value.code == Reason.FLOW_LIMIT
    # B's limit is higher: its OPEN is answered with OPEN_FAIL, the flow never counted at A.
    flow, frame = b.open_flow(REQUEST)
    [over] = a.receive_data(frame)
    assert over == FlowOverLimit(flow, "link from acceptor has 2 flows, its limit")
    assert a.flow_count == 2
    assert b.receive_data(a.refuse_flow(flow, Reason.FLOW_LIMIT, over.text)) == [
        FlowRefusedByPeer(flow, Reason.FLOW_LIMIT, over.text)
    ]
    assert (a.flow_count, b.flow_count) == (2, 2)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (encode_frame(FrameType.DATA, 7, b"x"), "DATA frame for unknown flow 7"),
        (encode_frame(FrameType.CREDIT, 0, encode_u64(1)), "CREDIT frame for unknown flow 0"),
        (encode_frame(FrameType.CLOSE, 4), "CLOSE frame for unknown flow 4"),
        (encode_frame(FrameType.OPEN, 1, encode_message(REQUEST)), "OPEN with flow id 1, which the peer may not use now"),
        (encode_frame(FrameType.HELLO, 0, b"{}"), "unexpected HELLO frame on an established link"),
        (encode_frame(FrameType.REDEEM, 0, b"{}"), "unexpected REDEEM frame on an established link"),
        (encode_frame(FrameType.PONG, 0, b"short"), "expected an 8-byte payload, got 5 bytes"),
        (encode_frame(FrameType.OPEN, 2, b"not json"), "malformed OPEN payload"),
        (b"\x09" + bytes(11), "unsupported frame version 9"),
        (b"\x01\x63" + bytes(10), "unknown frame type 99"),
    ],
)
def test_a_frame_the_peer_may_not_send_is_a_protocol_error_that_says_why(frame, why):
    a, _ = pair()  # the dialer: the peer opens even ids
    with pytest.raises(ProtocolError, match=why):
        a.receive_data(frame)


def test_an_open_id_may_not_be_reused():
    a, _ = pair()
    frame = encode_frame(FrameType.OPEN, 2, encode_message(REQUEST))
    a.receive_data(frame)
    with pytest.raises(ProtocolError, match="flow id 2, which the peer may not use now"):
        a.receive_data(frame)


def test_a_frame_over_the_size_limit_is_a_frame_error():
    a, _ = pair()
    header = encode_frame(FrameType.GOSSIP, 0, b"")[:8] + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    with pytest.raises(FrameError, match=f"over the {MAX_PAYLOAD}-byte maximum"):
        a.receive_data(header)


# -- the link's own frames ---------------------------------------------------------------------


def test_ping_is_answered_and_the_pong_gives_back_the_time_it_was_sent():
    a, b = pair()
    [ping] = b.receive_data(a.ping(12.5))
    assert isinstance(ping, Ping)
    assert a.receive_data(b.pong(ping.payload)) == [Pong(12.5)]


def test_gossip_passes_through_as_it_is():
    a, b = pair()
    assert b.receive_data(a.gossip(b'{"push": []}')) == [Gossip(b'{"push": []}')]


def test_nothing_after_a_goaway_is_read():
    a, b = pair()
    frames = a.gossip(b"before") + a.goaway(Reason.SHUTDOWN, "stopping") + a.gossip(b"after")
    assert b.receive_data(frames) == [Gossip(b"before"), GoAway(Reason.SHUTDOWN, "stopping")]
    assert b.receive_data(a.gossip(b"later")) == []


def test_bytes_behind_the_hello_are_read_first():
    """The handshake's decoder holds what came with the peer's HELLO: the protocol reads it first."""
    from fabric.router.frames import FrameDecoder

    decoder = FrameDecoder()
    hello = Hello(1, 1, "b" * 32, "b", "interior", 1, WINDOW, 1)
    decoder.receive_data(encode_frame(FrameType.HELLO, 0, encode_message(hello)) + encode_frame(FrameType.GOSSIP, 0, b"g"))
    assert decoder.next_frame() is not None  # the HELLO, read by the handshake
    protocol = LinkProtocol(dialer=True, window=WINDOW, peer_window=WINDOW, max_flows=4, peer_name="b", decoder=decoder)
    assert protocol.receive_data(b"") == [Gossip(b"g")]


def test_frames_split_anywhere_give_the_same_events():
    a, b = pair()
    flow, frame = a.open_flow(REQUEST)
    stream = frame + data(a, flow, b"hello") + a.gossip(b"g") + a.close_flow(flow) + a.ping(1.0)
    whole = pair()[1].receive_data(stream)
    for cut in range(len(stream) + 1):
        b = pair()[1]
        assert b.receive_data(stream[:cut]) + b.receive_data(stream[cut:]) == whole
    one_by_one: list[Event] = []
    b = pair()[1]
    for i in range(len(stream)):
        one_by_one += b.receive_data(stream[i : i + 1])
    assert one_by_one == whole


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "smoothed", "floor"),
    [
        ([], None, None),
        ([0.1], 0.1, None),
        ([0.1] * (RTT_MIN_SAMPLES - 1) + [0.05], 0.1 + 0.125 * (0.05 - 0.1), 0.05),
        ([0.01] + [0.2] * RTT_WINDOW, None, 0.2),  # the floor forgets samples past its window
    ],
)
def test_round_trips_smooth_the_samples_and_keep_the_floor_of_the_last_few(samples, smoothed, floor):
    trips = RoundTrips(now=0.0, max_age=5.0)
    for sample in samples:
        assert trips.on_pong(Pong(100.0 - sample), now=100.0)
    if smoothed is not None:
        assert trips.smoothed == pytest.approx(smoothed)
    assert trips.floor == (None if floor is None else pytest.approx(floor))


def test_a_pong_that_echoes_no_recent_ping_measures_nothing():
    trips = RoundTrips(now=0.0, max_age=5.0)
    assert not trips.on_pong(Pong(94.0), now=100.0)  # older than max_age
    assert not trips.on_pong(Pong(101.0), now=100.0)  # from the future
    assert trips.smoothed is None and trips.answered_at == 0.0
    assert trips.on_pong(Pong(99.0), now=100.0)
    assert trips.answered_at == 100.0


# -- any interleaving --------------------------------------------------------------------------


class End:
    """One end of a link in the model: its protocol, the bytes it sent and not yet delivered, its flows' bytes."""

    def __init__(self, protocol: LinkProtocol) -> None:
        self.protocol = protocol
        self.wire = bytearray()
        self.sent: dict[int, bytearray] = {}  # flow -> bytes this end sent on it
        self.received: dict[int, bytearray] = {}  # flow -> bytes the peer's DATA brought
        self.buffered: dict[int, int] = {}  # flow -> bytes received and not consumed yet
        self.reset: set[int] = set()  # flows reset by either end, as this end knows

    def sendable(self) -> list[int]:
        return sorted(
            f for f in self.sent if (c := self.protocol.flow_credit(f)) is not None and not c.send_closed
        )

    def take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, FlowOpened):
                self.wire += self.protocol.accept_flow(event.flow_id)
                self.sent[event.flow_id] = bytearray()
                self.received[event.flow_id] = bytearray()
                self.buffered[event.flow_id] = 0
            elif isinstance(event, Data):
                self.received[event.flow_id] += event.payload
                self.buffered[event.flow_id] += len(event.payload)
            elif isinstance(event, (FlowResetByPeer, FlowRefusedByPeer)):
                self.reset.add(event.flow_id)
            elif isinstance(event, FlowOverLimit):
                self.wire += self.protocol.refuse_flow(event.flow_id, Reason.FLOW_LIMIT, event.text)
            elif isinstance(event, Ping):
                self.wire += self.protocol.pong(event.payload)


SMALL = 64  # bytes of credit per flow in the interleavings: small, so that it runs out often
send = st.tuples(st.just("send"), st.integers(0, 1), st.integers(0, 7), st.integers(1, 2 * SMALL))
consume = st.tuples(st.just("consume"), st.integers(0, 1), st.integers(0, 7), st.integers(1, 2 * SMALL))
operation = st.one_of(
    st.tuples(st.just("open"), st.integers(0, 1)),
    send,
    consume,
    send,  # (twice as likely as the rest: credit runs out, and is granted again)
    consume,
    st.tuples(st.just("close"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("reset"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("ping"), st.integers(0, 1)),
)
# After each operation, bytes in flight go on each way: none, a few (frames split), or all.
delivery = st.sampled_from([0, 5, 3 * SMALL, 100 * SMALL])


def _apply(ends: list[End], op: tuple) -> None:
    kind, side = op[0], op[1]
    me, peer = ends[side], ends[1 - side]
    p = me.protocol
    if kind == "open":
        if p.flow_count < p.max_flows:
            flow, frame = p.open_flow(REQUEST)
            me.wire += frame
            me.sent[flow], me.received[flow], me.buffered[flow] = bytearray(), bytearray(), 0
        else:
            with pytest.raises(FlowRefused):
                p.open_flow(REQUEST)
    elif kind == "send" and (flows := me.sendable()):
        flow = flows[op[2] % len(flows)]
        credit = p.flow_credit(flow)
        assert credit is not None
        if n := min(op[3], credit.send_room):
            payload = bytes([len(me.sent[flow]) % 251]) * n
            me.wire += data(p, flow, payload)
            me.sent[flow] += payload
    elif kind == "consume" and (flows := sorted(f for f, n in me.buffered.items() if n)):
        flow = flows[op[2] % len(flows)]
        n = min(op[3], me.buffered[flow])
        me.buffered[flow] -= n
        me.wire += p.consumed(flow, n)
    elif kind == "close" and (flows := me.sendable()):
        me.wire += p.close_flow(flows[op[2] % len(flows)])
    elif kind == "reset" and (flows := sorted(f for f in me.sent if p.flow_credit(f) is not None)):
        flow = flows[op[2] % len(flows)]
        me.wire += p.reset_flow(flow, Reason.ENDPOINT_RESET, "reset")
        me.reset.add(flow)
    elif kind == "ping":
        me.wire += p.ping(1.0)
    elif kind == "deliver":
        chunk = bytes(me.wire[: op[2]])
        del me.wire[: op[2]]
        peer.take(peer.protocol.receive_data(chunk))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(operation, delivery, delivery), min_size=10, max_size=60))
def test_any_interleaving_of_two_honest_ends_delivers_every_byte_in_order(steps):
    ends = [End(p) for p in pair(window=SMALL, max_flows=3)]
    for op, there, back in steps:
        _apply(ends, op)
        _apply(ends, ("deliver", 0, there))
        _apply(ends, ("deliver", 1, back))
    while ends[0].wire or ends[1].wire:  # deliver all that is in flight, answers included
        for side in (0, 1):
            _apply(ends, ("deliver", side, len(ends[side].wire)))
    for me, peer in (ends, ends[::-1]):
        for flow, sent in me.sent.items():
            got = peer.received.get(flow, bytearray())
            if flow in me.reset or flow in peer.reset:
                assert sent.startswith(got)
            else:
                assert got == sent, flow
        # Every flow still open holds no more than the credit it gave.
        for flow in me.sent:
            if (credit := me.protocol.flow_credit(flow)) is not None:
                assert credit.received - credit.consumed <= SMALL
    assert ends[0].protocol.flow_count == ends[1].protocol.flow_count


frame_types = st.sampled_from([int(t) for t in FrameType])
flow_ids = st.sampled_from([0, 1, 2, 3, 4, 6, 2**32 - 1])
payloads = st.one_of(
    st.binary(max_size=40),
    st.integers(0, 2**64 - 1).map(encode_u64),
    st.builds(encode_reason, st.sampled_from(Reason), st.text(max_size=10)),
    st.just(encode_message(REQUEST)),
)
frames = st.builds(lambda t, f, p: encode_frame(FrameType(t), f, p), frame_types, flow_ids, payloads)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(st.one_of(frames, st.binary(max_size=30)), max_size=20), st.integers(1, 64))
def test_any_bytes_from_the_peer_give_events_or_a_protocol_error_only(dialer, pieces, chunk):
    protocol = pair(window=64, max_flows=2)[0 if dialer else 1]
    stream = b"".join(pieces)
    try:
        for i in range(0, len(stream), chunk):
            protocol.receive_data(stream[i : i + chunk])
    except ProtocolError:
        pass
    assert protocol.flow_count <= 2
