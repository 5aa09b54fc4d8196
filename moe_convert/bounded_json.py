"""The one JSON reader: every JSON moe-convert reads (config.json, the index, safetensors headers, job files,
the journal, the manifest, an output's config.json) is parsed here, bounded and strict.

Bounded: the file's size is checked before it is read, integers longer than MAX_INT_DIGITS digits are
refused before Python converts them (its own limit, 4300 digits, fails with a traceback), and nesting
deeper than MAX_DEPTH is refused. Strict like the safetensors library's parser (serde_json): UTF-8
without a byte order mark, no duplicate keys (json.loads would silently keep the last copy), no NaN or
Infinity, no number too large for a float, no lone UTF-16 surrogate in a string. A refused number is
named by its place (`rope_parameters.rope_theta is Infinity, ...`). What is accepted can be written back
as JSON unchanged (a manifest stores the source's config.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import MoeConvertError
from .files import read_regular

# config.json and the index are a few KB to a few hundred KB; a bigger one is corrupt or hostile.
MAX_JSON_BYTES = 64 * 1024 * 1024
# 2**64 has 20 digits; nothing a model or a manifest holds needs more.
MAX_INT_DIGITS = 64
# serde_json (the safetensors library's parser) refuses 128 levels of nesting.
MAX_DEPTH = 127


class _Refused(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"key {_short(key)} appears twice in one object (which copy counts is ambiguous)")
            seen.add(key)
    return obj


class _Bad(str):
    """A number the parser must not turn into a value: kept as its text, reported with its place."""

    def __new__(cls, text: str, problem: str) -> _Bad:
        bad = super().__new__(cls, text)
        bad.problem = problem
        return bad

    problem: str


def _int(text: str) -> int | _Bad:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:  # never handed to int(): past 4300 digits it raises, and it is slow
        return _Bad(text, f"an integer with {digits} digits (more than {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float | _Bad:
    value = float(text)
    if not math.isfinite(value):
        return _Bad(text, f"{_short(text)}, too large for a float: numbers must be finite (inf is not)")
    return value


def _constant(text: str) -> _Bad:
    return _Bad(text, f"{text}, which is not JSON: numbers must be finite (inf and nan are not)")


def _short(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def parse_json(data: bytes, where: str, error: type[MoeConvertError], *, hint: str = "") -> Any:
    """Parse `data`; every way it can be bad becomes one `error` line starting with `where`."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise error(f"{where}: starts with a UTF-8 byte order mark, which JSON does not allow{hint}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid JSON (not UTF-8: {e.reason} at byte {e.start}){hint}") from e
    try:
        value = json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Refused as e:
        raise error(f"{where}: not valid JSON ({e}){hint}") from e
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e}){hint}") from e
    except RecursionError as e:  # "[[[[..." nested deeper than the parser's stack
        raise error(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep){hint}") from e
    problem = _check_tree(value)
    if problem:
        raise error(f"{where}: not valid JSON ({problem}){hint}")
    return value


def _check_tree(value: Any) -> str | None:
    """Numbers, depth and strings, walked without recursion (the parser already bounded the size)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, _Bad):
            return f"{path or 'the document'} is {v.problem}"
        if isinstance(v, dict):
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            for k, item in v.items():
                if not _utf8(k):
                    return f"a key in {path or 'the document'} holds a lone UTF-16 surrogate escape"
                stack.append((item, depth + 1, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, str) and not _utf8(v):
            return f"{path or 'the document'} holds a lone UTF-16 surrogate escape"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_json(
    path: Path,
    error: type[MoeConvertError],
    *,
    limit: int = MAX_JSON_BYTES,
    follow_symlinks: bool = True,
    hint: str = "",
) -> Any:
    """Read a JSON file: a regular file (never a FIFO or device), at most `limit` bytes, parsed strictly."""
    data = read_regular(path, error, limit=limit, follow_symlinks=follow_symlinks, hint=hint)
    return parse_json(data, str(path), error, hint=hint)


def read_json_object(
    path: Path,
    error: type[MoeConvertError],
    *,
    limit: int = MAX_JSON_BYTES,
    follow_symlinks: bool = True,
    hint: str = "",
) -> dict[str, Any]:
    """`read_json`, refusing anything but an object at the top."""
    value = read_json(path, error, limit=limit, follow_symlinks=follow_symlinks, hint=hint)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {json_type(value)}{hint}")
    return value


def json_type(value: object) -> str:
    """`a list`, `a string`, `null`, ... for messages."""
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}
