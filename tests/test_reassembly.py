"""Bit-exact round trip: every HF source tensor is rebuilt from the rank files by the spec's rules alone.

Also: the rank files equal the independent naive converter's output tensor by tensor, and the manifest's
`pieces` describe every output byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MakeCheckpoint
from safetensors.torch import load_file
from spec_oracle import (
    DTYPES,
    WIDE,
    Layout,
    Sizes,
    assert_matches_source,
    classic_view,
    converted,
    load_raw_source,
    naive,
    reassemble,
    rebuild_from_manifest,
)

VOCAB97: dict[str, Any] = {"vocab_size": 97}

# (model overrides for make_checkpoint, mapping and options, output dtype expected)
CASES: list[tuple[dict[str, Any], Layout, str]] = [
    ({}, Layout(tp=1), "float16"),  # auto: a float32 source becomes float16
    ({}, Layout(tp=2, moe_ep=2), "float16"),
    ({}, Layout(tp=4, moe_tp=2, moe_ep=2), "float16"),
    (WIDE, Layout(tp=8, moe_ep=8), "float16"),
    (WIDE, Layout(tp=8), "float16"),  # moe_tp 8; 2 kv heads each repeated 4 times
    ({}, Layout(tp=4, pp=2), "float16"),  # 3 layers -> stages of 2 and 1; kv heads duplicated
    ({}, Layout(tp=2, pp=3), "float16"),
    (VOCAB97, Layout(tp=4, moe_ep=4), "float16"),  # lm_head padded 97 -> 100
    (VOCAB97, Layout(tp=2, dtype="float32", parallel_embedding=True, sharding_dim=0), "float32"),  # 97 -> 98
    ({}, Layout(tp=4, moe_ep=2, dtype="float32", parallel_embedding=True, sharding_dim=1), "float32"),
    ({}, Layout(tp=2, moe_ep=2, dtype="bfloat16"), "bfloat16"),
    ({"dtype": "bfloat16"}, Layout(tp=2), "bfloat16"),  # auto keeps bf16 (transformers 5 `dtype`)
    ({"dtype": "bfloat16", "transformers4_config": True}, Layout(tp=1), "bfloat16"),  # `torch_dtype`
    ({"transformers4_config": True}, Layout(tp=2, moe_ep=2), "float16"),
    ({"fused_experts": True}, Layout(tp=4, moe_tp=2, moe_ep=2, dtype="float32"), "float32"),
]


def _id(case: tuple[dict[str, Any], Layout, str]) -> str:
    model, lay, want = case
    tag = "-".join(f"{k}{v}" for k, v in model.items() if k not in WIDE) or "base"
    return f"{'wide-' if model.get('hidden_size') else ''}{tag}-{lay.label()}-{want}"


@pytest.fixture(scope="module", params=CASES, ids=[_id(c) for c in CASES])
def case(
    request: pytest.FixtureRequest, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Layout, torch.dtype]:
    model, lay, want = request.param
    model_dir = make_checkpoint(**model)
    return model_dir, converted(tmp_path_factory, model_dir, lay), lay, DTYPES[want]


def test_every_source_tensor_reassembles_bit_exactly(case: tuple[Path, Path, Layout, torch.dtype]) -> None:
    model_dir, out, lay, dtype = case
    sizes = Sizes.of(model_dir)
    source = classic_view(load_raw_source(model_dir), sizes)
    rebuilt = reassemble(out, sizes, lay, dtype)
    assert_matches_source(rebuilt, source, dtype)
    cfg = json.loads((out / "config.json").read_text())
    moe_tp, moe_ep = lay.moe
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert cfg["vocab_size"] == sizes.V
    assert cfg["mapping"] == {
        "world_size": lay.tp * lay.pp,
        "tp_size": lay.tp,
        "pp_size": lay.pp,
        "moe_tp_size": moe_tp,
        "moe_ep_size": moe_ep,
        "cp_size": 1,
        "gpus_per_node": 8,
    }


def test_rank_files_equal_naive_converter(case: tuple[Path, Path, Layout, torch.dtype], tmp_path: Path) -> None:
    model_dir, out, lay, _ = case
    naive().naive_convert(str(model_dir), str(tmp_path), **lay.kwargs())
    for r in range(lay.tp * lay.pp):
        ours, theirs = load_file(out / f"rank{r}.safetensors"), load_file(tmp_path / f"rank{r}.safetensors")
        assert set(ours) == set(theirs), f"rank{r} key sets differ"
        for name, t in theirs.items():
            assert ours[name].dtype == t.dtype, f"rank{r} {name}: {ours[name].dtype} vs naive {t.dtype}"
            assert torch.equal(ours[name], t), f"rank{r} {name} differs from the naive converter"
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    ("model", "lay"),
    [
        ({}, Layout(tp=4, moe_tp=2, moe_ep=2)),
        (VOCAB97, Layout(tp=2, dtype="float32", parallel_embedding=True, sharding_dim=0)),
        ({"fused_experts": True}, Layout(tp=4, moe_tp=2, moe_ep=2, dtype="float32")),
    ],
    ids=["tp4-moetp2-moeep2", "vocab97-pemb0", "fused-tp4-moetp2-moeep2"],
)
def test_manifest_pieces_describe_the_bytes(
    model: dict[str, Any], lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_dir = make_checkpoint(**model)
    out = converted(tmp_path_factory, model_dir, lay)
    checked = rebuild_from_manifest(out, load_raw_source(model_dir))
    sizes = Sizes.of(model_dir)
    assert checked == lay.tp * (sizes.L * 7) + 3 * lay.tp  # 7 per layer; embed, ln_f, lm_head per rank


def test_manifest_expert_map_matches_the_rule(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Worked-example shape on the tiny model: rank r holds experts of block r % 2, FFN half r // 2."""
    lay = Layout(tp=4, moe_tp=2, moe_ep=2)
    manifest = json.loads((converted(tmp_path_factory, make_checkpoint(), lay) / "manifest.json").read_text())
    assert manifest["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 2}
    got = [(r["rank"], r["experts"], r["ffn_slice"], r["moe_tp_rank"], r["moe_ep_rank"]) for r in manifest["ranks"]]
    assert got == [
        (0, [0, 1, 2, 3], [0, 24], 0, 0),
        (1, [4, 5, 6, 7], [0, 24], 0, 1),
        (2, [0, 1, 2, 3], [24, 48], 1, 0),
        (3, [4, 5, 6, 7], [24, 48], 1, 1),
    ]
    for entry in manifest["experts"]:
        slices = sorted(tuple(h["ffn_slice"]) for h in entry["holders"])
        assert slices == [(0, 24), (24, 48)], f"expert {entry['expert']}: {slices}"


def test_oracle_rejects_swapped_up_and_gate(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The round trip is not vacuous: the oracle fails on rank files with gate and up in the wrong order."""
    from safetensors.torch import save_file

    model_dir, lay = make_checkpoint(), Layout(tp=2, moe_ep=2)
    out = converted(tmp_path_factory, model_dir, lay)
    for r in range(2):
        st = load_file(out / f"rank{r}.safetensors")
        for name in [n for n in st if n.endswith("mlp.fc.weight")]:
            st[name] = torch.cat(st[name].chunk(2, dim=1)[::-1], dim=1).contiguous()
        save_file(st, tmp_path / f"rank{r}.safetensors")
    sizes = Sizes.of(model_dir)
    rebuilt = reassemble(tmp_path, sizes, lay, torch.float16)
    with pytest.raises(AssertionError, match=r"experts\.\d+\.w[13]\.weight differs"):
        assert_matches_source(rebuilt, classic_view(load_raw_source(model_dir), sizes), torch.float16)
