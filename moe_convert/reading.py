"""Reading source tensors in bounded chunks: shared by the executor (convert) and the verifier.

A chunk is a box of a source tensor that is one contiguous byte range of its file, so each chunk is a
single positioned read into a reused buffer, and a tensor is read front to back exactly once.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .header import TensorInfo
from .plan import Box
from .writer import RankFileWriter

# Elements as raw bits: slicing and gathering need only the element size, never the dtype's meaning.
BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def chunk_boxes(shape: tuple[int, ...], itemsize: int, limit: int, prefix: Box = ()) -> Iterator[Box]:
    """Split a tensor into boxes of at most `limit` bytes, each one contiguous range of the file.

    A box fixes leading indices, takes a range of one dimension, and spans all later dimensions.
    The boxes come in file order, so the part of any box B that each one covers comes in B's row-major order.
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


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=False))
    return out if all(s < e for s, e in out) else None


def contiguous_run(box: Box, shape: tuple[int, ...]) -> bool:
    """Whether `box` is one contiguous byte range of a row-major tensor of `shape`.

    True when every dimension after the first one the box takes more than one index of is spanned whole.
    """
    dims = list(zip(box, shape, strict=True))
    first = next((i for i, ((s, e), _) in enumerate(dims) if e - s > 1), len(dims))
    return all((s, e) == (0, d) for (s, e), d in dims[first + 1 :])


def element_offset(sub: Box, box: Box) -> int:
    """Row-major position of `sub`'s first element inside `box` (sub spans box fully after its ranges)."""
    offset, stride = 0, 1
    for (s, _), (b0, b1) in zip(reversed(sub), reversed(box), strict=False):
        offset += (s - b0) * stride
        stride *= b1 - b0
    return offset


class SourceReader:
    """Positioned reads from the source shards into a per-thread reusable buffer."""

    def __init__(self, files: list[Path], chunk_bytes: int) -> None:
        self.fds: dict[Path, int] = {}
        try:
            for f in files:
                # Non-blocking: a shard swapped for a FIFO since its header was read must not hang us.
                self.fds[f] = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
                if not stat.S_ISREG(os.fstat(self.fds[f]).st_mode):
                    raise CheckpointError(f"{f}: is no longer a regular file; it changed while converting")
        except OSError as e:
            self.close()
            raise CheckpointError(f"{e.filename}: cannot open: {e.strerror or e}") from e
        except CheckpointError:
            self.close()
            raise
        self.stats = {f: os.fstat(fd) for f, fd in self.fds.items()}
        self.chunk_bytes = chunk_bytes
        self.local = threading.local()

    def read_bits(self, info: TensorInfo, chunk: Box, into: bytearray | memoryview | None = None) -> np.ndarray:
        """The chunk's elements as raw bits (a signed integer of the element's size), in `into` or else
        this thread's reused buffer."""
        shape = tuple(e - s for s, e in chunk)
        start, n = self.byte_range(info, chunk)
        buf = into if into is not None else getattr(self.local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self.local.buf = bytearray(max(n, self.chunk_bytes))
        view = memoryview(buf)[:n]
        got = os.preadv(self.fds[info.file], [view], start)
        if got != n:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r}: read {got} of {n} bytes at offset {start}; "
                "the file was truncated or changed while converting"
            )
        return np.frombuffer(view, dtype=BITS[info.itemsize]).reshape(shape)

    def byte_range(self, info: TensorInfo, box: Box) -> tuple[int, int]:
        """Where `box`, one contiguous run of the tensor, lies in its file: (offset, length)."""
        item = info.itemsize
        start = info.start + element_offset(box, tuple((0, d) for d in info.shape)) * item
        return start, math.prod(e - s for s, e in box) * item

    def copy_to(self, info: TensorInfo, start: int, n: int, writer: RankFileWriter, offset: int) -> None:
        """Copy n bytes of `info`'s file from `start`, byte for byte, into `writer` at `offset`."""
        try:
            copied = writer.copy_from(self.fds[info.file], start, n, offset)
        except OSError as e:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: cannot read: {e.strerror or e}") from e
        if copied != n:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r}: copied {copied} of {n} bytes at offset {start}; "
                "the file was truncated or changed while converting"
            )

    def check_unchanged(self) -> None:
        for f, before in self.stats.items():
            now = os.stat(f)
            if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise CheckpointError(f"{f}: changed while converting; the output cannot be trusted, rerun")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
