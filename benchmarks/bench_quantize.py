"""Throughput of the weight-only quantizer (moe_convert.weight_only, numpy) on full-width Mixtral-8x7B expert
weights.

Times `QuantizedTensor.quantize_bits` on one expert's fc `[2*14336, 4096]` and proj `[4096, 14336]` in
bfloat16, fed in blocks of `--block_mb` MB of rows as a quantize worker gets them (each block's bytes into
one reused buffer), for int8 and int4, for the interleaved layout (sm75-89, and every MoE weight on sm90)
and the sm90 2-D column-major layout, in one thread (a worker process is one). Reports input GB/s (bf16
bytes read per second) by wall clock and per CPU-second of this process (what other work on a shared
machine cannot inflate), median and spread of `--repeats` runs. No disk I/O.

    python benchmarks/bench_quantize.py [--repeats 5] [--block_mb 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from moe_convert.casts import cast_function
from moe_convert.weight_only import WeightOnly

SHAPES = {"fc [28672, 4096]": (28672, 4096), "proj [4096, 14336]": (4096, 14336)}


def bf16_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """`[n, k]` weights ~ N(0, 0.02) as raw bfloat16 bits (int16)."""
    w = (np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) * 0.02).view(np.int32)
    rows = np.empty((n, k), dtype=np.int16)
    cast_function("F32", "BF16")(rows, w)
    return rows


def run_once(rows: np.ndarray, precision: str, arch: int, ndim: int, block_rows: int) -> tuple[float, float]:
    """Wall and process CPU seconds to quantize `rows` (raw bf16 bits) block by block."""
    n, k = rows.shape
    shape = (1, n, k) if ndim == 3 else (n, k)
    # sm90 needs a stated 2-D layout (docs/weight-only.md); column_major is the one without a gather.
    qt = WeightOnly(precision, arch, "column_major" if arch == 90 else None).tensor("bench.weight", shape, "BF16")
    block_rows = max(qt.group, block_rows // qt.group * qt.group)
    out = np.empty(block_rows * qt.row_bytes, dtype=np.uint8)  # reused, as a worker's slot is
    wall, cpu = time.perf_counter(), time.process_time()
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        qt.quantize_bits(rows[r0:r1], out[: (r1 - r0) * qt.row_bytes])
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block_mb", type=float, default=4.0)
    args = parser.parse_args()
    print(
        f"numpy {np.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        "GB/s of bf16 input, median (min-max)"
    )
    for label, (n, k) in SHAPES.items():
        rows = bf16_rows(n, k)
        block_rows = int(args.block_mb * 2**20 // (2 * k))
        for precision in ("int8", "int4"):
            for arch, ndim, layout in ((80, 3, "interleaved"), (90, 2, "sm90 2-D")):
                runs = [run_once(rows, precision, arch, ndim, block_rows) for _ in range(args.repeats)]
                wall = sorted(rows.size * 2 / w / 1e9 for w, _ in runs)
                cpu = sorted(rows.size * 2 / c / 1e9 for _, c in runs)
                print(
                    f"{label:19s} {precision} {layout:12s}: "
                    f"wall {statistics.median(wall):.2f} GB/s ({wall[0]:.2f}-{wall[-1]:.2f}), "
                    f"per CPU-second {statistics.median(cpu):.2f} ({cpu[0]:.2f}-{cpu[-1]:.2f})"
                )


if __name__ == "__main__":
    main()
