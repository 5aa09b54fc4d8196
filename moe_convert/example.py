"""Tiny but real checkpoints of each supported family, built with transformers, for the quick start and tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .architectures import Rules, all_rules

DEFAULT_FAMILY = "mixtral"


def family_names() -> list[str]:
    """The families `build_example_checkpoint` can build: the `name` of every rules file."""
    return [rules["name"] for rules in all_rules()]


def family_rules(family: str) -> Rules:
    for rules in all_rules():
        if rules["name"] == family:
            return rules
    raise ValueError(f"unknown family {family!r}; known: {', '.join(family_names())}")


def tiny_config(family: str = DEFAULT_FAMILY) -> dict[str, Any]:
    """The tiny model's config fields (the rules file's `example`)."""
    return dict(family_rules(family)["example"])


TINY_CONFIG: dict[str, Any] = tiny_config()  # the default tiny Mixtral


def build_example_checkpoint(
    path: str | Path,
    *,
    family: str = DEFAULT_FAMILY,
    seed: int = 0,
    dtype: str = "float32",
    fused_experts: bool = False,
    transformers4_config: bool = False,
    random_vectors: bool = False,
    max_shard_size: str = "200KB",
    **overrides: Any,
) -> Path:
    """Save a randomly initialised model of `family` with several shards and an index.

    Args:
        path: directory to create.
        family: the rules' family name: mixtral, qwen2_moe or qwen3_moe.
        seed: torch seed for the weights.
        dtype: float32, float16 or bfloat16.
        fused_experts: save the transformers-5 fused expert layout (`save_original_format=False`).
        transformers4_config: rewrite config.json with transformers-4 keys (`rope_theta`, `torch_dtype`).
        random_vectors: norm weights and biases random too (transformers starts them at ones and zeros,
            which would let a forward-pass test miss one put in the wrong place).
        max_shard_size: passed to save_pretrained, so small models still get several shards.
        overrides: config fields replacing the family's tiny ones.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a tiny model saves at once

    path = Path(path)
    rules = family_rules(family)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(rules["model_types"][0], **{**rules["example"], **overrides})
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()  # type: ignore[no-untyped-call]
    if random_vectors:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.5)
                elif param.ndim == 1:  # a norm's weight
                    param.uniform_(0.5, 1.5)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
    if fused_experts:
        kwargs["save_original_format"] = False
    model.save_pretrained(path, **kwargs)
    if transformers4_config:
        _rewrite_as_transformers4(path / "config.json")
    return path


def _rewrite_as_transformers4(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 1e6)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.36.0"
    config_path.write_text(json.dumps(cfg, indent=2))
