"""Per-family weight rules, kept as JSON data next to this file (shipped as package data)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from ..errors import ConfigError

Rules = dict[str, Any]


@cache
def all_rules() -> tuple[Rules, ...]:
    files = sorted(
        (f for f in resources.files(__package__).iterdir() if f.name.endswith(".json")), key=lambda f: f.name
    )
    return tuple(json.loads(f.read_text(encoding="utf-8")) for f in files)


def supported_architectures() -> list[str]:
    return sorted(a for rules in all_rules() for a in rules["hf_architectures"])


def rules_for(architectures: list[str], model_type: str | None, where: str) -> Rules:
    """The rules whose HF architecture (or, failing that, model_type) matches the config."""
    for rules in all_rules():
        if set(architectures) & set(rules["hf_architectures"]):
            return rules
    for rules in all_rules():
        if not architectures and model_type in rules["model_types"]:
            return rules
    found = ", ".join(architectures) or f"model_type {model_type!r}"
    raise ConfigError(f"{where}: unsupported architecture {found}; supported: {', '.join(supported_architectures())}")
