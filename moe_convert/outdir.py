"""The output directory is ours only through what we create.

- The --output_dir argument: an empty string (an unset `$OUT`) or a path that is the current directory in
  disguise (`a/..`) is refused; `.` must be written as `.`.
- It must not be, contain or lie inside a directory the source is read from. Compared by device and inode
  up the parents, not by path: a bind mount or another alias of the model dir is still the model dir.
- One writer at a time: an advisory lock (flock) on `.moe-convert.lock` in the directory, held for the
  whole run; a second run is refused naming the holder's pid. A finished run removes the lock file.
- Nothing is deleted that the earlier run's manifest or journal does not list (exact names, never globs),
  and no file we would write may already exist unless it is provably ours: a foreign `config.json`, a
  `rank0.safetensors` nobody listed, a directory under one of our names are refused, `--force` or not.
  Deletions go through a descriptor of the directory; links are removed, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .bounded_json import read_json_object
from .errors import OutputError, UsageError
from .manifest import MANIFEST_FILE
from .resume import CONFIG_FILE, JOURNAL_FILE, EarlierRun, ResumeState
from .units import human_bytes

LOCK_FILE = ".moe-convert.lock"

Key = tuple[int, int]  # (st_dev, st_ino): what a directory is, whatever path leads to it


# ---------------------------------------------------------------- the argument


def output_arg_problem(output_dir: str | os.PathLike[str]) -> str | None:
    """Why an --output_dir value is refused before anything is looked at, or None."""
    text = os.fspath(output_dir)
    if not text.strip():
        return "--output_dir is empty (an unset variable?); name a directory, or '.' for the current one"
    if os.path.normpath(text) == "." and text not in (".", "./"):
        return f"--output_dir {text!r} is the current directory in disguise; pass '.' if you mean it"
    if os.path.abspath(text) == "/":
        return "--output_dir / is the root of the file system; choose a directory for the output"
    return None


def check_output_arg(output_dir: str | os.PathLike[str]) -> Path:
    problem = output_arg_problem(output_dir)
    if problem:
        raise UsageError(problem)
    return Path(output_dir)


# ---------------------------------------------------------------- overlap, by inode


def dir_key(path: str | os.PathLike[str]) -> Key:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ancestry(path: Path) -> list[Key]:
    """Keys of the deepest existing directory at or above `path`, then of each parent up to the root."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    p = os.path.realpath(p)
    keys = [dir_key(p)]
    while p != os.path.dirname(p):
        p = os.path.dirname(p)
        keys.append(dir_key(p))
    return keys


def overlap_problem(out: Path, model_dir: Path, source_dirs: Sequence[Path]) -> str | None:
    """Why `out` overlaps the source (is, contains or lies inside a directory it is read from), or None."""
    read_from = {dir_key(d) for d in (model_dir, *source_dirs)}
    out_keys = ancestry(out)
    inside = any(k in read_from for k in out_keys)
    contains = os.path.exists(out) and any(out_keys[0] in ancestry(d) for d in (model_dir, *source_dirs))
    if inside or contains:
        return f"--output_dir {out} overlaps --model_dir {model_dir}; choose a directory outside the model"
    return None


def check_disjoint(outs: Sequence[Path], labels: Sequence[str]) -> None:
    """A batch's output dirs must not be one another or nest: one would hold files the other does not list."""
    real = [Path(os.path.realpath(o)) for o in outs]
    problems = []
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            a, b = real[i], real[j]
            same = a == b or (a.exists() and b.exists() and dir_key(a) == dir_key(b))
            if same or a.is_relative_to(b) or b.is_relative_to(a):
                inner, outer = (i, j) if a.is_relative_to(b) else (j, i)
                problems.append(
                    f"{labels[inner]} writes into {outs[inner]}, "
                    + ("the same directory as" if same else "inside the directory of")
                    + f" {labels[outer]} ({outs[outer]})"
                )
    if problems:
        raise UsageError(
            "the batch's output directories overlap: " + "; ".join(problems) + "; give each mapping its own subdir"
        )


# ---------------------------------------------------------------- creating and locking


class OutputLock:
    """An exclusive flock on LOCK_FILE in an existing output dir, and a descriptor of the directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fd = self._acquire()
        except BaseException:
            os.close(self.dir_fd)
            raise

    def _acquire(self) -> int:
        for _ in range(5):
            fd = self._open()
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutputError(
                        f"--output_dir {self.out} is being written by another moe-convert run "
                        f"(pid {_holder(fd)}); wait for it to finish, or choose another --output_dir"
                    ) from None
                # A run that finished meanwhile removed the file we locked: lock the one at the path now.
                if _same_file(fd, self.dir_fd, LOCK_FILE):
                    self._write_pid(fd)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OutputError(f"--output_dir {self.out}: could not lock {LOCK_FILE}; other runs keep replacing it")

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_FILE, flags, 0o644, dir_fd=self.dir_fd)
        except OSError as e:
            what = "is a symlink" if e.errno == errno.ELOOP else f"cannot be opened: {e.strerror or e}"
            raise OutputError(f"--output_dir {self.out}: {LOCK_FILE} {what}; remove it") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"--output_dir {self.out}: {LOCK_FILE} is not a regular file; remove it")
        return fd

    def _write_pid(self, fd: int) -> None:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise OutputError(f"--output_dir {self.out}: cannot write {LOCK_FILE}: {e.strerror or e}") from e

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go."""
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.dir_fd, LOCK_FILE):
                os.unlink(LOCK_FILE, dir_fd=self.dir_fd)
        os.close(self.fd)
        os.close(self.dir_fd)


def _same_file(fd: int, dir_fd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def writer_pid(out: Path) -> str | None:
    """The pid of a conversion writing into `out` right now (it holds the lock), or None."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)  # also drops the shared lock


class OutputDirs:
    """Create and lock the output dirs of one run; on a refusal before `commit`, remove what was created.

    Used as a context manager around the whole run: the locks are held (and the lock files removed at the
    end) whatever happens.
    """

    def __init__(self, outs: Sequence[Path]) -> None:
        self.outs = list(outs)
        self.created: list[Path] = []
        self.locks: dict[Path, OutputLock] = {}
        self.committed = False

    def __enter__(self) -> OutputDirs:
        try:
            for out in self.outs:
                self._create(out)
                _check_writable(out)
                self.locks[out] = OutputLock(out)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def commit(self) -> None:
        """From here on the directories hold our files: they stay, whatever happens next."""
        self.committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for lock in self.locks.values():
            lock.release()
        if not self.committed:
            for d in sorted(self.created, key=lambda d: len(d.absolute().parts), reverse=True):  # only if empty
                with contextlib.suppress(OSError):
                    d.rmdir()

    def _create(self, out: Path) -> None:
        if out.exists() and not out.is_dir():
            raise OutputError(f"--output_dir {out} is a file; choose a directory")
        missing = [d for d in (out, *out.parents) if not d.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--output_dir {out}: cannot create: {e.strerror or e}") from e
        self.created += missing


def _check_writable(directory: Path) -> None:
    """Create and remove a file: os.access says yes to root even where writes fail (immutable, root_squash)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-convert-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--output_dir {directory} is not writable: {e.strerror or e}") from e


# ---------------------------------------------------------------- what may be deleted


def entries(out: Path) -> list[str]:
    """The names in an output dir, our lock file aside."""
    return sorted(n for n in os.listdir(out) if n != LOCK_FILE)


def refuse_busy(out: Path, *, force: bool, resume: bool) -> None:
    """The refusals that need no lock (a file, or a non-empty dir without --force or --resume), before anything
    is created anywhere; `cleanup` repeats them under the lock."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output_dir {out} is a file; choose a directory")
    if not (force or resume) and out.is_dir() and entries(out):
        raise OutputError(_busy(out))


def _busy(out: Path) -> str:
    if os.path.lexists(out / JOURNAL_FILE):
        return (
            f"--output_dir {out} holds an interrupted conversion; pass --resume to continue it "
            "or --force to overwrite it"
        )
    return f"--output_dir {out} exists and is not empty; pass --force to overwrite it"


def cleanup(
    out: Path, writes: frozenset[str], earlier: EarlierRun | None, state: ResumeState | None, *, force: bool
) -> tuple[str, ...]:
    """The names an earlier run of ours left that this run deletes (manifest first), after refusing
    anything in the way of the names it `writes` that is not provably ours."""
    present = set(entries(out))
    if not present:
        return ()
    if state is None and not force:
        raise OutputError(_busy(out))
    owned = earlier.owned if earlier else frozenset({JOURNAL_FILE + ".partial"})
    if CONFIG_FILE in present and CONFIG_FILE not in owned and _is_trtllm_config(out / CONFIG_FILE):
        owned |= {CONFIG_FILE}  # a converter's output (--save_config_only), not a model's config.json
    kept = {r.file for r in state.kept} if state else set()
    foreign = sorted((present & writes) - owned - kept)
    if CONFIG_FILE in foreign:
        raise OutputError(
            f"--output_dir {out} holds a config.json that moe-convert did not write (a model?); "
            "--force will not delete it: choose another --output_dir"
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"--output_dir {out} holds {shown}, which no moe-convert manifest or journal there lists; "
            "moe-convert replaces only files it wrote: move them away or choose another --output_dir"
        )
    doomed = (present & owned) - kept - {JOURNAL_FILE}
    if state is not None and not state.redo:
        doomed = {n for n in doomed if n.endswith(".partial")}  # complete and intact: only debris goes
    for name in sorted(doomed):
        if stat.S_ISDIR(os.lstat(out / name).st_mode):
            raise OutputError(
                f"--output_dir {out}: {name} is a directory, where moe-convert only ever writes a file; "
                "remove it or choose another --output_dir"
            )
    # The manifest goes first: a directory without one is never taken for a finished conversion.
    order = {MANIFEST_FILE: 0, CONFIG_FILE: 1}
    return tuple(sorted(doomed, key=lambda n: (order.get(n, 2), n)))


def _is_trtllm_config(path: Path) -> bool:
    """A TensorRT-LLM config.json (what a converter writes: `architecture` and `mapping`), never a model's."""
    try:
        config = read_json_object(path, OutputError, limit=1 << 20, follow_symlinks=False)
    except OutputError:
        return False
    return isinstance(config.get("architecture"), str) and isinstance(config.get("mapping"), dict)


# ---------------------------------------------------------------- space


def check_space(outs: Sequence[Path], needed: Sequence[int]) -> None:
    """Each output dir's bytes must fit, and so must those of several dirs on one file system together."""
    by_device: dict[int, tuple[Path, int, int]] = {}
    for out, n in zip(outs, needed, strict=True):
        free = shutil.disk_usage(out).free
        if free < n:
            raise OutputError(
                f"--output_dir {out}: needs {human_bytes(n)} but only {human_bytes(free)} is free; "
                "free space or choose another directory"
            )
        dev = os.stat(out).st_dev
        first, total, count = by_device.get(dev, (out, 0, 0))
        by_device[dev] = (first, total + n, count + 1)
    for first, total, count in by_device.values():
        free = shutil.disk_usage(first).free
        if count > 1 and free < total:
            raise OutputError(
                f"--output_dir {first.parent}: the batch needs {human_bytes(total)} but only {human_bytes(free)} "
                "is free; free space, convert fewer mappings at once, or choose another directory"
            )
