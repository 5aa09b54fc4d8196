"""config.json checks before any planning loop: absurd sizes bounded, values finite and typed, architecture and
model_type agreeing, settings a family cannot convert refused (issue 12 items 6 and 9; issue 13's checks).

Table-driven through the CLI, as tests/test_errors.py: each case edits a private copy of a tiny checkpoint's
config.json and expects the exit code, one stderr line naming the key and the numbers, nothing written, the
source untouched, and an answer in well under a second of planning.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from test_errors import assert_error_line, no_final_outputs, run_convert, tree_hash

from moe_convert.cli import main

QWEN2: dict[str, Any] = {"family": "qwen2_moe"}
QWEN3: dict[str, Any] = {"family": "qwen3_moe"}
INF = float("inf")


@dataclass(frozen=True)
class Case:
    id: str
    model: dict[str, Any]  # make_checkpoint arguments
    changes: dict[str, Any]  # config.json keys to set (... deletes)
    fragments: tuple[str, ...]
    code: int = 1
    args: tuple[str, ...] = ()


CASES = [
    # --- sizes bounded before anything loops over them (item 6)
    Case("experts_1e8", {}, {"num_local_experts": 100_000_000}, ("num_local_experts 100000000", "limit of 4096")),
    Case("layers_5e7", {}, {"num_hidden_layers": 50_000_000}, ("num_hidden_layers 50000000", "limit of 1024")),
    Case("layers_5e7_float", {}, {"num_hidden_layers": 5e7}, ("positive integers", "num_hidden_layers=50000000.0")),
    Case(
        "several_sizes_absurd",
        {},
        {"hidden_size": 10**9, "vocab_size": 10**12, "intermediate_size": 10**8},
        # The line keeps the first problems within its budget; --json lists them all.
        ("hidden_size 1000000000", "vocab_size 1000000000000", "limit of 4194304", "more (--json lists all)"),
    ),
    Case(
        "layers_times_experts",
        {},
        {"num_hidden_layers": 1000, "num_local_experts": 4000},
        ("num_hidden_layers 1000 x num_local_experts 4000 = 4000000", "limit of 65536"),
    ),
    Case(
        "plan_too_big_for_any_real_model",  # each size within bounds; tp32 x 1024 layers x 64 experts is not
        {},
        {"num_hidden_layers": 1024, "num_local_experts": 64, "num_attention_heads": 32},
        ("tp_size 32 x 1024 layers x 199 pieces per layer = 6520832 pieces", "limit of 2000000", "--moe_ep_size"),
        code=2,
        args=("--tp_size", "32"),
    ),
    Case("qwen_experts_1e8", QWEN2, {"num_experts": 100_000_000}, ("num_experts 100000000", "limit of 4096")),
    Case("head_dim_huge", QWEN3, {"head_dim": 10**7}, ("head_dim 10000000", "limit of 4096")),
    Case("positions_over_int32", {}, {"max_position_embeddings": 2**40}, ("max_position_embeddings", "2147483647")),
    Case(
        "derived_head_dim_zero",
        {},
        {"hidden_size": 2, "head_dim": None},
        ("head_dim defaults to hidden_size//num_heads = 0",),
    ),
    # --- values finite and typed; nothing is written that is not JSON (item 9)
    Case("rms_norm_eps_inf", {}, {"rms_norm_eps": INF}, ("rms_norm_eps", "finite", "inf")),
    Case("rope_theta_inf_t4", {"transformers4_config": True}, {"rope_theta": INF}, ("rope_theta", "finite", "inf")),
    Case(
        "rope_theta_inf_t5",
        {},
        {"rope_parameters": {"rope_type": "default", "rope_theta": INF}},
        ("rope_theta", "finite", "inf"),
    ),
    Case("rope_theta_nan", {}, {"rope_parameters": {"rope_type": "default", "rope_theta": math.nan}}, ("rope_theta",)),
    Case(
        "rope_factor_not_a_number",
        {"transformers4_config": True},
        {"rope_scaling": {"rope_type": "linear", "factor": "abc"}},
        ("rope scaling 'factor'", '"abc"'),
    ),
    Case(
        "rope_factor_inf",
        {},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": INF}},
        ("rope_parameters.factor is Infinity", "finite"),  # refused by the one JSON reader, naming the key
    ),
    Case("seq_length_inf", QWEN2, {"seq_length": INF}, ("seq_length is Infinity", "finite")),
    Case("tie_not_bool", {}, {"tie_word_embeddings": "yes"}, ("tie_word_embeddings", '"yes"')),
    Case("qkv_bias_not_bool", QWEN2, {"qkv_bias": "no"}, ("qkv_bias", '"no"')),
    Case("norm_topk_prob_not_bool", QWEN3, {"norm_topk_prob": "yes"}, ("norm_topk_prob",)),
    # --- architecture and model_type agree; spellings of one size agree
    Case(
        "llama_model_type_with_mixtral",
        {},
        {"model_type": "llama"},
        ("MixtralForCausalLM", 'model_type "llama"', "disagree"),
    ),
    Case("qwen_model_type_swapped", QWEN3, {"model_type": "qwen2_moe"}, ("Qwen3MoeForCausalLM", '"qwen2_moe"')),
    Case(
        "experts_spelled_twice",
        QWEN3,
        {"num_experts": 8, "num_local_experts": 16},
        ("num_experts 8", "num_local_experts 16", "disagree"),
    ),
    # --- what a family's converter does not support (issue 13)
    Case(
        "dense_layers_among_moe",
        QWEN2,
        {"mlp_only_layers": [1], "decoder_sparse_step": 2},
        ("mlp_only_layers [1] and decoder_sparse_step 2", "not supported", "dense MLP layers"),
    ),
    Case("sparse_step_only", QWEN3, {"decoder_sparse_step": 2}, ("decoder_sparse_step 2", "not supported")),
    Case("qwen3_attention_bias", QWEN3, {"attention_bias": True}, ("attention_bias true", "not supported")),
    Case(
        "qwen_required_keys",
        QWEN2,
        {"moe_intermediate_size": ..., "num_experts": ...},
        ("required keys missing", "num_experts (or num_local_experts)", "moe_intermediate_size"),
    ),
    Case(
        "top_k_above_experts_qwen",
        QWEN3,
        {"num_experts_per_tok": 9},
        ("num_experts_per_tok 9 is larger than num_local_experts 8",),
    ),
    # --- mapping checks name Qwen's keys
    Case(
        "qwen_experts_vs_moe_ep",
        QWEN2,
        {},
        ("num_experts 12 is not divisible by moe_ep_size 8", "num_attention_heads 4 is not divisible by tp_size 8"),
        code=2,
        args=("--tp_size", "8", "--moe_ep_size", "8"),
    ),
    Case(
        "qwen_expert_ffn_vs_moe_tp",
        QWEN2,
        {"moe_intermediate_size": 22},
        ("moe_intermediate_size 22 is not divisible by moe_tp_size 4",),
        code=2,
        args=("--tp_size", "4"),
    ),
    Case(
        "shared_expert_vs_tp",
        QWEN2,
        {"shared_expert_intermediate_size": 42},
        ("shared_expert_intermediate_size 42 is not divisible by tp_size 4", "shared_expert.fc"),
        code=2,
        args=("--tp_size", "4"),
    ),
]


@pytest.fixture
def model_copy(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> Any:
    def copy(**kwargs: Any) -> Path:
        model = tmp_path / "model"
        shutil.copytree(make_checkpoint(**kwargs), model)
        return model

    return copy


def edit_config(model: Path, changes: dict[str, Any]) -> None:
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))  # Infinity / NaN as Python's json writes them


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_is_one_clear_line(case: Case, model_copy: Any, tmp_path: Path) -> None:
    model = model_copy(**case.model)
    edit_config(model, case.changes)
    before = tree_hash(model)
    started = time.perf_counter()
    result = run_convert(model, tmp_path / "out", *case.args)
    assert time.perf_counter() - started < 30  # no loop over a hostile size (a real answer takes ~1 s)
    assert_error_line(result, case.code, "config.json" if case.code == 1 else "", *case.fragments)
    assert no_final_outputs(tmp_path / "out") and not (tmp_path / "out").exists()
    assert tree_hash(model) == before


@pytest.mark.parametrize("case", [c for c in CASES if c.code == 1], ids=[c.id for c in CASES if c.code == 1])
def test_dry_run_refuses_the_same_configs(case: Case, model_copy: Any) -> None:
    """`plan` on the config.json alone says the same (no shards needed to find a bad config)."""
    model = model_copy(**case.model)
    edit_config(model, case.changes)
    result = CliRunner().invoke(main, ["plan", "--model_dir", str(model / "config.json"), *case.args])
    assert_error_line(result, case.code, *case.fragments)


def test_written_config_json_is_strict_json(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """Every number finite: a strict parser (no Infinity / NaN) reads what we write, for every family."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in config.json")

    for family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        out = tmp_path / family
        result = run_convert(make_checkpoint(family=family), out, "--tp_size", "2", "--quiet")
        assert result.exit_code == 0, result.output
        json.loads((out / "config.json").read_text(), parse_constant=refuse)


def test_transformers_must_read_the_sizes_as_the_rules_do(make_checkpoint: MakeCheckpoint) -> None:
    """Step (b) through transformers (verify's, and a conversion's where transformers decides) cross-checks
    step (a): a size transformers' class reads differently is refused, named."""
    from dataclasses import replace

    from moe_convert.errors import ConfigError
    from moe_convert.model_config import read_sizes, settings_by_transformers

    raw = json.loads((make_checkpoint(family="qwen3_moe") / "config.json").read_text())
    spec = read_sizes(raw, "config.json")
    settings = settings_by_transformers(raw, spec, "config.json")
    assert settings.family == {"moe_normalization_mode": 1, "seq_length": 8192}
    with pytest.raises(ConfigError, match=r"transformers reads num_local_experts as 8, the qwen3_moe rules as 16"):
        settings_by_transformers(raw, replace(spec, num_experts=16), "config.json")


def test_reading_sizes_needs_neither_transformers_nor_torch() -> None:
    """Step (a) is what planning waits for; importing transformers and torch (~2 s) must stay off that path.
    The package's __init__ is bypassed, and both modules are made unimportable."""
    import subprocess
    import sys

    code = (
        "import json, sys, types; pkg = types.ModuleType('moe_convert'); pkg.__path__ = ['moe_convert']; "
        "sys.modules.update({'moe_convert': pkg, 'torch': None, 'transformers': None}); "
        "from moe_convert.model_config import read_sizes; "
        "spec = read_sizes(json.load(open('configs/qwen3-30b-a3b.config.json')), 'c'); "
        "assert (spec.head_dim, spec.num_experts, spec.expert_ffn_size) == (128, 128, 768), spec"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
