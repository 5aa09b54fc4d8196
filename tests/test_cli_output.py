"""What a CI log and a first-time user see: progress lines, short messages, one JSON document for every
failure, job files checked like the command line, one unit system, and a fast start."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import MakeCheckpoint
from spec_oracle import REPO

from moe_convert import errors, progress
from moe_convert.cli import main, problem_lines
from moe_convert.units import count, human_bytes, human_seconds

PERCENT = re.compile(r"^(converting|verifying): (\d+)% \(([\d.]+ [KMGT]?B) of ([\d.]+ [KMGT]?B)\)")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def percents(stderr: str, what: str = "converting") -> list[int]:
    return [int(m.group(2)) for line in stderr.splitlines() if (m := PERCENT.match(line)) and m.group(1) == what]


# ---------------------------------------------------------------- progress for logs


def test_a_real_non_terminal_conversion_shows_progress_lines(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real process with stderr a pipe (as in CI): a start line, then at least 5 lines with a percentage
    (one per 10% of the bytes), rate and ETA, all before the summary."""
    args = ["--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--tp_size", "2"]
    proc = subprocess.run(
        [sys.executable, "convert_checkpoint.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("converting: 2 rank files, ") and "(tp2 pp1 moe_tp2 moe_ep1, float16)" in lines[0]
    seen = percents(proc.stderr)
    assert len(seen) >= 5 and seen == sorted(seen) and seen[-1] == 100
    assert any(re.search(r"\d+% \(.+\), [\d.]+ [KMG]?B/s, ETA ", line) for line in lines)
    summary = next(i for i, line in enumerate(lines) if line.startswith("converted "))
    assert all(i < summary for i, line in enumerate(lines) if PERCENT.match(line))


def test_verify_shows_progress_lines_and_quiet_silences_both(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    converted = invoke("convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--verify")
    assert converted.exit_code == 0, converted.output
    assert len(percents(converted.stderr)) >= 5 and len(percents(converted.stderr, "verifying")) >= 5
    verified = invoke("verify", str(out), "--model_dir", str(tiny_checkpoint))
    assert verified.exit_code == 0 and verified.stderr.startswith("verifying: 1 rank file, ")
    assert len(percents(verified.stderr, "verifying")) >= 5
    quiet = invoke("verify", str(out), "--model_dir", str(tiny_checkpoint), "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    again = invoke("convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--force", "--quiet")
    assert again.exit_code == 0 and again.stderr == ""


def test_json_keeps_progress_on_stderr(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True and len(percents(result.stderr)) >= 5


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_even_between_steps() -> None:
    """1 GB at 1 MB a minute: no 10% step for a long time, yet a line at least every 30 s."""
    out, clock = io.StringIO(), FakeClock()
    bar = progress.LogProgress("converting", 10**9, out, headline="8 rank files", clock=clock, ticker=False)
    for _ in range(4):
        clock.now += 31
        bar.update(10**6)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "converting: 8 rank files"
    assert lines[1:] == [
        "converting: 0% (1.00 MB of 1.00 GB), 32.26 KB/s, ETA 8 h 36 min",
        "converting: 0% (2.00 MB of 1.00 GB), 32.26 KB/s, ETA 8 h 35 min",
        "converting: 0% (3.00 MB of 1.00 GB), 32.26 KB/s, ETA 8 h 35 min",
        "converting: 0% (4.00 MB of 1.00 GB), 32.26 KB/s, ETA 8 h 34 min",
    ]


def test_a_line_every_step_of_the_bytes() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = progress.LogProgress("converting", 1000, out, clock=clock, ticker=False)
    for _ in range(100):
        clock.now += 0.01
        bar.update(10)
    assert percents(out.getvalue()) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert out.getvalue().splitlines()[-1] == "converting: 100% (1.00 KB of 1.00 KB), 1.00 KB/s"


def test_a_stall_still_prints_a_line_every_interval() -> None:
    """Nothing updates (a long fsync, a slow disk): the ticker still says the run is alive."""
    out = io.StringIO()
    bar = progress.LogProgress("verifying", 100, out, interval=0.05)
    bar.update(1)
    time.sleep(0.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("verifying: 1% (1 B of 100 B)") for line in lines[1:])


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress.start("converting", 10**9, enabled=True, stream=Terminal())
    assert type(bar).__name__ == "tqdm" and bar.unit_divisor == 1000  # type: ignore[attr-defined]
    bar.close()
    assert isinstance(progress.start("converting", 10**9, enabled=False), progress.NoProgress)
    assert isinstance(progress.start("converting", 10**9, enabled=True, stream=io.StringIO()), progress.LogProgress)


# ---------------------------------------------------------------- message budgets


def test_verify_against_the_wrong_source_fits_in_25_lines(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "o"
    converted = invoke("convert", "--model_dir", str(make_checkpoint()), "--output_dir", str(out), "--tp_size", "2")
    assert converted.exit_code == 0
    other = make_checkpoint(seed=1)
    result = invoke("verify", str(out), "--model_dir", str(other))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) <= 25, result.stderr
    assert all(len(line) <= 400 for line in lines)
    problems = [line for line in lines if line.startswith("problem: ")]
    assert 1 < len(problems) <= 20 and any("more like it)" in line for line in problems)
    total = int(re.search(r": (\d+) problems found", lines[-1]).group(1))  # type: ignore[union-attr]
    assert total > 100
    # --json lists every one of them.
    doc = json.loads(invoke("verify", str(out), "--model_dir", str(other), "--json").stdout)
    assert len(doc["problems"]) == total and doc["ok"] is False and doc["exit_code"] == 1


def test_verify_against_another_model_says_so_in_one_problem_and_reads_no_source_byte(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """A source of other shapes (here one more layer) cannot be compared byte by byte: one problem names it,
    the output is still checked on its own, and no source tensor is read."""
    out = tmp_path / "o"
    assert (
        invoke("convert", "--model_dir", str(make_checkpoint()), "--output_dir", str(out), "--tp_size", "2").exit_code
        == 0
    )
    other = make_checkpoint(num_hidden_layers=4)
    result = invoke("verify", str(out), "--model_dir", str(other), "--json")
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 1 and doc["source_bytes_read"] == 0, doc
    problems = doc["problems"]
    assert len(problems) == 2, problems  # the files differ, and so does the model
    assert "is not the model this output was converted from" in problems[1]
    assert "its bytes were not compared" in problems[1] and "without --model_dir" in problems[1]
    lines = invoke("verify", str(out), "--model_dir", str(other)).stderr.splitlines()
    assert len(lines) <= 25 and all(len(line) <= 400 for line in lines), lines
    # The output itself is good: without the source it verifies.
    assert invoke("verify", str(out)).exit_code == 0


def test_problem_lines_are_grouped_and_bounded() -> None:
    problems = [f"rank{r}.safetensors: tensor 'layers.{i}.fc': bytes differ" for r in range(8) for i in range(32)]
    problems += [f"check {name}: something else" for name in "abcdefghijklmnopqrstuvwxyzABCD"]
    lines = problem_lines(problems)
    assert len(lines) == 20
    assert lines[0] == "problem: rank0.safetensors: tensor 'layers.0.fc': bytes differ (and 255 more like it)"
    assert lines[-1] == "... and 12 more problems of 12 other kinds (--json lists all)"


def test_a_config_that_disagrees_with_48_tensors_is_one_short_line(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """2 layers x 8 experts x 3 weights disagree with an edited intermediate_size."""
    model = tmp_path / "m"
    source = make_checkpoint(num_hidden_layers=2)
    model.mkdir()
    for f in source.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    result = invoke("convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o"))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 400, lines
    assert lines[0].startswith("error: 48 tensors disagree with config.json: model.layers.0.")
    assert "is [48, 32], config.json implies [64, 32]" in lines[0]
    assert re.search(r"; and 4\d more \(--json lists all\)$", lines[0])
    doc = json.loads(invoke("convert", "--model_dir", str(model), "--output_dir", str(tmp_path / "o"), "--json").stdout)
    assert doc["error"].count(", config.json implies [") == 48  # --json: everything


def test_shorten_keeps_whole_items_and_counts_the_rest() -> None:
    names = ", ".join(f"model.layers.{i}.mlp.experts.{i % 8}.w1.weight" for i in range(40))
    text = f"40 expected tensors are missing: {names}"
    short = errors.shorten(text, 200)
    assert len(short) <= 200 and short.endswith(", and 37 more") and short.count(".w1.weight") == 3
    assert errors.shorten("short", 200) == "short"
    assert errors.shorten("x; y", 3) == "..."  # two clauses are not a list: cut by characters
    problems = [f"problem number {i} with a long explanation of what went wrong" for i in range(20)]
    e = errors.MappingError(f"bad ({len(problems)} problems): " + "; ".join(problems), problems, summary="bad")
    assert e.brief().startswith("bad (20 problems): problem number 0") and e.brief().endswith("; and 16 more problems")
    assert len(e.brief()) <= errors.MESSAGE_BUDGET


@pytest.mark.parametrize(
    "cls",
    [
        errors.MoeConvertError,
        errors.UsageError,
        errors.MappingError,
        errors.ConfigError,
        errors.CheckpointError,
        errors.OutputError,
        errors.VerifyError,
    ],
)
def test_every_error_class_fills_problems(cls: type[errors.MoeConvertError]) -> None:
    assert cls("what went wrong").problems == ["what went wrong"]
    assert cls("two things", ["a", "b"]).problems == ["a", "b"]


# ---------------------------------------------------------------- --json answers every failure


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["convert", "--bogus"], 2, "No such option '--bogus'"),
        (["convert", "--dtype", "bf16"], 2, "'bf16' is not one of"),
        (["plan", "--tp_size", "x"], 2, "'x' is not a valid integer"),
        (["verify"], 2, "Missing argument 'OUTPUT_DIR'"),
        (["nosuch"], 2, "No such command 'nosuch'"),
        (["convert", "--model_dir", "{model}", "--tp_size", "4", "--moe_tp_size", "3", "--moe_ep_size", "2"], 2,
         "moe_tp_size * moe_ep_size must equal tp_size"),
        (["convert", "--model_dir", "{model}", "--tp_size", "8"], 2, "num_attention_heads 4 is not divisible"),
        (["convert", "--model_dir", "{tmp}/nope"], 1, "does not exist"),
        (["convert", "--model_dir", "{model}", "--use_fp8"], 2, "--use_fp8"),
        (["plan", "--model_dir", "{model}", "--tp_size", "8"], 2, "num_attention_heads 4 is not divisible"),
        (["verify", "{tmp}"], 1, "manifest.json: not found"),
    ],
)  # fmt: skip
def test_json_answers_every_failure_with_one_document(
    args: list[str], code: int, fragment: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    args = [a.format(model=tiny_checkpoint, tmp=tmp_path) for a in args]
    result = invoke(*args, "--json")
    assert result.exit_code == code, result.output
    doc = json.loads(result.stdout)  # exactly one document, nothing else on stdout
    assert doc["ok"] is False and doc["exit_code"] == code
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["problems"], list) and doc["problems"] and all(isinstance(p, str) for p in doc["problems"])
    assert fragment in doc["error"] + " ".join(doc["problems"])


def test_json_in_a_subprocess_for_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moe_convert", "convert", "--dtype", "bf16", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and json.loads(proc.stdout)["exit_code"] == 2
    assert "Error: Invalid value for '--dtype'" in proc.stderr  # click's own message stays on stderr


# ---------------------------------------------------------------- job files: the command line's checks, all at once


def test_job_file_options_are_checked_like_the_command_line_all_together(tiny_checkpoint: Path, tmp_path: Path) -> None:
    job = {
        "model_dir": str(tiny_checkpoint),
        "output_dir": str(tmp_path / "out"),
        "workers": 0,
        "dtype": "bf16",
        "embedding_sharding_dim": 3,
        "mappings": [{"tp": 8}, {"tp": 2}, "tp=two"],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = invoke("convert", "--job_file", str(path), "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    text = "\n".join(problems)
    assert "workers: 0 is not in the range x>=1" in text
    assert "dtype: 'bf16' is not one of 'auto', 'float16', 'bfloat16', 'float32'" in text
    assert "embedding_sharding_dim: 3 is not in the range 0<=x<=1" in text
    assert "mappings[2] 'tp=two': tp='two' is not a whole number" in text
    assert "tp=8: num_attention_heads 4 is not divisible by tp_size 8" in text  # the model's checks too
    assert len(problems) == 5
    line = invoke("convert", "--job_file", str(path)).stderr.splitlines()
    assert len(line) == 1 and line[0].startswith(f"error: --job_file {path} is invalid (5 problems): ")
    assert not (tmp_path / "out").exists()
    path.write_text(yaml.safe_dump({**job, "workers": -3, "dtype": "float16", "embedding_sharding_dim": 0,
                                    "mappings": [{"tp": 2}]}))  # fmt: skip
    only = invoke("convert", "--job_file", str(path))
    assert only.exit_code == 1 and "workers: -3 is not in the range x>=1" in only.stderr


def test_every_bad_mapping_is_reported_together(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("plan", "--model_dir", str(tiny_checkpoint), "--mapping", "tp8", "--mapping", "tp=2,ep=2")
    assert result.exit_code == 2
    assert "'tp8' is not KEY=VALUE" in result.stderr and "unknown key 'ep'" in result.stderr


# ---------------------------------------------------------------- one unit system, one line shape


def test_units() -> None:
    assert human_bytes(0) == "0 B" and human_bytes(258) == "258 B" and human_bytes(258_424) == "258.42 KB"
    assert human_bytes(4_210_000_000) == "4.21 GB" and human_bytes(281 * 10**12) == "281.00 TB"
    assert count(1, "rank file") == "1 rank file" and count(8, "rank file") == "8 rank files"
    assert count(0, "problem") == "0 problems"
    assert human_seconds(0.42) == "0.4 s" and human_seconds(42) == "42 s" and human_seconds(185) == "3 min 05 s"
    assert human_seconds(7620) == "2 h 07 min"


def test_summary_lines_have_one_shape_single_batch_and_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shape = re.compile(
        r"^converted (\S+) -> (\S+): (1 rank file|\d+ rank files), [\d.]+ (B|KB|MB|GB), \w+, "
        r"tp\d+ pp\d+ moe_tp\d+ moe_ep\d+, [\d.]+ s$"
    )
    base = ["convert", "--model_dir", str(tiny_checkpoint)]
    single = invoke(*base, "--output_dir", str(tmp_path / "one"))
    as_json = invoke(*base, "--output_dir", str(tmp_path / "json"), "--json")
    batch = invoke(*base, "--output_dir", str(tmp_path / "batch"), "--mapping", "tp=2", "--mapping", "tp=1,pp=3")
    for result in (single, as_json, batch):
        assert result.exit_code == 0, result.output
    lines = [line for r in (single, as_json, batch) for line in r.stderr.splitlines() if line.startswith("converted")]
    assert len(lines) == 4 and all(shape.match(line) for line in lines), lines
    assert "1 rank file," in lines[0] and " 0.00 GB" not in "".join(lines)
    last = batch.stderr.splitlines()[-1]
    assert re.match(r"^batch: 2 mappings, 5 rank files, [\d.]+ KB in one pass over the source, [\d.]+ s$", last)
    # Each mapping's own time (until its last file was written), not the whole batch's.
    doc = json.loads(invoke(*base, "--output_dir", str(tmp_path / "b2"), "--mapping", "tp=2", "--mapping",
                            "tp=1,pp=3", "--json").stdout)  # fmt: skip
    assert max(j["seconds"] for j in doc["jobs"]) <= doc["seconds"]


def test_disk_messages_use_the_same_units(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 83886080, 83886080))  # type: ignore[attr-defined]
    args = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o")]
    assert invoke(*args).exit_code == 0  # 258 KB fit in 83.89 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))  # type: ignore[attr-defined]
    line = invoke(*args[:-1], str(tmp_path / "p")).stderr.splitlines()[-1]
    assert re.search(r"needs [\d.]+ KB but only 1.00 KB is free", line), line


# ---------------------------------------------------------------- a fast start


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["convert", "--help"], ["convert", "--bogus"], ["convert", "--dtype", "bf16", "--json"],
     ["verify", "--help"], ["plan", "--tp_size", "x"]],
)  # fmt: skip
def test_help_version_and_usage_errors_import_no_torch(argv: list[str]) -> None:
    """What makes them answer at once (measured: docs): neither torch nor transformers is imported."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['moe-convert', *{argv!r}]\n"
        "try:\n    runpy.run_module('moe_convert', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'huggingface_hub') if m in sys.modules),"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stderr.splitlines()[-1] == "[]", proc.stderr


def test_the_package_still_exports_its_functions() -> None:
    import importlib

    import moe_convert

    importlib.import_module("moe_convert.convert")
    importlib.import_module("moe_convert.verify")
    importlib.import_module("moe_convert.plan")
    assert callable(moe_convert.convert) and moe_convert.convert.__module__ == "moe_convert.convert"
    assert callable(moe_convert.verify) and callable(moe_convert.plan)
    assert moe_convert.plan.__module__ == "moe_convert.convert"
    assert set(moe_convert.__all__) <= set(dir(moe_convert))
    with pytest.raises(AttributeError):
        moe_convert.no_such_name  # noqa: B018
    _: Any = None
