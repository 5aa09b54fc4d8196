"""Text that came from a checkpoint, made safe for one line of a terminal or a CI log.

Tensor names, architecture names and paths come from files that strangers write. Printed raw, a newline
in a tensor name forges a second log line (CI runners treat lines like `::add-mask::` as commands) and an
escape sequence rewrites the terminal. Every line we print goes through `one_line`.
"""

from __future__ import annotations

import logging

MAX_LINE_CHARS = 100_000  # room for "every missing tensor" of a big model; a hostile name cannot flood the log

_SPECIAL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES: dict[int, str] = {c: _SPECIAL.get(chr(c), f"\\x{c:02x}") for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
# Unicode line breaks and bidirectional overrides (text that displays differently from what it is).
_UNICODE = (0x2028, 0x2029, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES.update({c: f"\\u{c:04x}" for c in _UNICODE})


def one_line(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """`text` with control characters and line breaks escaped, cut to `limit` characters."""
    out = text.translate(_ESCAPES)
    if len(out) > limit:
        out = f"{out[:limit]}... ({len(out) - limit} more characters)"
    return out


class OneLineFormatter(logging.Formatter):
    """Every log message on one line, escaped as `one_line` does (tracebacks, if any, stay as they are).
    With a `budget`, a message longer than errors.MESSAGE_LIMIT is cut to it where it lists things (see
    errors.shorten)."""

    def __init__(self, fmt: str | None = None, budget: int | None = None) -> None:
        super().__init__(fmt)
        self.budget = budget

    def formatMessage(self, record: logging.LogRecord) -> str:
        from .errors import MESSAGE_LIMIT, shorten

        text = super().formatMessage(record)
        return one_line(text if self.budget is None or len(text) <= MESSAGE_LIMIT else shorten(text, self.budget))
