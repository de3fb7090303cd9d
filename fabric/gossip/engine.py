"""Gossip without I/O: which records go to which neighbour, and which sites are present.

`GossipEngine` is the whole protocol as a state machine. It imports no trio,
reads no clock and sends nothing: every call takes the time, and returns the
messages still to send as `(peer site id, message)` pairs. The Trio layer
(`gossip.py`) encodes them with `encode_message`, writes them on the links,
feeds what arrives through `decode_message_untrusted` into `receive`, and
calls `tick` at `next_deadline()`. Tests drive it the same way, with a
simulated network instead of links.

The protocol:

- Push on change: a site signs a new version of its record and pushes it to
  every neighbour. A site that takes in a record newer than the one it held
  (a valid signature of the site it describes, a higher `(incarnation,
  version)`) passes it on once to every other neighbour.
- Anti-entropy repairs what floods lose: every `anti_entropy_interval`
  (jittered) a site sends one neighbour, in turn, a `Summary` (a hash of its
  digest, ~70 bytes). A neighbour whose own digest hashes differently answers
  with its full `Digest`; the first site then pushes what is newer on its side
  and pulls what is newer on the other. At rest a round is one small message,
  which keeps gossip under 2 KiB per site per minute. Two neighbours seen to
  differ check again FOLLOW_UP of an interval later (a few times at most), so
  a repair that itself lost a message is retried soon. When a link comes up,
  one end (the lower site id) sends its full `Digest` at once.
- Membership: a site is present while it is reachable from here over links
  both ends advertise. Its services count only while it is present, so they
  are withdrawn the moment it is cut off. An absent site's record is purged
  `purge_after` seconds after this engine saw it become unreachable. When it
  comes back (records arrive that make it reachable again) it is present
  again at once.
- Only present sites' records are gossiped (pushed, forwarded, listed in
  digests). That is what lets a purge stick: a site nobody can reach is not
  handed back by a neighbour that has not purged it yet.
- A full table is shared out by branch, so a member cannot flood it. Records
  of this site and of its neighbours are always taken and never evicted.
  Past `max_sites`, a new site's record gets in only by evicting another
  (absent sites' first): the present sites hang in the tree of shortest
  paths from here, and a newcomer may evict a record only from a larger
  branch than its own, measured where their two paths part (`_Branches`).
  Sites minted by one member all hang in that member's branch, so they can
  only evict each other. Refusals and evictions are reported as counts, at
  most once per `logs.LINE_INTERVAL`.
- A site's own record is authoritative. Records of this site from others are
  never taken in; if a neighbour holds one with a higher stamp than ours
  (our own record from before a restart that lost the incarnation counter),
  we republish ours with a stamp above it, so the network converges to what
  we say now. Two processes running one identity would keep outranking each
  other: that is bounded to once per anti-entropy interval, and reported.

Bad records (forged, altered, unsigned, malformed) are dropped and reported
through `on_reject`; they never raise out of `receive` and never cost the
link. Bad messages (not JSON, unknown type, wrong shape) raise ProtocolError
from `decode_message_untrusted`, before the engine sees them.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import attrs

from ..errors import ProtocolError
from ..logs import LINE_INTERVAL
from ..pki import SITE_ID_LENGTH
from ..router.frames import MAX_PAYLOAD
from .records import (
    MAX_COUNTER,
    MAX_LINKS,
    MAX_RECORDS,
    MAX_TEXT,
    LinkInfo,
    RecordTable,
    ServiceInfo,
    SiteRecord,
    Stamp,
    encode_record,
    parse_json_untrusted,
    record_from_json_untrusted,
    why_unverified,
)

__all__ = [
    "ANTI_ENTROPY_INTERVAL",
    "JITTER",
    "MAX_SITES",
    "PURGE_AFTER",
    "Digest",
    "DigestEntry",
    "GossipEngine",
    "Message",
    "Outbox",
    "Pull",
    "Push",
    "Rejection",
    "SiteStatus",
    "Summary",
    "decode_message_untrusted",
    "digest_hash",
    "encode_message",
]

ANTI_ENTROPY_INTERVAL = 5.0  # seconds between a site's rounds; a lost update is repaired within a few
# seconds an unreachable site's record is kept: a link flap or a restart comes back well within it, and
# status can still show the site as gone (and since when) for a minute
PURGE_AFTER = 60.0
JITTER = 0.2  # rounds are spread uniformly over interval * [1 - JITTER/2, 1 + JITTER/2], so sites drift apart
# Once two neighbours are seen to differ, they check again this fraction of an
# interval later rather than a whole interval, so a repair that lost a message
# on the way is retried soon; at most MAX_FOLLOW_UPS times in a row per
# neighbour, so two sites that cannot agree cost a bounded amount.
FOLLOW_UP = 0.2
MAX_FOLLOW_UPS = 3
# Sites one engine keeps records of, besides its neighbours' (always kept):
# past it a new site's record must take the slot of a worse placed one. With
# at most MAX_LINKS neighbours, a whole table still fits one digest.
MAX_SITES = MAX_RECORDS - MAX_LINKS
# Hops from a site within which a full table tells branches apart (_Branches):
# deeper than real networks' paths, and what bounds the work of an eviction.
BRANCH_DEPTH = 8
DIGEST_HASH_BYTES = 16  # of SHA-256: 128 bits; a collision only delays a repair to the next differing round

DigestEntry: TypeAlias = tuple[str, int, int]
"""(site id, incarnation, version): one line of a digest."""

# Every signed record's site id is a key fingerprint (pki.site_id_of): 32
# lowercase hex digits. Digest entries and pulls naming anything else are
# ignored, since no record for them could ever verify; it also bounds the
# size of the digests and pulls we send to well under a frame.
_SITE_ID = re.compile(rf"[0-9a-f]{{{SITE_ID_LENGTH}}}")


# -- messages ---------------------------------------------------------------------


@attrs.frozen
class Push:
    """Records for the peer to take in if they are newer than what it holds."""

    records: tuple[SiteRecord, ...]
    # Filled by the decoder only, never sent: why each record of the payload
    # that did not decode was refused. The good records still count.
    rejected: tuple[str, ...] = ()


@attrs.frozen
class Digest:
    """What the sender holds: one (site id, incarnation, version) per present site, sorted by site id."""

    stamps: tuple[DigestEntry, ...]


@attrs.frozen
class Pull:
    """Site ids whose records the sender wants (it saw newer stamps in our digest)."""

    site_ids: tuple[str, ...]


@attrs.frozen
class Summary:
    """The hash of the sender's digest (see `digest_hash`): answered with a Digest only if ours differs."""

    digest_hash: str  # 32 lowercase hex digits
    sites: int  # entries in the digest it hashes; for logs and status, not compared


Message: TypeAlias = Push | Digest | Pull | Summary
Outbox: TypeAlias = list[tuple[str, Message]]
"""Messages to send, in order, each with the site id of the neighbour it goes to."""


# -- wire codec -------------------------------------------------------------------
#
# One GOSSIP frame payload is one message: a JSON object whose "type" says
# which, with exactly these keys:
#
#     {"type": "push", "records": [<record>, ...]}
#     {"type": "digest", "stamps": [["<site id>", <incarnation>, <version>], ...]}
#     {"type": "pull", "site_ids": ["<site id>", ...]}
#     {"type": "summary", "hash": "<32 hex>", "sites": <count>}

_KEYS = {
    "push": {"type", "records"},
    "digest": {"type", "stamps"},
    "pull": {"type", "site_ids"},
    "summary": {"type", "hash", "sites"},
}
_PUSH_HEAD = b'{"type":"push","records":['
_PUSH_TAIL = b"]}"
_HEX_HASH = re.compile(rf"[0-9a-f]{{{2 * DIGEST_HASH_BYTES}}}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_message(message: Message) -> bytes:
    """The GOSSIP frame payload of `message`.

    Raises ValueError if it would not fit a frame (MAX_PAYLOAD) or holds more
    than MAX_RECORDS entries: the engine never makes such a message (it
    splits pushes), so this is a bug in the caller.
    """
    if isinstance(message, Push):
        items = len(message.records)
        data = _PUSH_HEAD + b",".join(encode_record(r) for r in message.records) + _PUSH_TAIL
    elif isinstance(message, Digest):
        items = len(message.stamps)
        data = _dumps({"type": "digest", "stamps": [list(entry) for entry in message.stamps]})
    elif isinstance(message, Pull):
        items = len(message.site_ids)
        data = _dumps({"type": "pull", "site_ids": list(message.site_ids)})
    elif isinstance(message, Summary):
        items = 0
        data = _dumps({"type": "summary", "hash": message.digest_hash, "sites": message.sites})
    else:
        raise TypeError(f"not a gossip message: {type(message).__name__}")
    if items > MAX_RECORDS:
        raise ValueError(f"{type(message).__name__} with {items} entries; the limit is {MAX_RECORDS}")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"{type(message).__name__} of {len(data)} bytes; the limit is {MAX_PAYLOAD}")
    return data


def _malformed(why: str) -> ProtocolError:
    return ProtocolError(f"malformed gossip message: {why}")


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_site_text(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT


def _list_field(raw: dict[str, Any], key: str) -> list[Any]:
    value = raw[key]
    if not isinstance(value, list):
        raise _malformed(f"{key} must be a list")
    if len(value) > MAX_RECORDS:
        raise _malformed(f"{key} has {len(value)} entries; the limit is {MAX_RECORDS}")
    return value


def _decode_push(raw: dict[str, Any]) -> Push:
    records: list[SiteRecord] = []
    rejected: list[str] = []
    for index, item in enumerate(_list_field(raw, "records")):
        try:
            records.append(record_from_json_untrusted(item, f"$.records[{index}]"))
        except ProtocolError as error:
            claimed = item.get("site_id") if isinstance(item, dict) else None
            who = f"site {claimed[:MAX_TEXT]!r}" if isinstance(claimed, str) else f"#{index}"
            detail = str(error).removeprefix("malformed gossip payload: ")
            rejected.append(f"record of {who} refused: {detail}")
    return Push(tuple(records), tuple(rejected))


def _decode_digest(raw: dict[str, Any]) -> Digest:
    stamps = []
    for index, entry in enumerate(_list_field(raw, "stamps")):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and _is_site_text(entry[0])
            and _is_int(entry[1], 0, MAX_COUNTER)
            and _is_int(entry[2], 0, MAX_COUNTER)
        ):
            raise _malformed(f"stamps[{index}] is not [site id, incarnation, version] within limits")
        stamps.append((entry[0], entry[1], entry[2]))
    return Digest(tuple(stamps))


def _decode_pull(raw: dict[str, Any]) -> Pull:
    site_ids = _list_field(raw, "site_ids")
    for index, site_id in enumerate(site_ids):
        if not _is_site_text(site_id):
            raise _malformed(f"site_ids[{index}] is not a site id")
    return Pull(tuple(site_ids))


def _decode_summary(raw: dict[str, Any]) -> Summary:
    value, sites = raw["hash"], raw["sites"]
    if not (isinstance(value, str) and _HEX_HASH.fullmatch(value)):
        raise _malformed(f"hash must be {2 * DIGEST_HASH_BYTES} lowercase hex digits")
    if not _is_int(sites, 0, MAX_RECORDS):
        raise _malformed(f"sites must be an integer in [0, {MAX_RECORDS}]")
    return Summary(value, sites)


_DECODERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "push": _decode_push,
    "digest": _decode_digest,
    "pull": _decode_pull,
    "summary": _decode_summary,
}


def decode_message_untrusted(data: bytes) -> Message:
    """A message from a peer's GOSSIP payload. Raises ProtocolError, and only that, if its shape is wrong.

    A push whose envelope is sound but some of whose records are not (an
    unknown field, an absurd version, an oversized record) decodes: the bad
    records are left out and their reasons listed in `Push.rejected`, so one
    bad record costs itself, not the link. Signatures are the engine's job.
    """
    if len(data) > MAX_PAYLOAD:
        raise _malformed(f"{len(data)} bytes; the limit is {MAX_PAYLOAD}")
    try:
        raw = parse_json_untrusted(data)
    except ProtocolError as error:
        raise _malformed(str(error).removeprefix("malformed gossip payload: ")) from None
    if not isinstance(raw, dict):
        raise _malformed("expected an object")
    kind = raw.get("type")
    keys = _KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None or not isinstance(kind, str):
        raise _malformed(f"unknown type {str(kind)[:40]!r}")
    if set(raw) != keys:
        extra, missing = sorted(set(raw) - keys), sorted(keys - set(raw))
        raise _malformed(f"{kind} has unknown keys {extra[:3]} / lacks {missing}")
    return _DECODERS[kind](raw)


def digest_hash(stamps: Sequence[DigestEntry]) -> str:
    """What a Summary carries: SHA-256 of the digest's JSON (`[[id, inc, ver], ...]`, sorted), first 16 bytes, hex."""
    body = _dumps([list(entry) for entry in stamps])
    return hashlib.sha256(body).hexdigest()[: 2 * DIGEST_HASH_BYTES]


# -- engine -------------------------------------------------------------------------


@attrs.frozen
class Rejection:
    """A record that was refused, for the log: who sent it, whom it claims to describe, and why."""

    peer: str  # the neighbour it came from
    site_id: str | None  # the site the record claims to describe, when the record got that far
    reason: str


@attrs.frozen
class SiteStatus:
    """One known site as this engine sees it: what status shows."""

    site_id: str
    name: str
    incarnation: int
    version: int
    present: bool  # reachable from here over links both ends advertise
    # Seconds: for a present site, since its current record reached this
    # engine (how old what we know is); for an absent one, since this engine
    # saw it become unreachable (how long it has been gone).
    age: float
    purge_in: float | None  # seconds until its record is purged; None while present


def _link_order(link: LinkInfo) -> tuple[Any, ...]:
    return (link.peer, link.cost, -1.0 if link.rtt is None else link.rtt)


def _service_order(service: ServiceInfo) -> tuple[Any, ...]:
    return (service.routing_key, service.protocol, service.port or 0, service.connectors)


class _Branches:
    """Who gives up a slot when the table is full, and whether a newcomer may take it.

    The present sites hang in the tree of shortest paths from this site (the
    root), each under the site that first reached it. A branch's size is the
    number of evictable records in it (all but this site's and its
    neighbours'). The victim is an absent record if there is one; else it is
    found by walking down from the root into the largest branch at each
    step. A newcomer placed under `parent` may take the victim's slot only
    if, at the site where its path and the victim's part, its own branch
    would still be smaller than the victim's is. So a branch grows only at
    the expense of a larger one, and records minted behind one site, which
    all hang in its branch, can only evict each other. Ties are refused and
    every swap evens the tree out, so swaps stop: nothing churns.

    Branches are told apart BRANCH_DEPTH hops deep, which bounds the work of
    each swap: the sites below a site at that depth make one bucket, whose
    farthest (then newest) record goes first, and which a newcomer enters
    only by being nearer than that. Built from one table state and edited by
    each swap; the engine builds a new one after any other change.
    """

    def __init__(
        self,
        root: str,
        order: Sequence[str],
        parent: dict[str, str],
        depth: dict[str, int],
        protected: frozenset[str],
        absent: list[str],
        newness: Callable[[str], float],
    ) -> None:
        # The nodes of the tree are the sites at most BRANCH_DEPTH deep; a
        # site deeper counts under its ancestor at that depth, its bucket.
        self._root = root
        self._newness = newness
        self._depth: dict[str, int] = {}  # site -> hops from the root
        self._node: dict[str, str] = {}  # site -> the node it counts under: itself, or its bucket
        self._parent: dict[str, str] = {}  # node -> the node above it
        self._size: dict[str, int] = {}  # node -> evictable records at or below it
        self._by_size: dict[str, dict[int, dict[str, None]]] = {}  # node -> its non-empty children by size
        self._top: dict[str, int] = {}  # node -> the size of its largest child
        self._buckets: dict[str, list[tuple[int, float, str]]] = {}  # node at BRANCH_DEPTH -> heap of its records
        for site in order:
            hops = depth[site]
            self._depth[site] = hops
            if hops <= BRANCH_DEPTH:
                self._node[site] = site
                self._size[site], self._by_size[site], self._top[site] = 0, {}, 0
                if site != root:
                    self._parent[site] = parent[site]
                if hops == BRANCH_DEPTH:
                    self._buckets[site] = []
            else:
                self._node[site] = self._node[parent[site]]
            if site not in protected:
                node = self._node[site]
                self._size[node] += 1
                if hops >= BRANCH_DEPTH:
                    self._buckets[node].append(self._bucket_entry(site))
        for heap in self._buckets.values():
            heapq.heapify(heap)
        for site in reversed(order):  # children before their parents
            if site != root and self._node[site] == site:
                self._size[self._parent[site]] += self._size[site]
        for node, above in self._parent.items():
            if self._size[node]:
                self._by_size[above].setdefault(self._size[node], {})[node] = None
        for node, children in self._by_size.items():
            self._top[node] = max(children, default=0)
        self._absent = absent  # evicted from the end first
        self._path: list[str] = []  # the nodes from the root down to the victim's, once found
        self._on_path: dict[str, int] = {}

    def __contains__(self, site: object) -> bool:
        """Whether `site` is in the tree: present, and not evicted since."""
        return site in self._node

    def victim(self) -> str | None:
        """The record to evict next; None if nothing may be evicted."""
        if self._absent:
            return self._absent[-1]
        last = self._victim_path()[-1]
        if last == self._root:
            return None
        bucket = self._buckets.get(last)
        return last if bucket is None else bucket[0][2]

    def admits(self, parent: str) -> bool:
        """Whether a present newcomer placed under `parent` (a site in the tree) may take the victim's slot."""
        if self._absent:
            return True
        path = self._victim_path()
        hops = self._depth[parent] + 1
        node = self._node[parent]
        if hops > BRANCH_DEPTH and node == path[-1]:  # into the victim's own bucket: only nearer
            victim = self.victim()
            return victim is not None and hops < self._depth[victim]
        branch = None  # the child of the meeting node the newcomer counts under (None: a new one)
        while node not in self._on_path:
            branch, node = node, self._parent[node]
        index = self._on_path[node]
        if index + 1 == len(path):
            return False  # the victim is the newcomer's parent or above it, or there is none
        ours = 0 if branch is None else self._size[branch]
        return ours + 1 < self._size[path[index + 1]]

    def heaviest(self) -> tuple[str, int] | None:
        """The root's largest branch: (the site it starts at, its size), for reports."""
        top = self._top[self._root]
        return (next(iter(self._by_size[self._root][top])), top) if top else None

    def remove(self, site: str) -> None:
        """Take out the victim `site`. A node left empty stays, so the sites below it keep their place."""
        if self._absent and self._absent[-1] == site:
            self._absent.pop()
            return
        node = self._node.pop(site)
        del self._depth[site]
        if node in self._buckets:
            entry = heapq.heappop(self._buckets[node])
            assert entry[2] == site, "only the victim is removed"
        self._resize(node, -1)

    def add(self, site: str, parent: str) -> None:
        """Hang the newcomer `site` (evictable) under `parent`."""
        hops = self._depth[parent] + 1
        self._depth[site] = hops
        if hops <= BRANCH_DEPTH:
            self._node[site] = site
            self._parent[site] = parent
            self._size[site], self._by_size[site], self._top[site] = 0, {}, 0
            if hops == BRANCH_DEPTH:
                self._buckets[site] = [self._bucket_entry(site)]
        else:
            self._node[site] = self._node[parent]
            heapq.heappush(self._buckets[self._node[site]], self._bucket_entry(site))
        self._resize(self._node[site], +1)

    def _bucket_entry(self, site: str) -> tuple[int, float, str]:
        return -self._depth[site], -self._newness(site), site  # the farthest, then the newest, first

    def _resize(self, node: str, delta: int) -> None:
        self._path = []
        while True:
            old = self._size[node]
            new = self._size[node] = old + delta
            if node == self._root:
                return
            above = self._parent[node]
            children = self._by_size[above]
            if old:
                del children[old][node]
                if not children[old]:
                    del children[old]
            if new:
                children.setdefault(new, {})[node] = None
            top = self._top[above]
            if new > top:
                self._top[above] = new
            elif old == top and old not in children:
                self._top[above] = max(children, default=0)
            node = above

    def _victim_path(self) -> list[str]:
        if not self._path:
            path = [self._root]
            while top := self._top[path[-1]]:
                path.append(next(iter(self._by_size[path[-1]][top])))
            self._path = path
            self._on_path = {node: index for index, node in enumerate(path)}
        return self._path


class GossipEngine:
    """The gossip of one site: its record table, its neighbours, and what to tell them.

    `sign` turns a record of this site into the same record signed by it,
    e.g. `functools.partial(records.sign_record, identity=identity)`. `own`
    is this site's record as it starts (links and services may be empty; the
    version is usually 0): it is signed here, and reaches the neighbours
    with the first `publish` or through the digest exchange of a new link.
    `rng` jitters the anti-entropy rounds (seed it for replayable tests);
    `on_reject` hears of every record refused (for the log); those refused
    or evicted for space, as counts now and then. `max_sites` bounds the
    table, beyond this site's neighbours (see the module docstring).
    """

    def __init__(
        self,
        own: SiteRecord,
        *,
        sign: Callable[[SiteRecord], SiteRecord],
        now: float,
        anti_entropy_interval: float = ANTI_ENTROPY_INTERVAL,
        purge_after: float = PURGE_AFTER,
        rng: random.Random | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
        max_sites: int = MAX_SITES,
    ) -> None:
        if not (0 < anti_entropy_interval < math.inf and 0 <= purge_after < math.inf):
            raise ValueError("anti_entropy_interval must be > 0 and purge_after >= 0, both finite")
        self._sign = sign
        self._interval = float(anti_entropy_interval)
        self._purge_after = float(purge_after)
        self._rng = rng if rng is not None else random.Random()
        self._on_reject = on_reject if on_reject is not None else (lambda rejection: None)
        self._max_sites = max_sites
        self._id = own.site_id
        self._record = self._signed(own)
        self.table = RecordTable([self._record])
        self.generation = 0  # raised whenever the table or who is present changes: "recompute routes"

        self._neighbours: list[str] = []  # in the order links came up: anti-entropy takes them in turn
        self._turn = 0
        self._next_round = math.inf
        self._reachable: frozenset[str] = frozenset({self._id})
        # The last walk of who is present (_update_reachability): what each
        # held record links to, and the tree of shortest paths from here.
        self._adverts: dict[str, frozenset[str]] = {self._id: frozenset()}
        self._depth: dict[str, int] = {self._id: 0}  # present site -> hops from here
        self._parent: dict[str, str] = {}  # present site -> the site that first reached it
        self._order: list[str] = [self._id]  # present sites, nearest first
        self._branches: _Branches | None = None  # while the table is full; None when stale
        self._refused: dict[str, Stamp] = {}  # newcomers refused for space since the table last changed
        self._crowded: Counter[str] = Counter()  # neighbour -> its records refused for space, since the last report
        self._evicted = 0  # records evicted for space since the last report
        self._crowding_reported_at = -math.inf
        self._changed_at: dict[str, float] = {self._id: now}  # when each held record reached us
        self._unreachable_since: dict[str, float] = {}  # held sites that are absent, since when
        self._announced: dict[str, Stamp] = {}  # the stamp of each site we last pushed on
        self._source: dict[str, str] = {}  # the neighbour each held record came from
        self._sizes: dict[str, tuple[Stamp, str, int]] = {}  # encoded size by site, for splitting pushes
        self._digest: tuple[tuple[DigestEntry, ...], str] | None = None  # (stamps, hash) of present sites
        self._follow_ups: dict[str, float] = {}  # neighbour -> when to send it an extra Summary
        self._follow_up_count: dict[str, int] = {}  # extra Summaries to it since its last regular round
        self._their_hash: dict[str, str] = {}  # neighbour -> the digest hash it last showed us
        self._asked: dict[str, str] = {}  # neighbour -> the hash of the digest we last sent it
        # neighbour -> (our hash, its hash) when an exchange found nothing either
        # side would take (they hold what the other refused for space): not
        # repeated until one of them changes.
        self._settled: dict[str, tuple[str, str]] = {}
        self._last_outrank = -math.inf
        self._outrank_due = math.inf
        self._outrank_above: Stamp | None = None
        self._outrank_peer = ""  # who showed us the echo held back, for the report

    # -- what it knows ------------------------------------------------------------

    @property
    def site_id(self) -> str:
        return self._id

    @property
    def record(self) -> SiteRecord:
        """This site's current record, signed. Its incarnation may have been raised (see `receive`)."""
        return self._record

    @property
    def neighbours(self) -> tuple[str, ...]:
        return tuple(self._neighbours)

    def reachable(self) -> frozenset[str]:
        """Sites reachable from here over links both ends advertise, this site included."""
        return self._reachable

    def age(self, site_id: str, now: float) -> float | None:
        """Seconds since a present site's record reached us, or since an absent one became unreachable.

        None for a site we hold no record of.
        """
        if site_id not in self.table:
            return None
        since = self._unreachable_since.get(site_id)
        return now - (self._changed_at[site_id] if since is None else since)

    def catalog(self) -> dict[str, set[str]]:
        """Routing key -> the present sites with at least one connector for it (this site included).

        Presence is reachability over advertised links; routing adds its own
        rule (edge sites are never transit), so a router intersects this with
        its routes.
        """
        catalog: dict[str, set[str]] = {}
        for site_id in self._reachable:
            record = self.table.get(site_id)
            assert record is not None
            for service in record.services:
                if service.connectors > 0:
                    catalog.setdefault(service.routing_key, set()).add(site_id)
        return catalog

    def status(self, now: float) -> list[SiteStatus]:
        """Every site held, sorted by name then id."""
        rows = []
        for record in self.table:
            since = self._unreachable_since.get(record.site_id)
            rows.append(
                SiteStatus(
                    site_id=record.site_id,
                    name=record.name,
                    incarnation=record.incarnation,
                    version=record.version,
                    present=since is None,
                    age=now - (self._changed_at[record.site_id] if since is None else since),
                    purge_in=None if since is None else max(0.0, since + self._purge_after - now),
                )
            )
        return sorted(rows, key=lambda row: (row.name, row.site_id))

    def next_deadline(self) -> float:
        """When `tick` has something to do (an anti-entropy round, a purge); math.inf for never."""
        purge = min(self._unreachable_since.values(), default=math.inf) + self._purge_after
        follow_up = min(self._follow_ups.values(), default=math.inf)
        report = self._crowding_reported_at + LINE_INTERVAL if self._crowded or self._evicted else math.inf
        return min(self._next_round, purge, self._outrank_due, follow_up, report)

    def __repr__(self) -> str:
        return (
            f"<GossipEngine {self._record.name or self._id} @{self._record.incarnation}.{self._record.version}"
            f" sites={len(self.table)} present={len(self._reachable)} neighbours={len(self._neighbours)}>"
        )

    # -- events ------------------------------------------------------------------------

    def publish(
        self,
        now: float,
        *,
        links: Iterable[LinkInfo] | None = None,
        services: Iterable[ServiceInfo] | None = None,
        name: str | None = None,
        mode: str | None = None,
    ) -> Outbox:
        """Change this site's record (what is not given stays) and push it to every neighbour.

        Links and services are kept sorted, so the same set in another order
        is no change. No change, no new version and nothing to send.
        """
        current = self._record
        changed = attrs.evolve(
            current,
            links=current.links if links is None else tuple(sorted(links, key=_link_order)),
            services=current.services if services is None else tuple(sorted(services, key=_service_order)),
            name=current.name if name is None else name,
            mode=current.mode if mode is None else mode,
        )
        if (changed.links, changed.services, changed.name, changed.mode) == (
            current.links,
            current.services,
            current.name,
            current.mode,
        ):
            return []
        return self._set_own(changed, above=current.stamp, now=now)

    def link_up(self, peer: str, now: float) -> Outbox:
        """A link with `peer` is up: it is a neighbour from now on.

        The end with the lower site id sends its full digest at once (one
        digest per link is enough: the other end answers with pushes and
        pulls both ways). The caller publishes the new link as usual.
        """
        if peer not in self._neighbours:
            self._neighbours.append(peer)
            self._branches = None  # its record is kept from now on
            if self._next_round == math.inf:
                self._next_round = now + self._round_interval()
        if self._id < peer:
            return [(peer, self._digest_to(peer))]
        return []

    def link_down(self, peer: str, now: float) -> Outbox:
        """The link with `peer` is gone. The caller publishes its links without it.

        Its record is no longer kept regardless: if the table was over its
        limit by it, the worst placed record goes.
        """
        if peer in self._neighbours:
            self._neighbours.remove(peer)
            self._branches = None
        for held in (self._follow_ups, self._follow_up_count, self._their_hash, self._asked, self._settled):
            held.pop(peer, None)
        if not self._neighbours:
            self._next_round = math.inf
        evicted = 0
        while self._room() < 0:
            branches = self._branches_now()
            victim = branches.victim()
            if victim is None:
                break
            branches.remove(victim)
            self._forget(victim)
            evicted += 1
        if evicted:
            self._evicted += evicted
            self._changed()
            self._update_reachability(now)
            self._report_crowding(now)
        return []

    def receive(self, peer: str, message: Message, now: float) -> Outbox:
        """Handle a message from `peer`; returns what to send because of it.

        Never raises for anything a peer can put in a message: bad records
        are dropped and reported through `on_reject`.
        """
        if isinstance(message, Push):
            return self._on_push(peer, message, now)
        if isinstance(message, Digest):
            return self._on_digest(peer, message, now)
        if isinstance(message, Pull):
            return self._on_pull(peer, message)
        if isinstance(message, Summary):
            return self._on_summary(peer, message, now)
        raise TypeError(f"not a gossip message: {type(message).__name__}")

    def tick(self, now: float) -> Outbox:
        """Do what is due by `now`: purge sites absent for `purge_after`, run an anti-entropy round."""
        outbox: Outbox = []
        self._report_crowding(now)
        due = [site for site, since in self._unreachable_since.items() if since + self._purge_after <= now]
        for site_id in due:
            self._forget(site_id)
        if due:
            self._changed()

        if self._outrank_due <= now:
            above, self._outrank_above, self._outrank_due = self._outrank_above, None, math.inf
            if above is not None and above >= self._record.stamp:
                outbox += self._outrank(above, now, peer=self._outrank_peer)

        for peer, when in list(self._follow_ups.items()):
            if when <= now:
                del self._follow_ups[peer]
                if not self._settled_with(peer):
                    outbox.append((peer, self._summary_for(peer)))

        if self._neighbours and self._next_round <= now:
            peer = self._neighbours[self._turn % len(self._neighbours)]
            self._turn += 1
            self._follow_up_count[peer] = 0
            self._follow_ups.pop(peer, None)  # this round is the follow-up
            if not self._settled_with(peer):  # if it changes, its own round tells us
                outbox.append((peer, self._summary_for(peer)))
            self._next_round = now + self._round_interval()
        return outbox

    # -- message handlers -------------------------------------------------------------------

    def _on_push(self, peer: str, message: Push, now: float) -> Outbox:
        for reason in message.rejected:
            self._on_reject(Rejection(peer, None, reason))
        outbox: Outbox = []
        echo: Stamp | None = None
        changed = False
        newcomers: dict[str, SiteRecord] = {}  # new sites while the table is full: they must earn a slot
        room = self._room()
        for record in message.records:
            site_id = record.site_id
            if site_id == self._id:
                # Ours is authoritative; a newer one of ours out there must be outranked.
                if record.stamp >= self._record.stamp and record != self._record and self._verified(peer, record):
                    echo = record.stamp if echo is None else max(echo, record.stamp)
                continue
            held = self.table.get(site_id)
            if not record.is_newer_than(held):
                if held is not None and site_id == peer and held != record:
                    # The site itself is behind on its own record (it restarted
                    # and lost its counter): show it ours so it can outrank it.
                    outbox.append((peer, Push((held,))))
                continue
            new = held is None and site_id not in self._neighbours
            if new and room <= 0:
                if record.is_newer_than(newcomers.get(site_id)):
                    newcomers[site_id] = record
                continue
            if not self._verified(peer, record):
                continue
            self._take(peer, record, now)
            if new:
                room -= 1
            changed = True
        refused: list[SiteRecord] = []
        if newcomers:
            if changed:  # place the newcomers in the tree as this push left it
                self._changed()
                self._update_reachability(now)
            changed, refused = self._admit(peer, newcomers, now)
        if changed:
            self._changed()
            self._update_reachability(now)
        for record in refused:
            if len(self._refused) < self._max_sites:
                self._refused[record.site_id] = record.stamp
        ours = self._digest_for(peer)[1]
        if refused and not changed and self._asked.get(peer) == ours and (theirs := self._their_hash.get(peer)):
            self._settled[peer] = (ours, theirs)  # its answer to our digest: only what we refuse
        self._report_crowding(now)
        if echo is not None:
            outbox += self._outrank(echo, now, peer=peer)
        outbox += self._spread()
        return outbox

    def _on_digest(self, peer: str, message: Digest, now: float) -> Outbox:
        self._their_hash[peer] = their_hash = digest_hash(message.stamps)
        theirs: dict[str, Stamp] = {}
        wanted: list[str] = []
        newcomers: list[str] = []  # sites we hold no record of while the table is full
        room = self._room()
        for site_id, incarnation, version in message.stamps:
            if not _SITE_ID.fullmatch(site_id):
                continue
            stamp = (incarnation, version)
            theirs[site_id] = stamp
            held = self.table.get(site_id)
            if site_id == self._id:
                if stamp > self._record.stamp:
                    wanted.append(site_id)  # an echo of ours above what we publish: fetch it, verify, outrank
            elif held is None:
                if room > 0 or site_id in self._neighbours:
                    wanted.append(site_id)
                elif self._refused.get(site_id) != stamp:
                    newcomers.append(site_id)
            elif stamp > held.stamp:
                wanted.append(site_id)
        unplaced = False
        if newcomers:
            worth, unplaced = self._worth_pulling(newcomers)
            wanted += worth
        offered = []
        for site_id, incarnation, version in self._stamps_for(peer):
            if theirs.get(site_id, (-1, -1)) < (incarnation, version):
                record = self.table.get(site_id)
                assert record is not None
                offered.append(record)
        if not (offered or wanted):
            self._settled[peer] = (self._digest_for(peer)[1], their_hash)
            return []
        self._follow_up(peer, now)  # we differ: check again soon, in case this repair loses a message
        outbox: Outbox = [(peer, push) for push in self._pushes(offered)]
        outbox += [(peer, Pull(tuple(wanted[i : i + MAX_RECORDS]))) for i in range(0, len(wanted), MAX_RECORDS)]
        if unplaced and peer in wanted:
            # Sites behind the peer may be placed once its own record is here:
            # our digest, after the pull, makes it push them.
            outbox.append((peer, self._digest_to(peer)))
        return outbox

    def _on_pull(self, peer: str, message: Pull) -> Outbox:
        # Answered whatever the requested sites' presence: the peer asked for
        # them because a digest showed them (as present, or as its own).
        records = [r for site_id in dict.fromkeys(message.site_ids) if (r := self.table.get(site_id)) is not None]
        return [(peer, push) for push in self._pushes(records)]

    def _on_summary(self, peer: str, message: Summary, now: float) -> Outbox:
        value = self._digest_for(peer)[1]
        self._their_hash[peer] = message.digest_hash
        if value == message.digest_hash or self._settled_with(peer):
            if peer in self._follow_up_count:
                self._follow_up_count[peer] = 0
            return []
        self._follow_up(peer, now)  # if our digest is lost, our follow-up tells the peer we differ
        return [(peer, self._digest_to(peer))]

    def _digest_to(self, peer: str) -> Digest:
        stamps, self._asked[peer] = self._digest_for(peer)
        return Digest(stamps)

    def _settled_with(self, peer: str) -> bool:
        """Whether an exchange with `peer` found nothing to do, and neither side has changed since."""
        settled = self._settled.get(peer)
        return settled is not None and settled == (self._digest_for(peer)[1], self._their_hash.get(peer))

    def _follow_up(self, peer: str, now: float) -> None:
        if peer not in self._neighbours or peer in self._follow_ups:
            return
        count = self._follow_up_count.get(peer, 0)
        if count < MAX_FOLLOW_UPS:
            self._follow_up_count[peer] = count + 1
            self._follow_ups[peer] = now + FOLLOW_UP * self._interval

    # -- own record -----------------------------------------------------------------------

    def _signed(self, record: SiteRecord) -> SiteRecord:
        signed = self._sign(record)
        if signed.site_id != self._id or why_unverified(signed) is not None:
            raise ValueError(f"sign() did not return a valid signed record of site {self._id}")
        return signed

    def _set_own(self, record: SiteRecord, *, above: Stamp, now: float) -> Outbox:
        """Sign `record` with a stamp just above `above` (and ours), make it ours, and push it on."""
        incarnation, version = max(above, self._record.stamp)
        if version < MAX_COUNTER:
            version += 1
        else:
            incarnation, version = incarnation + 1, 0  # a new run of versions; unreachable in practice
        record = self._signed(attrs.evolve(record, incarnation=incarnation, version=version))
        self._record = record
        self.table.apply(record)
        self._changed_at[self._id] = now
        self._changed()
        self._update_reachability(now)
        return self._spread()

    def _outrank(self, above: Stamp, now: float, *, peer: str) -> Outbox:
        """Republish our record above an echo of an older run of ours, at most once per interval."""
        if now < self._last_outrank + self._interval:
            self._outrank_above = above if self._outrank_above is None else max(above, self._outrank_above)
            self._outrank_peer = peer
            self._outrank_due = self._last_outrank + self._interval
            return []
        self._last_outrank = now
        self._on_reject(
            Rejection(
                peer,
                self._id,
                f"a record of this site at {above[0]}.{above[1]} is in the network, above ours at "
                f"{self._record.incarnation}.{self._record.version}: ours is republished above it "
                "(lost state? or is this identity running twice?)",
            )
        )
        return self._set_own(self._record, above=above, now=now)

    # -- helpers ------------------------------------------------------------------------------

    def _verified(self, peer: str, record: SiteRecord) -> bool:
        why = why_unverified(record)
        if why is None:
            return True
        self._on_reject(Rejection(peer, record.site_id, f"record of site {record.site_id} refused: {why}"))
        return False

    def _changed(self) -> None:
        self.generation += 1
        self._digest = None
        self._branches = None
        self._refused.clear()  # what was refused may fit now

    def _take(self, peer: str, record: SiteRecord, now: float) -> None:
        self.table.apply(record)
        self._changed_at[record.site_id] = now
        self._source[record.site_id] = peer

    def _forget(self, site_id: str) -> None:
        self.table.remove(site_id)
        for held in (
            self._changed_at, self._unreachable_since, self._announced, self._source, self._sizes, self._adverts
        ):
            held.pop(site_id, None)

    def _update_reachability(self, now: float) -> None:
        """Recompute who is present (reachable from here over links both ends advertise), nearest first."""
        records = self.table.records
        adverts = {site_id: frozenset(link.peer for link in record.links) for site_id, record in records.items()}
        depth = {self._id: 0}
        parent: dict[str, str] = {}
        order = [self._id]
        for site in order:  # breadth first: the list grows as it is walked
            for link in records[site].links:
                peer = link.peer
                if peer not in depth and site in adverts.get(peer, ()):
                    depth[peer] = depth[site] + 1
                    parent[peer] = site
                    order.append(peer)
        self._adverts, self._depth, self._parent, self._order = adverts, depth, parent, order
        self._branches = None
        for site_id in records:
            if site_id in depth:
                self._unreachable_since.pop(site_id, None)
            else:
                self._unreachable_since.setdefault(site_id, now)
        if depth.keys() != self._reachable:
            self._reachable = frozenset(depth)
            self._changed()

    # -- a full table ---------------------------------------------------------------------

    def _room(self) -> int:
        """Records of new sites the table takes before they must earn a slot: max_sites, neighbours' aside."""
        kept = sum(1 for peer in self._neighbours if peer in self.table)
        return self._max_sites - (len(self.table) - kept)

    def _branches_now(self) -> _Branches:
        if self._branches is None:
            protected = frozenset((self._id, *self._neighbours))
            absent = [site for site in self.table.records if site not in self._depth and site not in protected]
            share = Counter(self._source.get(site) for site in absent)
            # Of absent records, those from the neighbour that brought the most go first, newest first.
            absent.sort(key=lambda site: (share[self._source.get(site)], self._changed_at[site], site))
            self._branches = _Branches(
                self._id, self._order, self._parent, self._depth, protected, absent, self._changed_at.__getitem__
            )
        return self._branches

    def _admit(self, peer: str, newcomers: dict[str, SiteRecord], now: float) -> tuple[bool, list[SiteRecord]]:
        """Let in, while the table is full, the newcomers that may take a slot (see `_Branches`).

        Each is placed under the nearest present site it links to both ways
        (or under a newcomer let in before it), nearest first; one placed
        nowhere would be absent and is refused. Returns (any let in, the
        refused), and counts both for the next report.
        """
        branches = self._branches_now()
        waiting: list[tuple[int, str, str]] = []  # (hops from here, site, parent): a heap
        for site_id, newcomer in newcomers.items():
            parents = [
                (hops, link.peer)
                for link in newcomer.links
                if (hops := self._depth.get(link.peer)) is not None and site_id in self._adverts[link.peer]
            ]
            if parents:
                hops, parent = min(parents)
                waiting.append((hops + 1, site_id, parent))
        heapq.heapify(waiting)
        pending = dict(newcomers)  # not decided yet
        refused: list[SiteRecord] = []
        linking: dict[str, list[str]] | None = None  # site -> the newcomers whose records link to it
        taken = 0
        while waiting:
            hops, site_id, parent = heapq.heappop(waiting)
            record = pending.pop(site_id, None)
            if record is None:
                continue  # decided at its nearest place already
            if parent not in branches or not branches.admits(parent):
                refused.append(record)  # (its parent may have been evicted since it was placed)
                continue
            if not self._verified(peer, record):
                continue
            victim = branches.victim()
            assert victim is not None  # admits() found one
            branches.remove(victim)
            self._forget(victim)
            self._take(peer, record, now)
            branches.add(site_id, parent)
            taken += 1
            # Newcomers that hang from this one can be placed now.
            if linking is None:
                linking = {}
                for other in pending.values():
                    for link in other.links:
                        linking.setdefault(link.peer, []).append(other.site_id)
            adverts = {link.peer for link in record.links}
            for below in linking.get(site_id, ()):
                if below in pending and below in adverts:
                    heapq.heappush(waiting, (hops + 1, below, site_id))
        refused += pending.values()  # placed nowhere: they would be absent
        if refused:
            self._crowded[peer] += len(refused)
        self._evicted += taken
        return taken > 0, refused

    def _worth_pulling(self, site_ids: list[str]) -> tuple[list[str], bool]:
        """Of sites we hold no record of, while the table is full: those whose records might earn a slot.

        A record not seen yet is placed under the nearest present site whose
        record links to it, as if it linked back; one that no present site
        links to would be absent, and is not asked for. What a record really
        earns is decided when it arrives. Returns (those worth asking for,
        whether some could not be placed).
        """
        wanted = set(site_ids)
        parents: dict[str, str] = {}
        for site in self._order:
            for link in self.table.records[site].links:
                if link.peer in wanted and link.peer not in parents:
                    parents[link.peer] = site
        branches = self._branches_now()
        return [site_id for site_id, parent in parents.items() if branches.admits(parent)], len(parents) < len(wanted)

    def _report_crowding(self, now: float) -> None:
        """Report the records refused or evicted for space since the last report, at most once per interval."""
        if not (self._crowded or self._evicted) or now < self._crowding_reported_at + LINE_INTERVAL:
            return
        refused = sum(self._crowded.values())
        heaviest = self._branches_now().heaviest()
        peer = self._crowded.most_common(1)[0][0] if self._crowded else (heaviest[0] if heaviest else self._id)
        behind = f"; the most, {heaviest[1]}, are behind neighbour {heaviest[0][:8]}" if heaviest else ""
        self._on_reject(
            Rejection(
                peer,
                None,
                f"this site holds {len(self.table)} sites (its limit is {self._max_sites} besides its neighbours'): "
                f"{refused} record(s) of new sites refused and {self._evicted} evicted for better placed ones "
                f"since the last such report{behind}",
            )
        )
        self._crowded.clear()
        self._evicted = 0
        self._crowding_reported_at = now

    def _spread(self) -> Outbox:
        """Push every present site's record not yet passed on to the neighbours that may lack it.

        Each stamp goes out once: on arrival if its site is present, or as
        soon as it becomes present. Not back to the neighbour it came from,
        and not to the site it describes.
        """
        fresh = [
            record
            for site_id in sorted(self._reachable)
            if self._announced.get(site_id) != (record := self.table.records[site_id]).stamp
        ]
        if not fresh:
            return []
        outbox: Outbox = []
        for peer in self._neighbours:
            batch = [r for r in fresh if r.site_id != peer and self._source.get(r.site_id) != peer]
            outbox += [(peer, push) for push in self._pushes(batch)]
        for record in fresh:
            self._announced[record.site_id] = record.stamp
        return outbox

    def _pushes(self, records: Sequence[SiteRecord]) -> list[Push]:
        """`records` as pushes that each fit a frame (and MAX_RECORDS)."""
        pushes: list[Push] = []
        batch: list[SiteRecord] = []
        size = len(_PUSH_HEAD) + len(_PUSH_TAIL)
        for record in records:
            item = self._size(record) + 1  # the comma
            if batch and (size + item > MAX_PAYLOAD or len(batch) == MAX_RECORDS):
                pushes.append(Push(tuple(batch)))
                batch, size = [], len(_PUSH_HEAD) + len(_PUSH_TAIL)
            batch.append(record)
            size += item
        if batch:
            pushes.append(Push(tuple(batch)))
        return pushes

    def _size(self, record: SiteRecord) -> int:
        cached = self._sizes.get(record.site_id)
        if cached is not None and cached[:2] == (record.stamp, record.signature):
            return cached[2]
        size = len(encode_record(record))
        self._sizes[record.site_id] = (record.stamp, record.signature, size)
        return size

    def _present_digest(self) -> tuple[tuple[DigestEntry, ...], str]:
        if self._digest is None:
            stamps = tuple(
                (site_id, *self.table.records[site_id].stamp) for site_id in sorted(self._reachable)
            )
            self._digest = (stamps, digest_hash(stamps))
        return self._digest

    def _summary_for(self, peer: str) -> Summary:
        stamps, value = self._digest_for(peer)
        return Summary(value, len(stamps))

    def _stamps_for(self, peer: str) -> tuple[DigestEntry, ...]:
        return self._digest_for(peer)[0]

    def _digest_for(self, peer: str) -> tuple[tuple[DigestEntry, ...], str]:
        """The digest we show `peer`: present sites, plus the peer's own record if we hold it.

        The peer's own stamp lets it notice that we hold a newer record of it
        than it publishes (see `_outrank`), even while it looks absent to us.
        """
        stamps, value = self._present_digest()
        held = self.table.get(peer)
        if held is None or peer in self._reachable:
            return stamps, value
        stamps = tuple(sorted(stamps + ((peer, *held.stamp),)))
        return stamps, digest_hash(stamps)

    def _round_interval(self) -> float:
        return self._interval * (1.0 + JITTER * (self._rng.random() - 0.5))
