"""Throughput of the weight-only quantizer (moe_convert.weight_only) on full-width Mixtral-8x7B expert weights.

Times `QuantizedTensor.quantize_rows` on one expert's fc `[2*14336, 4096]` and proj `[4096, 14336]` in
bfloat16, fed in blocks of `--block_mb` MB of rows as the executor would, for int8 and int4, for the
interleaved layout (sm75-89, and every MoE weight on sm90) and the sm90 2-D column-major layout, with one
torch thread and with torch's default. Reports input GB/s (bf16 bytes read per second), median and spread
of `--repeats` runs, and a per-step profile of one block. No disk I/O.

    python benchmarks/bench_quantize.py [--repeats 5] [--block_mb 4] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_convert.weight_only import WeightOnly

SHAPES = {"fc [28672, 4096]": (28672, 4096), "proj [4096, 14336]": (4096, 14336)}


def run_once(rows: torch.Tensor, precision: str, arch: int, ndim: int, block_rows: int) -> float:
    n, k = rows.shape
    shape = (1, n, k) if ndim == 3 else (n, k)
    qt = WeightOnly(precision, arch).tensor("bench.weight", shape, "BF16")
    out = torch.empty(qt.weight_nbytes, dtype=torch.uint8)
    block_rows = max(qt.group, block_rows // qt.group * qt.group)
    start = time.perf_counter()
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        qt.quantize_rows(rows[r0:r1], out=out[r0 * qt.row_bytes : r1 * qt.row_bytes])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block_mb", type=float, default=4.0)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}; GB/s of bf16 input, median (min-max)")
    for label, (n, k) in SHAPES.items():
        rows = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        block_rows = int(args.block_mb * 2**20 // (2 * k))
        for threads in dict.fromkeys(args.threads):
            torch.set_num_threads(threads)
            for precision in ("int8", "int4"):
                for arch, ndim, layout in ((80, 3, "interleaved"), (90, 2, "sm90 2-D")):
                    times = [run_once(rows, precision, arch, ndim, block_rows) for _ in range(args.repeats)]
                    rates = sorted(rows.numel() * 2 / t / 1e9 for t in times)
                    print(
                        f"{label:20s} {precision} {layout:12s} threads={threads}: "
                        f"{statistics.median(rates):.2f} GB/s ({rates[0]:.2f}-{rates[-1]:.2f})"
                    )


if __name__ == "__main__":
    main()
