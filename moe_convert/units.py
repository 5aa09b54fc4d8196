"""How sizes, counts and durations read in every human-facing line: one unit system, decimal.

Decimal units (1 GB = 10^9 bytes), as disk vendors and model cards use (281 GB for Mixtral-8x22B in bf16).
Exact byte counts stay exact where a number identifies something (an offset, a file size in a mismatch).
"""

from __future__ import annotations

_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def human_bytes(n: float) -> str:
    """`4.21 GB`, `316.00 MB`, `258 B`: the largest unit under which the number is at least 1."""
    for unit in _UNITS:
        text = f"{n:.0f}" if unit == "B" else f"{n:.2f}"
        if abs(float(text)) < 1000 or unit == _UNITS[-1]:  # as printed: 999.996 KB is 1.00 MB
            return f"{text} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    return f"{human_bytes(bytes_per_second)}/s"


def human_seconds(s: float) -> str:
    """`0.4 s`, `42 s`, `3 min 05 s`, `2 h 07 min`."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def count(n: int, singular: str, plural: str | None = None) -> str:
    """`1 rank file`, `8 rank files`, `2 problems`."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"
