"""Throughput of the weight-only quantizer (moe_convert.weight_only) on full-width Mixtral-8x7B expert weights.

Times `QuantizedTensor.quantize_rows` on one expert's fc `[2*14336, 4096]` and proj `[4096, 14336]` in
bfloat16, fed in blocks of `--block_mb` MB of rows as the executor's quantize pool does (each block's bytes
into one reused buffer), for int8 and int4, for the
interleaved layout (sm75-89, and every MoE weight on sm90) and the sm90 2-D column-major layout, with one
torch thread and with torch's default. Reports input GB/s (bf16 bytes read per second) by wall clock and
per CPU-second of this process (what other work on a shared machine cannot inflate), median and spread of
`--repeats` runs. No disk I/O.

    python benchmarks/bench_quantize.py [--repeats 5] [--block_mb 4] [--threads 1 2] [--profile]

--profile instead prints where the time goes: torch.profiler's self-CPU time per op over one fc expert.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moe_convert.weight_only import WeightOnly

SHAPES = {"fc [28672, 4096]": (28672, 4096), "proj [4096, 14336]": (4096, 14336)}


def run_once(rows: torch.Tensor, precision: str, arch: int, ndim: int, block_rows: int) -> tuple[float, float]:
    """Wall and process CPU seconds to quantize `rows` block by block."""
    n, k = rows.shape
    shape = (1, n, k) if ndim == 3 else (n, k)
    # sm90 needs a stated 2-D layout (docs/weight-only.md); column_major is the one without a gather.
    qt = WeightOnly(precision, arch, "column_major" if arch == 90 else None).tensor("bench.weight", shape, "BF16")
    block_rows = max(qt.group, block_rows // qt.group * qt.group)
    out = torch.empty(block_rows * qt.row_bytes, dtype=torch.uint8)  # reused, as a quantize pool slot is
    wall, cpu = time.perf_counter(), time.process_time()
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        qt.quantize_rows(rows[r0:r1], out=out[: (r1 - r0) * qt.row_bytes])
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block_mb", type=float, default=4.0)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, torch.get_num_threads()])
    parser.add_argument("--profile", action="store_true", help="per-op self CPU time for one fc expert, one thread")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.profile:
        profile(gen, int(args.block_mb * 2**20 // (2 * 4096)))
        return
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        "GB/s of bf16 input, median (min-max)"
    )
    for label, (n, k) in SHAPES.items():
        rows = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        block_rows = int(args.block_mb * 2**20 // (2 * k))
        for threads in dict.fromkeys(args.threads):
            torch.set_num_threads(threads)
            for precision in ("int8", "int4"):
                for arch, ndim, layout in ((80, 3, "interleaved"), (90, 2, "sm90 2-D")):
                    runs = [run_once(rows, precision, arch, ndim, block_rows) for _ in range(args.repeats)]
                    wall = sorted(rows.numel() * 2 / w / 1e9 for w, _ in runs)
                    cpu = sorted(rows.numel() * 2 / c / 1e9 for _, c in runs)
                    print(
                        f"{label:19s} {precision} {layout:12s} threads={threads}: "
                        f"wall {statistics.median(wall):.2f} GB/s ({wall[0]:.2f}-{wall[-1]:.2f}), "
                        f"per CPU-second {statistics.median(cpu):.2f} ({cpu[0]:.2f}-{cpu[-1]:.2f})"
                    )


def profile(gen: torch.Generator, block_rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    rows = (torch.randn(28672, 4096, generator=gen) * 0.02).to(torch.bfloat16)
    for precision, arch, ndim in (("int8", 80, 3), ("int4", 80, 3), ("int8", 90, 2)):
        run_once(rows, precision, arch, ndim, block_rows)  # warm up: scratch buffers, gather indexes
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            wall, _ = run_once(rows, precision, arch, ndim, block_rows)
        print(
            f"--- fc [28672, 4096] {precision} sm{arch} {ndim}-D: {rows.numel() * 2 / wall / 1e9:.2f} GB/s (profiled)"
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
