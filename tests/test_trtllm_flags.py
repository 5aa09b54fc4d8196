"""A drop-in for TensorRT-LLM's convert_checkpoint.py: every flag of it has a deliberate, tested answer.

TensorRT-LLM's own Mixtral README command lines run unchanged and bit-exact; flags we always honour are
accepted; config-from-flags values must agree with config.json; the rest are refused in one line (exit 2)
before anything is read or written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import MakeCheckpoint
from safetensors.torch import load_file
from spec_oracle import (
    REPO,
    WIDE,
    Layout,
    Sizes,
    assert_matches_source,
    classic_view,
    converted,
    load_raw_source,
    reassemble,
)

from moe_convert import verify
from moe_convert.cli import convert_command

# Every flag of TensorRT-LLM's examples/llama/convert_checkpoint.py from 0.11 to 1.x (the union of its
# versions' argparse definitions).
TRTLLM_FLAGS = [
    "model_dir",
    "meta_ckpt_dir",
    "tp_size",
    "pp_size",
    "moe_tp_size",
    "cp_size",
    "moe_ep_size",
    "dtype",
    "vocab_size",
    "n_positions",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "inter_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "rms_norm_eps",
    "use_weight_only",
    "disable_weight_only_quant_plugin",
    "weight_only_precision",
    "calib_dataset",
    "calib_size",
    "calib_max_seq_length",
    "smoothquant",
    "use_qserve",
    "per_channel",
    "per_token",
    "int8_kv_cache",
    "fp8_kv_cache",
    "quant_ckpt_path",
    "use_fp8",
    "use_nvfp4",
    "use_fp8_rowwise",
    "use_meta_fp8_rowwise_recipe",
    "per_group",
    "load_by_shard",
    "hidden_act",
    "rotary_base",
    "group_size",
    "load_model_on_cpu",
    "use_parallel_embedding",
    "embedding_sharding_dim",
    "use_embedding_sharing",
    "output_dir",
    "workers",
    "moe_num_experts",
    "moe_top_k",
    "moe_renorm_mode",
    "save_config_only",
    "remove_duplicated_kv_heads",
    "log_level",
]

# TensorRT-LLM's Mixtral README (examples/models/core/mixtral/README.md), after `--model_dir M --output_dir O`.
README_LINES = [
    "--dtype float16 --pp_size 2",
    "--dtype float16 --tp_size 2 --moe_tp_size 2",
    "--dtype float16 --tp_size 2 --moe_ep_size 2",
    "--dtype float16 --tp_size 4 --moe_tp_size 2 --moe_ep_size 2",
    "--dtype float16 --tp_size 8 --moe_tp_size 2 --moe_ep_size 4",  # the 8x22B line (8 heads: the wide model)
]
# The same with TensorRT-LLM's "not set" and the flags its users add.
VARIANTS = [
    "--dtype float16 --tp_size 2 --moe_tp_size -1 --moe_ep_size 2",
    "--dtype float16 --tp_size 2 --moe_tp_size -1 --moe_ep_size -1",
    "--dtype float16 --tp_size 4 --moe_tp_size 2 --moe_ep_size 2 --workers 4 --load_by_shard --load_model_on_cpu "
    "--log_level info",
]


def run(*args: str) -> Result:
    return CliRunner().invoke(convert_command, list(args))


def layout_of(args: list[str]) -> Layout:
    """The mapping a command line asks for, with TensorRT-LLM's -1 as not given."""

    def value(flag: str, default: str) -> str:
        return args[args.index(flag) + 1] if flag in args else default

    def moe(flag: str) -> int | None:
        v = int(value(flag, "-1"))
        return None if v == -1 else v

    return Layout(
        tp=int(value("--tp_size", "1")),
        pp=int(value("--pp_size", "1")),
        moe_tp=moe("--moe_tp_size"),
        moe_ep=moe("--moe_ep_size"),
        dtype=value("--dtype", "auto"),
    )


def rank_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("rank*.safetensors"))}


def error_line(result: Result, code: int = 2) -> str:
    """Exit `code`, one `error:` line on stderr, nothing else there, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("line", README_LINES + VARIANTS)
def test_readme_command_lines_run_unchanged_and_bit_exact(
    line: str, make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    args = line.split()
    model_dir = make_checkpoint(**(WIDE if "--tp_size 8" in line else {}))
    out = tmp_path / "tllm_checkpoint_mixtral"
    result = run("--model_dir", str(model_dir), "--output_dir", str(out), *args)
    assert result.exit_code == 0, result.output
    lay = layout_of(args)
    sizes = Sizes.of(model_dir)
    rebuilt = reassemble(out, sizes, lay, torch.float16)
    assert_matches_source(rebuilt, classic_view(load_raw_source(model_dir), sizes), torch.float16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and config["mapping"]["moe_tp_size"] == lay.moe[0]
    assert config["mapping"]["moe_ep_size"] == lay.moe[1]


def test_extra_flags_change_no_byte(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--workers 4 --load_by_shard --load_model_on_cpu --log_level info: the same files as without them."""
    base = ["--model_dir", str(tiny_checkpoint), "--tp_size", "4", "--moe_tp_size", "2", "--moe_ep_size", "2"]
    plain = run(*base, "--output_dir", str(tmp_path / "plain"), "--quiet")
    extra = run(
        *base,
        *("--output_dir", str(tmp_path / "extra"), "--workers", "4", "--load_by_shard", "--load_model_on_cpu"),
        *("--log_level", "info", "--disable_weight_only_quant_plugin", "--cp_size", "1"),
    )
    assert plain.exit_code == 0 and extra.exit_code == 0, extra.output
    assert rank_bytes(tmp_path / "plain") == rank_bytes(tmp_path / "extra")
    for name in ("config.json",):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "extra" / name).read_bytes()


def test_without_output_dir_the_output_lands_in_tllm_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("--model_dir", str(tiny_checkpoint), "--tp_size", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "tllm_checkpoint").iterdir()) == [
        "config.json", "manifest.json", "rank0.safetensors", "rank1.safetensors",
    ]  # fmt: skip


def test_accepted_flags_say_why_in_one_debug_line_each(tiny_checkpoint: Path, tmp_path: Path) -> None:
    flags = ["--load_by_shard", "--load_model_on_cpu", "--disable_weight_only_quant_plugin", "--cp_size", "1"]
    result = run("--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), *flags, "--debug")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    for flag in ("--load_by_shard: ", "--load_model_on_cpu: ", "--disable_weight_only_quant_plugin: ", "--cp_size 1: "):
        assert sum(line.startswith(flag) for line in lines) == 1, flag
    quiet = run("--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "q"), *flags, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize(
    ("level", "converted_line", "debug_line", "progress"),
    [
        ("internal_error", False, False, False),
        ("error", False, False, False),
        ("warning", False, False, False),
        ("info", True, False, True),
        ("verbose", True, True, True),
        ("debug", True, True, True),
        ("trace", True, True, True),
        ("INFO", True, False, True),
    ],
)
def test_log_level_maps_onto_our_levels(
    level: str, converted_line: bool, debug_line: bool, progress: bool, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    args = ["--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--load_by_shard"]
    result = run(*args, "--log_level", level)
    assert result.exit_code == 0, result.output
    assert ("converted " in result.stderr) is converted_line
    assert ("--load_by_shard: " in result.stderr) is debug_line
    assert ("converting: 100% (" in result.stderr) is progress
    assert "Traceback" not in result.stderr


def test_quiet_and_debug_win_over_log_level(tiny_checkpoint: Path, tmp_path: Path) -> None:
    args = ["--model_dir", str(tiny_checkpoint), "--load_by_shard"]
    quiet = run(*args, "--output_dir", str(tmp_path / "q"), "--log_level", "debug", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    debug = run(*args, "--output_dir", str(tmp_path / "d"), "--log_level", "error", "--debug")
    assert debug.exit_code == 0 and "--load_by_shard: " in debug.stderr


# ---------------------------------------------------------------- refused: one line, exit 2, nothing read


REFUSED = [
    (["--smoothquant", "0.5"], "--smoothquant 0.5", "quantize.py"),
    (["-sq", "0.5"], "--smoothquant 0.5", "quantize.py"),
    (["--per_channel"], "--per_channel", "calibration"),
    (["--per_token"], "--per_token", "calibration"),
    (["--int8_kv_cache"], "--int8_kv_cache", "quantize.py"),
    (["--calib_dataset", "ccdv/cnn_dailymail"], "--calib_dataset ccdv/cnn_dailymail", "quantize.py"),
    (["--calib_size", "512"], "--calib_size 512", "calibration"),
    (["--calib_max_seq_length", "512"], "--calib_max_seq_length 512", "calibration"),
    (["--quant_ckpt_path", "gptq.safetensors"], "--quant_ckpt_path gptq.safetensors", "GPTQ/AWQ"),
    (["--per_group"], "--per_group", "GPTQ/AWQ"),
    (["--group_size", "128"], "--group_size 128", "GPTQ/AWQ"),
    (["--use_fp8"], "--use_fp8", "--qformat fp8"),
    (["--use_fp8_rowwise"], "--use_fp8_rowwise", "--qformat fp8"),
    (["--use_meta_fp8_rowwise_recipe"], "--use_meta_fp8_rowwise_recipe", "FP8"),
    (["--fp8_kv_cache"], "--fp8_kv_cache", "--kv_cache_dtype fp8"),
    (["--use_nvfp4"], "--use_nvfp4", "--qformat nvfp4"),
    (["--use_qserve"], "--use_qserve", "QServe"),
    (["--meta_ckpt_dir", "llama/"], "--meta_ckpt_dir llama/", "pickles"),
    (["--remove_duplicated_kv_heads"], "--remove_duplicated_kv_heads", "Llama-3.1-405B"),
    (["--multiple_of", "256"], "--multiple_of 256", "intermediate_size"),
    (["--ffn_dim_multiplier", "1.3"], "--ffn_dim_multiplier 1.3", "intermediate_size"),
    (["--cp_size", "2"], "--cp_size 2", "context parallelism is not supported here"),
    # Weight-only: int8 / int4 are made (tests/test_weight_only_convert.py); a precision alone is not enough.
    (["--weight_only_precision", "int8"], "--weight_only_precision int8", "without --use_weight_only"),
    (["--use_weight_only", "--weight_only_precision", "int4_gptq"], "int4_gptq", "GPTQ/AWQ"),
    (["--use_weight_only", "--weight_only_precision", "int8_gptq"], "int8_gptq", "GPTQ/AWQ"),
    (["--use_weight_only", "--weight_only_precision", "int4_awq"], "int4_awq", "calibration"),
    (["--smoothquant", "0.5", "--per_channel", "--per_token", "--int8_kv_cache"], "--per_token", "quantize.py"),
]


@pytest.mark.parametrize(("flags", "named", "why"), REFUSED, ids=[" ".join(f) for f, _, _ in REFUSED])
def test_refused_flags_are_one_line_before_anything_is_read(
    flags: list[str], named: str, why: str, tmp_path: Path
) -> None:
    """A model dir that does not exist: the refusal comes first, so nothing was read; nothing is written."""
    out = tmp_path / "out"
    result = run("--model_dir", str(tmp_path / "no-such-model"), "--output_dir", str(out), *flags)
    line = error_line(result)
    assert named in line and why in line, line
    assert "does not exist" not in line and "No such option" not in result.output
    assert len(line) <= 400
    assert not out.exists()


def test_several_refused_flags_are_one_line_naming_each(tmp_path: Path) -> None:
    result = run("--model_dir", str(tmp_path), "--smoothquant", "0.5", "--per_token", "--use_fp8", "--quiet")
    line = error_line(result)
    assert "(2 problems): --smoothquant 0.5, --per_token: needs calibration" in line and "--use_fp8: " in line


# ---------------------------------------------------------------- config-from-flags: must agree with config.json


def test_config_flags_that_agree_change_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    rope_theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    agree = [
        *("--vocab_size", "100", "--n_positions", "64", "--n_layer", "3", "--n_head", "4", "--n_kv_head", "2"),
        *("--n_embd", "32", "--inter_size", "48", "--moe_num_experts", "8", "--moe_top_k", "2"),
        *("--rms_norm_eps", str(cfg["rms_norm_eps"]), "--rotary_base", str(rope_theta), "--hidden_act", "silu"),
        *("--moe_renorm_mode", "1", "--moe_normalization_mode", "1"),
    ]
    base = ["--model_dir", str(tiny_checkpoint), "--tp_size", "2", "--quiet"]
    assert run(*base, "--output_dir", str(tmp_path / "plain")).exit_code == 0
    result = run(*base, "--output_dir", str(tmp_path / "flags"), *agree)
    assert result.exit_code == 0, result.output
    assert rank_bytes(tmp_path / "plain") == rank_bytes(tmp_path / "flags")
    # TensorRT-LLM's own "not set" values are not claims about the model.
    zero = run(*base, "--output_dir", str(tmp_path / "zero"), "--moe_num_experts", "0", "--moe_top_k", "0")
    assert zero.exit_code == 0, zero.output


def test_config_flags_that_disagree_name_both_values(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--n_layer", "32")
    line = error_line(result)
    assert "--n_layer 32 disagrees with config.json's num_hidden_layers 3" in line
    assert not out.exists()
    both = run("--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--moe_top_k", "1", "--hidden_act=gelu")
    line = error_line(both)
    assert "(2 problems)" in line and "--moe_top_k 1" in line and "config.json's moe.top_k 2" in line
    assert "--hidden_act gelu" in line and "hidden_act swiglu" in line
    assert not out.exists()


def test_config_flags_without_a_checkpoint_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT-LLM builds a model from these flags when --model_dir is absent; we do not."""
    monkeypatch.chdir(tmp_path)
    line = error_line(run("--n_layer", "32", "--vocab_size", "32000"))
    assert "--vocab_size 32000, --n_layer 32: TensorRT-LLM builds a model from these" in line and "--model_dir" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- --save_config_only


def test_save_config_only_writes_the_config_json_a_conversion_writes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    args = ["--model_dir", str(tiny_checkpoint), "--tp_size", "4", "--moe_ep_size", "2", "--dtype", "bfloat16"]
    result = run(*args, "--output_dir", str(tmp_path / "cfg"), "--save_config_only")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["config.json"]
    assert "config.json (--save_config_only: no rank files, no manifest)" in result.stderr
    assert run(*args, "--output_dir", str(tmp_path / "full"), "--quiet").exit_code == 0
    assert (tmp_path / "cfg" / "config.json").read_bytes() == (tmp_path / "full" / "config.json").read_bytes()
    # A config.json alone is enough (no tensor data is read), and the output dir rules are convert's.
    alone = tmp_path / "config-only"
    alone.mkdir()
    (alone / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    again = run("--model_dir", str(alone), "--output_dir", str(tmp_path / "cfg"), "--save_config_only")
    assert "exists and is not empty; pass --force" in error_line(again, 1)
    forced = run(
        *("--model_dir", str(alone), "--output_dir", str(tmp_path / "cfg"), "--save_config_only", "--force"),
        *("--tp_size", "4", "--moe_ep_size", "2", "--dtype", "bfloat16", "--json"),
    )
    assert forced.exit_code == 0, forced.output
    doc = json.loads(forced.stdout)
    assert doc["ok"] is True and doc["config_only"] is True and doc["mapping"]["moe_ep_size"] == 2
    assert (tmp_path / "cfg" / "config.json").read_bytes() == (tmp_path / "full" / "config.json").read_bytes()


def test_save_config_only_refuses_what_needs_rank_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = ["--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--save_config_only"]
    assert "--verify cannot apply" in error_line(run(*base, "--verify"))
    assert "--mapping / --job_file" in error_line(run(*base, "--mapping", "tp=2"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- --use_embedding_sharing


TIED = {"tie_word_embeddings": True, "vocab_size": 97}


@pytest.mark.parametrize(
    ("model", "args"),
    [
        (TIED, ["--tp_size", "1"]),
        (TIED, ["--tp_size", "2", "--use_parallel_embedding"]),
        (TIED, ["--tp_size", "4", "--moe_ep_size", "4", "--use_parallel_embedding", "--embedding_sharding_dim", "0"]),
        ({**TIED, "family": "qwen3_moe"}, ["--tp_size", "2", "--use_parallel_embedding"]),
    ],
    ids=["tp1", "tp2-pemb0", "tp4-ep4-pemb0", "qwen3-tp2-pemb0"],
)
def test_embedding_sharing_leaves_lm_head_out_where_it_is_the_embedding(
    model: dict[str, Any], args: list[str], make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    tied = make_checkpoint(**model)
    base = ["--model_dir", str(tied), *args, "--quiet"]
    assert run(*base, "--output_dir", str(tmp_path / "plain")).exit_code == 0
    result = run(*base, "--output_dir", str(tmp_path / "shared"), "--use_embedding_sharing")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert config["share_embedding_table"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["share_embedding_table"] is False
    for f in sorted((tmp_path / "plain").glob("rank*.safetensors")):
        plain, shared = load_file(f), load_file(tmp_path / "shared" / f.name)
        # lm_head (vocab padded to a multiple of tp) was exactly this rank's embedding; nothing else changed.
        assert torch.equal(plain.pop("lm_head.weight"), shared["transformer.vocab_embedding.weight"])
        assert plain.keys() == shared.keys() and all(torch.equal(plain[k], shared[k]) for k in plain)
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert manifest["options"]["use_embedding_sharing"] is True
    assert all("lm_head.weight" not in r["tensors"] for r in manifest["ranks"])
    report = verify(tmp_path / "shared", tied)
    assert report.ok, report.problems


@pytest.mark.parametrize(
    ("model", "args", "why"),
    [
        ({"tie_word_embeddings": True}, ["--tp_size", "2"], "split differently"),
        ({"tie_word_embeddings": True}, ["--tp_size", "2", "--use_parallel_embedding", "--embedding_sharding_dim",
         "1"], "split differently"),
        ({"tie_word_embeddings": True}, ["--pp_size", "2"], "different pipeline stages"),
        ({}, ["--tp_size", "1"], "has its own lm_head.weight (not tied)"),
    ],
    ids=["tp2-replicated", "tp2-pemb1", "pp2", "untied"],
)  # fmt: skip
def test_embedding_sharing_that_does_not_apply_is_one_warning(
    model: dict[str, Any], args: list[str], why: str, make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    src = make_checkpoint(**model)
    base = ["--model_dir", str(src), *args, "--quiet"]
    assert run(*base, "--output_dir", str(tmp_path / "plain")).exit_code == 0
    result = run(*base, "--output_dir", str(tmp_path / "asked"), "--use_embedding_sharing")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("--use_embedding_sharing does not apply: "), lines
    assert why in lines[0] and lines[0].endswith("; lm_head is written")
    assert rank_bytes(tmp_path / "plain") == rank_bytes(tmp_path / "asked")
    assert json.loads((tmp_path / "asked" / "config.json").read_text())["share_embedding_table"] is False


# ---------------------------------------------------------------- every flag is answered, and documented


def _option_names() -> set[str]:
    return {o.lstrip("-") for p in convert_command.params for o in (*p.opts, *p.secondary_opts)}


def test_every_trtllm_flag_has_an_answer() -> None:
    missing = [f for f in TRTLLM_FLAGS if f not in _option_names()]
    assert not missing, f"TensorRT-LLM flags that would be 'No such option': {missing}"
    assert "sq" in _option_names()  # --smoothquant's short form -sq


def test_every_trtllm_flag_is_in_the_docs_table() -> None:
    doc = (REPO / "docs" / "trtllm-flags.md").read_text()
    rows = set(re.findall(r"^\| `--(\w+)", doc, flags=re.M))
    assert set(TRTLLM_FLAGS) <= rows, sorted(set(TRTLLM_FLAGS) - rows)


def test_the_library_takes_minus_one_as_not_set(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from moe_convert import convert

    out = tmp_path_factory.mktemp("minus1") / "out"
    result = convert(tiny_checkpoint, out, tp_size=2, moe_tp_size=-1, moe_ep_size=2)
    assert result.plan.mapping.moe_tp_size == 1 and result.plan.mapping.moe_ep_size == 2
    assert rank_bytes(out) == rank_bytes(converted(tmp_path_factory, tiny_checkpoint, Layout(tp=2, moe_ep=2)))
