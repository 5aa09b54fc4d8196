"""`moe-convert verify`: passes on good outputs, names the file and tensor of every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from spec_oracle import WIDE, Layout, converted

from moe_convert.cli import main
from moe_convert.verify import VerifyReport, verify

VOCAB97: dict[str, Any] = {"vocab_size": 97}

GOOD: list[tuple[dict[str, Any], Layout]] = [
    ({}, Layout(tp=1)),
    ({}, Layout(tp=4, moe_tp=2, moe_ep=2)),
    ({}, Layout(tp=2, pp=3)),
    (WIDE, Layout(tp=8)),  # kv heads repeated; the router and norms replicated on 8 ranks
    (VOCAB97, Layout(tp=2, dtype="bfloat16", parallel_embedding=True, sharding_dim=0)),  # zero padding rows
    ({"fused_experts": True}, Layout(tp=4, moe_tp=2, moe_ep=2)),
]


@pytest.mark.parametrize(("model", "lay"), GOOD, ids=[f"{'-'.join(m) or 'base'}-{lay.label()}" for m, lay in GOOD])
def test_good_outputs_verify(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, model: dict[str, Any], lay: Layout
) -> None:
    src = make_checkpoint(**model)
    out = converted(tmp_path_factory, src, lay)
    alone = verify(out)
    assert alone.ok, alone.problems
    assert alone.rank_files == lay.tp * lay.pp and alone.bytes_read == sum(f.stat().st_size for f in out.glob("rank*"))
    full = verify(out, src)
    assert full.ok, full.problems
    assert full.with_source and full.source_bytes_read > 0
    files = "1 rank file," if lay.tp * lay.pp == 1 else f"{lay.tp * lay.pp} rank files,"
    assert full.summary().startswith(f"verified {out}: {files}")


def test_small_chunks_verify_the_same(
    make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Chunks smaller than a row (and than a piece) still meet the right bytes."""
    src = make_checkpoint()
    out = converted(tmp_path_factory, src, Layout(tp=4, moe_tp=2, moe_ep=2))
    assert verify(out, src, chunk_bytes=40).ok


@pytest.fixture
def damaged(make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of a good tp2/pp3 output (3 layers: one per stage), to damage."""
    out = converted(tmp_path_factory, make_checkpoint(), Layout(tp=2, pp=3))
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


def _manifest(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return data


def _tensor_at(out: Path, file: str, fraction: float) -> tuple[str, int]:
    """The tensor whose data holds the byte at `fraction` of the file's data, and that byte's offset."""
    entry = next(r for r in _manifest(out)["ranks"] if r["file"] == file)
    with open(out / file, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    data_len = entry["bytes"] - data_start
    target = int(data_len * fraction)
    for name, t in entry["tensors"].items():
        begin, end = t["data_offsets"]
        if begin <= target < end:
            return name, data_start + target
    raise AssertionError("no tensor there")


def _problems(report: VerifyReport) -> str:
    assert not report.ok
    return "\n".join(report.problems)


def test_flipped_byte_named_by_file_and_tensor(make_checkpoint: MakeCheckpoint, damaged: Path) -> None:
    name, offset = _tensor_at(damaged, "rank3.safetensors", 0.5)
    with open(damaged / "rank3.safetensors", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    alone = _problems(verify(damaged))
    assert "rank3.safetensors: sha256" in alone and "differs from the manifest's" in alone
    full = verify(damaged, make_checkpoint())
    text = _problems(full)
    assert f"rank3.safetensors: tensor {name!r}: bytes [" in text and "differ from source" in text
    assert all("rank3.safetensors" in p for p in full.problems), full.problems


def test_flipped_byte_in_a_replicated_tensor_found_without_source(damaged: Path) -> None:
    """rank0 and rank1 hold the same layer norm; a copy that differs is found from the rank files alone."""
    entry = next(r for r in _manifest(damaged)["ranks"] if r["file"] == "rank1.safetensors")
    name = "transformer.layers.0.input_layernorm.weight"
    with open(damaged / "rank1.safetensors", "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start + entry["tensors"][name]["data_offsets"][0] + 1)
        f.write(b"\x7f")
    text = _problems(verify(damaged))
    assert f"rank1.safetensors: tensor {name!r} differs from its copy in rank0.safetensors" in text


def test_truncated_file_named_with_the_cut_tensor(make_checkpoint: MakeCheckpoint, damaged: Path) -> None:
    path = damaged / "rank2.safetensors"
    name, offset = _tensor_at(damaged, "rank2.safetensors", 0.7)
    os.truncate(path, offset)
    text = _problems(verify(damaged, make_checkpoint()))
    assert f"rank2.safetensors: {offset} bytes, but the manifest records" in text
    assert f"tensor {name!r}" in text and "truncated" in text


def test_deleted_file(damaged: Path) -> None:
    (damaged / "rank4.safetensors").unlink()
    report = verify(damaged)
    assert report.problems[0].startswith("rank4.safetensors: missing; the manifest lists it with")
    assert "'transformer.layers.0.input_layernorm.weight'" in report.problems[0]
    assert report.summary().startswith(f"{damaged}: 1 problem found")


def test_edited_manifest_piece_caught_by_replanning(make_checkpoint: MakeCheckpoint, damaged: Path) -> None:
    manifest = _manifest(damaged)
    fc = manifest["ranks"][1]["tensors"]["transformer.layers.0.mlp.fc.weight"]
    fc["pieces"][0]["slice"][1] = [0, 31]  # one column fewer of expert 0's up rows
    (damaged / "manifest.json").write_text(json.dumps(manifest, indent=2))
    text = _problems(verify(damaged, make_checkpoint()))
    assert (
        "rank1.safetensors: tensor 'transformer.layers.0.mlp.fc.weight': manifest pieces[0].slice[1][1] is 31, "
        "but the source and options give 32"
    ) in text
    assert "rank1.safetensors: tensor 'transformer.layers.0.mlp.fc.weight': bytes [0, " in text


def test_edited_manifest_without_source(damaged: Path) -> None:
    manifest = _manifest(damaged)
    manifest["ranks"][2]["sha256"] = "0" * 64
    manifest["ranks"][3]["ffn_slice"] = [0, 48]  # rank3 would hold the FFN rows rank2 holds too
    manifest["ranks"][5]["tensors"]["lm_head.weight"]["shape"] = [50, 16]
    (damaged / "manifest.json").write_text(json.dumps(manifest, indent=2))
    text = _problems(verify(damaged))
    assert "rank2.safetensors: sha256" in text
    assert "pp stage 1: experts 0, 1, 2, 3, 4, 5, 6, 7: FFN rows [0, 24) are held twice" in text
    assert "rank5.safetensors: tensor 'lm_head.weight': shape is [50, 32] in the file, [50, 16] in the manifest" in text


def test_config_and_stray_files(damaged: Path) -> None:
    config = json.loads((damaged / "config.json").read_text())
    config["mapping"]["tp_size"] = 4
    (damaged / "config.json").write_text(json.dumps(config))
    shutil.copy(damaged / "rank0.safetensors", damaged / "rank6.safetensors")
    (damaged / "rank1.safetensors.partial").write_bytes(b"")
    text = _problems(verify(damaged))
    assert "config.json: mapping.tp_size is 4, the manifest says 2" in text
    assert "rank6.safetensors: not in the manifest" in text
    assert "rank1.safetensors.partial: a temporary file of an interrupted run" in text


def test_not_an_output(tmp_path: Path) -> None:
    report = verify(tmp_path)
    assert report.problems == (f"{tmp_path / 'manifest.json'}: not found; is {tmp_path} a moe-convert output?",)


def test_cli_verify_exit_codes(make_checkpoint: MakeCheckpoint, damaged: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(damaged), "--model_dir", str(make_checkpoint())])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.count("\n") == 1 and ok.stdout.startswith(f"verified {damaged}: 6 rank files")
    (damaged / "rank4.safetensors").unlink()
    (damaged / "rank0.safetensors").write_bytes(b"junk")
    bad = runner.invoke(main, ["verify", str(damaged)])
    assert bad.exit_code == 1
    lines = bad.stderr.splitlines()
    assert lines[-1].startswith(f"error: {damaged}: 3 problems found (6 rank files, ") and lines[-1].endswith(" s)")
    assert any(line.startswith("problem: rank4.safetensors: missing") for line in lines)
    assert any(line.startswith("problem: rank0.safetensors: 4 bytes, but the manifest records") for line in lines)
    assert any(line.startswith("problem: rank0.safetensors: not a safetensors file") for line in lines)


def test_convert_with_verify_flag(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    src = make_checkpoint()
    args = ["convert", "--model_dir", str(src), "--output_dir", str(tmp_path / "o"), "--tp_size", "2", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.startswith(f"verified {tmp_path / 'o'}: 2 rank files, ") and "matches the source" in result.stdout
    )


# ---------------------------------------------------------------- without the source, every field is re-derived


def _edit(file: str, fn: Any) -> Any:
    def edit(out: Path) -> None:
        doc = json.loads((out / file).read_text())
        fn(doc)
        (out / file).write_text(json.dumps(doc, indent=2))

    return edit


def _swap_piece_source(m: dict[str, Any]) -> None:
    piece = m["ranks"][1]["tensors"]["transformer.layers.0.mlp.fc.weight"]["pieces"][0]
    piece["source"] = piece["source"].replace("experts.0.", "experts.1.")


def _move_expert(m: dict[str, Any]) -> None:
    m["experts"][3]["holders"][0]["rank"] = 1


EDITS = [
    (_edit("config.json", lambda c: c.update(rotary_base=10000.0)), "config.json: rotary_base is 10000.0, but"),
    (_edit("config.json", lambda c: c.update(norm_epsilon=1e-3)), "config.json: norm_epsilon is 0.001, but"),
    (_edit("config.json", lambda c: c.update(hidden_size=64)), "config.json: hidden_size is 64, but"),
    (_edit("config.json", lambda c: c["moe"].update(top_k=1)), "config.json: moe.top_k is 1, but"),
    (_edit("manifest.json", _swap_piece_source), "manifest pieces[0].source is"),
    (_edit("manifest.json", _move_expert), "manifest.json: experts[3].holders[0].rank is 1, but"),
    (_edit("manifest.json", lambda m: m["model"]["config"]["rope_parameters"].update(rope_theta=1.0)), "rotary_base"),
]


@pytest.mark.parametrize(("edit", "fragment"), EDITS, ids=[e[1].split(" is")[0] for e in EDITS])
def test_edits_are_found_without_the_source(edit: Any, fragment: str, damaged: Path) -> None:
    """Every rank file's bytes and sha256 still match: only re-deriving the plan from the manifest's own
    model description and mapping shows that config.json or the manifest no longer say the truth."""
    assert verify(damaged).ok
    edit(damaged)
    problems = verify(damaged).problems
    assert any(fragment in p and "the manifest's model and mapping give" in p for p in problems), problems


def test_a_manifest_of_an_older_version_is_refused_with_a_clear_line(damaged: Path) -> None:
    manifest = _manifest(damaged)
    manifest["version"] = 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    (problem,) = verify(damaged).problems
    assert problem.endswith(
        "manifest.json: manifest version 1 was written by an older moe-convert and lacks the model description "
        "that verify and --resume need; convert again"
    )


def test_the_lock_file_is_not_a_stray(damaged: Path) -> None:
    (damaged / ".moe-convert.lock").write_text("123\n")
    assert verify(damaged).ok
