"""Typed, bounded access to fields of JSON we wrote earlier (manifest, journal) and may find edited.

Each getter returns the value or raises Malformed naming the field and what it holds, so a damaged
manifest or journal becomes one line instead of a traceback or a loop over a hostile number.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .limits import MAX_INDEX

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Malformed(Exception):
    """A field that does not hold what it must; the message names the field."""


def show(v: object, limit: int = 80) -> str:
    """A JSON value for a message, cut to `limit` characters."""
    text = json.dumps(v, sort_keys=True) if isinstance(v, dict | list | str | int | float | None) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def obj(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise Malformed(f"{what} is {show(v)}, not an object")
    return v


def lst(v: object, what: str, *, max_len: int | None = None) -> list[Any]:
    if not isinstance(v, list):
        raise Malformed(f"{what} is {show(v)}, not a list")
    if max_len is not None and len(v) > max_len:
        raise Malformed(f"{what} has {len(v)} entries, over the limit of {max_len}")
    return v


def integer(v: object, what: str, *, hi: int = MAX_INDEX, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise Malformed(f"{what} is {show(v)}, not an integer >= {lo}")
    if v > hi:
        raise Malformed(f"{what} {v} is over the limit of {hi}")
    return v


def ints(v: object, what: str, n: int | None = None, *, hi: int = MAX_INDEX, max_len: int = 64) -> tuple[int, ...]:
    items = lst(v, what, max_len=max_len)
    if n is not None and len(items) != n:
        raise Malformed(f"{what} is {show(v)}, not a list of {n} integers")
    return tuple(integer(x, what, hi=hi) for x in items)


def text(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise Malformed(f"{what} is {show(v)}, not a string")
    return v


def boolean(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise Malformed(f"{what} is {show(v)}, not true or false")
    return v


def sha256_hex(v: object, what: str) -> str:
    if not isinstance(v, str) or not _SHA256.fullmatch(v):
        raise Malformed(f"{what} is {show(v)}, not a sha256 (64 lowercase hex digits)")
    return v


def as_dict(v: object) -> dict[str, Any]:
    """`v` if it is an object, else an empty one (for comparisons that report the difference themselves)."""
    return v if isinstance(v, dict) else {}
