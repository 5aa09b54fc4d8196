"""Golden plan: the full plan of one small mapping, compared with tests/golden/ (UPDATE_GOLDEN=1 rewrites it).

The planner is pure, so this needs no tensors: the sources are header entries synthesised from the shapes
a Mixtral config implies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from spec_oracle import synth_sources

from moe_convert.mapping import resolve_mapping
from moe_convert.plan import ConvertOptions, Plan, plan_conversion
from moe_convert.source import ModelSpec, spec_from_config_dict

GOLDEN = Path(__file__).resolve().parent / "golden" / "plan_tp2_moeep2_bf16.json"

# Small enough to read by eye: 2 layers, 4 experts, vocab 11 (lm_head padded to 12 under tp2).
CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 11,
    "hidden_size": 16,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "torch_dtype": "float32",
}


def plan_as_json(plan: Plan) -> dict[str, Any]:
    """Everything the plan decides, per rank and per tensor in file order."""
    return {
        "mapping": plan.mapping.as_dict(),
        "dtype": plan.dtype,
        "expert_layout": plan.expert_layout,
        "ranks": [
            {
                "file": r.file,
                "rank": r.coords.rank,
                "tp_rank": r.coords.tp_rank,
                "pp_rank": r.coords.pp_rank,
                "moe_tp_rank": r.coords.moe_tp_rank,
                "moe_ep_rank": r.coords.moe_ep_rank,
                "layers": list(r.layers),
                "experts": list(r.experts),
                "ffn_slice": list(r.ffn_slice),
                "tensors": [
                    {
                        "name": t.name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "pieces": [[p.source, [list(b) for b in p.box], p.dst_offset] for p in t.pieces],
                    }
                    for t in r.tensors
                ],
            }
            for r in plan.ranks
        ],
    }


def golden_text(x: Any, indent: str = "") -> str:
    """JSON, one line per tensor piece: readable in a diff, stable to regenerate."""
    inner = indent + " "
    if isinstance(x, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {golden_text(v, inner)}" for k, v in x.items())
        return "{\n" + body + "\n" + indent + "}"
    if isinstance(x, list) and any(isinstance(i, dict) or (isinstance(i, list) and str in map(type, i)) for i in x):
        return "[\n" + ",\n".join(inner + golden_text(i, inner) for i in x) + "\n" + indent + "]"
    return json.dumps(x)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return spec_from_config_dict(CONFIG, "golden config")


@pytest.fixture(scope="module")
def doc(spec: ModelSpec) -> dict[str, Any]:
    plan = plan_conversion(
        spec, synth_sources(CONFIG), resolve_mapping(tp_size=2, moe_ep_size=2), ConvertOptions(dtype="bfloat16")
    )
    return plan_as_json(plan)


def test_plan_matches_golden(doc: dict[str, Any]) -> None:
    text = golden_text(doc) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert json.loads(GOLDEN.read_text()) == doc, "the plan changed; inspect the diff, then UPDATE_GOLDEN=1"


def _tensor(doc: dict[str, Any], rank: int, name: str) -> dict[str, Any]:
    return next(t for t in doc["ranks"][rank]["tensors"] if t["name"] == name)


def test_golden_agrees_with_the_spec_by_hand(doc: dict[str, Any]) -> None:
    """A few entries worked out from the spec, so the golden file is not its own only evidence."""
    assert doc["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 2}
    r1 = doc["ranks"][1]
    assert (r1["experts"], r1["ffn_slice"], r1["moe_ep_rank"], r1["moe_tp_rank"]) == ([2, 3], [0, 8], 1, 0)
    # qkv on rank 1: q rows [8, 16), then its one kv head (rows [4, 8)) of k and of v; bf16 = 2 bytes.
    qkv = _tensor(doc, 1, "transformer.layers.1.attention.qkv.weight")
    assert qkv["shape"] == [16, 16] and qkv["dtype"] == "BF16"
    assert qkv["pieces"] == [
        ["model.layers.1.self_attn.q_proj.weight", [[8, 16], [0, 16]], 0],
        ["model.layers.1.self_attn.k_proj.weight", [[4, 8], [0, 16]], 8 * 16 * 2],
        ["model.layers.1.self_attn.v_proj.weight", [[4, 8], [0, 16]], 12 * 16 * 2],
    ]
    # fc on rank 1: experts 2, 3; per expert up (w3) first, then gate (w1); all 8 FFN rows (moe_tp 1).
    fc = _tensor(doc, 1, "transformer.layers.0.mlp.fc.weight")
    assert fc["shape"] == [2, 16, 16]
    x = "model.layers.0.block_sparse_moe.experts"
    assert [(p[0], p[2]) for p in fc["pieces"]] == [
        (f"{x}.2.w3.weight", 0),
        (f"{x}.2.w1.weight", 256),
        (f"{x}.3.w3.weight", 512),
        (f"{x}.3.w1.weight", 768),
    ]
    # lm_head: vocab 11 padded to 12, rank 1 gets real rows [6, 11) and one zero row (no piece covers it).
    head = _tensor(doc, 1, "lm_head.weight")
    assert head["shape"] == [6, 16] and head["pieces"] == [["lm_head.weight", [[6, 11], [0, 16]], 0]]
    # the router stays float32 whatever --dtype says, and is whole on both ranks
    for rank in (0, 1):
        router = _tensor(doc, rank, "transformer.layers.0.mlp.router.weight")
        assert router["dtype"] == "F32" and router["shape"] == [4, 16]
    # dense: column chunk [8, 16) of o_proj
    dense = _tensor(doc, 1, "transformer.layers.0.attention.dense.weight")
    assert dense["pieces"] == [["model.layers.0.self_attn.o_proj.weight", [[0, 16], [8, 16]], 0]]
