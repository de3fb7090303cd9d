"""errors.sole_exception: the one failure inside (nested) exception groups."""

import pytest

from fabric.errors import sole_exception


class Skip(BaseException):
    pass


def test_the_one_leaf_of_nested_groups():
    leaf = ValueError("x")
    assert sole_exception(BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [leaf])])) is leaf


@pytest.mark.parametrize(
    "group",
    [
        ExceptionGroup("two", [ValueError(), KeyError()]),
        ExceptionGroup("nested two", [ExceptionGroup("inner", [ValueError()]), KeyError()]),
    ],
)
def test_several_leaves_are_none(group):
    assert sole_exception(group) is None


def test_ignored_types_are_left_out():
    leaf = ValueError("x")
    group = BaseExceptionGroup("g", [Skip(), BaseExceptionGroup("inner", [leaf, Skip()])])
    assert sole_exception(group) is None
    assert sole_exception(group, ignore=Skip) is leaf
    assert sole_exception(BaseExceptionGroup("g", [Skip()]), ignore=Skip) is None
