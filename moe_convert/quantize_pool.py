"""Threads that quantize for all lanes, so one weight's rows are quantized on every core at once.

A lane owns whole rank files, and under tp8/moe_ep8 all of an expert's weights go to one file: with the
lanes quantizing their own chunks, a 16-core host had ~1.4 cores quantizing at a time (measured, issue 14).
Now a lane cuts its piece of a chunk into blocks of whole row groups and hands each block to this pool,
which gathers and casts it (numpy) and quantizes it (torch), both outside the GIL; the lane writes the
results into its file in order, as they come back. Whole row groups are independent (weight_only.py), so
any thread may take any block.

Memory: a block is taken from the chunk buffer into one of `slots` reused buffers (input and stored
bytes), and each thread keeps weight_only's scratch for one step. The lane keeps at most the slots it
could take; a lane that finds none free first writes its own oldest result (so lanes never wait on
each other's slots for long, and never deadlock: a result needs only a thread, never a lane).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import profiling
from .casts import Cast
from .header import itemsize
from .quantize_stream import QuantizedOutput, Sink
from .reading import BITS
from .weight_only import SCRATCH_BYTES

# The input a block may have (model-dtype bytes), and so its stored bytes (at most half: int8 of 2-byte
# values; float32 models give a quarter).
BLOCK_BYTES = 4 * 2**20
SLOT_BYTES = BLOCK_BYTES + BLOCK_BYTES // 2


def thread_count() -> int:
    """One per core, at most 8: on the 16-core host eight were busy half the time (4 layers tp8/moe_ep8 int8,
    measured), each holds SCRATCH_BYTES, and between a step's torch ops a thread holds the GIL."""
    return max(1, min(8, os.cpu_count() or 1))


def slot_count(threads: int) -> int:
    """Enough that every thread has its next block waiting while lanes write finished ones."""
    return 2 * threads


def memory_bytes(threads: int) -> int:
    """What the pool holds at most: its slots, and each thread's scratch."""
    return slot_count(threads) * SLOT_BYTES + threads * SCRATCH_BYTES


@dataclass
class _Slot:
    values: np.ndarray  # uint8, BLOCK_BYTES: the block's model-dtype elements
    stored: np.ndarray  # uint8, SLOT_BYTES - BLOCK_BYTES: its stored bytes


class QuantizePool:
    """`threads` quantizing threads and `slot_count(threads)` block buffers, shared by every lane."""

    def __init__(self, threads: int, check: Callable[[], None]) -> None:
        self.check = check  # raises the conversion's first error (a waiting lane must not wait forever)
        self.executor = ThreadPoolExecutor(
            threads, thread_name_prefix="moe-convert-quantize", initializer=profiling.current.thread_start
        )
        self.slots = slot_count(threads)
        self.free: list[_Slot] = []
        self.made = 0
        self.cond = threading.Condition()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def batch(self, q: QuantizedOutput, writer: Sink) -> Batch:
        """A lane's run of blocks of one weight, written to `writer` in the order they were submitted."""
        return Batch(self, q, writer)

    def _take(self, wait: bool) -> _Slot | None:
        with self.cond:
            t0 = profiling.clock()
            while not self.free and self.made >= self.slots:
                if not wait:
                    return None
                self.check()
                self.cond.wait(0.1)
            profiling.current.add("slot_wait", t0)
            if self.free:
                return self.free.pop()
            self.made += 1
        return _Slot(np.empty(BLOCK_BYTES, dtype=np.uint8), np.empty(SLOT_BYTES - BLOCK_BYTES, dtype=np.uint8))

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
        values = slot.values.view(BITS[itemsize(q.qt.dtype)])[: part.size]
        t0 = profiling.clock()
        cast(values.reshape(part.shape), part)
        profiling.current.add("gather_cast", t0, values.nbytes)
    return q.quantize_groups(start, values, slot.stored)


class Batch:
    """Blocks of one weight from one lane: submitted in row order, written in that order."""

    def __init__(self, pool: QuantizePool, q: QuantizedOutput, writer: Sink) -> None:
        self.pool, self.q, self.writer = pool, q, writer
        self.pending: collections.deque[tuple[int, int, _Slot, Future[tuple[np.ndarray, np.ndarray]]]] = (
            collections.deque()
        )

    def submit(self, start: int, part: np.ndarray, cast: Cast | None) -> None:
        """Quantize `part` (elements [start, ...) of the weight's rows, whole row groups, before the cast; None:
        `part` is contiguous and in the model dtype already). `part` must stay as it is until written."""
        slot = self.pool._take(wait=False)
        while slot is None:
            if self.pending:
                self._write_oldest()
                slot = self.pool._take(wait=False)
            else:
                slot = self.pool._take(wait=True)
        try:
            future = self.pool.executor.submit(_run, slot, self.q, start, part, cast)
        except BaseException:
            self.pool._give(slot)
            raise
        self.pending.append((start, part.size, slot, future))

    def drain(self) -> None:
        """Write every result submitted so far."""
        while self.pending:
            self._write_oldest()

    def abandon(self) -> None:
        """After an error: wait for what is running (it reads the chunk buffer) and give the slots back."""
        while self.pending:
            _, _, slot, future = self.pending.popleft()
            try:
                future.exception()
            finally:
                self.pool._give(slot)

    def _write_oldest(self) -> None:
        start, n, slot, future = self.pending.popleft()
        try:
            t0 = profiling.clock()
            data, scales = future.result()
            profiling.current.add("quantize_wait", t0)
            self.q.add_quantized(start, n, data, scales, self.writer)
        finally:
            self.pool._give(slot)
