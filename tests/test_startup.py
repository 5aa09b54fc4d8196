"""A conversion's start: the first rank file is written before, and without, transformers (issue 16).

config.json's settings (step (b), through transformers' config classes, which import torch) are read
while the conversion streams: in a child process when the converter has no torch, in a thread when it
has (a cast), and waited for before the first rank file gets its final name. These tests prove the order,
that a config transformers rejects still fails in one line leaving nothing that looks complete, that
each way of reading gives the same settings, and that the reading's notes are taken from its own thread
only.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from test_errors import assert_error_line, no_final_outputs
from test_weight_only_convert import WIDE_MIXTRAL

from moe_convert import pending_settings
from moe_convert.cli import main
from moe_convert.errors import ConfigError
from moe_convert.model_config import _transformers_notes, read_settings, read_sizes
from moe_convert.pending_settings import PendingSettings

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI in a fresh interpreter and reports, as JSON on the last stdout line, which of torch and
# transformers were imported when the first rank file writer was created and at the end, and which threads
# imported any of their modules.
PROBE = r"""
import json, sys, threading
HEAVY = ("torch", "transformers")
report = {"importers": {}}
def audit(event, args):
    if event == "import" and args[0].split(".")[0] in HEAVY:
        report["importers"].setdefault(args[0].split(".")[0], set()).add(threading.current_thread().name)
sys.addaudithook(audit)
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
report["importers"] = {k: sorted(v) for k, v in report["importers"].items()}
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


# ---------------------------------------------------------------- the order, in a fresh process


def test_bf16_conversion_imports_neither_torch_nor_transformers(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """A bf16 model to bf16 rank files: byte ranges, numpy gathers, the router widened by a bit shift; the
    settings come from a child process. The converter never imports torch or transformers."""
    model = make_checkpoint(dtype="bfloat16")
    report, done = probe_convert(model, tmp_path / "out", "--tp_size", "2", "--quiet")
    assert report["exit"] == 0, done.stderr
    assert report["at_first_writer"] == []
    assert report["at_exit"] == [] and report["importers"] == {}
    assert done.stderr == ""
    convert_in_process(model, tmp_path / "in-process", "--tp_size", "2", "--quiet")
    same_files(tmp_path / "out", tmp_path / "in-process")  # config.json's settings too


@pytest.mark.parametrize(
    ("model_args", "args"),
    [
        ({}, ()),  # float32 -> float16: torch casts
        (
            {**WIDE_MIXTRAL, "dtype": "bfloat16"},
            ("--use_weight_only", "--weight_only_precision", "int8", "--weight_only_arch", "80"),
        ),
    ],
    ids=["cast", "weight_only"],
)
def test_torch_work_reads_settings_on_a_thread_of_its_own(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, model_args: dict[str, Any], args: tuple[str, ...]
) -> None:
    """Where the converter imports torch anyway (a cast, quantization), the settings are read on a thread
    (a child would load a second torch); transformers is still imported by that thread only."""
    model = make_checkpoint(**model_args)
    report, done = probe_convert(model, tmp_path / "out", "--tp_size", "2", "--quiet", *args)
    assert report["exit"] == 0, done.stderr
    assert report["importers"]["transformers"] == ["moe-convert-settings"]
    convert_in_process(model, tmp_path / "in-process", "--tp_size", "2", "--quiet", *args)
    same_files(tmp_path / "out", tmp_path / "in-process")


def test_config_transformers_rejects_fails_in_one_line_leaving_nothing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """Rejected in the child, after rank data was streamed: one line, exit 1, no rank file under any name,
    no config.json or manifest, and the output dir this run created removed again."""
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(make_checkpoint(dtype="bfloat16")), str(model)], check=True)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_act": 5}))
    out = tmp_path / "deep" / "out"
    report, done = probe_convert(model, out, "--tp_size", "2")
    assert report["exit"] == 1
    assert report["at_first_writer"] == []  # the data streamed before the answer came
    lines = [line for line in done.stderr.splitlines() if not line.startswith("converting: ")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "transformers rejects this config" in lines[0]
    assert "hidden_act" in lines[0] and str(model / "config.json") in lines[0]
    assert no_final_outputs(out) and not out.exists() and not out.parent.exists()


# ---------------------------------------------------------------- in-process: the writing does not wait


def test_rank_files_are_written_while_the_settings_are_read(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings reader answers only once a rank file holds data: the conversion must get there alone."""
    out = tmp_path / "out"
    real = pending_settings.read_settings

    def after_first_data(*args: Any) -> Any:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size for p in out.glob("rank*.partial")):
            assert time.monotonic() < deadline, "no rank data was written while the settings were being read"
            time.sleep(0.01)
        return real(*args)

    monkeypatch.setattr(pending_settings, "read_settings", after_first_data)
    convert_in_process(tiny_checkpoint, out, "--tp_size", "2", "--quiet")
    monkeypatch.undo()
    convert_in_process(tiny_checkpoint, tmp_path / "plain", "--tp_size", "2", "--quiet")
    same_files(out, tmp_path / "plain")


def test_settings_error_in_process_leaves_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rejection found while the data streams (a thread, as with a cast) is still one line, and the
    output dir an earlier run left there empty stays (it was not created by this run), without a journal."""
    out = tmp_path / "out"
    out.mkdir()

    def reject(raw: dict[str, Any], spec: Any, where: str) -> Any:
        raise ConfigError(f"{where}: transformers rejects this config: TypeError: no")

    monkeypatch.setattr(pending_settings, "read_settings", reject)
    result = CliRunner().invoke(main, ["convert", "--model_dir", str(tiny_checkpoint), "--output_dir", str(out)])
    assert_error_line(result, 1, "transformers rejects this config")
    assert out.is_dir() and list(out.iterdir()) == []


# ---------------------------------------------------------------- PendingSettings: every way gives the same


@pytest.fixture
def config(tiny_checkpoint: Path) -> tuple[dict[str, Any], Any, str]:
    where = str(tiny_checkpoint / "config.json")
    raw = json.loads(Path(where).read_text())
    return raw, read_sizes(raw, where), where


def no_torch_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `start` take the child process, as in a converter without torch."""
    monkeypatch.setattr(pending_settings, "_has_torch", lambda: False)


def test_every_way_of_reading_gives_the_same_settings(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = read_settings(*config)
    assert PendingSettings(*config).result() == expected  # in the caller
    thread = PendingSettings(*config)
    thread.start(torch_here=True)
    assert thread.result() == expected
    no_torch_here(monkeypatch)
    child = PendingSettings(*config)
    child.start()
    assert child._child is not None
    assert child.result() == expected


def test_child_rejection_is_the_same_error(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, _, where = config
    bad = {**raw, "hidden_act": 5}
    with pytest.raises(ConfigError) as here:
        read_settings(bad, read_sizes(bad, where), where)
    no_torch_here(monkeypatch)
    pending = PendingSettings(bad, read_sizes(bad, where), where)
    pending.start()
    for _ in range(2):  # every caller gets it
        with pytest.raises(ConfigError) as there:
            pending.result()
        assert str(there.value) == str(here.value) and there.value.problems == here.value.problems
    assert pending.failed


@pytest.mark.parametrize(
    ("what", "patch"),
    [
        ("no interpreter to start", lambda mp: mp.setattr(pending_settings.sys, "executable", "")),
        ("the child dies", lambda mp: mp.setattr(pending_settings, "_CHILD_CODE", "import os; os._exit(3)")),
        ("the child answers nonsense", lambda mp: mp.setattr(pending_settings, "_CHILD_CODE", "print('{')")),
    ],
)
def test_settings_are_read_here_when_the_child_cannot_answer(
    config: Any, monkeypatch: pytest.MonkeyPatch, what: str, patch: Callable[[pytest.MonkeyPatch], None]
) -> None:
    expected = read_settings(*config)
    no_torch_here(monkeypatch)
    patch(monkeypatch)
    pending = PendingSettings(*config)
    pending.start()
    assert pending.result() == expected, what


def test_many_callers_one_child(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write threads committing at once: one collects the child's answer, all get the same settings."""
    no_torch_here(monkeypatch)
    spawned: list[Any] = []
    real_spawn = pending_settings._spawn

    def spawn(*args: Any) -> Any:
        spawned.append(real_spawn(*args))
        return spawned[-1]

    monkeypatch.setattr(pending_settings, "_spawn", spawn)
    pending = PendingSettings(*config)
    pending.start()
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(pending.result())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spawned) == 1 and len(got) == 8 and all(g is got[0] for g in got)


def test_cancel_stops_the_child(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    no_torch_here(monkeypatch)
    monkeypatch.setattr(pending_settings, "_CHILD_CODE", "import time; time.sleep(60)")
    pending = PendingSettings(*config)
    pending.start()
    child = pending._child
    assert child is not None
    started = time.monotonic()
    pending.cancel()
    assert child.returncode is not None and time.monotonic() - started < 10


# ---------------------------------------------------------------- notes: this thread's only


def test_notes_are_this_threads_only() -> None:
    """transformers' log records and warnings raised in the reading thread become its notes (and are not
    printed); another thread's at the same moment go where they always go."""
    tf_log = logging.getLogger("transformers.models.fake")
    seen_by_handlers: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen_by_handlers.append(record.getMessage())

    watcher = Seen()
    logging.getLogger("transformers").addHandler(watcher)
    inside, other_done = threading.Event(), threading.Event()
    other_warnings: list[str] = []

    def other_thread() -> None:
        inside.wait()
        tf_log.warning("theirs: a record")
        with warnings.catch_warnings(record=True) as caught:  # composes with the reader's routing
            warnings.simplefilter("always")
            warnings.warn("theirs: a warning", UserWarning, stacklevel=1)
        other_warnings.extend(str(w.message) for w in caught)
        other_done.set()

    other = threading.Thread(target=other_thread)
    other.start()
    try:
        with _transformers_notes("config.json") as notes:
            tf_log.warning("mine: a\n record")
            warnings.warn("mine: a warning (once per process)", FutureWarning, stacklevel=1)
            inside.set()
            assert other_done.wait(30)
    finally:
        logging.getLogger("transformers").removeHandler(watcher)
        other.join()
    assert notes == [
        "config.json: transformers: mine: a record",
        "config.json: transformers: mine: a warning (once per process)",
    ]
    assert "theirs: a record" in seen_by_handlers and not any(m.startswith("mine") for m in seen_by_handlers)
    assert other_warnings == ["theirs: a warning"]
