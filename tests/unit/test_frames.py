import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric import names
from fabric.errors import FrameError
from fabric.router.frames import (
    HEADER,
    MAX_COST,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
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

frames = st.builds(
    Frame,
    type=st.sampled_from(FrameType),
    flow_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=2048),
    flags=st.integers(0, 2**16 - 1),
)


@given(st.lists(frames, max_size=20), st.data())
def test_frames_round_trip_whatever_the_chunking(sent, data):
    wire = b"".join(encode_frame(f.type, f.flow_id, f.payload, f.flags) for f in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)]):
        decoder.receive_data(wire[start:end])
        received.extend(decoder)
    assert received == sent
    assert decoder.buffered == 0


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_frame_error(junk):
    decoder = FrameDecoder()
    decoder.receive_data(junk)
    try:
        list(decoder)
    except FrameError:
        pass


def test_length_past_maximum_is_refused_before_the_payload_arrives():
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(1, FrameType.DATA, 0, 1, MAX_PAYLOAD + 1))
    with pytest.raises(FrameError, match="over the"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.pack(2, FrameType.DATA, 0, 1, 0), "unsupported frame version 2"),
        (HEADER.pack(1, 99, 0, 1, 0), "unknown frame type 99"),
    ],
)
def test_bad_headers_name_the_cause(header, message):
    decoder = FrameDecoder()
    decoder.receive_data(header)
    with pytest.raises(FrameError, match=message):
        decoder.next_frame()


def test_partial_frame_waits_for_more_bytes():
    wire = encode_frame(FrameType.DATA, 7, b"hello")
    decoder = FrameDecoder()
    decoder.receive_data(wire[:-1])
    assert decoder.next_frame() is None
    decoder.receive_data(wire[-1:])
    assert decoder.next_frame() == Frame(FrameType.DATA, 7, b"hello")


@given(st.integers(0, 2**64 - 1))
def test_u64_round_trip(value):
    assert decode_u64_untrusted(encode_u64(value)) == value


@given(st.sampled_from(Reason), st.text(max_size=200))
def test_reason_round_trip(code, text):
    assert decode_reason_untrusted(encode_reason(code, text)) == (code, text)


@given(st.binary(max_size=64))
def test_u64_and_reason_raise_only_frame_error(junk):
    for decode in (decode_u64_untrusted, decode_reason_untrusted):
        try:
            decode(junk)
        except FrameError:
            pass


texts = st.text(min_size=1, max_size=40)
names = st.from_regex(names.PATTERN, fullmatch=True)
messages = st.one_of(
    st.builds(
        Hello,
        min_version=st.integers(0, 10),
        max_version=st.integers(0, 10),
        site_id=texts,
        name=names,
        mode=st.sampled_from(["interior", "edge"]),
        incarnation=st.integers(0, 2**40),
        flow_window=st.integers(0, 2**31),
        cost=st.integers(0, MAX_COST),
    ),
    st.builds(Open, dest=texts, routing_key=names, origin=texts, flow_uid=texts, hop_limit=st.integers(0, 64)),
)


@given(messages)
def test_messages_round_trip(message):
    assert decode_message_untrusted(encode_message(message), type(message)) == message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=8),
    max_leaves=20,
)


@given(st.one_of(st.binary(max_size=256), json_values.map(lambda v: json.dumps(v).encode())))
def test_arbitrary_payloads_raise_only_frame_error(payload):
    for cls in (Hello, Open):
        try:
            decode_message_untrusted(payload, cls)
        except FrameError:
            pass


def test_wrongly_typed_field_is_named():
    good = json.loads(encode_message(Open("d", "db", "o", "u", 8)))
    good["hop_limit"] = "8"
    with pytest.raises(FrameError, match="malformed OPEN payload: hop_limit must be an integer"):
        decode_message_untrusted(json.dumps(good).encode(), Open)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cost", MAX_COST + 1, "cost must be an integer from 0 to"),  # would make the acceptor's own record invalid
        ("mode", "core", "mode must be one of"),
    ],
)
def test_hello_out_of_range_is_refused(field, value, message):
    hello = json.loads(encode_message(Hello(1, 1, "s", "s", "edge", 1, 1024, 1)))
    hello[field] = value
    with pytest.raises(FrameError, match=message):
        decode_message_untrusted(json.dumps(hello).encode(), Hello)
