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
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import pki
from fabric.errors import ProtocolError
from fabric.gossip.engine import (
    ANTI_ENTROPY_INTERVAL,
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


def flow(engines: dict[str, GossipEngine], outbox: Outbox, sender: str, now: float = 0.0) -> int:
    """Deliver messages (breadth first, through the codec) until none is left; returns how many went."""
    queue = [(sender, peer, message) for peer, message in outbox]
    delivered = 0
    while queue:
        src, dst, message = queue.pop(0)
        delivered += 1
        for peer, answer in engines[dst].receive(src, wire(message), now):
            queue.append((dst, peer, answer))
    return delivered


def linked(engines: dict[str, GossipEngine], a: str, b: str, now: float = 0.0) -> None:
    """a and b link up and publish their links, and everything flows."""
    for x, y in ((a, b), (b, a)):
        flow(engines, engines[x].link_up(y, now), x, now)
    for x in (a, b):
        links = [LinkInfo(peer, 1) for peer in engines[x].neighbours]
        flow(engines, engines[x].publish(now, links=links), x, now)


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
    assert engine.reachable() == {a} and not engine.present(b) and engine.catalog() == {}
    engine.receive(b, Push((signed(ids[1], 1, 2, links=(LinkInfo(a, 1),), services=(ServiceInfo("db"),)),)), 1.0)
    assert engine.present(b) and engine.catalog() == {"db": {b}}


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
    assert not engine.present(c) and engine.catalog() == {} and c in engine.table
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
    assert not engine.present(c)
    flow(engines, engine.tick(engine.next_deadline()), a, 81.0)
    assert engine.present(c) and engine.catalog() == {"db": {c}} and engine.age(c, 90.0) == 9.0


def test_absent_sites_are_not_gossiped(ids: list[pki.Identity]) -> None:
    """What makes a purge stick: a neighbour that still holds an absent site does not hand it back."""
    a, b, x = ids[0].site_id, ids[1].site_id, ids[4].site_id
    engine = new_engine(ids[0])
    engine.link_up(b, 0.0)
    engine.publish(0.0, links=[LinkInfo(b, 1)])
    engine.receive(b, Push((signed(ids[1], links=(LinkInfo(a, 1),)), signed(ids[4]))), 0.0)  # x: no links
    assert not engine.present(x)
    assert x not in {site for site, _, _ in engine._stamps_for(b)}
    assert engine.receive(b, Digest(()), 1.0) == [(b, Push((engine.record, engine.table.get(b))))]
    # Asked for it by name (a digest listed it), it is given.
    assert engine.receive(b, Pull((x,)), 1.0) == [(b, Push((engine.table.get(x),)))]


def test_table_limit(ids: list[pki.Identity]) -> None:
    reports: list[Rejection] = []
    engine = new_engine(ids[0], max_sites=2, on_reject=reports.append)
    engine.receive(ids[1].site_id, Push((signed(ids[1]), signed(ids[2]))), 0.0)
    assert len(engine.table) == 2 and ids[2].site_id not in engine.table
    assert reports[0].site_id == ids[2].site_id and "holds 2 sites, its limit" in reports[0].reason
    assert engine.receive(ids[1].site_id, Push((signed(ids[1], 1, 2),)), 0.0) == []  # known sites still update
    assert engine.table.get(ids[1].site_id).version == 2


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
