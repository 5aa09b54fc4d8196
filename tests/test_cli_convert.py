"""The convert command: click's CliRunner (both flag spellings, errors) and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from spec_oracle import REPO, Layout, converted

from moe_convert.cli import convert_command, main

RULE = "moe_tp_size * moe_ep_size must equal tp_size"


def rank_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("rank*.safetensors"))}


def test_underscore_and_dash_spellings_give_identical_outputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    under = runner.invoke(
        convert_command,
        [
            "--model_dir",
            str(tiny_checkpoint),
            "--output_dir",
            str(tmp_path / "u"),
            "--tp_size",
            "4",
            "--moe_tp_size",
            "2",
            "--moe_ep_size",
            "2",
            "--dtype",
            "bfloat16",
            "--quiet",
        ],
    )
    assert under.exit_code == 0, under.output
    dash = runner.invoke(
        main,
        [
            "convert",
            "--model-dir",
            str(tiny_checkpoint),
            "--output-dir",
            str(tmp_path / "d"),
            "--tp-size",
            "4",
            "--moe-tp-size",
            "2",
            "--moe-ep-size",
            "2",
            "--dtype",
            "bfloat16",
            "--quiet",
        ],
    )
    assert dash.exit_code == 0, dash.output
    files = rank_bytes(tmp_path / "u")
    assert sorted(files) == [f"rank{r}.safetensors" for r in range(4)]
    assert files == rank_bytes(tmp_path / "d")
    for name in ("config.json", "manifest.json"):
        assert (tmp_path / "u" / name).is_file() and (tmp_path / "d" / name).is_file()
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["mapping"]["moe_tp_size"] == 2 and cfg["mapping"]["moe_ep_size"] == 2


def test_parallel_embedding_flags_reach_the_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        convert_command,
        [
            "--model_dir",
            str(tiny_checkpoint),
            "--output_dir",
            str(tmp_path),
            "--tp-size",
            "2",
            "--use-parallel-embedding",
            "--embedding_sharding_dim",
            "1",
            "--pp_size",
            "3",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["use_parallel_embedding"], cfg["embedding_sharding_dim"]) == (True, 1)
    assert cfg["mapping"] == {
        "world_size": 6, "tp_size": 2, "pp_size": 3, "moe_tp_size": 2, "moe_ep_size": 1, "cp_size": 1,
        "gpus_per_node": 8,
    }  # fmt: skip
    assert len(rank_bytes(tmp_path)) == 6


def test_help_states_the_resolution_rule() -> None:
    # convert_command is what convert_checkpoint.py runs; `moe-convert convert` is the same command.
    for command, args in ((convert_command, ["--help"]), (main, ["convert", "--help"])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert RULE in text
        assert "neither given (or -1) -> moe_tp_size = tp_size, moe_ep_size = 1" in text
        for flag in ("--tp_size", "--tp-size", "--moe_tp_size", "--moe_ep_size", "--pp_size", "--dtype"):
            assert flag in text


def test_mismatched_moe_sizes_exit_2_with_the_numbers_and_write_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        convert_command,
        [
            "--model_dir",
            str(tiny_checkpoint),
            "--output_dir",
            str(out),
            "--tp_size",
            "8",
            "--moe_tp_size",
            "2",
            "--moe_ep_size",
            "2",
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert RULE in result.stderr and "2 * 2 = 4" in result.stderr and "8" in result.stderr
    assert not out.exists()


def test_mapping_that_does_not_fit_the_model_exits_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The tiny model has 4 heads: tp 8 cannot split them."""
    result = CliRunner().invoke(
        convert_command, ["--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--tp_size", "8"]
    )
    assert result.exit_code == 2
    assert "num_attention_heads 4" in result.stderr and "tp_size 8" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_convert_checkpoint_py_as_a_subprocess(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model_dir = make_checkpoint()
    out = tmp_path / "tp4"
    args = ["--model_dir", str(model_dir), "--output_dir", str(out), "--tp_size", "4"]
    args += ["--moe_tp_size", "2", "--moe_ep_size", "2"]
    proc = subprocess.run(
        [sys.executable, "convert_checkpoint.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "manifest.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors",
        "rank3.safetensors",
    ]  # fmt: skip
    # Same bytes as the library call with the same options: the script is only a front end.
    library = converted(tmp_path_factory, model_dir, Layout(tp=4, moe_tp=2, moe_ep=2))
    assert rank_bytes(out) == rank_bytes(library)
    assert (out / "config.json").read_bytes() == (library / "config.json").read_bytes()
