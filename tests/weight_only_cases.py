"""Deterministic weights for the weight-only quantization tests and golden vectors.

`case_weight` builds a planned-orientation weight (`[N, K]` or `[E, N, K]`) from Python's `random` (whose
sequence for a seed is stable across Python versions) and a fixed set of edge rows, so the golden vectors
in `golden/weight_only_trtllm.json` need no stored inputs. Used by tests/test_weight_only.py and by the
out-of-repo harness that produced those vectors (see that test's docstring).
"""

from __future__ import annotations

import random

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _edge_rows(k: int, qmax: int, dtype: torch.dtype) -> list[list[float]]:
    """Rows whose bytes are known by hand: zeros, ties, the +-amax asymmetry, signed zeros, tiny values."""
    q = qmax + 1  # 128 or 8
    amax = 64.0  # a power of two: the scale amax/q is exact, so w/s below is exactly the intended value
    s = amax / q
    ties = [(j % (2 * qmax) - qmax + 0.5) * s for j in range(k)]  # every value half-way between two steps
    ties[0] = amax
    plus_minus = [(amax if j % 3 == 0 else -amax if j % 3 == 1 else (j % 5 - 2) * s) for j in range(k)]
    tiny = 2.0**-24 if dtype == torch.float16 else 2.0**-130
    return [
        [0.0] * k,
        ties,
        plus_minus,
        [amax] + [-0.0] * (k - 2) + [s * 0.49999997],  # float32: just under half a step -> 0, not 1
        [tiny * (j % 3 - 1) for j in range(k)],  # subnormal in the model dtype
        [-amax] + [s * 0.5] * (k - 1),  # only -amax: -> -q; +half a step -> +1 (away from zero)
    ]


def case_weight(shape: tuple[int, ...], dtype: str, bits: int, seed: int) -> torch.Tensor:
    """A planned weight of `shape` ([N, K] or [E, N, K]) in `dtype`: per expert, the edge rows first, then
    random rows whose magnitudes span several binades."""
    rng = random.Random(seed)
    *lead, n, k = shape
    experts = lead[0] if lead else 1
    torch_dtype = DTYPES[dtype]
    qmax = (1 << (bits - 1)) - 1
    values: list[list[float]] = []
    for _ in range(experts):
        rows = _edge_rows(k, qmax, torch_dtype)[:n]
        while len(rows) < n:
            magnitude = 2.0 ** rng.randint(-9, 3)
            rows.append([rng.uniform(-1.0, 1.0) * magnitude for _ in range(k)])
        values.extend(rows)
    return torch.tensor(values, dtype=torch.float32).to(torch_dtype).reshape(shape)


# The golden cases: every dtype x precision x arch x rank, on shapes that cover several K tiles and row groups.
GOLDEN_SHAPES = {2: (64, 192), 3: (3, 128, 64)}
GOLDEN_ARCHS = (75, 80, 86, 89, 90)
# Shapes only sm90 2-D int8 takes (K a multiple of 32, not 64): a partial 64x64 transpose tile.
GOLDEN_EXTRA = [("int8", 90, (32, 96)), ("int8", 90, (96, 32)), ("int4", 80, (256, 320)), ("int8", 86, (2, 96, 128))]


def golden_cases() -> list[dict[str, object]]:
    cases: list[dict[str, object]] = []
    for dtype in DTYPES:
        for precision in ("int8", "int4"):
            for arch in GOLDEN_ARCHS:
                for shape in GOLDEN_SHAPES.values():
                    cases.append({"dtype": dtype, "precision": precision, "arch": arch, "shape": list(shape)})
    for precision, arch, shape in GOLDEN_EXTRA:
        cases.append({"dtype": "bfloat16", "precision": precision, "arch": arch, "shape": list(shape)})
    for i, case in enumerate(cases):
        case["seed"] = 1000 + i
    return cases
