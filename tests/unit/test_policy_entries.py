"""Access policy entries resolved against the sites a site knows (router/policy.py): pure, no sockets."""

from __future__ import annotations

import pytest

from fabric.router.policy import (
    ambiguity,
    by_name,
    check_unambiguous,
    notes,
    resolve,
    site_label,
    sites_admitted,
)

A, B1, B2, C = "a" * 32, "b1" + "0" * 30, "b2" + "0" * 30, "c" * 32
NAMES = {A: "a", B1: "b", B2: "b", C: "c"}  # site id -> name: two sites carry "b"
INDEX = by_name(NAMES)


@pytest.mark.parametrize(
    "entry, sites",
    [
        ("a", (A,)),  # a name one known site carries
        (A, (A,)),  # a site id
        (B1, (B1,)),  # an id names its site even when its name is shared
        ("b", ()),  # a name two known sites carry: neither
        ("d", ()),  # a name no known site carries (yet)
        ("d" * 32, ()),  # an id no known site has (yet)
    ],
)
def test_an_entry_names_its_site_by_id_or_by_a_name_only_one_known_site_carries(entry, sites):
    assert resolve(entry, NAMES, INDEX) == sites


def test_a_policy_admits_the_union_of_what_its_entries_name():
    assert sites_admitted(("a", "b", B2, "d"), NAMES, INDEX) == {A, B2}
    assert sites_admitted(("b",), NAMES, INDEX) == frozenset()


def test_a_name_that_becomes_ambiguous_stops_admitting_and_one_that_appears_starts():
    before = {A: "a", B1: "b"}
    assert sites_admitted(("b", "c"), before, by_name(before)) == {B1}
    assert sites_admitted(("b", "c"), NAMES, INDEX) == {C}


def test_ambiguous_names_are_refused_with_every_id_and_unknown_ones_are_not():
    check_unambiguous(("a", "d", B1, B2), NAMES)
    with pytest.raises(ValueError) as refused:
        check_unambiguous(("a", "b"), NAMES)
    assert str(refused.value) == f"2 sites are named b: give the site id: {B1}, {B2}"
    assert ambiguity("b", [B2, B1]) == str(refused.value)


def test_notes_say_why_an_entry_admits_nobody():
    assert notes(("a", A, "b", "d"), NAMES) == (
        f"'b' admits no site: 2 sites are named b: give the site id: {B1}, {B2}",
        "'d' names no site known here yet",
    )
    assert notes((), NAMES) == ()


def test_a_label_adds_the_short_id_only_to_a_shared_name():
    assert site_label(A, NAMES, INDEX) == "a"
    assert site_label(B1, NAMES, INDEX) == f"b ({B1[:8]})"
    assert site_label("e" * 32, NAMES, INDEX) == "e" * 8
