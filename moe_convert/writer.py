"""Streaming safetensors writer: the header comes from the plan, then each rank file fills front to back.

safetensors' own writers need every tensor in memory at once; a rank file of a real model is tens of GB.
We lay each rank file out from the plan and stream its bytes in file order through page-aligned staging
buffers. Each file belongs to one write thread (its lane), which does all its work in order: reads source
bytes into the buffer a megabyte at a time and hashes them while they are still in the CPU cache (sha256
is sequential within a file, so files, not bytes, are what runs in parallel), and writes each full
buffer with O_DIRECT, past the page cache; from 8 cores each file has two buffers, and an I/O thread
writes the full one while the lane fills the other (see staging_defaults). On the 2-core VM a buffered write
costs ~1.8 CPU-seconds per GB in the kernel against ~0.1 with O_DIRECT (dd of 8.4 GB: 15.2 s vs 4.6 s,
measured), and 300 GB of dirty pages would push everything else out of memory.

Bytes that arrive ahead of a file's front (a source whose tensor order differs from ours) are parked in
the file through the page cache and streamed in when the front reaches them. Where O_DIRECT is refused
(tmpfs, some network file systems) the same stream is written through the page cache. A file gets its
final name only once it is complete and flushed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import profiling
from .errors import OutputError
from .header import itemsize
from .plan import RankPlan

PARTIAL_SUFFIX = ".partial"
# O_DIRECT writes whole blocks at block offsets; a page also keeps buffered (parked) and direct writes of
# one file from ever sharing a page, which the kernel cannot keep coherent.
ALIGN = max(4096, mmap.PAGESIZE)
# Bytes go into a file's staging buffer 1 MB at a time and are hashed right away, while still in the CPU
# cache (hashing whole 8 MB buffers afterwards, in another thread, made the conversion ~10% slower).
_STEP = 2**20
_MIN_BUFFER = 256 * 2**10
_STAGING_BUDGET = 256 * 2**20  # all staging buffers together; each shrinks (down to _MIN_BUFFER) to fit


def staging_defaults(cpus: int) -> tuple[int, int]:
    """(DEPTH, largest staging buffer) for a host with `cpus` cores.

    DEPTH is the number of staging buffers per rank file: with two, an I/O thread writes the full one
    while the lane hashes and fills the other. On a 16-core host with a virtual disk (4-layer 8x7B,
    benchmarks/profile_convert.py) each lane otherwise hashed, then waited for its own 1 MB write: with
    depth 2 and 4 MB buffers tp4/moe_tp2/moe_ep2 took 6.2 s instead of 7.8 s; 8 MB buffers were another
    6-12% faster than 4 MB there (that disk, like dd, writes larger blocks faster). On 2 cores the lanes
    are busy hashing, with no idle wait to overlap: an I/O thread per lane and 8 MB buffers both measured
    no faster there, so small hosts keep one 1 MB buffer.
    """
    return (2, 8 * 2**20) if cpus >= 8 else (1, 2**20)


DEPTH, _MAX_BUFFER = staging_defaults(os.cpu_count() or 1)
_sha256 = hashlib.sha256  # one place to swap the hash out (benchmarks/bench_checksum.py measures its cost)
_ZEROS = bytes(_MIN_BUFFER)


@dataclass(frozen=True)
class FileLayout:
    """A rank file's bytes before any tensor data: the header, and where each tensor's data starts."""

    header: bytes  # 8-byte length + JSON, padded with spaces to a multiple of 8
    offsets: dict[str, int]  # tensor name -> absolute offset of its data in the file
    size: int

    @property
    def data_start(self) -> int:
        return len(self.header)


def layout_rank_file(rank: RankPlan) -> FileLayout:
    """Lay out a rank file from its plan (pure: the same plan gives the same bytes)."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    relative: dict[str, int] = {}
    offset = 0
    for t in rank.tensors:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        relative[t.name] = offset
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # keeps the data 8-byte aligned, as safetensors' own writer does
    header = len(body).to_bytes(8, "little") + body
    return FileLayout(header, {k: len(header) + v for k, v in relative.items()}, len(header) + offset)


def padding_ranges(rank: RankPlan, layout: FileLayout) -> list[tuple[int, int]]:
    """Byte ranges no piece writes (vocab padding): they stay zero from the file's creation. A quantized
    weight and its scales are computed whole from the weight's pieces: no padding."""
    gaps = []
    for t in rank.tensors:
        if t.quantized is not None:
            continue
        base, covered = layout.offsets[t.name], 0
        item = itemsize(t.dtype)
        for p in sorted(t.pieces, key=lambda p: p.dst_offset):
            if p.dst_offset > covered:
                gaps.append((base + covered, base + p.dst_offset))
            covered = max(covered, p.dst_offset + p.numel * item)
        if covered < t.nbytes:
            gaps.append((base + covered, base + t.nbytes))
    return gaps


def staging_buffer_bytes(n_files: int, depth: int | None = None) -> int:
    share = _STAGING_BUDGET // max(1, n_files * (depth or DEPTH))
    return max(_MIN_BUFFER, min(_MAX_BUFFER, share)) // ALIGN * ALIGN


def io_thread_count(n_files: int, depth: int | None = None) -> int:
    """Threads that write full staging buffers (0: each lane writes its own, synchronously)."""
    depth = depth or DEPTH
    return 0 if depth <= 1 else min(32, n_files * (depth - 1))


def write_thread_count(workers: int | None, n_files: int) -> int:
    """`workers`, else two per core, 8 to 16 (a thread waiting for its O_DIRECT write leaves the core to
    another: 2-layer tp8/moe_ep8 on 2 cores took 5.0-5.1 s with 8 threads, 6.6-6.7 s with 4, measured);
    never more than there are rank files, each of which belongs to one thread."""
    default = max(8, min(16, 2 * (os.cpu_count() or 1)))
    return max(1, min(workers or default, n_files))


class WriteThreads:
    """The lanes: threads that each do all the work of their rank files, in the order it was submitted.

    Reads, casts, sha256 and writes release the GIL, so lanes run in parallel with each other and with
    the main thread, which reads the chunks that need slicing and hands out the work. The first error
    stops the work and is raised in the main thread (by submit, check or close).
    """

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.error: BaseException | None = None
        self._cancelled = False
        self._queues: list[queue.SimpleQueue[tuple[Callable[[], None], Callable[[], None]] | None]] = [
            queue.SimpleQueue() for _ in range(self.count)
        ]
        self._threads = [
            threading.Thread(target=self._loop, args=(q,), name=f"moe-convert-write{k}", daemon=True)
            for k, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def submit(self, lane: int, job: Callable[[], None], release: Callable[[], None] = lambda: None) -> None:
        """Run `job` on the lane's thread after everything submitted to it before; `release` always runs."""
        self.check()
        self._queues[lane % self.count].put((job, release))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def cancelled(self) -> bool:
        """Whether close(cancel=True) has begun: a job waiting for more work must stop."""
        return self._cancelled

    def close(self, *, cancel: bool = False) -> None:
        """Finish (or, cancelling, skip) the queued work and stop the threads; raise the first error."""
        self._cancelled = self._cancelled or cancel
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        if not cancel:
            self.check()

    def _loop(self, q: queue.SimpleQueue[tuple[Callable[[], None], Callable[[], None]] | None]) -> None:
        prof = profiling.current
        prof.thread_start()
        while True:
            t0 = profiling.clock()
            item = q.get()
            prof.add("queue_wait", t0)
            if item is None:
                break
            job, release = item
            try:
                if self.error is None and not self._cancelled:
                    job()
            except BaseException as e:  # raised in the main thread by check() / close()
                if self.error is None:
                    self.error = e
            finally:
                release()
        prof.thread_done()


class RankFileWriter:
    """One rank file, written front to back under a temporary name; `finish` flushes and renames it.

    After construction every call runs on the file's lane (see WriteThreads), one at a time. Bytes
    before `front` are staged or written; complete ranges past it wait in `_ahead` (parked in the file,
    or padding that stays zero) until the front reaches them.
    """

    def __init__(
        self,
        path: Path,
        rank: RankPlan,
        lane: int,
        *,
        direct: bool = True,
        buffer_bytes: int = _MAX_BUFFER,
        io: ThreadPoolExecutor | None = None,
        depth: int = 1,
    ) -> None:
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self.layout = layout_rank_file(rank)
        self.lane = lane
        self._buffer_bytes = max(ALIGN, buffer_bytes // ALIGN * ALIGN)
        self._sha = _sha256()
        self.front = 0
        self._ahead: dict[int, tuple[int, bool]] = {}  # start -> (stop, is_padding)
        # A ring of staging buffers; the one being filled is _bufs[_cur], the others may be in flight.
        self._io = io if depth > 1 else None
        self._bufs: list[mmap.mmap | None] = [None] * (depth if self._io else 1)
        self._in_flight: list[Future[None] | None] = [None] * len(self._bufs)
        self._cur = 0
        self._base = 0  # file offset of the staging buffer's first byte
        self._fill = 0
        self._spill_fd = -1  # a buffered descriptor for parked bytes (and reading them back)
        self.fd = -1
        self._created = False  # abort removes the temporary file only if this writer made it
        try:
            self.fd, self.direct = _open_output(self.partial, direct)
            self._created = True
            for start, stop in padding_ranges(rank, self.layout):
                self._ahead[start] = (stop, True)
            self.write(0, self.layout.header)
        except BaseException as e:  # an interrupt here too must not leave the temporary file behind
            self.abort()
            if isinstance(e, OSError):
                raise _output_error(self.partial, e, self.layout.size) from e
            raise

    def write(self, offset: int, data: Any) -> None:
        """Write any buffer (bytes, a numpy array) at `offset`."""
        view = memoryview(data).cast("B")
        if not view:
            return
        if offset == self.front:
            self._stage(view)
            self._catch_up()
        else:
            t0 = profiling.clock()
            spill = self._park(offset, len(view))
            _pwrite_all(spill, view, offset, self.partial, self.layout.size)
            profiling.current.add("park", t0, len(view))

    def copy_from(self, src_fd: int, src_offset: int, n: int, offset: int) -> int:
        """Copy n bytes of another file to `offset`; returns how many were copied (fewer only if the
        source ended early). Read errors of the source are the caller's to judge."""
        if n == 0:
            return 0
        if offset == self.front:
            copied = self._stage_from(src_fd, src_offset, n)
            self._catch_up()
            return copied
        spill = self._park(offset, n)
        copied, scratch = 0, bytearray(min(n, _MAX_BUFFER))
        while copied < n:
            got = os.preadv(src_fd, [memoryview(scratch)[: min(len(scratch), n - copied)]], src_offset + copied)
            if got == 0:
                break
            _pwrite_all(spill, memoryview(scratch)[:got], offset + copied, self.partial, self.layout.size)
            copied += got
        if copied < n:
            self._ahead[offset] = (offset + copied, False)
        return copied

    def finish(self) -> str:
        """Write the last block, flush, give the file its final name; returns its sha256."""
        if self.front != self.layout.size or self._ahead:
            raise OutputError(
                f"{self.partial}: only {self.front} of {self.layout.size} bytes were written; this is a bug in the plan"
            )
        if self._fill:
            self._flush()
        self._wait_all()
        try:
            if self._spill_fd >= 0:
                os.close(self._spill_fd)
                self._spill_fd = -1
            os.ftruncate(self.fd, self.layout.size)  # the last block was padded to a whole one
            t0 = profiling.clock()
            os.fsync(self.fd)
            profiling.current.add("fsync", t0)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.partial, self.path)
        except OSError as e:
            raise _output_error(self.path, e, self.layout.size) from e
        self._bufs = [None] * len(self._bufs)
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close and remove the temporary file (best effort: we may be unwinding from an error).
        Only once the lanes have stopped: the file's lane may still be using the descriptors."""
        for k in range(len(self._in_flight)):  # writes still in flight use the descriptor
            with contextlib.suppress(BaseException):
                self._wait(k)
        for fd in (self.fd, self._spill_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._spill_fd = -1
        if self._created:
            with contextlib.suppress(OSError):
                self.partial.unlink()

    # -- the in-order stream

    def _buffer(self) -> memoryview:
        buf = self._bufs[self._cur]
        if buf is None:
            buf = self._bufs[self._cur] = mmap.mmap(-1, self._buffer_bytes)  # page-aligned, as O_DIRECT needs
        return memoryview(buf)

    def _advance(self, n: int) -> None:
        buf = self._bufs[self._cur]
        assert buf is not None
        t0 = profiling.clock()
        self._sha.update(memoryview(buf)[self._fill : self._fill + n])
        profiling.current.add("hash", t0, n)
        self._fill += n
        self.front += n
        if self._fill == self._buffer_bytes:
            self._flush()

    def _stage(self, view: memoryview) -> None:
        while view:
            buf = self._buffer()
            n = min(len(view), len(buf) - self._fill, _STEP)
            t0 = profiling.clock()
            buf[self._fill : self._fill + n] = view[:n]
            profiling.current.add("stage_copy", t0, n)
            view = view[n:]
            self._advance(n)

    def _stage_from(self, src_fd: int, src_offset: int, n: int) -> int:
        copied = 0
        while copied < n:
            buf = self._buffer()
            want = min(n - copied, len(buf) - self._fill, _STEP)
            t0 = profiling.clock()
            got = os.preadv(src_fd, [buf[self._fill : self._fill + want]], src_offset + copied)
            profiling.current.add("read", t0, got)
            if got == 0:
                break
            copied += got
            self._advance(got)
        return copied

    def _park(self, offset: int, n: int) -> int:
        """Record [offset, offset + n) as arriving ahead of the front; returns the descriptor to write it to."""
        if offset < self.front or offset in self._ahead:
            raise OutputError(f"{self.partial}: bytes at offset {offset} written twice; this is a bug in the plan")
        if self._spill_fd < 0:
            try:
                self._spill_fd = os.open(self.partial, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as e:
                raise _output_error(self.partial, e, self.layout.size) from e
        self._ahead[offset] = (offset + n, False)
        return self._spill_fd

    def _catch_up(self) -> None:
        """Stream in the ranges that were complete ahead of the front, now that it has reached them."""
        while (entry := self._ahead.pop(self.front, None)) is not None:
            stop, is_padding = entry
            n = stop - self.front
            if is_padding:
                while n:
                    k = min(n, len(_ZEROS))
                    self._stage(memoryview(_ZEROS)[:k])
                    n -= k
            elif self._stage_from(self._spill_fd, self.front, n) != n:
                raise OutputError(f"{self.partial}: shorter than written; was it changed meanwhile?")

    def _flush(self) -> None:
        """Write the staged (and hashed) bytes at their place, in whole blocks: now, or with a ring of
        buffers by an I/O thread while the lane goes on filling the next buffer."""
        buf = self._bufs[self._cur]
        assert buf is not None
        view = memoryview(buf)
        fill = self._fill
        length = -(-fill // ALIGN) * ALIGN  # the file's last block is padded, then truncated in finish
        if length > fill:
            view[fill:length] = bytes(length - fill)
        if self._io is None:
            self._write_block(view[:length], self._base)
        else:
            self._in_flight[self._cur] = self._io.submit(self._write_block, view[:length], self._base)
            self._cur = (self._cur + 1) % len(self._bufs)
            self._wait(self._cur)  # the next buffer's last write must be done before it is refilled
        self._base += fill
        self._fill = 0

    def _wait(self, k: int) -> None:
        pending, self._in_flight[k] = self._in_flight[k], None
        if pending is not None:
            t0 = profiling.clock()
            pending.result()  # raises the write's error here, on the lane
            profiling.current.add("write_wait", t0)

    def _wait_all(self) -> None:
        for k in range(len(self._in_flight)):
            self._wait(k)

    def _write_block(self, view: memoryview, offset: int) -> None:
        t0 = profiling.clock()
        try:
            _pwrite_all(self.fd, view, offset, self.partial, self.layout.size)
            profiling.current.add("write", t0, len(view))
        except OutputError as e:
            if not (self.direct and isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.EINVAL):
                raise
            # The file system took O_DIRECT at open but refuses the write: go through the page cache.
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            _pwrite_all(self.fd, view, offset, self.partial, self.layout.size)


# Our temporary files are always new: never a file, or a link, that was there before (it could lead anywhere).
_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_output(path: Path, direct: bool) -> tuple[int, bool]:
    flags = os.O_RDWR | _CREATE
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def _pwrite_all(fd: int, view: memoryview, offset: int, path: Path, size: int) -> None:
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise _output_error(path, e, size) from e


def _output_error(path: Path, e: OSError, size: int) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"{path}: disk full (or file size limit) while writing {size} bytes: {e.strerror}; "
            "free space or choose another --output_dir"
        )
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def write_json_atomic(path: Path, data: object) -> None:
    """Write a small JSON file under a temporary name, flush, then rename (deterministic bytes)."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | _CREATE, 0o644)
    except OSError as e:  # not ours (a file or link already there): left alone
        raise _output_error(tmp, e, len(text)) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C or SIGTERM mid-write too: leave no temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise _output_error(path, e, len(text)) from e
        raise
