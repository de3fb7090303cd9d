"""Fuzz targets: every place fabric parses bytes a peer (or a token's sender) chose.

Each target takes arbitrary bytes and returns normally when the parser took
them or refused them with its one documented error type; anything else it
raises is a finding. The same targets run under atheris (`python -m
tools.fuzz`) and under Hypothesis in the test suite (tests/unit/test_fuzz.py).

| target   | parser(s)                                                    | the one error type   |
| -------- | ------------------------------------------------------------ | -------------------- |
| frames   | FrameDecoder, fed in chunks                                  | FrameError           |
| payloads | decode_message_untrusted (HELLO, OPEN, REDEEM, REDEEM_OK), decode_u64/reason_untrusted | FrameError |
| hello    | read_hello_untrusted (any frame as the peer's first)         | LinkError            |
| gossip   | gossip decode_message_untrusted, then GossipEngine.receive   | ProtocolError (receive: none) |
| records  | decode_records_untrusted                                     | ProtocolError        |
| token    | Token.loads_untrusted                                        | TokenFormatError     |
| csr      | sign_csr (what the issuer does with a REDEEM's CSR)          | TokenError           |
| cert     | cert_site_id, cert_serial, check_issued_cert_untrusted, verify_signature_untrusted | ProtocolError / TokenError / none |
| link     | Link._dispatch of any frame sequence on an established link  | ProtocolError (or the link's own end) |
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from fabric import pki
from fabric.config import Settings
from fabric.errors import FrameError, LinkError, ProtocolError, TokenError, TokenFormatError
from fabric.gossip import engine as gossip_engine
from fabric.gossip.records import SiteRecord, decode_records_untrusted, sign_record
from fabric.router import link as link_module
from fabric.router.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Open,
    Redeem,
    RedeemOk,
    decode_message_untrusted,
    decode_reason_untrusted,
    decode_u64_untrusted,
    encode_frame,
    encode_message,
    encode_u64,
)

Target = Callable[[bytes], None]


# -- shared, made once per process ------------------------------------------------------------


@functools.cache
def identity(name: str = "fuzz") -> pki.Identity:
    """A site identity in a private temporary directory (key generation is slow: once)."""
    return pki.create_identity(Path(tempfile.mkdtemp(prefix=f"fabric-fuzz-{name}-")), name)


def _local_hello() -> Hello:
    return link_module.make_hello("a" * 32, "local", "interior", 1, Settings(), 1)


# -- targets -------------------------------------------------------------------------------------


def frames(data: bytes) -> None:
    """The first byte picks a chunk size; the rest is fed to a decoder in chunks of that size."""
    if not data:
        return
    step, data = data[0] + 1, data[1:]
    decoder = FrameDecoder()
    try:
        for pos in range(0, len(data), step):
            decoder.receive_data(data[pos : pos + step])
            for frame in decoder:
                assert isinstance(frame, Frame)
            # Bounded: at most one partial frame waits for more bytes.
            assert decoder.buffered < 12 + decoder._max_payload + step
    except FrameError:
        pass


_PAYLOAD_TYPES = (Hello, Open, Redeem, RedeemOk)


def payloads(data: bytes) -> None:
    for cls in _PAYLOAD_TYPES:
        try:
            message = decode_message_untrusted(data, cls)
        except FrameError:
            continue
        assert isinstance(message, cls)
        # What decodes must encode and decode to itself (nothing half-checked gets through).
        assert decode_message_untrusted(encode_message(message), cls) == message
    for decode in (decode_u64_untrusted, decode_reason_untrusted):
        try:
            decode(data)
        except FrameError:
            pass


def hello(data: bytes) -> None:
    """The first byte is the frame type; the rest its payload, as a peer's first frame."""
    if not data:
        return
    try:
        type_ = FrameType(data[0] % 15 or 1)
    except ValueError:
        return
    try:
        link_module.read_hello_untrusted(Frame(type_, 0, data[1:]), _local_hello())
    except LinkError:  # ProtocolError and FrameError included
        pass


@functools.cache
def _gossip_peer() -> pki.Identity:
    return identity("peer")


def _new_engine() -> gossip_engine.GossipEngine:
    me = identity()
    own = SiteRecord(site_id=me.site_id, name=me.name, incarnation=1, version=0, mode="interior")
    return gossip_engine.GossipEngine(
        own, sign=functools.partial(sign_record, identity=me), now=0.0, rng=random.Random(0)
    )


def gossip(data: bytes) -> None:
    try:
        message = gossip_engine.decode_message_untrusted(data)
    except ProtocolError:
        return
    engine = _new_engine()
    peer = _gossip_peer().site_id
    engine.link_up(peer, 0.0)
    # A hostile but well-formed message is the engine's to judge: it never raises.
    engine.receive(peer, message, 1.0)
    engine.tick(10.0)


def records(data: bytes) -> None:
    try:
        decode_records_untrusted(data)
    except ProtocolError:
        pass


def token(data: bytes) -> None:
    try:
        pki.Token.loads_untrusted(data.decode("utf-8", errors="replace"))
    except TokenFormatError:
        pass


def csr(data: bytes) -> None:
    try:
        pki.sign_csr(identity(), data)
    except TokenError:
        pass


def cert(data: bytes) -> None:
    for read in (pki.cert_site_id, pki.cert_serial):
        try:
            read(data)
        except ProtocolError:
            pass
    me = identity()
    try:
        pki.check_issued_cert_untrusted(me, data.decode("utf-8", errors="replace"), me.ca_cert_pem.decode())
    except TokenError:
        pass
    third = len(data) // 3
    result = pki.verify_signature_untrusted(data[:third], data[third : 2 * third], data[2 * third :])
    assert result is None or isinstance(result, str)


class _Handler:
    """The router's part, as small as can be: accept every flow, ignore gossip."""

    def on_open(self, link, flow, request) -> None:
        flow.accept()

    def on_gossip(self, link, payload) -> None:
        pass

    def on_rtt(self, link) -> None:
        pass


def link(data: bytes) -> None:
    """The first byte picks the role (dialer or not); the rest is decoded as frames and
    dispatched on an established link. Only a protocol error (or the peer's GOAWAY) may end it."""
    if not data:
        return
    decoder = FrameDecoder()
    decoder.receive_data(data[1:])
    try:
        sequence = list(decoder)
    except FrameError:
        return
    if not sequence:
        return
    trio.run(_dispatch_all, bool(data[0] & 1), sequence)


async def _dispatch_all(dialer: bool, sequence: list[Frame]) -> None:
    settings = Settings(flow_window=4096, max_flows_per_link=8)
    ours, _theirs = trio.testing.memory_stream_pair()
    peer = link_module.make_hello("b" * 32, "peer", "interior", 1, settings, 1)
    link = link_module.Link(
        ours, FrameDecoder(), local=_local_hello(), peer=peer, dialer=dialer, cost=1, settings=settings, handler=_Handler()
    )
    try:
        for frame in sequence:
            link._dispatch(frame)
    except (ProtocolError, link_module._LinkEnded):
        pass
    assert link.flow_count <= settings.max_flows_per_link


TARGETS: dict[str, Target] = {
    "frames": frames,
    "payloads": payloads,
    "hello": hello,
    "gossip": gossip,
    "records": records,
    "token": token,
    "csr": csr,
    "cert": cert,
    "link": link,
}


# -- seeds: valid inputs the fuzzers start from --------------------------------------------------


def seeds(target: str) -> list[bytes]:
    """A few well-formed inputs for `target`, so mutation starts close to what parsers accept."""
    me = identity()
    peer = _gossip_peer()
    hello_msg = link_module.make_hello(peer.site_id, "peer", "interior", 1, Settings(), 1)
    open_msg = Open(dest=me.site_id, routing_key="db", origin=peer.site_id, flow_uid="u:1", hop_limit=8)
    tok, _ = pki.new_token(me, ["tls://127.0.0.1:7443"], now=0.0)
    record = sign_record(
        SiteRecord(site_id=peer.site_id, name="peer", incarnation=1, version=3, mode="interior"), peer
    )
    frame_stream = b"".join(
        [
            encode_frame(FrameType.HELLO, 0, encode_message(hello_msg)),
            encode_frame(FrameType.PING, 0, encode_u64(1)),
            encode_frame(FrameType.OPEN, 2, encode_message(open_msg)),
            encode_frame(FrameType.DATA, 2, b"hello"),
            encode_frame(FrameType.CREDIT, 2, encode_u64(1 << 20)),
            encode_frame(FrameType.CLOSE, 2),
            encode_frame(FrameType.RESET, 2, b"\x00\x07bye"),
        ]
    )
    if target == "frames":
        return [b"\x0f" + frame_stream, b"\x00" + frame_stream]
    if target == "payloads":
        redeem = Redeem(token_id=tok.token_id, secret=tok.secret, name="peer", csr_pem=pki.make_csr(peer).decode())
        return [encode_message(m) for m in (hello_msg, open_msg, redeem)]
    if target == "hello":
        return [bytes([FrameType.HELLO]) + encode_message(hello_msg), bytes([FrameType.GOAWAY]) + b"\x00\x0abad"]
    if target == "gossip":
        push = gossip_engine.Push((record,))
        summary = gossip_engine.Summary("0" * 32, 1)
        return [gossip_engine.encode_message(push), gossip_engine.encode_message(summary)]
    if target == "records":
        from fabric.gossip.records import encode_records

        return [encode_records([record])]
    if target == "token":
        return [tok.dumps().encode()]
    if target == "csr":
        return [pki.make_csr(peer)]
    if target == "cert":
        cert_pem, _ = pki.sign_csr(me, pki.make_csr(peer))
        return [pki.pem_to_der(cert_pem), cert_pem]
    if target == "link":
        return [b"\x00" + frame_stream[len(encode_frame(FrameType.HELLO, 0, encode_message(hello_msg))) :]]
    return []


def seed_corpus(target: str) -> list[bytes]:
    """Seeds plus a JSON null and an empty input: the cheap edge cases."""
    return [*seeds(target), b"", b"null", json.dumps({}).encode()]
