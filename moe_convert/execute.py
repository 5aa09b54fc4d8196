"""Run a plan: read each source tensor once, in file order, and scatter its pieces to the rank files.

Memory stays bounded whatever the model size: a source tensor is read in contiguous chunks of at most
`chunk_bytes` into a reused buffer, and each piece is cast and written straight to its byte offset.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .header import DTYPES, TensorInfo
from .plan import Box, Plan, RankPlan
from .reading import SourceReader as _SourceReader
from .reading import chunk_boxes, contiguous_run
from .reading import element_offset as _element_offset
from .reading import intersect as _intersect
from .writer import PARTIAL_SUFFIX, RankFileWriter

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
# sha256 runs at ~1.3 GB/s per core (read back from the page cache), no faster than a conversion writes:
# several hash threads, each with its own rank files, keep up where cores allow (on 2 cores: no change).
HASH_THREADS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Target:
    """Where one piece of a source tensor goes."""

    writer: RankFileWriter
    box: Box
    offset: int  # absolute offset in the rank file
    dtype: torch.dtype


@dataclass(frozen=True)
class RankResult:
    file: str
    bytes: int
    sha256: str


def _scatter(reader: _SourceReader, info: TensorInfo, targets: list[_Target], on_bytes: Callable[[int], None]) -> None:
    """Read one source tensor chunk by chunk and write every piece of it that some rank needs."""
    item = info.torch_dtype.itemsize
    # Pieces that are a plain byte range of the source (no cast, no column slice) are copied by the
    # kernel, like `cp`: about twice as fast here as reading into memory and writing back (measured).
    to_read = []
    for t in targets:
        raw = t.dtype == info.torch_dtype and contiguous_run(t.box, info.shape)
        if raw and reader.copy_to(info, t.box, t.writer, t.offset):
            on_bytes(math.prod(e - s for s, e in t.box) * item)
        else:
            to_read.append(t)
    for chunk in chunk_boxes(info.shape, item, reader.chunk_bytes):
        users = [(t, sub) for t in to_read if (sub := _intersect(chunk, t.box)) is not None]
        if not users:
            continue
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
    workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_rank_done: Callable[[Path, RankResult], None] = lambda path, r: None,
) -> list[list[RankResult]]:
    """Write the rank files of every job, reading each needed source byte once for all of them.

    Rank files appear under their final names only when complete and flushed; on any error every
    temporary file is removed. Returns, per job, one result per rank file written.
    """
    writers: list[list[RankFileWriter]] = []
    reader: _SourceReader | None = None
    try:
        by_source: dict[str, list[_Target]] = {}
        for job in jobs:
            writers.append([])
            for r in job.ranks():
                w = RankFileWriter(job.output_dir / r.file, r)
                writers[-1].append(w)
                for t in r.tensors:
                    for p in t.pieces:
                        target = _Target(w, p.box, w.layout.offsets[t.name] + p.dst_offset, DTYPES[t.dtype])
                        by_source.setdefault(p.source, []).append(target)
        # File by file; inside a file, in the order the rank files need the tensors (where the first piece
        # lands), so every rank file fills front to back and its sha256 keeps pace instead of waiting for
        # small tensors (norms, attention) that sort last in a shard. Each tensor is still one long read.
        order = sorted(
            by_source,
            key=lambda n: (str(tensors[n].file), min(t.offset for t in by_source[n]), tensors[n].start),
        )
        reader = _SourceReader(sorted({tensors[n].file for n in order}), chunk_bytes)
        all_writers = [w for ws in writers for w in ws]
        commit_when_done = _EarlyCommit(jobs, writers, by_source, reader, on_rank_done)
        _run(reader, [(tensors[n], by_source[n]) for n in order], all_writers, workers, on_bytes, commit_when_done)
        reader.check_unchanged()
        for w in all_writers:  # writers no source tensor feeds (none in practice) are committed here
            commit_when_done.commit(w)
        return [[commit_when_done.results[w] for w in ws] for ws in writers]
    except BaseException:
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


class _EarlyCommit:
    """Commits a rank file as soon as the last source tensor it needs is written, not at the end of the run.

    With pp > 1 the early stages' files are final (and survive an interruption, for --resume) long before
    the last stage's are. Called from whichever thread finished the tensor; the hash lock in the writer
    keeps the hash thread and a commit from hashing the same file at once.
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
        self.results: dict[RankFileWriter, RankResult] = {}
        self.lock = threading.Lock()

    def __call__(self, targets: list[_Target]) -> None:
        ready = []
        with self.lock:
            for w in dict.fromkeys(t.writer for t in targets):
                self.remaining[w] -= 1
                if self.remaining[w] == 0:
                    ready.append(w)
        for w in ready:
            self.commit(w)

    def commit(self, w: RankFileWriter) -> None:
        with self.lock:
            if w in self.results:
                return
        # A source shard rewritten during the run would make this file a mix of old and new bytes.
        self.reader.check_unchanged()
        output_dir, file = self.where[w]
        result = RankResult(file, w.layout.size, w.commit())
        with self.lock:
            self.results[w] = result
            self.on_rank_done(output_dir, result)


def _run(
    reader: _SourceReader,
    work: list[tuple[TensorInfo, list[_Target]]],
    writers: list[RankFileWriter],
    workers: int,
    on_bytes: Callable[[int], None],
    on_tensor_done: Callable[[list[_Target]], None] = lambda targets: None,
) -> None:
    """Scatter every source tensor; with workers > 1, tensors overlap (reads, casts and writes drop the GIL).

    Hash threads hash the rank files' completed prefixes meanwhile (sha256 drops the GIL), each its own
    share of the files, so checksums overlap the conversion instead of following it.
    """
    stop = threading.Event()
    hash_errors: list[BaseException] = []

    def hash_loop(mine: list[RankFileWriter]) -> None:
        try:
            while not stop.wait(0.05):
                for w in mine:
                    w.hash_ready()
        except BaseException as e:  # surfaced below; the main loop must not hang on it
            hash_errors.append(e)

    n = max(1, min(HASH_THREADS, len(writers)))
    hashers = [
        threading.Thread(target=hash_loop, args=(writers[k::n],), name=f"moe-convert-hash{k}", daemon=True)
        for k in range(n)
    ]
    for h in hashers:
        h.start()
    try:
        if workers <= 1:
            for info, targets in work:
                _scatter(reader, info, targets, on_bytes)
                on_tensor_done(targets)
        else:
            _run_parallel(reader, work, workers, on_bytes, on_tensor_done)
    finally:
        stop.set()
        for h in hashers:
            h.join()
    if hash_errors:
        raise hash_errors[0]


def _run_parallel(
    reader: _SourceReader,
    work: list[tuple[TensorInfo, list[_Target]]],
    workers: int,
    on_bytes: Callable[[int], None],
    on_tensor_done: Callable[[list[_Target]], None] = lambda targets: None,
) -> None:
    lock = threading.Lock()

    def counted(n: int) -> None:
        with lock:
            on_bytes(n)

    def task(info: TensorInfo, targets: list[_Target]) -> None:
        _scatter(reader, info, targets, counted)
        on_tensor_done(targets)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-convert") as pool:
        # At most 2 tensors per worker in flight keeps reads roughly in file order and memory bounded.
        pending: set[Future[None]] = set()
        try:
            for info, targets in work:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(task, info, targets))
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
