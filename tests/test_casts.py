"""The numpy casts (moe_convert/casts.py) give torch's bits: every pattern of the 16-bit types, float32 swept.

The reference is torch's `.to()` on a contiguous tensor whose length is a multiple of 64, so every element
goes through torch's vectorized kernel (its scalar paths, for the last few elements of a tensor or a column
one element wide, make other NaNs; docs/performance.md). Ours must give the same bits whatever the layout
of the source: contiguous, a column slice, several rows per step or a row cut into steps.
Every float32 pattern of seven top bytes is checked; `MOE_CONVERT_EXHAUSTIVE_CASTS=1`: all 2**32 (minutes).
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_convert import casts
from moe_convert.casts import cast_function

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
RAW = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
RAW_TORCH = {np.uint32: torch.int32, np.uint16: torch.int16}
SIGNED = {np.uint32: np.int32, np.uint16: np.int16}  # the executor's raw bits (reading.BITS)
PAIRS = [(s, t) for s in TORCH for t in TORCH if s != t]


def torch_cast(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """torch's `.to()` of raw `bits`, on its vectorized path (the length padded to a multiple of 64)."""
    flat = bits.reshape(-1)
    padded = np.zeros(-(-flat.size // 64) * 64, dtype=flat.dtype)
    padded[: flat.size] = flat
    x = torch.from_numpy(padded.view(SIGNED[RAW[source]])).view(TORCH[source])
    out = x.to(TORCH[target]).view(RAW_TORCH[RAW[target]]).numpy().view(RAW[target])
    return out[: flat.size].reshape(bits.shape)


def ours(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """Our cast of `bits` (any layout) into a fresh contiguous array, as the executor calls it."""
    out = np.empty(bits.shape, SIGNED[RAW[target]])
    cast_function(source, target)(out, bits.view(SIGNED[RAW[source]]))
    return out.view(RAW[target])


def same_bits(got: np.ndarray, want: np.ndarray, bits: np.ndarray) -> None:
    bad = np.nonzero(got.reshape(-1) != want.reshape(-1))[0]
    if bad.size:
        i = bad[0]
        raise AssertionError(
            f"{bad.size} differ; first: {bits.reshape(-1)[i]:#x} -> ours {got.reshape(-1)[i]:#x}, "
            f"torch {want.reshape(-1)[i]:#x}"
        )


def layouts(bits: np.ndarray) -> list[np.ndarray]:
    """`bits` (2-D) as the lanes see pieces: whole, a column slice, a single column, a row-reversed copy."""
    return [bits, bits[:, 1:-1], bits[:, 3:4], bits[::-1]]


@pytest.mark.parametrize(("source", "target"), [p for p in PAIRS if p[0] != "F32"])
def test_every_16_bit_pattern(source: str, target: str) -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    want = torch_cast(bits, source, target)
    for view, want_view in zip(layouts(bits), layouts(want), strict=True):
        same_bits(ours(view, source, target), want_view, view)
    with mock.patch.object(casts, "_STEP", 100):  # rows cut into steps, and several rows per step
        for view, want_view in zip(layouts(bits), layouts(want), strict=True):
            same_bits(ours(view, source, target), want_view, view)


def float32_sweep() -> np.ndarray:
    """Both signs x all 256 exponents x mantissas at every rounding position: each bit alone, its halfway
    neighbours and the runs of ones above and below it (ties to even, carries into the exponent, overflow to
    inf, subnormal targets), NaN payloads (exponent 255), and 300 random mantissas per exponent."""
    m: set[int] = {0, 1, 2, 3}
    for k in range(24):
        high = 0x7FFFFF & ~((1 << k) - 1)  # ones from bit k up
        for v in ((1 << k) - 1, 1 << k, (1 << k) + 1, 3 << k, (3 << k) - 1, (3 << k) + 1, high, high - 1):
            m.add(v & 0x7FFFFF)
        if k:
            half = 1 << (k - 1)
            m |= {(high + half) & 0x7FFFFF, (high + half - 1) & 0x7FFFFF, (high + half + 1) & 0x7FFFFF}
    rng = np.random.default_rng(0)
    mantissas = np.array(sorted(m), dtype=np.uint32)
    rows = []
    for sign in (0, 1):
        for exponent in range(256):
            random = rng.integers(0, 1 << 23, 300, dtype=np.uint32)
            rows.append((sign << 31) | (exponent << 23) | np.concatenate([mantissas, random]))
    return np.stack(rows).astype(np.uint32)


@pytest.mark.parametrize("target", ["F16", "BF16"])
def test_float32_sweep(target: str) -> None:
    bits = float32_sweep()  # 512 rows (sign, exponent) x ~470 mantissas
    want = torch_cast(bits, "F32", target)
    for view, want_view in zip(layouts(bits), layouts(want), strict=True):
        same_bits(ours(view, "F32", target), want_view, view)
    with mock.patch.object(casts, "_STEP", 1000):
        same_bits(ours(bits[:, 2:], "F32", target), want[:, 2:], bits[:, 2:])


@settings(max_examples=300, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    values=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=400),
    cols=st.integers(1, 40),
    start=st.integers(0, 5),
    step=st.sampled_from([1, 3, 64, 1 << 16]),
)
def test_any_bits_any_layout(pair: tuple[str, str], values: list[int], cols: int, start: int, step: int) -> None:
    """Random bit patterns (NaNs with any payload, subnormals, halfway cases by chance) in random column
    slices, cut into steps of any size: torch's bits."""
    source, target = pair
    raw = np.array(values, dtype=np.uint64).astype(RAW[source])
    rows = -(-raw.size // (cols + start))
    bits = np.resize(raw, (rows, cols + start))
    view = bits[:, start:]
    with mock.patch.object(casts, "_STEP", step):
        same_bits(ours(view, source, target), torch_cast(np.ascontiguousarray(view), source, target), view)


@settings(max_examples=200, deadline=None)
@given(
    target=st.sampled_from(["F16", "BF16"]),
    sign=st.integers(0, 1),
    exponent=st.integers(0, 255),
    mantissa=st.integers(0, 2**23 - 1),
    low=st.sampled_from([0, 1, 0x1000, 0x0FFF, 0x1001, 0x8000, 0x7FFF, 0x8001]),
)
def test_float32_halfway_and_neighbours(target: str, sign: int, exponent: int, mantissa: int, low: int) -> None:
    """A mantissa whose low bits sit exactly on (or next to) a rounding boundary of either target."""
    width = 13 if target == "F16" else 16
    m = (mantissa & ~((1 << width) - 1) | (low & ((1 << width) - 1))) & 0x7FFFFF
    bits = np.array([[(sign << 31) | (exponent << 23) | m]], dtype=np.uint32)
    same_bits(ours(bits, "F32", target), torch_cast(bits, "F32", target), bits)


EXHAUSTIVE = os.environ.get("MOE_CONVERT_EXHAUSTIVE_CASTS")
# Every float32 pattern whose top byte (sign and high exponent bits) is one of these, 2**24 each: zero,
# float32's subnormals and smallest normals (+ and -), float16's smallest subnormal (2**-24), 1.0, float16's
# largest finite and its overflow, float32's largest finite (bfloat16 rounds it to inf), inf and NaN (+ and -).
# MOE_CONVERT_EXHAUSTIVE_CASTS=1: all 256 top bytes, all 2**32 patterns (minutes).
TOP_BYTES = range(256) if EXHAUSTIVE else [0x00, 0x33, 0x3F, 0x47, 0x7F, 0x80, 0xFF]


@pytest.mark.parametrize("target", ["F16", "BF16"])
def test_every_float32_pattern_of_the_critical_exponents(target: str) -> None:
    for top in TOP_BYTES:
        start = top << 24
        bits = np.arange(start, start + 2**24, dtype=np.uint64).astype(np.uint32).reshape(-1, 4096)
        same_bits(ours(bits, "F32", target), torch_cast(bits, "F32", target), bits)


def test_overflow_is_silent() -> None:
    """Overflow to inf is the intended result: no numpy RuntimeWarning reaches the user."""
    big = np.array([[0x7F7FFFFF, 0xC7800000]], dtype=np.uint32)  # float32 max, -65536
    with np.errstate(all="raise"):
        assert ours(big, "F32", "F16").tolist() == [[0x7C00, 0xFC00]]
