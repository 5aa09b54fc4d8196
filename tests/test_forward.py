"""Forward pass: logits computed from the rank files (simulated TP/EP/PP) match transformers' Mixtral."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MakeCheckpoint
from safetensors.torch import load_file, save_file
from spec_oracle import WIDE, Layout, Sizes, converted, reference_logits, relative_error
from trtllm_forward import forward_from_rank_files

TOLERANCE = 1e-4
# With transformers' default init (std 0.02) the experts barely move the logits (swapping up and gate
# changes them by under 1%), so a wrong layout could hide; std 0.2 makes every weight matter.
SHARP: dict[str, Any] = {"initializer_range": 0.2}

MAPPINGS: list[tuple[dict[str, Any], Layout]] = [
    ({}, Layout(tp=1)),
    ({}, Layout(tp=2, moe_ep=2)),
    ({}, Layout(tp=4, moe_tp=2, moe_ep=2)),
    (WIDE, Layout(tp=8, moe_ep=8)),
    (WIDE, Layout(tp=8)),  # kv heads duplicated 4x, moe_tp 8
    ({}, Layout(tp=4, pp=2)),  # kv heads duplicated 2x, stages of 2 and 1 layers
    ({}, Layout(tp=2, pp=3)),
    ({"vocab_size": 97}, Layout(tp=2, parallel_embedding=True, sharding_dim=0)),
    ({"vocab_size": 97}, Layout(tp=4, moe_tp=2, moe_ep=2)),  # lm_head padding
    ({}, Layout(tp=4, moe_ep=4, parallel_embedding=True, sharding_dim=1)),
]


def input_ids(vocab: int) -> torch.Tensor:
    """Two seeded sequences of 9 tokens covering the whole vocabulary range."""
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1234))


_reference: dict[Path, torch.Tensor] = {}


def reference(model_dir: Path) -> torch.Tensor:
    if model_dir not in _reference:
        _reference[model_dir] = reference_logits(model_dir, input_ids(Sizes.of(model_dir).V))
    return _reference[model_dir]


def float32(lay: Layout) -> Layout:
    return Layout(**{**lay.__dict__, "dtype": "float32"})


def _id(m: tuple[dict[str, Any], Layout]) -> str:
    model, lay = m
    return ("wide-" if model is WIDE else "".join(f"{k}{v}-" for k, v in model.items())) + lay.label()


@pytest.mark.parametrize(("model", "lay"), MAPPINGS, ids=[_id(m) for m in MAPPINGS])
def test_logits_match_transformers(
    model: dict[str, Any],
    lay: Layout,
    make_checkpoint: MakeCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: Any,
) -> None:
    model_dir = make_checkpoint(**model, **SHARP)
    out = converted(tmp_path_factory, model_dir, float32(lay))
    ref = reference(model_dir)
    err = relative_error(forward_from_rank_files(str(out), input_ids(Sizes.of(model_dir).V)), ref)
    record_property("max_rel_error", err)
    print(f"{_id((model, lay))}: max relative error {err:.3g}")
    assert err <= TOLERANCE


def swap_up_and_gate(src: Path, dst: Path) -> None:
    """Copy a converted dir, exchanging the up and gate halves of every mlp.fc (the classic trap)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    for f in src.glob("rank*.safetensors"):
        st = load_file(f)
        for name in [n for n in st if n.endswith("mlp.fc.weight")]:
            up, gate = st[name].chunk(2, dim=1)
            st[name] = torch.cat([gate, up], dim=1).contiguous()
        save_file(st, dst / f.name)


@pytest.mark.parametrize("lay", [Layout(tp=1), Layout(tp=4, moe_tp=2, moe_ep=2)], ids=lambda lay: lay.label())
def test_swapped_up_and_gate_fails_the_comparison(
    lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Negative control: the forward test would catch the up/gate swap that loads fine and computes garbage."""
    model_dir = make_checkpoint(**SHARP)
    out = converted(tmp_path_factory, model_dir, float32(lay))
    swap_up_and_gate(out, tmp_path / "swapped")
    ids = input_ids(Sizes.of(model_dir).V)
    err = relative_error(forward_from_rank_files(str(tmp_path / "swapped"), ids), reference(model_dir))
    print(f"swapped up/gate {lay.label()}: max relative error {err:.3g}")
    assert err > 1000 * TOLERANCE
