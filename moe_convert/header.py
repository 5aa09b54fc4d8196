"""safetensors headers: read and validate them without reading tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the first data byte. We parse it ourselves (it is tiny) because we
need the absolute byte ranges to stream, and every malformed case must become a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

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
}


def torch_dtype(code: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, _TORCH_NAMES[code])
    return dtype


def __getattr__(name: str) -> Any:
    """DTYPES (code -> torch dtype) and CODES (its inverse), built on first use."""
    if name in ("DTYPES", "CODES"):
        dtypes = {code: torch_dtype(code) for code in _TORCH_NAMES}
        globals().update(DTYPES=dtypes, CODES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A real header is a few hundred KB; anything above this is corruption, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024


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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header. Raises CheckpointError naming the file and the problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                    "length); re-download it"
                )
            (n,) = struct.unpack("<Q", raw_len)
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
            raw = f.read(n)
            if len(raw) != n:
                raise CheckpointError(f"{path}: read {len(raw)} of {n} header bytes; the file changed while reading")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); re-download the file") from e
    except RecursionError as e:  # "[[[[..." nested deeper than the parser's stack
        raise CheckpointError(f"{path}: header is not valid JSON (nested too deeply); re-download the file") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return _validate(path, header, data_start=8 + n, file_size=size)


def _validate(path: Path, header: dict[str, object], data_start: int, file_size: int) -> dict[str, TensorInfo]:
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(ITEMSIZES)})")
        # Bounded like safetensors' own u64/usize fields, so later arithmetic (torch, numpy) cannot overflow.
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o < 2**63 for o in offsets)
        ):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
        begin, end = offsets
        expected = math.prod(shape) * itemsize(dtype)
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
    # Compare each tensor with the one reaching furthest so far: an empty tensor in between, or a short one
    # inside a long one, must not hide an overlap.
    furthest: TensorInfo | None = None
    for cur in sorted((t for t in tensors.values() if t.nbytes), key=lambda t: (t.start, t.stop)):
        if furthest is not None and cur.start < furthest.stop:
            raise CheckpointError(
                f"{path}: tensors {furthest.name!r} and {cur.name!r} overlap "
                f"(bytes [{furthest.start}, {furthest.stop}) and [{cur.start}, {cur.stop})); the file is corrupt"
            )
        if furthest is None or cur.stop > furthest.stop:
            furthest = cur
    return tensors
