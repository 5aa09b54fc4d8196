"""The input checkpoint: config via transformers, the shard list from the index, safetensors headers."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architectures import Rules, rules_for
from .errors import CheckpointError, ConfigError
from .header import TensorInfo, read_header

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSpec:
    """The sizes and settings of the source model that planning and config.json need."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str | None  # torch dtype name from config.json (torch_dtype or dtype), if any
    architecture: str
    rules: Rules = field(repr=False, compare=False, hash=False)

    def dims(self) -> dict[str, int]:
        """Names usable in the shape expressions of the architecture rules."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
        }


@dataclass(frozen=True)
class SourceCheckpoint:
    """A local checkpoint directory, its model, and every tensor's location (headers only)."""

    model_dir: Path
    spec: ModelSpec
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]  # the shards, in index order

    def file_sizes(self) -> dict[str, int]:
        return {f.name: f.stat().st_size for f in self.files}


def read_config(model_dir: Path) -> ModelSpec:
    """Read config.json through transformers (old and new key spellings) after checking it ourselves."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --model_dir must hold a Hugging Face config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a {type(raw).__name__}")
    return spec_from_config_dict(raw, str(path))


def spec_from_config_dict(raw: dict[str, Any], where: str) -> ModelSpec:
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [str(architectures)]
    rules = rules_for([str(a) for a in architectures], raw.get("model_type"), where)
    missing = [k for k in rules["required_config_keys"] if k not in raw]
    if missing:
        raise ConfigError(f"{where}: required keys missing: {', '.join(missing)}")
    sizes = {k: raw[k] for k in [*rules["required_config_keys"], "num_key_value_heads", "head_dim"] if k in raw}
    bad = [
        f"{k}={v!r}"
        for k, v in sizes.items()
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
    ]
    if bad:
        raise ConfigError(f"{where}: sizes must be positive integers: {', '.join(bad)}")
    if raw["num_experts_per_tok"] > raw["num_local_experts"]:
        raise ConfigError(
            f"{where}: num_experts_per_tok {raw['num_experts_per_tok']} is larger than "
            f"num_local_experts {raw['num_local_experts']}"
        )
    from transformers import AutoConfig  # slow import; only once a config is known to be sane

    cfg_dict = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
    model_type = rules["model_types"][0]
    cfg_dict.pop("model_type", None)
    try:
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: transformers rejects this config: {e}") from e
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope_theta is None:
        raise ConfigError(f"{where}: no rope_theta (or rope_parameters.rope_theta)")
    rope_type = rope.get("rope_type", "default")
    scaling = None
    if rope_type not in (None, "default"):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif isinstance(raw.get("rope_scaling"), dict):
        scaling = raw["rope_scaling"]
    nh = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return ModelSpec(
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or nh),
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
        num_experts=int(cfg.num_local_experts),
        top_k=int(cfg.num_experts_per_tok),
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.max_position_embeddings),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        dtype=str(dtype) if dtype else None,
        architecture=rules["hf_architectures"][0],
        rules=rules,
    )


def _inside(model_dir: Path, name: str) -> Path:
    """The shard path `name` of the index, refusing anything that resolves outside the model dir."""
    root = model_dir.resolve()
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(
            f"{model_dir / INDEX_FILE}: shard path {name!r} points outside the model directory; refusing it"
        )
    path = model_dir / name
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(
            f"{model_dir / INDEX_FILE}: shard {name!r} resolves to {path.resolve()}, outside the model "
            "directory (a symlink?); refusing it"
        )
    return path


def shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard list (from the index when there is one) and the index's weight map."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: not valid JSON ({e}); re-download it") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
        names = list(dict.fromkeys(weight_map.values()))
        files = [_inside(model_dir, n) for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard files named in the index are missing: {', '.join(missing)}")
        listed = {f.name for f in files}
        for stray in sorted(model_dir.glob("*.safetensors")):
            if stray.name not in listed:
                log.debug("ignoring %s: not listed in %s", stray, INDEX_FILE)
        return files, weight_map
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [_inside(model_dir, SINGLE_FILE)], None
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles[:3])}); safetensors is required "
            "and pickles are never loaded. Convert them to safetensors first (e.g. save_pretrained "
            "with safe_serialization=True)"
        )
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} and no {SINGLE_FILE}; nothing to convert")


def open_source(model_dir: Path) -> SourceCheckpoint:
    """Read config and every shard header; no tensor data is read."""
    if not model_dir.exists():
        raise ConfigError(f"{model_dir}: --model_dir does not exist")
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: --model_dir is not a directory")
    spec = read_config(model_dir)
    files, weight_map = shard_files(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is in two files: {tensors[name].file.name} and {f.name}; "
                    "the checkpoint is inconsistent"
                )
            tensors[name] = info
    if weight_map is not None:
        problems = [
            f"{name!r} (index says {shard})"
            for name, shard in weight_map.items()
            if name not in tensors or tensors[name].file.name != Path(shard).name
        ]
        if problems:
            raise CheckpointError(
                f"{model_dir / INDEX_FILE}: tensors listed in the index are not in the named shard: "
                + ", ".join(problems[:10])
                + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
            )
    return SourceCheckpoint(model_dir=model_dir, spec=spec, tensors=tensors, files=tuple(files))
