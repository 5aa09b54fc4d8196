"""Verify each rank file against its manifest entry: size, header, sha256, zero padding, and the digests
that the replica and source comparisons need; each file is read once, front to back, in 1 MB blocks.

Rank files are opened without following links and must be regular files: a link planted in an output
directory (to a source shard, to /dev/zero) is reported, never read through.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MoeConvertError, VerifyError
from .fields import show
from .files import open_regular
from .header import TensorInfo, itemsize, read_header_fd
from .manifest import ManifestRank, ManifestTensor
from .verify_findings import Findings, PieceKey

_BLOCK = 1024 * 1024  # read and hashed while still in the CPU cache


@dataclass
class FileDigests:
    tensors: dict[str, str] = field(default_factory=dict)  # replicated tensors only
    pieces: dict[PieceKey, str] = field(default_factory=dict)


def check_rank_file(
    out: Path, r: ManifestRank, replicated: set[str], pieces: bool, found: Findings
) -> FileDigests | None:
    """Size, header, sha256, zero padding; digests of replicated tensors and (with `pieces`) of every piece."""
    path = out / r.file
    if not os.path.lexists(path):
        names = ", ".join(repr(t.name) for t in r.tensors[:3]) + (", ..." if len(r.tensors) > 3 else "")
        found.problem(f"{r.file}: missing; the manifest lists it with {len(r.tensors)} tensors ({names})")
        return None
    try:
        with open_regular(path, VerifyError, follow_symlinks=False) as (fd, st):
            if st.st_size != r.bytes:
                found.problem(
                    f"{r.file}: {st.st_size} bytes, but the manifest records {r.bytes} (truncated or replaced?)"
                )
            header, data_start = read_header_fd(fd, path, st.st_size)
            if not _header_agrees(r, header, data_start, found) or st.st_size != r.bytes:
                return None
            return _hash_file(fd, r, data_start, replicated, pieces, found)
    except MoeConvertError as e:
        found.problem(f"{r.file}: {str(e).removeprefix(str(path) + ': ')}")
        return None


def _hash_file(
    fd: int, r: ManifestRank, data_start: int, replicated: set[str], pieces: bool, found: Findings
) -> FileDigests:
    leaves = _leaves(r, data_start)
    tensor_sha = {i: hashlib.sha256() for i, t in enumerate(r.tensors) if t.name in replicated}
    sha = hashlib.sha256()
    piece_sha: dict[tuple[int, int], Any] = {}
    nonzero: set[int] = set()
    buf = bytearray(_BLOCK)
    pos, li = 0, 0
    try:
        while got := os.preadv(fd, [buf], pos):
            block, end = memoryview(buf)[:got], pos + got
            sha.update(block)
            while li < len(leaves) and leaves[li][0] < end:
                start, stop, ti, pi = leaves[li]
                part = block[max(start, pos) - pos : min(stop, end) - pos]
                if ti in tensor_sha:
                    tensor_sha[ti].update(part)
                if pi < 0:
                    if ti not in nonzero and bytes(part) != bytes(len(part)):
                        nonzero.add(ti)
                elif pieces:
                    piece_sha.setdefault((ti, pi), hashlib.sha256()).update(part)
                if stop > end:
                    break
                li += 1
            pos = end
            found.read_bytes(got)
    except OSError as e:
        raise VerifyError(f"cannot read at byte {pos}: {e.strerror or e}") from e
    if r.sha256 is None:
        found.problem(f"{r.file}: the manifest records no sha256 (a --dry_run manifest?)")
    elif sha.hexdigest() != r.sha256:
        found.problem(
            f"{r.file}: sha256 {sha.hexdigest()[:16]}... differs from the manifest's {r.sha256[:16]}...; "
            "the file was changed or damaged after conversion"
            + ("" if pieces else " (verify with --model_dir to find which tensor)")
        )
    for ti in sorted(nonzero):
        found.problem(f"{r.file}: tensor {r.tensors[ti].name!r}: padding bytes (covered by no piece) are not zero")
    return FileDigests(
        tensors={r.tensors[i].name: h.hexdigest() for i, h in tensor_sha.items()},
        pieces={(r.index, r.tensors[ti].name, pi): h.hexdigest() for (ti, pi), h in piece_sha.items()},
    )


def _header_agrees(r: ManifestRank, header: dict[str, TensorInfo], data_start: int, found: Findings) -> bool:
    ok = True
    for t in r.tensors:
        info = header.get(t.name)
        if info is None:
            found.problem(f"{r.file}: tensor {t.name!r} is in the manifest but not in the file")
            ok = False
            continue
        got = (info.dtype, list(info.shape), [info.start - data_start, info.stop - data_start])
        want = (t.dtype, list(t.shape), [t.begin, t.end])
        for what, a, b in zip(("dtype", "shape", "data_offsets"), got, want, strict=True):
            if a != b:
                found.problem(
                    f"{r.file}: tensor {t.name!r}: {what} is {show(a)} in the file, {show(b)} in the manifest"
                )
                ok = False
    for name in sorted(header.keys() - {t.name for t in r.tensors}):
        found.problem(f"{r.file}: tensor {name!r} is in the file but not in the manifest")
        ok = False
    return ok


def _leaves(r: ManifestRank, data_start: int) -> list[tuple[int, int, int, int]]:
    """The file's data as sorted runs (start, stop, tensor index, piece index or -1 for padding).

    A quantized weight's piece is the byte range of its rows in the stored weight, and a piece of its
    scales tensor (same index as the weight's) the range of those rows' scales; they have no padding."""
    leaves = []
    by_name = {t.name: t for t in r.tensors}
    for ti, t in enumerate(r.tensors):
        if t.quantized is not None:
            leaves += _quantized_leaves(t, ti, by_name, data_start)
            continue
        base, cursor, item = data_start + t.begin, 0, itemsize(t.dtype)
        for pi, p in sorted(enumerate(t.pieces), key=lambda ip: ip[1].dst_offset):
            start = max(p.dst_offset, cursor)  # overlapping pieces were reported; never hash a byte twice
            stop = min(p.dst_offset + p.numel * item, t.nbytes)
            if start > cursor:
                leaves.append((base + cursor, base + start, ti, -1))
            if stop > start:
                leaves.append((base + start, base + stop, ti, pi))
            cursor = max(cursor, stop)
        if cursor < t.nbytes:
            leaves.append((base + cursor, base + t.nbytes, ti, -1))
    return sorted(leaves)


def _quantized_leaves(
    t: ManifestTensor, ti: int, by_name: dict[str, ManifestTensor], data_start: int
) -> list[tuple[int, int, int, int]]:
    q = t.quantized
    assert q is not None
    weight = by_name.get(q.weight)
    if weight is None or weight.quantized != q:  # reported by the structure checks
        return []
    per_row = q.tensor().row_bytes if t.name == q.weight else itemsize(t.dtype)
    base, leaves = data_start + t.begin, []
    for pi, p in enumerate(weight.pieces):
        r0, r1 = q.piece_rows(p)
        if 0 <= r0 <= r1 and r1 * per_row <= t.nbytes:
            leaves.append((base + r0 * per_row, base + r1 * per_row, ti, pi))
    return leaves


def _made_of(r: ManifestRank, t: ManifestTensor) -> tuple[Any, ...] | None:
    """What a tensor's bytes are made of (source pieces, dtype, shape, how quantized); None: nothing."""
    pieces = t.pieces
    if not pieces and t.quantized is not None:  # a scales tensor: made of its weight's pieces
        weight = next((w for w in r.tensors if w.name == t.quantized.weight), None)
        pieces = weight.pieces if weight is not None else ()
    return (t.name, t.dtype, t.shape, pieces, t.quantized) if pieces else None


def replica_sets(ranks: list[ManifestRank]) -> Iterator[list[tuple[ManifestRank, str]]]:
    """Groups of (rank, tensor name) made of exactly the same source pieces, dtype, shape and quantization."""
    groups: dict[tuple[Any, ...], list[tuple[ManifestRank, str]]] = {}
    for r in ranks:
        for t in r.tensors:
            if (key := _made_of(r, t)) is not None:
                groups.setdefault(key, []).append((r, t.name))
    for members in groups.values():
        if len(members) > 1:
            yield members


def replicated_tensors(ranks: list[ManifestRank]) -> dict[int, set[str]]:
    """Per rank index, the tensors whose bytes must be hashed to compare copies across ranks."""
    out: dict[int, set[str]] = {}
    for members in replica_sets(ranks):
        for r, name in members:
            out.setdefault(r.index, set()).add(name)
    return out


def compare_replicas(ranks: list[ManifestRank], digests: dict[int, FileDigests], found: Findings) -> None:
    """Tensors made of the same source pieces must be byte-identical on every rank that holds them."""
    for members in replica_sets(ranks):
        copies = [(r, digests[r.index].tensors[name]) for r, name in members if r.index in digests]
        if len(copies) < 2:
            continue
        majority, _ = Counter(d for _, d in copies).most_common(1)[0]
        reference = next(r.file for r, d in copies if d == majority)
        for r, d in copies:
            if d != majority:
                found.problem(
                    f"{r.file}: tensor {members[0][1]!r} differs from its copy in {reference}; "
                    "both are made of the same source bytes and must be identical"
                )
