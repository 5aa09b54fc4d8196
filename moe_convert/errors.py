"""One small hierarchy of domain errors; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class MoeConvertError(Exception):
    """Base of every error this project raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


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


def collect(problems: list[str], error: type[MoeConvertError], summary: str) -> None:
    """Raise `error` listing every problem at once, or return if there are none."""
    if not problems:
        return
    if len(problems) == 1:
        raise error(problems[0], problems)
    raise error(f"{summary} ({len(problems)} problems): " + "; ".join(problems), problems)
