"""`plan_service_sync`: which routing keys offered elsewhere get an automatic listener, charged to which site.

Pure: offers and holds in, a plan out. Sites are named by letters here (they
are site ids in a site); F is the flooder, H and G honest providers.
"""

from __future__ import annotations

import collections

import pytest

from fabric.proxy.sync import (
    SYNC_CAP,
    SYNC_LOW_PORT,
    SYNC_SITE_LIMIT,
    SyncHold,
    plan_service_sync,
)

TOTAL, PER_SITE = 128, 32  # the defaults of Settings


def plan(offers, holds=None, *, total=TOTAL, per_site=PER_SITE):
    return plan_service_sync(offers, holds or {}, total=total, per_site=per_site)


def flood(site: str, count: int, port: int = 20000) -> dict[str, dict[str, tuple[int, str]]]:
    return {f"{site}-{i:04d}": {site: (port + i, "tcp")} for i in range(count)}


def charges(result) -> collections.Counter:
    return collections.Counter(hold.provider for hold in result.holds.values())


def test_one_site_offering_1100_keys_gets_its_share_and_the_rest_say_why():
    result = plan(flood("F", 1100))
    assert len(result.new) == PER_SITE == len(result.holds)
    assert result.new == tuple(f"F-{i:04d}" for i in range(PER_SITE))  # its own keys, in name order
    assert len(result.refused) == 1100 - PER_SITE
    assert {r.cause for r in result.refused.values()} == {SYNC_SITE_LIMIT}
    assert result.refused["F-1099"].port == 21099 and result.refused["F-1099"].providers == ("F",)


@pytest.mark.parametrize("prefix", ["a", "z"])  # the honest keys before the flooder's in name order, or after
def test_a_flooder_that_also_offers_the_honest_keys_spends_only_its_own_share(prefix):
    honest = {f"{prefix}{i}": {"H": (18000 + i, "tcp"), "F": (19000 + i, "tcp")} for i in range(PER_SITE)}
    result = plan(flood("F", 1100) | honest)
    assert all(key in result.holds for key in honest)  # every honest key is listened for
    assert charges(result)["F"] <= PER_SITE and charges(result)["H"] <= PER_SITE
    assert all(key in honest for key, hold in result.holds.items() if hold.provider == "H")  # H pays for its own


def test_a_shared_key_refused_for_the_flooder_is_charged_to_the_provider_with_room():
    first = plan(flood("F", 100) | {"web": {"F": (19000, "tcp")}})
    assert first.refused["web"].cause == SYNC_SITE_LIMIT
    second = plan(flood("F", 100) | {"web": {"F": (19000, "tcp"), "H": (18080, "tcp")}}, first.holds)
    assert second.new == ("web",) and second.holds["web"] == SyncHold("H", 18080, "tcp")


def test_sites_filling_the_cap_at_once_share_it():
    offers = {}
    for site in "ABCDEFGH":
        offers |= flood(site, 40)
    result = plan(offers)
    assert len(result.holds) == TOTAL
    assert set(charges(result).values()) == {TOTAL // 8}  # 16 each, none left out
    assert {r.cause for r in result.refused.values()} == {SYNC_CAP}


@pytest.mark.parametrize(
    ("offered", "port"),
    [
        ({"H": (18081, "tcp"), "F": (18000, "tcp")}, 18081),  # a second provider's lower port: not moved
        ({"H": (18082, "tcp")}, 18081),  # its provider's own new hint: not moved while it is offered
        ({"F": (18000, "tcp")}, 18081),  # its provider withdrew it: kept, charged to the one left
        ({"F": (18000, "http")}, 18081),  # nor is its protocol changed
    ],
)
def test_a_listener_stays_on_its_port_while_its_key_is_offered_at_all(offered, port):
    holds = {"api": SyncHold("H", 18081, "tcp")}
    result = plan({"api": offered}, holds)
    assert result.new == () and not result.refused
    assert (result.holds["api"].port, result.holds["api"].protocol) == (port, "tcp")
    assert result.holds["api"].provider in offered


def test_a_listener_goes_with_the_last_offer():
    result = plan({}, {"api": SyncHold("H", 18081, "tcp")})
    assert result.holds == {} and result.new == ()


def test_a_listener_is_never_closed_to_make_room():
    holds = plan(flood("F", PER_SITE)).holds
    result = plan(flood("F", PER_SITE) | flood("H", 5), holds, total=PER_SITE)
    assert result.holds.keys() >= holds.keys() and result.new == ()
    assert {r.cause for r in result.refused.values()} == {SYNC_CAP}


def test_a_flooder_changing_its_records_binds_nothing_again():
    holds = plan(flood("F", 1100)).holds
    for shift in range(1, 5):  # new port hints, and keys that come and go
        result = plan(flood("F", 1100, port=20000 + shift) | {f"F-new-{shift}": {"F": (30000 + shift, "tcp")}}, holds)
        assert result.new == () and result.holds == holds


def test_ports_below_1024_are_never_taken():
    result = plan({"ssh": {"F": (22, "tcp")}, "web": {"F": (80, "tcp"), "H": (8080, "tcp")}})
    assert result.refused["ssh"].cause == SYNC_LOW_PORT and result.refused["ssh"].port == 22
    assert result.holds["web"] == SyncHold("H", 8080, "tcp")


def test_a_port_that_could_not_be_bound_is_tried_again_only_when_the_offer_changes():
    failed = {"api": SyncHold("H", 18081, "tcp", error="listener api cannot listen on 127.0.0.1:18081: in use")}
    same = plan({"api": {"H": (18081, "tcp")}}, failed)
    assert same.new == () and same.holds == failed  # still charged to H, still failed
    moved = plan({"api": {"H": (18082, "tcp")}}, failed)
    assert moved.new == ("api",) and moved.holds["api"] == SyncHold("H", 18082, "tcp")


def test_http_only_when_every_provider_speaks_it():
    result = plan({"web": {"H": (8080, "http"), "G": (8080, "http")}, "mixed": {"H": (8081, "http"), "G": (8081, "tcp")}})
    assert result.holds["web"].protocol == "http" and result.holds["mixed"].protocol == "tcp"
