"""Run a plan: read each source tensor once and stream its pieces into the rank files, front to back.

One thread reads: source tensors go in the order the rank files need them (each file fills from its
front, see writer.py), plain byte ranges straight into the files' staging buffers, the rest in chunks of
at most `chunk_bytes` through one reused buffer, sliced and cast piece by piece. Write threads hash and
write full staging buffers meanwhile. Memory stays bounded whatever the model size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .header import DTYPES, TensorInfo
from .plan import Box, Plan, RankPlan
from .reading import SourceReader as _SourceReader
from .reading import chunk_boxes, contiguous_run
from .reading import element_offset as _element_offset
from .reading import intersect as _intersect
from .writer import PARTIAL_SUFFIX, BufferPool, RankFileWriter, WriteThreads, default_write_threads

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Target:
    """Where one piece of a source tensor goes."""

    writer: RankFileWriter
    box: Box
    offset: int  # absolute offset in the rank file
    dtype: torch.dtype
    stage: int  # pipeline stage of the rank file


@dataclass(frozen=True)
class RankResult:
    file: str
    bytes: int
    sha256: str


def _scatter(reader: _SourceReader, info: TensorInfo, targets: list[_Target], on_bytes: Callable[[int], None]) -> None:
    """Read one source tensor and write every piece of it that some rank needs, each file in its order."""
    item = info.torch_dtype.itemsize
    to_read = []
    for t in sorted(targets, key=lambda t: t.offset):
        if t.dtype == info.torch_dtype and contiguous_run(t.box, info.shape):
            # A plain byte range of the source: read straight into the rank file's staging buffer.
            reader.copy_to(info, t.box, t.writer, t.offset)
            on_bytes(math.prod(e - s for s, e in t.box) * item)
        else:
            to_read.append(t)
    chunks = []
    for chunk in chunk_boxes(info.shape, item, reader.chunk_bytes):
        users = [(t, sub) for t in to_read if (sub := _intersect(chunk, t.box)) is not None]
        if users:
            chunks.append((chunk, users))
    # Chunks in the order their pieces land (usually file order; not for a fused gate_up source, whose
    # gate half comes first in the source but second in mlp.fc), so files keep filling from the front.
    chunks.sort(key=lambda c: min(t.offset + _element_offset(sub, t.box) for t, sub in c[1]))
    for chunk, users in chunks:
        data = reader.read(info, chunk)
        for t, sub in users:
            local = tuple(slice(s - c0, e - c0) for (s, e), (c0, _) in zip(sub, chunk, strict=False))
            piece = data[local].to(t.dtype).contiguous()
            offset = t.offset + _element_offset(sub, t.box) * t.dtype.itemsize
            t.writer.write(offset, piece.reshape(-1).view(torch.uint8).numpy())
            on_bytes(piece.numel() * t.dtype.itemsize)


@dataclass(frozen=True)
class WriteJob:
    """One plan to write into one directory (several jobs share a single pass over the source)."""

    plan: Plan
    output_dir: Path
    only_ranks: frozenset[int] | None = None  # None: every rank

    def ranks(self) -> list[RankPlan]:
        return [r for r in self.plan.ranks if self.only_ranks is None or r.coords.rank in self.only_ranks]


def execute_plans(
    jobs: Sequence[WriteJob],
    tensors: dict[str, TensorInfo],
    *,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    direct_io: bool = True,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_rank_done: Callable[[Path, RankResult], None] = lambda path, r: None,
) -> list[list[RankResult]]:
    """Write the rank files of every job, reading each needed source byte once for all of them.

    `workers` threads hash and write (default: one per core, 2 to 8); `direct_io` writes past the page
    cache where the file system allows. Rank files appear under their final names only when complete and
    flushed; on any error every temporary file is removed. Returns, per job, one result per rank file.
    """
    n_files = sum(len(job.ranks()) for job in jobs)
    threads = WriteThreads(min(workers or default_write_threads(), max(1, n_files)))
    pool = BufferPool(n_files, threads.count)
    writers: list[list[RankFileWriter]] = []
    reader: _SourceReader | None = None
    try:
        by_source: dict[str, list[_Target]] = {}
        lane = 0
        for job in jobs:
            writers.append([])
            for r in job.ranks():
                w = RankFileWriter(job.output_dir / r.file, r, threads, pool, lane, direct=direct_io)
                lane += 1
                writers[-1].append(w)
                for t in r.tensors:
                    for p in t.pieces:
                        offset = w.layout.offsets[t.name] + p.dst_offset
                        target = _Target(w, p.box, offset, DTYPES[t.dtype], r.coords.pp_rank)
                        by_source.setdefault(p.source, []).append(target)
        order = _write_order(by_source, tensors)
        reader = _SourceReader(sorted({tensors[n].file for n in order}), chunk_bytes)
        all_writers = [w for ws in writers for w in ws]
        commit_when_done = _EarlyCommit(jobs, writers, by_source, reader, on_rank_done)
        for n in order:
            _scatter(reader, tensors[n], by_source[n], on_bytes)
            commit_when_done(by_source[n])
        reader.check_unchanged()
        for w in all_writers:  # writers no source tensor feeds (none in practice) are committed here
            commit_when_done.commit(w)
        threads.close()  # waits for the last blocks, renames and checksums
        return [[commit_when_done.results[w] for w in ws] for ws in writers]
    except BaseException:
        threads.close(cancel=True)  # before closing descriptors a write thread may still be using
        for ws in writers:
            for w in ws:
                w.abort()
        # By name too: an interrupt can land between a writer's creation and its registration above.
        for job in jobs:
            for r in job.ranks():
                with contextlib.suppress(OSError):
                    (job.output_dir / (r.file + PARTIAL_SUFFIX)).unlink(missing_ok=True)
        raise
    finally:
        if reader is not None:
            reader.close()


def _write_order(by_source: dict[str, list[_Target]], tensors: dict[str, TensorInfo]) -> list[str]:
    """Source tensors in the order the rank files need them, so each file fills from its front.

    Stage by stage, and inside a stage by where the first piece lands (every file of a stage has the same
    tensor order). Sources saved layer by layer are then read front to back too. Any other order gives the
    same files, only slower: bytes that arrive ahead of a file's front are parked and read back.
    """
    return sorted(
        by_source,
        key=lambda n: (min((t.stage, t.offset) for t in by_source[n]), str(tensors[n].file), tensors[n].start),
    )


class _EarlyCommit:
    """Commits a rank file as soon as the last source tensor it needs is written, not at the end of the run.

    With pp > 1 the early stages' files are final (and survive an interruption, for --resume) long before
    the last stage's are. The flush and rename run on the file's write thread, which then records the
    result (under a lock: write threads finish files concurrently).
    """

    def __init__(
        self,
        jobs: Sequence[WriteJob],
        writers: list[list[RankFileWriter]],
        by_source: dict[str, list[_Target]],
        reader: _SourceReader,
        on_rank_done: Callable[[Path, RankResult], None],
    ) -> None:
        self.reader = reader
        self.on_rank_done = on_rank_done
        self.where: dict[RankFileWriter, tuple[Path, str]] = {}
        for job, ws in zip(jobs, writers, strict=True):
            for r, w in zip(job.ranks(), ws, strict=True):
                self.where[w] = (job.output_dir, r.file)
        self.remaining = dict.fromkeys(self.where, 0)  # source tensors still to scatter, per writer
        for targets in by_source.values():
            for w in dict.fromkeys(t.writer for t in targets):
                self.remaining[w] += 1
        self.finishing: set[RankFileWriter] = set()
        self.results: dict[RankFileWriter, RankResult] = {}
        self.lock = threading.Lock()

    def __call__(self, targets: list[_Target]) -> None:
        for w in dict.fromkeys(t.writer for t in targets):
            self.remaining[w] -= 1
            if self.remaining[w] == 0:
                self.commit(w)

    def commit(self, w: RankFileWriter) -> None:
        if w in self.finishing:
            return
        self.finishing.add(w)
        # A source shard rewritten during the run would make this file a mix of old and new bytes.
        self.reader.check_unchanged()
        output_dir, file = self.where[w]

        def done(sha256: str) -> None:
            result = RankResult(file, w.layout.size, sha256)
            with self.lock:
                self.results[w] = result
                self.on_rank_done(output_dir, result)

        w.finish(done)
