"""Run a plan: read each source tensor once and stream its pieces into the rank files, front to back.

The main thread walks the source tensors in the order the rank files need them (each file fills from its
front, see writer.py) and hands the work to the files' lanes (write threads): a piece that is a plain
byte range of the source is read by the lane straight into the file's staging buffer; the others are
read by the main thread in chunks of at most `chunk_bytes` into one of two reused buffers, and the
lanes slice and cast their pieces (numpy, on the elements' raw bits: casts.py) from it a few MB at a
time. A piece of a weight-only quantized weight is cut by the main thread into blocks of whole row groups
as soon as its chunk is read, which the quantize pool's worker processes (quantize_pool.py) cast to the
model dtype and quantize on every core, reading them where they were read (the read buffers are memory
shared with them); the lane writes their bytes in row order through the weight's QuantizedOutput
(quantize_stream.py), and at the end the scales. Memory stays bounded whatever the model size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import profiling, quantize_pool, writer
from .casts import Cast, cast_function
from .header import TensorInfo, itemsize
from .plan import Box, Plan, PlannedTensor, RankPlan
from .quantize_pool import BLOCK_BYTES, Feed, QuantizePool, Quantizing
from .quantize_stream import QuantizedOutput
from .reading import BITS, chunk_boxes, contiguous_run
from .reading import SourceReader as _SourceReader
from .reading import element_offset as _element_offset
from .reading import intersect as _intersect
from .writer import PARTIAL_SUFFIX, RankFileWriter, WriteThreads, staging_buffer_bytes, write_thread_count

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Target:
    """Where one piece of a source tensor goes."""

    writer: RankFileWriter
    box: Box
    offset: int  # absolute offset in the rank file (of a quantized weight: where its first row's bytes go)
    dtype: str  # safetensors code the piece is cast to (of a quantized weight: the model dtype of its rows)
    stage: int  # pipeline stage of the rank file
    quantized: QuantizedOutput | None = None  # the quantized weight the piece's rows are part of
    first: int = 0  # with `quantized`: the piece's first element in the weight's rows

    def position(self, sub: Box) -> int:
        """Roughly where in the file the part `sub` of the piece lands (to read chunks in file order)."""
        n = _element_offset(sub, self.box)
        return self.offset + (n * self.quantized.bits // 8 if self.quantized else n * itemsize(self.dtype))


@dataclass(frozen=True)
class RankResult:
    file: str
    bytes: int
    sha256: str


# A lane slices and casts a piece this many output bytes at a time, so pieces never exist whole.
CAST_BLOCK_BYTES = 4 * 2**20
# Chunk buffers: the main thread reads the next chunks while lanes still cut pieces from earlier ones.
READ_BUFFERS = 2


class _ReadBuffers:
    """READ_BUFFERS chunk buffers: the main thread reads the next chunk while lanes still cut pieces from
    the last ones. A buffer is reused only once every lane job cutting from it has finished (or been skipped).
    """

    def __init__(
        self,
        chunk_bytes: int,
        check: Callable[[], None],
        count: int,
        make: Callable[[int], memoryview] | None = None,
    ) -> None:
        self.chunk_bytes, self.check, self.count = chunk_bytes, check, count
        self.make = make  # the k-th buffer (the quantize pool's shared ones), else a bytearray
        self.free: list[bytearray | memoryview] = []
        self.made = 0
        self.cond = threading.Condition()

    def take(self, n: int) -> bytearray | memoryview:
        with self.cond:
            t0 = profiling.clock()
            while not self.free and self.made >= self.count:
                self.check()
                self.cond.wait(0.1)
            profiling.current.add("buffer_wait", t0)
            if self.free:
                buf = self.free.pop()
            else:
                buf = self.make(self.made) if self.make else bytearray(self.chunk_bytes)
                self.made += 1
        return buf if len(buf) >= n else bytearray(n)  # only a chunk larger than chunk_bytes: never in practice

    def lend(self, buf: bytearray | memoryview, jobs: int) -> Callable[[], None]:
        """Hand `buf` to `jobs` lane jobs; returns what each job calls when done with it."""
        left = jobs

        def done() -> None:
            nonlocal left
            with self.cond:
                left -= 1
                if left == 0:
                    self.free.append(buf)
                    self.cond.notify_all()

        return done


@dataclass
class _Context:
    reader: _SourceReader
    lanes: WriteThreads
    buffers: _ReadBuffers
    on_bytes: Callable[[int], None]  # thread-safe
    quantize_pool: QuantizePool | None  # None: the plans quantize nothing


def _scatter(ctx: _Context, info: TensorInfo, targets: list[_Target]) -> None:
    """Hand every piece of one source tensor to its rank file's lane, each file's pieces in file order."""
    item = info.itemsize
    to_read = []
    for t in sorted(targets, key=lambda t: t.offset):
        if t.quantized is None and t.dtype == info.dtype and contiguous_run(t.box, info.shape):
            _submit_copy(ctx, info, t)
        else:
            to_read.append(t)
    chunks = []
    for chunk in chunk_boxes(info.shape, item, ctx.reader.chunk_bytes):
        users = [(t, sub) for t in to_read if (sub := _intersect(chunk, t.box)) is not None]
        if users:
            chunks.append((chunk, users))
    # Chunks in the order their pieces land (usually file order; not for a fused gate_up source, whose
    # gate half comes first in the source but second in mlp.fc), so files keep filling from the front.
    chunks.sort(key=lambda c: min(t.position(sub) for t, sub in c[1]))
    for chunk, users in chunks:
        buf = ctx.buffers.take(ctx.reader.byte_range(info, chunk)[1])
        t0 = profiling.clock()
        data = ctx.reader.read_bits(info, chunk, into=buf)
        profiling.current.add("chunk_read", t0, data.size * item)
        done = ctx.buffers.lend(buf, len(users))
        for t, sub in users:
            view = data[tuple(slice(s - c0, e - c0) for (s, e), (c0, _) in zip(sub, chunk, strict=False))]
            cast = cast_function(info.dtype, t.dtype)
            if t.quantized is not None:
                first = t.first + _element_offset(sub, t.box)
                _submit_quantized(ctx, view, t, first, info.dtype, done)
            else:
                offset = t.offset + _element_offset(sub, t.box) * itemsize(t.dtype)
                ctx.lanes.submit(t.writer.lane, functools.partial(_write_piece, ctx, view, t, offset, cast), done)


_lane_local = threading.local()


def _block(item: int) -> np.ndarray:
    """This lane's reused block of CAST_BLOCK_BYTES, as raw elements of `item` bytes: blocks made and freed
    by eight threads at once left ~300 MB of freed memory in the allocator's per-thread arenas (measured)."""
    buffers: dict[int, np.ndarray] = _lane_local.__dict__.setdefault("blocks", {})
    if item not in buffers:
        buffers[item] = np.empty(CAST_BLOCK_BYTES // item, dtype=BITS[item])
    return buffers[item]


def _cast_blocks(view: np.ndarray, item: int, cast: Cast, limit: int) -> Iterator[tuple[int, np.ndarray]]:
    """`view` gathered and cast into this lane's reused block, at most `limit` bytes of output at a time:
    (the block's first element in `view`, row-major; its raw output elements), valid until the next one."""
    whole = tuple((0, d) for d in view.shape)
    out = _block(item)
    for block in chunk_boxes(tuple(view.shape), item, limit):
        part = view[tuple(slice(s, e) for s, e in block)]
        n = part.size
        t0 = profiling.clock()
        cast(out[:n].reshape(part.shape), part)  # gathers the columns (and casts) in one pass
        profiling.current.add("gather_cast", t0, n * item)
        yield _element_offset(block, whole), out[:n]


def _write_piece(ctx: _Context, view: np.ndarray, t: _Target, offset: int, cast: Cast) -> None:
    """On the lane: slice and cast `view` block by block into the rank file (row-major, as one piece)."""
    item = itemsize(t.dtype)
    for start, data in _cast_blocks(view, item, cast, CAST_BLOCK_BYTES):
        t.writer.write(offset + start * item, data)
        ctx.on_bytes(data.size * item)


def _submit_quantized(
    ctx: _Context, view: np.ndarray, t: _Target, first: int, source: str, done: Callable[[], None]
) -> None:
    """On the main thread: hand the quantize pool `view` (elements [first, ...) of a quantized weight's rows,
    raw bits of dtype `source`) in blocks of whole row groups, and the lane a job that writes their results
    in row order."""
    q, pool = t.quantized, ctx.quantize_pool
    assert q is not None and pool is not None
    cast = cast_function(source, t.dtype)
    feed = Feed(lambda: ctx.lanes.cancelled)
    ctx.lanes.submit(t.writer.lane, functools.partial(_write_quantized, ctx, feed, t, cast), done)
    complete = False
    try:
        for start, part, pooled in _quantize_blocks(view, first, q, itemsize(t.dtype)):
            quantizing = pool.submit(q, start, part, source) if pooled else None
            feed.put(quantizing or (start, part))  # not pooled, or not where the workers can read it: the lane's
        complete = True
    finally:
        feed.close(complete)


def _quantize_blocks(
    view: np.ndarray, first: int, q: QuantizedOutput, item: int
) -> Iterator[tuple[int, np.ndarray, bool]]:
    """`view` cut, in row-major order, into (first element, part, whether it is whole row groups for the
    pool). A row group cut by the view's edge (a chunk need not end on one) comes as a part of its own,
    which the lane holds until the group's other rows arrive."""
    g = q.group_elements
    rows_per_block = BLOCK_BYTES // (q.k * item) // q.qt.group * q.qt.group
    whole_rows = view.ndim >= 2 and view.shape[-1] == q.k and first % q.k == 0
    if rows_per_block and whole_rows and math.prod(view.shape[:-2]) == 1:  # a run of rows: aligned to groups
        rows = view.reshape(view.shape[-2], q.k)
        r0 = first // q.k
        head = min(len(rows), -r0 % q.qt.group)
        tail = max(head, (r0 + len(rows)) // q.qt.group * q.qt.group - r0)
        if head:
            yield first, rows[:head], False
        for r in range(head, tail, rows_per_block):
            yield first + r * q.k, rows[r : min(tail, r + rows_per_block)], True
        if tail < len(rows):
            yield first + tail * q.k, rows[tail:], False
        return
    whole = tuple((0, d) for d in view.shape)
    limit = max(1, BLOCK_BYTES // (g * item)) * g * item
    for block in chunk_boxes(tuple(view.shape), item, limit):
        part = view[tuple(slice(s, e) for s, e in block)]
        start = first + _element_offset(block, whole)
        pooled = start % g == 0 and part.size % g == 0 and part.size * item <= BLOCK_BYTES
        yield start, part, pooled


def _write_quantized(ctx: _Context, feed: Feed, t: _Target, cast: Cast) -> None:
    """On the lane: write the blocks the main thread hands over, in order: the pool's results, and the
    parts of row groups cut by a chunk's edge, gathered here and held in the weight (a group at a time)."""
    q = t.quantized
    assert q is not None
    item = itemsize(t.dtype)
    try:
        for block in feed:
            if isinstance(block, Quantizing):
                block.write(q, t.writer)
                continue
            start, part = block
            for s, data in _cast_blocks(part, item, cast, q.group_elements * item):
                q.add(start + s, data, t.writer)
    except BaseException:
        feed.abandon()
        raise
    ctx.on_bytes(q.take_written())


def _submit_copy(ctx: _Context, info: TensorInfo, t: _Target) -> None:
    start, n = ctx.reader.byte_range(info, t.box)

    def copy() -> None:
        ctx.reader.copy_to(info, start, n, t.writer, t.offset)
        ctx.on_bytes(n)

    ctx.lanes.submit(t.writer.lane, copy)


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

    `workers` write threads share the rank files (default: two per core, 8 to 16); `direct_io` writes past
    the page cache where the file system allows. Rank files appear under their final names only when
    complete and flushed; on any error every temporary file is removed. Returns, per job, one result per
    rank file written.
    """
    n_files = sum(len(job.ranks()) for job in jobs)
    pool = _start_quantize_pool(jobs, chunk_bytes)  # first: it forks its workers before threads start
    try:
        prof = profiling.begin()
        lanes = WriteThreads(write_thread_count(workers, n_files))
        buffer_bytes = staging_buffer_bytes(n_files)
        n_io = writer.io_thread_count(n_files)
        io = ThreadPoolExecutor(n_io, thread_name_prefix="moe-convert-io") if n_io else None
    except BaseException:  # the try below, which stops the workers, has not begun
        if pool is not None:
            pool.close(cancel=True)
        raise
    writers: list[list[RankFileWriter]] = []
    reader: _SourceReader | None = None
    failed = False
    try:
        by_source: dict[str, list[_Target]] = {}
        made = 0
        for job in jobs:
            writers.append([])
            for r in job.ranks():
                lane, made = made % lanes.count, made + 1  # rank files spread round-robin over the lanes
                w = RankFileWriter(
                    job.output_dir / r.file,
                    r,
                    lane,
                    direct=direct_io,
                    buffer_bytes=buffer_bytes,
                    io=io,
                    depth=writer.DEPTH,
                )
                writers[-1].append(w)
                for t in r.tensors:
                    for target, source in _targets(w, t, r.coords.pp_rank):
                        by_source.setdefault(source, []).append(target)
        order = _write_order(by_source, tensors)
        reader = _SourceReader(sorted({tensors[n].file for n in order}), chunk_bytes)
        lock = threading.Lock()

        def counted(n: int) -> None:
            with lock:
                on_bytes(n)

        make_buffer = None
        if pool is not None:
            pool.check = lanes.check
            make_buffer = pool.arena.read_buffer  # where the pool's workers can read the chunks
        buffers = _ReadBuffers(chunk_bytes, lanes.check, READ_BUFFERS, make_buffer)
        ctx = _Context(reader, lanes, buffers, counted, pool)
        commit_when_done = _EarlyCommit(jobs, writers, by_source, reader, lanes, on_rank_done)
        for n in order:
            _scatter(ctx, tensors[n], by_source[n])
            commit_when_done(by_source[n])
        for ws in writers:  # writers no source tensor feeds (none in practice) are committed here
            for w in ws:
                commit_when_done.commit(w)
        t0 = profiling.clock()
        lanes.close()  # waits for the last pieces, checksums and renames
        prof.add("wait_lanes", t0)
        return [[commit_when_done.results[w] for w in ws] for ws in writers]
    except BaseException:
        failed = True
        lanes.close(cancel=True)  # before closing descriptors a lane may still be using
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
        if pool is not None:  # the lanes have stopped, and with them every use of the pool
            pool.close(cancel=failed)
        if io is not None:
            io.shutdown()
        if reader is not None:
            reader.close()
        profiling.end(f"{n_files} rank files, {lanes.count} write threads, {buffer_bytes >> 10} KiB staging")


def _start_quantize_pool(jobs: Sequence[WriteJob], chunk_bytes: int) -> QuantizePool | None:
    """The quantize pool, if any job quantizes: its arena holds the read buffers too."""
    if not any(t.quantized for job in jobs for r in job.ranks() for t in r.tensors):
        return None
    workers = quantize_pool.worker_count()
    arena = quantize_pool.Arena(READ_BUFFERS, chunk_bytes, quantize_pool.slot_count(workers))
    return QuantizePool(workers, arena, lambda: None, processes=quantize_pool.use_processes())


def _targets(w: RankFileWriter, t: PlannedTensor, stage: int) -> list[tuple[_Target, str]]:
    """Where each piece of an output tensor goes, with its source tensor's name. A quantized weight's
    pieces feed one QuantizedOutput, which also writes the weight's scales (a tensor with no pieces)."""
    base = w.layout.offsets[t.name]
    if t.quantized is None:
        return [(_Target(w, p.box, base + p.dst_offset, t.dtype, stage), p.source) for p in t.pieces]
    qt = t.quantized.tensor()
    q = QuantizedOutput(qt, base, w.layout.offsets[t.quantized.scale])
    item = itemsize(t.piece_dtype)
    targets = []
    for p in t.pieces:
        first = p.dst_offset // item
        offset = base + first // qt.shape[-1] * qt.row_bytes
        targets.append((_Target(w, p.box, offset, t.piece_dtype, stage, q, first), p.source))
    return targets


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
    """Commits a rank file as soon as the last source tensor it needs is handed over, not at the end.

    With pp > 1 the early stages' files are final (and survive an interruption, for --resume) long before
    the last stage's are. The commit runs on the file's lane after its last piece; results are recorded
    under a lock, as lanes finish files concurrently.
    """

    def __init__(
        self,
        jobs: Sequence[WriteJob],
        writers: list[list[RankFileWriter]],
        by_source: dict[str, list[_Target]],
        reader: _SourceReader,
        lanes: WriteThreads,
        on_rank_done: Callable[[Path, RankResult], None],
    ) -> None:
        self.reader = reader
        self.lanes = lanes
        self.on_rank_done = on_rank_done
        self.where: dict[RankFileWriter, tuple[Path, str]] = {}
        for job, ws in zip(jobs, writers, strict=True):
            for r, w in zip(job.ranks(), ws, strict=True):
                self.where[w] = (job.output_dir, r.file)
        self.remaining = dict.fromkeys(self.where, 0)  # source tensors still to hand over, per writer
        for targets in by_source.values():
            for w in dict.fromkeys(t.writer for t in targets):
                self.remaining[w] += 1
        self.committing: set[RankFileWriter] = set()
        self.results: dict[RankFileWriter, RankResult] = {}
        self.lock = threading.Lock()

    def __call__(self, targets: list[_Target]) -> None:
        for w in dict.fromkeys(t.writer for t in targets):
            self.remaining[w] -= 1
            if self.remaining[w] == 0:
                self.commit(w)

    def commit(self, w: RankFileWriter) -> None:
        if w in self.committing:
            return
        self.committing.add(w)
        output_dir, file = self.where[w]

        def finish() -> None:
            # A source shard rewritten during the run would make this file a mix of old and new bytes.
            self.reader.check_unchanged()
            result = RankResult(file, w.layout.size, w.finish())
            with self.lock:
                self.results[w] = result
                self.on_rank_done(output_dir, result)

        self.lanes.submit(w.lane, finish)
