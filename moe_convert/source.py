"""The input checkpoint: config via transformers, the shard list from the index, safetensors headers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architectures import Rules, rules_for
from .errors import CheckpointError, ConfigError, MoeConvertError
from .header import TensorInfo, read_header

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# config.json and the index are a few KB to a few hundred KB; a bigger one is corrupt or hostile.
MAX_JSON_BYTES = 64 * 1024 * 1024


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
    hub_id: str | None = None  # set when --model_dir was a hub repo id
    revision: str | None = None  # the hub commit hash it resolved to

    def file_sizes(self) -> dict[str, int]:
        return {f.name: f.stat().st_size for f in self.files}


def load_json_file(path: Path, error: type[MoeConvertError], hint: str = "") -> Any:
    """A small JSON file of the checkpoint; every way it can be unreadable becomes `error` naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes, over the {MAX_JSON_BYTES} byte limit for this file{hint}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){hint}") from e
    except RecursionError as e:
        raise error(f"{path}: not valid JSON (nested too deeply){hint}") from e
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from e


def check_within(model_dir: Path, path: Path, error: type[MoeConvertError]) -> None:
    """Refuse a file of the checkpoint that resolves outside it (a symlink), the hub cache's blobs excepted."""
    root = model_dir.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{path}: cannot resolve: {e}") from e
    if not any(real.is_relative_to(r) for r in (root, *_hub_blobs(root))):
        raise error(f"{path}: resolves to {real}, outside the model directory (a symlink?); refusing it")


def read_config(model_dir: Path) -> ModelSpec:
    """Read config.json through transformers (old and new key spellings) after checking it ourselves."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --model_dir must hold a Hugging Face config.json")
    check_within(model_dir, path, ConfigError)
    raw = load_json_file(path, ConfigError)
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
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null means "the default"
    sizes = {k: raw[k] for k in [*rules["required_config_keys"], *optional] if k in raw}
    bad = [
        f"{k}={v!r}"
        for k, v in sizes.items()
        if not (v is None and k in optional) and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
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
        with _transformers_logs_to(where):
            cfg = AutoConfig.for_model(model_type, **cfg_dict)
    except Exception as e:  # transformers' validators raise many types (strict dataclass errors, AttributeError)
        detail = " ".join(str(e).split())  # their messages span lines; ours is one
        raise ConfigError(f"{where}: transformers rejects this config: {type(e).__name__}: {detail}") from e
    rope = getattr(cfg, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {rope!r}")
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope_theta is None:
        raise ConfigError(f"{where}: no rope_theta (or rope_parameters.rope_theta)")
    for key, value in (("rope_theta", rope_theta), ("rms_norm_eps", cfg.rms_norm_eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
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


@contextlib.contextmanager
def _transformers_logs_to(where: str) -> Iterator[None]:
    """Route transformers' log records and warnings about the config to our logger, one line each,
    instead of its own stderr handler (which would break the one-line error contract)."""
    tf_log = logging.getLogger("transformers")

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.log(record.levelno, "%s: transformers: %s", where, " ".join(record.getMessage().split()))

    saved = tf_log.handlers[:], tf_log.propagate
    tf_log.handlers[:], tf_log.propagate = [Forward()], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            log.warning("%s: transformers: %s", where, " ".join(str(w.message).split()))
    finally:
        tf_log.handlers[:], tf_log.propagate = saved


def _hub_blobs(root: Path) -> list[Path]:
    """A hub cache snapshot (`models--o--n/snapshots/<commit>`) links its files into the repo's `blobs/`."""
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return [(repo / "blobs").resolve()]
    return []


def _inside(model_dir: Path, name: str) -> Path:
    """The shard path `name` of the index, refusing anything that resolves outside the model dir."""
    if not name or "\x00" in name:
        raise CheckpointError(f"{model_dir / INDEX_FILE}: shard path {name!r} is not a valid file name")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(
            f"{model_dir / INDEX_FILE}: shard path {name!r} points outside the model directory; refusing it"
        )
    if name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{model_dir / INDEX_FILE}: shard {name!r} is a pickle checkpoint; safetensors is required and "
            "pickles are never loaded. Convert it to safetensors first"
        )
    path = model_dir / name
    check_within(model_dir, path, CheckpointError)
    return path


def shard_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard list (from the index when there is one) and the index's weight map."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        check_within(model_dir, index_path, CheckpointError)
        index = load_json_file(index_path, CheckpointError, "; re-download it")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: no 'weight_map' object of tensor name -> shard file; re-download the index"
            )
        if not weight_map:
            raise CheckpointError(f"{index_path}: the 'weight_map' is empty; re-download the index")
        files = list(dict.fromkeys(_inside(model_dir, n) for n in weight_map.values()))
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
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    found = f" (found {', '.join(others[:3])}, but without an index nothing says they are the shards)" if others else ""
    raise CheckpointError(f"{model_dir}: no {INDEX_FILE} and no {SINGLE_FILE}{found}; nothing to convert")


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
            if name not in tensors or tensors[name].file != model_dir / shard
        ]
        if problems:
            raise CheckpointError(
                f"{model_dir / INDEX_FILE}: tensors listed in the index are not in the named shard: "
                + ", ".join(problems[:10])
                + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
            )
    return SourceCheckpoint(model_dir=model_dir, spec=spec, tensors=tensors, files=tuple(files))
