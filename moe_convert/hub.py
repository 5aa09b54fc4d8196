"""Hub repo ids as --model_dir: resolved through huggingface_hub's cache, downloading only what we read.

huggingface_hub itself honours HF_HOME / HF_HUB_CACHE (where the cache is), HF_HUB_OFFLINE (no network:
resolve from the cache only), HF_TOKEN (gated and private repos) and HF_ENDPOINT; we pass none of them.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .bounded_json import read_json
from .errors import CheckpointError, ConfigError, UsageError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# `owner/name`, the shape of a Hugging Face model repo id (huggingface_hub validates the details).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Git ref names as the hub uses them (`main`, `v1.0`, `refs/pr/1`, a commit hash); no `..`, no leading `/`.
_REVISION = re.compile(r"[A-Za-z0-9][\w.\-/]{0,254}")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a --model_dir argument points: a local directory, and the hub repo it came from if any."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None  # the resolved commit hash, for a hub id


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def resolve_model_dir(
    model_dir_or_id: str | os.PathLike[str],
    revision: str | None = None,
    *,
    weights: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ResolvedModel:
    """A local path that exists wins; otherwise an `owner/name` string is fetched from the hub cache.

    Args:
        model_dir_or_id: a checkpoint directory, or a hub repo id such as `mistralai/Mixtral-8x7B-v0.1`.
        revision: branch, tag or commit of a hub repo (default: main). Refused for a local path.
        weights: also fetch the safetensors shards; False fetches config.json and the index only
            (enough for a dry run).
        cache_dir: the hub cache; default is huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub).
    """
    path = Path(model_dir_or_id)
    text = os.fspath(model_dir_or_id)
    if is_cache_folder(path):
        return _cache_folder_snapshot(path, revision)
    if path.exists() or not isinstance(model_dir_or_id, str) or not looks_like_repo_id(text):
        if revision is not None:
            raise UsageError(
                f"--revision {revision!r} applies to hub repo ids, but --model_dir {text} is a local path; "
                "drop --revision or pass an id like owner/name"
            )
        return ResolvedModel(path)
    if revision is not None:
        _check_revision(revision)
    cache = None if cache_dir is None else os.fspath(cache_dir)
    snapshot = _download(text, revision, [CONFIG_FILE, INDEX_FILE], cache)
    # Pin the commit just resolved, so the shards come from the same revision even if `main` moves.
    commit = snapshot.name
    if weights:
        snapshot = _download(text, commit, [CONFIG_FILE, INDEX_FILE, *_weight_patterns(snapshot)], cache)
    log.info("%s@%s: %s", text, commit[:12], snapshot)
    return ResolvedModel(snapshot, text, commit)


def is_cache_folder(path: Path) -> bool:
    """A repo folder of the hub cache (`models--org--name`), which holds snapshots, not a checkpoint."""
    return path.name.startswith("models--") and (path / "snapshots").is_dir() and not (path / CONFIG_FILE).exists()


def _cache_folder_snapshot(folder: Path, revision: str | None) -> ResolvedModel:
    """The snapshot `refs/main` (or `refs/<revision>`, or the commit `revision`) of a hub cache repo folder."""
    hub_id = folder.name.removeprefix("models--").replace("--", "/")
    ref = revision or "main"
    if _COMMIT.fullmatch(ref):
        commit: str | None = ref
    else:
        commit = None if ".." in Path(ref).parts or ref.startswith("/") else _read_ref(folder / "refs" / ref)
    snapshot = folder / "snapshots" / commit if commit else None
    if commit and snapshot and (snapshot / CONFIG_FILE).is_file() and _inside_folder(folder, snapshot):
        log.info("%s is the hub cache of %s: using its snapshot %s (%s)", folder, hub_id, commit[:12], ref)
        return ResolvedModel(snapshot, hub_id, commit)
    found = sorted(p.name for p in (folder / "snapshots").iterdir() if _COMMIT.fullmatch(p.name))
    where = f"snapshots: {' '.join(c[:12] for c in found)}" if found else "no snapshots"
    raise ConfigError(
        f"--model_dir {folder} is a Hugging Face cache folder whose refs/{ref} names no usable snapshot ({where}); "
        f"pass the hub id {hub_id} (with HF_HUB_CACHE set to the folder above it) or one snapshot dir in it, "
        "snapshots/<commit>"
    )


def _read_ref(path: Path) -> str | None:
    """A ref file holds one commit hash; anything else (a link out of the cache, garbage) is no ref."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, encoding="ascii") as f:
            text = f.read(100).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _COMMIT.fullmatch(text) else None


def _inside_folder(folder: Path, snapshot: Path) -> bool:
    try:
        return snapshot.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def _check_revision(revision: str) -> None:
    """A branch, tag or commit; never a path (the hub cache resolves revisions through files under refs/)."""
    parts = revision.split("/")
    if not _REVISION.fullmatch(revision) or any(p in ("", ".", "..") for p in parts):
        raise UsageError(
            f"--revision {revision!r} is not a branch, tag or commit name (it looks like a path); "
            "pass e.g. main, v1.0 or a commit hash"
        )


def _weight_patterns(snapshot: Path) -> list[str]:
    """The shards the index names (never every *.safetensors: repos may also hold consolidated copies)."""
    index = snapshot / INDEX_FILE
    if not index.exists():
        return [SINGLE_FILE]
    try:
        weight_map = read_json(index, CheckpointError).get("weight_map")
        names = sorted({v for v in weight_map.values() if isinstance(v, str)})
    except (CheckpointError, AttributeError):
        return []  # open_source reports the broken index with its own message
    return [glob.escape(n) for n in names]


def _download(repo_id: str, revision: str | None, patterns: list[str], cache_dir: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except HFValidationError as e:
        raise ConfigError(f"--model_dir {repo_id}: not a local directory nor a valid hub repo id ({e})") from e
    except GatedRepoError as e:
        raise ConfigError(
            f"{repo_id} is gated: accept its terms on huggingface.co, then set HF_TOKEN (or run `hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise ConfigError(f"{repo_id}: revision {revision!r} not found on the hub; check --revision") from e
    except RepositoryNotFoundError as e:
        raise ConfigError(
            f"{repo_id}: not a local directory, and no such repo on the hub (or it is private); check the "
            "path or id, or set HF_TOKEN (or run `hf auth login`) if it is private"
        ) from e
    except IncompleteSnapshotError as e:
        raise CheckpointError(
            f"{at}: the cached snapshot in {cache} is incomplete; run once with network access (HF_HUB_OFFLINE "
            "unset) to finish the download"
        ) from e
    except LocalEntryNotFoundError as e:
        if constants.is_offline_mode():
            raise ConfigError(
                f"{at}: not a local directory, and not in the hub cache {cache} while HF_HUB_OFFLINE is set; "
                "check the path, run once online, or point HF_HOME / HF_HUB_CACHE at the cache that holds it"
            ) from e
        raise ConfigError(
            f"{at}: not a local directory, and the hub cannot be reached nor is it in the cache {cache}; "
            "check the path, the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 with a cache that holds it"
        ) from e
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{at}: download failed: {first}; retry, or check HF_TOKEN") from e
    except OSError as e:
        raise CheckpointError(f"{at}: download into {cache} failed: {e.strerror or e}") from e
