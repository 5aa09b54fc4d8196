"""Threads that quantize for all lanes, so one weight's rows are quantized on every core at once.

A lane owns whole rank files, and under tp8/moe_ep8 all of an expert's weights go to one file: with the
lanes quantizing their own chunks, a 16-core host had ~1.4 cores quantizing at a time (measured, issue 14).
So the main thread, as soon as it has read a chunk, cuts each quantized piece of it into blocks of whole
row groups and hands them to this pool, which gathers and casts them (numpy) and quantizes them (torch),
both outside the GIL; it hands the lane a Feed of the results in row order, which the lane writes into
its file as they come back. Whole row groups are independent (weight_only.py), so any thread may take any
block, and the pool works on the next chunks while lanes still write the last ones (when lanes cut the
blocks, a lane's chunk went to the pool only after its previous one was written: the pool idled half the
time on the 16-core host, measured).

Memory: a block is quantized into one of `slot_count` reused buffers (its stored bytes, and its input
when it needs a gather or cast first), and each thread keeps weight_only's scratch for one step. The main
thread waits for a free slot; slots come back as lanes write their results, which needs only the pool's
threads, so the wait always ends.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import profiling
from .casts import Cast
from .header import itemsize
from .quantize_stream import QuantizedOutput, Sink
from .reading import BITS
from .weight_only import scratch_bytes

# The input a block may have (model-dtype bytes), and so its stored bytes (at most half: int8 of 2-byte
# values; float32 models give a quarter).
BLOCK_BYTES = 4 * 2**20
SLOT_BYTES = BLOCK_BYTES + BLOCK_BYTES // 2


def thread_count() -> int:
    """One per core, at most 8: between a step's torch ops a thread holds the GIL, and each holds
    its scratch (16 threads quantized less than 8 on the 16-core host, measured)."""
    return max(1, min(8, os.cpu_count() or 1))


def slot_count(threads: int) -> int:
    """Enough for the blocks of both read buffers' chunks (2 x 64 MiB in 4 MiB blocks on 8 threads), so
    the threads have the next chunk's blocks queued while lanes write the last one's."""
    return 4 * threads


def memory_bytes(threads: int, group_elements: int) -> int:
    """What the pool holds at most, for row groups of at most `group_elements`: its slots, and each
    thread's scratch."""
    return slot_count(threads) * SLOT_BYTES + threads * scratch_bytes(group_elements)


class _Slot:
    """One block's buffers, reused: its stored bytes, and (made at its first gathered or cast block) its
    model-dtype elements."""

    def __init__(self) -> None:
        self.stored = np.empty(SLOT_BYTES - BLOCK_BYTES, dtype=np.uint8)
        self.values: np.ndarray | None = None

    def input(self) -> np.ndarray:
        if self.values is None:
            self.values = np.empty(BLOCK_BYTES, dtype=np.uint8)
        return self.values


class QuantizePool:
    """`threads` quantizing threads and `slot_count(threads)` block buffers, shared by every lane."""

    def __init__(self, threads: int, check: Callable[[], None]) -> None:
        self.check = check  # raises the conversion's first error (a waiting thread must not wait forever)
        self.executor = ThreadPoolExecutor(
            threads, thread_name_prefix="moe-convert-quantize", initializer=profiling.current.thread_start
        )
        self.slots = slot_count(threads)
        self.free: list[_Slot] = []
        self.made = 0
        self.cond = threading.Condition()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, q: QuantizedOutput, start: int, part: np.ndarray, cast: Cast | None) -> Quantizing:
        """Quantize `part`, elements [start, ...) of `q`'s rows, whole row groups, before the cast (None:
        `part` is contiguous and in the model dtype already). Waits for a free slot. `part` must stay as
        it is until the result is written or abandoned."""
        slot = self._take()
        try:
            future = self.executor.submit(_run, slot, q, start, part, cast)
        except BaseException:
            self._give(slot)
            raise
        return Quantizing(self, start, part.size, slot, future)

    def _take(self) -> _Slot:
        with self.cond:
            t0 = profiling.clock()
            while not self.free and self.made >= self.slots:
                self.check()
                self.cond.wait(0.1)
            profiling.current.add("slot_wait", t0)
            if self.free:
                return self.free.pop()
            self.made += 1
        return _Slot()

    def _give(self, slot: _Slot) -> None:
        with self.cond:
            self.free.append(slot)
            self.cond.notify()


def _run(
    slot: _Slot, q: QuantizedOutput, start: int, part: np.ndarray, cast: Cast | None
) -> tuple[np.ndarray, np.ndarray]:
    """On a pool thread: gather and cast `part` into the slot (unless it already is the model dtype's
    contiguous elements: then it is read where it is), then quantize it."""
    if cast is None:
        values = part.reshape(-1)
    else:
        values = slot.input().view(BITS[itemsize(q.qt.dtype)])[: part.size]
        t0 = profiling.clock()
        cast(values.reshape(part.shape), part)
        profiling.current.add("gather_cast", t0, values.nbytes)
    return q.quantize_groups(start, values, slot.stored)


@dataclass
class Quantizing:
    """A block on its way through the pool; the lane writes it (once) or, after an error, abandons it."""

    pool: QuantizePool
    start: int
    n: int
    slot: _Slot
    future: Future[tuple[np.ndarray, np.ndarray]]

    def write(self, q: QuantizedOutput, writer: Sink) -> None:
        try:
            t0 = profiling.clock()
            data, scales = self.future.result()
            profiling.current.add("quantize_wait", t0)
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
        self.items: queue.SimpleQueue[FeedItem | bool] = queue.SimpleQueue()
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
            except queue.Empty:
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
            except queue.Empty:
                return
            if isinstance(item, Quantizing):
                item.abandon()
