"""Batch requests: `--mapping tp=8,moe_ep=8` strings, mapping dicts, and job files (YAML or JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ConfigError, MappingError, UsageError, collect
from .mapping import Mapping, resolve_mapping

# Accepted spellings of each size key, short first (`tp=8`), then the CLI's (`tp_size=8`).
_KEYS = {
    "tp": "tp_size",
    "pp": "pp_size",
    "moe_tp": "moe_tp_size",
    "moe_ep": "moe_ep_size",
}
# Keys of a job file and the type each value must have (mappings are checked on their own).
_JOB_KEYS: dict[str, type | tuple[type, ...]] = {
    "model_dir": str,
    "revision": (str, type(None)),
    "output_dir": str,
    "dtype": str,
    "use_parallel_embedding": bool,
    "embedding_sharding_dim": int,
    "workers": int,
    "no_direct_io": bool,
    "force": bool,
    "mappings": list,
}


@dataclass(frozen=True)
class MappingRequest:
    """One requested mapping of a batch; MoE sizes left None resolve as in the spec.

    `subdir` is where its files go under the batch output dir (default: the mapping's label,
    e.g. `tp8_pp1_moetp1_moeep8`).
    """

    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None
    subdir: str | None = None

    def resolve(self) -> Mapping:
        return resolve_mapping(self.tp_size, self.pp_size, self.moe_tp_size, self.moe_ep_size)

    def sizes(self) -> dict[str, int | None]:
        return {
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "moe_tp_size": self.moe_tp_size,
            "moe_ep_size": self.moe_ep_size,
        }

    def describe(self) -> str:
        """As the user would write it: `tp=8,moe_ep=8`."""
        parts = [f"tp={self.tp_size}"]
        if self.pp_size != 1:
            parts.append(f"pp={self.pp_size}")
        if self.moe_tp_size is not None:
            parts.append(f"moe_tp={self.moe_tp_size}")
        if self.moe_ep_size is not None:
            parts.append(f"moe_ep={self.moe_ep_size}")
        return ",".join(parts)

    def output_subdir(self) -> str:
        if self.subdir:
            return self.subdir
        try:
            return self.resolve().label()
        except MappingError:  # reported by the planner; any unique name will do meanwhile
            return self.describe().replace(",", "_").replace("=", "")


MappingLike = MappingRequest | Mapping | dict[str, Any] | str


def parse_mapping(text: str) -> MappingRequest:
    """`tp=8,moe_tp=2,moe_ep=4` (also `tp_size=8`, and `subdir=NAME`) -> a request."""
    fields: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--mapping {text!r}: {part!r} is not KEY=VALUE (e.g. tp=8,moe_ep=8)")
        fields[key.strip()] = value.strip()
    return mapping_from_dict(fields, f"--mapping {text!r}")


def mapping_from_dict(raw: dict[str, Any], where: str = "mapping") -> MappingRequest:
    """A dict with keys tp/pp/moe_tp/moe_ep (or tp_size/...), and optional subdir (or output_dir)."""
    sizes: dict[str, int] = {}
    subdir: str | None = None
    problems = []
    for key, value in raw.items():
        if key in ("subdir", "output_dir"):
            subdir = _check_subdir(str(value), where)
            continue
        name = _KEYS.get(key, key)
        if name not in _KEYS.values():
            problems.append(f"unknown key {key!r} (use {', '.join(_KEYS)}, subdir)")
            continue
        if name in sizes:
            problems.append(f"{key} given twice")
            continue
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            sizes[name] = int(value)
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r} is not a whole number")
    if "tp_size" not in sizes and not problems:
        problems.append("tp is required (e.g. tp=8,moe_ep=8)")
    collect([f"{where}: {p}" for p in problems], UsageError, f"{where} is invalid")
    return MappingRequest(subdir=subdir, **sizes)


def as_request(m: MappingLike) -> MappingRequest:
    if isinstance(m, MappingRequest):
        return m
    if isinstance(m, Mapping):
        return MappingRequest(m.tp_size, m.pp_size, m.moe_tp_size, m.moe_ep_size)
    if isinstance(m, str):
        return parse_mapping(m)
    if isinstance(m, dict):
        return mapping_from_dict(m)
    raise UsageError(f"a mapping must be a dict, a 'tp=8,moe_ep=8' string or a Mapping, got {type(m).__name__}")


def _check_subdir(value: str, where: str) -> str:
    parts = PurePosixPath(value).parts
    if not value or value.startswith(("/", "~")) or ".." in parts or value in (".", "./") or "\\" in value:
        raise UsageError(
            f"{where}: subdir {value!r} must be a relative path inside the batch output dir (no '..', not '.')"
        )
    return value


def check_unique_subdirs(requests: Sequence[MappingRequest]) -> None:
    seen: dict[str, str] = {}
    problems = []
    for r in requests:
        sub = str(PurePosixPath(r.output_subdir()))
        if sub in seen:
            problems.append(f"{r.describe()} and {seen[sub]} both write into {sub!r}")
        seen.setdefault(sub, r.describe())
    collect(problems, UsageError, "the batch's output subdirectories collide")


@dataclass(frozen=True)
class JobFile:
    """A batch described in a file: one source, one output dir, several mappings, shared options."""

    model_dir: str
    output_dir: str
    mappings: tuple[MappingRequest, ...]
    options: dict[str, Any] = field(default_factory=dict)  # revision, dtype, workers, ... as given


def read_job_file(path: str | Path) -> JobFile:
    """Read a YAML (.yaml/.yml) or JSON job file; relative paths in it are relative to the current dir."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--job_file {path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--job_file {path}: not UTF-8 text ({e})") from e
    raw: object
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--job_file {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--job_file {path}: not valid JSON ({e}); YAML files must end in .yaml") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--job_file {path}: expected a mapping of keys at the top, found {type(raw).__name__}")
    problems = [f"unknown key {k!r} (known: {', '.join(_JOB_KEYS)})" for k in raw if k not in _JOB_KEYS]
    problems += [f"{k} is required" for k in ("model_dir", "output_dir", "mappings") if k not in raw]
    problems += [
        f"{k} must be {_type_names(_JOB_KEYS[k])}, found {v!r}"
        for k, v in raw.items()
        if k in _JOB_KEYS and k in raw and not _has_type(v, _JOB_KEYS[k])
    ]
    mappings = raw.get("mappings")
    if isinstance(mappings, list) and not mappings:
        problems.append("mappings is empty; list at least one (e.g. - {tp: 8, moe_ep: 8})")
    if not isinstance(mappings, list):
        mappings = []
    collect([f"--job_file {path}: {p}" for p in problems], ConfigError, f"--job_file {path} is invalid")
    requests = []
    for i, m in enumerate(mappings):
        where = f"--job_file {path}: mappings[{i}]"
        if isinstance(m, str):
            requests.append(parse_mapping(m))
        elif isinstance(m, dict):
            requests.append(mapping_from_dict(m, where))
        else:
            raise ConfigError(f"{where}: expected a mapping like {{tp: 8, moe_ep: 8}}, found {m!r}")
    options = {k: v for k, v in raw.items() if k not in ("model_dir", "output_dir", "mappings")}
    return JobFile(str(raw["model_dir"]), str(raw["output_dir"]), tuple(requests), options)


def _has_type(value: object, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and kind is int:
        return False
    return isinstance(value, kind)


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
