"""Resuming an interrupted conversion: a small journal in the output dir, and the checks before reusing files.

Every conversion writes `.moe-convert-journal.json` before its first rank file: the run's identity (source
files with sizes and modification times, mapping, options, resolved dtype, tool version) and, as each rank
file is committed, its name, size and sha256. The journal is replaced atomically at each step and removed
once manifest.json is written. `--resume` keeps the journal's rank files whose size and sha256 still
match (re-hashed) and redoes the rest; rank files depend only on the plan, so the result is byte-identical
to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .execute import RankResult
from .plan import Plan
from .source import INDEX_FILE, SourceCheckpoint
from .writer import PARTIAL_SUFFIX, layout_rank_file, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_FILE = ".moe-convert-journal.json"
JOURNAL_FORMAT = "moe-convert-journal"
JOURNAL_VERSION = 1
_MANIFEST_FILE = "manifest.json"  # manifest.MANIFEST_FILE; not imported, manifest imports execute
_CONFIG_FILE = "config.json"
_HASH_BLOCK = 1024 * 1024  # small enough to stay in the CPU cache between read and hash
_OPTION_FLAGS = {
    "dtype": "--dtype",
    "use_parallel_embedding": "--use_parallel_embedding",
    "embedding_sharding_dim": "--embedding_sharding_dim",
}


def run_identity(source: SourceCheckpoint, record: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """What must be equal for a resumed run to write the same bytes (workers and chunk size need not be)."""
    files = [source.model_dir / _CONFIG_FILE]
    if (source.model_dir / INDEX_FILE).is_file():
        files.append(source.model_dir / INDEX_FILE)
    files += list(source.files)
    stats = []
    for f in files:
        st = f.stat()
        stats.append({"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {
        "tool_version": __version__,
        "source": {
            "path": record.get("path"),
            "hub_id": record.get("hub_id"),
            "revision": record.get("revision"),
            "files": stats,
        },
        "mapping": plan.mapping.as_dict(),
        "options": plan.options.as_dict(),
        "dtype": plan.dtype,
    }


def identity_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between the interrupted run's identity and this run's."""
    diffs = []
    m0, m1 = before.get("mapping") or {}, now["mapping"]
    for key in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size"):
        if m0.get(key) != m1[key]:
            diffs.append(f"--{key} was {m0.get(key)}, now {m1[key]}")
    o0, o1 = before.get("options") or {}, now["options"]
    for key, flag in _OPTION_FLAGS.items():
        if o0.get(key) != o1[key]:
            diffs.append(f"{flag} was {o0.get(key)!r}, now {o1[key]!r}")
    if not diffs and before.get("dtype") != now["dtype"]:
        diffs.append(f"the output dtype was {before.get('dtype')}, now {now['dtype']} (config.json changed?)")
    s0, s1 = before.get("source") or {}, now["source"]
    for key, what in (("path", "source path"), ("hub_id", "hub id"), ("revision", "revision")):
        if s0.get(key) != s1[key]:
            diffs.append(f"{what} was {s0.get(key)}, now {s1[key]}")
    files0 = {f["name"]: f for f in s0.get("files") or [] if isinstance(f, dict) and isinstance(f.get("name"), str)}
    files1 = {f["name"]: f for f in s1["files"]}
    for name in sorted(files0.keys() - files1.keys()):
        diffs.append(f"source file {name} was read before but is not part of the source now")
    # A manifest records the shards only (no config.json, no mtimes); a journal records every file read.
    from_journal = any("mtime_ns" in f for f in files0.values())
    for name in sorted(files1.keys() - files0.keys()) if from_journal else []:
        diffs.append(f"source file {name} is new")
    for name in sorted(files0.keys() & files1.keys()):
        f0, f1 = files0[name], files1[name]
        if f0.get("bytes") != f1["bytes"]:
            diffs.append(f"source file {name} was {f0.get('bytes')} bytes, now {f1['bytes']}")
        elif "mtime_ns" in f0 and f0["mtime_ns"] != f1["mtime_ns"]:
            diffs.append(f"source file {name} was modified (at {_when(f0['mtime_ns'])}, now {_when(f1['mtime_ns'])})")
    if not diffs and before.get("tool_version") != now["tool_version"]:
        diffs.append(f"moe-convert was version {before.get('tool_version')}, now {now['tool_version']}")
    return diffs


def _when(ns: object) -> str:
    if not isinstance(ns, int):
        return repr(ns)
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


@dataclass(frozen=True)
class ResumeState:
    """What an earlier run left that this one keeps."""

    kept: tuple[RankResult, ...]  # complete rank files, in rank order
    redo: frozenset[int]  # ranks to write
    finished: bool  # the earlier run wrote manifest.json

    @property
    def kept_bytes(self) -> int:
        return sum(r.bytes for r in self.kept)


def resume_state(output_dir: Path, plan: Plan, identity: dict[str, Any], *, force: bool) -> ResumeState | None:
    """Decide what to keep in `output_dir`; None means start from scratch (an empty or absent dir, or
    --force when the dir cannot be resumed). Raises UsageError naming what differs otherwise."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    try:
        earlier = _earlier_run(output_dir)
    except UsageError as e:
        if force:
            log.warning("%s; --force given: starting over", e)
            return None
        raise UsageError(f"{e}; add --force to start over") from e
    diffs = identity_differences(earlier.identity, identity)
    if diffs:
        problem = f"cannot --resume into {output_dir}: {'; '.join(diffs)}"
        if force:
            log.warning("%s; --force given: starting over", problem)
            return None
        raise UsageError(
            f"{problem}. Rerun with the interrupted run's options and source, or add --force to start over"
        )
    planned = {r.file: (r.coords.rank, layout_rank_file(r)) for r in plan.ranks}
    # Cheap checks first: recorded, present, the planned size, the planned header.
    candidates = []
    for file, (_rank, layout) in planned.items():
        done, path = earlier.completed.get(file), output_dir / file
        if done is None or not path.is_file():
            continue
        if done.bytes != layout.size or path.stat().st_size != layout.size:
            log.info("redoing %s: %d bytes, %d planned", path, path.stat().st_size, layout.size)
            continue
        with open(path, "rb") as f:
            if f.read(len(layout.header)) != layout.header:
                log.info("redoing %s: its header differs from the plan", path)
                continue
        candidates.append(done)
    if earlier.finished and len(candidates) == len(planned):
        # Finished and intact: nothing to do. Checking every checksum is `moe-convert verify`'s job.
        return ResumeState(tuple(candidates), frozenset(), finished=True)
    kept = []
    for done in candidates:  # re-hashed: these files end up in the new manifest unread
        if _sha256(output_dir / done.file) != done.sha256:
            log.info("redoing %s: its sha256 differs from the one recorded", output_dir / done.file)
            continue
        kept.append(done)
    redo = frozenset(rank for file, (rank, _) in planned.items() if file not in {k.file for k in kept})
    return ResumeState(tuple(kept), redo, earlier.finished)


@dataclass(frozen=True)
class _EarlierRun:
    identity: dict[str, Any]
    completed: dict[str, RankResult]
    finished: bool


def _earlier_run(output_dir: Path) -> _EarlierRun:
    manifest_path, journal_path = output_dir / _MANIFEST_FILE, output_dir / JOURNAL_FILE
    if manifest_path.is_file():
        m = _read_json(manifest_path)
        if m.get("format") != "moe-convert-manifest":
            raise UsageError(f"cannot --resume into {output_dir}: {manifest_path} is not a moe-convert manifest")
        identity = {
            "tool_version": (m.get("tool") or {}).get("version"),
            "source": m.get("source") or {},
            "mapping": m.get("mapping") or {},
            "options": m.get("options") or {},
            "dtype": m.get("dtype"),
        }
        return _EarlierRun(identity, _results(m.get("ranks"), manifest_path), finished=True)
    if journal_path.is_file():
        j = _read_json(journal_path)
        if j.get("format") != JOURNAL_FORMAT or j.get("version") != JOURNAL_VERSION:
            raise UsageError(f"cannot --resume into {output_dir}: {journal_path} is not a journal this tool reads")
        return _EarlierRun(j.get("identity") or {}, _results(j.get("completed"), journal_path), finished=False)
    raise UsageError(
        f"cannot --resume into {output_dir}: it has neither {JOURNAL_FILE} nor {_MANIFEST_FILE}, so nothing "
        "says which files are complete"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot --resume: {path} is unreadable ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"cannot --resume: {path} is not a JSON object")
    return data


def _results(entries: object, where: Path) -> dict[str, RankResult]:
    out = {}
    for e in entries if isinstance(entries, list) else []:
        if (
            isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str)
        ):
            out[e["file"]] = RankResult(e["file"], e["bytes"], e["sha256"])
        else:
            log.debug("%s: ignoring a rank entry without file, bytes and sha256: %r", where, e)
    return out


def _sha256(path: Path) -> str:
    sha, buf = hashlib.sha256(), bytearray(_HASH_BLOCK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(memoryview(buf)[:n])
    return sha.hexdigest()


class Journal:
    """The journal of one output dir; `record` is called as each rank file is committed."""

    def __init__(self, output_dir: Path, identity: dict[str, Any], state: ResumeState | None) -> None:
        self.path = output_dir / JOURNAL_FILE
        self.identity = identity
        self.completed = {r.file: r for r in (state.kept if state else ())}

    def begin(self, state: ResumeState | None) -> None:
        """Write the journal first, then clear what will be redone, so the dir is resumable at every moment."""
        self._write()
        out = self.path.parent
        for partial in out.glob(f"*{PARTIAL_SUFFIX}"):  # left by a killed run
            if partial.name.startswith(("rank", _CONFIG_FILE, _MANIFEST_FILE, JOURNAL_FILE)):
                partial.unlink(missing_ok=True)
        if state is None or not state.redo:
            return
        # A finished run's manifest goes first: a dir without one is never taken for a finished conversion.
        for name in (_MANIFEST_FILE, _CONFIG_FILE):
            (out / name).unlink(missing_ok=True)
        keep = {r.file for r in state.kept}
        for old in out.glob("rank*.safetensors"):
            if old.name not in keep:
                old.unlink()

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
            "completed": [
                {"file": r.file, "bytes": r.bytes, "sha256": r.sha256}
                for r in sorted(self.completed.values(), key=lambda r: rank_number(r.file))
            ],
        }
        write_json_atomic(self.path, data)
