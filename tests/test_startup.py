"""A conversion's start: nothing heavy before the first rank file, and nothing heavy at all where not needed.

config.json's settings are read from the JSON where it states them plainly (model_config.py), and every
cast is numpy's (casts.py): a conversion imports neither transformers nor torch, unless transformers must
decide a setting (read synchronously, before anything is written) or weights are quantized (torch). These
tests prove it in a fresh interpreter, and that a config transformers rejects still fails in one line,
leaving nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from test_errors import no_final_outputs
from test_weight_only_convert import WIDE_MIXTRAL

from moe_convert.cli import main

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI in a fresh interpreter and reports, as JSON on the last stdout line, which of torch and
# transformers were imported when the first rank file writer was created and at the end.
PROBE = r"""
import json, sys
HEAVY = ("torch", "transformers")
report = {}
import moe_convert.writer as writer
real_init = writer.RankFileWriter.__init__
def init(self, *args, **kwargs):
    report.setdefault("at_first_writer", sorted(m for m in HEAVY if m in sys.modules))
    real_init(self, *args, **kwargs)
writer.RankFileWriter.__init__ = init
from moe_convert.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    report["exit"] = e.code
report["at_exit"] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps(report))
"""


def probe_convert(model: Path, out: Path, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    cmd = [sys.executable, "-c", PROBE, "convert", "--model_dir", str(model), "--output_dir", str(out), *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.splitlines()[-1]), done


def convert_in_process(model: Path, out: Path, *args: str) -> None:
    result = CliRunner().invoke(main, ["convert", "--model_dir", str(model), "--output_dir", str(out), *args])
    assert result.exit_code == 0, result.output


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def edited_copy(model: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / "model"
    subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
    cfg = json.loads((copy / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


# ---------------------------------------------------------------- in a fresh process


@pytest.mark.parametrize(
    ("model_args", "args"),
    [
        ({"dtype": "bfloat16"}, ()),  # byte ranges, numpy gathers, the router widened by a bit shift
        ({}, ()),  # the tiny example's default: float32 -> float16
        ({}, ("--dtype", "bfloat16")),
        ({"dtype": "bfloat16"}, ("--dtype", "float16")),
        ({"dtype": "float16", "transformers4_config": True}, ("--dtype", "float32")),
    ],
    ids=["bf16", "default_cast_f32_to_f16", "f32_to_bf16", "bf16_to_f16", "f16_to_f32_t4_keys"],
)
def test_conversion_imports_neither_torch_nor_transformers(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, model_args: dict[str, Any], args: tuple[str, ...]
) -> None:
    """Settings from the JSON, casts by numpy: neither module at any point; the same files as in-process."""
    model = make_checkpoint(**model_args)
    report, done = probe_convert(model, tmp_path / "out", "--tp_size", "2", "--quiet", *args)
    assert report["exit"] == 0, done.stderr
    assert report["at_first_writer"] == [] and report["at_exit"] == []
    assert done.stderr == ""
    convert_in_process(model, tmp_path / "in-process", "--tp_size", "2", "--quiet", *args)
    same_files(tmp_path / "out", tmp_path / "in-process")


def test_weight_only_conversion_imports_neither_torch_nor_transformers(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """The quantizer is numpy too (torch's import took 3-4 s on the 16-core host): with --weight_only_arch
    given, neither module at any point (the quantize workers are forks of the converter and import nothing)."""
    model = make_checkpoint(**WIDE_MIXTRAL, dtype="bfloat16")
    args = ("--tp_size", "2", "--quiet", "--use_weight_only", "--weight_only_precision", "int8")
    report, done = probe_convert(model, tmp_path / "out", *args, "--weight_only_arch", "80")
    assert report["exit"] == 0, done.stderr
    assert report["at_first_writer"] == [] and report["at_exit"] == []
    assert done.stderr == ""


def test_settings_transformers_decides_are_read_before_writing(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """A setting left to its default (rms_norm_eps missing): transformers reads the config before the first
    rank file is created, and config.json gets its class's default."""
    model = edited_copy(make_checkpoint(dtype="bfloat16"), tmp_path, rms_norm_eps=...)
    report, done = probe_convert(model, tmp_path / "out", "--tp_size", "2", "--quiet")
    assert report["exit"] == 0, done.stderr
    assert "transformers" in report["at_first_writer"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["norm_epsilon"] == 1e-5  # MixtralConfig's


def test_config_transformers_rejects_fails_in_one_line_leaving_nothing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """Left to transformers (max_position_embeddings missing) and rejected by it: one line, exit 1, before any
    rank file writer exists; no file, and the output dir this run would have created is not there."""
    model = edited_copy(make_checkpoint(dtype="bfloat16"), tmp_path, max_position_embeddings=..., hidden_act=5)
    out = tmp_path / "deep" / "out"
    report, done = probe_convert(model, out, "--tp_size", "2")
    assert report["exit"] == 1 and "at_first_writer" not in report
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "transformers rejects this config" in lines[0]
    assert "hidden_act" in lines[0] and str(model / "config.json") in lines[0]
    assert no_final_outputs(out) and not out.exists() and not out.parent.exists()
