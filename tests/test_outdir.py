"""The output directory is ours only through what we create (issue 12, items 1, 2, 4, 5 and 11).

Every refused or failed run leaves the source tree and everything outside the output directory
byte-identical (hashed before and after), and creates nothing anywhere.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from hostile import TP2_PP3, assert_error_line, files, interrupted, private_copy, read_json, run_convert, tree_hash

from moe_convert import convert, convert_batch, outdir, plan
from moe_convert.cli import main
from moe_convert.errors import OutputError, UsageError
from moe_convert.outdir import LOCK_FILE, OutputLock, overlap_problem
from moe_convert.resume import JOURNAL_FILE
from moe_convert.units import human_bytes
from moe_convert.verify import verify
from moe_convert.writer import layout_rank_file

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def src(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return private_copy(tiny_checkpoint, tmp_path / "model")


@pytest.fixture(scope="module")
def clean(make_checkpoint: MakeCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    convert(make_checkpoint(), out, **TP2_PP3)
    return out


# ---------------------------------------------------------------- item 1: links planted in the output dir

PLANTED = [JOURNAL_FILE + ".partial", "rank0.safetensors.partial", "config.json.partial", "rank1.safetensors"]


@pytest.mark.parametrize("target", ["source_shard", "dangling_outside"])
@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("state", ["empty+force", "finished+force", "interrupted+resume"])
def test_links_planted_in_the_output_are_never_followed(
    state: str, name: str, target: str, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link named like one of our files, leading to a source shard or to a path outside the output:
    the run either removes the link itself (a name its journal or manifest owns) or refuses it; the
    source is never written through it and nothing is created where it points."""
    out = tmp_path / "out"
    kind, flag = state.split("+")
    if kind == "finished":
        convert(src, out, **TP2_PP3)
    elif kind == "interrupted":
        interrupted(src, out, monkeypatch)
    else:
        out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(src / SHARD if target == "source_shard" else outside / "created")
    before_src, before_outside = tree_hash(src), tree_hash(tmp_path, skip=out)
    result = run_convert(src, out, "--tp_size", "2", "--pp_size", "3", f"--{flag}", "--quiet")
    if result.exit_code == 0:
        assert verify(out, src).ok
        assert not (out / name).is_symlink()
    else:
        assert_error_line(result, 1, str(out), name)
    assert tree_hash(src) == before_src
    assert tree_hash(tmp_path, skip=out) == before_outside
    assert not (outside / "created").exists()


def test_a_link_at_an_unlisted_name_is_refused_not_removed(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "rank0.safetensors.partial").symlink_to(src / SHARD)
    result = run_convert(src, out, "--force")
    assert_error_line(result, 1, "holds rank0.safetensors.partial", "no moe-convert manifest or journal")
    assert (out / "rank0.safetensors.partial").is_symlink()


def test_the_lock_file_itself_is_never_followed(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(src / SHARD)
    before = tree_hash(src)
    result = run_convert(src, out, "--force")
    assert_error_line(result, 1, LOCK_FILE, "is a symlink")
    assert tree_hash(src) == before


# ---------------------------------------------------------------- item 2: one writer per output dir


def test_a_second_run_is_refused_naming_the_holder(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI retry with --resume while the first run still writes (here: the lock held in this process)."""
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    before = files(out)
    lock, pid = OutputLock(out), f"(pid {os.getpid()})"
    try:
        for flags in (("--resume",), ("--force",), ("--resume", "--force")):
            result = run_convert(src, out, "--tp_size", "2", "--pp_size", "3", *flags)
            assert_error_line(result, 1, f"--output_dir {out} is being written by another moe-convert run", pid)
        (problem,) = verify(out).problems
        assert problem == f"{out}: a conversion {pid} is writing into it right now; verify once it has finished"
    finally:
        lock.release()
    assert files(out) == before
    assert convert(src, out, resume=True, **TP2_PP3).kept == ("rank0.safetensors", "rank1.safetensors")
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_file_is_taken_over_and_never_a_stray_for_verify(
    make_checkpoint: MakeCheckpoint, clean: Path, tmp_path: Path
) -> None:
    """A SIGKILLed run leaves its lock file (the kernel dropped the lock): the next run takes it."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    (out / LOCK_FILE).write_text("12345\n")
    assert verify(out).ok
    result = convert(make_checkpoint(), out, resume=True, **TP2_PP3)
    assert len(result.kept) == 6 and not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------- item 4: the --output_dir argument


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "--output_dir is empty (an unset variable?)"),
        ("   ", "--output_dir is empty"),
        ("sub/..", "'sub/..' is the current directory in disguise"),
        ("./.", "'./.' is the current directory in disguise"),
        ("/", "--output_dir / is the root of the file system"),
    ],
)
def test_empty_or_disguised_output_dir_is_refused(
    value: str, fragment: str, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "notes.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    before = tree_hash(tmp_path)
    for extra in ((), ("--force",)):
        assert_error_line(run_convert(src, value, *extra), 2, fragment)
        assert tree_hash(tmp_path) == before
    with pytest.raises(UsageError, match="--output_dir"):
        convert(src, value, force=True)
    batch = CliRunner().invoke(main, ["convert", "--model_dir", str(src), "--output_dir", value, "--mapping", "tp=2"])
    assert batch.exit_code != 0 and tree_hash(tmp_path) == before


def test_dot_given_as_dot_is_the_current_directory(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    result = run_convert(src, ".", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "empty" / "manifest.json").is_file()


# ---------------------------------------------------------------- item 5: overlap by device and inode


def test_overlap_is_decided_by_inode_not_by_path(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bind mount of the model dir is another path to the same directory (same device and inode). Mounting
    needs root, so the mechanism is tested directly: `alias` is made to report the model dir's identity."""
    alias = tmp_path / "alias"
    alias.mkdir()
    real_key = outdir.dir_key

    def key(path: str | os.PathLike[str]) -> tuple[int, int]:
        return real_key(src if os.path.realpath(path) == str(alias.resolve()) else path)

    monkeypatch.setattr(outdir, "dir_key", key)
    for out in (alias, alias / "converted", alias / "a" / "b"):
        assert overlap_problem(out, src, []) == (
            f"--output_dir {out} overlaps --model_dir {src}; choose a directory outside the model"
        )
    # The model dir inside the output (an alias of its parent): --force must not clear anything there.
    monkeypatch.setattr(
        outdir, "dir_key", lambda p: real_key(tmp_path if os.path.realpath(p) == str(alias.resolve()) else p)
    )
    assert overlap_problem(alias, src, []) is not None
    before = tree_hash(src)
    result = run_convert(src, alias, "--force")
    assert_error_line(result, 1, f"--output_dir {alias} overlaps --model_dir {src}")
    assert tree_hash(src) == before and list(alias.iterdir()) == []


def test_output_inside_the_hub_blobs_the_source_reads_is_refused(src: Path, tmp_path: Path) -> None:
    """The overlap covers every directory a source file lives in, not only the model dir."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    model = tmp_path / "linked"
    model.mkdir()
    for p in src.iterdir():
        shutil.move(p, blobs / p.name)
        (model / p.name).symlink_to(blobs / p.name)
    problem = overlap_problem(blobs / "out", model, [blobs])
    assert problem is not None and "overlaps" in problem


# ---------------------------------------------------------------- item 11: batches


def test_batch_subdirs_nested_in_each_other_are_refused_before_writing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="overlap") as info:
        convert_batch(tiny_checkpoint, out, ["tp=2,subdir=a", "tp=1,subdir=a/rank0.safetensors"])
    assert "tp=1 writes into" in str(info.value) and "inside the directory of tp=2" in str(info.value)
    assert not out.exists()


def test_a_refused_batch_leaves_no_directories(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    (out / "b" / "notes.txt").write_text("not empty")
    before = tree_hash(tmp_path)
    with pytest.raises(OutputError, match="exists and is not empty"):
        convert_batch(tiny_checkpoint, out, ["tp=2,subdir=a", "tp=1,subdir=b"])
    assert tree_hash(tmp_path) == before  # no `a`, no lock files, nothing
    with pytest.raises(OutputError, match=r"notes\.txt is a file"):
        convert_batch(tiny_checkpoint, out, ["tp=2,subdir=a", "tp=1,subdir=b/notes.txt"])
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("free", ["tiny", "one_of_two"])
def test_space_messages_name_real_numbers(
    free: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never `needs 0.00 GB but only 0.00 GB`: sizes in the unit that shows them. `one_of_two`: each fits, not both."""
    mappings = ["tp=2,subdir=a", "tp=2,moe_ep=2,subdir=b"]
    needed = [
        sum(layout_rank_file(r).size for r in plan(tiny_checkpoint, **kw).ranks)
        for kw in ({"tp_size": 2}, {"tp_size": 2, "moe_ep_size": 2})
    ]
    room = 1000 if free == "tiny" else sum(needed) - 1
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - room, room))  # type: ignore[attr-defined]
    out = tmp_path / "out"
    with pytest.raises(OutputError) as info:
        convert_batch(tiny_checkpoint, out, mappings)
    message = str(info.value)
    assert "0.00 GB" not in message and f"only {human_bytes(room)} is free" in message
    assert ("the batch needs" in message) == (free == "one_of_two")
    assert not out.exists()


def test_verify_interrupted_does_not_mention_resume(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (or Ctrl-C) during verify: nothing to continue, so no --resume hint; exit 143 (130)."""
    from moe_convert.cli import Terminated

    verify_module = importlib.import_module("moe_convert.verify")  # the package's `verify` is the function

    for error, code in ((Terminated, 143), (KeyboardInterrupt, 130)):

        def stop(*args: Any, error: Callable[[], BaseException] = error, **kwargs: Any) -> None:
            raise error()

        monkeypatch.setattr(verify_module, "check_rank_file", stop)
        result = CliRunner().invoke(main, ["verify", str(clean)])
        assert result.exit_code == code
        last = result.stderr.splitlines()[-1]
        assert last == "interrupted: verification stopped before it finished; nothing was written"
        assert "--resume" not in result.stderr


def test_lock_and_overlap_leave_the_source_untouched_under_every_flag(src: Path, tmp_path: Path) -> None:
    """The model dir as output, with every flag: refused before anything is created inside it."""
    before = tree_hash(src)
    for flags in ((), ("--force",), ("--resume",), ("--resume", "--force")):
        assert_error_line(run_convert(src, src / "sub", *flags), 1, "overlaps --model_dir")
        assert_error_line(run_convert(src, src, *flags), 1, "overlaps --model_dir")
    assert tree_hash(src) == before
    assert read_json(src / "config.json")["model_type"] == "mixtral"


def test_output_dir_and_resume_modules_do_not_import_torch() -> None:
    """The checks before any byte is written stay fast to start: torch is imported only where data is cast."""
    import subprocess
    import sys

    modules = "convert, outdir, resume, identity, manifest, replan, bounded_json, files"
    code = f"import sys; from moe_convert import {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
