"""Files that are not what they claim (issue 12, items 6 and 7): FIFOs and devices where a JSON or a shard
should be, integers of 5000 digits, malformed journal and manifest fields, a directory named like a rank
file, sizes of billions in an output's config.json or manifest.

Each case ends in one line (or, for verify, problem lines) within seconds, never a hang, a traceback or
an allocation; refused runs leave the source and the output directory as they were.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from hostile import (
    TP2_PP3,
    assert_error_line,
    files,
    interrupted,
    no_hang,
    private_copy,
    read_json,
    run_convert,
    tree_hash,
    write_json,
)

from moe_convert import convert
from moe_convert.bounded_json import read_json as bounded_read_json
from moe_convert.cli import main
from moe_convert.errors import ConfigError
from moe_convert.files import open_regular
from moe_convert.resume import JOURNAL_FILE
from moe_convert.source import INDEX_FILE
from moe_convert.verify import verify

TP2_PP3_ARGS = ("--tp_size", "2", "--pp_size", "3")
DIGITS = 10**5000 - 1  # 5000 nines; Python's own int() refuses to parse more than 4300 digits


@pytest.fixture
def src(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return private_copy(tiny_checkpoint, tmp_path / "model")


@pytest.fixture(autouse=True)
def _never_hang() -> Any:
    with no_hang(120):
        yield


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


# ---------------------------------------------------------------- FIFOs and devices (item 6)


@pytest.mark.parametrize("name", ["config.json", INDEX_FILE])
@pytest.mark.parametrize("command", ["convert", "plan"])
def test_a_fifo_in_the_source_is_one_line(name: str, command: str, src: Path, tmp_path: Path) -> None:
    fifo(src / name)
    before = tree_hash(src)
    args = [command, "--model_dir", str(src), "--output_dir", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert_error_line(result, 1, str(src / name), "FIFO")
    assert tree_hash(src) == before and not (tmp_path / "out").exists()


def test_a_fifo_as_the_single_shard_is_one_line(src: Path, tmp_path: Path) -> None:
    (src / INDEX_FILE).unlink()
    for shard in src.glob("model-*.safetensors"):
        shard.unlink()
    fifo(src / "model.safetensors")
    assert_error_line(run_convert(src, tmp_path / "out"), 1, "model.safetensors", "FIFO")


def test_a_fifo_as_job_file_is_one_line(tmp_path: Path) -> None:
    fifo(tmp_path / "job.yaml")
    result = CliRunner().invoke(main, ["convert", "--job_file", str(tmp_path / "job.yaml")])
    assert_error_line(result, 1, "job.yaml", "FIFO")


@pytest.mark.parametrize("name", ["manifest.json", "config.json", "rank3.safetensors"])
def test_a_fifo_in_an_output_is_a_verify_problem(name: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = convert(tiny_checkpoint, tmp_path / "out", tp_size=4).output_dir
    fifo(out / name)
    for model_dir in (None, tiny_checkpoint):
        report = verify(out, model_dir)
        assert any(name in p and "FIFO" in p for p in report.problems), report.problems


def test_a_fifo_as_journal_is_one_line(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    fifo(out / JOURNAL_FILE)
    for flags in (("--resume",), ("--resume", "--force"), ("--force",)):
        assert_error_line(run_convert(src, out, *TP2_PP3_ARGS, *flags), 1, JOURNAL_FILE, "FIFO")


def test_devices_are_refused_without_reading(tmp_path: Path) -> None:
    """A device node needs root to create in a model dir; the check itself is what matters."""
    for device in ("/dev/null", "/dev/zero"):
        with pytest.raises(ConfigError, match=f"{device}: is a character device, not a regular file"):
            bounded_read_json(Path(device), ConfigError)
        with pytest.raises(ConfigError, match="character device"), open_regular(Path(device), ConfigError):
            pass
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").symlink_to("/dev/zero")
    (problem,) = verify(out).problems
    assert problem == f"{out / 'manifest.json'}: is a symlink; links in an output directory are never followed"


# ---------------------------------------------------------------- 5000-digit integers (item 7)


def _config_digits(model: Path, out: Path) -> None:
    cfg = read_json(model / "config.json")
    cfg["num_local_experts"] = DIGITS
    (model / "config.json").write_text(_dumps(cfg))


def _index_digits(model: Path, out: Path) -> None:
    index = read_json(model / INDEX_FILE)
    index["metadata"] = {"total_size": DIGITS}
    (model / INDEX_FILE).write_text(_dumps(index))


def _header_digits(model: Path, out: Path) -> None:
    shard = model / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    body = data[8 : 8 + n].replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1)
    shard.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n :])


def _dumps(value: Any) -> str:
    import json
    import sys

    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value)
    finally:
        sys.set_int_max_str_digits(limit)


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [(_config_digits, "config.json"), (_index_digits, INDEX_FILE), (_header_digits, "model-00001-of-00003")],
    ids=["config", "index", "header"],
)
def test_5000_digit_integers_in_the_source(
    setup: Callable[[Path, Path], None], fragment: str, src: Path, tmp_path: Path
) -> None:
    setup(src, tmp_path)
    before = tree_hash(src)
    result = run_convert(src, tmp_path / "out")
    assert_error_line(result, 1, fragment, "an integer with 5000 digits")
    assert tree_hash(src) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_5000_digit_integers_in_a_job_file(suffix: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    job = tmp_path / f"job{suffix}"
    doc = {"model_dir": str(tiny_checkpoint), "output_dir": str(tmp_path / "out"), "mappings": [{"tp": DIGITS}]}
    job.write_text(_dumps(doc))
    result = CliRunner().invoke(main, ["convert", "--job_file", str(job)])
    assert_error_line(result, 1, str(job), "5000" if suffix == ".json" else "more than 64 digits")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- malformed journal and manifest (item 7)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set a field given as `a.b[0].c`."""

    def edit(doc: dict[str, Any]) -> None:
        keys: list[Any] = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            keys.append(name)
            if rest:
                keys.append(int(rest.rstrip("]")))
        target: Any = doc
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return edit


EVERY_FLAG = pytest.mark.parametrize(
    "flags", [("--resume",), ("--resume", "--force"), ("--force",)], ids=["resume", "resume_force", "force"]
)
JOURNAL_EDITS = [
    ("completed[0].sha256", 5, "completed[0].sha256 is 5, not a sha256"),
    ("completed", "x", 'completed is "x", not a list'),
    ("completed[0].file", "../../etc/passwd", "is not a rank file name"),
    ("completed[0].bytes", DIGITS, "an integer with 5000 digits"),
    ("identity.mapping.tp_size", 10**9, "identity.mapping.tp_size 1000000000 is over the limit of 65536"),
    ("identity.mapping.world_size", 7, "identity.mapping.world_size 7 != tp_size * pp_size = 6"),
    ("identity.source.identity.fingerprint", "zz", 'fingerprint is "zz", not a sha256'),
    ("leftovers", ["../../victim"], "'../../victim' is not a name moe-convert writes"),
    ("format", "other", "not a moe-convert journal"),
]
MANIFEST_EDITS = [
    ("ranks[0].file", "../../etc/passwd", "is not a rank file name"),
    ("ranks[0].bytes", -1, "ranks[0].bytes is -1, not an integer >= 0"),
    ("mapping.pp_size", 10**12, "mapping.pp_size 1000000000000 is over the limit"),
    ("source.identity", None, "source.identity is null, not an object"),
    ("version", 99, "manifest version 99"),
]


@pytest.mark.parametrize(
    "flags", [("--resume",), ("--resume", "--force"), ("--force",)], ids=["resume", "resume_force", "force"]
)
@pytest.mark.parametrize(("field", "value", "fragment"), JOURNAL_EDITS, ids=[e[0] for e in JOURNAL_EDITS])
def test_a_malformed_journal_is_one_line(
    field: str,
    value: Any,
    fragment: str,
    flags: tuple[str, ...],
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    journal = read_json(out / JOURNAL_FILE)
    _set(field, value)(journal)
    (out / JOURNAL_FILE).write_text(_dumps(journal))
    before, before_src = files(out), tree_hash(src)
    result = run_convert(src, out, *TP2_PP3_ARGS, *flags)
    assert_error_line(result, 1, f"--output_dir {out}", JOURNAL_FILE, fragment, "changes none of them")
    assert files(out) == before and tree_hash(src) == before_src


@pytest.mark.parametrize(
    "flags", [("--resume",), ("--resume", "--force"), ("--force",)], ids=["resume", "resume_force", "force"]
)
@pytest.mark.parametrize(("field", "value", "fragment"), MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_a_malformed_manifest_is_one_line(
    field: str, value: Any, fragment: str, flags: tuple[str, ...], src: Path, tmp_path: Path
) -> None:
    out = convert(src, tmp_path / "out", **TP2_PP3).output_dir
    manifest = read_json(out / "manifest.json")
    _set(field, value)(manifest)
    write_json(out / "manifest.json", manifest)
    before, before_src = files(out), tree_hash(src)
    result = run_convert(src, out, *TP2_PP3_ARGS, *flags)
    assert_error_line(result, 1, f"--output_dir {out}", "manifest.json", fragment)
    assert files(out) == before and tree_hash(src) == before_src


def test_a_journal_that_is_not_json_is_one_line(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupted(src, out, monkeypatch)
    (out / JOURNAL_FILE).write_text('{"format": "moe-convert-journal", "version": 2, "identity": {')
    result = run_convert(src, out, *TP2_PP3_ARGS, "--resume", "--force")
    assert_error_line(result, 1, JOURNAL_FILE, "not valid JSON")


# ---------------------------------------------------------------- a directory named like a rank file (item 7)


def test_a_directory_named_like_a_rank_file(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "out", **TP2_PP3).output_dir
    (out / "rank3.safetensors").unlink()
    (out / "rank3.safetensors").mkdir()
    before = files(out)
    for flags in (("--resume",), ("--resume", "--force"), ("--force",)):
        result = run_convert(src, out, *TP2_PP3_ARGS, *flags, "--quiet")
        assert_error_line(result, 1, f"--output_dir {out}: rank3.safetensors is a directory")
    assert files(out) == before
    assert "rank3.safetensors: is a directory, not a regular file; refusing to read it" in verify(out).problems


# ---------------------------------------------------------------- sizes of billions in an output (item 6)


def _output_config(**changes: Any) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        config = read_json(out / "config.json")
        for field, value in changes.items():
            _set(field.replace("__", "."), value)(config)
        write_json(out / "config.json", config)

    return edit


def _manifest(field: str, value: Any) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        manifest = read_json(out / "manifest.json")
        _set(field, value)(manifest)
        write_json(out / "manifest.json", manifest)

    return edit


HUGE = [
    (
        _output_config(moe__num_experts=3_000_000_000),
        "config.json: moe.num_experts is 3000000000, but the manifest's model",
    ),
    (_output_config(num_hidden_layers=50_000_000), "config.json: num_hidden_layers is 50000000"),
    (_manifest("mapping.tp_size", 10**9), "manifest.json: mapping.tp_size 1000000000 is over the limit of 65536"),
    (_manifest("ranks[0].experts", [3_000_000_000]), "experts 3000000000 is over the limit"),
    (_manifest("ranks[0].layers", list(range(100_000))), "layers has 100000 entries, over the limit of 4096"),
    (_manifest("model.config.num_local_experts", 100_000_000), "num_local_experts 100000000 is over the limit"),
    (_manifest("model.config.num_hidden_layers", 50_000_000), "num_hidden_layers 50000000 is over the limit of 1024"),
]


@pytest.mark.parametrize(("edit", "fragment"), HUGE, ids=[h[1].split(":")[0] + str(i) for i, h in enumerate(HUGE)])
def test_huge_sizes_in_an_output_are_bounded(
    edit: Callable[[Path], None], fragment: str, make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(convert(make_checkpoint(), tmp_path / "good", tp_size=2, moe_ep_size=2).output_dir, out)
    edit(out)
    with no_hang(30):
        report = verify(out)
    assert any(fragment in p for p in report.problems), report.problems
