"""safetensors headers: read and validate them without reading tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the first data byte. We parse it ourselves (it is tiny) because we
need the absolute byte ranges to stream, and every malformed case must become a one-line error. What we
accept is what the safetensors library (`safe_open`) accepts, and no more: UTF-8 JSON without a byte
order mark and without duplicate keys, `__metadata__` absent, null or an object of strings, every tensor's
offsets matching its dtype x shape (no u64 overflow), and the tensors, in offset order, back to back from
byte 0 to the end of the file (no gap, no overlap, no trailing bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bounded_json import json_type, parse_json
from .errors import CheckpointError
from .files import open_regular, read_exactly

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> bytes per element. The torch dtypes (DTYPES, CODES below) are looked up only
# when something casts: a plain byte-range copy never imports torch.
ITEMSIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    # The rest of what the safetensors library reads in whole bytes: accepted in headers, never converted.
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}
FLOAT_CODES = ("F32", "F16", "BF16")
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "C64": "complex64",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(code: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, _TORCH_NAMES[code])
    return dtype


def __getattr__(name: str) -> Any:
    """DTYPES (code -> torch dtype) and CODES (its inverse), built on first use."""
    if name in ("DTYPES", "CODES"):
        import torch

        dtypes = {code: torch_dtype(code) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}
        globals().update(DTYPES=dtypes, CODES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The safetensors library's limit; real headers are a few MB at most.
MAX_HEADER_BYTES = 100_000_000
_U64 = 2**64
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def itemsize(code: str) -> int:
    return ITEMSIZES[code]


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor's bytes are: absolute [start, stop) in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def read_header(path: Path, *, follow_symlinks: bool = True) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header. Raises CheckpointError naming the file and the problem."""
    with open_regular(path, CheckpointError, follow_symlinks=follow_symlinks) as (fd, st):
        tensors, _ = read_header_fd(fd, path, st.st_size)
    return tensors


def read_header_fd(fd: int, path: Path, size: int) -> tuple[dict[str, TensorInfo], int]:
    """The header of an open file of `size` bytes: its tensors, and where the data starts."""
    if size < 8:
        raise CheckpointError(
            f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length); re-download it"
        )
    (n,) = struct.unpack("<Q", read_exactly(fd, path, 8, CheckpointError))
    # Checked before reading: a hostile length must not make us allocate gigabytes.
    if n > size - 8:
        raise CheckpointError(
            f"{path}: header length {n} bytes is larger than the file ({size} bytes) allows; "
            "the file is truncated or not safetensors, re-download it"
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {n} bytes is over the {MAX_HEADER_BYTES} byte limit (real headers "
            "are a few MB at most); the file is corrupt or not safetensors"
        )
    raw = read_exactly(fd, path, n, CheckpointError, offset=8)
    header = parse_json(raw, f"{path}: header", CheckpointError, hint="; re-download the file")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is {json_type(header)}, expected an object")
    return _validate(path, header, data_start=8 + n, file_size=size), 8 + n


def _validate(path: Path, header: dict[str, object], data_start: int, file_size: int) -> dict[str, TensorInfo]:
    data_len = file_size - data_start
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: header '__metadata__' is {json_type(meta)}, not an object of strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: header entry has no {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(ITEMSIZES)})")
        # u64 fields, as in the safetensors library, so later arithmetic (torch, numpy) cannot overflow.
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < _U64 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o < _U64 for o in offsets)
        ):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
        expected = _nbytes(shape, itemsize(dtype))
        if expected is None:
            raise CheckpointError(f"{where}: shape {shape} x {dtype} overflows 64 bits; the file is corrupt")
        begin, end = offsets
        if end < begin or end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}) hold {end - begin} bytes but {dtype} "
                f"{tuple(shape)} needs {expected}; the file is corrupt"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + end} but the file has {file_size} bytes; "
                "the file is truncated, re-download it"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
    _check_contiguous(path, tensors, data_start, data_len)
    return tensors


def _nbytes(shape: list[int], item: int) -> int | None:
    """dtype x shape in bytes, or None where the library's checked u64 product overflows (in its order)."""
    n = 1
    for d in [*shape, item]:
        n *= d
        if n >= _U64:
            return None
    return n


def _check_contiguous(path: Path, tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """In offset order, each tensor starts where the one before ends, the first at 0, the last at the end."""
    cursor, previous = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.stop)):
        begin, end = t.start - data_start, t.stop - data_start
        if begin < cursor:
            assert previous is not None
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {t.name!r} overlap (data bytes "
                f"[{previous.start - data_start}, {cursor}) and [{begin}, {end})); the file is corrupt"
            )
        if begin > cursor:
            after = f"after tensor {previous.name!r}" if previous else "at the start of the data"
            raise CheckpointError(
                f"{path}: tensor {t.name!r} starts at data byte {begin}, leaving a gap of {begin - cursor} bytes "
                f"{after} (safetensors stores tensors back to back); the file is corrupt"
            )
        cursor, previous = end, t
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: {data_len - cursor} bytes after the last tensor's data that no tensor covers; "
            "the file is corrupt or was appended to"
        )
