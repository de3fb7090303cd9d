"""`Outstanding`: the count of a provider's flows that `Router.using` takes, which never leaks."""

import collections

import pytest

from fabric.router.router import Outstanding


def test_the_count_lasts_as_long_as_the_block_however_it_ends():
    counts: collections.Counter[str] = collections.Counter()
    with Outstanding(counts, "a"):
        assert counts["a"] == 1
    assert counts["a"] == 0
    with pytest.raises(KeyError), Outstanding(counts, "a"):
        raise KeyError("boom")
    assert counts["a"] == 0


def test_a_count_handed_off_outlives_the_block_until_released_once():
    counts: collections.Counter[str] = collections.Counter()
    with Outstanding(counts, "a") as use:
        held = use.hand_off()
    assert counts["a"] == 1
    held.release()
    held.release()
    assert counts["a"] == 0


def test_a_block_that_fails_after_handing_off_undoes_the_count_and_the_holder_cannot_undo_it_again():
    counts: collections.Counter[str] = collections.Counter()
    with pytest.raises(ValueError), Outstanding(counts, "a") as use:
        held = use.hand_off()
        raise ValueError("after the hand-off")
    assert counts["a"] == 0
    held.release()
    assert counts["a"] == 0


def test_a_holder_may_enter_it_again_and_it_ends_with_that_block_unless_handed_off_again():
    counts: collections.Counter[str] = collections.Counter()
    with Outstanding(counts, "a") as use:
        use.hand_off()
    with use:
        use.hand_off()
    assert counts["a"] == 1
    with use:
        pass
    assert counts["a"] == 0
