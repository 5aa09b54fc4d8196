"""Weight-only INT8 / INT4 quantization (W8A16 / W4A16), byte-identical to TensorRT-LLM's CPU op.

What `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix` writes for a given GPU arch (contract:
`trtllm-weight-only.md`), computed from a stream of rows in bounded memory.

Orientation. We work on a rank tensor as the planner lays it out: row-major `[N, K]` (out x in features,
e.g. qkv `[Nqkv_r, H]`, dense `[H, H/tp]`) or `[E, N, K]` per expert (fc `[E, 2*I_r, H]`, proj
`[E, H, I_r]`). TensorRT-LLM quantizes the transpose, the op input `[K, N]`, column by column, so one of
our rows is one of its columns: the scale is per row, and every step of its preprocessing (a permutation
of K inside each column, the transpose, interleaving `group` neighbouring columns, a bias and a byte or
nibble reorder inside 32-bit words) stays inside a group of rows. Rows `[r, r + n)` with `r` and `n`
multiples of the group are therefore bytes `[r * row_bytes, (r + n) * row_bytes)` of the stored tensor,
and an expert boundary is a group boundary: a `[E, N, K]` tensor is just `E*N` rows. The executor can
hand over any block of whole groups, in any order, and write the result at its offset.

The stored weight keeps TensorRT-LLM's shape, `[K, N*b/8]` (or `[E, K, N*b/8]`, int8 dtype), although its
bytes are in the processed order; `per_channel_scale` is `[N]` (or `[E, N]`) in the model dtype.

The quantizer is numpy (a conversion does not import torch); the torch wrappers (`quantize_rows`, `quantize`,
`unpack`, `dequantize`) serve tests and callers holding tensors.
"""

from __future__ import annotations

import enum
import functools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

PRECISIONS = {"int8": 8, "int4": 4}
# Compute capabilities TensorRT-LLM's preprocessor takes (getLayoutDetailsForTransform: 75-89 share one layout,
# 90 has its own; anything else is "Unsupported Arch").
ARCHS = (75, 80, 86, 87, 89, 90)
# sm90 2-D weights: TensorRT-LLM's bytes depend on its version (docs/weight-only.md, "The sm90 question").
SM90_LAYOUTS = {
    "column_major": "TensorRT-LLM 0.10-0.11, the spec's: the plain transpose",
    "permuted": "TensorRT-LLM 1.2: rows permuted as for sm80, transposed, biased and reordered",
}
QUANT_ALGOS = {"int8": "W8A16", "int4": "W4A16"}
# Rows of the planned tensor (op-input columns) whose bytes interleave: 128-byte cache line / 64-row K tile.
_INTERLEAVE = {8: 2, 4: 4}
# Elements a block is processed in at a time: each step is one numpy call over them, small enough that its
# temporaries stay in the CPU cache. A quantize worker is one thread, so no GIL hand-offs favour bigger
# steps: one thread on the 2-core VM quantized 0.80 GB/s of bf16 (int8) at 256K elements, 0.71 at 512K,
# 0.72 at 64K. See docs/weight-only.md (Speed).
_SUB_BLOCK_ELEMENTS = 1 << 18
# Per thread, the reused temporaries of one step: x and copysign(0.5-, x) in float32, the values and their
# stored-order copy in int8, and for int4 two int16 halves: 12 bytes an element.
SCRATCH_BYTES_PER_ELEMENT = 12


def scratch_bytes(group_elements: int) -> int:
    """A thread's scratch for weights whose row groups have at most `group_elements`: a step is one group
    where a group is larger than _SUB_BLOCK_ELEMENTS."""
    return SCRATCH_BYTES_PER_ELEMENT * max(_SUB_BLOCK_ELEMENTS, group_elements)


# Shared by a process's threads: the cached gather indexes (intp, one step each, at most _GATHER_CACHE of them).
_GATHER_CACHE = 8
GATHER_INDEX_BYTES = _GATHER_CACHE * 8 * _SUB_BLOCK_ELEMENTS


class Layout(enum.Enum):
    """How the quantized bytes are arranged for the mixed-precision GEMM."""

    INTERLEAVED = "interleaved"  # sm75-sm89, and every 3-D (MoE) tensor: permuted, interleaved, biased
    COLUMN_MAJOR = "column_major"  # sm90 2-D up to TensorRT-LLM 0.11: the plain transpose of the signed values
    PERMUTED = "permuted"  # sm90 2-D in TensorRT-LLM 1.2: as INTERLEAVED without the column interleave


@dataclass(frozen=True)
class WeightOnly:
    """The user's choice: precision, target GPU arch (compute capability as an int, e.g. 80, 90) and, for
    sm90, which TensorRT-LLM version's layout of 2-D weights (one of SM90_LAYOUTS; required there, since
    the versions write different bytes; ignored for other archs)."""

    precision: str = "int8"
    arch: int = 80
    sm90_layout: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"--weight_only_precision {self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}"
            )
        if self.arch not in ARCHS:
            raise UsageError(
                f"--weight_only_arch {self.arch} is not an arch TensorRT-LLM's weight-only kernels take; "
                f"use one of {', '.join(map(str, ARCHS))}"
            )
        if self.arch == 90 and self.sm90_layout not in SM90_LAYOUTS:
            given = "" if self.sm90_layout is None else f" (not {self.sm90_layout!r})"
            raise UsageError(
                "--weight_only_arch 90: TensorRT-LLM's sm90 bytes of 2-D weights (qkv, dense) differ by version; "
                f"pass --weight_only_sm90_layout column_major (TensorRT-LLM 0.10-0.11) or permuted (1.2){given}; "
                "docs/weight-only.md shows how to check yours"
            )
        if self.arch != 90 and self.sm90_layout is not None:
            object.__setattr__(self, "sm90_layout", None)  # the same bytes whatever it says: not part of the identity

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def quant_algo(self) -> str:
        """config.json's `quantization.quant_algo`."""
        return QUANT_ALGOS[self.precision]

    def quantization_config(self) -> dict[str, object]:
        """config.json's `quantization` block, as TensorRT-LLM's converter writes it for weight-only."""
        return {
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": None,
            "group_size": 128,
            "smoothquant_val": 0.5,
            "clamp_val": None,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": None,
        }

    def describe(self) -> str:
        """`int4 (W4A16) for sm90, permuted layout`: for summaries."""
        layout = f", {self.sm90_layout} layout" if self.sm90_layout else ""
        return f"{self.precision} ({self.quant_algo}) for sm{self.arch}{layout}"

    def as_dict(self) -> dict[str, object]:
        """For manifests and summaries."""
        return {
            "precision": self.precision,
            "quant_algo": self.quant_algo,
            "arch": self.arch,
            "sm90_layout": self.sm90_layout,
        }

    def layout(self, ndim: int) -> Layout:
        """MoE (3-D) tensors always get the sm80 layout: TensorRT-LLM has no Hopper MoE kernel for them
        (`force_interleave`)."""
        if self.arch == 90 and ndim == 2:
            return Layout(self.sm90_layout)
        return Layout.INTERLEAVED

    def check(self, name: str, shape: tuple[int, ...]) -> list[str]:
        """Problems (one line each, with the numbers) that stop TensorRT-LLM's kernels taking this tensor.

        `shape` is the planned, row-major shape `[N, K]` or `[E, N, K]`. Empty means it is fine.
        """
        if len(shape) not in (2, 3) or any(d < 1 for d in shape):
            return [f"{name}: weight-only quantization needs a non-empty 2-D or 3-D weight, got shape {list(shape)}"]
        n, k = shape[-2], shape[-1]
        layout = self.layout(len(shape))
        # The transpose moves 32-byte vectors (so K and N must fill them); the interleaved layout also
        # permutes K in 64-row tiles. N % 8 (the MMA's N) is implied by the 32-byte rule.
        k_step = 64 if layout is Layout.INTERLEAVED else 256 // self.bits
        n_step = 256 // self.bits
        problems = []
        for what, size, step in (("in_features", k, k_step), ("out_features", n, n_step)):
            if size % step:
                problems.append(
                    f"{name} {list(shape)}: {what} {size} is not a multiple of {step} "
                    f"({self.precision}, {layout.value} layout)"
                )
        return problems

    def tensor(self, name: str, shape: tuple[int, ...], dtype: str) -> QuantizedTensor:
        """The stored form of a planned weight `name` of `shape` (`[N, K]` or `[E, N, K]`) and model dtype
        code `dtype` (e.g. "BF16"). Raises UsageError if the kernels cannot take the shape."""
        problems = self.check(name, shape)
        if problems:
            raise UsageError("; ".join(problems), problems)
        return QuantizedTensor(name, tuple(shape), dtype, self.precision, self.layout(len(shape)))


def visible_gpu_arch() -> int | None:
    """The compute capability of the GPU torch sees (device 0, as TensorRT-LLM asks it), e.g. 90; None without one."""
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
    except (RuntimeError, AssertionError):  # a CPU-only build, or a driver that will not answer
        return None
    return int(major) * 10 + int(minor)


def resolve_arch(arch: int | None) -> int:
    """`--weight_only_arch`, or else the visible GPU's; a UsageError (exit 2) when there is none to ask."""
    if arch is not None:
        return arch
    found = visible_gpu_arch()
    choices = "|".join(str(a) for a in ARCHS if a != 87)
    if found is None:
        raise UsageError(
            "--use_weight_only: no GPU is visible to tell the target arch, and sm80 and sm90 bytes differ; "
            f"pass --weight_only_arch {choices} (the GPU TensorRT-LLM will run on)"
        )
    if found not in ARCHS:
        raise UsageError(
            f"--use_weight_only: the visible GPU is sm{found}, whose weight-only layout moe-convert does not "
            f"write; pass --weight_only_arch {choices} for the GPU TensorRT-LLM will run on"
        )
    return found


def scale_name(weight_name: str) -> str:
    """`...mlp.fc.weight` -> `...mlp.fc.per_channel_scale`."""
    base = weight_name.removesuffix(".weight")
    return f"{base}.per_channel_scale"


@dataclass(frozen=True)
class QuantizedTensor:
    """One planned weight under a weight-only scheme: its stored shapes and how to compute its bytes."""

    name: str
    shape: tuple[int, ...]  # planned, row-major: [N, K] or [E, N, K]
    dtype: str  # model dtype code of the rows fed in and of the scales, e.g. "BF16"
    precision: str
    layout: Layout

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def rows(self) -> int:
        """Rows of the planned tensor (experts flattened): the scales, and the unit of streaming."""
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        """Stored bytes per planned row."""
        return self.shape[-1] * self.bits // 8

    @property
    def group(self) -> int:
        """Rows that must be processed together; blocks start and end on multiples of this."""
        return _INTERLEAVE[self.bits] if self.layout is Layout.INTERLEAVED else 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """TensorRT-LLM's stored shape: the op input's `[K, N*b/8]` (per expert)."""
        *lead, n, k = self.shape
        return (*lead, k, n * self.bits // 8)

    weight_dtype = "I8"

    @property
    def weight_nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def scale_nbytes(self) -> int:
        from .header import itemsize

        return self.rows * itemsize(self.dtype)

    @property
    def scale_name(self) -> str:
        return scale_name(self.name)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return self.shape[:-1]

    def quantize_bits(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Quantize and preprocess a block of whole planned rows, with numpy (no torch: a conversion never
        imports it, which takes 1-4 s).

        Args:
            rows: `[R, K]` rows of the planned tensor as raw bits of the model dtype (int16 for bf16/fp16,
                int32 for fp32), R a multiple of `group`.
            out: uint8, `R * row_bytes`: receives the block's stored bytes (to be written at
                `first_row * row_bytes`).

        Returns the block's scales (`[R]`) as raw bits of the model dtype.
        """
        from .header import itemsize
        from .reading import BITS

        r, k = rows.shape
        if k != self.shape[-1] or r % self.group:
            raise ValueError(
                f"{self.name}: a block must be whole rows of {self.shape[-1]} elements, a multiple of {self.group} "
                f"rows; got {list(rows.shape)}"
            )
        item = itemsize(self.dtype)
        if rows.dtype != BITS[item]:
            raise ValueError(f"{self.name}: rows must be the raw bits of {self.dtype}, got {rows.dtype}")
        if out.dtype != np.uint8 or out.size != r * self.row_bytes:
            raise ValueError(f"{self.name}: out must be {r * self.row_bytes} uint8 elements for {r} rows")
        scales = np.empty(r, dtype=BITS[item])
        amax = np.empty(r, dtype=np.float32)
        step = max(self.group, _SUB_BLOCK_ELEMENTS // k // self.group * self.group)
        with np.errstate(all="ignore"):  # inf / NaN is reported below, as one error naming the tensor
            for r0 in range(0, r, step):
                r1 = min(r, r0 + step)
                out_bytes = out[r0 * self.row_bytes : r1 * self.row_bytes]
                _quantize_block(rows[r0:r1], self, out_bytes, amax[r0:r1], scales[r0:r1])
        if not np.isfinite(amax).all():
            raise CheckpointError(
                f"{self.name}: the weight has inf or NaN values, which weight-only quantization cannot represent "
                "(TensorRT-LLM would write meaningless bytes); check the source checkpoint"
            )
        return scales

    def quantize_rows(
        self, rows_RK: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`quantize_bits` on torch tensors (tests, the API): `[R, K]` rows in the model dtype, an optional
        uint8 buffer of `R * row_bytes`; returns the stored bytes (uint8) and the scales (`[R]`, model dtype)."""
        import torch

        from .header import DTYPES

        dtype = DTYPES[self.dtype]
        if rows_RK.dtype != dtype:
            raise ValueError(f"{self.name}: rows must be {dtype} (the model dtype), got {rows_RK.dtype}")
        r = rows_RK.shape[0]
        if out is None:
            out = torch.empty(r * self.row_bytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() != r * self.row_bytes:
            raise ValueError(f"{self.name}: out must be {r * self.row_bytes} uint8 elements for {r} rows")
        bits = torch.int16 if dtype.itemsize == 2 else torch.int32
        scales = self.quantize_bits(rows_RK.contiguous().view(bits).numpy(), out.numpy())
        return out, torch.from_numpy(scales).view(dtype)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole tensor at once (tests, small tensors): stored weight (int8, `weight_shape`) and scales."""
        import torch

        data, scales = self.quantize_rows(w.reshape(self.rows, self.shape[-1]))
        return data.view(torch.int8).view(self.weight_shape), scales.view(self.scale_shape)

    def unpack(self, weight: torch.Tensor) -> torch.Tensor:
        """The signed quantized values `[.., N, K]` (int8) of stored bytes: the preprocessing undone."""
        import torch

        data = weight.reshape(-1).view(torch.uint8)
        if data.numel() != self.weight_nbytes:
            raise ValueError(f"{self.name}: expected {self.weight_nbytes} bytes, got {data.numel()}")
        biased = self.layout is not Layout.COLUMN_MAJOR
        if self.bits == 4:
            nibbles = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(-1).to(torch.int8)
            q = nibbles - 8 if biased else torch.where(nibbles >= 8, nibbles - 16, nibbles)
        else:
            q = data.view(torch.int8) ^ -128 if biased else data.view(torch.int8)  # the +128 bias flips the top bit
        view_shape, permutation = _element_order(self.rows, self.shape[-1], self.bits, self.layout)
        inverse = [permutation.index(i) for i in range(len(permutation))]
        permuted_shape = [view_shape[p] for p in permutation]
        rows_NK = q.view(permuted_shape).permute(inverse).reshape(self.rows, self.shape[-1])
        return rows_NK.reshape(self.shape)

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """float32 `[.., N, K]`: the signed values times the stored (model-dtype) scales, as the GEMM sees them."""
        import torch

        q = self.unpack(weight).to(torch.float32)
        return q * scales.reshape(*self.shape[:-1], 1).to(torch.float32)


def _element_order(rows: int, k: int, bits: int, layout: Layout) -> tuple[list[int], list[int]]:
    """A view shape of `[rows, K]` and the axis permutation that puts its elements in stored order.

    Interleaved layout, with j the row inside its group, T the 64-wide K tile, and K inside a tile split as
    int8: k = 16g + 8c + 2d + b; int4: k = 32g + 8a + 2d + b. TensorRT-LLM's steps, as axis moves:
    the row permutation of K (int8 0 1 8 9 2 3 10 11 ..., int4 0 1 8 9 16 17 24 25 2 3 ...) swaps c/a and d;
    the column interleave moves T before j; the int8 byte swap 1<->2 inside each 4 bytes swaps b and c;
    the int4 nibble order [0 2 4 6 1 3 5 7] inside each 32-bit word swaps b and a. Result: (T, j, g, d, b, c|a).
    The permuted (sm90) layout is the same without the interleave, so per row, on the 16 (int8) or 32 (int4)
    values the row permutation moves together: (c|a, d, b) -> (d, b, c|a).
    """
    if layout is Layout.COLUMN_MAJOR:
        return [rows, k], [0, 1]
    if layout is Layout.PERMUTED:
        run = [2, 4, 2] if bits == 8 else [4, 4, 2]
        return [rows, k // math.prod(run), *run], [0, 1, 3, 4, 2]
    group = _INTERLEAVE[bits]
    tile = [4, 2, 4, 2] if bits == 8 else [2, 4, 4, 2]
    return [rows // group, group, k // 64, *tile], [0, 2, 1, 3, 5, 6, 4]


# nextafter(0.5, 0) in float32 (x + 0.5 would round 0.49999997 up to 1).
_HALF_DOWN = np.float32(0.5 - 2.0**-25)


_SIGN_BIT = np.int32(-(2**31))
_HALF_DOWN_BITS = int(_HALF_DOWN.view(np.int32))


def _round_half_away(x: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> np.ndarray:
    """C's round() (np.rint goes to even) of float32 `x` into the integer array `out`: x + copysign(HALF_DOWN,
    x), truncated by the float-to-int conversion. Exact for every |x| < 2**23 (the tests check it against
    floor(|x| + 0.5) in float64). Clobbers `x`; `scratch` is float32 space of its size. copysign on the bits
    (x's sign bit, HALF_DOWN's others): a third of np.copysign's time (measured)."""
    half = np.bitwise_and(x.view(np.int32), _SIGN_BIT, out=scratch.view(np.int32))
    np.bitwise_or(half, _HALF_DOWN_BITS, out=half)
    np.add(x, scratch, out=x)
    np.copyto(out, x, casting="unsafe")
    return out


@functools.lru_cache(maxsize=_GATHER_CACHE)
def _gather_index(rows: int, k: int, bits: int, layout: Layout) -> np.ndarray:
    """Flat source positions of a `[rows, K]` block in stored order (a gather moves elements several times
    faster than a copy through the permuted view, whose inner loop is strided)."""
    view_shape, permutation = _element_order(rows, k, bits, layout)
    return np.arange(rows * k, dtype=np.intp).reshape(view_shape).transpose(permutation).reshape(-1)


_scratch = threading.local()


def _scratch_buffer(purpose: str, dtype: type[np.generic], n: int) -> np.ndarray:
    """This thread's reused buffer for one step: fresh blocks of this size would cost page faults each time."""
    buffers: dict[str, np.ndarray] = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(purpose)
    if buf is None or buf.dtype != dtype or buf.size < n:  # grows to the largest step: one group on a lane
        buf = buffers[purpose] = np.empty(n, dtype=dtype)
    return buf[:n]


def _quantize_block(
    rows: np.ndarray, qt: QuantizedTensor, out: np.ndarray, amax: np.ndarray, scales: np.ndarray
) -> None:
    """One cache-sized block of whole row groups (raw bits): its bytes into `out`, its amax (float32) and
    stored scales (raw bits of the model dtype).

    Every step is one vectorized pass over the block, small enough to stay in the CPU cache (one pass over a
    whole 4 MB block of rows, or a fresh temporary, costs several times as much).
    """
    from .casts import cast_function

    r, k = rows.shape
    bits = qt.bits
    qmax = (1 << (bits - 1)) - 1
    n = r * k
    x = _scratch_buffer("x", np.float32, n).reshape(r, k)
    cast_function(qt.dtype, "F32")(x.view(np.int32), rows)  # float32(w), exact
    # max |w| per row as the larger of -min and max: two reads of x instead of writing |x| and reading it
    # back; abs() turns the -0.0 of an all-zero row into TensorRT-LLM's +0.0 (its max starts from 0.f), and
    # NaN stays NaN for the check after.
    low = _scratch_buffer("low_per_row", np.float32, r)
    np.max(x, axis=1, out=amax)
    np.maximum(np.abs(amax, out=amax), np.abs(np.min(x, axis=1, out=low), out=low), out=amax)
    scale = amax * np.float32(1.0 / (qmax + 1))  # float32 amax / 128 (or / 8), as TensorRT-LLM multiplies
    cast_function("F32", qt.dtype)(scales, scale.view(np.int32))  # the stored scale, rounded to the model dtype
    scale[scale == 0] = 1.0  # an all-zero row quantizes to 0, as in TensorRT-LLM
    np.divide(x, scale[:, None], out=x)
    flat = x.reshape(-1)
    np.clip(flat, -qmax - 1, qmax, out=flat)  # clipping before rounding is the same as after: the bounds are integers
    q = _round_half_away(flat, _scratch_buffer("half", np.float32, n), _scratch_buffer("q", np.int8, n))
    biased = qt.layout is not Layout.COLUMN_MAJOR
    if biased:  # into stored order
        # mode="wrap": the indexes are in range, and "raise" checks each one (30% slower, measured)
        q = np.take(q, _gather_index(r, k, bits, qt.layout), out=_scratch_buffer("ordered", np.int8, n), mode="wrap")
    if bits == 8:
        if biased:
            np.bitwise_xor(q.view(np.uint8), 0x80, out=out)  # + 128 as unsigned: flips the top bit
        else:
            np.copyto(out, q.view(np.uint8))
        return
    # two values per byte, the first in the low nibble: as int16 a pair is lo | hi << 8 (little-endian,
    # like every host numpy runs on and like safetensors' data)
    pairs = q.view(np.int16)
    low16 = np.bitwise_and(pairs, 0xF, out=_scratch_buffer("low", np.int16, n // 2))
    high16 = np.right_shift(pairs, 4, out=_scratch_buffer("high", np.int16, n // 2))
    np.bitwise_and(high16, 0xF0, out=high16)
    np.copyto(out, np.bitwise_or(low16, high16, out=low16), casting="unsafe")
    if biased:
        np.bitwise_xor(out, 0x88, out=out)  # + 8 on each signed nibble: flips its top bit
