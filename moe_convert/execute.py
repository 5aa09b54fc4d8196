"""Run a plan: read each source tensor once, in file order, and scatter its pieces to the rank files.

Memory stays bounded whatever the model size: a source tensor is read in contiguous chunks of at most
`chunk_bytes` into a reused buffer, and each piece is cast and written straight to its byte offset.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .header import DTYPES, TensorInfo
from .plan import Box, Plan, RankPlan
from .writer import RankFileWriter

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


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


def chunk_boxes(shape: tuple[int, ...], itemsize: int, limit: int, prefix: Box = ()) -> Iterator[Box]:
    """Split a tensor into boxes of at most `limit` bytes, each one contiguous range of the file.

    A box fixes leading indices, takes a range of one dimension, and spans all later dimensions.
    """
    if not shape:
        yield prefix
        return
    row_bytes = math.prod(shape[1:]) * itemsize
    if row_bytes > limit and len(shape) > 1:
        for i in range(shape[0]):
            yield from chunk_boxes(shape[1:], itemsize, limit, (*prefix, (i, i + 1)))
        return
    rows = max(1, limit // max(1, row_bytes))
    rest = tuple((0, d) for d in shape[1:])
    for start in range(0, shape[0], rows):
        yield (*prefix, (start, min(start + rows, shape[0])), *rest)


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=False))
    return out if all(s < e for s, e in out) else None


def _element_offset(sub: Box, box: Box) -> int:
    """Row-major position of `sub`'s first element inside `box` (sub spans box fully after its ranges)."""
    offset, stride = 0, 1
    for (s, _), (b0, b1) in zip(reversed(sub), reversed(box), strict=False):
        offset += (s - b0) * stride
        stride *= b1 - b0
    return offset


class _SourceReader:
    """Positioned reads from the source shards into a per-thread reusable buffer."""

    def __init__(self, files: list[Path], chunk_bytes: int) -> None:
        self.fds = {f: os.open(f, os.O_RDONLY) for f in files}
        self.stats = {f: os.fstat(fd) for f, fd in self.fds.items()}
        self.chunk_bytes = chunk_bytes
        self.local = threading.local()

    def read(self, info: TensorInfo, chunk: Box) -> torch.Tensor:
        item = info.torch_dtype.itemsize
        shape = tuple(e - s for s, e in chunk)
        start = info.start + _element_offset(chunk, tuple((0, d) for d in info.shape)) * item
        n = math.prod(shape) * item
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self.local.buf = bytearray(max(n, self.chunk_bytes))
        view = memoryview(buf)[:n]
        got = os.preadv(self.fds[info.file], [view], start)
        if got != n:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r}: read {got} of {n} bytes at offset {start}; "
                "the file was truncated or changed while converting"
            )
        if n == 0:
            return torch.empty(shape, dtype=info.torch_dtype)
        return torch.frombuffer(view, dtype=info.torch_dtype).reshape(shape)

    def check_unchanged(self) -> None:
        for f, before in self.stats.items():
            now = os.stat(f)
            if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise CheckpointError(f"{f}: changed while converting; the output cannot be trusted, rerun")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _scatter(reader: _SourceReader, info: TensorInfo, targets: list[_Target], on_bytes: Callable[[int], None]) -> None:
    """Read one source tensor chunk by chunk and write every piece of it that some rank needs."""
    item = info.torch_dtype.itemsize
    for chunk in chunk_boxes(info.shape, item, reader.chunk_bytes):
        users = [(t, sub) for t in targets if (sub := _intersect(chunk, t.box)) is not None]
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


def execute_plan(
    plan: Plan,
    tensors: dict[str, TensorInfo],
    output_dir: Path,
    *,
    only_ranks: set[int] | None = None,
    **kwargs: Any,
) -> list[RankResult]:
    """Write every rank file of `plan` (or only `only_ranks`) into `output_dir`; see `execute_plans`."""
    job = WriteJob(plan, output_dir, None if only_ranks is None else frozenset(only_ranks))
    return execute_plans([job], tensors, **kwargs)[0]


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
        # File by file, front to back: sequential reads.
        order = sorted(by_source, key=lambda n: (str(tensors[n].file), tensors[n].start))
        reader = _SourceReader(sorted({tensors[n].file for n in order}), chunk_bytes)
        all_writers = [w for ws in writers for w in ws]
        _run(reader, [(tensors[n], by_source[n]) for n in order], all_writers, workers, on_bytes)
        reader.check_unchanged()
        results: list[list[RankResult]] = []
        for job, ws in zip(jobs, writers, strict=True):
            results.append([])
            for r, w in zip(job.ranks(), ws, strict=True):
                results[-1].append(RankResult(r.file, w.layout.size, w.commit()))
                on_rank_done(job.output_dir, results[-1][-1])
        return results
    except BaseException:
        for ws in writers:
            for w in ws:
                w.abort()
        raise
    finally:
        if reader is not None:
            reader.close()


def _run(
    reader: _SourceReader,
    work: list[tuple[TensorInfo, list[_Target]]],
    writers: list[RankFileWriter],
    workers: int,
    on_bytes: Callable[[int], None],
) -> None:
    """Scatter every source tensor; with workers > 1, tensors overlap (reads, casts and writes drop the GIL).

    A separate thread hashes the rank files' completed prefixes meanwhile, so checksums cost little time.
    """
    stop = threading.Event()
    hash_errors: list[BaseException] = []

    def hash_loop() -> None:
        try:
            while not stop.wait(0.05):
                for w in writers:
                    w.hash_ready()
        except BaseException as e:  # surfaced below; the main loop must not hang on it
            hash_errors.append(e)

    hasher = threading.Thread(target=hash_loop, name="moe-convert-hash", daemon=True)
    hasher.start()
    try:
        if workers <= 1:
            for info, targets in work:
                _scatter(reader, info, targets, on_bytes)
        else:
            _run_parallel(reader, work, workers, on_bytes)
    finally:
        stop.set()
        hasher.join()
    if hash_errors:
        raise hash_errors[0]


def _run_parallel(
    reader: _SourceReader,
    work: list[tuple[TensorInfo, list[_Target]]],
    workers: int,
    on_bytes: Callable[[int], None],
) -> None:
    lock = threading.Lock()

    def counted(n: int) -> None:
        with lock:
            on_bytes(n)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-convert") as pool:
        # At most 2 tensors per worker in flight keeps reads roughly in file order and memory bounded.
        pending: set[Future[None]] = set()
        try:
            for info, targets in work:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(_scatter, reader, info, targets, counted))
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
