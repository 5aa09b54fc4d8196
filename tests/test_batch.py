"""Batch conversion: several mappings from one pass over the source (`--mapping`, `--job_file`, API)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from moe_convert import Mapping, MappingRequest, convert, convert_batch
from moe_convert.cli import main
from moe_convert.errors import ConfigError, MappingError, UsageError
from moe_convert.jobs import parse_mapping, read_job_file
from moe_convert.mapping import check_model_fit
from moe_convert.reading import SourceReader

REPO = Path(__file__).resolve().parents[1]
MAPPINGS = ["tp=2", "tp=4,moe_tp=2,moe_ep=2", "tp=2,pp=3,moe_ep=2"]
SIZES: list[dict[str, Any]] = [
    {"tp_size": 2},
    {"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 2},
    {"tp_size": 2, "pp_size": 3, "moe_ep_size": 2},
]
LABELS = ["tp2_pp1_moetp2_moeep1", "tp4_pp1_moetp2_moeep2", "tp2_pp3_moetp1_moeep2"]


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def read_log(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str, Any]]:
    """Every (file, tensor, chunk) the executor reads from the source."""
    log: Counter[tuple[str, str, Any]] = Counter()
    real = SourceReader.read_bits

    def counted(self: SourceReader, info: Any, chunk: Any, into: Any = None) -> Any:
        log[(info.file.name, info.name, chunk)] += 1
        return real(self, info, chunk, into)

    monkeypatch.setattr(SourceReader, "read_bits", counted)
    return log


@pytest.fixture
def copy_log(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Source tensors copied as plain byte ranges (no cast, no column slice) straight into the rank files."""
    log: Counter[str] = Counter()
    real = SourceReader.copy_to

    def counted(self: SourceReader, info: Any, start: int, n: int, writer: Any, offset: int) -> None:
        real(self, info, start, n, writer, offset)
        log[info.name] += 1

    monkeypatch.setattr(SourceReader, "copy_to", counted)
    return log


def test_batch_is_byte_identical_to_separate_runs_and_reads_the_source_once(
    tiny_checkpoint: Path, tmp_path: Path, read_log: Counter[tuple[str, str, Any]], copy_log: Counter[str]
) -> None:
    results = convert_batch(tiny_checkpoint, tmp_path / "batch", MAPPINGS, dtype="bfloat16")
    batch_reads = Counter(read_log)
    assert [r.output_dir.name for r in results] == LABELS
    # Each source chunk read into memory was read exactly once, for all mappings together; the rest
    # (the float32 routers, kept float32) went as plain byte ranges, and every source tensor was used.
    assert set(batch_reads.values()) == {1}
    read = {name for _, name, _ in batch_reads}
    assert read | set(copy_log) == set(results[0].plan.sources)
    assert not read & set(copy_log)
    read_log.clear()
    for sizes, label, result in zip(SIZES, LABELS, results, strict=True):
        single = convert(tiny_checkpoint, tmp_path / "single" / label, dtype="bfloat16", **sizes)
        assert files(result.output_dir) == files(single.output_dir)
        assert result.manifest == single.manifest
        assert result.plan.mapping == single.plan.mapping
    # Three separate runs read every chunk three times.
    assert sum(read_log.values()) == 3 * sum(batch_reads.values())


def test_batch_accepts_every_mapping_form(tiny_checkpoint: Path, tmp_path: Path) -> None:
    mappings = [
        {"tp": 2, "subdir": "a"},
        {"tp_size": 2, "moe_ep_size": 2, "output_dir": "nested/b"},
        MappingRequest(tp_size=4, moe_ep_size=4, subdir="c"),
        Mapping(tp_size=1, pp_size=3),
    ]
    results = convert_batch(tiny_checkpoint, tmp_path, mappings)
    assert [r.output_dir.relative_to(tmp_path).as_posix() for r in results] == [
        "a",
        "nested/b",
        "c",
        "tp1_pp3_moetp1_moeep1",
    ]
    assert [r.plan.mapping.moe_ep_size for r in results] == [1, 2, 4, 1]
    assert all((r.output_dir / "manifest.json").is_file() for r in results)


def test_a_bad_mapping_stops_the_batch_before_anything_is_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(MappingError) as info:
        convert_batch(tiny_checkpoint, tmp_path / "out", ["tp=2", "tp=8,moe_ep=8", "tp=2,pp=4"])
    problems = info.value.problems
    assert any(p.startswith("tp=8,moe_ep=8: num_attention_heads 4 is not divisible by tp_size 8") for p in problems)
    assert any(p.startswith("tp=2,pp=4: pp_size 4 is larger than num_hidden_layers 3") for p in problems)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="both write into 'same'"):
        convert_batch(tiny_checkpoint, tmp_path / "out", ["tp=2,subdir=same", "tp=1,subdir=same"])
    with pytest.raises(UsageError, match="must be a relative path"):
        convert_batch(tiny_checkpoint, tmp_path / "out", [{"tp": 2, "subdir": "../escape"}])


def test_parse_mapping() -> None:
    assert parse_mapping("tp=8,moe_ep=8") == MappingRequest(tp_size=8, moe_ep_size=8)
    assert parse_mapping(" tp_size=8, moe_tp=2 ,moe_ep=4,subdir=x") == MappingRequest(8, 1, 2, 4, "x")
    assert parse_mapping("tp=4,pp=2").describe() == "tp=4,pp=2"
    for bad, message in [
        ("tp8", "is not KEY=VALUE"),
        ("tp=8,ep=8", "unknown key 'ep'"),
        ("tp=eight", "is not a whole number"),
        ("moe_ep=8", "tp is required"),
        ("tp=8,tp_size=4", "given twice"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_mapping(bad)


def test_cli_repeated_mapping_with_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out), "--json"]
    result = CliRunner().invoke(main, [*args, "--mapping", MAPPINGS[0], "--mapping", MAPPINGS[1]])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and [Path(j["output_dir"]).name for j in doc["jobs"]] == LABELS[:2]
    assert doc["total_bytes"] == sum(j["total_bytes"] for j in doc["jobs"])
    for job in doc["jobs"]:
        manifest = json.loads(Path(job["manifest"]).read_text())
        assert [(f["file"], f["bytes"], f["sha256"]) for f in job["files"]] == [
            (r["file"], r["bytes"], r["sha256"]) for r in manifest["ranks"]
        ]
    mixed = CliRunner().invoke(main, [*args, "--force", "--mapping", "tp=2", "--tp_size", "2"])
    assert mixed.exit_code == 2 and "--tp_size cannot be combined with --mapping" in mixed.output


def test_cli_job_file_yaml_and_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    job = {
        "model_dir": str(tiny_checkpoint),
        "output_dir": str(tmp_path / "from-file"),
        "dtype": "bfloat16",
        "mappings": [{"tp": 2}, {"tp": 4, "moe_tp": 2, "moe_ep": 2, "subdir": "mixed"}],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = CliRunner().invoke(main, ["convert", "--job_file", str(tmp_path / "job.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "from-file").iterdir()) == ["mixed", LABELS[0]]
    assert json.loads((tmp_path / "from-file" / "mixed" / "config.json").read_text())["dtype"] == "bfloat16"
    # The command line wins over the file: another output dir, another dtype.
    other = tmp_path / "override"
    result = CliRunner().invoke(
        main,
        ["convert", "--job_file", str(tmp_path / "job.json"), "--output_dir", str(other), "--dtype", "float16"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((other / "mixed" / "config.json").read_text())["dtype"] == "float16"
    dry = CliRunner().invoke(main, ["plan", "--job_file", str(tmp_path / "job.yaml"), "--force", "--json"])
    assert dry.exit_code == 0, dry.output
    doc = json.loads(dry.stdout)
    assert [j["mapping_request"] for j in doc["jobs"]] == ["tp=2", "tp=4,moe_tp=2,moe_ep=2"]
    written = json.loads((tmp_path / "from-file" / "mixed" / "manifest.json").read_text())
    assert doc["jobs"][1]["total_bytes"] == written["total_bytes"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model_dir: m\noutput_dir: o\n", "mappings is required"),
        ("model_dir: m\noutput_dir: o\nmappings: []\n", "mappings is empty"),
        ("model_dir: m\noutput_dir: o\nworkers: two\nmappings: [{tp: 2}]\n", "workers must be int, found 'two'"),
        ("model_dir: m\noutput_dir: o\nmapings: [{tp: 2}]\n", "unknown key 'mapings'"),
        ("model_dir: m\noutput_dir: o\nmappings: [{tp: 2, ep: 2}]\n", "unknown key 'ep'"),
        ("- just a list\n", "expected a mapping of keys at the top"),
        ("model_dir: [unclosed\n", "not valid YAML"),
    ],
)
def test_job_file_errors_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(content)
    with pytest.raises((ConfigError, UsageError), match=message):
        read_job_file(path)
    result = CliRunner().invoke(main, ["convert", "--job_file", str(path)])
    assert result.exit_code in (1, 2) and result.output.count("\n") == 1 and message.split()[0] in result.output


def test_the_example_job_file_fits_mixtral_8x7b() -> None:
    job = read_job_file(REPO / "configs" / "batch-example.yaml")
    assert job.model_dir == "configs/mixtral-8x7b-v0.1.config.json" and len(job.mappings) == 5
    spec_dir = REPO / "configs"
    from moe_convert.config_only import read_config_file

    spec = read_config_file(spec_dir / "mixtral-8x7b-v0.1.config.json")
    for m in job.mappings:
        mapping = m.resolve()
        assert not check_model_fit(mapping, spec)
    assert [m.output_subdir() for m in job.mappings] == [
        "tp8_pp1_moetp1_moeep8",
        "tp8_pp1_moetp2_moeep4",
        "tp8-expert-tp",
        "tp4_pp2_moetp1_moeep4",
        "tp8_pp1_moetp1_moeep8_int4",
    ]
