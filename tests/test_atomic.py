"""Atomic output: whatever stops a conversion (SIGKILL, SIGTERM, a full disk), no final-named file is incomplete.

Each test runs the real CLI in a subprocess. A hidden --chunk_bytes makes the conversion slow enough to be
stopped mid-way: the tests wait for a state on disk (a journal entry, a temporary file), never for a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeCheckpoint
from safetensors import safe_open

from moe_convert import convert
from moe_convert.resume import JOURNAL_FILE
from moe_convert.verify import verify

# Bigger than the default tiny model, so a run with 4 KB chunks takes a few seconds.
BIGGER: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "vocab_size": 2000,
    "num_hidden_layers": 4,
    "max_shard_size": "8MB",
}
MAPPING = ["--tp_size", "2", "--pp_size", "2"]  # stage 0's ranks are final half-way through


@pytest.fixture(scope="module")
def bigger(make_checkpoint: MakeCheckpoint) -> Path:
    return make_checkpoint(**BIGGER)


@pytest.fixture(scope="module")
def clean(bigger: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    convert(bigger, out, tp_size=2, pp_size=2)
    return out


def start(src: Path, out: Path, *extra: str, **popen: Any) -> subprocess.Popen[str]:
    args = ["--model_dir", str(src), "--output_dir", str(out), *MAPPING, "--quiet", *extra]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moe_convert", "convert", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """Poll the output dir until `ready`; fail if the conversion ends first (then the test proved nothing)."""
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the conversion ended (exit {proc.returncode}) before it could be stopped: {proc.stderr}")
        time.sleep(0.005)


def journal_has_a_rank(out: Path) -> bool:
    try:
        return bool(json.loads((out / JOURNAL_FILE).read_text())["completed"])
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_sigkill_then_resume(bigger: Path, clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start(bigger, out, "--chunk_bytes", "4096")
    wait_for(proc, lambda: journal_has_a_rank(out))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    proc.communicate()

    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and "config.json" not in names
    assert any(n.endswith(".partial") for n in names)  # killed mid-way: temporaries left, under their own names
    finals = [n for n in names if n.endswith(".safetensors")]
    assert finals, names
    for name in finals:  # complete: loads, and equals the uninterrupted run's file
        with safe_open(str(out / name), "pt") as f:
            assert list(f.keys())
        assert (out / name).read_bytes() == (clean / name).read_bytes()

    result = convert(bigger, out, tp_size=2, pp_size=2, resume=True)
    assert set(result.kept) <= set(finals) and result.kept
    report = verify(out, bigger)
    assert report.ok, report.problems
    assert files(out) == files(clean)


def test_sigterm_cleans_up_like_ctrl_c(bigger: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start(bigger, out, "--chunk_bytes", "4096")
    wait_for(proc, lambda: any(out.glob("rank*.safetensors.partial")))
    proc.terminate()
    _, stderr = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr == (
        "interrupted: temporary files removed, no output file was left incomplete "
        "(a conversion continues with --resume)\n"
    )
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".partial")]
    assert JOURNAL_FILE in names and "manifest.json" not in names


def test_disk_full(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """A file size limit below a rank file's size stands in for a full disk (writes fail with EFBIG)."""
    out = tmp_path / "out"

    def small_files() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))

    proc = start(make_checkpoint(), out, preexec_fn=small_files)
    _, stderr = proc.communicate()
    assert proc.returncode == 1
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert "disk full (or file size limit)" in stderr and ".safetensors" in stderr
    # No temporary file, no config.json, no manifest.json. A small rank file of the first stage may have
    # been finished (and journaled, for --resume) before another file hit the limit: it must be complete.
    journal = json.loads((out / JOURNAL_FILE).read_text())
    done = {r["file"]: r for r in journal["completed"]}
    names = sorted(p.name for p in out.iterdir())
    assert JOURNAL_FILE in names
    for name in names:
        if name == JOURNAL_FILE:
            continue
        assert name.endswith(".safetensors") and name in done, names
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == done[name]["sha256"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(
    bigger: Path, clean: Path, tmp_path: Path
) -> None:
    """A CI retry with --resume while the first run still writes: refused naming the first run's pid; the
    first run finishes undisturbed and its output is the clean one."""
    out = tmp_path / "out"
    first = start(bigger, out, "--chunk_bytes", "4096")
    wait_for(first, lambda: journal_has_a_rank(out))
    first.send_signal(signal.SIGSTOP)  # mid-write, holding the lock, for as long as the retries take
    try:
        for extra in (("--resume",), ("--force",), ("--resume", "--force")):
            second = start(bigger, out, *extra)
            _, stderr = second.communicate()
            assert second.returncode == 1
            assert stderr == (
                f"error: --output_dir {out} is being written by another moe-convert run (pid {first.pid}); "
                "wait for it to finish, or choose another --output_dir\n"
            )
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate()
    assert first.returncode == 0, stderr
    assert files(out) == files(clean)  # the lock file is gone too
