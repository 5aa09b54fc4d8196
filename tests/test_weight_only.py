"""Weight-only INT8 / INT4 quantization: the fast path against an independent reference, hand-checked bytes,
round trips, streaming in blocks, and golden vectors from TensorRT-LLM's own C++.

How golden/weight_only_trtllm.json was made: the C++ functions behind TensorRT-LLM's CPU op
`symmetric_quantize_last_axis_of_batched_matrix` (0.13-era cutlass_preprocessors.cpp: symmetric_quantize,
preprocess_weights_for_mixed_gemm, permute_B_rows_for_mixed_gemm, subbyte_transpose_impl,
interleave_column_major_tensor, add_bias_and_interleave_int8s/int4s_inplace, getLayoutDetailsForTransform
with mixed_gemm_B_layout.h's LayoutDetailsB; weightOnlyQuantOp.cpp's force_interleave = (dim == 3); CUDA's
host __float2half / __float2bfloat16) were transcribed into a standalone program (kept outside this
repository: public code stays out of our commits) taking the arch as an argument instead of asking the GPU,
built with `g++ -O2 -std=c++17`, and run on the op input (the transpose of `case_weight(...)`) of each case
below. The file keeps each case's inputs (shape, dtype, seed) and the sha256 of the bytes the C++ wrote.
The same run compared 160 further random shapes and 11,520 shapes against the C++ shape checks: all equal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from weight_only_cases import DTYPES, case_weight
from weight_only_reference import reference

from moe_convert.errors import CheckpointError, UsageError
from moe_convert.header import CODES
from moe_convert.weight_only import Layout, QuantizedTensor, WeightOnly, scale_name

GOLDEN = Path(__file__).resolve().parent / "golden" / "weight_only_trtllm.json"
ARCH_CLASSES = [75, 80, 86, 89, 90]


def planned(
    precision: str,
    arch: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
    sm90_layout: str = "column_major",
) -> QuantizedTensor:
    scheme = WeightOnly(precision, arch, sm90_layout)
    return scheme.tensor("transformer.layers.0.mlp.fc.weight", shape, CODES[dtype])


def stored_bytes(qt: QuantizedTensor, w: torch.Tensor) -> tuple[bytes, bytes]:
    weight, scales = qt.quantize(w)
    return weight.numpy().tobytes(), scales.view(-1).view(torch.uint8).numpy().tobytes()


def bits_of(precision: str) -> int:
    return 8 if precision == "int8" else 4


# --- the fast path against the slow reference written from the spec -------------------------------------


@pytest.mark.parametrize("arch", ARCH_CLASSES)
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 128), (2, 64, 64)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matches_spec_reference(dtype: str, shape: tuple[int, ...], precision: str, arch: int) -> None:
    w = case_weight(shape, dtype, bits_of(precision), seed=len(shape) * 100 + arch)
    qt = planned(precision, arch, shape, DTYPES[dtype])
    assert stored_bytes(qt, w) == reference(w, precision, arch)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 128), (64, 192)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sm90_permuted_matches_spec_reference(dtype: str, shape: tuple[int, ...], precision: str) -> None:
    """TensorRT-LLM 1.2's sm90 2-D layout: the reference's steps a (row permutation), b (transpose) and d
    (bias, reorder), without the column interleave; K needs no 64-wide tiles here (192 = 3 x 64, and for int8
    96 below)."""
    w = case_weight(shape, dtype, bits_of(precision), seed=shape[1])
    qt = planned(precision, 90, shape, DTYPES[dtype], "permuted")
    assert qt.layout is Layout.PERMUTED and qt.group == 1
    assert stored_bytes(qt, w) == reference(w, precision, 90, "permuted")
    if precision == "int8":
        w = case_weight((32, 96), dtype, 8, seed=96)
        assert stored_bytes(planned("int8", 90, (32, 96), DTYPES[dtype], "permuted"), w) == reference(
            w, "int8", 90, "permuted"
        )


# --- hand-checked vectors ------------------------------------------------------------------------------


def test_int8_sm90_bytes_by_hand() -> None:
    """sm90 2-D: the signed values, row by row. amax 64 -> scale 0.5: +amax -> 127 (clipped from 128),
    -amax -> -128, and half-way values go away from zero (torch.round would give 2, -2, 0)."""
    row = [64.0, -64.0, 1.25, -1.25, 0.25, -0.25, 1.0, 0.0] + [0.0] * 24
    w = torch.tensor([row, [0.0] * 32] + [[0.5] * 32] * 30, dtype=torch.bfloat16)
    weight, scales = planned("int8", 90, (32, 32)).quantize(w)
    assert weight.shape == (32, 32)
    assert weight.view(-1)[:8].tolist() == [127, -128, 3, -3, 1, -1, 2, 0]
    assert scales[0].item() == 0.5
    assert scales[1].item() == 0.0 and weight.view(-1)[32:64].eq(0).all()  # a zero row: scale 0, values 0
    assert weight.view(-1)[64:96].eq(127).all()  # a constant row is all +amax


def test_int4_nibble_order_by_hand() -> None:
    """sm90 2-D int4: byte k of a row holds elements 2k (low nibble) and 2k+1 (high nibble), signed."""
    row = [1.0, 2.0, -1.0, -8.0, 3.5, 0.5] + [0.0] * 58  # amax 8 -> scale 1; -8 -> -8; 3.5 -> 4; 0.5 -> 1
    w = torch.tensor([row] * 64, dtype=torch.float32)
    weight, scales = planned("int4", 90, (64, 64), torch.float32).quantize(w)
    assert scales[0].item() == 1.0
    assert weight.view(torch.uint8).view(-1)[:3].tolist() == [0x21, 0x8F, 0x14]


def test_int8_interleaved_bytes_by_hand() -> None:
    """sm80 int8: rows 0 and 1 form an interleave group; inside each 64-wide K tile the row permutation
    0 1 8 9 2 3 10 11 ... and the byte swap 1<->2 give K order 0 8 1 9 2 10 3 11 ...; every byte +128."""
    k = 128
    row0 = [float(i) for i in range(k - 1)] + [128.0]  # amax 128 -> scale 1; q = k, and 128 -> 127
    row1 = [-float(i) for i in range(k)]  # amax 127 -> scale 127/128
    rest = [[1.0] * k] * 30
    w = torch.tensor([row0, row1, *rest], dtype=torch.float32)
    data = planned("int8", 80, (32, k), torch.float32).quantize(w)[0].view(torch.uint8).view(-1)
    first16 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    assert data[:16].tolist() == [128 + i for i in first16]  # row 0, tile 0
    assert data[16:32].tolist() == [128 + 16 + i for i in first16]
    # then row 1's tile 0 (-k * 128/127, rounded), then row 0's tile 1
    row1_q = [-round(i * 128 / 127) for i in first16]
    assert data[64:80].tolist() == [128 + q for q in row1_q]
    assert data[128:144].tolist() == [128 + 64 + i for i in first16]


def test_int8_sm90_permuted_bytes_by_hand() -> None:
    """sm90 2-D as TensorRT-LLM 1.2 writes it: each row on its own (no interleave), K order 0 8 1 9 2 10 ... in
    every 16 values (row permutation, then the byte swap 1<->2), every byte +128."""
    k = 64
    w = torch.tensor([[float(i) for i in range(k - 1)] + [128.0]] * 32, dtype=torch.float32)
    data = planned("int8", 90, (32, k), torch.float32, "permuted").quantize(w)[0].view(torch.uint8).view(-1)
    first16 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    assert data[:16].tolist() == [128 + i for i in first16]
    assert data[48:63].tolist() == [128 + 48 + i for i in first16][:15] and data[63] == 128 + 127
    assert torch.equal(data[64:128], data[:64])  # row 1 follows row 0


def test_int4_interleaved_bytes_by_hand() -> None:
    """sm80 int4: groups of 4 rows; K order in each 32-bit word after the row permutation (0 1 8 9 16 17 24 25)
    and the nibble reorder [0 2 4 6 1 3 5 7]: 0 8 16 24 1 9 17 25; nibbles are q + 8, two per byte, low first."""
    k = 64
    row = [float(i % 8 - 4) for i in range(k)]  # q = i % 8 - 4; amax 8 -> scale 1 via the last element
    row[-1] = -8.0
    w = torch.tensor([row] * 64, dtype=torch.float32)
    data = planned("int4", 80, (64, k), torch.float32).quantize(w)[0].view(torch.uint8).view(-1)

    def nib(i: int) -> int:
        return row[i] + 8 if i != k - 1 else 0

    order = [0, 8, 16, 24, 1, 9, 17, 25]
    expect = [int(nib(order[2 * j]) + 16 * nib(order[2 * j + 1])) for j in range(4)]
    assert data[:4].tolist() == expect


def test_rounding_just_below_half_a_step() -> None:
    """0.49999997 (the float32 just under 0.5) rounds to 0: x + 0.5 would round it to 1."""
    s = 0.5
    row = [64.0, s * 0.49999997, -s * 0.49999997, s * 0.5] + [0.0] * 28
    w = torch.tensor([row] * 32, dtype=torch.float32)
    weight, _ = planned("int8", 90, (32, 32), torch.float32).quantize(w)
    assert weight.view(-1)[:4].tolist() == [127, 0, 0, 1]


def test_round_half_away_formula_is_exact() -> None:
    """The fast path's rounding against floor(|x| + 0.5) in float64 (exact there): every float32 in [0.4, 0.6],
    and the 512 float32s around every integer and half-integer up to 130, both signs."""
    from moe_convert.weight_only import _round_half_away

    def bits(x: float) -> int:
        return int(struct.unpack("<I", struct.pack("<f", x))[0])

    dense = np.arange(bits(0.4), bits(0.6), dtype=np.int64)
    centers = np.array([bits(v / 2) for v in range(1, 261)], dtype=np.int64)
    near = (centers[:, None] + np.arange(-256, 256)[None, :]).reshape(-1)
    x = np.concatenate([dense, near]).astype(np.int32).view(np.float32)
    x = np.concatenate([x, -x])
    exact = np.copysign(np.floor(np.abs(x.astype(np.float64)) + 0.5), x.astype(np.float64))
    got = _round_half_away(x.copy(), np.empty_like(x), np.empty(x.size, dtype=np.int32))
    assert np.array_equal(got.astype(np.float64), exact)


# --- round trip ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    precision=st.sampled_from(["int8", "int4"]),
    arch=st.sampled_from(ARCH_CLASSES),
    experts=st.sampled_from([0, 1, 3]),
    n_groups=st.integers(1, 3),
    k_tiles=st.integers(1, 3),
    dtype=st.sampled_from(list(DTYPES)),
    sm90_layout=st.sampled_from(["column_major", "permuted"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_one_step(
    precision: str, arch: int, experts: int, n_groups: int, k_tiles: int, dtype: str, sm90_layout: str, seed: int
) -> None:
    bits = bits_of(precision)
    n, k = n_groups * 256 // bits, k_tiles * 64
    shape = (experts, n, k) if experts else (n, k)
    w = case_weight(shape, dtype, bits, seed)
    qt = planned(precision, arch, shape, DTYPES[dtype], sm90_layout)
    weight, scales = qt.quantize(w)
    q = qt.unpack(weight).float()
    step = w.float().abs().amax(dim=-1, keepdim=True) / (1 << (bits - 1))  # the unrounded float32 scale
    x = torch.where(step == 0, 0.0, w.float() / step)
    qmax = (1 << (bits - 1)) - 1
    assert (q - x.clamp(-qmax - 1, qmax)).abs().max() <= 0.5  # nearest step, once clipped
    assert (q - x).abs().max() <= 1.0  # within one step (only +amax, clipped from 2**(b-1), is a whole step off)
    back = qt.dequantize(weight, scales)
    stored = scales.float().unsqueeze(-1)
    assert torch.equal(back, q * stored)
    # one step, plus what rounding the scale to the model dtype moved, plus float32 rounding of the products
    bound = step + q.abs() * (stored - step).abs() + 1e-6 * w.float().abs()
    assert ((back - w.float()).abs() <= bound).all()


# --- streaming: any split into whole row groups gives the whole tensor's bytes ----------------------------


@settings(max_examples=40, deadline=None)
@given(
    precision=st.sampled_from(["int8", "int4"]),
    arch=st.sampled_from([80, 90]),
    experts=st.sampled_from([0, 2]),
    cuts=st.lists(st.integers(0, 64), max_size=6),
    sm90_layout=st.sampled_from(["column_major", "permuted"]),
    seed=st.integers(0, 2**16),
)
def test_blocks_equal_whole_tensor(
    precision: str, arch: int, experts: int, cuts: list[int], sm90_layout: str, seed: int
) -> None:
    bits = bits_of(precision)
    n, k = 2 * 256 // bits, 128
    shape = (experts, n, k) if experts else (n, k)
    w = case_weight(shape, "bfloat16", bits, seed)
    qt = planned(precision, arch, shape, sm90_layout=sm90_layout)
    whole_weight, whole_scales = qt.quantize(w)
    rows = w.reshape(qt.rows, k)
    bounds = sorted({0, qt.rows, *(c * qt.group % qt.rows for c in cuts)})
    data = torch.zeros(qt.weight_nbytes, dtype=torch.uint8)
    scales = torch.zeros(qt.rows, dtype=torch.bfloat16)
    for r0, r1 in reversed(list(itertools.pairwise(bounds))):  # any order: blocks are independent
        block, block_scales = qt.quantize_rows(rows[r0:r1].clone())
        data[r0 * qt.row_bytes : r1 * qt.row_bytes] = block
        scales[r0:r1] = block_scales
    assert torch.equal(data, whole_weight.view(-1).view(torch.uint8))
    assert torch.equal(scales, whole_scales.view(-1))


def test_block_must_be_whole_row_groups() -> None:
    qt = planned("int4", 80, (64, 64))
    with pytest.raises(ValueError, match="multiple of 4 rows"):
        qt.quantize_rows(torch.zeros(6, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="model dtype"):
        qt.quantize_rows(torch.zeros(4, 64, dtype=torch.float16))


def test_unaligned_output_buffer() -> None:
    """The executor may hand over a view of its buffer at any byte offset."""
    for precision in ("int8", "int4"):
        qt = planned(precision, 80, (64, 64))
        w = case_weight((64, 64), "bfloat16", bits_of(precision), 5)
        buffer = torch.zeros(qt.weight_nbytes + 1, dtype=torch.uint8)
        qt.quantize_rows(w, out=buffer[1:])
        assert torch.equal(buffer[1:], qt.quantize(w)[0].view(-1).view(torch.uint8))


def test_quantize_rows_writes_into_a_given_buffer() -> None:
    qt = planned("int8", 80, (32, 64))
    w = case_weight((32, 64), "bfloat16", 8, 3)
    buffer = torch.full((32 * 64,), 7, dtype=torch.uint8)
    out, _ = qt.quantize_rows(w, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, qt.quantize(w)[0].view(-1).view(torch.uint8))


# --- golden vectors from TensorRT-LLM's C++ -----------------------------------------------------------------


def _golden_cases() -> list[dict[str, object]]:
    cases: list[dict[str, object]] = json.loads(GOLDEN.read_text())["cases"]
    return cases


@pytest.mark.parametrize(
    "case",
    _golden_cases(),
    ids=lambda c: f"{c['dtype']}-{c['precision']}-sm{c['arch']}-{'x'.join(map(str, c['shape']))}",
)
def test_golden_bytes_from_trtllm_cpp(case: dict[str, object]) -> None:
    precision, arch, dtype = str(case["precision"]), int(str(case["arch"])), str(case["dtype"])
    shape = tuple(int(d) for d in case["shape"])  # type: ignore[attr-defined]
    w = case_weight(shape, dtype, bits_of(precision), int(str(case["seed"])))
    weight, scales = stored_bytes(planned(precision, arch, shape, DTYPES[dtype]), w)
    assert hashlib.sha256(weight).hexdigest() == case["weight_sha256"]
    assert hashlib.sha256(scales).hexdigest() == case["scale_sha256"]


def test_golden_covers_every_arch_precision_rank_and_dtype() -> None:
    seen = {(c["dtype"], c["precision"], c["arch"], len(c["shape"])) for c in _golden_cases()}  # type: ignore[arg-type]
    assert seen >= {(d, p, a, r) for d in DTYPES for p in ("int8", "int4") for a in ARCH_CLASSES for r in (2, 3)}


# --- shapes, names, limits, options ------------------------------------------------------------------------


def test_stored_shapes_for_mixtral_8x7b_experts() -> None:
    fc = WeightOnly("int4", 90, "column_major").tensor("transformer.layers.0.mlp.fc.weight", (8, 28672, 4096), "BF16")
    assert fc.layout is Layout.INTERLEAVED  # MoE weights keep the sm80 layout on sm90
    assert fc.weight_shape == (8, 4096, 14336) and fc.weight_dtype == "I8"
    assert fc.scale_name == "transformer.layers.0.mlp.fc.per_channel_scale" and fc.scale_shape == (8, 28672)
    assert fc.weight_nbytes == 8 * 28672 * 4096 // 2 and fc.row_bytes == 2048 and fc.group == 4
    assert fc.scale_nbytes == 8 * 28672 * 2
    sm90 = WeightOnly("int8", 90, "column_major")
    dense = sm90.tensor("transformer.layers.0.attention.dense.weight", (4096, 512), "BF16")
    assert dense.layout is Layout.COLUMN_MAJOR and dense.group == 1
    assert dense.weight_shape == (512, 4096) and dense.scale_shape == (4096,)
    assert (
        scale_name("transformer.layers.3.attention.qkv.weight")
        == "transformer.layers.3.attention.qkv.per_channel_scale"
    )


@pytest.mark.parametrize(
    ("precision", "arch", "shape", "ok"),
    [
        ("int8", 80, (32, 64), True),
        ("int8", 80, (32, 96), False),  # K: the interleaved layout permutes 64-row tiles
        ("int8", 90, (32, 96), True),  # sm90 2-D only transposes 32-byte vectors
        ("int8", 90, (2, 32, 96), False),  # ... but MoE weights use the sm80 layout
        ("int8", 80, (48, 64), False),  # N: 32-byte vectors of int8
        ("int4", 80, (32, 64), False),  # N: 32-byte vectors of int4 are 64 values
        ("int4", 90, (64, 96), False),
        ("int4", 89, (64, 128), True),
    ],
)
@pytest.mark.parametrize("sm90_layout", ["column_major", "permuted"])
def test_shape_limits(precision: str, arch: int, shape: tuple[int, ...], ok: bool, sm90_layout: str) -> None:
    problems = WeightOnly(precision, arch, sm90_layout).check("transformer.layers.1.attention.qkv.weight", shape)
    assert (not problems) == ok
    for p in problems:
        assert p.startswith(f"transformer.layers.1.attention.qkv.weight {list(shape)}: ")


def test_bad_shape_is_refused_with_name_and_numbers() -> None:
    with pytest.raises(UsageError) as err:
        WeightOnly("int4", 80).tensor("transformer.layers.0.attention.dense.weight", (4096, 96), "BF16")
    message = "transformer.layers.0.attention.dense.weight [4096, 96]: in_features 96 is not a multiple of 64 (int4,"
    assert message in str(err.value)


@pytest.mark.parametrize(("precision", "arch"), [("int2", 80), ("int8", 70), ("int4", 100)])
def test_bad_options_are_refused(precision: str, arch: int) -> None:
    with pytest.raises(UsageError, match="--weight_only_"):
        WeightOnly(precision, arch)


def test_sm90_needs_a_layout_other_archs_ignore_it() -> None:
    """sm90 2-D bytes differ between TensorRT-LLM versions: no default, one line naming both choices."""
    with pytest.raises(UsageError) as err:
        WeightOnly("int8", 90)
    assert "--weight_only_sm90_layout column_major" in str(err.value) and "permuted (1.2)" in str(err.value)
    with pytest.raises(UsageError, match="not 'transposed'"):
        WeightOnly("int8", 90, "transposed")
    assert WeightOnly("int8", 80, "permuted") == WeightOnly("int8", 80)  # the same bytes: the same scheme


def test_quant_algo_and_config_block() -> None:
    assert WeightOnly("int8", 80).quant_algo == "W8A16" and WeightOnly("int4", 90, "permuted").quant_algo == "W4A16"
    assert WeightOnly("int4", 80).quantization_config() == {
        "quant_algo": "W4A16",
        "kv_cache_quant_algo": None,
        "group_size": 128,
        "smoothquant_val": 0.5,
        "clamp_val": None,
        "has_zero_point": False,
        "pre_quant_scale": False,
        "exclude_modules": None,
    }


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    w = torch.ones(32, 64, dtype=torch.bfloat16)
    w[5, 7] = bad
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.0\.mlp\.fc\.weight: .*inf or NaN"):
        planned("int8", 80, (32, 64)).quantize(w)


def test_scale_is_rounded_to_the_model_dtype_but_quantizing_uses_float32() -> None:
    """float16, amax (1 + 2**-10) * 2**-10: the scale amax/128 is subnormal in float16 and is stored rounded to
    2**-17, but the values are quantized with the float32 scale: 2025 * 2**-21 -> 126.44 -> 126 (the rounded
    scale would give 126.56 -> 127)."""
    amax, w_e = 1025 * 2.0**-20, 2025 * 2.0**-21
    w = torch.tensor([[amax, w_e] + [0.0] * 30] * 32, dtype=torch.float16)
    weight, scales = planned("int8", 90, (32, 32), torch.float16).quantize(w)
    assert scales[0].item() == 2.0**-17
    assert weight.view(-1)[:2].tolist() == [127, 126]
