"""A slow, literal reading of the weight-only spec (trtllm-weight-only.md sections 2 and 3) in plain Python.

Shares no code with moe_convert.weight_only: it works on TensorRT-LLM's own orientation (the op input
`[K, N]`, quantized per column), steps through the spec one loop at a time on Python ints and bytes, and
emulates float32 and the model dtype with `struct`. Small shapes only.
"""

from __future__ import annotations

import math
import struct

import torch

# fmt: off
ROW_PERMUTATION = {  # the spec's maps, as written there
    8: [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15],
    4: [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31],
}
# fmt: on


def f32(x: float) -> float:
    """Round a Python float (double) to float32. A double holds the exact result of one float32 + - * /
    closely enough that rounding it to float32 gives the float32 operation's result."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def f32_bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


def to_model_dtype_bytes(x: float, dtype: torch.dtype) -> bytes:
    """float32 -> model dtype, round to nearest even, as little-endian bytes."""
    if dtype == torch.float32:
        return struct.pack("<f", x)
    if dtype == torch.float16:
        return struct.pack("<e", x)  # struct rounds to nearest even
    u = f32_bits(x)  # bfloat16: the top 16 bits of float32, rounded to nearest even
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return struct.pack("<H", u & 0xFFFF)


def round_half_away(x: float) -> int:
    """C's round(): half-way cases away from zero (Python's round() goes to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))  # exact in double for |x| < 2**52


def quantize_matrix(w_KN: list[list[float]], bits: int, dtype: torch.dtype) -> tuple[list[list[int]], bytes]:
    """Section 2 on one op-input matrix [K][N] (float32 values): signed ints [K][N] and the stored scales."""
    k_rows, n_cols = len(w_KN), len(w_KN[0])
    qmax = (1 << (bits - 1)) - 1
    q = [[0] * n_cols for _ in range(k_rows)]
    scales = b""
    for j in range(n_cols):
        amax = 0.0
        for i in range(k_rows):
            amax = max(amax, abs(w_KN[i][j]))
        s = f32(amax * (1.0 / (qmax + 1)))
        scales += to_model_dtype_bytes(s, dtype)
        for i in range(k_rows):
            v = round_half_away(f32(w_KN[i][j] / s)) if s != 0 else 0
            q[i][j] = max(-qmax - 1, min(qmax, v))
    return q, scales


def pack_row(values: list[int], bits: int) -> list[int]:
    """A row of signed ints as bytes; int4: byte k holds elements 2k (low nibble) and 2k+1 (high)."""
    if bits == 8:
        return [v & 0xFF for v in values]
    return [(values[2 * i] & 0xF) | ((values[2 * i + 1] & 0xF) << 4) for i in range(len(values) // 2)]


def preprocess(q_KN: list[list[int]], bits: int, layout: str) -> bytes:
    """Section 3 on one quantized op-input matrix [K][N]: layout "interleaved" (sm75-89, MoE), "column_major"
    (sm90 2-D as the spec and TensorRT-LLM 0.10-0.11 write it) or "permuted" (sm90 2-D in TensorRT-LLM 1.2:
    steps a, b and d, without the column interleave c)."""
    k_rows, n_cols = len(q_KN), len(q_KN[0])
    if layout == "column_major":  # the transpose [N][K] of the signed values
        return bytes(b for n in range(n_cols) for b in pack_row([q_KN[k][n] for k in range(k_rows)], bits))
    # a. permute rows of K in groups of 16 / 32 (whole rows move, so the 32-bit words of a row move with it)
    perm = ROW_PERMUTATION[bits]
    permuted = [q_KN[(i // len(perm)) * len(perm) + perm[i % len(perm)]] for i in range(k_rows)]
    # b. transpose to [N][K], packing int4 along K (low nibble = even K index)
    t_bytes = [pack_row([permuted[k][n] for k in range(k_rows)], bits) for n in range(n_cols)]
    # c. interleave: 32-bit words of [N][K] viewed [N/il, il, (K/ept)/vt, vt], axes 1 and 2 swapped
    ept = 32 // bits
    vt = 64 // ept
    il = 2 if bits == 8 else 4
    words_per_col = k_rows // ept
    words = [[bytes(col[4 * w : 4 * w + 4]) for w in range(words_per_col)] for col in t_bytes]
    out_words = []
    if layout == "permuted":  # no interleave: the columns one after the other
        out_words = [word for col in words for word in col]
    for g in range(n_cols // il if layout == "interleaved" else 0):
        for tile in range(words_per_col // vt):
            for j in range(il):
                out_words += words[g * il + j][tile * vt : (tile + 1) * vt]
    # d. bias and reorder inside each 32-bit word
    out = b""
    for word in out_words:
        if bits == 8:
            b = [(x + 128) & 0xFF for x in word]
            out += bytes([b[0], b[2], b[1], b[3]])
        else:
            value = int.from_bytes(word, "little")
            signed = [(value >> (4 * i)) & 0xF for i in range(8)]
            nibbles = [(v - 16 if v >= 8 else v) + 8 for v in signed]  # + 8: signed [-8, 7] -> unsigned [0, 15]
            order = [0, 2, 4, 6, 1, 3, 5, 7]
            out += sum(nibbles[src] << (4 * dst) for dst, src in enumerate(order)).to_bytes(4, "little")
    return out


def reference(w: torch.Tensor, precision: str, arch: int, sm90_layout: str = "column_major") -> tuple[bytes, bytes]:
    """Stored weight bytes and scale bytes for a planned weight `w` ([N, K] or [E, N, K], model dtype)."""
    bits = 8 if precision == "int8" else 4
    layout = sm90_layout if arch == 90 and w.dim() == 2 else "interleaved"
    experts = w.reshape(-1, *w.shape[-2:])
    weight, scales = b"", b""
    for expert in experts:
        w_KN = expert.t().float().tolist()  # the op input: transpose of the planned rows, values exact in float32
        q, s = quantize_matrix(w_KN, bits, w.dtype)
        weight += preprocess(q, bits, layout)
        scales += s
    return weight, scales
