"""The source model's config.json, read in two steps.

(a) `read_sizes`: the sizes, flags and dtype the planner needs, taken from the raw JSON where the family's
    rules data says (keys, alternative spellings, defaults), type-checked and bounded here. It imports
    neither transformers nor torch, so planning can start at once.
(b) `read_settings`: what only the output config.json needs (RoPE, norm epsilon, positions, the family's
    own settings such as top-k renormalisation), read through transformers' config class, which knows
    every spelling and default; it also checks that transformers sees the sizes as (a) did. It changes
    nothing and logs nothing (its notes come back in the result), so it can run while data streams.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .architectures import Rules, rules_for
from .errors import ConfigError

log = logging.getLogger(__name__)

# The vocabulary that the rules' shape expressions, the planner and config.json share.
SIZE_NAMES = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
    "top_k",
    "expert_ffn_size",  # each routed expert's FFN width
    "shared_ffn_size",  # the shared expert's FFN width; 0 where a family has none
    "dense_ffn_size",  # HF intermediate_size, written to config.json (Mixtral: the expert width)
)
FLAG_NAMES = ("qkv_bias", "tie_word_embeddings")

# Far above any published model (today's largest: hidden 18432, 126 layers, 128 heads, head_dim 256,
# vocab 262144, 512 experts, FFN 53248) and far below what makes planning loop for hours or allocate GBs:
# a config over these is corrupt or hostile.
SIZE_LIMITS = {
    "hidden_size": 1 << 17,
    "num_layers": 1 << 10,
    "num_heads": 1 << 10,
    "num_kv_heads": 1 << 10,
    "head_dim": 1 << 12,
    "vocab_size": 1 << 22,
    "num_experts": 1 << 12,
    "top_k": 1 << 12,
    "expert_ffn_size": 1 << 20,
    "shared_ffn_size": 1 << 20,
    "dense_ffn_size": 1 << 20,
}
# Every (layer, expert) pair is a few tensors to plan; published models have at most about 25,000.
MAX_EXPERT_LAYERS = 1 << 16
MAX_POSITIONS = 2**31 - 1  # TensorRT-LLM holds positions and sequence lengths in int32


@dataclass(frozen=True)
class ModelSpec:
    """What planning needs of the source model (step (a)), in the vocabulary every family shares."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k: int
    expert_ffn_size: int
    shared_ffn_size: int
    dense_ffn_size: int
    qkv_bias: bool
    tie_word_embeddings: bool
    dtype: str | None  # torch dtype name from config.json (dtype or torch_dtype), if any
    rules: Rules = field(repr=False, compare=False, hash=False)
    # The config.json key each value was read from (num_experts or num_local_experts...), for messages.
    config_keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False, hash=False)
    # config.json as read: the manifest stores it, so `verify` re-plans without the source.
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def key(self, name: str) -> str:
        return self.config_keys.get(name, name)

    def dims(self) -> dict[str, int]:
        """Names usable in the shape expressions of the architecture rules."""
        return {n: getattr(self, n) for n in SIZE_NAMES}

    def values(self) -> dict[str, Any]:
        """Every size and flag by name (what `$name` in the rules' trtllm_config refers to)."""
        return {**self.dims(), **{n: getattr(self, n) for n in FLAG_NAMES}}


@dataclass(frozen=True)
class ModelSettings:
    """What only the output config.json needs of the source model (step (b))."""

    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    family: dict[str, Any]  # the rules' own settings by name (seq_length, moe_normalization_mode, ...)
    notes: tuple[str, ...] = ()  # transformers' warnings about the config, for the caller to log


def evaluate(expr: int | str, dims: dict[str, int]) -> int:
    """A size expression of the rules: an int, a name, a product (`2*expert_ffn_size`) or `a//b`."""
    if isinstance(expr, int):
        return expr
    if "//" in expr:
        num, den = expr.split("//")
        return evaluate(num, dims) // evaluate(den, dims)
    return math.prod(int(f) if f.strip().isdigit() else dims[f.strip()] for f in expr.split("*"))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(a: object, b: object) -> bool:
    """JSON equality that keeps true apart from 1 and 1 apart from 1.0."""
    return type(a) is type(b) and a == b


@dataclass
class _Entry:
    """How the rules read one value: from the first present of `keys`, else `default` (if not `required`)."""

    keys: list[str]
    default: Any
    required: bool

    @classmethod
    def of(cls, spec: Any) -> _Entry:
        if isinstance(spec, str):
            return cls([spec], None, True)
        if isinstance(spec, list):
            return cls(spec, None, True)
        if isinstance(spec, dict):
            return cls(list(spec["keys"]), spec.get("default"), "default" not in spec)
        return cls([], spec, False)  # a constant of the family

    def describe(self) -> str:
        return self.keys[0] + "".join(f" (or {k})" for k in self.keys[1:])


def _read(raw: dict[str, Any], entry: _Entry, where: str, agree: bool = True) -> tuple[str | None, Any]:
    """(key found, its value) per the entry; (None, default) when absent. null means absent where there
    is a default; alternatives present together must agree (with `agree`; else the first wins)."""
    present = [k for k in entry.keys if k in raw and (entry.required or raw[k] is not None)]
    if not present:
        return None, entry.default
    key, value = present[0], raw[present[0]]
    for other in present[1:] if agree else ():
        if not _same(raw[other], value):
            raise ConfigError(
                f"{where}: {key} {json.dumps(value)} and {other} {json.dumps(raw[other])} disagree; "
                "they name the same thing, keep one"
            )
    return key, value


def _check_refused(raw: dict[str, Any], rules: Rules, where: str) -> None:
    """Settings the family's converter does not support, named in one line."""
    bad = [
        r
        for r in rules["config"]["refuse"]
        if r["key"] in raw and not any(_same(raw[r["key"]], a) for a in r["allowed"])
    ]
    if not bad:
        return
    found = " and ".join(f"{r['key']} {json.dumps(raw[r['key']])}" for r in bad)
    why = "; ".join(dict.fromkeys(r["why"] for r in bad))
    wanted = " and ".join(f"{r['key']} {json.dumps(r['allowed'][0])}" for r in bad)
    raise ConfigError(f"{where}: {found}: not supported ({why}); only {wanted} can be converted")


def read_sizes(raw: dict[str, Any], where: str) -> ModelSpec:
    """Step (a): the family's rules, and the sizes, flags and dtype from the raw config.json, checked."""
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [str(architectures)]
    model_type = raw.get("model_type")
    rules = rules_for([str(a) for a in architectures], model_type, where)
    if model_type is not None and model_type not in rules["model_types"]:
        raise ConfigError(
            f"{where}: architectures {', '.join(map(str, architectures))} and model_type {json.dumps(model_type)} "
            f"disagree ({rules['hf_architectures'][0]} has model_type {json.dumps(rules['model_types'][0])}); "
            "fix config.json"
        )
    _check_refused(raw, rules, where)
    config = rules["config"]
    entries = {name: _Entry.of(config["sizes"][name]) for name in SIZE_NAMES}
    keys = {name: e.keys[0] for name, e in entries.items() if e.keys}
    found: dict[str, Any] = {}
    missing, bad = [], []
    for name, entry in entries.items():
        key, value = _read(raw, entry, where)
        if key is not None:
            keys[name] = key
            found[name] = value
            if not _is_int(value) or value < 1:
                bad.append(f"{key}={value!r}")
        elif entry.required:
            missing.append(entry.describe())
    if missing:
        raise ConfigError(f"{where}: required keys missing: {', '.join(missing)}")
    if bad:
        raise ConfigError(f"{where}: sizes must be positive integers: {', '.join(bad)}")
    sizes: dict[str, int] = {}
    for name, entry in entries.items():  # defaults may refer to sizes above them in SIZE_NAMES
        sizes[name] = found[name] if name in found else evaluate(entry.default, sizes)
    derived = [
        f"{keys.get(name, name)} defaults to {entries[name].default} = {sizes[name]}"
        for name, entry in entries.items()
        if name not in found and isinstance(entry.default, str) and sizes[name] < 1
    ]
    if derived:
        raise ConfigError(f"{where}: {'; '.join(derived)}, not a positive size; set it in config.json")
    _check_bounds(sizes, keys, where)
    if sizes["top_k"] > sizes["num_experts"]:
        raise ConfigError(
            f"{where}: {keys['top_k']} {sizes['top_k']} is larger than {keys['num_experts']} {sizes['num_experts']}"
        )
    flags: dict[str, bool] = {}
    for name in FLAG_NAMES:
        entry = _Entry.of(config["flags"][name])
        key, value = _read(raw, entry, where)
        if key is not None:
            keys[name] = key
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key or name} must be true or false, got {json.dumps(value)}")
        flags[name] = value
    _, dtype = _read(raw, _Entry.of(config["dtype"]), where, agree=False)
    return ModelSpec(
        architecture=rules["hf_architectures"][0],
        hidden_size=sizes["hidden_size"],
        num_layers=sizes["num_layers"],
        num_heads=sizes["num_heads"],
        num_kv_heads=sizes["num_kv_heads"],
        head_dim=sizes["head_dim"],
        vocab_size=sizes["vocab_size"],
        num_experts=sizes["num_experts"],
        top_k=sizes["top_k"],
        expert_ffn_size=sizes["expert_ffn_size"],
        shared_ffn_size=sizes["shared_ffn_size"],
        dense_ffn_size=sizes["dense_ffn_size"],
        qkv_bias=flags["qkv_bias"],
        tie_word_embeddings=flags["tie_word_embeddings"],
        dtype=str(dtype) if dtype else None,
        rules=rules,
        config_keys=keys,
        config=raw,
    )


def _check_bounds(sizes: dict[str, int], keys: dict[str, str], where: str) -> None:
    problems = [
        f"{keys.get(name, name)} {value} is over the limit of {SIZE_LIMITS[name]}"
        for name, value in sizes.items()
        if value > SIZE_LIMITS[name]
    ]
    pairs = sizes["num_layers"] * sizes["num_experts"]
    if not problems and pairs > MAX_EXPERT_LAYERS:
        problems.append(
            f"{keys['num_layers']} {sizes['num_layers']} x {keys['num_experts']} {sizes['num_experts']} = "
            f"{pairs} expert layers is over the limit of {MAX_EXPERT_LAYERS}"
        )
    if problems:
        detail = "; ".join(problems)
        raise ConfigError(
            f"{where}: {detail} (far beyond any published model); the config is corrupt or not a model's", problems
        )


def read_settings(raw: dict[str, Any], spec: ModelSpec, where: str) -> ModelSettings:
    """Step (b): config.json's semantic values through transformers' config class, checked and finite."""
    from transformers import AutoConfig  # slow import; only once (a) found the config sane

    # A deep copy: transformers edits nested dicts (rope_scaling) in place, and `raw` stays the caller's.
    cfg_dict = {
        k: copy.deepcopy(v) for k, v in raw.items() if k not in ("architectures", "transformers_version", "model_type")
    }
    with _transformers_notes(where) as notes:
        try:
            cfg = AutoConfig.for_model(spec.rules["model_types"][0], **cfg_dict)
        except Exception as e:  # transformers' validators raise many types (strict dataclass errors, AttributeError)
            detail = " ".join(str(e).split())  # their messages span lines; ours is one
            raise ConfigError(f"{where}: transformers rejects this config: {type(e).__name__}: {detail}") from e
    _check_transformers_agrees(cfg, spec, where)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {rope!r}")
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope_theta is None:
        raise ConfigError(f"{where}: no rope_theta (or rope_parameters.rope_theta)")
    for key, value in (("rope_theta", rope_theta), ("rms_norm_eps", cfg.rms_norm_eps)):
        if not _finite_number(value) or not value > 0:
            raise ConfigError(f"{where}: {key} must be a positive finite number, got {value!r}")
    scaling = None
    if rope.get("rope_type", "default") not in (None, "default"):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif isinstance(raw.get("rope_scaling"), dict):
        scaling = raw["rope_scaling"]
    if scaling is not None:
        _check_rope_scaling(scaling, where)
    positions = cfg.max_position_embeddings
    if not _is_int(positions) or not 1 <= positions <= MAX_POSITIONS:
        raise ConfigError(
            f"{where}: max_position_embeddings must be a positive integer up to {MAX_POSITIONS}, got {positions!r}"
        )
    family = {
        name: _family_setting(cfg, name, entry, where) for name, entry in spec.rules["config"]["settings"].items()
    }
    return ModelSettings(
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=positions,
        family=family,
        notes=tuple(notes),
    )


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rope_scaling(scaling: dict[str, Any], where: str) -> None:
    """Numbers finite (JSON has no Infinity), strings only where a name belongs."""
    for k, v in scaling.items():
        values = v if isinstance(v, list) else [v]
        ok = all(
            x is None or isinstance(x, bool) or _finite_number(x) or (isinstance(x, str) and k in ("rope_type", "type"))
            for x in values
        )
        if not ok or isinstance(v, dict):
            raise ConfigError(f"{where}: rope scaling {k!r} must be a finite number, got {json.dumps(v)}")


def _family_setting(cfg: Any, name: str, entry: dict[str, Any], where: str) -> Any:
    """One of the rules' settings: a mapped value (`values`), else a positive integer (a length)."""
    attribute = entry["attribute"]
    value = getattr(cfg, attribute, None)
    if value is None:
        if "default" not in entry:
            raise ConfigError(f"{where}: {attribute} is missing; it sets {name} of the converted config.json")
        value = entry["default"]
    if "values" in entry:
        choice = entry["values"].get(json.dumps(value))
        if choice is None:
            allowed = " or ".join(entry["values"])
            raise ConfigError(f"{where}: {attribute} must be {allowed}, got {json.dumps(value)}")
        return choice
    if not _is_int(value) or not 1 <= value <= MAX_POSITIONS:
        raise ConfigError(f"{where}: {attribute} must be a positive integer up to {MAX_POSITIONS}, got {value!r}")
    return value


def _check_transformers_agrees(cfg: Any, spec: ModelSpec, where: str) -> None:
    """transformers' class may rename or default keys; the sizes we plan with must be the ones it builds."""
    values = spec.values()
    problems = []
    for name, key in spec.config_keys.items():
        theirs = getattr(cfg, key, None)
        if theirs is not None and not _same(theirs, values[name]):
            problems.append(
                f"transformers reads {key} as {theirs!r}, the {spec.rules['name']} rules as {values[name]!r}"
            )
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}; write the value into config.json explicitly", problems)


@contextlib.contextmanager
def _transformers_notes(where: str) -> Iterator[list[str]]:
    """Collect the log records and warnings that transformers raises in this thread, one line each, instead of
    letting its own stderr handler print them (which would break the one-line error contract).

    Only this thread's output is taken: step (b) may run on a background thread while others convert, so
    nothing process-wide is swapped (`warnings.catch_warnings` would swap the filters and the display hook
    under the other threads' feet). Log records: a handler on the transformers logger keeps this thread's,
    a filter on the handlers they would reach drops them there. Warnings: see `_thread_warnings`.
    """
    notes: list[str] = []
    me = threading.get_ident()

    def note(text: str) -> None:
        notes.append(f"{where}: transformers: {' '.join(text.split())}")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me:
                note(record.getMessage())

    def not_mine(record: logging.LogRecord) -> bool:
        return record.thread != me

    tf_log = logging.getLogger("transformers")
    reached = _handlers_reached(tf_log)
    for h in reached:
        h.addFilter(not_mine)
    collect = Collect()
    tf_log.addHandler(collect)
    try:
        with _thread_warnings(note):
            yield notes
    finally:
        tf_log.removeHandler(collect)
        for h in reached:
            h.removeFilter(not_mine)


def _handlers_reached(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record logged under `logger` reaches (as `Logger.callHandlers` walks them)."""
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers += node.handlers
        node = node.parent if node.propagate else None
    return handlers


# Thread ident -> where that thread's warnings go, while it is inside `_thread_warnings`.
_warning_sinks: dict[int, Callable[[str], None]] = {}
_warning_sinks_lock = threading.Lock()


@contextlib.contextmanager
def _thread_warnings(sink: Callable[[str], None]) -> Iterator[None]:
    """Send the warnings this thread raises to `sink` instead of stderr; other threads' are not touched.

    `warnings._showwarnmsg` is what Python calls to show a warning that passed the filters; a router put
    there once (and left, passing every other warning on) sends each to the sink of the thread raising it.
    It composes with `catch_warnings` elsewhere, which swaps `showwarning` and the filters but not this.
    The process's filters still apply: a warning shown once per place appears once per process.
    """
    me = threading.get_ident()
    with _warning_sinks_lock:
        show = getattr(warnings, "_showwarnmsg", None)
        if show is not None and not getattr(show, "routes_by_thread", False):

            def route(msg: warnings.WarningMessage) -> None:
                to = _warning_sinks.get(threading.get_ident())
                if to is None:
                    show(msg)
                else:
                    to(str(msg.message))

            route.routes_by_thread = True  # type: ignore[attr-defined]
            warnings._showwarnmsg = route  # type: ignore[attr-defined]
        _warning_sinks[me] = sink
    try:
        yield
    finally:
        with _warning_sinks_lock:
            del _warning_sinks[me]


def read_model(raw: dict[str, Any], where: str) -> tuple[ModelSpec, ModelSettings]:
    """Both steps, with transformers' notes logged."""
    spec = read_sizes(raw, where)
    settings = read_settings(raw, spec, where)
    for note in settings.notes:
        log.warning("%s", note)
    return spec, settings
