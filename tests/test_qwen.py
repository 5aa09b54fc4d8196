"""Qwen2-MoE and Qwen3-MoE (issue 13): tiny real checkpoints from transformers, converted under many mappings,
rebuilt bit-exactly by the spec's rules, forward-equivalent to transformers, verified, equal to the naive
converter, and every capability of Mixtral (dry run, manifest, resume, batch, JSON, hub ids) on them too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _pytest.tmpdir import TempPathFactory
from click.testing import CliRunner
from conftest import MakeCheckpoint
from safetensors.torch import load_file, save_file
from spec_oracle import (
    DTYPES,
    Layout,
    Sizes,
    assert_matches_source,
    classic_view,
    converted,
    load_raw_source,
    naive,
    reassemble,
    reference_logits,
    relative_error,
)
from trtllm_forward import forward_from_rank_files

from moe_convert import convert, convert_batch, dry_run
from moe_convert.cli import main
from moe_convert.config_only import expected_headers
from moe_convert.header import read_header
from moe_convert.plan import SourceTensor
from moe_convert.source import open_source
from moe_convert.verify import verify

TOLERANCE = 1e-4
# std 0.2 (transformers' default is 0.02) and random norm weights and biases (transformers starts them at
# ones and zeros), so that a misplaced expert half, bias, norm or gate changes the logits clearly.
SHARP: dict[str, Any] = {"initializer_range": 0.2, "random_vectors": True}
# 12 experts (top 4), q/k/v biases, a shared expert (width 40) with its sigmoid gate, no renormalisation.
QWEN2: dict[str, Any] = {"family": "qwen2_moe", **SHARP}
QWEN2_VARIANT: dict[str, Any] = {**QWEN2, "fused_experts": True, "tie_word_embeddings": True, "qkv_bias": False}
# head_dim 16 where hidden / heads is 8, per-head q/k RMSNorm, renormalised top-2 of 8.
QWEN3: dict[str, Any] = {"family": "qwen3_moe", **SHARP}
QWEN3_VARIANT: dict[str, Any] = {**QWEN3, "fused_experts": True, "tie_word_embeddings": True}
MODELS = {"qwen2": QWEN2, "qwen2-fused-tied-nobias": QWEN2_VARIANT, "qwen3": QWEN3, "qwen3-fused-tied": QWEN3_VARIANT}

F32 = "float32"
MAPPINGS = [  # kv heads (2) < tp in the tp4 ones: each kv head duplicated on 2 ranks
    Layout(tp=1, dtype=F32),
    Layout(tp=2, dtype=F32),
    Layout(tp=4, moe_tp=2, moe_ep=2, dtype=F32),
    Layout(tp=4, moe_ep=4, dtype=F32),  # 3 experts per rank of 12 (Qwen2), 2 of 8 (Qwen3)
    Layout(tp=2, pp=2, dtype=F32),  # stages of 2 and 1 layers
]
VARIANT_MAPPINGS = [Layout(tp=2, moe_ep=2, dtype=F32), Layout(tp=4, moe_tp=2, moe_ep=2, dtype=F32)]
FORWARD = [
    *[(m, lay) for m in ("qwen2", "qwen3") for lay in MAPPINGS],
    *[(m, lay) for m in ("qwen2-fused-tied-nobias", "qwen3-fused-tied") for lay in VARIANT_MAPPINGS],
]
CASTS = [  # float32 source -> float16 (auto) and bfloat16
    *[(m, Layout(tp=2, moe_ep=2)) for m in ("qwen2", "qwen3")],
    *[(m, Layout(tp=4, moe_ep=4, dtype="bfloat16")) for m in ("qwen2", "qwen3-fused-tied")],
]


def _id(case: tuple[str, Layout]) -> str:
    return f"{case[0]}-{case[1].label()}"


def input_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1234))


_reference: dict[str, torch.Tensor] = {}


def reference(model: str, model_dir: Path) -> torch.Tensor:
    if model not in _reference:
        _reference[model] = reference_logits(model_dir, input_ids())
    return _reference[model]


# --------------------------------------------------------------------------------------------------- sources


def test_the_checkpoints_have_what_the_issue_asks_for(make_checkpoint: MakeCheckpoint) -> None:
    """Several shards and an index; 12 experts; head_dim != hidden/heads; a fused save; tied; no q/k/v bias."""
    for kwargs in MODELS.values():
        d = make_checkpoint(**kwargs)
        assert len(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 2
    q2, q2v, q3, q3v = (load_raw_source(make_checkpoint(**m)) for m in MODELS.values())
    assert Sizes.of(make_checkpoint(**QWEN2)).E == 12 and "model.layers.0.self_attn.k_proj.bias" in q2
    assert "model.layers.0.mlp.shared_expert_gate.weight" in q2 and "lm_head.weight" in q2
    assert not any(n.endswith("_proj.bias") for n in q2v) and "lm_head.weight" not in q2v
    assert "model.layers.0.mlp.experts.gate_up_proj" in q2v and "model.layers.0.mlp.experts.0.up_proj.weight" not in q2v
    s3 = Sizes.of(make_checkpoint(**QWEN3))
    assert s3.d == 16 != s3.H // s3.nh and q3["model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert "model.layers.0.mlp.experts.gate_up_proj" in q3v and "lm_head.weight" not in q3v
    # random vectors: a misplaced norm or bias cannot hide behind ones and zeros
    assert not torch.equal(q3["model.layers.0.self_attn.q_norm.weight"], q3["model.layers.0.self_attn.k_norm.weight"])


# --------------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(("model", "lay"), FORWARD, ids=[_id(c) for c in FORWARD])
def test_logits_match_transformers(
    model: str, lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: TempPathFactory, record_property: Any
) -> None:
    model_dir = make_checkpoint(**MODELS[model])
    out = converted(tmp_path_factory, model_dir, lay)
    err = relative_error(forward_from_rank_files(str(out), input_ids()), reference(model, model_dir))
    record_property("max_rel_error", err)
    print(f"{model} {lay.label()}: max relative error {err:.3g}")
    assert err <= TOLERANCE


@pytest.mark.parametrize(("model", "lay"), FORWARD + CASTS, ids=[_id(c) for c in FORWARD + CASTS])
def test_reassembles_bit_exactly_and_verifies(
    model: str, lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_dir = make_checkpoint(**MODELS[model])
    out = converted(tmp_path_factory, model_dir, lay)
    sizes = Sizes.of(model_dir)
    dtype = DTYPES["float16" if lay.dtype == "auto" else lay.dtype]
    assert_matches_source(reassemble(out, sizes, lay, dtype), classic_view(load_raw_source(model_dir), sizes), dtype)
    for source in (model_dir, None):  # `moe-convert verify OUT --model_dir SRC`, and without the source
        report = verify(out, source)
        assert report.ok, report.problems
    cfg = json.loads((out / "config.json").read_text())
    hf = json.loads((model_dir / "config.json").read_text())
    assert cfg["architecture"] == hf["architectures"][0] and cfg["qwen_type"] == hf["model_type"]
    assert cfg["head_size"] == sizes.d and cfg["num_key_value_heads"] == sizes.nkv
    assert cfg["attn_bias"] is sizes.bias and cfg["mlp_bias"] is False and cfg["use_logn_attn"] is False
    assert cfg["intermediate_size"] == hf["intermediate_size"] and cfg["moe_intermediate_size"] == sizes.I
    assert cfg["moe_shared_expert_intermediate_size"] == sizes.S == cfg["moe"]["shared_expert_intermediate_size"]
    assert cfg["seq_length"] == 8192 and cfg["tie_word_embeddings"] is sizes.tied
    assert cfg["moe"]["num_experts"] == sizes.E and cfg["moe"]["top_k"] == hf["num_experts_per_tok"]
    assert cfg["moe"]["normalization_mode"] == (1 if hf["norm_topk_prob"] else 0)
    assert cfg["moe"]["sparse_mixer_epsilon"] == 0.01 and cfg["moe"]["tp_mode"] == 0


NAIVE = [
    ("qwen2", Layout(tp=4, moe_tp=2, moe_ep=2, dtype=F32)),
    ("qwen2-fused-tied-nobias", Layout(tp=2, moe_ep=2, dtype=F32)),
    ("qwen3", Layout(tp=2, pp=2, dtype=F32)),
    ("qwen3-fused-tied", Layout(tp=4, moe_ep=4, dtype="bfloat16")),
]


@pytest.mark.parametrize(("model", "lay"), NAIVE, ids=[_id(c) for c in NAIVE])
def test_rank_files_equal_naive_converter(
    model: str, lay: Layout, make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:  # fmt: skip
    model_dir = make_checkpoint(**MODELS[model])
    out = converted(tmp_path_factory, model_dir, lay)
    naive().naive_convert(str(model_dir), str(tmp_path), **lay.kwargs())
    for r in range(lay.tp * lay.pp):
        ours, theirs = load_file(out / f"rank{r}.safetensors"), load_file(tmp_path / f"rank{r}.safetensors")
        assert set(ours) == set(theirs), f"rank{r} key sets differ"
        for name, t in theirs.items():
            assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), f"rank{r} {name} differs"
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


def test_fused_and_per_expert_saves_convert_to_identical_bytes(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lay = Layout(tp=4, moe_tp=2, moe_ep=2)
    for model in (QWEN2, QWEN3):
        outs = [converted(tmp_path_factory, make_checkpoint(**model, fused_experts=f), lay) for f in (False, True)]
        for name in [*(f"rank{r}.safetensors" for r in range(4)), "config.json"]:
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), f"{model['family']} {name}"
        layouts = [json.loads((o / "manifest.json").read_text())["expert_layout"] for o in outs]
        assert layouts == ["classic", "fused"]


# --------------------------------------------------------------------------------------------------- negative controls


def edited_copy(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of a converted dir with `edit(name, tensor)` applied to every tensor (None drops it)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    for f in src.glob("rank*.safetensors"):
        st = {n: edit(n, t) for n, t in load_file(f).items()}
        save_file({n: t.contiguous() for n, t in st.items() if t is not None}, dst / f.name)
    return dst


def swap_halves(suffix: str) -> Any:
    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        if not name.endswith(suffix):
            return t
        dim = 1 if t.dim() == 3 else 0  # experts' fc [E, 2I, H]; the shared expert's [2S, H]
        return torch.cat(t.chunk(2, dim=dim)[::-1], dim=dim)

    return edit


def set_normalization_mode(out: Path, mode: int) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg["moe"]["normalization_mode"] = mode
    (out / "config.json").write_text(json.dumps(cfg))


CONTROLS: list[tuple[str, str, Any]] = [
    ("qwen2", "drop-shared-expert-gate", lambda n, t: None if n.endswith("shared_expert_gate.weight") else t),
    ("qwen2", "swap-up-gate-experts", swap_halves(".mlp.fc.weight")),
    ("qwen2", "swap-up-gate-shared-expert", swap_halves("shared_expert.fc.weight")),
    ("qwen2", "drop-qkv-bias", lambda n, t: None if n.endswith("qkv.bias") else t),
    ("qwen3", "swap-up-gate-experts", swap_halves(".mlp.fc.weight")),
    ("qwen3", "drop-qk-norm", lambda n, t: None if n.endswith(("q_layernorm.weight", "k_layernorm.weight")) else t),
    ("qwen3", "normalization-mode-0", None),  # what upstream TensorRT-LLM writes for Qwen3-MoE
    ("qwen2", "normalization-mode-1", None),
]


@pytest.mark.parametrize(("model", "what", "edit"), CONTROLS, ids=[f"{m}-{w}" for m, w, _ in CONTROLS])
def test_negative_controls_fail_the_forward_comparison(
    model: str,
    what: str,
    edit: Any,
    make_checkpoint: MakeCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """The forward test is not vacuous: each of these mistakes loads fine and is caught by it."""
    lay = Layout(tp=4, moe_tp=2, moe_ep=2, dtype=F32)
    model_dir = make_checkpoint(**MODELS[model])
    out = converted(tmp_path_factory, model_dir, lay)
    bad = edited_copy(out, tmp_path / "bad", edit or (lambda n, t: t))
    if edit is None:
        set_normalization_mode(bad, int(what[-1]))
    err = relative_error(forward_from_rank_files(str(bad), input_ids()), reference(model, model_dir))
    record_property("max_rel_error", err)
    print(f"{model} {what}: max relative error {err:.3g}")
    assert err > 1000 * TOLERANCE


def test_oracle_rejects_swapped_shared_expert_halves(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    lay = Layout(tp=2, moe_ep=2, dtype=F32)
    model_dir = make_checkpoint(**QWEN2)
    bad = edited_copy(
        converted(tmp_path_factory, model_dir, lay), tmp_path / "bad", swap_halves("shared_expert.fc.weight")
    )
    sizes = Sizes.of(model_dir)
    with pytest.raises(AssertionError, match=r"shared_expert\.(up|gate)_proj\.weight differs"):
        assert_matches_source(reassemble(bad, sizes, lay, torch.float32), load_raw_source(model_dir), torch.float32)


# --------------------------------------------------------------------------------------------------- manifest


def test_manifest_lists_experts_per_rank_and_the_shared_expert_pieces(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lay = Layout(tp=4, moe_ep=4, dtype=F32)
    model_dir = make_checkpoint(**QWEN2)
    manifest = json.loads((converted(tmp_path_factory, model_dir, lay) / "manifest.json").read_text())
    assert [r["experts"] for r in manifest["ranks"]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert [r["ffn_slice"] for r in manifest["ranks"]] == [[0, 24]] * 4
    assert [e["expert"] for e in manifest["experts"]] == list(range(12))
    S, H = 40, 32
    for r in manifest["ranks"]:
        rows = [r["tp_rank"] * S // 4, (r["tp_rank"] + 1) * S // 4]
        fc = r["tensors"]["transformer.layers.1.mlp.shared_expert.fc.weight"]
        assert fc["shape"] == [2 * S // 4, H] and fc["dtype"] == "F32"
        assert [(p["source"], p["slice"]) for p in fc["pieces"]] == [
            ("model.layers.1.mlp.shared_expert.up_proj.weight", [rows, [0, H]]),
            ("model.layers.1.mlp.shared_expert.gate_proj.weight", [rows, [0, H]]),
        ]
        proj = r["tensors"]["transformer.layers.1.mlp.shared_expert.proj.weight"]
        assert proj["pieces"][0]["slice"] == [[0, H], rows]
        gate = r["tensors"]["transformer.layers.1.mlp.shared_expert_gate.weight"]
        assert gate["shape"] == [1, H] and gate["pieces"][0]["slice"] == [[0, 1], [0, H]]


def test_shared_expert_gate_is_in_the_model_dtype_and_the_router_in_float32(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = converted(tmp_path_factory, make_checkpoint(**QWEN2), Layout(tp=4, moe_ep=4, dtype="bfloat16"))
    header = read_header(out / "rank0.safetensors")
    assert header["transformer.layers.0.mlp.shared_expert_gate.weight"].dtype == "BF16"
    assert header["transformer.layers.0.mlp.router.weight"].dtype == "F32"


# --------------------------------------------------------------------------------------------------- dry run


@pytest.mark.parametrize("model", ["qwen2", "qwen2-fused-tied-nobias", "qwen3"])
def test_config_alone_implies_the_real_headers(model: str, make_checkpoint: MakeCheckpoint) -> None:
    """A dry run from config.json alone plans from exactly the tensors a real (per-expert) save has."""
    kwargs = {k: v for k, v in MODELS[model].items() if k != "fused_experts"}
    source = open_source(make_checkpoint(**kwargs))
    real = {n: SourceTensor(t.dtype, t.shape) for n, t in source.tensors.items()}
    assert expected_headers(source.spec, "float32") == real


def test_qwen3_30b_plan_at_tp8_moe_ep8(tmp_path: Path) -> None:
    """The issue's done-when: sizes of the real Qwen3-30B-A3B config, every check passing."""
    config = Path(__file__).resolve().parents[1] / "configs" / "qwen3-30b-a3b.config.json"
    args = ["plan", "--model_dir", str(config), "--tp_size", "8", "--moe_ep_size", "8"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "source: 30.53 B parameters, 61.06 GB in bfloat16" in text.output
    assert "checks: all passed" in text.output and "heads 32/4 kv x 128" in text.output
    doc = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    L, H, V, E, I, d = 48, 2048, 151936, 128, 768, 128  # noqa: E741
    per_layer = (32 + 4 + 4) * d * H + H * 32 * d + 2 * d + 2 * H + E * H + E * 3 * I * H
    assert doc["parameters"] == L * per_layer + 2 * V * H + H  # untied: embedding and lm_head
    assert doc["source_bytes"] == 2 * doc["parameters"]
    assert [r["experts"] for r in doc["ranks"]] == [list(range(16 * r, 16 * r + 16)) for r in range(8)]
    # tp8 with 4 kv heads: each kv head on 2 ranks; head_dim 128 although hidden / heads is 64
    qkv = doc["ranks"][0]["tensors"]["transformer.layers.0.attention.qkv.weight"]
    assert qkv["shape"] == [(32 // 8 + 2) * d, H]
    assert all(c["ok"] for c in doc["checks"])


def test_qwen15_moe_at_moe_ep8_is_refused_naming_60_and_8() -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "qwen1.5-moe-a2.7b.config.json"
    args = ["plan", "--model_dir", str(config), "--tp_size", "8", "--moe_ep_size", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    failed = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert failed == ["  - num_experts 60 is not divisible by moe_ep_size 8; choose an --moe_ep_size that divides 60"]
    doc = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert doc["ok"] is False and [c["problems"] for c in doc["checks"] if not c["ok"]] == [[failed[0][4:]]]


# --------------------------------------------------------------------------------------------------- capabilities


def test_batch_resume_and_json_on_qwen(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: Any
) -> None:
    import moe_convert.execute

    model_dir = make_checkpoint(**QWEN3)
    lay = Layout(tp=4, moe_ep=4, dtype=F32)
    clean = converted(tmp_path_factory, model_dir, lay)
    files = [*(f"rank{r}.safetensors" for r in range(4)), "config.json"]
    # batch: two mappings in one pass, the tp4/moe_ep4 one byte-identical to its own conversion
    results = convert_batch(model_dir, tmp_path / "batch", ["tp=4,moe_ep=4", "tp=2,pp=2"], dtype=F32)
    assert [len(r.ranks) for r in results] == [4, 4]
    for name in files:
        assert (results[0].output_dir / name).read_bytes() == (clean / name).read_bytes()
    # resume: interrupted after a few source tensors, then resumed, byte-identical
    real, calls = moe_convert.execute._scatter, [0]

    def scatter(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 20:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(moe_convert.execute, "_scatter", scatter)
    with pytest.raises(KeyboardInterrupt):
        convert(model_dir, tmp_path / "resumed", **lay.kwargs())
    monkeypatch.setattr(moe_convert.execute, "_scatter", real)
    convert(model_dir, tmp_path / "resumed", resume=True, **lay.kwargs())
    for name in files:
        assert (tmp_path / "resumed" / name).read_bytes() == (clean / name).read_bytes(), name
    # JSON summary of a conversion
    args = ["convert", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "json"), "--tp_size", "2"]
    result = CliRunner().invoke(main, [*args, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True


def test_hub_id_of_a_qwen_checkpoint(make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: Any) -> None:
    from huggingface_hub import constants
    from test_hub import add_snapshot

    model_dir = make_checkpoint(**QWEN2_VARIANT)
    cache = tmp_path / "hf-home" / "hub"
    add_snapshot(cache, "acme/tiny-qwen", "c" * 40, sorted(model_dir.iterdir()), refs=("main",))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = convert("acme/tiny-qwen", tmp_path / "hub", tp_size=2, moe_ep_size=2)
    local = convert(model_dir, tmp_path / "local", tp_size=2, moe_ep_size=2)
    for r in range(2):
        name = f"rank{r}.safetensors"
        assert (hub.output_dir / name).read_bytes() == (local.output_dir / name).read_bytes()
    assert (
        hub.manifest["source"]["hub_id"] == "acme/tiny-qwen" and hub.manifest["architecture"] == "Qwen2MoeForCausalLM"
    )
    assert dry_run("acme/tiny-qwen", tp_size=2, moe_ep_size=2).ok


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_example_command_builds_each_family(family: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["example", str(tmp_path / "ck"), "--family", family, "--quiet"])
    assert result.exit_code == 0, result.output
    spec = open_source(tmp_path / "ck").spec
    assert spec.rules["name"] == family and len(list((tmp_path / "ck").glob("*.safetensors"))) >= 2
