"""Weight-only INT8 / INT4 conversions end to end: every rank file byte-identical to TensorRT-LLM's
quantize-and-preprocess of the spec's per-rank tensors, config.json, the CLI's arch rules, the simulated
forward pass, resume and batch with precisions, dry-run sizes and shape refusals.

The spec's per-rank tensors are those of the unquantized conversion of the same mapping, which
tests/spec_oracle.py rebuilds into the source here (`spec_tensors`); quantizing them with the module proven
byte-identical to TensorRT-LLM's C++ (tests/test_weight_only.py) gives the expected bytes, and the slow
reference written from the spec checks one tensor of each layout on top.

The tiny models satisfy the kernels' shape limits under every mapping used: hidden 512, 8 heads of 64 with
2 kv heads, 8 experts of FFN width 128 (int4 needs multiples of 64 in and 64 out per rank).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import MakeCheckpoint
from safetensors.torch import load_file, save_file
from spec_oracle import Layout, Sizes, assert_matches_source, classic_view, converted, load_raw_source, reassemble
from trtllm_forward import forward_from_rank_files
from weight_only_reference import reference

import moe_convert.execute
import moe_convert.quantize_pool
import moe_convert.weight_only
from moe_convert import convert, convert_batch, verify
from moe_convert.cli import main
from moe_convert.dryrun import dry_run
from moe_convert.errors import UsageError
from moe_convert.weight_only import WeightOnly

WIDE_MIXTRAL: dict[str, Any] = {
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_local_experts": 8,
    "max_shard_size": "2MB",
}
WIDE_QWEN2: dict[str, Any] = {
    "family": "qwen2_moe",
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 256,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "random_vectors": True,
    "max_shard_size": "2MB",
}
WIDE_QWEN3: dict[str, Any] = {
    "family": "qwen3_moe",
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "moe_intermediate_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "random_vectors": True,
    "max_shard_size": "2MB",
}
# The mappings.
LAYOUTS = [
    Layout(tp=1, dtype="bfloat16"),
    Layout(tp=4, moe_tp=2, moe_ep=2, dtype="bfloat16"),
    Layout(tp=8, moe_ep=8, dtype="bfloat16"),
    Layout(tp=2, pp=2, dtype="bfloat16"),
]


@dataclass(frozen=True)
class Quant:
    precision: str
    arch: int
    sm90_layout: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {
            "use_weight_only": True,
            "weight_only_precision": self.precision,
            "weight_only_arch": self.arch,
            "weight_only_sm90_layout": self.sm90_layout,
        }

    @property
    def scheme(self) -> WeightOnly:
        return WeightOnly(self.precision, self.arch, self.sm90_layout)

    def label(self) -> str:
        return f"{self.precision}-sm{self.arch}" + (f"-{self.sm90_layout}" if self.sm90_layout else "")


QUANTS = [Quant(p, a, lay) for p in ("int8", "int4") for a, lay in ((80, None), (90, "column_major"), (90, "permuted"))]


@pytest.fixture(scope="module")
def wide(make_checkpoint: MakeCheckpoint) -> Path:
    return make_checkpoint(**WIDE_MIXTRAL)


_quantized: dict[tuple[str, Layout, Quant], Path] = {}


def quantized(factory: pytest.TempPathFactory, model_dir: Path, lay: Layout, q: Quant, **extra: Any) -> Path:
    key = (str(model_dir), lay, q)
    if key not in _quantized or extra:
        out = factory.mktemp(f"{lay.label()}-{q.label()}") / "out"
        convert(model_dir, out, **lay.kwargs(), **q.kwargs(), **extra)
        if extra:
            return out
        _quantized[key] = out
    return _quantized[key]


def spec_tensors(factory: pytest.TempPathFactory, model_dir: Path, lay: Layout) -> list[dict[str, torch.Tensor]]:
    """The unquantized conversion's rank tensors, checked against the spec: reassembled by the spec oracle,
    they are the source cast to the output dtype."""
    out = converted(factory, model_dir, lay)
    sizes = Sizes.of(model_dir)
    rebuilt = reassemble(out, sizes, lay, torch.bfloat16)
    assert_matches_source(rebuilt, classic_view(load_raw_source(model_dir), sizes), torch.bfloat16)
    return [load_file(out / f"rank{r}.safetensors") for r in range(lay.tp * lay.pp)]


def assert_quantized_ranks(out: Path, expected: list[dict[str, torch.Tensor]], scheme: WeightOnly) -> int:
    """Each rank file: the rules' weight-only weights are `scheme`'s bytes of the spec's tensor, with their
    per_channel_scale; everything else is the spec's tensor unchanged. Returns the weights checked."""
    weight_only = ("attention.qkv.weight", "attention.dense.weight", "mlp.fc.weight", "mlp.proj.weight")
    weight_only += ("mlp.shared_expert.fc.weight", "mlp.shared_expert.proj.weight")
    checked = 0
    for rank, spec in enumerate(expected):
        got = load_file(out / f"rank{rank}.safetensors")
        scales = {n.removesuffix(".weight") + ".per_channel_scale" for n in spec if n.endswith(weight_only)}
        assert set(got) == set(spec) | scales, f"rank{rank} tensor names"
        for name, t in spec.items():
            if not name.endswith(weight_only):
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), f"rank{rank} {name}"
                continue
            qt = scheme.tensor(name, tuple(t.shape), "BF16")
            weight, scale = qt.quantize(t)
            assert got[name].dtype == torch.int8 and got[name].shape == weight.shape, f"rank{rank} {name} shape"
            assert torch.equal(got[name], weight), f"rank{rank} {name}: bytes differ"
            assert torch.equal(got[qt.scale_name], scale), f"rank{rank} {qt.scale_name} differs"
            checked += 1
    return checked


@pytest.mark.parametrize("q", QUANTS, ids=Quant.label)
@pytest.mark.parametrize("lay", LAYOUTS, ids=Layout.label)
def test_rank_files_are_the_spec_tensors_quantized(
    wide: Path, lay: Layout, q: Quant, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = quantized(tmp_path_factory, wide, lay, q)
    checked = assert_quantized_ranks(out, spec_tensors(tmp_path_factory, wide, lay), q.scheme)
    assert checked == lay.tp * lay.pp * 4 * 2 // lay.pp  # qkv, dense, fc, proj per layer on every rank
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == q.scheme.quantization_config()
    assert config["quantization"]["quant_algo"] == {"int8": "W8A16", "int4": "W4A16"}[q.precision]


@pytest.mark.parametrize("q", [Quant("int4", 80), Quant("int8", 90, "column_major")], ids=Quant.label)
@pytest.mark.parametrize("chunk_bytes", [None, 1000, 3 * 1024 + 100, 40_000])
def test_chunks_and_pool_blocks_that_cut_row_groups_write_the_same_bytes(
    wide: Path,
    q: Quant,
    chunk_bytes: int | None,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pool blocks of 64 KB (an expert's fc is 128 KB here: two blocks, written in order), and source chunks
    that end inside a row (1000 bytes of 1024-byte rows), after three rows (inside a group of 2 or 4), or
    after 39: the rows a chunk leaves open wait for the next one, and every byte is as in one piece."""
    lay = LAYOUTS[1]
    expected = quantized(tmp_path_factory, wide, lay, q)
    monkeypatch.setattr(moe_convert.execute, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(moe_convert.quantize_pool, "BLOCK_BYTES", 64 * 1024)
    extra = {"chunk_bytes": chunk_bytes} if chunk_bytes else {"workers": 3}
    got = quantized(tmp_path_factory, wide, lay, q, **extra)
    files = sorted(f.name for f in expected.glob("rank*.safetensors"))
    assert files and files == sorted(f.name for f in got.glob("rank*.safetensors"))
    for name in files:
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name


@pytest.mark.parametrize("q", [Quant("int4", 80), Quant("int8", 90, "column_major")], ids=Quant.label)
@pytest.mark.parametrize("chunk_bytes", [None, 3 * 1024 + 100])
def test_a_source_in_the_model_dtype_is_quantized_where_it_was_read(
    make_checkpoint: MakeCheckpoint, q: Quant, chunk_bytes: int | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A bfloat16 source converted to bfloat16: whole row groups are quantized in the chunk buffer, uncopied
    (the float32 sources elsewhere go through the cast); the bytes are still the spec tensors quantized."""
    source = make_checkpoint(**WIDE_MIXTRAL, dtype="bfloat16")
    lay = LAYOUTS[1]
    out = quantized(tmp_path_factory, source, lay, q, **({"chunk_bytes": chunk_bytes} if chunk_bytes else {}))
    assert assert_quantized_ranks(out, spec_tensors(tmp_path_factory, source, lay), q.scheme) == lay.tp * 4 * 2


@pytest.mark.parametrize("q", [Quant("int4", 86), Quant("int8", 89), Quant("int4", 75)], ids=Quant.label)
def test_other_archs_write_the_sm80_bytes(wide: Path, q: Quant, tmp_path_factory: pytest.TempPathFactory) -> None:
    """sm75-89 share one layout: the files equal the sm80 conversion's, and the spec's tensors quantized."""
    lay = LAYOUTS[1]
    out = quantized(tmp_path_factory, wide, lay, q)
    sm80 = quantized(tmp_path_factory, wide, lay, Quant(q.precision, 80))
    for rank in range(lay.tp):
        name = f"rank{rank}.safetensors"
        assert (out / name).read_bytes() == (sm80 / name).read_bytes()
    assert_quantized_ranks(out, spec_tensors(tmp_path_factory, wide, lay), q.scheme)


@pytest.mark.parametrize("q", [Quant("int8", 80), Quant("int4", 90, "column_major"), Quant("int8", 90, "permuted")])
def test_one_weight_of_each_layout_against_the_slow_reference(
    wide: Path, q: Quant, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The smallest 2-D and 3-D weights (tp8's dense [512, 64] and proj [1, 512, 128]) against the reference
    written from the spec in plain Python, which shares no code with the converter."""
    lay = LAYOUTS[2]
    got = load_file(quantized(tmp_path_factory, wide, lay, q) / "rank3.safetensors")
    spec = spec_tensors(tmp_path_factory, wide, lay)[3]
    for name in ("transformer.layers.1.attention.dense.weight", "transformer.layers.0.mlp.proj.weight"):
        weight, scales = reference(spec[name], q.precision, q.arch, q.sm90_layout or "column_major")
        assert got[name].numpy().tobytes() == weight
        assert got[name.removesuffix("weight") + "per_channel_scale"].view(torch.uint8).numpy().tobytes() == scales


def test_qwen3_moe_keeps_its_qk_norms_and_quantizes_the_rest(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = make_checkpoint(**WIDE_QWEN3)
    lay, q = Layout(tp=2, moe_ep=2, dtype="bfloat16"), Quant("int8", 90, "column_major")
    out = quantized(tmp_path_factory, model, lay, q)
    assert assert_quantized_ranks(out, spec_tensors(tmp_path_factory, model, lay), q.scheme) == 2 * 2 * 4
    assert load_file(out / "rank1.safetensors")["transformer.layers.1.attention.q_layernorm.weight"].dtype == (
        torch.bfloat16
    )


def test_qwen2_moe_shared_expert_is_quantized_its_gate_is_not(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = make_checkpoint(**WIDE_QWEN2)
    lay = Layout(tp=2, moe_ep=2, dtype="bfloat16")
    for q in (Quant("int4", 80), Quant("int8", 90, "permuted")):
        out = quantized(tmp_path_factory, model, lay, q)
        checked = assert_quantized_ranks(out, spec_tensors(tmp_path_factory, model, lay), q.scheme)
        assert checked == 2 * 2 * 6  # ranks x layers x (qkv, dense, fc, proj, shared fc, shared proj)
        rank0 = load_file(out / "rank0.safetensors")
        assert rank0["transformer.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.bfloat16
        assert rank0["transformer.layers.0.attention.qkv.bias"].dtype == torch.bfloat16
        assert rank0["transformer.layers.0.mlp.router.weight"].dtype == torch.float32


# --- verify -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [Quant("int4", 90, "permuted"), Quant("int8", 80)], ids=Quant.label)
def test_verify_recomputes_every_quantized_byte_and_fails_on_a_flipped_one(
    wide: Path, q: Quant, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lay = LAYOUTS[1]
    good = quantized(tmp_path_factory, wide, lay, q)
    assert verify(good).ok and verify(good, wide).ok
    manifest = json.loads((good / "manifest.json").read_text())
    entry = manifest["ranks"][2]["tensors"]["transformer.layers.1.attention.dense.weight"]["weight_only"]
    assert entry == {
        "precision": q.precision,
        "arch": q.arch,
        "layout": q.scheme.layout(2).value,
        "rows_shape": [512, 128],
        "rows_dtype": "BF16",
        "weight": "transformer.layers.1.attention.dense.weight",
        "scale": "transformer.layers.1.attention.dense.per_channel_scale",
    }
    assert manifest["options"]["weight_only_precision"] == q.precision
    for name in ("transformer.layers.1.mlp.proj.weight", "transformer.layers.0.attention.qkv.per_channel_scale"):
        bad = tmp_path / name
        shutil.copytree(good, bad)
        rank = json.loads((bad / "manifest.json").read_text())["ranks"][2]
        data = bytearray((bad / rank["file"]).read_bytes())
        at = 8 + int.from_bytes(data[:8], "little") + rank["tensors"][name]["data_offsets"][0] + 200
        data[at] ^= 0x01
        (bad / rank["file"]).write_bytes(data)
        assert "sha256" in " ".join(verify(bad).problems)  # without the source: the file changed
        # with it, also which tensor and rows, whatever the manifest's sha256 says
        fixed = json.loads((bad / "manifest.json").read_text())
        fixed["ranks"][2]["sha256"] = hashlib.sha256(data).hexdigest()
        (bad / "manifest.json").write_text(json.dumps(fixed))
        problems = verify(bad, wide).problems
        assert len(problems) == 1 and f"tensor {name!r}: bytes [" in problems[0], problems
        assert "quantized " + q.precision in problems[0]


def test_verify_finds_an_edited_weight_only_record(
    wide: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The manifest is re-derived from its own model and options: a quantization record edited to another
    arch, or options claiming another layout, are reported without the source."""
    good = quantized(tmp_path_factory, wide, LAYOUTS[1], Quant("int8", 90, "permuted"))
    for edit in ("record", "options"):
        bad = tmp_path / edit
        shutil.copytree(good, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        if edit == "record":
            manifest["ranks"][0]["tensors"]["transformer.layers.0.attention.qkv.weight"]["weight_only"]["arch"] = 80
        else:
            manifest["options"]["weight_only_sm90_layout"] = "column_major"
        (bad / "manifest.json").write_text(json.dumps(manifest))
        problems = " ".join(verify(bad).problems)
        assert ("weight_only.arch is 80" if edit == "record" else "layout") in problems, problems


# --- a simulated TensorRT-LLM forward pass over dequantized weights ---------------------------------------------


def dequantized_copy(out: Path, target: Path, scheme: WeightOnly, spec: list[dict[str, torch.Tensor]]) -> Path:
    """The rank files with each quantized weight replaced by what TensorRT-LLM's mixed GEMM computes with:
    its signed values (the layout undone) times its stored scales."""
    target.mkdir()
    shutil.copy(out / "config.json", target / "config.json")
    for rank, unquantized in enumerate(spec):
        tensors = load_file(out / f"rank{rank}.safetensors")
        for name in [n for n, t in tensors.items() if t.dtype == torch.int8]:
            qt = scheme.tensor(name, tuple(unquantized[name].shape), "BF16")
            tensors[name] = qt.dequantize(tensors[name], tensors.pop(qt.scale_name))
        save_file(tensors, target / f"rank{rank}.safetensors")
    return target


@pytest.mark.parametrize("lay", [LAYOUTS[1], LAYOUTS[3]], ids=Layout.label)
def test_forward_pass_with_dequantized_weights_is_close_to_the_float_one(
    wide: Path, lay: Layout, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Logits over the quantized checkpoint against the same simulation over the unquantized one.

    What is honest to expect: per-channel rounding moves each weight by at most half a step (amax/256 for
    int8, amax/16 for int4), so the logits' error is quantization noise that grows with the step, 16x from
    int8 to int4. Measured on this model (max |logit - float logit| / max |float logit|): 1.0-1.2% (int8),
    20-21% (int4: 4 bits on a 2-layer random model is coarse). Asserted: int8 < 2%, int4 < 35%, their ratio
    between 8 and 32 (the step ratio 16, give or take the noise), identical values whatever the layout, and
    a control: undoing the wrong layout gives errors over 80%, so the bounds do tell a layout mistake from
    rounding."""
    ids = torch.tensor([[1, 7, 42, 99, 3, 15, 64, 2]])
    want = forward_from_rank_files(str(converted(tmp_path_factory, wide, lay)), ids)
    spec = spec_tensors(tmp_path_factory, wide, lay)

    def error(q: Quant, undo: WeightOnly, name: str) -> float:
        out = quantized(tmp_path_factory, wide, lay, q)
        got = forward_from_rank_files(str(dequantized_copy(out, tmp_path / name, undo, spec)), ids)
        return float((got - want).abs().max() / want.abs().max())

    int8 = error(Quant("int8", 80), WeightOnly("int8", 80), "int8")
    int8_sm90 = error(Quant("int8", 90, "column_major"), WeightOnly("int8", 90, "column_major"), "int8-sm90")
    int4 = error(Quant("int4", 90, "permuted"), WeightOnly("int4", 90, "permuted"), "int4")
    wrong = error(Quant("int4", 90, "permuted"), WeightOnly("int4", 80), "wrong")
    assert int8 < 0.02 and int4 < 0.35 and 8 < int4 / int8 < 32, (int8, int4)
    assert int8_sm90 == int8  # the same values, laid out differently
    assert wrong > 0.8, wrong


# --- the command line -----------------------------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_gpu_and_no_arch_is_exit_2_one_line_nothing_written(
    wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moe_convert.weight_only, "visible_gpu_arch", lambda: None)
    out = tmp_path / "deep" / "out"
    for precision in ([], ["--weight_only_precision", "int4"]):
        line = one_error_line(
            run("convert", "--model_dir", str(wide), "--output_dir", str(out), "--use_weight_only", *precision)
        )
        assert "no GPU is visible" in line and "--weight_only_arch" in line
        assert not (tmp_path / "deep").exists()
    assert "no GPU is visible" in one_error_line(run("plan", "--model_dir", str(wide), "--use_weight_only"))


def test_the_visible_gpu_is_the_default_arch(wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_convert.weight_only, "visible_gpu_arch", lambda: 86)
    result = run("plan", "--model_dir", str(wide), "--use_weight_only", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["weight_only_arch"] == 86
    monkeypatch.setattr(moe_convert.weight_only, "visible_gpu_arch", lambda: 90)  # an H100: the layout is asked for
    line = one_error_line(
        run("convert", "--model_dir", str(wide), "--output_dir", str(tmp_path / "o"), "--use_weight_only")
    )
    assert "--weight_only_sm90_layout column_major (TensorRT-LLM 0.10-0.11) or permuted (1.2)" in line
    monkeypatch.setattr(moe_convert.weight_only, "visible_gpu_arch", lambda: 100)
    assert "sm100" in one_error_line(run("plan", "--model_dir", str(wide), "--use_weight_only"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--weight_only_arch", "80"], "nothing is quantized"),
        (["--use_weight_only", "--weight_only_arch", "70"], "--weight_only_arch 70 is not an arch"),
        (["--use_weight_only", "--weight_only_arch", "90", "--weight_only_sm90_layout", "x"], "Invalid value"),
        (["--weight_only_precision", "int4"], "without --use_weight_only"),
        (["--use_weight_only", "--weight_only_precision", "int4_awq"], "calibration"),
    ],
)
def test_weight_only_option_mistakes_are_refused(wide: Path, tmp_path: Path, args: list[str], says: str) -> None:
    result = run("convert", "--model_dir", str(wide), "--output_dir", str(tmp_path / "o"), *args)
    assert result.exit_code == 2 and says in result.stderr, result.output
    assert not (tmp_path / "o").exists()


def test_shapes_the_kernels_cannot_take_are_refused_in_one_line_before_reading(
    wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tp8 moe_tp8 leaves proj 16 columns per rank; int4's interleaved layout needs 64."""
    monkeypatch.setattr("moe_convert.reading.SourceReader.read_bits", None)  # any read would fail loudly
    args = ["convert", "--model_dir", str(wide), "--output_dir", str(tmp_path / "o"), "--tp_size", "8"]
    line = one_error_line(
        run(*args, "--use_weight_only", "--weight_only_precision", "int4", "--weight_only_arch", "80")
    )
    assert "transformer.layers.N.mlp.proj.weight [8, 512, 16]: in_features 16 is not a multiple of 64" in line
    assert "mlp.fc.weight [8, 32, 512]: out_features 32 is not a multiple of 64 (int4, interleaved" in line
    assert "a smaller tp or moe_tp (a larger moe_ep), or int8, may fit" in line and len(line) <= 400
    assert not (tmp_path / "o").exists()


def test_a_nan_weight_stops_the_conversion_in_one_line_and_leaves_nothing(wide: Path, tmp_path: Path) -> None:
    """A NaN in one expert's weight: the pool thread's error reaches the command as one line naming the
    weight, exit 1, and no rank file, temporary file, config or manifest is left."""
    source = tmp_path / "src"
    shutil.copytree(wide, source)
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = source / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][7, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["convert", "--model_dir", str(source), "--output_dir", str(out), "--tp_size", "4", "--moe_tp_size", "2"]
    result = run(*args, "--moe_ep_size", "2", "--use_weight_only", "--weight_only_arch", "80", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "transformer.layers.1.mlp.fc.weight: the weight has inf or NaN" in lines[0], lines
    left = {f.name for f in out.iterdir()} if out.exists() else set()
    assert left <= {".moe-convert-journal.json"}, left  # the journal is what --resume would continue from


def test_a_quantize_worker_that_dies_stops_the_conversion_in_one_line(
    wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantize worker killed mid-conversion (as the kernel's OOM killer would kill it): one line saying
    which process and how, exit 1, no rank file left, and no worker left running."""

    def die(*args: Any) -> bytes:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    monkeypatch.setattr(moe_convert.quantize_pool, "_quantize_task", die)  # the workers are forked with it
    out = tmp_path / "out"
    args = ["convert", "--model_dir", str(wide), "--output_dir", str(out), "--tp_size", "8", "--moe_ep_size", "8"]
    result = run(*args, "--use_weight_only", "--weight_only_arch", "80", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "a quantize worker process (pid" in lines[0], lines
    assert "was killed by signal 9 (SIGKILL: out of memory?)" in lines[0], lines
    left = {f.name for f in out.iterdir()} if out.exists() else set()
    assert left <= {".moe-convert-journal.json"}, left
    assert multiprocessing.active_children() == []


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(k) for k in task.read_text().split()]
    return kids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(
    not moe_convert.quantize_pool.use_processes() or not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
    reason="worker processes on Linux only; /proc/PID/task/TID/children lists them",
)
def test_quantize_workers_die_with_a_killed_converter(wide: Path, tmp_path: Path) -> None:
    """SIGKILL to the converter (no cleanup runs) still ends its quantize workers: they ask the kernel to
    kill them when it dies."""
    args = ["convert", "--model_dir", str(wide), "--output_dir", str(tmp_path / "out"), "--tp_size", "8"]
    args += ["--moe_ep_size", "8", "--use_weight_only", "--weight_only_arch", "80"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_convert", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while not workers and proc.poll() is None and time.monotonic() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.002)
    assert workers, "the conversion ended before its workers were seen"
    proc.send_signal(signal.SIGSTOP)  # frozen with its workers alive, then killed
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(w) for w in workers), [w for w in workers if not _gone(w)]


def test_where_fork_is_unavailable_threads_quantize_the_same_bytes(
    wide: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay, q = LAYOUTS[1], Quant("int4", 80)
    expected = quantized(tmp_path_factory, wide, lay, q)
    monkeypatch.setattr(moe_convert.quantize_pool, "use_processes", lambda: False)
    got = quantized(tmp_path_factory, wide, lay, q, workers=3)
    assert multiprocessing.active_children() == []
    assert files(got) == files(expected)


def test_save_config_only_writes_the_quantization_block(wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["--use_weight_only", "--weight_only_precision", "int4", "--weight_only_arch", "89"]
    result = run("convert", "--model_dir", str(wide), "--output_dir", str(out), "--save_config_only", *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert json.loads((out / "config.json").read_text())["quantization"]["quant_algo"] == "W4A16"


def test_convert_json_and_progress_say_the_precision(wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["--use_weight_only", "--weight_only_precision", "int4", "--weight_only_arch", "80", "--tp_size", "2"]
    result = run("convert", "--model_dir", str(wide), "--output_dir", str(out), *args, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["weight_only"] == {"precision": "int4", "quant_algo": "W4A16", "arch": 80, "sm90_layout": None}
    assert "weight-only int4 (W4A16) for sm80" in result.stderr  # the `converted ...` line
    assert doc["total_bytes"] == sum(p.stat().st_size for p in out.glob("rank*.safetensors"))


def test_dry_run_sizes_are_the_quantized_sizes(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    lay, q = LAYOUTS[1], Quant("int4", 90, "permuted")
    report = dry_run(wide, **lay.kwargs(), **q.kwargs())
    out = quantized(tmp_path_factory, wide, lay, q)
    doc = report.document()
    assert [r["bytes"] for r in doc["ranks"]] == [(out / r["file"]).stat().st_size for r in doc["ranks"]]
    unquantized = dry_run(wide, **lay.kwargs()).document()["total_bytes"]
    assert doc["total_bytes"] < unquantized / 2  # bf16 weights -> 4 bits, most of the model
    assert doc["memory"]["quantize_bytes"] > 0
    assert "weight-only int4 (W4A16) for sm90, permuted layout" in report.text()


# --- resume and batch ------------------------------------------------------------------------------------------


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_resume_keeps_quantized_files_and_refuses_another_precision(
    wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import moe_convert.execute

    lay, q = LAYOUTS[3], Quant("int8", 90, "column_major")
    clean = quantized(tmp_path_factory, wide, lay, q)
    out = tmp_path / "out"
    real, calls = moe_convert.execute._scatter, 0

    def scatter(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 40:  # past stage 0's tensors (layer 0), before stage 1's are done
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(moe_convert.execute, "_scatter", scatter)
    with pytest.raises(KeyboardInterrupt):
        convert(wide, out, **lay.kwargs(), **q.kwargs())
    assert multiprocessing.active_children() == []  # the quantize workers were stopped
    monkeypatch.setattr(moe_convert.execute, "_scatter", real)
    kept = sorted(p.name for p in out.glob("rank*.safetensors"))
    assert kept == ["rank0.safetensors", "rank1.safetensors"]
    with pytest.raises(UsageError, match="--weight_only_precision was 'int8', now 'int4'"):
        convert(wide, out, resume=True, **lay.kwargs(), **Quant("int4", 90, "column_major").kwargs())
    with pytest.raises(UsageError, match="--weight_only_sm90_layout was 'column_major', now 'permuted'"):
        convert(wide, out, resume=True, **lay.kwargs(), **Quant("int8", 90, "permuted").kwargs())
    result = convert(wide, out, resume=True, **lay.kwargs(), **q.kwargs())
    assert result.kept == ("rank0.safetensors", "rank1.safetensors")
    assert files(out) == files(clean)


def test_batch_of_precisions_reads_once_and_equals_separate_runs(
    wide: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_convert.reading import SourceReader

    reads: dict[tuple[str, Any], int] = {}
    real = SourceReader.read_bits

    def counted(self: SourceReader, info: Any, chunk: Any, into: Any = None) -> Any:
        reads[(info.name, chunk)] = reads.get((info.name, chunk), 0) + 1
        return real(self, info, chunk, into)

    monkeypatch.setattr(SourceReader, "read_bits", counted)
    mappings = [
        "tp=4,moe_tp=2,moe_ep=2,precision=int8",
        "tp=4,moe_tp=2,moe_ep=2,precision=int4",
        "tp=4,moe_tp=2,moe_ep=2",
    ]
    results = convert_batch(
        wide, tmp_path / "b", mappings, dtype="bfloat16", weight_only_arch=90, weight_only_sm90_layout="permuted"
    )
    assert reads and max(reads.values()) == 1  # one read of every chunk for the three outputs
    monkeypatch.setattr(SourceReader, "read_bits", real)
    names = [r.output_dir.name for r in results]
    assert names == ["tp4_pp1_moetp2_moeep2_int8", "tp4_pp1_moetp2_moeep2_int4", "tp4_pp1_moetp2_moeep2"]
    lay = LAYOUTS[1]
    for r, q in zip(results, (Quant("int8", 90, "permuted"), Quant("int4", 90, "permuted")), strict=False):
        alone = quantized(tmp_path_factory, wide, lay, q)
        assert {n: b for n, b in files(r.output_dir).items() if n != "manifest.json"} == {
            n: b for n, b in files(alone).items() if n != "manifest.json"
        }
    plain = converted(tmp_path_factory, wide, lay)
    for rank in range(4):
        name = f"rank{rank}.safetensors"
        assert (results[2].output_dir / name).read_bytes() == (plain / name).read_bytes()


def test_job_file_with_weight_only_options_and_a_mapping_precision(wide: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "model_dir": str(wide),
                "output_dir": str(tmp_path / "out"),
                "dtype": "bfloat16",
                "use_weight_only": True,
                "weight_only_precision": "int4",
                "weight_only_arch": 80,
                "mappings": [{"tp": 2, "subdir": "int4"}, {"tp": 2, "precision": "none", "subdir": "plain"}],
            }
        )
    )
    result = run("convert", "--job_file", str(job), "--json")
    assert result.exit_code == 0, result.output
    jobs = json.loads(result.stdout)["jobs"]
    assert [j["weight_only"] and j["weight_only"]["precision"] for j in jobs] == ["int4", None]
    int4 = json.loads((tmp_path / "out" / "int4" / "config.json").read_text())
    plain = json.loads((tmp_path / "out" / "plain" / "config.json").read_text())
    assert int4["quantization"]["quant_algo"] == "W4A16" and plain["quantization"]["quant_algo"] is None


def test_options_record_the_scheme() -> None:
    """The manifest and journal options carry the weight-only choice (what resume compares), and nothing
    when not quantizing, so unquantized runs keep their identity."""
    from moe_convert.plan import ConvertOptions, convert_options

    assert "weight_only_precision" not in ConvertOptions().as_dict()
    options = convert_options("bfloat16", use_weight_only=True, weight_only_arch=90, weight_only_sm90_layout="permuted")
    assert options.as_dict() == {
        **ConvertOptions("bfloat16").as_dict(),
        "weight_only_precision": "int8",
        "weight_only_arch": 90,
        "weight_only_sm90_layout": "permuted",
    }
    assert ConvertOptions.from_dict(options.as_dict()) == options
    assert (
        convert_options(use_weight_only=True, weight_only_arch=80, weight_only_sm90_layout="permuted").as_dict()[
            "weight_only_sm90_layout"
        ]
        is None
    )  # the same bytes on sm80 whatever it says
