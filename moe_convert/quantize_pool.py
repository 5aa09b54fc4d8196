"""Worker processes that quantize for all lanes, so one weight's rows are quantized on every core at once.

A lane owns whole rank files, and under tp8/moe_ep8 all of an expert's weights go to one file, so the
quantizing is shared out: as soon as the main thread has read a chunk, it cuts each quantized piece of it
into blocks of whole row groups and hands them to this pool; the lane gets a Feed of the results in row
order and writes them into its file as they come back. Whole row groups are independent (weight_only.py),
so any worker may take any block, and the workers quantize the next chunks while lanes still write the
last ones.

Processes, not threads: between a step's calls a thread holds the GIL, and in a conversion the GIL is
also wanted by 8 write threads, 8 I/O threads and the reader. On the 16-core host 8 quantizing threads got
0.16 GB/s each (1.3 GB/s in all) where one alone gets 0.4-0.8, and the conversion took 1.5-2.4x the
unquantized time depending on the instance (measured, issue 14). The workers are forked from the
converter before its lanes start (they share its pages, import nothing and start in milliseconds), and
read the blocks where the main thread read them: the read buffers and the blocks' stored bytes
live in one anonymous shared mapping made before the fork (the Arena), so a task is a few hundred bytes
and no block is copied between processes. Workers ignore SIGINT (the converter handles it and stops
them), die with the converter (PR_SET_PDEATHSIG, and a parent check), and a worker's death fails the
conversion in one line. Where fork is not available, the same tasks run on threads.

Memory: the Arena (the read buffers, which the converter has anyway, and `slot_count` blocks' stored
bytes) and per worker weight_only's scratch, an input buffer for blocks that need a gather or cast, and
what a forked worker copies of the converter's pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

from . import profiling
from .casts import cast_function
from .errors import MoeConvertError
from .header import itemsize
from .quantize_stream import QuantizedOutput, Sink, quantize_groups
from .reading import BITS
from .weight_only import GATHER_INDEX_BYTES, QuantizedTensor, scratch_bytes

# The input a block may have (model-dtype bytes), and so its stored bytes (at most half: int8 of 2-byte
# values; float32 models give a quarter).
BLOCK_BYTES = 4 * 2**20
STORED_BYTES = BLOCK_BYTES // 2
# What a forked worker holds beyond its buffers: the converter's pages it writes to (Python objects whose
# reference counts change, numpy's state). Measured: 24 MB of Pss_Anon per worker, buffers included
# (1-layer Mixtral-8x7B tp8/moe_ep8 int8 on the 2-core VM).
WORKER_BASE_BYTES = 16 * 2**20


def worker_count() -> int:
    """One per core, at most 8 (the lanes, the reader and the I/O threads need cores too)."""
    return max(1, min(8, os.cpu_count() or 1))


def slot_count(workers: int) -> int:
    """Enough for the blocks of both read buffers' chunks (2 x 64 MiB in 4 MiB blocks on 8 workers), so
    the workers have the next chunk's blocks queued while lanes write the last one's."""
    return 4 * workers


def memory_bytes(workers: int, group_elements: int) -> int:
    """What the pool holds beyond the read buffers, for row groups of at most `group_elements`: the slots'
    stored bytes, and per worker its scratch, its input buffer, its gather indexes and its own pages."""
    per_worker = scratch_bytes(group_elements) + BLOCK_BYTES + GATHER_INDEX_BYTES + WORKER_BASE_BYTES
    return slot_count(workers) * STORED_BYTES + workers * per_worker


def use_processes() -> bool:
    """Fork workers where fork is the usual way and PR_SET_PDEATHSIG exists: Linux."""
    return sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()


class Arena:
    """One anonymous shared mapping, made before the workers are forked so that they share it: the read
    buffers, then each slot's stored bytes."""

    def __init__(self, read_buffers: int, chunk_bytes: int, slots: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.read_end = read_buffers * chunk_bytes
        self.map = mmap.mmap(-1, self.read_end + slots * STORED_BYTES)  # MAP_SHARED: pages made when touched
        self.base = np.frombuffer(self.map, dtype=np.uint8)
        self.address = self.base.ctypes.data

    def read_buffer(self, index: int) -> memoryview:
        return memoryview(self.map)[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]

    def stored(self, slot: int) -> int:
        """The arena offset of slot `slot`'s stored bytes."""
        return self.read_end + slot * STORED_BYTES

    def locate(self, part: np.ndarray) -> int | None:
        """The arena offset of `part`'s first element, if all of it lies in the read buffers."""
        first = part.ctypes.data - self.address
        low = first + sum(s * (n - 1) for s, n in zip(part.strides, part.shape, strict=True) if s < 0)
        high = first + sum(s * (n - 1) for s, n in zip(part.strides, part.shape, strict=True) if s > 0)
        return first if part.size and low >= 0 and high + part.itemsize <= self.read_end else None


@dataclass(frozen=True)
class _Task:
    """A block for a worker: where its elements are in the arena, and where its stored bytes go."""

    tid: int
    qt: QuantizedTensor
    start: int  # the block's first element in the weight's rows
    source: str  # dtype code of the elements as read
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    stored: int


def _quantize_task(base: np.ndarray, scratch: np.ndarray, task: _Task) -> bytes:
    """In a worker: gather and cast the block into `scratch` (unless it already is the model dtype's
    contiguous elements: then it is read where it is), quantize it into its slot; returns the scale bytes."""
    part = np.ndarray(
        task.shape, dtype=BITS[itemsize(task.source)], buffer=base, offset=task.offset, strides=task.strides
    )
    qt = task.qt
    if task.source == qt.dtype and part.flags.c_contiguous:
        values = part.reshape(-1)
    else:
        values = scratch.view(BITS[itemsize(qt.dtype)])[: part.size]
        cast_function(task.source, qt.dtype)(values.reshape(part.shape), part)
    _, scales = quantize_groups(qt, task.start, values, base[task.stored : task.stored + STORED_BYTES])
    return scales.tobytes()


def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the converter (a forked child should not take the loader's lock)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _worker(arena: mmap.mmap, tasks: Connection, parent: int, prctl: Callable[..., int] | None) -> None:
    """A worker process's life: quantize tasks until told to stop, or until the converter is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the converter stops us
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the converter (its forking thread) even if killed
    base = np.frombuffer(arena, dtype=np.uint8)
    scratch = np.empty(BLOCK_BYTES, dtype=np.uint8)
    while True:
        if not tasks.poll(1.0):
            if os.getppid() != parent:
                return
            continue
        task = tasks.recv()
        if task is None:
            return
        t0 = time.perf_counter()
        try:
            reply: tuple[object, ...] = (task.tid, _quantize_task(base, scratch, task), None)
        except Exception as e:  # every error goes back to the converter, which reports it
            reply = (task.tid, None, _portable(e))
        tasks.send((*reply, time.perf_counter() - t0))


def _portable(e: Exception) -> Exception:
    """`e`, if it survives pickling (our errors and the builtins do), else its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class QuantizePool:
    """`workers` quantizing processes (threads where fork is unavailable) and `slot_count(workers)` block
    slots in `arena`, shared by every lane."""

    def __init__(self, workers: int, arena: Arena, check: Callable[[], None], processes: bool = True) -> None:
        self.arena = arena
        self.check = check  # raises the conversion's first error (a waiting thread must not wait forever)
        self.slots = slot_count(workers)
        self.free = list(range(self.slots))
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[Future[bytes], int]] = {}  # task -> (its future, its worker)
        self.next_tid = 0
        self.broken: BaseException | None = None
        self.closing = False
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.load: list[int] = []
        self.threads: ThreadPoolExecutor | None = None
        if processes:
            self._fork(workers)
            self.collector = threading.Thread(target=self._collect, name="moe-convert-collect", daemon=True)
            self.collector.start()
        else:
            self.threads = ThreadPoolExecutor(workers, thread_name_prefix="moe-convert-quantize")
            self.local = threading.local()

    def _fork(self, workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        prctl = _libc_prctl()
        for k in range(workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(self.arena.map, theirs, os.getpid(), prctl),
                name=f"moe-convert-quantize{k}",
                daemon=True,
            )
            with warnings.catch_warnings():  # Python 3.12+ warns on fork with threads; a worker runs only _worker
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
            self.load.append(0)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: after their tasks, or (`cancel`) at once."""
        self.closing = True
        if self.threads is not None:
            self.threads.shutdown(wait=True, cancel_futures=True)
            return
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if cancel:
                proc.kill()
            else:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.collector.join()
        for conn in self.conns:
            conn.close()

    def submit(self, q: QuantizedOutput, start: int, part: np.ndarray, source: str) -> Quantizing | None:
        """Quantize `part` (raw bits of dtype `source`), elements [start, ...) of `q`'s rows, whole row
        groups; None, doing nothing, if `part` is not in the arena's read buffers (where the workers can read
        it). Waits for a free slot. `part` must stay as it is until the result is written or abandoned."""
        offset = self.arena.locate(part)
        if offset is None:
            return None
        slot = self._take()
        task = _Task(self.next_tid, q.qt, start, source, offset, part.shape, part.strides, self.arena.stored(slot))
        self.next_tid += 1
        try:
            future = self._run(task)
        except BaseException:
            self._give(slot)
            raise
        return Quantizing(self, start, part.size, slot, future)

    def _run(self, task: _Task) -> Future[bytes]:
        if self.threads is not None:
            return self.threads.submit(self._in_thread, task)
        future: Future[bytes] = Future()
        with self.cond:
            if self.broken is not None:
                raise self.broken
            k = min(range(len(self.conns)), key=self.load.__getitem__)  # the least loaded worker
            self.load[k] += 1
            self.pending[task.tid] = (future, k)
        try:
            self.conns[k].send(task)
        except OSError:  # it died: say so as the collector would
            raise self._death_error(self.procs[k]) from None
        return future

    def _in_thread(self, task: _Task) -> bytes:
        scratch = getattr(self.local, "scratch", None)
        if scratch is None:
            scratch = self.local.scratch = np.empty(BLOCK_BYTES, dtype=np.uint8)
        return _quantize_task(self.arena.base, scratch, task)

    def _collect(self) -> None:
        """The converter's thread that takes the workers' replies (and notices a worker's death)."""
        prof = profiling.current
        alive = {proc.sentinel: proc for proc in self.procs}
        while alive:
            ready = wait([*self.conns, *alive], timeout=0.5)
            for conn in ready:
                if not isinstance(conn, Connection):
                    continue
                try:
                    tid, scales, error, seconds = conn.recv()
                except (EOFError, OSError):
                    continue  # its death is seen by its sentinel
                prof.add("quantize", profiling.clock() - seconds)
                with self.cond:
                    future, k = self.pending.pop(tid, (None, 0))
                    self.load[k] -= 1
                if future is None:  # failed already, as the pool broke
                    continue
                if error is None:
                    future.set_result(scales)
                else:
                    future.set_exception(error)
            for sentinel in [s for s in ready if isinstance(s, int)]:
                proc = alive.pop(sentinel)
                if not self.closing:
                    self._fail(proc)
                    return

    def _death_error(self, proc: multiprocessing.process.BaseProcess) -> MoeConvertError:
        proc.join(1)  # its sentinel fires before it is reaped
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        hint = " (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""
        return MoeConvertError(
            f"weight-only quantization: a quantize worker process (pid {proc.pid}) {how}{hint}, so the "
            "conversion stopped; rerun it (--resume keeps the rank files already finished)"
        )

    def _fail(self, proc: multiprocessing.process.BaseProcess) -> None:
        error = self._death_error(proc)
        with self.cond:
            self.broken = error
            pending, self.pending = self.pending, {}
        for future, _ in pending.values():
            future.set_exception(error)

    def _take(self) -> int:
        with self.cond:
            t0 = profiling.clock()
            while not self.free:
                self.check()
                self.cond.wait(0.1)
            profiling.current.add("slot_wait", t0)
            return self.free.pop()

    def _give(self, slot: int) -> None:
        with self.cond:
            self.free.append(slot)
            self.cond.notify()


@dataclass
class Quantizing:
    """A block on its way through the pool; the lane writes it (once) or, after an error, abandons it."""

    pool: QuantizePool
    start: int
    n: int
    slot: int
    future: Future[bytes]

    def write(self, q: QuantizedOutput, writer: Sink) -> None:
        try:
            t0 = profiling.clock()
            scales = np.frombuffer(self.future.result(), dtype=np.uint8)
            profiling.current.add("quantize_wait", t0)
            stored = self.pool.arena.stored(self.slot)
            data = self.pool.arena.base[stored : stored + self.n // q.k * q.qt.row_bytes]
            q.add_quantized(self.start, self.n, data, scales, writer)
        finally:
            self.pool._give(self.slot)

    def abandon(self) -> None:
        """Wait for it (it reads the chunk buffer, which is reused once its lane job ends), free its slot."""
        try:
            self.future.exception()
        finally:
            self.pool._give(self.slot)


class FeedClosed(Exception):
    """The main thread stopped handing a lane job its blocks (an error elsewhere, raised there)."""


# A lane job's block: one on its way through the pool, or (first element, elements) it quantizes itself.
FeedItem = Quantizing | tuple[int, np.ndarray]


class Feed:
    """One lane job's blocks, in row order, handed over by the main thread as it cuts them."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        import queue

        self.items: queue.SimpleQueue[FeedItem | bool] = queue.SimpleQueue()
        self.empty = queue.Empty
        self.cancelled = cancelled  # the conversion is being torn down: stop waiting

    def put(self, item: FeedItem) -> None:
        self.items.put(item)

    def close(self, complete: bool) -> None:
        """No more items; `complete` False: the job is cut short (its lane stops without writing more)."""
        self.items.put(complete)

    def __iter__(self) -> Iterator[FeedItem]:
        while True:
            try:
                item = self.items.get(timeout=0.1)
            except self.empty:
                if self.cancelled():
                    raise FeedClosed from None
                continue
            if item is True:
                return
            if item is False:
                raise FeedClosed
            yield item

    def abandon(self) -> None:
        """After an error on the lane: let go of the blocks handed over so far."""
        while True:
            try:
                item = self.items.get_nowait()
            except self.empty:
                return
            if isinstance(item, Quantizing):
                item.abandon()
