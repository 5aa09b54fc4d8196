"""Issue 7: checkpoints saved with fused experts (transformers 5) convert to the same bytes as classic ones."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import MakeCheckpoint
from safetensors.torch import save_file
from spec_oracle import (
    WIDE,
    Layout,
    Sizes,
    classic_view,
    converted,
    load_raw_source,
    reference_logits,
    relative_error,
)
from trtllm_forward import forward_from_rank_files

from moe_convert import convert
from moe_convert.cli import convert_command
from moe_convert.errors import CheckpointError

MAPPINGS = [
    Layout(tp=1),
    Layout(tp=4, moe_tp=2, moe_ep=2),
    Layout(tp=8, moe_ep=8),
    Layout(tp=2, pp=2),
    Layout(tp=4, moe_ep=2, dtype="bfloat16"),
]


@pytest.fixture(scope="module")
def pair(make_checkpoint: MakeCheckpoint) -> tuple[Path, Path]:
    """The same model (same seed), saved classic and fused; WIDE so that tp8 fits."""
    return make_checkpoint(**WIDE), make_checkpoint(**WIDE, fused_experts=True)


def test_the_two_checkpoints_hold_the_same_weights_in_different_layouts(pair: tuple[Path, Path]) -> None:
    classic, fused = (load_raw_source(p) for p in pair)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in classic
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused and "model.layers.0.mlp.experts.down_proj" in fused
    assert not any(".block_sparse_moe." in n for n in fused)
    sizes = Sizes.of(pair[0])
    a, b = classic_view(classic, sizes), classic_view(fused, sizes)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("lay", MAPPINGS, ids=lambda lay: lay.label())
def test_fused_and_classic_convert_to_identical_bytes(
    lay: Layout, pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    outs = [converted(tmp_path_factory, model_dir, lay) for model_dir in pair]
    names = sorted(p.name for p in outs[0].glob("rank*.safetensors"))
    assert names == sorted(p.name for p in outs[1].glob("rank*.safetensors"))
    assert len(names) == lay.tp * lay.pp
    for name in [*names, "config.json"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), f"{name} differs"
    layouts = [json.loads((o / "manifest.json").read_text())["expert_layout"] for o in outs]
    assert layouts == ["classic", "fused"]
    # the fused manifest points into the fused tensors: gate (w1) rows [0, I), up (w3) rows [I, 2I)
    fused = json.loads((outs[1] / "manifest.json").read_text())
    fc = fused["ranks"][0]["tensors"]["transformer.layers.0.mlp.fc.weight"]
    up, gate = fc["pieces"][0], fc["pieces"][1]
    I = Sizes.of(pair[1]).I  # noqa: E741
    assert up["source"] == gate["source"] == "model.layers.0.mlp.experts.gate_up_proj"
    assert up["slice"][1][0] >= I and gate["slice"][1][1] <= I


@pytest.mark.parametrize(
    ("model", "lay"),
    [({}, Layout(tp=4, moe_tp=2, moe_ep=2, dtype="float32")), (WIDE, Layout(tp=8, moe_ep=8, dtype="float32"))],
    ids=["tp4-moetp2-moeep2", "wide-tp8-moeep8"],
)
def test_forward_pass_of_a_fused_checkpoint(
    model: dict[str, int], lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_dir = make_checkpoint(**model, fused_experts=True, initializer_range=0.2)
    out = converted(tmp_path_factory, model_dir, lay)
    ids = torch.randint(0, Sizes.of(model_dir).V, (2, 9), generator=torch.Generator().manual_seed(7))
    err = relative_error(forward_from_rank_files(str(out), ids), reference_logits(model_dir, ids))
    print(f"fused {lay.label()}: max relative error {err:.3g}")
    assert err <= 1e-4


# --- mixed and missing layouts ---------------------------------------------------------------------------


def rewrite(
    model_dir: Path, dst: Path, *, fuse: frozenset[int] = frozenset(), drop: frozenset[int] = frozenset(),
    keep_classic: bool = False,
) -> Path:  # fmt: skip
    """A single-file copy of a classic checkpoint with the experts of some layers fused or removed."""
    state = load_raw_source(model_dir)
    sizes = Sizes.of(model_dir)
    for i in fuse | drop:
        p = f"model.layers.{i}.block_sparse_moe"
        experts = range(sizes.E)
        w1, w2, w3 = ([state[f"{p}.experts.{e}.{w}.weight"] for e in experts] for w in ("w1", "w2", "w3"))
        router = state[f"{p}.gate.weight"]
        if not keep_classic:
            for name in [n for n in state if n.startswith(f"{p}.")]:
                del state[name]
        if i in fuse:
            q = f"model.layers.{i}.mlp"
            state[f"{q}.experts.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(w1, w3, strict=True)])
            state[f"{q}.experts.down_proj"] = torch.stack(w2)
            state[f"{q}.gate.weight"] = router.clone()
    dst.mkdir()
    shutil.copy(model_dir / "config.json", dst / "config.json")
    save_file({n: t.contiguous() for n, t in state.items()}, dst / "model.safetensors")
    return dst


def test_hand_fused_checkpoint_matches_transformers_layout(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Positive control for `rewrite`: fusing every layer by hand converts to the classic bytes."""
    src = rewrite(tiny_checkpoint, tmp_path / "src", fuse=frozenset({0, 1, 2}))
    convert(src, tmp_path / "out", tp_size=2, moe_ep_size=2)
    ref = converted(tmp_path_factory, tiny_checkpoint, Layout(tp=2, moe_ep=2))
    for r in range(2):
        assert (tmp_path / "out" / f"rank{r}.safetensors").read_bytes() == (ref / f"rank{r}.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"fuse": frozenset({1})}, r"mixes expert layouts.*fused in layers? 1\b"),
        ({"drop": frozenset({2})}, r"layer 2 has no expert weights"),
        ({"fuse": frozenset({0}), "keep_classic": True}, r"layer 0 has expert weights in both"),
    ],
    ids=["one-layer-fused", "one-layer-missing", "one-layer-both"],
)
def test_mixed_or_missing_expert_layout_is_an_error_naming_the_layer(
    change: dict[str, Any], pattern: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    src = rewrite(tiny_checkpoint, tmp_path / "src", **change)
    with pytest.raises(CheckpointError, match=pattern):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        convert_command, ["--model_dir", str(src), "--output_dir", str(tmp_path / "cli"), "--tp_size", "2"]
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(pattern, result.stderr), result.stderr
