"""Verify against the source: every piece of every output tensor equals its source box, cast.

The source tensors the manifest uses are read once each, in file order and in chunks, hashing each piece's
expected bytes; the rank-file pass (verify_files.py) hashes each piece's actual bytes; they meet as digests.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from .fields import show
from .header import DTYPES, itemsize
from .manifest import ManifestRank
from .plan import Box
from .reading import SourceReader, chunk_boxes, intersect
from .source import SourceCheckpoint
from .verify_files import FileDigests
from .verify_findings import Findings, PieceKey

Work = dict[str, list[tuple[PieceKey, Box, torch.dtype]]]
_MAX_COVER_CELLS = 2**24  # the coverage grid of one source tensor; a real manifest needs a few thousand


def source_work(ranks: list[ManifestRank], source: SourceCheckpoint, found: Findings) -> Work:
    """Every piece to check, grouped by source tensor; pieces that cannot be read are problems."""
    work: Work = {}
    for r in ranks:
        for t in r.tensors:
            for i, p in enumerate(t.pieces):
                info = source.tensors.get(p.source)
                where = f"{r.file}: tensor {t.name!r}: manifest pieces[{i}]"
                if info is None:
                    found.problem(f"{where}: source tensor {p.source!r} is not in the source")
                elif len(p.box) != len(info.shape) or any(
                    not 0 <= a <= b <= d for (a, b), d in zip(p.box, info.shape, strict=False)
                ):
                    found.problem(
                        f"{where}: slice {show([list(b) for b in p.box])} is outside {p.source!r} {list(info.shape)}"
                    )
                else:
                    work.setdefault(p.source, []).append(((r.index, t.name, i), p.box, DTYPES[t.dtype]))
    for name, targets in work.items():
        covered = _covers(source.tensors[name].shape, [box for _, box, _ in targets])
        if covered is None:
            found.problem(f"source tensor {name!r}: the manifest cuts it into too many pieces to check its coverage")
        elif not covered:
            found.problem(f"source tensor {name!r}: part of it is in no rank file")
    return work


def hash_source(source: SourceCheckpoint, work: Work, chunk_bytes: int, found: Findings) -> dict[PieceKey, str]:
    """Each source tensor read once, in file order, chunk by chunk; each piece's expected bytes hashed."""
    order = sorted(work, key=lambda n: (str(source.tensors[n].file), source.tensors[n].start))
    reader = SourceReader(sorted({source.tensors[n].file for n in order}), chunk_bytes)
    hashes: dict[PieceKey, Any] = {}
    try:
        for name in order:
            info = source.tensors[name]
            for chunk in chunk_boxes(info.shape, info.torch_dtype.itemsize, chunk_bytes):
                users = [(key, sub, dt) for key, box, dt in work[name] if (sub := intersect(chunk, box)) is not None]
                if not users:
                    continue
                data = reader.read(info, chunk)
                found.read_bytes(data.numel() * info.torch_dtype.itemsize, source=True)
                for key, sub, dt in users:
                    local = tuple(slice(s - c0, e - c0) for (s, e), (c0, _) in zip(sub, chunk, strict=False))
                    piece = data[local].to(dt).contiguous()
                    hashes.setdefault(key, hashlib.sha256()).update(piece.reshape(-1).view(torch.uint8).numpy())
        reader.check_unchanged()
    finally:
        reader.close()
    return {key: h.hexdigest() for key, h in hashes.items()}


def compare_pieces(
    ranks: list[ManifestRank], digests: dict[int, FileDigests], expected: dict[PieceKey, str], found: Findings
) -> None:
    for r in ranks:
        got = digests.get(r.index)
        if got is None:
            continue
        for t in r.tensors:
            item = itemsize(t.dtype)
            for i, p in enumerate(t.pieces):
                key = (r.index, t.name, i)
                if key not in expected or key not in got.pieces or got.pieces[key] == expected[key]:
                    continue
                slice_text = ", ".join(f"{a}:{b}" for a, b in p.box)
                found.problem(
                    f"{r.file}: tensor {t.name!r}: bytes [{p.dst_offset}, {p.dst_offset + p.numel * item}) "
                    f"of its data differ from source {p.source!r}[{slice_text}] as {t.dtype}"
                )


def _covers(shape: tuple[int, ...], boxes: list[Box]) -> bool | None:
    """Whether the union of `boxes` is the whole tensor (on the grid of the boxes' own edges); None when
    that grid would be too large to hold."""
    if not shape or math.prod(shape) == 0:
        return True
    edges = [sorted({0, d, *(x for b in boxes for x in b[i])}) for i, d in enumerate(shape)]
    if math.prod(len(e) - 1 for e in edges) > _MAX_COVER_CELLS:
        return None
    covered = torch.zeros([len(e) - 1 for e in edges], dtype=torch.bool)
    index = [{x: k for k, x in enumerate(e)} for e in edges]
    for b in boxes:
        covered[tuple(slice(ix[lo], ix[hi]) for ix, (lo, hi) in zip(index, b, strict=True))] = True
    return bool(covered.all())
