"""One weight-only quantized weight of one rank file, filled from its rows as the executor reads them.

The executor's lanes hand over the weight's rows (in the model dtype) as runs of elements in row-major
order, in any order and in any sizes: a source chunk need not end on a row, let alone on a row group.
Whole row groups are quantized at once and written where they go (weight_only.py: a block of whole groups
is one contiguous byte range of the stored weight); a group cut by a run's edge waits, copied, for its other
rows (a few KB). The scales are kept until the last row is in, then written as one tensor: it follows the
weight in the file, so with rows arriving in order it is streamed as the file's next bytes.

Every call comes from the rank file's own lane, one at a time, so no lock is needed; `quantize_groups`,
which the quantize pool's workers call, is a function of the planned tensor alone.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Protocol

import numpy as np

from . import profiling
from .header import itemsize
from .weight_only import SCRATCH_BYTES_PER_ELEMENT, QuantizedTensor

# Stored bytes a thread quantizes into at a time (reused): at most a block of model-dtype input per step.
_OUT_BYTES = 4 * 2**20


def lane_group_bytes(group_elements: int) -> int:
    """What a thread holds to quantize one row group of `group_elements` here (the executor's lanes do only
    that, a group at a time: the row groups a chunk's edge cuts, and groups too large for a pool block):
    the group itself, weight_only's scratch and stored bytes."""
    per_element = SCRATCH_BYTES_PER_ELEMENT + 1 + 4  # scratch, stored byte, the held element
    return per_element * group_elements


_lane_local = threading.local()


def _out_buffer(n: int) -> np.ndarray:
    """This lane's reused uint8 buffer for stored bytes, at least `n` long."""
    buf: np.ndarray | None = getattr(_lane_local, "out", None)
    if buf is None or buf.size < n:  # grows to the largest block: one row group on the executor's lanes
        buf = _lane_local.out = np.empty(n, dtype=np.uint8)
    return buf[:n]


class Sink(Protocol):
    """Where the stored bytes go: a rank file (writer.RankFileWriter), or verify's digests (DigestSink)."""

    def write(self, offset: int, data: Any) -> None: ...


class DigestSink:
    """sha256 of the weight's bytes (which must come front to back) and of its scales, for verify: a
    QuantizedOutput with weight_offset 0 and scale_offset `split` (the weight's size) writes into it."""

    def __init__(self, split: int) -> None:
        self.split = split
        self.weight = hashlib.sha256()
        self.scales = hashlib.sha256()
        self.front = 0

    def write(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        if offset >= self.split:
            self.scales.update(view)
            return
        if offset != self.front:
            raise ValueError(f"weight bytes at {offset} arrived before those at {self.front}")
        self.weight.update(view)
        self.front += len(view)


def quantize_groups(
    qt: QuantizedTensor, start: int, values: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Whole row groups of `qt` from element `start` (raw bits of the model dtype, contiguous): their stored
    bytes (in `out`, which must hold them) and their scale bytes. Hand both to `add_quantized`."""
    k = qt.shape[-1]
    rows = values.size // k
    if start % (qt.group * k) or values.size % (qt.group * k):
        raise ValueError(f"{qt.name}: elements [{start}, {start + values.size}) are not whole row groups")
    data = out[: rows * qt.row_bytes]
    t0 = profiling.clock()
    scales = qt.quantize_bits(values.reshape(rows, k), data)
    profiling.current.add("quantize", t0, data.size)
    return data, scales.view(np.uint8)


class QuantizedOutput:
    """A quantized weight (and its per_channel_scale) being written into one rank file."""

    def __init__(self, qt: QuantizedTensor, weight_offset: int, scale_offset: int) -> None:
        self.qt = qt
        self.weight_offset = weight_offset  # absolute offsets in the rank file
        self.scale_offset = scale_offset
        self.k = qt.shape[-1]
        self.group_elements = qt.group * self.k
        self.total = qt.rows * self.k
        self.received = 0  # elements handed over so far
        self.pending: dict[int, tuple[np.ndarray, list[int]]] = {}  # group start -> (its elements, [filled])
        self.scales: np.ndarray | None = None  # the scale bytes, made at the first rows
        self.written = 0  # bytes written and not yet reported (take_written)

    @property
    def bits(self) -> int:
        return self.qt.bits

    def add(self, start: int, values: np.ndarray, writer: Sink) -> None:
        """Elements [start, start + len(values)) of the rows (raw bits of the model dtype, contiguous)."""
        end = start + values.size
        self._check_range(start, end)
        g = self.group_elements
        pos, rest = start, values
        if pos % g:  # the end of a group begun elsewhere
            take = min(end, pos - pos % g + g) - pos
            self._hold(pos, rest[:take], writer)
            pos, rest = pos + take, rest[take:]
        whole = (end - pos) // g * g
        if whole:
            self._quantize(pos, rest[:whole], writer)
        if pos + whole < end:  # the start of a group that ends elsewhere
            self._hold(pos + whole, rest[whole:], writer)
        self._received(values.size, writer)

    def add_quantized(self, start: int, n: int, data: np.ndarray, scales: np.ndarray, writer: Sink) -> None:
        """The result of `quantize_groups` for `n` elements from `start`: bytes written, scales kept."""
        self._check_range(start, start + n)
        self._store(start // self.k, data, scales, writer)
        self._received(n, writer)

    def _check_range(self, start: int, end: int) -> None:
        if start < 0 or end > self.total:
            raise ValueError(f"{self.qt.name}: elements [{start}, {end}) are outside its {self.total}")

    def _received(self, n: int, writer: Sink) -> None:
        self.received += n
        if self.received == self.total:
            if self.pending:
                raise ValueError(f"{self.qt.name}: every element arrived but {len(self.pending)} row groups are open")
            if self.scales is not None:  # None only for a weight with no rows
                writer.write(self.scale_offset, self.scales)
                self.written += self.scales.size
            self.scales = None

    def take_written(self) -> int:
        """Bytes written since the last call (for progress)."""
        n, self.written = self.written, 0
        return n

    def _hold(self, pos: int, values: np.ndarray, writer: Sink) -> None:
        g = self.group_elements
        first = pos - pos % g
        buf, filled = self.pending.setdefault(first, (np.empty(g, dtype=values.dtype), [0]))
        buf[pos - first : pos - first + values.size] = values
        filled[0] += values.size
        if filled[0] == g:
            del self.pending[first]
            self._quantize(first, buf, writer)

    def _quantize(self, pos: int, values: np.ndarray, writer: Sink) -> None:
        """Whole row groups starting at element `pos`, here: their stored bytes written, their scales kept."""
        qt = self.qt
        # a block of at most a few MB per step keeps the stored bytes' buffer small
        step = max(qt.group, _OUT_BYTES // qt.row_bytes // qt.group * qt.group) * self.k
        for e0 in range(0, values.size, step):
            part = values[e0 : e0 + step]
            data, scales = quantize_groups(qt, pos + e0, part, _out_buffer(part.size // self.k * qt.row_bytes))
            self._store((pos + e0) // self.k, data, scales, writer)

    def _store(self, first_row: int, data: np.ndarray, scales: np.ndarray, writer: Sink) -> None:
        qt, item = self.qt, itemsize(self.qt.dtype)
        if self.scales is None:
            self.scales = np.zeros(qt.rows * item, dtype=np.uint8)
        self.scales[first_row * item : first_row * item + scales.size] = scales
        writer.write(self.weight_offset + first_row * qt.row_bytes, data)
        self.written += data.size
