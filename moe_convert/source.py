"""The input checkpoint: its config.json, the shard list from the index, safetensors headers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bounded_json import MAX_JSON_BYTES, read_json
from .errors import CheckpointError, ConfigError, MoeConvertError
from .files import kind_of
from .header import TensorInfo, read_header
from .model_config import ModelSettings, ModelSpec, read_model

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class SourceCheckpoint:
    """A local checkpoint directory, its model, and every tensor's location (headers only)."""

    model_dir: Path
    spec: ModelSpec
    settings: ModelSettings
    tensors: dict[str, TensorInfo]
    files: tuple[Path, ...]  # the shards, in index order
    hub_id: str | None = None  # set when --model_dir was a hub repo id
    revision: str | None = None  # the hub commit hash it resolved to

    def file_sizes(self) -> dict[str, int]:
        return {f.name: f.stat().st_size for f in self.files}


def load_json_file(path: Path, error: type[MoeConvertError], hint: str = "") -> Any:
    """A small JSON file of the checkpoint (a regular file, bounded, strict); every way it can be
    unreadable becomes `error` naming it."""
    return read_json(path, error, limit=MAX_JSON_BYTES, hint=hint)


def check_within(model_dir: Path, path: Path, error: type[MoeConvertError]) -> None:
    """Refuse a file of the checkpoint that resolves outside it (a symlink), the hub cache's blobs excepted."""
    root = model_dir.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{path}: cannot resolve: {e}") from e
    if not any(real.is_relative_to(r) for r in (root, *_hub_blobs(root))):
        raise error(f"{path}: resolves to {real}, outside the model directory (a symlink?); refusing it")


def read_config(model_dir: Path) -> tuple[ModelSpec, ModelSettings]:
    """Read config.json: the sizes per the family's rules, then the settings (model_config.py: from the JSON,
    or through transformers where it must decide)."""
    path = model_dir / "config.json"
    if not path.exists():  # a FIFO or a directory there: load_json_file says what it is
        raise ConfigError(f"{path}: not found; --model_dir must hold a Hugging Face config.json")
    check_within(model_dir, path, ConfigError)
    return read_model(load_config_json(path), str(path))


def load_config_json(path: Path) -> dict[str, Any]:
    raw = load_json_file(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a {type(raw).__name__}")
    return raw


def spec_from_config_dict(raw: dict[str, Any], where: str) -> ModelSpec:
    """The planner's view of a config.json's contents, after every check of both reading steps."""
    return read_model(raw, where)[0]


def _hub_blobs(root: Path) -> list[Path]:
    """A hub cache snapshot (`models--o--n/snapshots/<commit>`) links its files into the repo's `blobs/`.

    Trusted only as huggingface_hub lays it out: `blobs` a real directory of the repo (a `blobs` that is
    itself a link, say to `/`, would open the whole file system).
    """
    repo = root.parent.parent
    if root.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return []
    blobs = repo / "blobs"
    if blobs.is_symlink() or not blobs.is_dir() or blobs.resolve() != repo.resolve() / "blobs":
        return []
    return [blobs.resolve()]


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
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index_path}: shard files named in the index are missing: {', '.join(missing)}")
        odd = [f"{f} ({kind_of(f.stat().st_mode)})" for f in files if not f.is_file()]
        if odd:
            raise CheckpointError(f"{index_path}: shards named in the index are not regular files: {', '.join(odd)}")
        listed = {f.name for f in files}
        for stray in sorted(model_dir.glob("*.safetensors")):
            if stray.name not in listed:
                log.debug("ignoring %s: not listed in %s", stray, INDEX_FILE)
        return files, weight_map
    single = model_dir / SINGLE_FILE
    if single.exists():
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
    spec, settings = read_config(model_dir)
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
    return SourceCheckpoint(model_dir=model_dir, spec=spec, settings=settings, tensors=tensors, files=tuple(files))
