"""Access policy: the sites a listener may use, the sites that may reach a connector.

Pure: no I/O, no trio. A policy is the tuple of entries a person gave, kept as
given: site ids (32 hex digits) or site names. Names are aliases, resolved at
each use against the sites this site knows (their gossip records), so a policy
may name a site that is not known yet and holds once it appears. A name that
two known sites carry is ambiguous: it admits neither, and says so (`notes`).
The empty policy is open: it admits every site, as a network is one trust
domain unless a policy says otherwise.

What a name is worth: a site id is the digest of the site's key, so only that
key's holder can be that site. A name is what a site calls itself in its
record; it is bound to the key only on a direct link (the HELLO must match
the certificate). A policy by name therefore holds against a site that takes
a name already known here (ambiguous: nobody matches), not against one that
takes the name of a site this site does not know: use ids where that matters.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

OPEN: tuple[str, ...] = ()  # the policy that admits every site


def by_name(names: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Site name -> the ids of the known sites that carry it, from site id -> name."""
    index: dict[str, list[str]] = collections.defaultdict(list)
    for site_id, name in names.items():
        index[name].append(site_id)
    return {name: tuple(sorted(ids)) for name, ids in index.items()}


def resolve(entry: str, names: Mapping[str, str], index: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The known sites an entry names: its site id, or the one site that carries it as a name.

    Empty for an unknown entry and for a name that several sites carry.
    `names` maps site id -> name; `index` is `by_name(names)`.
    """
    if entry in names:
        return (entry,)
    carriers = index.get(entry, ())
    return carriers if len(carriers) == 1 else ()


def sites_admitted(policy: Iterable[str], names: Mapping[str, str], index: Mapping[str, tuple[str, ...]]) -> frozenset[str]:
    """The known sites a (non-empty) policy admits now."""
    return frozenset(site for entry in policy for site in resolve(entry, names, index))


def ambiguity(name: str, carriers: Iterable[str]) -> str:
    """The line that refuses a name several sites carry, listing their ids."""
    ids = sorted(carriers)
    return f"{len(ids)} sites are named {name}: give the site id: {', '.join(ids)}"


def check_unambiguous(entries: Iterable[str], names: Mapping[str, str]) -> None:
    """ValueError for the first entry that is a name several known sites carry (an unknown one is fine)."""
    index = by_name(names)
    for entry in entries:
        if entry not in names and len(index.get(entry, ())) > 1:
            raise ValueError(ambiguity(entry, index[entry]))


def notes(policy: tuple[str, ...], names: Mapping[str, str]) -> tuple[str, ...]:
    """What status says about a policy's entries that admit nobody now: ambiguous, or unknown."""
    if not policy:
        return ()
    index = by_name(names)
    said = []
    for entry in policy:
        if entry in names:
            continue
        carriers = index.get(entry, ())
        if len(carriers) > 1:
            said.append(f"{entry!r} admits no site: {ambiguity(entry, carriers)}")
        elif not carriers:
            said.append(f"{entry!r} names no site known here yet")
    return tuple(said)


def site_label(site_id: str, names: Mapping[str, str], index: Mapping[str, tuple[str, ...]]) -> str:
    """A site as status shows it: its name, with its short id when another known site carries the name too."""
    name = names.get(site_id)
    if name is None:
        return site_id[:8]
    return f"{name} ({site_id[:8]})" if len(index.get(name, ())) > 1 else name
