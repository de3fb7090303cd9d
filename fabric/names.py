"""Names of sites, links, listeners, connectors and routing keys: one rule, checked wherever one enters.

A name is 1 to 63 letters, digits, '.', '_' and '-', starting with a letter or
a digit. Link names become directories under `links/`, and a token's site
name becomes a link name at the site that redeems it, so a name must be one
safe path component: nothing that passes can climb out of a directory ('..',
'/', NUL), hide in a listing (spaces, control characters) or be read as an
option ('-x'). 63 is a DNS label's bound, and a name fits a certificate's
organizationName (at most 64).

Bottom layer: imports nothing of fabric's.
"""

from __future__ import annotations

import re
from typing import Any

MAX_NAME_LENGTH = 63  # characters
PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (MAX_NAME_LENGTH - 1)  # whole: fullmatch
_NAME = re.compile(PATTERN)
RULE = f"1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit"


def why_bad_name(value: Any) -> str | None:
    """Why `value` is not a name (in words that end a sentence), or None if it is one."""
    if isinstance(value, str) and _NAME.fullmatch(value):
        return None
    return f"must be {RULE}, not {brief(value)}"


def check_name(value: Any, what: str = "name") -> str:
    """`value` if it is a name; else ValueError naming `what` and the rule."""
    why = why_bad_name(value)
    if why is not None:
        raise ValueError(f"{what} {why}")
    return value


def check_names(value: Any, what: str) -> None:
    """A tuple of names (or None): else TypeError or ValueError naming `what` and the entry at fault."""
    if value is None:
        return
    if not isinstance(value, tuple):
        raise TypeError(f"{what} must be a list, not {brief(value)}")
    for entry in value:
        check_name(entry, f"{what} entry")


def brief(value: Any, limit: int = 40) -> str:
    """A value from outside, quoted and cut short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
