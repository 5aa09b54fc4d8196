"""Casts between float32, float16 and bfloat16 on raw element bits, with numpy: no torch.

Each gives what torch's `.to()` gives (tests/test_casts.py: all 65,536 patterns of each 16-bit type, sweeps
of float32): round to nearest even, overflow to inf, subnormals, -0.0. A NaN stays a NaN, with the bits
torch's vectorized kernels give it (its scalar paths, for a tensor's last few elements or a column one
element wide, give others: docs/performance.md):

    float32, bfloat16 -> float16   sign and top payload bits kept, quiet bit set
    float16 -> float32             sign and payload kept, quiet bit set
    bfloat16 -> float32            the bits shifted: exact
    float32 -> bfloat16            0xFFFF
    float16 -> bfloat16            0x7FC0

A cast copies raw source elements (a view, strided or not) into raw target elements of the same shape (a
contiguous array), gathering and casting in one call. Casts in several steps go through small scratch
arrays of the calling thread, _STEP elements at a time, so no temporaries are made and freed per block.
Between the two 16-bit types every result is looked up in a table of all 65,536 (made once by the
arithmetic here): three times as fast as the arithmetic, as fast as torch (benchmarks/bench_cast.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator

import numpy as np

# (out, part): raw target elements (contiguous) and raw source elements of the same shape.
Cast = Callable[[np.ndarray, np.ndarray], None]

_STEP = 1 << 16  # 256 KB of float32: in L2, and few enough numpy calls per 4 MB block
_F32_TO_BF16_NAN, _F16_TO_BF16_NAN = 0xFFFF, 0x7FC0

_local = threading.local()


def cast_function(source: str, target: str) -> Cast:
    """The cast from safetensors dtype `source` to `target` (F32, F16 or BF16)."""
    if source == target:
        return functools.partial(np.copyto, casting="no")
    return _CASTS[(source, target)]


def _scratch(name: str, dtype: type[np.generic], shape: tuple[int, ...]) -> np.ndarray:
    """This thread's scratch array `name` (allocated once per thread), as `shape` (at most _STEP elements)."""
    arrays: dict[str, np.ndarray] = _local.__dict__.setdefault("arrays", {})
    if name not in arrays:
        arrays[name] = np.empty(_STEP, dtype=dtype)
    return arrays[name][: int(np.prod(shape))].reshape(shape)


def _steps(out: np.ndarray, part: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`out` and `part` cut into matching parts of at most _STEP elements, in order."""
    if part.size <= _STEP:
        yield out, part
    elif part[0].size > _STEP:  # one row is too big: cut each row (a 1-D part has rows of one element)
        for i in range(part.shape[0]):
            yield from _steps(out[i], part[i])
    else:
        rows = _STEP // part[0].size
        for i in range(0, part.shape[0], rows):
            yield out[i : i + rows], part[i : i + rows]


def _has_nan(f32: np.ndarray) -> bool:
    """A NaN anywhere in float32 `f32` (np.max propagates it: one pass, no temporary)."""
    return f32.size > 0 and bool(np.isnan(np.max(f32)))


def _bf16_to_f32(out: np.ndarray, part: np.ndarray) -> None:
    """bfloat16 is the top half of a float32: exact, NaN payloads included."""
    np.left_shift(part.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _f16_to_f32(out: np.ndarray, part: np.ndarray) -> None:
    """Exact; numpy keeps a NaN's payload, torch also sets its quiet bit."""
    f32 = out.view(np.float32)
    np.copyto(f32, part.view(np.float16), casting="safe")
    if _has_nan(f32):
        bits = out.view(np.uint32)
        np.bitwise_or(bits, 0x0040_0000, out=bits, where=np.isnan(f32))


def _f32_to_f16(out: np.ndarray, part: np.ndarray) -> None:
    """IEEE round to nearest even, numpy's as torch's; a NaN made as torch makes it, from the source bits."""
    f32 = part.view(np.float32)
    with np.errstate(all="ignore"):  # overflow to inf is the intended result, not a warning
        np.copyto(out.view(np.float16), f32, casting="unsafe")
    if _has_nan(f32):
        for o, p in _steps(out, part):
            _f16_nans(o.view(np.uint16), p.view(np.uint32))


def _f16_nans(out16: np.ndarray, src: np.ndarray) -> None:
    """Where float32 bits `src` are NaN: sign, quiet bit and the top 9 payload bits into float16 bits."""
    a, b = _scratch("nan_a", np.uint32, src.shape), _scratch("nan_b", np.uint32, src.shape)
    nan = _scratch("nan_mask", np.bool_, src.shape)
    np.isnan(src.view(np.float32), out=nan)
    np.right_shift(src, 13, out=a)
    np.bitwise_and(a, 0x03FF, out=a)
    np.right_shift(src, 16, out=b)
    np.bitwise_and(b, 0x8000, out=b)
    np.bitwise_or(a, b, out=a)
    np.bitwise_or(a, 0x7E00, out=a)
    np.copyto(out16, a, casting="unsafe", where=nan)


def _bf16_to_f16(out: np.ndarray, part: np.ndarray) -> None:
    """Through float32 (exact), as torch does."""
    for o, p in _steps(out, part):
        wide = _scratch("bits", np.uint32, p.shape)
        _bf16_to_f32(wide, p)
        _f32_to_f16(o, wide)


def _round_to_bf16(out16: np.ndarray, bits: np.ndarray, nan: int) -> None:
    """float32 `bits` (a scratch, changed here) to bfloat16 bits: round to nearest even; NaN -> `nan`."""
    mask = None
    if _has_nan(bits.view(np.float32)):
        mask = _scratch("nan_mask", np.bool_, bits.shape)
        np.isnan(bits.view(np.float32), out=mask)
    lsb = _scratch("lsb", np.uint32, bits.shape)
    np.right_shift(bits, 16, out=lsb)
    np.bitwise_and(lsb, 1, out=lsb)
    np.add(lsb, 0x7FFF, out=lsb)
    np.add(bits, lsb, out=bits)  # a carry out of the mantissa rounds the exponent up (to inf at the top)
    np.copyto(out16, bits.view(np.uint16)[..., 1::2])  # the top halves (little-endian, as safetensors)
    if mask is not None:
        np.copyto(out16, nan, where=mask)


def _f32_to_bf16(out: np.ndarray, part: np.ndarray) -> None:
    for o, p in _steps(out, part):
        bits = _scratch("bits", np.uint32, p.shape)
        np.copyto(bits, p.view(np.uint32))  # gathers the piece's columns
        _round_to_bf16(o.view(np.uint16), bits, _F32_TO_BF16_NAN)


def _f16_to_bf16(out: np.ndarray, part: np.ndarray) -> None:
    """Through float32 (exact), as torch does; torch's NaN on this path is 0x7FC0."""
    for o, p in _steps(out, part):
        bits = _scratch("bits", np.uint32, p.shape)
        np.copyto(bits.view(np.float32), p.view(np.float16), casting="safe")
        _round_to_bf16(o.view(np.uint16), bits, _F16_TO_BF16_NAN)


@functools.cache
def _table(cast: Cast) -> np.ndarray:
    """`cast` of every 16-bit pattern."""
    table = np.empty(1 << 16, dtype=np.uint16)
    cast(table, np.arange(1 << 16, dtype=np.uint32).astype(np.uint16))
    return table


def _looked_up(cast: Cast) -> Cast:
    def look_up(out: np.ndarray, part: np.ndarray) -> None:
        table = _table(cast)
        for o, p in _steps(out, part):  # numpy makes each step's indices intp first: keep them small
            np.take(table, p.view(np.uint16), out=o.view(np.uint16), mode="wrap")  # (always in range)

    return look_up


_CASTS: dict[tuple[str, str], Cast] = {
    ("BF16", "F32"): _bf16_to_f32,
    ("F16", "F32"): _f16_to_f32,
    ("F32", "F16"): _f32_to_f16,
    ("BF16", "F16"): _looked_up(_bf16_to_f16),
    ("F32", "BF16"): _f32_to_bf16,
    ("F16", "BF16"): _looked_up(_f16_to_bf16),
}
