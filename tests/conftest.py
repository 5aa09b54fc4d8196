"""Shared fixtures: tiny real Mixtral checkpoints built with transformers (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moe_convert.example import build_example_checkpoint

MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> MakeCheckpoint:
    """Build (once per session and argument set) a tiny checkpoint; see build_example_checkpoint."""
    cache: dict[str, Path] = {}

    def make(**kwargs: Any) -> Path:
        key = repr(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_example_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: MakeCheckpoint) -> Path:
    """The default tiny model: float32, classic expert names, several shards and an index."""
    return make_checkpoint()
