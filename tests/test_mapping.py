"""The spec's parallel mapping: MoE flag resolution, rank decomposition, pipeline split, early checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from spec_oracle import synth_sources

from moe_convert.errors import MappingError
from moe_convert.mapping import Mapping, resolve_mapping, stage_layers
from moe_convert.plan import ConvertOptions, Plan, plan_conversion
from moe_convert.source import ModelSpec, spec_from_config_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIXTRAL_8X7B = CONFIGS / "mixtral-8x7b-v0.1.config.json"


@pytest.fixture(scope="module")
def config_8x7b() -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(MIXTRAL_8X7B.read_text())
    return cfg


def plan_for(cfg: dict[str, Any], mapping: Mapping, dtype: str = "auto") -> Plan:
    spec = spec_from_config_dict(cfg, "test config")
    return plan_conversion(spec, synth_sources(cfg, "BF16"), mapping, ConvertOptions(dtype=dtype))


# --- resolution of --moe_tp_size / --moe_ep_size ------------------------------------------------------


@pytest.mark.parametrize(
    ("tp", "moe_tp", "moe_ep", "expected"),
    [
        (8, None, None, (8, 1)),  # neither given: moe_tp = tp, moe_ep = 1
        (1, None, None, (1, 1)),
        (8, None, 8, (1, 8)),  # only ep: moe_tp = tp / moe_ep
        (8, None, 2, (4, 2)),
        (8, 4, None, (4, 2)),  # only tp: moe_ep = tp / moe_tp
        (4, 1, None, (1, 4)),
        (4, 2, 2, (2, 2)),  # both, consistent
    ],
)
def test_moe_flags_resolve_as_the_spec_says(
    tp: int, moe_tp: int | None, moe_ep: int | None, expected: tuple[int, int]
) -> None:
    m = resolve_mapping(tp_size=tp, moe_tp_size=moe_tp, moe_ep_size=moe_ep)
    assert (m.moe_tp_size, m.moe_ep_size) == expected
    assert m.tp_size == tp and m.world_size == tp


def test_moe_sizes_must_multiply_to_tp_and_the_error_names_the_numbers() -> None:
    with pytest.raises(MappingError) as err:
        resolve_mapping(tp_size=8, moe_tp_size=2, moe_ep_size=2)
    msg = str(err.value)
    assert "moe_tp_size * moe_ep_size must equal tp_size" in msg
    assert re.search(r"\b2 \* 2 = 4\b", msg) and re.search(r"\b8\b", msg), msg


@pytest.mark.parametrize(("moe_tp", "moe_ep"), [(3, None), (None, 3)])
def test_one_moe_flag_that_does_not_divide_tp_is_an_error(moe_tp: int | None, moe_ep: int | None) -> None:
    with pytest.raises(MappingError, match=r"\b3\b.*\b4\b"):
        resolve_mapping(tp_size=4, moe_tp_size=moe_tp, moe_ep_size=moe_ep)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"tp_size": 0}, "--tp_size must be >= 1, got 0"),
        ({"pp_size": -1}, "--pp_size must be >= 1, got -1"),
        ({"tp_size": 2, "moe_tp_size": 0}, "--moe_tp_size must be >= 1 (or -1: not set), got 0"),
        ({"tp_size": 2, "moe_ep_size": -2}, "--moe_ep_size must be >= 1 (or -1: not set), got -2"),
    ],
)
def test_every_size_must_be_at_least_one(kwargs: dict[str, int], expected: str) -> None:
    with pytest.raises(MappingError, match=re.escape(expected)):
        resolve_mapping(**kwargs)


def test_all_bad_sizes_are_reported_together() -> None:
    with pytest.raises(MappingError) as err:
        resolve_mapping(tp_size=0, pp_size=0)
    assert "--tp_size must be >= 1, got 0" in str(err.value) and "--pp_size must be >= 1, got 0" in str(err.value)


# --- rank decomposition --------------------------------------------------------------------------------


def test_rank_coordinates_follow_the_spec() -> None:
    """tp_rank = r % tp, pp_rank = r // tp, moe_ep_rank = tp_rank % moe_ep, moe_tp_rank = tp_rank // moe_ep."""
    m = Mapping(tp_size=4, pp_size=2, moe_tp_size=2, moe_ep_size=2)
    got = [(c.rank, c.tp_rank, c.pp_rank, c.moe_tp_rank, c.moe_ep_rank) for c in m.ranks()]
    assert got == [
        (0, 0, 0, 0, 0),
        (1, 1, 0, 0, 1),
        (2, 2, 0, 1, 0),
        (3, 3, 0, 1, 1),
        (4, 0, 1, 0, 0),
        (5, 1, 1, 0, 1),
        (6, 2, 1, 1, 0),
        (7, 3, 1, 1, 1),
    ]


def test_worked_example_of_the_spec_on_mixtral_8x7b(config_8x7b: dict[str, Any]) -> None:
    """E=8, I=14336, tp4/moe_tp2/moe_ep2: rank0 experts 0-3 rows [0,7168); rank1 4-7 [0,7168); ..."""
    plan = plan_for(config_8x7b, resolve_mapping(tp_size=4, moe_tp_size=2, moe_ep_size=2))
    assert plan.dtype == "bfloat16"  # auto, from torch_dtype
    expected = {0: (range(0, 4), (0, 7168)), 1: (range(4, 8), (0, 7168))}
    expected |= {2: (range(0, 4), (7168, 14336)), 3: (range(4, 8), (7168, 14336))}
    for r in plan.ranks:
        experts, (lo, hi) = expected[r.coords.rank]
        assert (r.experts, r.ffn_slice) == (tuple(experts), (lo, hi))
        tensors = {t.name: t for t in r.tensors}
        fc, proj = tensors["transformer.layers.5.mlp.fc.weight"], tensors["transformer.layers.5.mlp.proj.weight"]
        assert fc.shape == (4, 2 * 7168, 4096) and proj.shape == (4, 4096, 7168)
        x = "model.layers.5.block_sparse_moe.experts"
        # per local expert: up (w3) rows of this chunk, then gate (w1) rows of the same chunk
        assert [(p.source, p.box) for p in fc.pieces] == [
            (f"{x}.{e}.{w}.weight", ((lo, hi), (0, 4096))) for e in experts for w in ("w3", "w1")
        ]
        assert [(p.source, p.box) for p in proj.pieces] == [
            (f"{x}.{e}.w2.weight", ((0, 4096), (lo, hi))) for e in experts
        ]
        router = tensors["transformer.layers.5.mlp.router.weight"]
        assert router.dtype == "F32" and router.shape == (8, 4096)


def test_tp8_moe_ep8_gives_one_whole_expert_per_rank(config_8x7b: dict[str, Any]) -> None:
    plan = plan_for(config_8x7b, resolve_mapping(tp_size=8, moe_ep_size=8))
    assert [(r.experts, r.ffn_slice) for r in plan.ranks] == [((e,), (0, 14336)) for e in range(8)]


def test_tp8_default_splits_every_expert_eight_ways(config_8x7b: dict[str, Any]) -> None:
    plan = plan_for(config_8x7b, resolve_mapping(tp_size=8))
    assert [(r.experts, r.ffn_slice) for r in plan.ranks] == [
        (tuple(range(8)), (r * 1792, (r + 1) * 1792)) for r in range(8)
    ]


# --- pipeline split -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "pp"), [(3, 2), (3, 3), (5, 3), (32, 3), (32, 5), (56, 8), (7, 1), (4, 4)])
def test_pipeline_stages_give_the_first_n_mod_pp_stages_one_extra_layer(n: int, pp: int) -> None:
    stages = [list(stage_layers(n, pp, p)) for p in range(pp)]
    assert stages == [s.tolist() for s in torch.tensor_split(torch.arange(n), pp)]
    assert [len(s) for s in stages] == [n // pp + (p < n % pp) for p in range(pp)]


def test_pipeline_plan_uses_stage_local_layer_names(config_8x7b: dict[str, Any]) -> None:
    """32 layers over pp 3: 11, 11, 10; names restart at transformer.layers.0 in every stage."""
    plan = plan_for(config_8x7b, resolve_mapping(tp_size=2, pp_size=3, moe_ep_size=2))
    assert [r.layers for r in plan.ranks] == [tuple(range(0, 11))] * 2 + [tuple(range(11, 22))] * 2 + [
        tuple(range(22, 32))
    ] * 2
    for r in plan.ranks:
        names = {t.name: t for t in r.tensors}
        first = names["transformer.layers.0.input_layernorm.weight"].pieces[0].source
        assert first == f"model.layers.{r.layers[0]}.input_layernorm.weight"
        assert f"transformer.layers.{len(r.layers)}.input_layernorm.weight" not in names
        assert ("transformer.vocab_embedding.weight" in names) == (r.coords.pp_rank == 0)
        assert ("lm_head.weight" in names) == ("transformer.ln_f.weight" in names) == (r.coords.pp_rank == 2)


# --- checks before any tensor is read ---------------------------------------------------------------------


def _spec(**overrides: Any) -> ModelSpec:
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 1000,
        "hidden_size": 768,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
    }
    return spec_from_config_dict({**cfg, **overrides}, "test config")


@pytest.mark.parametrize(
    ("overrides", "mapping", "numbers"),
    [
        ({"num_local_experts": 6}, Mapping(tp_size=4, moe_tp_size=1, moe_ep_size=4), ["num_local_experts 6", "4"]),
        ({"intermediate_size": 100}, Mapping(tp_size=8, moe_tp_size=8), ["intermediate_size 100", "8"]),
        ({"num_attention_heads": 12}, Mapping(tp_size=8, moe_tp_size=8), ["num_attention_heads 12", "8"]),
        ({"num_key_value_heads": 6}, Mapping(tp_size=4, moe_tp_size=4), ["num_key_value_heads 6", "4"]),
        ({"num_key_value_heads": 3}, Mapping(tp_size=8, moe_tp_size=8), ["8", "num_key_value_heads 3"]),
        ({"num_hidden_layers": 2}, Mapping(pp_size=3), ["pp_size 3", "num_hidden_layers 2"]),
    ],
    ids=["experts%moe_ep", "inter%moe_tp", "heads%tp", "kv>=tp", "tp%kv", "pp>layers"],
)
def test_each_divisibility_check_fails_early_naming_the_numbers(
    overrides: dict[str, Any], mapping: Mapping, numbers: list[str]
) -> None:
    """Raised from the config alone: no source tensor (not even a header) is needed to find it."""
    with pytest.raises(MappingError) as err:
        plan_conversion(_spec(**overrides), {}, mapping)
    msg = str(err.value)
    for n in numbers:
        assert re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", msg), f"{n!r} not in {msg!r}"


def test_all_failing_checks_are_reported_at_once() -> None:
    spec = _spec(num_local_experts=6, intermediate_size=101, num_hidden_layers=2)
    with pytest.raises(MappingError) as err:
        plan_conversion(spec, {}, Mapping(tp_size=8, pp_size=3, moe_tp_size=2, moe_ep_size=4))
    msg = str(err.value)
    for fragment in ("num_local_experts 6", "moe_ep_size 4", "intermediate_size 101", "moe_tp_size 2", "pp_size 3"):
        assert fragment in msg, msg
    assert len(err.value.problems) == 3


def test_a_fitting_mapping_passes_every_check(config_8x7b: dict[str, Any]) -> None:
    """tp8 on 8 kv heads, tp16 would need heads % 16 == 0 (32 ok) and kv duplication 16 % 8 == 0 (ok)."""
    for m in (resolve_mapping(8, 4, moe_ep_size=8), resolve_mapping(16, moe_ep_size=8)):
        plan = plan_for(config_8x7b, m)
        assert len(plan.ranks) == m.world_size
