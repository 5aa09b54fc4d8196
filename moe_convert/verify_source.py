"""Verify against the source: every piece of every output tensor equals its source box, cast.

The source tensors the manifest uses are read once each, in file order and in chunks, hashing each piece's
expected bytes; the rank-file pass (verify_files.py) hashes each piece's actual bytes; they meet as digests.
A piece of a weight-only weight is quantized on the way with the converter's own function
(quantize_stream.QuantizedOutput, weight_only.py): its expected bytes are those of its rows in the stored
weight, and of its rows' scales.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from .casts import cast_function
from .fields import show
from .header import itemsize
from .manifest import ManifestRank, ManifestTensor
from .plan import Box, Piece
from .quantize_stream import DigestSink, QuantizedOutput
from .reading import BITS, SourceReader, chunk_boxes, element_offset, intersect
from .source import SourceCheckpoint
from .verify_files import FileDigests
from .verify_findings import Findings, PieceKey
from .weight_only import QuantizedTensor

# Per source tensor: each piece's key, box, the dtype it is cast to (a safetensors code; the converter's
# own casts, casts.py, proven against torch's by tests/test_casts.py), and for a quantized weight's piece
# its rows as a tensor of their own, and the key of its scales' digest.
Work = dict[str, list[tuple[PieceKey, Box, str, "tuple[QuantizedTensor, PieceKey] | None"]]]
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
                elif t.quantized is None or _whole_groups(t, p):  # else a structure problem, reported there
                    key = (r.index, t.name, i)
                    work.setdefault(p.source, []).append((key, p.box, t.piece_dtype, _rows_of(r, t, i, p)))
    for name, targets in work.items():
        covered = _covers(source.tensors[name].shape, [box for _, box, _, _ in targets])
        if covered is None:
            found.problem(f"source tensor {name!r}: the manifest cuts it into too many pieces to check its coverage")
        elif not covered:
            found.problem(f"source tensor {name!r}: part of it is in no rank file")
    return work


def _whole_groups(t: ManifestTensor, p: Piece) -> bool:
    q = t.quantized
    assert q is not None
    qt, (r0, r1) = q.tensor(), q.piece_rows(p)
    return p.numel % qt.shape[-1] == 0 and r0 % qt.group == 0 and r1 % qt.group == 0 and 0 <= r0 <= r1 <= qt.rows


def _rows_of(r: ManifestRank, t: ManifestTensor, i: int, p: Piece) -> tuple[QuantizedTensor, PieceKey] | None:
    """A quantized weight's piece: its rows as a quantized tensor of their own (whole row groups, so their
    bytes are a range of the weight's), and the key of its scales' digest."""
    q = t.quantized
    if q is None:
        return None
    whole = q.tensor()
    r0, r1 = q.piece_rows(p)
    rows = QuantizedTensor(t.name, (max(r1 - r0, 0), whole.shape[-1]), q.rows_dtype, q.precision, whole.layout)
    return rows, (r.index, q.scale, i)


def hash_source(source: SourceCheckpoint, work: Work, chunk_bytes: int, found: Findings) -> dict[PieceKey, str]:
    """Each source tensor read once, in file order, chunk by chunk; each piece's expected bytes hashed."""
    order = sorted(work, key=lambda n: (str(source.tensors[n].file), source.tensors[n].start))
    reader = SourceReader(sorted({source.tensors[n].file for n in order}), chunk_bytes)
    hashes: dict[PieceKey, Any] = {}
    quantizing: dict[PieceKey, tuple[QuantizedOutput, DigestSink]] = {}
    try:
        for name in order:
            info = source.tensors[name]
            for chunk in chunk_boxes(info.shape, info.itemsize, chunk_bytes):
                users = [(key, box, sub, dt, q) for key, box, dt, q in work[name] if (sub := intersect(chunk, box))]
                if not users:
                    continue
                data = reader.read_bits(info, chunk)
                found.read_bytes(data.size * info.itemsize, source=True)
                for key, box, sub, dt, q in users:
                    local = tuple(slice(s - c0, e - c0) for (s, e), (c0, _) in zip(sub, chunk, strict=False))
                    part = data[local]
                    cast = np.empty(part.shape, BITS[itemsize(dt)])
                    cast_function(info.dtype, dt)(cast, part)
                    piece = cast.reshape(-1)
                    if q is None:
                        hashes.setdefault(key, hashlib.sha256()).update(piece.view(np.uint8))
                        continue
                    # a piece's parts come in its row-major order: its stored bytes come front to back
                    rows, _ = q
                    out, sink = quantizing.setdefault(
                        key, (QuantizedOutput(rows, 0, rows.weight_nbytes), DigestSink(rows.weight_nbytes))
                    )
                    out.add(element_offset(sub, box), piece, sink)
            for key, _, _, q in work[name]:  # the source tensor is done: so are its quantized pieces
                if q is not None and key in quantizing:
                    _, sink = quantizing.pop(key)
                    hashes[key], hashes[q[1]] = sink.weight, sink.scales
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
                slice_text = ", ".join(f"{a}:{b}" for a, b in p.box)
                if t.quantized is not None:
                    _compare_quantized(r, t, i, p, slice_text, got, expected, found)
                    continue
                key = (r.index, t.name, i)
                if key not in expected or key not in got.pieces or got.pieces[key] == expected[key]:
                    continue
                found.problem(
                    f"{r.file}: tensor {t.name!r}: bytes [{p.dst_offset}, {p.dst_offset + p.numel * item}) "
                    f"of its data differ from source {p.source!r}[{slice_text}] as {t.dtype}"
                )


def _compare_quantized(
    r: ManifestRank,
    t: ManifestTensor,
    i: int,
    p: Piece,
    slice_text: str,
    got: FileDigests,
    expected: dict[PieceKey, str],
    found: Findings,
) -> None:
    """A quantized weight's piece: its rows' stored bytes, and their scales."""
    q = t.quantized
    assert q is not None
    r0, r1 = q.piece_rows(p)
    how = f"{q.precision} for sm{q.arch} ({q.layout} layout)"
    for name, per_row in ((t.name, q.tensor().row_bytes), (q.scale, itemsize(q.rows_dtype))):
        key = (r.index, name, i)
        if key not in expected or key not in got.pieces or got.pieces[key] == expected[key]:
            continue
        found.problem(
            f"{r.file}: tensor {name!r}: bytes [{r0 * per_row}, {r1 * per_row}) of its data (rows {r0}-{r1 - 1}) "
            f"differ from source {p.source!r}[{slice_text}] quantized {how}"
        )


def _covers(shape: tuple[int, ...], boxes: list[Box]) -> bool | None:
    """Whether the union of `boxes` is the whole tensor (on the grid of the boxes' own edges); None when
    that grid would be too large to hold."""
    if not shape or math.prod(shape) == 0:
        return True
    edges = [sorted({0, d, *(x for b in boxes for x in b[i])}) for i, d in enumerate(shape)]
    if math.prod(len(e) - 1 for e in edges) > _MAX_COVER_CELLS:
        return None
    covered = np.zeros([len(e) - 1 for e in edges], dtype=bool)
    index = [{x: k for k, x in enumerate(e)} for e in edges]
    for b in boxes:
        covered[tuple(slice(ix[lo], ix[hi]) for ix, (lo, hi) in zip(index, b, strict=True))] = True
    return bool(covered.all())
