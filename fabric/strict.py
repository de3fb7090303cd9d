"""Values as a person or a peer wrote them: cattrs hooks that take scalars as written.

cattrs would coerce (`"7"` -> 7, `true` -> 1, `80.7` -> 80, `"yes"` -> True), which
turns a typo in a file into a different setting. With these hooks a value of the
wrong type is an error that names what was expected.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import cattrs

from .names import brief

_C = TypeVar("_C", bound=cattrs.Converter)


def _int(value: Any, _type: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {brief(value)}")
    return value


def _bool(value: Any, _type: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {brief(value)}")
    return value


def _float(value: Any, _type: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {brief(value)}")
    return float(value)


def _str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {brief(value)}")
    return value


def strict(converter: _C) -> _C:
    """`converter`, taking int, bool, float and str values only as exactly that type."""
    for type_, hook in ((int, _int), (bool, _bool), (float, _float), (str, _str)):
        converter.register_structure_hook(type_, hook)
    return converter
