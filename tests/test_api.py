"""The Python API (`from moe_convert import convert, plan, verify`), `--json` documents and exit codes."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import moe_convert
from moe_convert import ConvertResult, Plan, VerifyReport, convert, convert_batch, dry_run, plan, verify
from moe_convert.cli import convert_checkpoint_main, main
from moe_convert.errors import ConfigError


@pytest.mark.parametrize("fn", [convert, convert_batch, plan, dry_run, verify])
def test_public_functions_are_typed_and_documented(fn: Any) -> None:
    sig = inspect.signature(fn)
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
    doc = inspect.getdoc(fn) or ""
    assert "Args:" in doc and doc.splitlines()[0].endswith(".")
    # Everything after the source (and output dir) is keyword-only, so call sites stay readable.
    positional = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional in (["model_dir"], ["model_dir", "output_dir"], ["model_dir", "output_dir", "mappings"]) or (
        fn is verify and positional == ["output_dir", "model_dir"]
    )


def test_plan_convert_verify_round_trip(tiny_checkpoint: Path, tmp_path: Path) -> None:
    the_plan = plan(tiny_checkpoint, tp_size=4, moe_tp_size=2, moe_ep_size=2)
    assert isinstance(the_plan, Plan)
    assert [r.experts for r in the_plan.ranks] == [(0, 1, 2, 3), (4, 5, 6, 7)] * 2
    assert [r.ffn_slice for r in the_plan.ranks] == [(0, 24), (0, 24), (24, 48), (24, 48)]
    result = convert(tiny_checkpoint, tmp_path / "out", tp_size=4, moe_tp_size=2, moe_ep_size=2)
    assert isinstance(result, ConvertResult)
    assert result.plan.ranks == the_plan.ranks
    assert (
        result.bytes_written
        == result.manifest["total_bytes"]
        == dry_run(tiny_checkpoint, tp_size=4, moe_tp_size=2, moe_ep_size=2).document()["total_bytes"]
    )
    assert [r.file for r in result.ranks] == [f"rank{i}.safetensors" for i in range(4)]
    report = verify(result.output_dir, tiny_checkpoint)
    assert isinstance(report, VerifyReport) and report.ok and report.with_source


def test_convert_json_is_one_document_on_stdout(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--tp_size", "2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert doc["ok"] is True and doc["output_dir"] == str(out)
    assert doc["files"] == [
        {"rank": r["rank"], "file": r["file"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in manifest["ranks"]
    ]
    assert doc["total_bytes"] == manifest["total_bytes"] == sum(f["bytes"] for f in doc["files"])
    assert doc["mapping"] == manifest["mapping"] and doc["dtype"] == "float16"
    assert doc["seconds"] >= 0 and doc["manifest"] == str(out / "manifest.json")
    assert {c["name"] for c in doc["checks"]} >= {"mapping", "source", "output_dir", "disk_space", "sha256"}
    assert "wrote " in result.stderr and f"converted {tiny_checkpoint} -> {out}: " in result.stderr  # logs: stderr
    quiet = CliRunner().invoke(main, [*args, "--force", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout)["files"] == doc["files"]


def test_convert_json_with_verify(tiny_checkpoint: Path, tmp_path: Path) -> None:
    args = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path), "--tp_size", "2"]
    result = CliRunner().invoke(main, [*args, "--json", "--verify", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verify"]["ok"] is True and doc["verify"]["with_source"] is True
    assert {"name": "verify", "ok": True} in doc["checks"]


def test_verify_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    convert(tiny_checkpoint, tmp_path, tp_size=2)
    good = CliRunner().invoke(main, ["verify", str(tmp_path), "--json"])
    assert good.exit_code == 0, good.output
    doc = json.loads(good.stdout)
    assert doc["ok"] is True and doc["rank_files"] == 2 and doc["problems"] == []
    rank = tmp_path / "rank1.safetensors"
    data = bytearray(rank.read_bytes())
    data[-1] ^= 0xFF
    rank.write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["verify", str(tmp_path), "--json"])
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and any("rank1.safetensors" in p for p in doc["problems"])
    missing = CliRunner().invoke(main, ["verify", str(tmp_path / "nothing"), "--json"])
    assert missing.exit_code == 1 and json.loads(missing.stdout)["ok"] is False


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (["--model_dir", "/nonexistent/model"], 1, "/nonexistent/model"),
        (["--tp_size", "3"], 2, "num_attention_heads 4 is not divisible by tp_size 3"),
    ],
)
def test_json_errors_are_documents_too(
    tiny_checkpoint: Path, tmp_path: Path, extra: list[str], code: int, fragment: str
) -> None:
    args = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o"), "--json", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == code and fragment in doc["error"]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_exit_codes(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path / "o")]
    assert CliRunner().invoke(main, [*base, "--quiet"]).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--quiet"]).exit_code == 1  # not empty, no --force
    assert CliRunner().invoke(main, [*base, "--moe_ep_size", "3"]).exit_code == 2
    assert CliRunner().invoke(main, [*base, "--tp_size", "x"]).exit_code == 2  # click's own usage error

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("moe_convert.convert"), "convert", interrupted)
    result = CliRunner().invoke(main, [*base, "--force"])
    assert result.exit_code == 130 and result.stderr.startswith("interrupted: ")


def test_debug_shows_the_error_itself(tmp_path: Path) -> None:
    args = ["convert", "--model_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    debug = CliRunner().invoke(main, [*args, "--debug"])
    assert isinstance(debug.exception, ConfigError)


def test_version_everywhere(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    expected = f"moe-convert, version {moe_convert.__version__}\n"
    assert CliRunner().invoke(main, ["--version"]).stdout == expected
    assert CliRunner().invoke(main, ["convert", "--version"]).stdout == expected
    # What `python convert_checkpoint.py --version` runs.
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", "--version"])
    with pytest.raises(SystemExit) as info:
        convert_checkpoint_main()
    assert info.value.code == 0 and capsys.readouterr().out == expected
