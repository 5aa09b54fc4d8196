"""Resuming an interrupted conversion: a small journal in the output dir, and the checks before reusing files.

Every conversion writes `.moe-convert-journal.json` before its first rank file: the run's identity (see
identity.py: the source's files, times and content fingerprint, the mapping, the options, the resolved
dtype, the tool version), the names it is about to delete (an earlier run's files, so they stay provably
ours if the clearing is interrupted) and, as each rank file is committed, its name, size and sha256. The
journal is replaced atomically at each step and removed once manifest.json is written; a finished
output's manifest records the same identity and sha256s.

`--resume` trusts neither: every rank file it keeps is re-hashed against its recorded sha256 (also in a
finished output), and the source's identity must equal the recorded one. Rank files depend only on the
plan, so the result is byte-identical to an uninterrupted run. A journal or manifest that is not well
formed stops the run with one line: then nothing proves which files in the directory are ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bounded_json import read_json_object
from .errors import MoeConvertError, OutputError, UsageError
from .execute import RankResult
from .fields import Malformed, integer, lst, obj, sha256_hex, text
from .files import open_regular
from .identity import identity_differences
from .limits import MAX_WORLD_SIZE
from .manifest import MANIFEST_FILE, RANK_FILE, parse_mapping, parse_options, rank_file_name, read_manifest
from .plan import Plan
from .writer import PARTIAL_SUFFIX, FileLayout, layout_rank_file, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_FILE = ".moe-convert-journal.json"
JOURNAL_FORMAT = "moe-convert-journal"
JOURNAL_VERSION = 2
CONFIG_FILE = "config.json"
_MAX_JOURNAL_BYTES = 64 * 1024 * 1024
_HASH_BLOCK = 1024 * 1024  # small enough to stay in the CPU cache between read and hash
_MTIME_MIN = -(2**63)


def final_names(world_size: int, listed: Iterable[str] = ()) -> frozenset[str]:
    """Every name a run of `world_size` ranks writes (finals and their temporaries), plus `listed`."""
    finals = {MANIFEST_FILE, CONFIG_FILE, *listed, *(f"rank{i}.safetensors" for i in range(world_size))}
    return frozenset(finals | {n + PARTIAL_SUFFIX for n in finals} | {JOURNAL_FILE, JOURNAL_FILE + PARTIAL_SUFFIX})


@dataclass(frozen=True)
class EarlierRun:
    """What an earlier run left in an output dir, from its manifest (finished) or else its journal."""

    path: Path  # the manifest or journal it was read from
    identity: dict[str, Any] | None  # None: an older manifest that records none (cannot be resumed)
    completed: dict[str, RankResult]
    finished: bool
    owned: frozenset[str]  # every name in the directory that run created or may have created


def earlier_run(output_dir: Path) -> EarlierRun | None:
    """The earlier run in `output_dir`, or None if it has neither manifest nor journal.

    Raises OutputError (one line) when one is there but is not ours or not well formed.
    """
    manifest, journal = output_dir / MANIFEST_FILE, output_dir / JOURNAL_FILE
    try:
        if os.path.lexists(manifest):
            return _from_manifest(output_dir, manifest)
        if os.path.lexists(journal):
            return _from_journal(journal)
    except (Malformed, MoeConvertError) as e:
        what = str(e).removeprefix(f"{manifest}: ").removeprefix(f"{journal}: ")
        where = manifest if os.path.lexists(manifest) else journal
        raise OutputError(
            f"--output_dir {output_dir}: {where.name}: {what}; so nothing proves which files there moe-convert "
            "wrote, and it changes none of them: move them away or choose another --output_dir"
        ) from e
    return None


def _from_manifest(output_dir: Path, path: Path) -> EarlierRun:
    m = read_manifest(output_dir, accept_older=True)
    completed = {}
    for i, e in enumerate(lst(m.get("ranks"), "ranks", max_len=MAX_WORLD_SIZE)):
        r = obj(e, f"ranks[{i}]")
        file = rank_file_name(r.get("file"), f"ranks[{i}].file")
        if r.get("sha256") is not None:
            completed[file] = RankResult(
                file, integer(r.get("bytes"), f"ranks[{i}].bytes"), sha256_hex(r.get("sha256"), f"ranks[{i}].sha256")
            )
    world = parse_mapping(m.get("mapping")).world_size
    identity = None
    if m.get("version") == 2:
        tool = obj(m.get("tool"), "tool")
        identity = parse_identity(
            {k: m.get(k) for k in ("source", "mapping", "options", "dtype")} | {"tool_version": tool.get("version")},
            "the manifest",
        )
    return EarlierRun(path, identity, completed, finished=True, owned=final_names(world, completed))


def _from_journal(path: Path) -> EarlierRun:
    j = read_json_object(path, OutputError, limit=_MAX_JOURNAL_BYTES, follow_symlinks=False)
    if j.get("format") != JOURNAL_FORMAT:
        raise Malformed(f"not a moe-convert journal (format is not {JOURNAL_FORMAT!r})")
    if j.get("version") != JOURNAL_VERSION:
        raise Malformed(f"journal version {j.get('version')!r}; this tool reads {JOURNAL_VERSION}")
    identity = parse_identity(j.get("identity"), "identity")
    completed = {}
    for i, e in enumerate(lst(j.get("completed"), "completed", max_len=MAX_WORLD_SIZE)):
        r = obj(e, f"completed[{i}]")
        file = rank_file_name(r.get("file"), f"completed[{i}].file")
        completed[file] = RankResult(
            file,
            integer(r.get("bytes"), f"completed[{i}].bytes"),
            sha256_hex(r.get("sha256"), f"completed[{i}].sha256"),
        )
    world = identity["mapping"]["world_size"]
    leftovers = [_our_name(v, f"leftovers[{i}]") for i, v in enumerate(lst(j.get("leftovers"), "leftovers"))]
    return EarlierRun(path, identity, completed, finished=False, owned=final_names(world, [*completed, *leftovers]))


def _our_name(v: object, what: str) -> str:
    name = text(v, what)
    base = name.removesuffix(PARTIAL_SUFFIX)
    if base not in (MANIFEST_FILE, CONFIG_FILE) and not RANK_FILE.fullmatch(base):
        raise Malformed(f"{what} {name!r} is not a name moe-convert writes")
    return name


def parse_identity(v: object, what: str) -> dict[str, Any]:
    """A run identity read from disk, every field checked (identity.py compares them)."""
    i = obj(v, what)
    src = obj(i.get("source"), f"{what}.source")
    ident = obj(src.get("identity"), f"{what}.source.identity")
    files = []
    for k, f in enumerate(lst(ident.get("files"), f"{what}.source.identity.files", max_len=1_000_000)):
        at = f"{what}.source.identity.files[{k}]"
        f = obj(f, at)
        files.append(
            {
                "name": text(f.get("name"), f"{at}.name"),
                "bytes": integer(f.get("bytes"), f"{at}.bytes"),
                "mtime_ns": integer(f.get("mtime_ns"), f"{at}.mtime_ns", lo=_MTIME_MIN),
            }
        )
    optional = {}
    for key in ("path", "hub_id", "revision"):
        value = src.get(key)
        optional[key] = None if value is None else text(value, f"{what}.source.{key}")
    return {
        "tool_version": text(i.get("tool_version"), f"{what}.tool_version"),
        "source": {
            **optional,
            "identity": {
                "files": files,
                "fingerprint": sha256_hex(ident.get("fingerprint"), f"{what}.source.identity.fingerprint"),
            },
        },
        "mapping": parse_mapping(i.get("mapping"), f"{what}.mapping").as_dict(),
        "options": parse_options(i.get("options"), f"{what}.options").as_dict(),
        "dtype": text(i.get("dtype"), f"{what}.dtype"),
    }


@dataclass(frozen=True)
class ResumeState:
    """What an earlier run left that this one keeps."""

    kept: tuple[RankResult, ...]  # complete rank files, in rank order
    redo: frozenset[int]  # ranks to write
    finished: bool  # the earlier run wrote manifest.json

    @property
    def kept_bytes(self) -> int:
        return sum(r.bytes for r in self.kept)


def resume_state(
    output_dir: Path,
    plan: Plan,
    identity: dict[str, Any],
    earlier: EarlierRun | None,
    *,
    force: bool,
    empty: bool,
) -> ResumeState | None:
    """Decide what to keep in `output_dir`; None means start from scratch (an empty or absent dir, or
    --force when the dir cannot be resumed). Raises UsageError naming what differs otherwise."""
    if earlier is None:
        if empty:
            return None
        diffs = [f"it has neither {JOURNAL_FILE} nor {MANIFEST_FILE}, so nothing says which files are complete"]
    elif earlier.identity is None:
        diffs = [f"{earlier.path.name} was written by an older moe-convert and records no source identity"]
    else:
        diffs = identity_differences(earlier.identity, identity)
    if diffs:
        problem = f"cannot --resume into {output_dir}: {'; '.join(diffs)}"
        if force:
            log.warning("%s; --force given: starting over", problem)
            return None
        hint = "" if earlier is None else ". Rerun with the interrupted run's options and source, or"
        raise UsageError(f"{problem}{hint or ';'} add --force to start over")
    assert earlier is not None
    kept = []
    for r in plan.ranks:
        done = earlier.completed.get(r.file)
        if done is not None and _still_complete(output_dir / r.file, layout_rank_file(r), done):
            kept.append(done)
    files = {k.file for k in kept}
    redo = frozenset(r.coords.rank for r in plan.ranks if r.file not in files)
    return ResumeState(tuple(kept), redo, earlier.finished)


def _still_complete(path: Path, layout: FileLayout, done: RankResult) -> bool:
    """The recorded file is there, a regular file, the planned size and header, and its sha256 is the recorded
    one (re-hashed: its bytes end up in the new manifest unread)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        log.info("redoing %s: it is not a regular file", path)
        return False
    if done.bytes != layout.size or st.st_size != layout.size:
        log.info("redoing %s: %d bytes, %d planned", path, st.st_size, layout.size)
        return False
    sha, buf = hashlib.sha256(), bytearray(_HASH_BLOCK)
    with open_regular(path, OutputError, follow_symlinks=False) as (fd, _):
        head = os.pread(fd, len(layout.header), 0)
        if head != layout.header:
            log.info("redoing %s: its header differs from the plan", path)
            return False
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            sha.update(memoryview(buf)[:n])
            offset += n
    if sha.hexdigest() != done.sha256:
        log.info("redoing %s: its sha256 differs from the one recorded", path)
        return False
    return True


def remove_ours(dir_fd: int, output_dir: Path, names: Iterable[str]) -> None:
    """Delete these names of the output dir (relative to its descriptor; links are removed, never followed)."""
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputError(f"--output_dir {output_dir}: cannot remove {name}: {e.strerror or e}") from e


class Journal:
    """The journal of one output dir; `record` is called as each rank file is committed."""

    def __init__(
        self, output_dir: Path, identity: dict[str, Any], state: ResumeState | None, leftovers: tuple[str, ...]
    ) -> None:
        self.path = output_dir / JOURNAL_FILE
        self.identity = identity
        self.leftovers = leftovers
        self.completed = {r.file: r for r in (state.kept if state else ())}

    def begin(self, dir_fd: int) -> None:
        """Write the journal first, then delete what it lists as leftovers, so the dir is resumable (and
        every file in it provably ours) at every moment. Only the journal's own temporary file (left by a
        run killed while writing it) goes before: the new journal is written through that name."""
        temporary = self.path.name + PARTIAL_SUFFIX
        remove_ours(dir_fd, self.path.parent, [n for n in self.leftovers if n == temporary])
        self._write()
        remove_ours(dir_fd, self.path.parent, [n for n in self.leftovers if n != temporary])

    def record(self, result: RankResult) -> None:
        self.completed[result.file] = result
        self._write()

    def finish(self) -> None:
        """The manifest is written: the journal has nothing left to say."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _write(self) -> None:
        def rank_number(file: str) -> tuple[int, str]:
            digits = "".join(c for c in file if c.isdigit())
            return (int(digits) if digits else -1, file)

        data = {
            "format": JOURNAL_FORMAT,
            "version": JOURNAL_VERSION,
            "identity": self.identity,
            "leftovers": list(self.leftovers),
            "completed": [
                {"file": r.file, "bytes": r.bytes, "sha256": r.sha256}
                for r in sorted(self.completed.values(), key=lambda r: rank_number(r.file))
            ],
        }
        write_json_atomic(self.path, data)
