"""What a plan is made from: real safetensors headers, or, with no shards at hand, headers implied by config.json.

The planner only needs each source tensor's dtype and shape. The architecture rules already say what shape
every tensor has in terms of the config's sizes, so a config.json alone (e.g. the 141 B Mixtral-8x22B one,
without its 281 GB of shards) is enough to plan, size and check a conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, UsageError
from .hub import ResolvedModel, resolve_model_dir
from .model_config import ModelSpec, evaluate
from .plan import DTYPE_CODES, SourceTensor, expected_names, source_entries
from .source import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    SourceCheckpoint,
    load_config_json,
    load_json_file,
    open_source,
    spec_from_config_dict,
)

CONFIG_FILE = "config.json"


def read_config_file(path: Path) -> ModelSpec:
    """A config.json given by its own path (any file name)."""
    return spec_from_config_dict(load_config_json(path), str(path))


def expected_headers(spec: ModelSpec, dtype: str) -> dict[str, SourceTensor]:
    """Every source tensor the architecture rules expect, with the shape config.json implies.

    Experts take the architecture's classic per-expert layout (which the published checkpoints use); a
    tied lm_head is left out, as in a real tied checkpoint.
    """
    code = DTYPE_CODES[dtype]
    layouts = spec.rules["expert_layouts"]
    entries = source_entries(spec, "classic" if "classic" in layouts else next(iter(layouts)))
    dims = spec.dims()
    shapes = {key: tuple(evaluate(x, dims) for x in entry["shape"]) for key, entry in entries.items()}
    return {
        name: SourceTensor(code, shapes[key])
        for key, name, _, _ in expected_names(spec, entries)
        if not (entries[key].get("tied_to") and spec.tie_word_embeddings)
    }


def source_dtype(spec: ModelSpec, requested: str, where: str) -> str:
    """The dtype of the (absent) source tensors: config.json's, else the requested output dtype."""
    name = (spec.dtype or "").removeprefix("torch.")
    if name in DTYPE_CODES:
        return name
    if requested in DTYPE_CODES:
        return requested
    raise UsageError(
        f"{where}: config.json names no dtype (torch_dtype / dtype) and there are no shards to read it from; "
        "pass --dtype"
    )


@dataclass(frozen=True)
class PlanInput:
    """The model and source headers a plan is made from, and where they came from."""

    spec: ModelSpec
    headers: dict[str, SourceTensor]
    source: SourceCheckpoint | None  # None: sizes implied by config.json alone (no shards)
    config_path: Path
    hub_id: str | None = None
    revision: str | None = None

    @property
    def config_only(self) -> bool:
        return self.source is None

    def record(self) -> dict[str, Any]:
        """The manifest's `source` object (the same keys as a conversion's)."""
        files = [] if self.source is None else [{"name": n, "bytes": b} for n, b in self.source.file_sizes().items()]
        return {
            "path": str((self.config_path if self.source is None else self.source.model_dir).resolve()),
            "hub_id": self.hub_id,
            "revision": self.revision,
            "files": files,
            "config_only": self.config_only,
        }


def open_for_plan(
    model_dir_or_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str = "auto",
) -> PlanInput:
    """Headers for planning without reading tensor data.

    Accepts a checkpoint directory (its safetensors headers are read), a config.json file or a directory
    holding only config.json (headers implied by the config), or a hub id (config.json and the index are
    fetched; shards only if already in the cache).
    """
    given = Path(model_dir_or_id)
    if given.is_file():
        if revision is not None:
            raise UsageError(f"--revision applies to hub repo ids, not to the file {given}")
        spec = read_config_file(given)
        return PlanInput(spec, expected_headers(spec, source_dtype(spec, dtype, str(given))), None, given)
    resolved = resolve_model_dir(model_dir_or_id, revision, weights=False)
    path = resolved.path
    if _has_weights(path, resolved):
        source = open_source(path)
        headers = {n: SourceTensor(t.dtype, t.shape) for n, t in source.tensors.items()}
        return PlanInput(source.spec, headers, source, path / CONFIG_FILE, resolved.hub_id, resolved.revision)
    if not path.is_dir():
        open_source(path)  # raises the usual "does not exist" / "not a directory" message
    config = path / CONFIG_FILE
    if not config.exists():
        raise ConfigError(f"{config}: not found; --model_dir must hold a Hugging Face config.json (or be one)")
    spec = read_config_file(config)
    headers = expected_headers(spec, source_dtype(spec, dtype, str(config)))
    return PlanInput(spec, headers, None, config, resolved.hub_id, resolved.revision)


def _has_weights(path: Path, resolved: ResolvedModel) -> bool:
    """A local dir with any weight files is a checkpoint (open_source checks it is complete). A hub
    snapshot counts only if every shard is already cached: a dry run downloads no weights."""
    if not path.is_dir():
        return False
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if resolved.hub_id is None:
        return any(f.suffix in (".safetensors", *PICKLE_SUFFIXES) or f.name == INDEX_FILE for f in path.iterdir())
    if index.is_file():
        try:
            names = set(load_json_file(index, CheckpointError)["weight_map"].values())
        except (CheckpointError, KeyError, TypeError, AttributeError):
            return True  # let open_source report the broken index
        return bool(names) and all((path / str(n)).is_file() for n in names)
    return single.is_file()
