"""A tiny but real Mixtral checkpoint built with transformers, for the quick start and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}


def build_example_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    fused_experts: bool = False,
    transformers4_config: bool = False,
    max_shard_size: str = "200KB",
    **overrides: Any,
) -> Path:
    """Save a randomly initialised MixtralForCausalLM with several shards and an index.

    Args:
        path: directory to create.
        seed: torch seed for the weights.
        dtype: float32, float16 or bfloat16.
        fused_experts: save the transformers-5 fused expert layout (`save_original_format=False`).
        transformers4_config: rewrite config.json with transformers-4 keys (`rope_theta`, `torch_dtype`).
        max_shard_size: passed to save_pretrained, so small models still get several shards.
        overrides: MixtralConfig fields replacing TINY_CONFIG's.
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a tiny model saves at once

    path = Path(path)
    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY_CONFIG, **overrides})
    model = MixtralForCausalLM(config).to(getattr(torch, dtype)).eval()
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
