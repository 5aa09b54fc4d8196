"""What makes two runs write the same bytes: the source's identity and the options.

The journal of every run and the manifest of every finished one record it, and `--resume` keeps nothing
unless it is unchanged. The source's identity is each file's size and modification time plus a cheap
content fingerprint: a sha256 over config.json, the index, every shard's safetensors header and a few
sampled 4 KB blocks of each shard's data. A re-download or an in-place rewrite changes the times; one
that keeps them (`touch -r`, a copy with `cp -p`) still changes the fingerprint unless it leaves the
headers and every sampled block as they were.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .errors import CheckpointError
from .files import open_regular, read_exactly
from .header import MAX_HEADER_BYTES
from .plan import Plan
from .source import INDEX_FILE, SourceCheckpoint

CONFIG_FILE = "config.json"
_SAMPLES = 8
_SAMPLE_BYTES = 4096
_MAX_SMALL_FILE = 64 * 1024 * 1024  # config.json and the index, hashed whole
_OPTION_FLAGS = {
    "dtype": "--dtype",
    "use_parallel_embedding": "--use_parallel_embedding",
    "embedding_sharding_dim": "--embedding_sharding_dim",
    "use_embedding_sharing": "--use_embedding_sharing",
    # recorded only when quantizing (ConvertOptions.as_dict): absent is None
    "weight_only_precision": "--weight_only_precision",
    "weight_only_arch": "--weight_only_arch",
    "weight_only_sm90_layout": "--weight_only_sm90_layout",
}


def source_identity(source: SourceCheckpoint) -> dict[str, Any]:
    """Sizes, modification times and the content fingerprint of every file the conversion reads."""
    small = [source.model_dir / CONFIG_FILE]
    if (source.model_dir / INDEX_FILE).exists():
        small.append(source.model_dir / INDEX_FILE)
    sha = hashlib.sha256()
    stats = []
    for f in [*small, *source.files]:
        with open_regular(f, CheckpointError) as (fd, st):
            stats.append({"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
            sha.update(f"{f.name}\0{st.st_size}\0".encode())
            if f in small:
                if st.st_size > _MAX_SMALL_FILE:
                    raise CheckpointError(f"{f}: {st.st_size} bytes, over the {_MAX_SMALL_FILE} byte limit")
                sha.update(read_exactly(fd, f, st.st_size, CheckpointError))
            else:
                for offset, n in _shard_ranges(fd, f, st.st_size):
                    sha.update(read_exactly(fd, f, n, CheckpointError, offset=offset))
    return {"files": stats, "fingerprint": sha.hexdigest()}


def _shard_ranges(fd: int, path: Any, size: int) -> list[tuple[int, int]]:
    """The header, then _SAMPLES blocks spread evenly over the data (all of it, if that is small)."""
    (n,) = struct.unpack("<Q", read_exactly(fd, path, 8, CheckpointError))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path}: header length {n} does not fit the file; it changed since it was read")
    start, data = 8 + n, size - 8 - n
    ranges = [(0, start)]
    if data <= _SAMPLES * _SAMPLE_BYTES:
        return [*ranges, (start, data)]
    step = (data - _SAMPLE_BYTES) // (_SAMPLES - 1)
    return ranges + [(start + k * step, _SAMPLE_BYTES) for k in range(_SAMPLES)]


def run_identity(record: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """What must be equal for a resumed run to write the same bytes (workers and chunk size need not be).

    `record` is the manifest's `source` object (`replan.source_record`), which holds the identity.
    """
    return {
        "tool_version": __version__,
        "source": {k: record.get(k) for k in ("path", "hub_id", "revision", "identity")},
        "mapping": plan.mapping.as_dict(),
        "options": plan.options.as_dict(),
        "dtype": plan.dtype,
    }


def identity_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between an earlier run's identity (already checked for types) and this one's."""
    diffs = []
    m0, m1 = before["mapping"], now["mapping"]
    for key in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size"):
        if m0.get(key) != m1[key]:
            diffs.append(f"--{key} was {m0.get(key)}, now {m1[key]}")
    o0, o1 = before["options"], now["options"]
    for key, flag in _OPTION_FLAGS.items():
        if o0.get(key) != o1.get(key):
            diffs.append(f"{flag} was {o0.get(key)!r}, now {o1.get(key)!r}")
    if not diffs and before["dtype"] != now["dtype"]:
        diffs.append(f"the output dtype was {before['dtype']}, now {now['dtype']} (config.json changed?)")
    s0, s1 = before["source"], now["source"]
    for key, what in (("path", "source path"), ("hub_id", "hub id"), ("revision", "revision")):
        if s0.get(key) != s1[key]:
            diffs.append(f"{what} was {s0.get(key)}, now {s1[key]}")
    diffs += _file_differences(s0["identity"], s1["identity"])
    if not diffs and before["tool_version"] != now["tool_version"]:
        diffs.append(f"moe-convert was version {before['tool_version']}, now {now['tool_version']}")
    return diffs


def _file_differences(id0: dict[str, Any], id1: dict[str, Any]) -> list[str]:
    files0 = {f["name"]: f for f in id0["files"]}
    files1 = {f["name"]: f for f in id1["files"]}
    diffs = [
        f"source file {name} was read before but is not part of the source now"
        for name in sorted(files0.keys() - files1.keys())
    ]
    diffs += [f"source file {name} is new" for name in sorted(files1.keys() - files0.keys())]
    for name in sorted(files0.keys() & files1.keys()):
        f0, f1 = files0[name], files1[name]
        if f0["bytes"] != f1["bytes"]:
            diffs.append(f"source file {name} was {f0['bytes']} bytes, now {f1['bytes']}")
        elif f0["mtime_ns"] != f1["mtime_ns"]:
            diffs.append(f"source file {name} was modified (at {_when(f0['mtime_ns'])}, now {_when(f1['mtime_ns'])})")
    if not diffs and id0["fingerprint"] != id1["fingerprint"]:
        diffs.append(
            "the source's content changed with its sizes and times kept (its fingerprint of config.json, the "
            "index, the safetensors headers and sampled data differs)"
        )
    return diffs


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
