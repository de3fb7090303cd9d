"""The gossip engine without I/O: its wire codec, its rules one by one, and simulated networks of up to 50 sites.

The simulator (tools/bench/gossip_sim.py, shared with the convergence
benchmark) runs the engines on a simulated clock, with per-message delays,
losses and cut links drawn from one seeded random.Random, and every message
through the real codec.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import pki
from fabric.errors import ProtocolError
from fabric.gossip.engine import (
    ANTI_ENTROPY_INTERVAL,
    MAX_SITES,
    PURGE_AFTER,
    Digest,
    GossipEngine,
    Message,
    Outbox,
    Pull,
    Push,
    Rejection,
    Summary,
    decode_message_untrusted,
    digest_hash,
    encode_message,
)
from fabric.gossip.records import (
    MAX_COUNTER,
    MAX_RECORDS,
    LinkInfo,
    ServiceInfo,
    SiteRecord,
    record_to_json,
    sign_record,
    signing_bytes,
    verify_record,
)
from fabric.logs import LINE_INTERVAL
from fabric.router.frames import MAX_PAYLOAD
from fabric.router.routes import compute_routes
from tools.bench.gossip_sim import (
    SimSite,
    Simulation,
    line,
    make_identity,
    random_mesh,
    star,
)

INTERVAL = ANTI_ENTROPY_INTERVAL
PURGE = PURGE_AFTER
PROPAGATION = 1.0  # seconds of simulated time a change may take to cross 50 sites at ~1 ms a hop


@pytest.fixture(scope="module")
def ids() -> list[pki.Identity]:
    """Six identities sorted by site id, so ids[0] is the lower end of any link."""
    rng = random.Random(7)
    return sorted((make_identity(f"s{i}", rng) for i in range(6)), key=lambda identity: identity.site_id)


def new_engine(identity: pki.Identity, *, now: float = 0.0, incarnation: int = 1, **kwargs: Any) -> GossipEngine:
    own = SiteRecord(site_id=identity.site_id, name=identity.name, incarnation=incarnation, version=0, mode="interior")
    kwargs.setdefault("rng", random.Random(0))
    return GossipEngine(own, sign=functools.partial(sign_record, identity=identity), now=now, **kwargs)


def signed(identity: pki.Identity, incarnation: int = 1, version: int = 1, **kwargs: Any) -> SiteRecord:
    kwargs.setdefault("name", identity.name)
    kwargs.setdefault("mode", "interior")
    record = SiteRecord(site_id=identity.site_id, incarnation=incarnation, version=version, **kwargs)
    return sign_record(record, identity)


def wire(message: Message) -> Message:
    """What the peer gets: the message through the codec."""
    return decode_message_untrusted(encode_message(message))


Sent: TypeAlias = list[tuple[str, str, Message]]
"""(from, to, message): what `flow` delivered."""


def flow(
    engines: dict[str, GossipEngine],
    outbox: Outbox,
    sender: str,
    now: float = 0.0,
    *,
    sent: Sent | None = None,
    lost: Callable[[str, str], bool] = lambda src, dst: False,
) -> int:
    """Deliver messages (breadth first, through the codec) until none is left; returns how many went.

    Messages to a site not in `engines` (an attacker, who speaks by hand)
    go nowhere, nor do those for which `lost(from, to)` holds. `sent`
    collects what was delivered.
    """
    return deliver(engines, [(sender, peer, message) for peer, message in outbox], now, sent=sent, lost=lost)


def deliver(
    engines: dict[str, GossipEngine],
    queue: Sent,
    now: float,
    *,
    sent: Sent | None = None,
    lost: Callable[[str, str], bool] = lambda src, dst: False,
) -> int:
    """`flow` for messages of several senders, in the order given (each link stays first in, first out)."""
    delivered = 0
    while queue:
        src, dst, message = queue.pop(0)
        if dst not in engines or lost(src, dst):
            continue
        delivered += 1
        if sent is not None:
            sent.append((src, dst, message))
        for peer, answer in engines[dst].receive(src, wire(message), now):
            queue.append((dst, peer, answer))
    return delivered


def linked(engines: dict[str, GossipEngine], a: str, b: str, now: float = 0.0, **options: Any) -> None:
    """a and b link up and publish their links, and everything flows (`options` go to `flow`).

    An end not in `engines` (an attacker) does its part by hand.
    """
    for x, y in ((a, b), (b, a)):
        if x in engines:
            flow(engines, engines[x].link_up(y, now), x, now, **options)
    for x in (a, b):
        if x in engines:
            links = [LinkInfo(peer, 1) for peer in engines[x].neighbours]
            flow(engines, engines[x].publish(now, links=links), x, now, **options)


def link(engines: dict[str, GossipEngine], a: str, b: str, now: float = 0.0, **options: Any) -> None:
    """a and b link up as routers do: each end takes the link up and publishes its links at once, then
    what they sent flows (`options` go to `flow`). An end not in `engines` (an attacker) does its part by hand."""
    queue: Sent = []
    for x, y in ((a, b), (b, a)):
        if x in engines:
            engine = engines[x]
            out = engine.link_up(y, now)
            out += engine.publish(now, links=[LinkInfo(peer, 1) for peer in engine.neighbours])
            queue += [(x, peer, message) for peer, message in out]
    deliver(engines, queue, now, **options)


def run_timers(engines: dict[str, GossipEngine], start: float, seconds: float, **options: Any) -> float:
    """Run every engine's timers from `start` for `seconds`, delivering at once what they send; returns the end."""
    end = start + seconds
    while True:
        site_id = min(engines, key=lambda site: engines[site].next_deadline())
        now = max(start, engines[site_id].next_deadline())
        if now > end:
            return end
        flow(engines, engines[site_id].tick(now), site_id, now, **options)


# -- codec -----------------------------------------------------------------------------


def test_messages_round_trip(ids: list[pki.Identity]) -> None:
    a = signed(ids[0], services=(ServiceInfo("db", port=5432),), links=(LinkInfo(ids[1].site_id, 2, 0.5),))
    messages = [
        Push((a, signed(ids[1], 3, 9))),
        Push(()),
        Digest(((ids[0].site_id, 1, 2), (ids[1].site_id, 0, MAX_COUNTER))),
        Digest(()),
        Pull((ids[0].site_id,)),
        Summary("0" * 32, 4),
    ]
    for message in messages:
        assert wire(message) == message
    assert json.loads(encode_message(messages[0])) == {"type": "push", "records": [record_to_json(a), record_to_json(messages[0].records[1])]}
    assert json.loads(encode_message(messages[2]))["stamps"][0] == [ids[0].site_id, 1, 2]
    assert json.loads(encode_message(messages[5])) == {"type": "summary", "hash": "0" * 32, "sites": 4}


_site_ids = st.text("0123456789abcdef", min_size=32, max_size=32)


@given(
    st.lists(st.tuples(_site_ids, st.integers(0, MAX_COUNTER), st.integers(0, MAX_COUNTER)), max_size=20),
    st.lists(_site_ids, max_size=20),
)
def test_digests_and_pulls_round_trip(stamps: list[tuple[str, int, int]], site_ids: list[str]) -> None:
    assert wire(Digest(tuple(stamps))) == Digest(tuple(stamps))
    assert wire(Pull(tuple(site_ids))) == Pull(tuple(site_ids))
    assert wire(Summary(digest_hash(stamps), len(stamps))) == Summary(digest_hash(stamps), len(stamps))


def test_digest_hash_is_defined_by_the_stamps() -> None:
    stamps = [("a" * 32, 1, 2), ("b" * 32, 3, 4)]
    assert digest_hash(stamps) == digest_hash(tuple(stamps))
    assert len(digest_hash(stamps)) == 32 and digest_hash(stamps) != digest_hash(stamps[:1])
    assert digest_hash([("a" * 32, 1, 3), ("b" * 32, 3, 4)]) != digest_hash(stamps)


def _raw(message: Any) -> bytes:
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        pytest.param(b"", "not UTF-8 JSON", id="empty"),
        pytest.param(b"[]", "expected an object", id="list"),
        pytest.param(b"x" * (MAX_PAYLOAD + 1), "bytes; the limit is", id="too-big"),
        pytest.param(_raw({"type": "gossip"}), "unknown type 'gossip'", id="unknown-type"),
        pytest.param(_raw({"records": []}), "unknown type 'None'", id="no-type"),
        pytest.param(_raw({"type": 1, "records": []}), "unknown type '1'", id="int-type"),
        pytest.param(_raw({"type": "push", "records": [], "more": 1}), r"unknown keys \['more'\]", id="extra-key"),
        pytest.param(_raw({"type": "pull"}), r"lacks \['site_ids'\]", id="missing-key"),
        pytest.param(_raw({"type": "push", "records": {}}), "records must be a list", id="records-object"),
        pytest.param(_raw({"type": "push", "records": [{}] * (MAX_RECORDS + 1)}), "4097 entries", id="many-records"),
        pytest.param(_raw({"type": "digest", "stamps": [["a", 1]]}), r"stamps\[0\] is not", id="short-stamp"),
        pytest.param(_raw({"type": "digest", "stamps": [["a", 1, True]]}), r"stamps\[0\]", id="bool-version"),
        pytest.param(_raw({"type": "digest", "stamps": [["a", 1, 2**53]]}), r"stamps\[0\]", id="absurd-version"),
        pytest.param(_raw({"type": "digest", "stamps": [["", 1, 1]]}), r"stamps\[0\]", id="empty-id"),
        pytest.param(_raw({"type": "digest", "stamps": [["a", -1, 1]]}), r"stamps\[0\]", id="negative"),
        pytest.param(_raw({"type": "pull", "site_ids": ["a", 2]}), r"site_ids\[1\] is not", id="int-id"),
        pytest.param(_raw({"type": "pull", "site_ids": ["a" * 256]}), r"site_ids\[0\]", id="long-id"),
        pytest.param(_raw({"type": "summary", "hash": "AB" * 16, "sites": 1}), "hash must be", id="upper-hash"),
        pytest.param(_raw({"type": "summary", "hash": "ab", "sites": 1}), "hash must be", id="short-hash"),
        pytest.param(_raw({"type": "summary", "hash": "ab" * 16, "sites": -1}), "sites must be", id="neg-sites"),
    ],
)
def test_decode_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match="^malformed gossip message: .*" + why):
        decode_message_untrusted(data)


def test_bad_records_in_a_push_cost_themselves_only(ids: list[pki.Identity]) -> None:
    """An unknown field, an absurd version, an oversized body: refused with a reason; the rest decodes."""
    good = signed(ids[0])
    unknown = {**record_to_json(signed(ids[1])), "future": True}
    absurd = {**record_to_json(signed(ids[2])), "version": 2**53}
    huge = {**record_to_json(signed(ids[3])), "services": [{"routing_key": f"k{i}" + "x" * 250} for i in range(2500)]}
    data = _raw({"type": "push", "records": [unknown, record_to_json(good), absurd, huge, 7]})
    message = decode_message_untrusted(data)
    assert isinstance(message, Push)
    assert message.records == (good,)
    assert len(message.rejected) == 4
    unknown_why, absurd_why, huge_why, int_why = message.rejected
    assert unknown_why == f"record of site {ids[1].site_id!r} refused: unknown field 'future' @ $.records[0]"
    assert absurd_why.startswith(f"record of site {ids[2].site_id!r} refused: version must be in [0, {MAX_COUNTER}]")
    assert "bytes; the limit is 524288 @ $.records[3]" in huge_why
    assert int_why == "record of #4 refused: expected an object, got integer @ $.records[4]"


def _json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )


@given(st.sampled_from(["push", "digest", "pull", "summary", "x"]), st.sampled_from(["records", "stamps", "site_ids", "hash", "sites"]), _json_values())
def test_decode_raises_only_protocol_error(kind: str, key: str, value: Any) -> None:
    for data in (_raw({"type": kind, key: value}), _raw(value)):
        try:
            message = decode_message_untrusted(data)
        except ProtocolError as error:
            assert str(error).startswith("malformed gossip message: ")
        else:
            assert isinstance(message, (Push, Digest, Pull, Summary))


@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    try:
        decode_message_untrusted(data)
    except ProtocolError:
        pass


def test_encode_refuses_what_a_peer_would_refuse(ids: list[pki.Identity]) -> None:
    with pytest.raises(ValueError, match="entries; the limit is"):
        encode_message(Pull(("a" * 32,) * (MAX_RECORDS + 1)))
    with pytest.raises(ValueError, match="bytes; the limit is"):
        encode_message(Pull(("a" * 255,) * 4096))
    with pytest.raises(TypeError):
        encode_message("push")  # type: ignore[arg-type]


# -- the engine's rules ------------------------------------------------------------------


def test_publish_signs_a_new_version_and_pushes_it_to_every_neighbour(ids: list[pki.Identity]) -> None:
    a, b, c = (identity.site_id for identity in ids[:3])
    engine = new_engine(ids[0])
    assert engine.record.version == 0 and verify_record(engine.record)
    engine.link_up(b, 0.0)
    engine.link_up(c, 0.0)
    services = [ServiceInfo("web", port=80), ServiceInfo("db", port=5432)]
    outbox = engine.publish(1.0, links=[LinkInfo(c, 1), LinkInfo(b, 1)], services=services)
    assert [(peer, type(m)) for peer, m in outbox] == [(b, Push), (c, Push)]
    record = engine.record
    assert record.stamp == (1, 1) and verify_record(record)
    assert [s.routing_key for s in record.services] == ["db", "web"]  # kept sorted
    assert outbox[0][1] == Push((record,))
    assert engine.table.get(a) == record
    # The same content in another order is no change: no version, nothing sent.
    assert engine.publish(2.0, links=[LinkInfo(b, 1), LinkInfo(c, 1)], services=services[::-1]) == []
    assert engine.publish(2.0, name="renamed")[0][1].records[0].stamp == (1, 2)


def test_the_lower_end_of_a_new_link_sends_its_digest(ids: list[pki.Identity]) -> None:
    low, high = new_engine(ids[0]), new_engine(ids[1])
    [(peer, digest)] = low.link_up(ids[1].site_id, 0.0)
    assert peer == ids[1].site_id and digest == Digest(((ids[0].site_id, 1, 0),))
    assert high.link_up(ids[0].site_id, 0.0) == []
    # The digest alone levels both tables: pushes one way, a pull the other.
    flow({ids[0].site_id: low, ids[1].site_id: high}, [(peer, digest)], ids[0].site_id)
    assert low.table.digest() == high.table.digest() == {ids[0].site_id: (1, 0), ids[1].site_id: (1, 0)}


def test_a_line_of_three_levels_and_sees_everyone_present(ids: list[pki.Identity]) -> None:
    a, b, c = (identity.site_id for identity in ids[:3])
    engines = {identity.site_id: new_engine(identity) for identity in ids[:3]}
    linked(engines, a, b)
    linked(engines, b, c)
    flow(engines, engines[c].publish(0.0, services=[ServiceInfo("db")]), c)
    for engine in engines.values():
        assert engine.table.digest() == {a: (1, 1), b: (1, 2), c: (1, 2)}
        assert engine.reachable() == {a, b, c}
        assert engine.catalog() == {"db": {c}}


def test_a_link_only_one_end_advertises_does_not_count(ids: list[pki.Identity]) -> None:
    a, b = ids[0].site_id, ids[1].site_id
    engine = new_engine(ids[0])
    engine.link_up(b, 0.0)
    engine.publish(0.0, links=[LinkInfo(b, 1)])
    engine.receive(b, Push((signed(ids[1], services=(ServiceInfo("db"),)),)), 0.0)  # b does not list a
    assert engine.reachable() == {a} and b not in engine.reachable() and engine.catalog() == {}
    engine.receive(b, Push((signed(ids[1], 1, 2, links=(LinkInfo(a, 1),), services=(ServiceInfo("db"),)),)), 1.0)
    assert b in engine.reachable() and engine.catalog() == {"db": {b}}


def test_new_records_are_forwarded_once_and_not_back(ids: list[pki.Identity]) -> None:
    a, b, c, d = (identity.site_id for identity in ids[:4])
    engine = new_engine(ids[0])
    for peer in (b, c):
        engine.link_up(peer, 0.0)
    engine.publish(0.0, links=[LinkInfo(b, 1), LinkInfo(c, 1)])
    rb = signed(ids[1], links=(LinkInfo(a, 1), LinkInfo(d, 1)))
    rd = signed(ids[3], links=(LinkInfo(b, 1),))
    out = engine.receive(b, Push((rb, rd)), 1.0)
    assert out == [(c, Push((rb, rd)))]  # sorted by site id; not back to b; b's own record not to b either
    assert engine.receive(b, Push((rb, rd)), 1.0) == []  # seen: not again
    assert engine.receive(c, Push((rb,)), 1.0) == []


def test_forged_and_altered_records_are_dropped_and_reported(ids: list[pki.Identity]) -> None:
    b, m = ids[1].site_id, ids[5].site_id
    reports: list[Rejection] = []
    engine = new_engine(ids[0], on_reject=reports.append)
    for peer in (b, m):
        engine.link_up(peer, 0.0)
    real = signed(ids[1], 1, 1, services=(ServiceInfo("db"),))
    engine.receive(b, Push((real,)), 0.0)
    # m claims b's id with its own key, and alters b's real record.
    claim = signed(ids[5], 1, 5, services=(ServiceInfo("db"), ServiceInfo("steal")))
    claim = attrs.evolve(claim, site_id=b)
    claim = attrs.evolve(claim, signature=base64.b64encode(pki.sign(ids[5], signing_bytes(claim))).decode())
    altered = attrs.evolve(real, version=6, services=(ServiceInfo("db", port=1),))
    unsigned = attrs.evolve(real, version=7, signature="", public_key="")
    for bad in (claim, altered, unsigned):
        assert engine.receive(m, Push((bad,)), 1.0) == []  # not forwarded anywhere
    assert engine.table.get(b) == real
    assert [(r.peer, r.site_id) for r in reports] == [(m, b)] * 3
    assert reports[0].reason == f"record of site {b} refused: it is signed by the key of site {m}, not of site {b}"
    assert "forged or altered" in reports[1].reason and "not signed" in reports[2].reason
    # Older or duplicate records are not even verified: they cost nothing.
    assert engine.receive(m, Push((attrs.evolve(claim, version=1),)), 1.0) == [] and len(reports) == 3


def test_decoder_rejections_are_reported(ids: list[pki.Identity]) -> None:
    reports: list[Rejection] = []
    engine = new_engine(ids[0], on_reject=reports.append)
    engine.receive(ids[1].site_id, Push((), rejected=("record of #0 refused: nope",)), 0.0)
    assert reports == [Rejection(ids[1].site_id, None, "record of #0 refused: nope")]


def test_own_record_is_authoritative_and_outranks_an_echo(ids: list[pki.Identity]) -> None:
    """A restart that lost the incarnation counter: the network still holds (1, 3); we publish (1, 1)."""
    a, b = ids[0].site_id, ids[1].site_id
    before = new_engine(ids[0])
    for version in range(3):
        before.publish(0.0, services=[ServiceInfo(f"old-{version}")])
    echo = before.record
    assert echo.stamp == (1, 3)

    reports: list[Rejection] = []
    engine = new_engine(ids[0], on_reject=reports.append, now=10.0)
    engine.link_up(b, 10.0)
    engine.publish(10.0, links=[LinkInfo(b, 1)], services=[ServiceInfo("new")])
    assert engine.record.stamp == (1, 1)
    out = engine.receive(b, Push((echo,)), 11.0)
    mine = engine.record
    assert mine.stamp == (1, 4) and [s.routing_key for s in mine.services] == ["new"] and verify_record(mine)
    assert out == [(b, Push((mine,)))]
    assert engine.table.get(a) == mine
    assert reports[0].site_id == a and "above ours at 1.1" in reports[0].reason
    # An older echo, or our own record seen again, changes nothing.
    assert engine.receive(b, Push((echo,)), 30.0) == [] and engine.receive(b, Push((mine,)), 30.0) == []
    # An echo from a later incarnation is outranked too, by incarnation.
    later = signed(ids[0], 4, 2)
    engine.receive(b, Push((later,)), 40.0)
    assert engine.record.stamp == (4, 3)
    # Equal stamp, other content (a restart that reused both counters): outranked.
    twin = attrs.evolve(engine.record, name="twin")
    twin = sign_record(twin, ids[0])
    engine.receive(b, Push((twin,)), 50.0)
    assert engine.record.stamp == (4, 4) and engine.record.name == ids[0].name


def test_a_digest_showing_a_newer_record_of_ours_makes_us_fetch_it(ids: list[pki.Identity]) -> None:
    a, b = ids[0].site_id, ids[1].site_id
    engine = new_engine(ids[0])
    out = engine.receive(b, Digest(((a, 1, 9), (b, 1, 1))), 0.0)
    assert out == [(b, Pull((a, b)))]  # and ours is not pushed: theirs is "newer"


def test_outranking_is_held_to_once_per_interval(ids: list[pki.Identity]) -> None:
    """Two processes with one identity would outrank each other without end: at most once per interval."""
    b = ids[1].site_id
    one, two = new_engine(ids[0]), new_engine(ids[0])
    for engine in (one, two):
        engine.link_up(b, 0.0)
    now, outranks = 0.0, 0
    for _ in range(20):
        for this, other in ((one, two), (two, one)):
            before = this.record.stamp
            this.receive(b, Push((other.record,)), now)
            outranks += this.record.stamp != before
        now += 0.1
    assert outranks == 2  # one each, in 2 s
    # The one held back happens at its deadline.
    held = two if two.record.stamp < one.record.stamp else one
    deadline = held.next_deadline()
    assert deadline == pytest.approx(INTERVAL)
    before = held.record.stamp
    held.tick(deadline)
    assert held.record.stamp > before


def test_a_site_behind_on_its_own_record_is_shown_ours(ids: list[pki.Identity]) -> None:
    b = ids[1].site_id
    engine = new_engine(ids[0])
    engine.link_up(b, 0.0)
    held = signed(ids[1], 1, 3)
    engine.receive(b, Push((held,)), 0.0)
    assert engine.receive(b, Push((signed(ids[1], 1, 1),)), 1.0) == [(b, Push((held,)))]
    assert engine.receive(b, Push((held,)), 1.0) == []  # the same record: nothing to say
    # From anyone else, an old record is just old.
    assert engine.receive(ids[2].site_id, Push((signed(ids[1], 1, 1),)), 1.0) == []


def test_anti_entropy_rounds_take_neighbours_in_turn(ids: list[pki.Identity]) -> None:
    engine = new_engine(ids[0], anti_entropy_interval=5.0)
    assert engine.next_deadline() == math.inf and engine.tick(100.0) == []
    peers = [identity.site_id for identity in ids[1:4]]
    for peer in peers:
        engine.link_up(peer, 0.0)
    sent, now = [], 0.0
    for _ in range(6):
        now = engine.next_deadline()
        assert 4.5 <= now - (sent[-1][0] if sent else 0.0) <= 5.5  # jittered by +-10%
        [(peer, message)] = engine.tick(now)
        assert isinstance(message, Summary) and message.sites == 1
        sent.append((now, peer))
    assert [peer for _, peer in sent] == peers * 2
    engine.link_down(peers[0], now)
    engine.link_down(peers[1], now)
    engine.link_down(peers[2], now)
    assert engine.next_deadline() == math.inf


def test_summary_is_answered_only_when_digests_differ(ids: list[pki.Identity]) -> None:
    a, b = ids[0].site_id, ids[1].site_id
    engines = {a: new_engine(ids[0]), b: new_engine(ids[1])}
    linked(engines, a, b)
    [(peer, summary)] = engines[a].tick(engines[a].next_deadline())
    assert peer == b and engines[b].receive(a, wire(summary), 6.0) == []
    engines[b].publish(6.0, services=[ServiceInfo("db")])  # a misses this push
    [(peer, digest)] = engines[b].receive(a, wire(summary), 7.0)
    assert isinstance(digest, Digest)
    [(peer, pull)] = engines[a].receive(b, wire(digest), 7.0)
    assert pull == Pull((b,))
    [(peer, push)] = engines[b].receive(a, wire(pull), 7.0)
    engines[a].receive(b, wire(push), 7.0)
    assert engines[a].catalog() == {"db": {b}}


def test_membership_withdraw_at_once_then_purge(ids: list[pki.Identity]) -> None:
    a, b, c = (identity.site_id for identity in ids[:3])
    engines = {identity.site_id: new_engine(identity, purge_after=60.0) for identity in ids[:3]}
    linked(engines, a, b)
    linked(engines, b, c)
    flow(engines, engines[c].publish(0.0, services=[ServiceInfo("db")]), c)
    engine = engines[a]
    assert engine.catalog() == {"db": {c}} and engine.age(c, 4.0) == 4.0
    # b drops its link to c: at a, c is absent (and its services gone) as soon as b's record arrives.
    engines[b].link_down(c, 10.0)
    flow(engines, engines[b].publish(10.0, links=[LinkInfo(a, 1)]), b, 10.0)
    assert c not in engine.reachable() and engine.catalog() == {} and c in engine.table
    assert engine.age(c, 25.0) == 15.0  # since it became unreachable
    [row] = [row for row in engine.status(25.0) if row.site_id == c]
    assert (row.present, row.age, row.purge_in) == (False, 15.0, 45.0)
    assert [row.present for row in engine.status(25.0) if row.site_id != c] == [True, True]
    assert engine.next_deadline() <= 70.0
    generation = engine.generation
    engine.tick(69.9)
    assert c in engine.table
    engine.tick(70.0)
    assert c not in engine.table and engine.age(c, 70.0) is None and engine.generation > generation
    # It comes back when b links to it again. b had not purged c (its timer is
    # not due): c's record is not new to b, so it is not pushed on; a, which
    # purged it, gets it back from its next anti-entropy round.
    engines[b].link_up(c, 80.0)
    flow(engines, engines[b].publish(80.0, links=[LinkInfo(a, 1), LinkInfo(c, 1)]), b, 80.0)
    assert c not in engine.reachable()
    flow(engines, engine.tick(engine.next_deadline()), a, 81.0)
    assert c in engine.reachable() and engine.catalog() == {"db": {c}} and engine.age(c, 90.0) == 9.0


def test_absent_sites_are_not_gossiped(ids: list[pki.Identity]) -> None:
    """What makes a purge stick: a neighbour that still holds an absent site does not hand it back."""
    a, b, x = ids[0].site_id, ids[1].site_id, ids[4].site_id
    engine = new_engine(ids[0])
    engine.link_up(b, 0.0)
    engine.publish(0.0, links=[LinkInfo(b, 1)])
    engine.receive(b, Push((signed(ids[1], links=(LinkInfo(a, 1),)), signed(ids[4]))), 0.0)  # x: no links
    assert x not in engine.reachable()
    assert x not in {site for site, _, _ in engine._stamps_for(b)}
    assert engine.receive(b, Digest(()), 1.0) == [(b, Push((engine.record, engine.table.get(b))))]
    # Asked for it by name (a digest listed it), it is given.
    assert engine.receive(b, Pull((x,)), 1.0) == [(b, Push((engine.table.get(x),)))]


def test_pushes_are_split_to_fit_frames(ids: list[pki.Identity]) -> None:
    big = tuple(ServiceInfo(f"service-{i:04d}", protocol="x" * 180) for i in range(1800))  # ~400 KB a record
    records = [signed(identity, services=big) for identity in ids[1:5]]
    engine = new_engine(ids[0])
    for record in records:
        engine.receive(ids[1].site_id, Push((record,)), 0.0)
    out = engine.receive(ids[1].site_id, Pull(tuple(r.site_id for r in records)), 0.0)
    assert len(out) >= 2
    assert [r for _, push in out for r in wire(push).records] == records
    assert all(len(encode_message(push)) <= MAX_PAYLOAD for _, push in out)


def test_engine_refuses_a_signer_that_does_not_sign_for_it(ids: list[pki.Identity]) -> None:
    own = SiteRecord(site_id=ids[0].site_id, name="x", incarnation=1, version=0, mode="interior")
    with pytest.raises(ValueError, match="did not return a valid signed record"):
        GossipEngine(own, sign=lambda record: record, now=0.0)
    with pytest.raises(ValueError):
        GossipEngine(own, sign=functools.partial(sign_record, identity=ids[0]), now=0.0, anti_entropy_interval=0)


# -- a full table: one member minting sites cannot starve the others ----------------------------

FULL = 24  # max_sites of the engines below: small, so a few dozen minted sites fill every table
FAKES = 96  # sites the attacker mints (4 tables' worth)


@attrs.frozen(repr=False)
class Cast:
    """Who plays in the flood tests. The real sites all run engines; the attacker pushes by hand."""

    hub: pki.Identity
    client: pki.Identity  # linked to the hub, before the flood
    behind: pki.Identity  # linked to the client only
    attacker: pki.Identity  # linked to the hub; mints `fakes`
    newcomer: pki.Identity  # links to the hub after the flood, with its own two sites behind it
    second: pki.Identity  # linked to the newcomer
    third: pki.Identity  # linked to the second: farther from everyone than many fakes
    fakes: tuple[pki.Identity, ...]

    def __repr__(self) -> str:
        return f"<Cast of {len(self.real) + 1} sites and {len(self.fakes)} fakes>"

    @property
    def real(self) -> list[pki.Identity]:
        return [self.hub, self.client, self.behind, self.newcomer, self.second, self.third]


@pytest.fixture(scope="module")
def cast() -> Cast:
    rng = random.Random(19)
    names = ["hub", "client", "behind", "attacker", "newcomer", "second", "third"]
    people = {name: make_identity(name, rng) for name in names}
    fakes = tuple(make_identity(f"fake-{i}", rng) for i in range(2 * FAKES))
    return Cast(**people, fakes=fakes)


def mint(attacker: pki.Identity, fakes: Sequence[pki.Identity], *, fanout: int, hub: str) -> list[SiteRecord]:
    """The attacker's record and one per fake: a tree `fanout` wide under the attacker, each link advertised
    by both ends so that every fake is present, and the attacker's link to the hub."""
    nodes = [attacker, *fakes]
    links: dict[str, set[str]] = {node.site_id: set() for node in nodes}
    links[attacker.site_id].add(hub)
    for index in range(1, len(nodes)):
        above = nodes[(index - 1) // fanout].site_id
        links[above].add(nodes[index].site_id)
        links[nodes[index].site_id].add(above)
    return [signed(node, links=tuple(LinkInfo(peer, 1) for peer in sorted(links[node.site_id]))) for node in nodes]


@attrs.define
class Flood:
    cast: Cast
    engines: dict[str, GossipEngine]
    records: list[SiteRecord]  # the attacker's and the fakes'
    reports: dict[str, list[Rejection]]
    now: float = 1.0

    @property
    def hub(self) -> GossipEngine:
        return self.engines[self.cast.hub.site_id]

    def push(self, records: Sequence[SiteRecord], batch: int) -> None:
        """The attacker pushes `records` to the hub, `batch` a push; everything that follows flows."""
        hub, attacker = self.cast.hub.site_id, self.cast.attacker.site_id
        for start in range(0, len(records), batch):
            out = self.hub.receive(attacker, Push(tuple(records[start : start + batch])), self.now)
            flow(self.engines, out, hub, self.now)
            self.check_bounded()

    def join(self, *, publish_late: bool = False, **options: Any) -> None:
        """The newcomer, with the second and third behind it and services on them, links to the hub.

        With `publish_late`, each end's records cross before either publishes the link, so what the
        newcomer sends first would be absent at the hub: anti-entropy must bring it later.
        """
        cast, engines = self.cast, self.engines
        for identity in (cast.newcomer, cast.second, cast.third):
            engines[identity.site_id] = self.engine(identity)
        engines[cast.newcomer.site_id].publish(self.now, services=[ServiceInfo("web", port=80)])
        engines[cast.third.site_id].publish(self.now, services=[ServiceInfo("db", port=5432)])
        link(engines, cast.third.site_id, cast.second.site_id, self.now)
        link(engines, cast.second.site_id, cast.newcomer.site_id, self.now)
        (linked if publish_late else link)(engines, cast.newcomer.site_id, cast.hub.site_id, self.now, **options)
        self.check_bounded()

    def engine(self, identity: pki.Identity) -> GossipEngine:
        reports = self.reports.setdefault(identity.site_id, [])
        return new_engine(identity, now=self.now, max_sites=FULL, on_reject=reports.append)

    def check_bounded(self) -> None:
        for engine in self.engines.values():
            assert len(engine.table) <= FULL + len(engine.neighbours), engine

    def unharmed(self) -> None:
        """Every real site sees every real site present, and the services of those that have joined."""
        real = [identity.site_id for identity in self.cast.real if identity.site_id in self.engines]
        for site_id in real:
            engine = self.engines[site_id]
            missing = [other[:8] for other in real if other not in engine.reachable()]
            assert not missing, (engine, missing)
            if self.cast.newcomer.site_id in self.engines:
                assert engine.catalog() == {"web": {self.cast.newcomer.site_id}, "db": {self.cast.third.site_id}}

    def tables(self) -> dict[str, tuple[int, dict]]:
        return {site_id: (engine.generation, engine.table.digest()) for site_id, engine in self.engines.items()}

    def settle(self, step: Callable[[], None], limit: int) -> int:
        """Do `step` (a wave of the flood, a few rounds of anti-entropy) until one changes no table;
        returns how many did (at most `limit`). Only fakes ever come and go."""
        fakes = {record.site_id for record in self.records}
        for changes in range(limit + 1):
            before = self.tables()
            step()
            self.unharmed()
            after = self.tables()
            if after == before:
                return changes
            for site_id, (_, held) in after.items():
                assert set(held) ^ set(before[site_id][1]) <= fakes
        raise AssertionError(f"still changing after {limit + 1} steps")

    def wave(self, records: Sequence[SiteRecord], batch: int) -> Callable[[], None]:
        def step() -> None:
            self.now += 1.0
            self.push(records, batch)

        return step

    def rounds(self) -> None:
        self.now = run_timers(self.engines, self.now, 2 * INTERVAL)


def cast_linked(cast: Cast, *, fakes: int, fanout: int) -> Flood:
    """The hub, the client and the site behind it linked, the attacker linked to the hub; its fakes minted."""
    attack = Flood(cast, {}, mint(cast.attacker, cast.fakes[:fakes], fanout=fanout, hub=cast.hub.site_id), {})
    for identity in (cast.hub, cast.client, cast.behind):
        attack.engines[identity.site_id] = attack.engine(identity)
    linked(attack.engines, cast.client.site_id, cast.hub.site_id)
    linked(attack.engines, cast.behind.site_id, cast.client.site_id)
    linked(attack.engines, cast.attacker.site_id, cast.hub.site_id)
    return attack


def flooded(cast: Cast, *, fakes: int = FAKES, fanout: int = 3, batch: int = 10) -> Flood:
    """`cast_linked`, then the flood."""
    attack = cast_linked(cast, fakes=fakes, fanout=fanout)
    attack.push(attack.records, batch)
    return attack


def test_a_flood_fills_every_table_but_evicts_no_real_site(cast: Cast) -> None:
    attack = flooded(cast)
    attack.unharmed()
    fakes = {record.site_id for record in attack.records}
    for engine in attack.engines.values():
        assert len(engine.table) >= FULL and len(fakes & set(engine.table.digest())) >= FULL - 4
    # The hub says so in one line with counts, not a line per record.
    [report] = attack.reports[cast.hub.site_id]
    assert report.peer == cast.attacker.site_id and report.site_id is None
    assert f"this site holds {FULL + 2} sites (its limit is {FULL} besides its neighbours')" in report.reason
    assert f"the most, {FULL - 2}, are behind neighbour {cast.attacker.site_id[:8]}" in report.reason


def test_a_site_linking_to_a_flooded_hub_is_known_at_once_everywhere_with_the_sites_behind_it(cast: Cast) -> None:
    """The newcomer's record is kept by the hub (a neighbour's always is); its branch is smaller than the
    attacker's wherever they part, so it and the sites behind it, even those farther than many fakes,
    take slots from fakes at every site."""
    attack = flooded(cast, fanout=3)
    attack.join()
    attack.unharmed()
    behind = attack.engines[cast.behind.site_id]
    assert behind.age(cast.third.site_id, attack.now) == 0.0  # pushed: no anti-entropy round needed
    # From there the third site is 5 hops away (client, hub, newcomer, second, third); the attacker's
    # first three fakes are 4 (client, hub, attacker, fake), and stay: fakes went, not by distance.
    assert all(fake.site_id in behind.table for fake in cast.fakes[:3])


def test_anti_entropy_repairs_a_lost_push_of_a_newcomer_and_then_asks_for_nothing(cast: Cast) -> None:
    client, hub = cast.client.site_id, cast.hub.site_id
    attack = flooded(cast)
    attack.join(lost=lambda src, dst: (src, dst) == (hub, client))
    assert cast.newcomer.site_id not in attack.engines[client].reachable()
    now = run_timers(attack.engines, attack.now, 3 * INTERVAL)
    attack.unharmed()
    # Settled: the client and the hub hold different fakes (each refused some the other holds), yet once
    # an exchange has found nothing either would take, they only swap summaries, as at rest.
    assert attack.engines[client].table.digest().keys() != attack.hub.table.digest().keys()
    sent: Sent = []
    before = attack.tables()
    now = run_timers(attack.engines, now, 6 * INTERVAL, sent=sent)
    assert {type(message) for _, _, message in sent} == {Summary}
    assert attack.tables() == before
    # A change ends the quiet at once: one the client missed is repaired by the next rounds.
    third = attack.engines[cast.third.site_id]
    flow(attack.engines, third.publish(now, services=[ServiceInfo("db", port=5433)]), cast.third.site_id, now,
         lost=lambda src, dst: (src, dst) == (hub, client))
    assert attack.engines[client].table.get(cast.third.site_id) != third.record
    run_timers(attack.engines, now, 3 * INTERVAL)
    assert attack.engines[client].table.get(cast.third.site_id) == third.record


def test_only_an_answer_to_our_digest_of_refused_records_quiets_anti_entropy(cast: Cast) -> None:
    """Two full sites that hold what the other refused stop swapping digests; a push refused at any
    other time says nothing about what the peer would answer, so the next round still asks."""
    hub, peer = new_engine(cast.hub, max_sites=2), cast.client.site_id
    hub.link_up(peer, 0.0)
    hub.publish(0.0, links=[LinkInfo(peer, 1)])
    hub.receive(peer, Push((signed(cast.client, links=(LinkInfo(cast.hub.site_id, 1),)), signed(cast.fakes[0]))), 0.0)
    theirs = Summary("ab" * 16, 3)
    [(_, digest)] = hub.receive(peer, theirs, 1.0)
    assert isinstance(digest, Digest)
    # Its answer: only a record the full table refuses (it would be absent). Quiet from now on.
    hub.receive(peer, Push((signed(cast.fakes[1]),)), 1.0)
    assert hub.receive(peer, theirs, 2.0) == []
    # We change: the next summary is answered; a refused push before its answer does not quiet it.
    hub.publish(3.0, services=[ServiceInfo("web")])
    hub.receive(peer, Push((signed(cast.fakes[2]),)), 3.0)
    [(_, digest)] = hub.receive(peer, theirs, 4.0)
    assert isinstance(digest, Digest)


@pytest.mark.parametrize("batch", [1, 7, FAKES + 1])
def test_the_same_flood_again_moves_only_fakes_and_settles(cast: Cast, batch: int) -> None:
    """Each swap makes the attacker's branch more even where two of its sub-branches part, so a repeated
    flood can move fakes for fakes a few times, never anything else, and then changes nothing."""
    attack = flooded(cast, batch=batch)
    attack.join()
    assert attack.settle(attack.wave(attack.records[::-1], batch), limit=2) <= 2


def test_a_neighbours_record_is_kept_over_the_limit_until_its_link_goes(cast: Cast) -> None:
    attack = flooded(cast)
    hub = attack.hub
    attack.join()
    assert len(hub.table) == FULL + 3 and cast.newcomer.site_id in hub.reachable()  # client, attacker, newcomer
    attack.push(attack.records, 5)
    assert cast.newcomer.site_id in hub.reachable()
    # The link goes: the newcomer's record competes like any other now, and the table is back under its limit.
    hub.link_down(cast.newcomer.site_id, 3.0)
    assert len(hub.table) == FULL + 2 and hub.table.get(cast.newcomer.site_id) is not None


def test_what_could_not_be_present_is_refused_when_full_and_reported_as_counts(cast: Cast) -> None:
    """Records no present site links to (they would be absent) are refused once the table is full,
    one push at a time: one report at once, then one per logs.LINE_INTERVAL with the count."""
    reports: list[Rejection] = []
    engine = new_engine(cast.hub, max_sites=3, on_reject=reports.append)
    peer = cast.client.site_id
    engine.link_up(peer, 0.0)
    engine.receive(peer, Push((signed(cast.fakes[0]), signed(cast.fakes[1]))), 0.0)
    assert len(engine.table) == 3
    step = LINE_INTERVAL / 20
    for index, fake in enumerate(cast.fakes[2:40]):  # one record a push, 20 to an interval, for 2 intervals
        engine.receive(peer, Push((signed(fake),)), index * step)
    assert len(engine.table) == 3 and len(reports) == 2
    assert "1 record(s) of new sites refused and 0 evicted" in reports[0].reason
    assert "20 record(s) of new sites refused" in reports[1].reason  # an interval on, those since
    assert all(report.peer == peer for report in reports)
    # The rest is reported when due, by the timer.
    engine.link_down(peer, 38 * step)  # no anti-entropy rounds: the report alone sets the deadline
    assert engine.next_deadline() == 2 * LINE_INTERVAL
    engine.tick(2 * LINE_INTERVAL)
    assert len(reports) == 3 and "17 record(s) of new sites refused" in reports[2].reason
    assert engine.next_deadline() == PURGE  # the absent records' purge: nothing left to report
    now = 2 * LINE_INTERVAL
    engine.link_up(peer, now)
    # Known sites still update, and a neighbour's record is always taken.
    assert engine.receive(peer, Push((signed(cast.fakes[0], 1, 2),)), now) == []
    assert engine.table.get(cast.fakes[0].site_id).version == 2
    engine.receive(peer, Push((signed(cast.client),)), now)
    assert len(engine.table) == 4


@settings(max_examples=40, deadline=None)
@given(
    fanout=st.integers(1, 6),
    fakes=st.integers(FULL, 2 * FAKES),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    join_first=st.booleans(),
    publish_late=st.booleans(),
)
def test_any_flood_from_one_member_leaves_the_others_unharmed(
    cast: Cast, fanout: int, fakes: int, batch: int, seed: int, join_first: bool, publish_late: bool
) -> None:
    """Fakes in a tree of any width (1: a chain, deeper than BRANCH_DEPTH), pushed in any order and
    batches, before or after the newcomer joins: tables stay bounded, every real site sees every
    other after a round or two, and the same flood again moves only fakes, and settles."""
    attack = cast_linked(cast, fakes=fakes, fanout=fanout)
    records = list(attack.records)
    random.Random(seed).shuffle(records)
    if join_first:
        attack.join(publish_late=publish_late)
    attack.push(records, batch)
    if not join_first:
        attack.join(publish_late=publish_late)
    attack.now = run_timers(attack.engines, attack.now, 4 * INTERVAL)  # each site's rounds take its links in turn
    attack.unharmed()
    # Waves of the same flood, and anti-entropy between sites holding different fakes, can fill in
    # parts of the flood that were absent (pieces of a chain whose links came later) and even out
    # the attacker's branch: each change is for good, so they stop.
    attack.settle(attack.wave(records[::-1], batch), limit=len(records))
    attack.settle(attack.rounds, limit=len(records))


def test_a_full_size_flood_is_refused_cheaply(cast: Cast) -> None:
    """4,100 minted sites against tables of the real size: what cannot get in costs microseconds a record."""
    rng = random.Random(4100)
    fakes = [make_identity(f"fake-{i}", rng) for i in range(4100)]
    hub_id, attacker = cast.hub.site_id, cast.attacker.site_id
    records = mint(cast.attacker, fakes, fanout=64, hub=hub_id)
    hub = new_engine(cast.hub)
    hub.link_up(attacker, 0.0)
    hub.publish(0.0, links=[LinkInfo(attacker, 1)])
    pushes = [Push(tuple(records[i : i + 1000])) for i in range(0, len(records), 1000)]
    started = time.perf_counter()
    for push in pushes:
        hub.receive(attacker, push, 1.0)
    filled = time.perf_counter() - started
    assert len(hub.table) == MAX_SITES + 1  # and the attacker's, a neighbour's
    held = hub.table.digest()
    started = time.perf_counter()
    for push in pushes:
        assert hub.receive(attacker, push, 2.0) == []
    again = time.perf_counter() - started
    assert hub.table.digest() == held
    print(f"flood of {len(records)} at a table of {MAX_SITES}: {filled:.3f} s to fill, {again:.3f} s refused again")
    assert again < 0.5  # ~0.03 s measured: no signature checked, no walk of the table per record
    # A new neighbour, and a site behind it, still get in.
    newcomer, second = cast.newcomer, cast.second
    hub.link_up(newcomer.site_id, 3.0)
    hub.publish(3.0, links=[LinkInfo(attacker, 1), LinkInfo(newcomer.site_id, 1)])
    behind = signed(second, links=(LinkInfo(newcomer.site_id, 1),))
    links = (LinkInfo(hub_id, 1), LinkInfo(second.site_id, 1))
    hub.receive(newcomer.site_id, Push((signed(newcomer, links=links), behind)), 3.0)
    assert newcomer.site_id in hub.reachable() and second.site_id in hub.reachable()
    assert len(hub.table) == MAX_SITES + 2


# -- simulated networks --------------------------------------------------------------------


def network(size: int, *, seed: int, topology: str = "mesh", **options: Any) -> tuple[Simulation, list[SimSite]]:
    """`size` sites linked at t=0 and settled (or not, under loss: the caller waits)."""
    sim = Simulation(seed=seed, **options)
    sites = [sim.add_site(f"site-{i:02d}") for i in range(size)]
    edges = {"mesh": lambda: random_mesh(sites, sim.rng), "line": lambda: line(sites), "star": lambda: star(sites)}
    sim.connect(edges[topology]())
    return sim, sites


def settled(sim: Simulation) -> Callable[[], bool]:
    """Converged, and every site of a component sees the same catalog."""

    def check() -> bool:
        if not sim.converged():
            return False
        for group in sim.components():
            catalogs = [sim.sites[site_id].engine.catalog() for site_id in group]
            if any(catalog != catalogs[0] for catalog in catalogs):
                return False
        return True

    return check


def test_fifty_sites_converge_after_a_change() -> None:
    sim, sites = network(50, seed=1)
    assert sim.run_until(settled(sim), PROPAGATION)
    start = sim.now
    sim.set_service(sites[17], "db")
    assert sim.run_until(settled(sim), PROPAGATION)
    assert sim.now - start < 0.1  # pushed hop by hop at ~1 ms: no anti-entropy round needed
    for site in sites:
        assert site.engine.catalog() == {"db": {sites[17].site_id}}
        assert sites[17].site_id in compute_routes(site.site_id, site.engine.table.records) or site is sites[17]
    assert sim.rejections() == [] and all(not site.protocol_errors for site in sites)


def test_fifty_sites_converge_with_a_fifth_of_messages_lost() -> None:
    sim, sites = network(50, seed=2, drop=0.2)
    assert sim.run_until(settled(sim), 10 * INTERVAL, check_every=0.1)
    start = sim.now
    sim.set_service(sites[3], "db")
    sim.set_service(sites[40], "db")
    sim.set_service(sites[40], "web")
    assert sim.run_until(settled(sim), 10 * INTERVAL, check_every=0.1), "not converged within 10 rounds"
    assert sim.dropped > 0
    assert sites[0].engine.catalog() == {"db": {sites[3].site_id, sites[40].site_id}, "web": {sites[40].site_id}}
    print(f"converged {sim.now - start:.1f} s after the change, {sim.dropped} of {sim.dropped + sim.delivered} lost")


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    drop=st.floats(0.0, 0.2),
    fifo=st.booleans(),
    topology=st.sampled_from(["mesh", "line", "star"]),
)
def test_any_losses_and_orders_converge(seed: int, drop: float, fifo: bool, topology: str) -> None:
    sim, sites = network(12, seed=seed, drop=drop, fifo=fifo, jitter=0.001, topology=topology)
    assert sim.run_until(settled(sim), 10 * INTERVAL, check_every=0.1)
    rng = random.Random(seed)
    for key in ("a", "b", "c"):
        sim.set_service(rng.choice(sites), key)
    sim.set_service(rng.choice(sites), "a", connectors=0)
    assert sim.run_until(settled(sim), 10 * INTERVAL, check_every=0.1)


def test_partition_withdraws_at_once_purges_later_and_heals() -> None:
    """Two random meshes of 15 joined by three links; the three are cut, then one comes back."""
    sim = Simulation(seed=3)
    sites = [sim.add_site(f"site-{i:02d}") for i in range(30)]
    left, right = sites[:15], sites[15:]
    bridges = [(left[0], right[0]), (left[5], right[7]), (left[11], right[3])]
    sim.connect(random_mesh(left, sim.rng) + random_mesh(right, sim.rng) + bridges)
    for site in sites:
        sim.set_service(site, f"svc-{site.name}")
    assert sim.run_until(settled(sim), PROPAGATION)
    assert len(sites[0].engine.catalog()) == 30

    cut_at = sim.now
    for a, b in bridges:
        sim.cut(a, b)
    side = {site.site_id: site in left for site in sites}

    def withdrawn() -> bool:
        """Each side's catalog has lost the other side's services."""
        for site in sites:
            providers = set().union(*site.engine.catalog().values())
            if any(side[p] != side[site.site_id] for p in providers):
                return False
        return True

    assert sim.run_until(withdrawn, PROPAGATION)
    assert sim.now - cut_at < 0.1  # at once: as fast as the cut links' records spread
    assert all(len(site.engine.catalog()) == 15 for site in sites)
    assert all(len(site.engine.table) == 30 for site in sites)  # the records themselves are kept for now
    sim.run_for(PURGE - (sim.now - cut_at) - 1.0)
    assert all(len(site.engine.table) == 30 for site in sites)  # ... until purge_after
    sim.run_for(2.0 + PROPAGATION)
    assert sim.converged()  # each side holds exactly its own side's records
    sim.run_for(3 * INTERVAL)
    assert sim.converged()  # and the purge sticks

    heal_at = sim.now
    sim.link(*bridges[1])
    assert sim.run_until(settled(sim), PROPAGATION)
    assert sim.now - heal_at < 0.2
    assert all(len(site.engine.catalog()) == 30 for site in sites)


def test_a_restarted_site_replaces_its_services_at_once() -> None:
    sim, sites = network(40, seed=4)
    site = sites[11]
    sim.set_service(site, "old")
    assert sim.run_until(settled(sim), PROPAGATION)
    old_stamp = site.engine.record.stamp
    sim.stop(site)
    sim.run_for(2.0)
    assert all("old" not in s.engine.catalog() for s in sim.sites.values())  # withdrawn while it is down
    restart_at = sim.now
    sim.restart(site, services={"new": ServiceInfo("new", port=9000)}, neighbours=[sites[0], sites[30]])
    assert site.engine.record.incarnation == old_stamp[0] + 1
    assert sim.run_until(settled(sim), PROPAGATION)
    assert sim.now - restart_at < 0.2
    assert site.engine.record.stamp < (old_stamp[0] + 1, 5)  # versions started again from 0
    for other in sim.sites.values():
        assert other.engine.catalog() == {"new": {site.site_id}}
        assert other.engine.table.get(site.site_id).stamp == site.engine.record.stamp


def test_a_restart_that_lost_its_incarnation_still_wins() -> None:
    """Ours is authoritative: the network's newer copy of our previous run is outranked, not believed."""
    sim, sites = network(20, seed=5)
    site = sites[6]
    for key in ("a", "b", "c", "d"):
        sim.set_service(site, key)
    assert sim.run_until(settled(sim), PROPAGATION)
    assert site.engine.record.stamp[1] >= 5
    neighbours = sim.stop(site)
    sim.run_for(1.0)
    sim.restart(site, incarnation=site.engine.record.incarnation, services={"z": ServiceInfo("z")}, neighbours=neighbours)
    assert site.engine.record.stamp == (1, 1)  # below the (1, 5) the network holds
    assert sim.run_until(settled(sim), 2 * INTERVAL)
    for other in sim.sites.values():
        assert other.engine.catalog() == {"z": {site.site_id}}
    assert any("above ours" in r.reason for r in site.rejections)


def test_a_stopped_site_is_purged_everywhere_and_stays_purged() -> None:
    sim, sites = network(25, seed=6)
    assert sim.run_until(settled(sim), PROPAGATION)
    gone = sites[9]
    sim.stop(gone)
    sim.run_for(PURGE + 2.0)
    assert all(gone.site_id not in s.engine.table for s in sim.sites.values())
    sim.run_for(3 * PURGE)
    assert all(gone.site_id not in s.engine.table for s in sim.sites.values())
    assert sim.converged()


def test_forged_records_are_dropped_everywhere_and_gossip_keeps_flowing() -> None:
    sim, sites = network(30, seed=7)
    victim, mallory = sites[2], sites[20]
    sim.set_service(victim, "db")
    assert sim.run_until(settled(sim), PROPAGATION)
    real = victim.engine.record
    neighbour = sim.neighbours(mallory)[0]

    steal = attrs.evolve(real, version=real.version + 10, services=(ServiceInfo("db"), ServiceInfo("steal")))
    by_mallory = attrs.evolve(steal, public_key=sign_record(attrs.evolve(steal, site_id=mallory.site_id), mallory.identity).public_key)
    by_mallory = attrs.evolve(
        by_mallory,
        signature=base64.b64encode(pki.sign(mallory.identity, signing_bytes(by_mallory))).decode(),
    )
    for forged in (steal, by_mallory):
        sim.inject(mallory, neighbour, encode_message(Push((forged,))))
    bad_fields = {**record_to_json(real), "version": real.version + 20, "future": 1}
    absurd = {**record_to_json(real), "version": 2**60}
    sim.inject(mallory, neighbour, json.dumps({"type": "push", "records": [bad_fields, absurd]}).encode())
    sim.run_for(PROPAGATION)

    for site in sim.sites.values():
        assert site.engine.table.get(victim.site_id) == real
        assert "steal" not in site.engine.catalog()
    reasons = [r.reason for r in neighbour.rejections]
    assert len(reasons) == 4 and all(r.peer == mallory.site_id for r in neighbour.rejections)
    assert "forged or altered" in reasons[0]
    assert f"signed by the key of site {mallory.site_id}" in reasons[1]
    assert "unknown field 'future'" in reasons[2] and "version must be in" in reasons[3]
    assert sum(len(site.rejections) for site in sim.sites.values()) == 4  # never passed on
    assert not neighbour.protocol_errors  # the link stays up

    sim.set_service(victim, "web")
    assert sim.run_until(settled(sim), PROPAGATION)
    assert sites[29].engine.catalog()["web"] == {victim.site_id}


@pytest.mark.parametrize("topology", ["mesh", "line", "star"])
def test_gossip_at_rest_is_small(topology: str) -> None:
    """Target: under 2 KiB per site per minute once nothing changes (one ~60-byte summary per round)."""
    sim, sites = network(30, seed=8, topology=topology)
    assert sim.run_until(settled(sim), PROPAGATION)
    sim.run_for(2 * INTERVAL)
    before = sum(site.bytes_sent for site in sites)
    sim.run_for(60.0)
    per_site_minute = (sum(site.bytes_sent for site in sites) - before) / len(sites)
    assert per_site_minute < 2048
    assert sim.converged()
