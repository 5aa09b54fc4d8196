"""--resume: keep what an interrupted run completed, redo the rest, byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from hostile import TP2_PP3, flip_byte, interrupted

from moe_convert import convert
from moe_convert.cli import main
from moe_convert.errors import UsageError
from moe_convert.resume import JOURNAL_FILE
from moe_convert.verify import verify


@pytest.fixture(scope="module")
def clean(make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tp2/pp3 conversion: what every resumed run must equal, byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "out"
    convert(make_checkpoint(), out, **TP2_PP3)
    return out


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_interrupt_then_resume_is_byte_identical(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = make_checkpoint(), tmp_path / "out"
    # 96 source tensors in file order; stage 0's ranks need nothing past the 33rd, stage 1's past the 64th.
    interrupted(src, out, monkeypatch, at_tensor=50)
    journal = json.loads((out / JOURNAL_FILE).read_text())
    done = [r["file"] for r in journal["completed"]]
    assert done == ["rank0.safetensors", "rank1.safetensors"]
    # Ctrl-C: the temporary files are gone; what has a final name is complete; no manifest.
    assert sorted(p.name for p in out.iterdir()) == sorted([JOURNAL_FILE, *done])
    for name in done:
        assert (out / name).read_bytes() == (clean / name).read_bytes()

    result = convert(src, out, resume=True, **TP2_PP3)
    assert result.kept == ("rank0.safetensors", "rank1.safetensors")
    assert files(out) == files(clean)  # rank files, config.json and manifest.json; the journal is gone
    assert verify(out, src).ok


def test_a_damaged_kept_file_is_redone(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = make_checkpoint(), tmp_path / "out"
    interrupted(src, out, monkeypatch, at_tensor=70)  # ranks 0-3 complete
    with open(out / "rank2.safetensors", "r+b") as f:  # same size, one byte different: only sha256 tells
        f.seek(-3, os.SEEK_END)
        f.write(b"\x01")
    result = convert(src, out, resume=True, **TP2_PP3)
    assert result.kept == ("rank0.safetensors", "rank1.safetensors", "rank3.safetensors")
    assert files(out) == files(clean)


def test_resume_refuses_other_options_naming_them(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = make_checkpoint(), tmp_path / "out"
    interrupted(src, out, monkeypatch, at_tensor=50)
    with pytest.raises(UsageError) as e:
        convert(src, out, resume=True, tp_size=2, pp_size=1, dtype="bfloat16")
    assert str(e.value).startswith(
        f"cannot --resume into {out}: --pp_size was 3, now 1; --dtype was 'auto', now 'bfloat16'. "
        "Rerun with the interrupted run's options and source, or add --force to start over"
    )
    assert (out / "rank0.safetensors").exists()  # refusing touches nothing


def test_resume_refuses_a_changed_source(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint(), src)
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch, at_tensor=50)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded: same size, new file
    with pytest.raises(UsageError, match=f"source file {shard.name} was modified"):
        convert(src, out, resume=True, **TP2_PP3)
    # --force with --resume: a directory that cannot be resumed is started over instead of refused.
    result = convert(src, out, resume=True, force=True, **TP2_PP3)
    assert result.kept == ()
    assert verify(out, src).ok


def test_resume_of_an_empty_or_finished_dir(make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path) -> None:
    src, out = make_checkpoint(), tmp_path / "new"
    first = convert(src, out, resume=True, **TP2_PP3)  # nothing to resume: a plain conversion
    assert first.kept == () and files(out) == files(clean)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("rank*")}
    again = convert(src, out, resume=True, **TP2_PP3)
    assert again.kept == tuple(f"rank{i}.safetensors" for i in range(6))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("rank*")} == before  # nothing rewritten
    assert files(out) == files(clean)
    (out / "rank5.safetensors").unlink()  # a finished dir with a file lost: only that file is redone
    third = convert(src, out, resume=True, **TP2_PP3)
    assert len(third.kept) == 5 and files(out) == files(clean)


def test_resume_without_journal_is_refused(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not ours")
    with pytest.raises(UsageError, match=f"it has neither {JOURNAL_FILE} nor manifest.json"):
        convert(make_checkpoint(), tmp_path, resume=True)


def test_cli_resume(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = make_checkpoint(), tmp_path / "out"
    interrupted(src, out, monkeypatch, at_tensor=80)
    args = ["convert", "--model_dir", str(src), "--output_dir", str(out), "--tp_size", "2", "--pp_size", "3"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"error: --output_dir {out} holds an interrupted conversion; pass --resume to continue it "
        "or --force to overwrite it\n"
    )
    other = CliRunner().invoke(main, [*args[:-1], "2", "--resume"])
    assert other.exit_code == 2
    assert other.stderr.startswith(f"error: cannot --resume into {out}: --pp_size was 3, now 2.")
    ok = CliRunner().invoke(main, [*args, "--resume", "--verify"])
    assert ok.exit_code == 0, ok.output
    assert f"resuming {out}: keeping 4 complete rank files, writing 2" in ok.stderr
    assert files(out) == files(clean)


def test_same_input_same_bytes(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """Determinism: two runs (different worker counts and chunk sizes) write identical files."""
    src = make_checkpoint(fused_experts=True)
    kwargs: dict[str, Any] = {"tp_size": 4, "moe_ep_size": 2, "dtype": "bfloat16"}
    convert(src, tmp_path / "a", **kwargs)
    convert(src, tmp_path / "b", workers=2, chunk_bytes=1000, **kwargs)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert sorted(a) == ["config.json", "manifest.json"] + [f"rank{i}.safetensors" for i in range(4)]
    assert a == b


# ---------------------------------------------------------------- --resume re-establishes trust (issue 12, item 3)


def test_resume_of_a_finished_output_rehashes_and_rewrites_a_flipped_byte(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path
) -> None:
    """Same size, same mtime, one byte different: only the sha256 tells, and --resume checks it."""
    src, out = make_checkpoint(), tmp_path / "out"
    shutil.copytree(clean, out)
    flip_byte(out / "rank2.safetensors")
    result = convert(src, out, resume=True, **TP2_PP3)
    assert "rank2.safetensors" not in result.kept and len(result.kept) == 5
    assert files(out) == files(clean)  # byte-identical to a clean run, manifest and config.json included
    assert verify(out, src).ok


def _rewrite_in_place(shard: Path, *, keep_mtime: bool) -> None:
    """The same header, every data byte different (a re-download of other weights of the same shapes)."""
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(b ^ 0x55 for b in data[start:])
    with open(shard, "r+b") as f:
        f.write(data)
    if keep_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new_mtime", "mtime_kept"])
@pytest.mark.parametrize("state", ["finished", "interrupted"])
def test_resume_refuses_a_source_rewritten_in_place(
    state: str, keep_mtime: bool, make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, content rewritten (and one rank file lost): mixing old and new ranks would be silent
    garbage, so --resume refuses; --resume --force starts over from the new source."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(make_checkpoint(), src)
    if state == "finished":
        convert(src, out, **TP2_PP3)
        (out / "rank5.safetensors").unlink()
    else:
        interrupted(src, out, monkeypatch, at_tensor=70)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    _rewrite_in_place(shard, keep_mtime=keep_mtime)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expected = "fingerprint" if keep_mtime else f"source file {shard.name} was modified"
    with pytest.raises(UsageError, match=f"cannot --resume into {out}: .*{expected}"):
        convert(src, out, resume=True, **TP2_PP3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = convert(src, out, resume=True, force=True, **TP2_PP3)
    assert result.kept == ()
    assert verify(out, src).ok


def test_resume_refuses_an_older_manifest_without_identity(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path
) -> None:
    src, out = make_checkpoint(), tmp_path / "out"
    shutil.copytree(clean, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 1
    del manifest["source"]["identity"], manifest["model"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="was written by an older moe-convert and records no source identity"):
        convert(src, out, resume=True, **TP2_PP3)
    # --force: its files are listed, so they are ours to replace.
    convert(src, out, resume=True, force=True, **TP2_PP3)
    assert files(out) == files(clean)


def test_debris_of_a_run_killed_while_writing_its_journal_is_cleared(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL can land between a journal's temporary file and its rename: the names are ours, so they go."""
    src, out = make_checkpoint(), tmp_path / "out"
    interrupted(src, out, monkeypatch)
    for name in (f"{JOURNAL_FILE}.partial", "config.json.partial", "rank3.safetensors.partial"):
        (out / name).write_text("half written")
    convert(src, out, resume=True, **TP2_PP3)
    assert files(out) == files(clean)
