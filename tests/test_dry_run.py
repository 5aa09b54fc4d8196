"""Dry run (`plan`, `convert --dry_run`): tables, sizes, checks; no tensor data read, nothing written."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe_convert import convert, dry_run, plan, writer
from moe_convert.cli import convert_command, main
from moe_convert.dryrun import BASE_MEMORY_BYTES, id_ranges
from moe_convert.errors import MappingError
from moe_convert.units import human_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIG_8X22B = REPO / "configs" / "mixtral-8x22b-v0.1.config.json"


@pytest.fixture(scope="module")
def plan_8x22b() -> dict[str, Any]:
    """`moe-convert plan --json` on the published 8x22B config.json alone, at tp8/moe_ep8 (one run)."""
    result = CliRunner().invoke(
        main,
        ["plan", "--model_dir", str(CONFIG_8X22B), "--tp_size", "8", "--moe_ep_size", "8", "--json", "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_8x22b_sizes_match_the_parameter_count(plan_8x22b: dict[str, Any]) -> None:
    doc = plan_8x22b
    V, H, E, L, tp = 32000, 6144, 8, 56, 8  # the config's sizes
    # 141 B parameters, 281 GB in bf16 (the model card's figures).
    assert doc["parameters"] == pytest.approx(141e9, rel=0.01)
    assert doc["source_bytes"] == 2 * doc["parameters"] == pytest.approx(281e9, rel=0.01)
    assert doc["source_dtypes"] == ["BF16"] and doc["dtype"] == "bfloat16"
    # Every source byte lands once; routers become float32 (2 more bytes per element).
    assert doc["distinct_bytes"] == doc["source_bytes"] + L * E * H * 2
    # The rest is what tp8 replicates: the embedding, the norms and the routers on every rank.
    assert doc["data_bytes"] - doc["distinct_bytes"] == (tp - 1) * (V * H * 2 + L * (2 * H * 2 + E * H * 4) + H * 2)
    assert doc["total_bytes"] == sum(r["bytes"] for r in doc["ranks"])
    assert doc["total_bytes"] == pytest.approx(284.09e9, rel=1e-3)  # 281 GB + 2.8 GB replicated + headers
    assert doc["config_only"] is True and doc["source"]["files"] == []


def test_8x22b_rank_table_fields(plan_8x22b: dict[str, Any]) -> None:
    doc = plan_8x22b
    assert doc["ok"] is True and doc["dry_run"] is True
    assert doc["mapping"] == {"world_size": 8, "tp_size": 8, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 8}
    assert [r["rank"] for r in doc["ranks"]] == list(range(8))
    for r in doc["ranks"]:
        assert r["file"] == f"rank{r['rank']}.safetensors"
        assert r["experts"] == [r["rank"]] and r["layers"] == list(range(56))
        assert r["ffn_slice"] == [0, 16384] and r["sha256"] is None
        assert r["bytes"] == doc["ranks"][0]["bytes"]
    assert all(c["ok"] for c in doc["checks"])
    assert {c["name"] for c in doc["checks"]} == {"mapping", "source", "options"}
    assert doc["disk"]["needed_bytes"] > doc["total_bytes"] and doc["disk"]["free_bytes"] is None
    mem = doc["memory"]
    chunk = 64 * 2**20
    # Two read buffers, a 4 MiB cast block per write thread, DEPTH staging buffers per rank file (1 x 1 MiB
    # on small hosts, 2 x 8 MiB from 8 cores).
    staging = 8 * writer.DEPTH * writer.staging_buffer_bytes(8)
    assert staging in (8 * 2**20, 8 * 2 * 8 * 2**20)
    assert mem["workers"] == 2 and mem["staging_bytes"] == staging and mem["cast_block_bytes"] == 4 * 2**20
    assert mem["bound_bytes"] == BASE_MEMORY_BYTES + 2 * chunk + 2 * 4 * 2**20 + staging


def test_dry_run_document_is_the_manifest_of_the_real_conversion(tiny_checkpoint: Path, tmp_path: Path) -> None:
    report = dry_run(tiny_checkpoint, tp_size=4, moe_tp_size=2, moe_ep_size=2, dtype="bfloat16")
    result = convert(tiny_checkpoint, tmp_path / "out", tp_size=4, moe_tp_size=2, moe_ep_size=2, dtype="bfloat16")
    doc, manifest = report.document(), result.manifest
    for r in manifest["ranks"]:
        assert r.pop("sha256") is not None
    assert [{k: v for k, v in r.items() if k != "sha256"} for r in doc["ranks"]] == manifest["ranks"]
    for key in ("format", "version", "total_bytes", "mapping", "dtype", "experts", "expert_layout", "options"):
        assert doc[key] == manifest[key], key
    assert doc["total_bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("rank*.safetensors"))


def test_config_only_plans_like_the_real_headers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A directory holding only config.json, and the config.json file itself, plan the same bytes."""
    only = tmp_path / "only-config"
    only.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", only / "config.json")
    real = plan(tiny_checkpoint, tp_size=2, pp_size=3)
    for source in (only, only / "config.json"):
        implied = plan(source, tp_size=2, pp_size=3)
        assert implied.ranks == real.ranks
        assert implied.dtype == real.dtype == "float16"
    assert dry_run(only, tp_size=2).source.config_only
    assert not dry_run(tiny_checkpoint, tp_size=2).source.config_only


def test_config_without_dtype_needs_dtype(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["plan", "--model_dir", str(path)])
    assert result.exit_code == 2 and "names no dtype" in result.output and "pass --dtype" in result.output
    ok = CliRunner().invoke(main, ["plan", "--model_dir", str(path), "--dtype", "bfloat16", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["source_dtypes"] == ["BF16"]


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every path to tensor data or to an output file fail loudly."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dry run must not read tensor data or write files")

    # `moe_convert.convert` is the function (the package exports it); the module is in sys.modules.
    convert_module = importlib.import_module("moe_convert.convert")
    import moe_convert.execute as execute_module
    import moe_convert.reading as reading_module
    import moe_convert.writer as writer_module

    monkeypatch.setattr(reading_module.SourceReader, "__init__", boom)
    monkeypatch.setattr(reading_module.SourceReader, "read_bits", boom)
    monkeypatch.setattr(reading_module.os, "preadv", boom)
    monkeypatch.setattr(execute_module, "execute_plans", boom)
    monkeypatch.setattr(convert_module, "execute_plans", boom)
    monkeypatch.setattr(convert_module, "OutputDirs", boom)
    monkeypatch.setattr(writer_module.RankFileWriter, "__init__", boom)
    monkeypatch.setattr(writer_module, "write_json_atomic", boom)
    monkeypatch.setattr(convert_module, "write_json_atomic", boom)


def test_dry_run_reads_no_tensor_data_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid(monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()}
    out = tmp_path / "out"
    args = ["--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--tp_size", "2", "--moe_ep_size", "2"]
    via_convert = CliRunner().invoke(convert_command, [*args, "--dry_run"])
    via_plan = CliRunner().invoke(main, ["plan", *args])
    assert via_convert.exit_code == 0, via_convert.output
    assert via_plan.exit_code == 0, via_plan.output
    # The same report, but for the free space, which other processes may change between the two runs.
    free = re.compile(r"[\d.]+ [KMGT]?B free")
    assert free.sub("", via_convert.stdout) == free.sub("", via_plan.stdout)
    assert not out.exists()
    assert {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()} == before
    text = via_plan.stdout
    assert "rank  tp  pp  moe_tp  moe_ep  layers  experts  ffn slice  tensors" in text
    needed = dry_run(tiny_checkpoint, tp_size=2, moe_ep_size=2).document()["disk"]["needed_bytes"]
    assert f"disk: needs {human_bytes(needed)} in {out}; " in text and " free: ok" in text
    assert "checks: all passed (mapping, source, options, output dir, disk space)" in text
    assert "memory bound:" in text


def test_rank_table_text(tiny_checkpoint: Path) -> None:
    text = dry_run(tiny_checkpoint, tp_size=4, moe_tp_size=2, moe_ep_size=2, pp_size=3).text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank "))
    rows = [line.split() for line in lines[header + 1 : header + 13]]
    # rank 5: tp_rank 1 (EP fastest: moe_ep_rank 1, moe_tp_rank 0), stage 1 holds layer 1.
    assert rows[5][:8] == ["5", "1", "1", "0", "1", "1", "4-7", "[0,"]
    assert rows[10][:8] == ["10", "2", "2", "1", "0", "2", "0-3", "[24,"]
    assert "total: 12 files, " in text


def test_every_failing_check_is_listed_and_exits_2(tiny_checkpoint: Path) -> None:
    args = ["plan", "--model_dir", str(tiny_checkpoint), "--tp_size", "8", "--moe_ep_size", "3", "--pp_size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "--moe_ep_size 3 does not divide --tp_size 8" in result.stdout
    args = ["plan", "--model_dir", str(tiny_checkpoint), "--tp_size", "8", "--moe_ep_size", "8", "--pp_size", "4"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["ranks"] == [] and doc["total_bytes"] == 0
    mapping_check = next(c for c in doc["checks"] if c["name"] == "mapping")
    problems = " | ".join(mapping_check["problems"])
    assert "num_attention_heads 4 is not divisible by tp_size 8" in problems
    assert "pp_size 4 is larger than num_hidden_layers 3" in problems
    assert "tp_size 8 is not a multiple" not in problems  # 8 % 2 kv heads == 0: fine
    text = CliRunner().invoke(main, args).stdout
    assert "checks: 2 FAILED" in text and "not planned" in text
    with pytest.raises(MappingError) as info:
        plan(tiny_checkpoint, tp_size=8, moe_ep_size=8, pp_size=4)
    assert len(info.value.problems) == 2


def test_output_dir_and_disk_space_checks(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "other.txt").write_text("x")
    args = ["plan", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--tp_size", "2"]
    busy = CliRunner().invoke(main, args)
    assert busy.exit_code == 1 and "exists and is not empty; pass --force" in busy.stdout
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    import moe_convert.dryrun as dryrun_module

    class Usage:
        free = 1000

    monkeypatch.setattr(dryrun_module.shutil, "disk_usage", lambda path: Usage())
    full = CliRunner().invoke(main, [*args, "--force", "--json"])
    assert full.exit_code == 1
    doc = json.loads(full.stdout)
    assert doc["disk"]["free_bytes"] == 1000 and doc["disk"]["ok"] is False
    assert any(c["name"] == "disk_space" and not c["ok"] for c in doc["checks"])
    inside = CliRunner().invoke(
        main, ["plan", "--model_dir", str(tiny_checkpoint), "--output_dir", str(tiny_checkpoint / "o")]
    )
    assert inside.exit_code == 1 and "overlaps --model_dir" in inside.stdout


def test_id_ranges() -> None:
    assert id_ranges([]) == "-"
    assert id_ranges([3]) == "3"
    assert id_ranges([0, 1, 2, 3]) == "0-3"
    assert id_ranges([0, 1, 4, 6, 7]) == "0-1,4,6-7"
