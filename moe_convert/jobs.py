"""Batch requests: `--mapping tp=8,moe_ep=8` strings, mapping dicts, and job files (YAML or JSON)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .bounded_json import MAX_INT_DIGITS, parse_json
from .errors import ConfigError, MappingError, UsageError, collect
from .files import read_regular
from .mapping import Mapping, resolve_mapping

if TYPE_CHECKING:
    from .plan import ConvertOptions

# A mapping's own weight-only precision: `precision=int4` (none: not quantized, whatever the batch says).
PRECISION_KEYS = ("precision", "weight_only_precision")
PRECISIONS = ("int8", "int4", "none")

# Accepted spellings of each size key, short first (`tp=8`), then the CLI's (`tp_size=8`).
_KEYS = {
    "tp": "tp_size",
    "pp": "pp_size",
    "moe_tp": "moe_tp_size",
    "moe_ep": "moe_ep_size",
}
_MAX_JOB_FILE_BYTES = 1024 * 1024  # a job file lists a few mappings
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
    "use_embedding_sharing": bool,
    "use_weight_only": bool,
    "weight_only_precision": str,
    "weight_only_arch": int,
    "weight_only_sm90_layout": str,
    "mappings": list,
}


@dataclass(frozen=True)
class MappingRequest:
    """One requested mapping of a batch; MoE sizes left None resolve as in the spec.

    `subdir` is where its files go under the batch output dir (default: the mapping's label,
    e.g. `tp8_pp1_moetp1_moeep8`, and its precision if it names one: `..._int4`). `weight_only_precision`
    (int8, int4, or none) replaces the batch's weight-only precision for this mapping.
    """

    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None
    subdir: str | None = None
    weight_only_precision: str | None = None

    def options(self, base: ConvertOptions, arch: int | None, sm90_layout: str | None) -> ConvertOptions:
        """The batch's options with this mapping's precision, if it names one (`arch` None: the GPU's)."""
        if self.weight_only_precision is None:
            return base
        return base.with_weight_only(self.weight_only_precision, arch, sm90_layout)

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
        if self.weight_only_precision is not None:
            parts.append(f"precision={self.weight_only_precision}")
        return ",".join(parts)

    def output_subdir(self) -> str:
        if self.subdir:
            return self.subdir
        try:
            label = self.resolve().label()
        except MappingError:  # reported by the planner; any unique name will do meanwhile
            return self.describe().replace(",", "_").replace("=", "")
        return label if self.weight_only_precision is None else f"{label}_{self.weight_only_precision}"


MappingLike = MappingRequest | Mapping | dict[str, Any] | str


def parse_mapping(text: str) -> MappingRequest:
    """`tp=8,moe_tp=2,moe_ep=4` (also `tp_size=8`, `subdir=NAME` and `precision=int4`) -> a request."""
    request, problems = _parse_mapping(text)
    collect(problems, UsageError, f"--mapping {text!r} is invalid")
    assert request is not None
    return request


def _parse_mapping(text: str, where: str = "") -> tuple[MappingRequest | None, list[str]]:
    where = where or f"--mapping {text!r}"
    fields: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            return None, [f"{where}: {part!r} is not KEY=VALUE (e.g. tp=8,moe_ep=8)"]
        fields[key.strip()] = value.strip()
    return _mapping_from_dict(fields, where)


def mapping_from_dict(raw: dict[str, Any], where: str = "mapping") -> MappingRequest:
    """A dict with keys tp/pp/moe_tp/moe_ep (or tp_size/...), and optional subdir (or output_dir) and
    precision (int8, int4, none)."""
    request, problems = _mapping_from_dict(raw, where)
    collect(problems, UsageError, f"{where} is invalid")
    assert request is not None
    return request


def _mapping_from_dict(raw: dict[str, Any], where: str) -> tuple[MappingRequest | None, list[str]]:
    sizes: dict[str, int] = {}
    subdir: str | None = None
    precision: str | None = None
    problems = []
    for key, value in raw.items():
        if key in ("subdir", "output_dir"):
            subdir, problem = _check_subdir(str(value), where)
            problems += [problem] if problem else []
            continue
        if key in PRECISION_KEYS:
            precision = str(value).lower()
            if precision not in PRECISIONS:
                problems.append(f"{where}: precision={value!r} is not one of {', '.join(PRECISIONS)}")
            continue
        name = _KEYS.get(key, key)
        if name not in _KEYS.values():
            problems.append(f"{where}: unknown key {key!r} (use {', '.join(_KEYS)}, subdir, precision)")
            continue
        if name in sizes:
            problems.append(f"{where}: {key} given twice")
            continue
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            sizes[name] = int(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: {key}={value!r} is not a whole number")
    if "tp_size" not in sizes and not problems:
        problems.append(f"{where}: tp is required (e.g. tp=8,moe_ep=8)")
    request = MappingRequest(subdir=subdir, weight_only_precision=precision, **sizes)
    return (None if problems else request), problems


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


def _check_subdir(value: str, where: str) -> tuple[str, str | None]:
    parts = PurePosixPath(value).parts
    if not value or value.startswith(("/", "~")) or ".." in parts or value in (".", "./") or "\\" in value:
        return value, f"{where}: subdir {value!r} must be a relative path inside the batch output dir (no '..', no '.')"
    return value, None


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


# Validates one option of a job file as the command line would: the problem, or None.
OptionCheck = Callable[[str, Any], "str | None"]


def read_job_file(path: str | Path, check_option: OptionCheck | None = None) -> JobFile:
    """Read a YAML (.yaml/.yml) or JSON job file; relative paths in it are relative to the current dir.

    Raises ConfigError listing every problem found. `check_option(name, value)` validates an option's value
    as the command line would (the CLI passes its own option types); it returns the problem or None.
    """
    job, problems = load_job_file(path, check_option)
    collect(problems, ConfigError, f"--job_file {path} is invalid", where=f"--job_file {path}")
    assert job is not None
    return job


def load_job_file(path: str | Path, check_option: OptionCheck | None = None) -> tuple[JobFile | None, list[str]]:
    """The job file and every problem in it (about the file: the caller names it). The JobFile holds what
    is usable (valid options and mappings), or is None if the file has no model_dir, output_dir or mappings."""
    path = Path(path)
    # A regular file (never a FIFO), bounded; JSON through the project's one strict reader.
    try:
        data = read_regular(path, ConfigError, limit=_MAX_JOB_FILE_BYTES)
        raw: object
        if path.suffix.lower() in (".yaml", ".yml"):
            raw = _load_yaml(data, str(path))
        else:
            raw = parse_json(data, str(path), ConfigError, hint="; YAML files must end in .yaml")
    except ConfigError as e:
        return None, [str(e).removeprefix(f"{path}: ")]
    if not isinstance(raw, dict):
        return None, [f"expected a mapping of keys at the top, found {type(raw).__name__}"]
    problems = [f"unknown key {k!r} (known: {', '.join(_JOB_KEYS)})" for k in raw if k not in _JOB_KEYS]
    problems += [f"{k} is required" for k in ("model_dir", "output_dir", "mappings") if k not in raw]
    options: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in _JOB_KEYS:
            continue
        if not _has_type(v, _JOB_KEYS[k]):
            problems.append(f"{k} must be {_type_names(_JOB_KEYS[k])}, found {v!r}")
        elif check_option is not None and (problem := check_option(k, v)):
            problems.append(f"{k}: {problem}")
        elif k not in ("model_dir", "output_dir", "mappings"):
            options[k] = v
    mappings = raw.get("mappings")
    if isinstance(mappings, list) and not mappings:
        problems.append("mappings is empty; list at least one (e.g. - {tp: 8, moe_ep: 8})")
    requests = []
    for i, m in enumerate(mappings if isinstance(mappings, list) else []):
        if isinstance(m, str):
            request, found = _parse_mapping(m, f"mappings[{i}] {m!r}")
        elif isinstance(m, dict):
            request, found = _mapping_from_dict(m, f"mappings[{i}]")
        else:
            request, found = None, [f"mappings[{i}]: expected a mapping like {{tp: 8, moe_ep: 8}}, found {m!r}"]
        problems += found
        requests += [request] if request else []
    model_dir, output_dir = raw.get("model_dir"), raw.get("output_dir")
    if not (isinstance(model_dir, str) and isinstance(output_dir, str) and requests):
        return None, problems
    return JobFile(model_dir, output_dir, tuple(requests), options), problems


def _load_yaml(data: bytes, where: str) -> object:
    import yaml

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if re.search(rf"\d{{{MAX_INT_DIGITS + 1}}}", text):  # Python's int() would fail past 4300 digits
        raise ConfigError(f"{where}: holds a number with more than {MAX_INT_DIGITS} digits")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from e
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: not valid YAML ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from e


def _has_type(value: object, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and kind is int:
        return False
    return isinstance(value, kind)


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
