"""The source model's config.json, read in two steps.

(a) `read_sizes`: the sizes, flags and dtype the planner needs, taken from the raw JSON where the family's
    rules data says (keys, alternative spellings, defaults), type-checked and bounded here. It imports
    neither transformers nor torch, so planning can start at once.
(b) `read_settings`: what only the output config.json needs (RoPE, norm epsilon, positions, the family's
    own settings such as top-k renormalisation). Where config.json states each of them plainly, in
    spellings this module knows (`settings_from_json`), they are read from the raw JSON: importing
    transformers' config classes costs 1.5 s here and 12 s on a big host, and a conversion would wait
    for it. Anything else (a setting left to its default, a rope type or key not known here, an odd value)
    is read through transformers' config class (`settings_by_transformers`), which knows every spelling
    and default, and also checks that transformers sees the sizes as (a) did. `verify` always reads
    through transformers, so it cross-checks the first way; tests/test_settings.py proves both agree.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .architectures import Rules, all_rules, rules_for
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


def _is_int(v: object) -> TypeGuard[int]:
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
    """Step (b): from the raw JSON where it states every setting plainly, else through transformers."""
    return settings_from_json(raw, spec) or settings_by_transformers(raw, spec, where)


# The rope types read without transformers, each with the keys transformers' validation knows for it
# (besides rope_type, its older spelling type, and rope_theta). Any other type or key: transformers decides.
_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "yarn": frozenset(
        {
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
        }
    ),
}
# Top-level keys transformers folds into the rope settings: where present, it decides.
_ROPE_EXTRAS = ("partial_rotary_factor", "original_max_position_embeddings")


def settings_from_json(raw: dict[str, Any], spec: ModelSpec) -> ModelSettings | None:
    """Step (b) from the raw JSON, where config.json states every setting plainly; None where transformers
    must decide.

    Plainly: rms_norm_eps a positive finite float, max_position_embeddings an integer within bounds, the rope
    settings in a spelling and a type `_rope_from_json` knows, each family setting present with a value the
    rules map (or absent where the rules give its default: transformers' classes have no such attribute),
    and no size or flag spelled as only another family spells it (transformers' class may alias it to ours).
    The result is what `settings_by_transformers` gives (tests/test_settings.py), without its import.
    """
    eps, positions = raw.get("rms_norm_eps"), raw.get("max_position_embeddings")
    if not (isinstance(eps, float) and _plain_number(eps) and eps > 0):
        return None
    if not (_is_int(positions) and 1 <= positions <= MAX_POSITIONS) or _foreign_keys(raw, spec.rules):
        return None
    rope = _rope_from_json(raw, spec, positions)
    if rope is None:
        return None
    family = {}
    for name, entry in spec.rules["config"]["settings"].items():
        value = raw.get(entry["attribute"], entry.get("default"))
        if value is None:
            return None  # transformers' class has the default
        if "values" in entry:
            value = entry["values"].get(json.dumps(value))
        elif not (_is_int(value) and 1 <= value <= MAX_POSITIONS):
            value = None
        if value is None:
            return None
        family[name] = value
    theta, scaling = rope
    return ModelSettings(eps, float(theta), scaling, positions, family)


def _plain_number(v: object) -> TypeGuard[float]:
    """A finite float, or an integer a float holds exactly."""
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 2**53


def _foreign_keys(raw: dict[str, Any], rules: Rules) -> bool:
    """A size or flag spelled as only another family's rules spell it (Mixtral's config with num_experts)."""

    def spellings(r: Rules) -> set[str]:
        config = r["config"]
        return {k for spec in [*config["sizes"].values(), *config["flags"].values()] for k in _Entry.of(spec).keys}

    ours = spellings(rules)
    return any(k in raw and k not in ours for r in all_rules() for k in spellings(r))


def _rope_from_json(raw: dict[str, Any], spec: ModelSpec, positions: int) -> tuple[float, dict[str, Any] | None] | None:
    """(rotary base, scaling dict or None) from `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5), filled in as transformers fills them in; None for transformers to
    decide: both spellings at once, a missing rope_theta (each class has its own default), a type or key not
    in _ROPE_KEYS, a value transformers would take with a note (a factor below 1, ...)."""
    if any(k in raw for k in _ROPE_EXTRAS) or (spec.head_dim > 4 and spec.head_dim % 2):
        return None  # (transformers may reject an odd rotary dimension)
    scaling, parameters = raw.get("rope_scaling"), raw.get("rope_parameters")
    given = parameters if scaling is None else scaling
    if (scaling is not None and parameters is not None) or not isinstance(given or {}, dict):
        return None
    rope = dict(given or {})  # in transformers' order: given keys, rope_theta, rope_type, yarn's positions
    if "rope_theta" in raw and not _same(rope.setdefault("rope_theta", raw["rope_theta"]), raw["rope_theta"]):
        return None  # given twice, differently
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_KEYS or not _same(rope.get("type", kind), kind):
        return None
    rope.setdefault("rope_type", kind)
    if kind == "yarn":
        rope.setdefault("original_max_position_embeddings", positions)
    values = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    theta = rope.get("rope_theta")
    if values.keys() - _ROPE_KEYS[kind] or not (_plain_number(theta) and theta > 0):
        return None
    if kind == "default":  # a default-type rope_scaling dict is written as given: transformers decides
        return (theta, None) if scaling is None else None
    if not all(v is None or _plain_number(v) for v in values.values()):
        return None
    factor = values.get("factor")
    if not (_plain_number(factor) and factor >= 1) or (kind == "yarn" and not _quiet_yarn(values, positions)):
        return None
    return theta, {k: v for k, v in rope.items() if k != "rope_theta"}


def _quiet_yarn(values: dict[str, Any], positions: int) -> bool:
    """YaRN values transformers takes without a note."""
    original, attention = values["original_max_position_embeddings"], values.get("attention_factor")
    fast, slow = values.get("beta_fast"), values.get("beta_slow")
    return (
        _is_int(original)
        and original > 0
        and (attention is None or (isinstance(attention, float) and attention >= 0))
        and (fast or 32) >= (slow or 1)
        and positions / original in (values["factor"], 1)
    )


def settings_by_transformers(raw: dict[str, Any], spec: ModelSpec, where: str) -> ModelSettings:
    """Step (b) through transformers' config class (the authority on spellings and defaults), checked and finite."""
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
    """Collect transformers' log records and warnings about the config, one line each, instead of letting its
    own stderr handler print them (which would break the one-line error contract)."""
    notes: list[str] = []
    tf_log = logging.getLogger("transformers")

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(f"{where}: transformers: {' '.join(record.getMessage().split())}")

    saved = tf_log.handlers[:], tf_log.propagate
    tf_log.handlers[:], tf_log.propagate = [Collect()], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
        notes.extend(f"{where}: transformers: {' '.join(str(w.message).split())}" for w in caught)
    finally:
        tf_log.handlers[:], tf_log.propagate = saved


def read_model(raw: dict[str, Any], where: str, *, by_transformers: bool = False) -> tuple[ModelSpec, ModelSettings]:
    """Both steps, with transformers' notes logged; `by_transformers`: step (b) through transformers whatever
    config.json holds (verify's cross-check)."""
    spec = read_sizes(raw, where)
    settings = (settings_by_transformers if by_transformers else read_settings)(raw, spec, where)
    for note in settings.notes:
        log.warning("%s", note)
    return spec, settings
