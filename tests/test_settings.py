"""Step (b) of config.json without transformers (model_config.settings_from_json) gives transformers' reading.

Wherever the fast path answers, its settings are exactly those of `settings_by_transformers` (values, key
order of the rope scaling dict, and no note from transformers): for every config in configs/, the tiny
examples of each family in transformers-5 and -4 keys, and hypothesis-made variants of them (rope spellings,
types and values, eps and theta values, dtype keys, missing keys). Where it does not answer, transformers
decides. `verify` reads through transformers, so it cross-checks every conversion that took the fast path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_convert import model_config
from moe_convert.architectures import all_rules
from moe_convert.cli import main
from moe_convert.convert import convert
from moe_convert.errors import ConfigError
from moe_convert.model_config import (
    ModelSettings,
    read_settings,
    read_sizes,
    settings_by_transformers,
    settings_from_json,
)
from moe_convert.verify import verify

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
FAMILIES = [r["name"] for r in all_rules()]


def as_json(s: ModelSettings, notes: bool = True) -> str:
    """Everything, in order: what config.json would hold, byte for byte (and transformers' notes)."""
    return json.dumps(dataclasses.asdict(s if notes else dataclasses.replace(s, notes=())))


def transformers_reading(raw: dict[str, Any]) -> ModelSettings | ConfigError:
    try:
        return settings_by_transformers(raw, read_sizes(raw, "config.json"), "config.json")
    except ConfigError as e:
        return e


def check(raw: dict[str, Any]) -> ModelSettings | None:
    """The fast path's answer, which must be transformers' reading (without a note) wherever it answers; and
    read_settings must give transformers' reading (or error) where it does not."""
    before = copy.deepcopy(raw)
    spec = read_sizes(raw, "config.json")
    fast = settings_from_json(raw, spec)
    theirs = transformers_reading(raw)
    assert raw == before  # neither reading changes the caller's dict
    if fast is not None:
        assert isinstance(theirs, ModelSettings), f"fast path took a config transformers rejects: {theirs}"
        assert as_json(fast) == as_json(theirs)
        return fast
    if isinstance(theirs, ConfigError):
        with pytest.raises(ConfigError) as e:
            read_settings(raw, spec, "config.json")
        assert str(e.value) == str(theirs)
    else:
        # (notes aside: transformers gives some once per process)
        assert as_json(read_settings(raw, spec, "config.json"), notes=False) == as_json(theirs, notes=False)
    return None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_published_configs_take_the_fast_path(path: Path) -> None:
    assert check(json.loads(path.read_text())) is not None


@pytest.mark.parametrize("transformers4", [False, True], ids=["t5_keys", "t4_keys"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_examples_take_the_fast_path(make_checkpoint: MakeCheckpoint, family: str, transformers4: bool) -> None:
    raw = json.loads((make_checkpoint(family=family, transformers4_config=transformers4) / "config.json").read_text())
    assert check(raw) is not None


def test_rules_defaults_are_not_transformers_attributes() -> None:
    """A family setting absent from config.json takes the rules' default on the fast path: right only where
    transformers' class has no such attribute (else its default would count)."""
    from transformers import AutoConfig

    for rules in all_rules():
        cfg = AutoConfig.for_model(rules["model_types"][0])
        for entry in rules["config"]["settings"].values():
            if "default" in entry:
                assert getattr(cfg, entry["attribute"], None) is None, (rules["name"], entry["attribute"])


MIXTRAL = json.loads(CONFIGS[1].read_text())  # mixtral-8x7b-v0.1, transformers-4 keys
assert MIXTRAL["num_local_experts"] == 8 and "rope_parameters" not in MIXTRAL
QWEN3 = json.loads(CONFIGS[-1].read_text())


def edited(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for k, v in changes.items():
        if v is ...:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


T5_DEFAULT = {"rope_scaling": ..., "rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}

FAST = {
    "t4": {},
    "t4_scaling_null": {"rope_scaling": None},
    "t5": T5_DEFAULT,
    "t4_linear_type_spelling": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "t4_dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 4}},
    "t5_linear": {"rope_theta": ..., "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}},
    "yarn_matching": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16384}},
    "yarn_positions_filled_in": {"rope_scaling": {"rope_type": "yarn", "factor": 1.0, "beta_fast": 32, "beta_slow": 1}},
    "theta_int": {"rope_theta": 10000},
    "theta_both_agree": {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
}
SLOW = {  # transformers decides (its default, a type or value not known here, something odd)
    "eps_missing": {"rms_norm_eps": ...},
    "eps_int": {"rms_norm_eps": 1},
    "eps_string": {"rms_norm_eps": "abc"},
    "positions_missing": {"max_position_embeddings": ...},
    "positions_over_int32": {"max_position_embeddings": 2**40},
    "theta_missing": {"rope_theta": ...},
    "theta_null": {"rope_theta": None},
    "theta_both_differ": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
    "both_spellings": {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "linear", "factor": 2.0},
    },
    "longrope": {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    "unknown_type": {"rope_scaling": {"rope_type": "foo", "factor": 2.0}},
    "type_spellings_differ": {"rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}},
    "factor_below_one": {"rope_scaling": {"rope_type": "linear", "factor": 0.5}},
    "factor_string": {"rope_scaling": {"rope_type": "linear", "factor": "abc"}},
    "extra_rope_key": {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "foo": 1}},
    "yarn_factor_mismatch": {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    },
    "yarn_attention_int": {"rope_scaling": {"rope_type": "yarn", "factor": 1.0, "attention_factor": 1}},
    "default_type_scaling_dict": {"rope_scaling": {"rope_type": "default"}},
    "empty_scaling_dict": {"rope_scaling": {}},
    "scaling_not_a_dict": {"rope_scaling": "linear"},
    "partial_rotary_factor": {"partial_rotary_factor": 0.5},
    "top_level_original_positions": {"original_max_position_embeddings": 4096},
    "another_familys_spelling": {"num_experts": 8},  # transformers' Mixtral aliases it to num_local_experts
}


@pytest.mark.parametrize("changes", FAST.values(), ids=FAST.keys())
def test_plain_configs_take_the_fast_path(changes: dict[str, Any]) -> None:
    assert check(edited(MIXTRAL, **changes)) is not None


@pytest.mark.parametrize("changes", SLOW.values(), ids=SLOW.keys())
def test_anything_else_is_left_to_transformers(changes: dict[str, Any]) -> None:
    assert check(edited(MIXTRAL, **changes)) is None


@pytest.mark.parametrize(
    "changes",
    [{"norm_topk_prob": ...}, {"norm_topk_prob": "yes"}, {"norm_topk_prob": 1}, {"seq_length": 0}, {"seq_length": 4.0}],
    ids=["norm_topk_prob_missing", "norm_topk_prob_string", "norm_topk_prob_int", "seq_length_0", "seq_length_float"],
)
def test_family_settings_not_plain_are_left_to_transformers(changes: dict[str, Any]) -> None:
    assert check(edited(QWEN3, **changes)) is None


def test_family_settings_read_plainly() -> None:
    fast = check(edited(QWEN3, norm_topk_prob=False, seq_length=32768))
    assert fast is not None and fast.family == {"moe_normalization_mode": 0, "seq_length": 32768}


# ---------------------------------------------------------------- hypothesis: variants of every base config

MISSING: Any = ...
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(2**60), 2**60),
    st.sampled_from([0, 1, 1.0, 0.5, 2, 2.0, 4.0, 1e-5, 1e-6, 10000.0, 1e6, 5e5, 32768, 4096, 2**31, 2**53 + 1]),
)
values = st.one_of(numbers, st.none(), st.booleans(), st.sampled_from(["abc", "linear", [1.0, 2.0]]))
rope_types = st.sampled_from(["default", "linear", "dynamic", "yarn"] * 3 + ["llama3", "longrope", "foo", None])
rope_keys = st.sampled_from(
    [
        *("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale"),
        *("mscale_all_dim", "low_freq_factor", "high_freq_factor", "truncate", "partial_rotary_factor", "foo"),
    ]
)


def mostly(plain: list[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plain value three times in four, else anything `odd` gives."""
    return st.one_of(st.sampled_from(plain), st.sampled_from(plain), st.sampled_from(plain), odd)


@st.composite
def rope_dicts(draw: st.DrawFn) -> dict[str, Any]:
    rope: dict[str, Any] = {}
    kind = draw(rope_types)
    spelling = draw(st.sampled_from(["rope_type", "type", "both", "neither"]))
    if spelling in ("rope_type", "both"):
        rope["rope_type"] = kind
    if spelling in ("type", "both"):
        rope["type"] = draw(st.one_of(st.just(kind), rope_types))
    if kind != "default" or draw(st.booleans()):
        rope["factor"] = draw(mostly([1.0, 2.0, 4, 8.0], numbers))
    if draw(st.booleans()):
        rope["rope_theta"] = draw(mostly([1e6, 1e4, 10000], st.one_of(numbers, st.none())))
    for key in draw(st.lists(rope_keys, max_size=2, unique=True)):
        rope[key] = draw(mostly([1.0, 32, 4096, None], values))
    return rope


@st.composite
def variants(draw: st.DrawFn, bases: list[dict[str, Any]]) -> dict[str, Any]:
    raw = copy.deepcopy(draw(st.sampled_from(bases)))
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        raw.pop(key, None)
    spelling = draw(st.sampled_from(["t4", "t4", "t5", "t5", "both", "none"]))
    if spelling in ("t4", "both"):
        raw["rope_theta"] = draw(mostly([1e6, 1e4, 10000, 5e5], st.one_of(numbers, st.none())))
        scaling = draw(st.one_of(st.just(MISSING), st.none(), rope_dicts()))
        if scaling is not MISSING:
            raw["rope_scaling"] = scaling
    if spelling in ("t5", "both"):
        raw["rope_parameters"] = draw(st.one_of(rope_dicts(), st.none()))
    for key, choices in (
        ("rms_norm_eps", mostly([1e-5, 1e-6, 1e-12, 0.1], st.one_of(numbers, values))),
        ("max_position_embeddings", mostly([4096, 32768, 40960, 131072], st.one_of(numbers, values))),
        ("norm_topk_prob", mostly([True, False], values)),
        ("seq_length", mostly([2048, 8192, 32768], st.one_of(numbers, values))),
    ):
        change = draw(st.sampled_from(["keep", "keep", "keep", "set", "set", "drop"]))
        if change == "set":
            raw[key] = draw(choices)
        elif change == "drop":
            raw.pop(key, None)
    dtype = draw(st.sampled_from(["keep", "dtype", "torch_dtype", "both", "none"]))
    if dtype != "keep":
        raw.pop("dtype", None)
        raw.pop("torch_dtype", None)
        name = draw(st.sampled_from(["bfloat16", "float16", "float32"]))
        if dtype in ("dtype", "both"):
            raw["dtype"] = name
        if dtype in ("torch_dtype", "both"):
            raw["torch_dtype"] = name
    return raw


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """configs/ and the tiny examples of each family, in transformers-5 and -4 keys."""
    from moe_convert.example import build_example_checkpoint

    found = [json.loads(p.read_text()) for p in CONFIGS]
    for family in FAMILIES:
        for t4 in (False, True):
            path = build_example_checkpoint(tmp_path_factory.mktemp("cfg"), family=family, transformers4_config=t4)
            found.append(json.loads((path / "config.json").read_text()))
            shutil.rmtree(path)
    return found


FAST_SEEN: list[bool] = []


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_variants_agree_with_transformers(bases: list[dict[str, Any]], data: st.DataObject) -> None:
    FAST_SEEN.append(check(data.draw(variants(bases))) is not None)


positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    eps=positive,
    theta=st.one_of(positive, st.integers(1, 2**53)),
    positions=st.integers(1, 2**31 - 1),
    kind=st.sampled_from(["default", "linear", "dynamic", "yarn"]),
    factor=st.one_of(st.floats(min_value=1.0, max_value=1e6), st.integers(1, 10**6)),
    t5=st.booleans(),
    type_spelling=st.booleans(),
)
def test_plain_variants_take_the_fast_path_and_agree(
    bases: list[dict[str, Any]],
    data: st.DataObject,
    eps: float,
    theta: float,
    positions: int,
    kind: str,
    factor: float,
    t5: bool,
    type_spelling: bool,
) -> None:
    """Any plain values (eps, theta, positions, factor over their whole ranges) in either spelling."""
    raw = copy.deepcopy(data.draw(st.sampled_from(bases)))
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        raw.pop(key, None)
    rope: dict[str, Any] = {"type" if type_spelling else "rope_type": kind}
    if kind != "default":
        rope["factor"] = factor
    if kind == "yarn":
        rope["factor"] = 1.0  # transformers notes a factor other than max_position_embeddings' ratio
    raw.update(rms_norm_eps=eps, max_position_embeddings=positions)
    if t5:
        raw["rope_parameters"] = {**rope, "rope_theta": theta}
    else:
        raw.update(rope_theta=theta, **({} if kind == "default" else {"rope_scaling": rope}))
    assert check(raw) is not None


def test_variants_took_both_ways() -> None:
    """The generator reaches both outcomes (runs after the property test, in file order)."""
    if FAST_SEEN:
        assert any(FAST_SEEN) and not all(FAST_SEEN), f"{sum(FAST_SEEN)} of {len(FAST_SEEN)} fast"


# ---------------------------------------------------------------- verify cross-checks the fast path


def test_verify_reads_through_transformers(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """A config whose settings the fast path read converts; a key it does not read that transformers rejects
    (id2label 5) is found by verify, with and without the source."""
    model = tmp_path / "model"
    shutil.copytree(make_checkpoint(dtype="bfloat16"), model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "id2label": 5}))
    out = tmp_path / "out"
    convert(model, out, tp_size=2)
    for report in (verify(out), verify(out, model)):
        assert any("transformers rejects this config" in p for p in report.problems), report.problems


def test_verify_finds_a_fast_path_reading_transformers_disagrees_with(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were the fast path ever to read a setting differently, verify says so, with and without the source."""
    real = model_config.settings_from_json

    def off_by_a_bit(raw: dict[str, Any], spec: Any) -> ModelSettings | None:
        fast = real(raw, spec)
        return None if fast is None else dataclasses.replace(fast, rms_norm_eps=fast.rms_norm_eps * 2)

    monkeypatch.setattr(model_config, "settings_from_json", off_by_a_bit)
    out = tmp_path / "out"
    model = make_checkpoint(dtype="bfloat16")
    result = CliRunner().invoke(main, ["convert", "--model_dir", str(model), "--output_dir", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for report in (verify(out), verify(out, model)):
        assert any("norm_epsilon" in p for p in report.problems), report.problems
