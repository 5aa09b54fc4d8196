"""Helpers for the tests of bad and hostile input: private copies, tree hashes, one-line error checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from moe_convert.cli import main

OLD_NS = 1_000_000_000 * 1_000_000_000  # a fixed mtime well in the past: any write during a run changes it


def private_copy(checkpoint: Path, where: Path) -> Path:
    """A copy of a checkpoint that a case may break, every file dated OLD_NS."""
    shutil.copytree(checkpoint, where)
    for p in where.iterdir():
        os.utime(p, ns=(OLD_NS, OLD_NS))
    return where


def tree_hash(root: Path, *, skip: Path | None = None) -> str:
    """Names, types, modes, mtimes, symlink targets and contents of everything under `root` (but `skip`)."""
    h = hashlib.sha256()
    if not root.exists() and not root.is_symlink():
        return "absent"
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
    for p in paths:
        if skip is not None and (p == skip or p.is_relative_to(skip)):
            continue
        st = p.lstat()
        h.update(f"{p.relative_to(root.parent)}|{st.st_mode}|{st.st_mtime_ns}|".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(p.read_bytes())
    return h.hexdigest()


def files(out: Path) -> dict[str, Any]:
    """Every entry of a directory: file bytes, or the link target, or True for a directory."""
    found: dict[str, Any] = {}
    for p in sorted(out.iterdir()):
        found[p.name] = os.readlink(p) if p.is_symlink() else True if p.is_dir() else p.read_bytes()
    return found


def run_convert(model: Path, out: Path | str, *extra: str) -> Result:
    args = ["convert", "--model_dir", str(model), "--output_dir", str(out), *extra]
    return CliRunner().invoke(main, args)


PROGRESS_LINE = re.compile(r"converting: (\d+% \(|\d+ rank files?, )")


def assert_error_line(result: Result, code: int, *fragments: str) -> str:
    """Exit `code`, exactly one line on stderr starting `error: `, naming every fragment, no traceback.

    Progress lines (stderr is not a terminal here) may come before it: a run that fails halfway has shown
    how far it got."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


def no_final_outputs(out: Path) -> bool:
    """Nothing under `out` could be taken for a finished (or partial) conversion."""
    if not out.exists():
        return True
    names = {p.name for p in out.iterdir()}
    return not any(n.startswith("rank") or n in ("manifest.json", "config.json") for n in names)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


def flip_byte(path: Path, offset: int = -3) -> None:
    """Change one byte, keeping the size and the modification time: only a checksum tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextlib.contextmanager
def no_hang(seconds: int = 60) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading waits for a writer forever)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


TP2_PP3: dict[str, Any] = {"tp_size": 2, "pp_size": 3}  # 3 layers: each stage's 2 ranks finish at a different time


def interrupted(src: Path, out: Path, monkeypatch: Any, at_tensor: int = 50) -> None:
    """Convert tp2/pp3 until the `at_tensor`-th source tensor, then raise KeyboardInterrupt there (a Ctrl-C).

    The tiny model has 96 source tensors in file order; stage 0's ranks need nothing past the 33rd, stage 1's
    past the 64th: at 50, rank0 and rank1 are complete.
    """
    import pytest

    import moe_convert.execute
    from moe_convert import convert

    real = moe_convert.execute._scatter
    calls = 0

    def scatter(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == at_tensor:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(moe_convert.execute, "_scatter", scatter)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, **TP2_PP3)
    monkeypatch.setattr(moe_convert.execute, "_scatter", real)
