"""The link protocol with no I/O: flow ids, per-flow credit and frame validation.

`LinkProtocol` is one end of an established link (after the HELLOs), as
h11 is one end of an HTTP connection: `receive_data(bytes)` returns the
events those bytes complete, and each method that sends a frame returns
the bytes to write (`send_data` the header only: the payload follows it
as it is, uncopied, as h11's data passthrough). It owns what both ends
must agree on:

- flow ids: the dialer opens odd ids, the acceptor even ones, each larger
  than the last and never reused on the link;
- credit: each flow starts with the receiver's `flow_window` bytes, CREDIT
  carries the absolute byte offset the receiver allows (QUIC style), and
  the receiver grants more once its reader has consumed half the window;
- validation: a frame the peer may not send now (DATA past credit or after
  CLOSE, a frame for a flow never opened, an OPEN with an id out of turn, a
  handshake frame) raises `ProtocolError` (its subclass `FrameError` for
  bytes that do not decode), whose message is the GOAWAY's reason.

Frames for a flow that has ended here are dropped: the peer may have sent
them before it heard of the end. The Trio side (link.py) reads the stream,
feeds this, wakes the flows' readers and writers and runs the timers.
"""

from __future__ import annotations

import collections
from typing import TypeAlias

import attrs

from ..errors import FlowRefused, ProtocolError
from .frames import (
    FRAME_VERSION,
    HEADER,
    MAX_FLOW_ID,
    FrameDecoder,
    FrameType,
    Open,
    Reason,
    decode_message_untrusted,
    decode_reason_untrusted,
    decode_u64_untrusted,
    encode_frame,
    encode_message,
    encode_reason,
    encode_u64,
)

# -- events -----------------------------------------------------------------------


@attrs.frozen
class FlowOpened:
    """OPEN: the peer opens a flow. Answer with `accept_flow` or `refuse_flow`."""

    flow_id: int
    request: Open


@attrs.frozen
class FlowOverLimit:
    """OPEN past the link's flow limit: answer with `refuse_flow(flow_id, Reason.FLOW_LIMIT, text)`."""

    flow_id: int
    text: str


@attrs.frozen
class FlowAccepted:
    """OPEN_OK: the peer took a flow this end opened."""

    flow_id: int


@attrs.frozen
class FlowRefusedByPeer:
    """OPEN_FAIL: the peer refused a flow this end opened; the flow is over."""

    flow_id: int
    code: int
    text: str


@attrs.frozen
class Data:
    """DATA: bytes of a flow, within the credit this end gave (never empty)."""

    flow_id: int
    payload: bytes


@attrs.frozen
class WindowUpdate:
    """CREDIT: the peer allows more bytes on a flow (`flow_credit(flow_id).send_room`)."""

    flow_id: int


@attrs.frozen
class FlowClosed:
    """CLOSE: the peer sends no more on a flow (its end of file)."""

    flow_id: int


@attrs.frozen
class FlowResetByPeer:
    """RESET: the peer abandoned a flow in both directions; the flow is over."""

    flow_id: int
    code: int
    text: str


@attrs.frozen
class Ping:
    """PING: answer with `pong(payload)`."""

    payload: bytes


@attrs.frozen
class Pong:
    """PONG: the answer to a `ping(now)` of this end, sent at `sent_at` (the `now` it was given)."""

    sent_at: float


@attrs.frozen
class Gossip:
    """GOSSIP: a gossip message, still encoded (the gossip engine reads it)."""

    payload: bytes


@attrs.frozen
class GoAway:
    """GOAWAY: the peer ends the link. Nothing after it is read."""

    code: int
    text: str


Event: TypeAlias = (
    FlowOpened | FlowOverLimit | FlowAccepted | FlowRefusedByPeer | Data | WindowUpdate | FlowClosed
    | FlowResetByPeer | Ping | Pong | Gossip | GoAway
)

# Plain ints: compared (and packed) once per frame on the hot path.
_DATA = int(FrameType.DATA)
_pack_header = HEADER.pack
_CREDIT = int(FrameType.CREDIT)
_NAMES = {int(t): t.name for t in FrameType}


class FlowCredit:
    """The counters of one flow, as the protocol keeps them. Read them; only the protocol writes them."""

    __slots__ = ("received", "consumed", "recv_limit", "recv_closed", "sent", "send_limit", "send_closed")

    def __init__(self, recv_limit: int, send_limit: int) -> None:
        self.received = 0  # bytes of DATA the peer sent
        self.consumed = 0  # of which this end's reader took (see `consumed`)
        self.recv_limit = recv_limit  # the offset this end allows the peer to send up to
        self.recv_closed = False  # the peer's CLOSE came
        self.sent = 0  # bytes of DATA this end sent
        self.send_limit = send_limit  # the offset the peer allows
        self.send_closed = False  # this end sent CLOSE

    def __repr__(self) -> str:
        return (
            f"<FlowCredit sent={self.sent}/{self.send_limit} received={self.received}/{self.recv_limit} "
            f"buffered={self.received - self.consumed}>"
        )

    @property
    def send_room(self) -> int:
        """Bytes this end may send now."""
        return self.send_limit - self.sent


class LinkProtocol:
    """One end of an established link, with no I/O.

    `window` is the credit each flow starts with toward this end (this
    end's HELLO), `peer_window` the credit the peer gives (its HELLO).
    `decoder` holds what came behind the peer's HELLO: `receive_data(b"")`
    reads it.
    """

    def __init__(
        self,
        *,
        dialer: bool,
        window: int,
        peer_window: int,
        max_flows: int,
        peer_name: str,
        decoder: FrameDecoder | None = None,
    ) -> None:
        self.dialer = dialer
        self.window = window
        self.peer_window = peer_window
        self.max_flows = max_flows
        self.peer_name = peer_name  # for messages
        self._decoder = decoder if decoder is not None else FrameDecoder()
        self._flows: dict[int, FlowCredit] = {}
        self._next_id = 1 if dialer else 2  # the dialer's ids are odd, the acceptor's even
        self._peer_parity = 0 if dialer else 1
        self._peer_max_id = 0
        self._gone = False  # the peer's GOAWAY came

    def __repr__(self) -> str:
        role = "dialer" if self.dialer else "acceptor"
        return f"<LinkProtocol {role} peer={self.peer_name} flows={len(self._flows)} next_id={self._next_id}>"

    @property
    def flow_count(self) -> int:
        """Flows open on the link: opened, and neither refused, reset nor closed both ways."""
        return len(self._flows)

    @property
    def out_of_flow_ids(self) -> bool:
        """This end has used every flow id it may: the link must be made again for more flows."""
        return self._next_id > MAX_FLOW_ID

    def flow_credit(self, flow_id: int) -> FlowCredit | None:
        """The counters of an open flow; None once it has ended (or if it never was)."""
        return self._flows.get(flow_id)

    # -- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events that `data` (the next bytes from the peer) completes, in order.

        Raises `ProtocolError` if the peer broke the protocol (the link must
        end, telling the peer why): the events of the same bytes before the
        offending frame are lost with it. After a `GoAway`, returns nothing.
        """
        if self._gone:
            return []
        decoder = self._decoder
        decoder.receive_data(data)
        flows = self._flows
        events: list[Event] = []
        while (fields := decoder.next_fields()) is not None:
            type_, _, flow_id, payload = fields
            if type_ == _DATA:  # the hot path
                flow = flows.get(flow_id)
                if flow is None:
                    self._check_ended(type_, flow_id)
                    continue
                if flow.recv_closed:
                    raise ProtocolError(f"DATA after CLOSE on flow {flow_id}")
                flow.received += len(payload)
                if flow.received > flow.recv_limit:
                    raise ProtocolError(
                        f"peer sent past its credit on flow {flow_id} ({flow.received} > {flow.recv_limit} bytes)"
                    )
                if payload:
                    events.append(Data(flow_id, payload))
            elif (event := self._control(type_, flow_id, payload)) is not None:
                events.append(event)
                if type(event) is GoAway:
                    self._gone = True
                    break
        return events

    def _control(self, type_: int, flow_id: int, payload: bytes) -> Event | None:
        if type_ == _CREDIT:
            if (flow := self._flow(type_, flow_id)) is None:
                return None
            limit = decode_u64_untrusted(payload)
            if limit <= flow.send_limit:
                return None  # a CREDIT overtaken by a larger one
            flow.send_limit = limit
            return WindowUpdate(flow_id)
        kind = FrameType(type_)
        if kind is FrameType.CLOSE:
            if (flow := self._flow(type_, flow_id)) is None or flow.recv_closed:
                return None
            flow.recv_closed = True
            if flow.send_closed:
                del self._flows[flow_id]
            return FlowClosed(flow_id)
        if kind is FrameType.RESET:
            if self._flow(type_, flow_id) is None:
                return None
            code, text = decode_reason_untrusted(payload)
            del self._flows[flow_id]
            return FlowResetByPeer(flow_id, code, text)
        if kind is FrameType.OPEN:
            return self._open(flow_id, payload)
        if kind is FrameType.OPEN_OK:
            return None if self._flow(type_, flow_id) is None else FlowAccepted(flow_id)
        if kind is FrameType.OPEN_FAIL:
            if self._flow(type_, flow_id) is None:
                return None
            code, text = decode_reason_untrusted(payload)
            del self._flows[flow_id]
            return FlowRefusedByPeer(flow_id, code, text)
        if kind is FrameType.PING:
            return Ping(payload)
        if kind is FrameType.PONG:
            return Pong(decode_u64_untrusted(payload) / 1e9)
        if kind is FrameType.GOSSIP:
            return Gossip(payload)
        if kind is FrameType.GOAWAY:
            return GoAway(*decode_reason_untrusted(payload))
        raise ProtocolError(f"unexpected {kind.name} frame on an established link")

    def _open(self, flow_id: int, payload: bytes) -> Event:
        if flow_id % 2 != self._peer_parity or flow_id <= self._peer_max_id:
            raise ProtocolError(f"OPEN with flow id {flow_id}, which the peer may not use now")
        self._peer_max_id = flow_id
        request = decode_message_untrusted(payload, Open)
        if len(self._flows) >= self.max_flows:
            return FlowOverLimit(flow_id, f"link from {self.peer_name} has {len(self._flows)} flows, its limit")
        self._flows[flow_id] = FlowCredit(self.window, self.peer_window)
        return FlowOpened(flow_id, request)

    def _flow(self, type_: int, flow_id: int) -> FlowCredit | None:
        """The open flow a frame is for; None for one that has ended (a late frame, dropped)."""
        flow = self._flows.get(flow_id)
        if flow is None:
            self._check_ended(type_, flow_id)
        return flow

    def _opened_once(self, flow_id: int) -> bool:
        mine = flow_id % 2 != self._peer_parity
        return flow_id != 0 and (flow_id < self._next_id if mine else flow_id <= self._peer_max_id)

    def _check_ended(self, type_: int, flow_id: int) -> None:
        """A frame for a flow not open here: fine if the flow was opened once (it ended), an error if never."""
        if not self._opened_once(flow_id):
            raise ProtocolError(f"{_NAMES[type_]} frame for unknown flow {flow_id}")

    def _check_opened_once(self, flow_id: int) -> None:
        """Sending on a flow not open here: fine if it ended (the peer drops the frame), a bug if it never was."""
        if not self._opened_once(flow_id):
            raise ValueError(f"flow {flow_id} was never opened")

    # -- sending ---------------------------------------------------------------------

    def open_flow(self, request: Open) -> tuple[int, bytes]:
        """A new flow's id and its OPEN frame. Raises `FlowRefused` at the flow limit or out of ids."""
        if len(self._flows) >= self.max_flows:
            raise FlowRefused(Reason.FLOW_LIMIT, f"link to {self.peer_name} has {len(self._flows)} flows, its limit")
        if self.out_of_flow_ids:
            raise FlowRefused(Reason.FLOW_LIMIT, f"link to {self.peer_name} has used all its flow ids")
        flow_id = self._next_id
        self._next_id += 2
        self._flows[flow_id] = FlowCredit(self.window, self.peer_window)
        return flow_id, encode_frame(FrameType.OPEN, flow_id, encode_message(request))

    def accept_flow(self, flow_id: int) -> bytes:
        """OPEN_OK for a flow the peer opened."""
        return encode_frame(FrameType.OPEN_OK, flow_id)

    def refuse_flow(self, flow_id: int, code: Reason | int, text: str) -> bytes:
        """OPEN_FAIL for a flow the peer opened (or tried to: `FlowOverLimit`); the flow is over."""
        self._flows.pop(flow_id, None)
        return encode_frame(FrameType.OPEN_FAIL, flow_id, encode_reason(code, text))

    def send_data(self, flow_id: int, data: bytes) -> bytes:
        """The header of a DATA frame carrying `data`, which follows it on the wire as it is (not copied).

        `data` must fit the flow's credit (`send_room`): more raises
        ValueError, and so does a flow this end has closed or never opened.
        On a flow that has ended (reset or refused) the frame is a late one,
        which the peer drops.
        """
        n = len(data)
        flow = self._flows.get(flow_id)
        if flow is None:
            self._check_opened_once(flow_id)
        elif flow.send_closed:
            raise ValueError(f"flow {flow_id} was closed for sending")
        elif n > flow.send_limit - flow.sent:
            raise ValueError(f"{n} bytes are past the credit of flow {flow_id} ({flow.send_room} bytes)")
        else:
            flow.sent += n
        return _pack_header(FRAME_VERSION, _DATA, 0, flow_id, n)

    def consumed(self, flow_id: int, n: int) -> bytes:
        """This end's reader took `n` more bytes of a flow: a CREDIT frame once half the window is used, or b""."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return b""
        flow.consumed += n
        if flow.recv_closed or flow.recv_limit - flow.consumed > self.window // 2:
            return b""
        flow.recv_limit = flow.consumed + self.window
        return encode_frame(FrameType.CREDIT, flow_id, encode_u64(flow.recv_limit))

    def close_flow(self, flow_id: int) -> bytes:
        """CLOSE: this end sends no more on the flow. ValueError as for `send_data`."""
        flow = self._flows.get(flow_id)
        if flow is None:
            self._check_opened_once(flow_id)
        elif flow.send_closed:
            raise ValueError(f"flow {flow_id} was closed for sending")
        else:
            flow.send_closed = True
            if flow.recv_closed:
                del self._flows[flow_id]
        return encode_frame(FrameType.CLOSE, flow_id)

    def reset_flow(self, flow_id: int, code: Reason | int, text: str) -> bytes:
        """RESET: this end abandons the flow in both directions; the flow is over."""
        self._flows.pop(flow_id, None)
        return encode_frame(FrameType.RESET, flow_id, encode_reason(code, text))

    def ping(self, now: float) -> bytes:
        """A PING carrying `now` (seconds), which its `Pong` gives back."""
        return encode_frame(FrameType.PING, 0, encode_u64(int(now * 1e9)))

    def pong(self, payload: bytes) -> bytes:
        """The answer to a `Ping`."""
        return encode_frame(FrameType.PONG, 0, payload)

    def gossip(self, payload: bytes) -> bytes:
        return encode_frame(FrameType.GOSSIP, 0, payload)

    def goaway(self, code: Reason | int, text: str) -> bytes:
        """GOAWAY: the last frame this end sends, saying why the link ends."""
        return encode_frame(FrameType.GOAWAY, 0, encode_reason(code, text))


# -- round trips -------------------------------------------------------------------

RTT_SMOOTHING = 0.125  # weight of a new RTT sample (as TCP's SRTT)
# PONGs whose RTT samples the floor is the least of (one per keepalive
# interval). The floor measures the path, not the queues: a burst of traffic
# or a busy event loop lifts the smoothed RTT, not it.
RTT_WINDOW = 10
# Samples before the floor is trusted: the first PONGs come back while both
# sites are busy with handshakes, and one slow sample would be the floor.
RTT_MIN_SAMPLES = 3


class RoundTrips:
    """What the PONGs say of a link: its round-trip time, and when the peer last answered.

    `max_age` (seconds) bounds a sample: a PONG that echoes no recent PING
    of this end measures nothing.
    """

    def __init__(self, now: float, max_age: float) -> None:
        self.smoothed: float | None = None  # seconds
        self.answered_at = now  # when the peer last answered a PING (or the link began)
        self._max_age = max_age
        self._samples: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)

    def on_pong(self, pong: Pong, now: float) -> bool:
        """Take the sample a PONG gives; whether it was one."""
        sample = now - pong.sent_at
        if not 0 <= sample <= self._max_age:
            return False
        self.smoothed = sample if self.smoothed is None else self.smoothed + RTT_SMOOTHING * (sample - self.smoothed)
        self.answered_at = now
        self._samples.append(sample)
        return True

    @property
    def floor(self) -> float | None:
        """Seconds: the least sample of the last RTT_WINDOW, what routing uses (None until RTT_MIN_SAMPLES)."""
        return min(self._samples) if len(self._samples) >= RTT_MIN_SAMPLES else None
