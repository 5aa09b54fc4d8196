"""One small hierarchy of domain errors; the CLI turns each into one line and an exit code.

An error keeps everything it found (`problems`, and the full message); `brief()` is the line a person
reads, cut to a budget: a list in it keeps its first items, then says how many more there are.
"""

from __future__ import annotations

# One error line: a message up to MESSAGE_LIMIT characters is printed whole (a few problems, each with its
# path and numbers); a longer one (a list of 48 tensors) is cut to about MESSAGE_BUDGET. `--debug` (the
# traceback) and `--json` (`error`, `problems`) give everything.
MESSAGE_BUDGET = 300
MESSAGE_LIMIT = 400

_CLOSE = {"[": "]", "(": ")", "{": "}"}


class MoeConvertError(Exception):
    """Base of every error this project raises on purpose. `exit_code` is what the CLI exits with.

    `problems` lists every problem found, one per item; an error about one thing lists its message.
    """

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None, *, summary: str | None = None) -> None:
        self.problems = list(problems) if problems else [message]
        self.summary = summary  # what several problems have in common (see `collect`)
        super().__init__(message)

    def brief(self, budget: int = MESSAGE_BUDGET, limit: int = MESSAGE_LIMIT) -> str:
        """The message if it has at most `limit` characters, else cut to `budget`: the first problems, then
        "and N more problems"."""
        if len(str(self)) <= max(limit, budget):
            return str(self)
        if self.summary is None or len(self.problems) < 2:
            return shorten(str(self), budget)
        head = f"{self.summary} ({len(self.problems)} problems): "
        return head + _keep_first(self.problems, "; ", budget - len(head), noun=" problems")


class UsageError(MoeConvertError):
    """A bad option or combination of options (exit 2, like click's usage errors)."""

    exit_code = 2


class MappingError(UsageError):
    """The parallel mapping does not fit the model (sizes, divisibility)."""


class ConfigError(MoeConvertError):
    """config.json is missing, unreadable, or not a supported model."""


class CheckpointError(MoeConvertError):
    """The source checkpoint (index, shards, safetensors headers, tensors) is broken or unexpected."""


class OutputError(MoeConvertError):
    """The output directory cannot be written safely."""


class VerifyError(MoeConvertError):
    """A converted checkpoint does not match its manifest or its source."""


def collect(problems: list[str], error: type[MoeConvertError], summary: str, *, where: str = "") -> None:
    """Raise `error` listing every problem at once, or return if there are none.

    `where` (a file, an option) starts the message of a single problem; `summary` should name it too.
    """
    if not problems:
        return
    if len(problems) == 1:
        raise error(f"{where}: {problems[0]}" if where else problems[0], problems)
    raise error(f"{summary} ({len(problems)} problems): " + "; ".join(problems), problems, summary=summary)


def shorten(text: str, budget: int = MESSAGE_BUDGET) -> str:
    """`text` in at most `budget` characters, cut where it lists things.

    Messages list problems separated by "; " and names separated by ", ". A list (three items or more:
    two are more likely a sentence's clauses) that does not fit keeps its first items and ends with
    "and N more"; a first item too long on its own is shortened the same way, and as a last resort
    cut by characters.
    """
    if len(text) <= budget:
        return text
    for sep in ("; ", ", "):
        items = _split(text, sep)
        if len(items) > 2:
            return _keep_first(items, sep, budget)
    return _cut(text, budget)


def _keep_first(items: list[str], sep: str, budget: int, noun: str = "") -> str:
    """As many leading items as fit in `budget`, then "and N more"."""
    kept = ""
    for i, item in enumerate(items):
        left = len(items) - i - 1
        candidate = f"{kept}{sep}{item}" if kept else item
        if len(candidate) + (len(f"{sep}and {left} more{noun}") if left else 0) <= budget:
            kept = candidate
            continue
        if kept:
            return f"{kept}{sep}and {left + 1} more{noun}"
        tail = f"{sep}and {left} more{noun}" if left else ""
        return shorten(item, budget - len(tail)) + tail
    return kept


def _cut(text: str, budget: int) -> str:
    cut = max(budget - 3, 0)
    return text[:cut] + "..."


def _split(text: str, sep: str) -> list[str]:
    """`text` split at `sep`, except inside brackets or quotes (a shape `[48, 32]` stays whole)."""
    items, start, stack, quote, i = [], 0, [], "", 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"" and (i == 0 or not text[i - 1].isalnum()):
            quote = c
        elif c in _CLOSE:
            stack.append(_CLOSE[c])
        elif stack and c == stack[-1]:
            stack.pop()
        elif not stack and text.startswith(sep, i):
            items.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    items.append(text[start:])
    return items
