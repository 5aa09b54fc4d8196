"""How the weight-only quantizer scales with workers: N threads against N processes.

Each worker quantizes its own full-width Mixtral-8x7B expert weight (`[14336, 4096]` bf16, int8, the
interleaved layout every MoE weight uses) three times, in 4 MB blocks into a reused buffer as the
executor's quantize pool does, one torch thread per op; all workers start together. Prints GB/s of bf16
input in all and per worker. Threads share the GIL (between a step's torch ops a thread holds it);
processes do not, so the gap between the two lines is what the GIL costs.

    python benchmarks/bench_quantize_scaling.py 1,2,4,8,16
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time
from typing import Any

import torch

from moe_convert.weight_only import QuantizedTensor, WeightOnly

ROWS, K, BLOCK_ROWS, REPEATS = 14336, 4096, 512, 3
NBYTES = ROWS * K * 2 * REPEATS


def prepare() -> tuple[torch.Tensor, QuantizedTensor, torch.Tensor]:
    torch.set_num_threads(1)
    rows = (torch.randn(ROWS, K, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    qt = WeightOnly("int8", 80).tensor("bench.mlp.fc.weight", (1, ROWS, K), "BF16")
    out = torch.empty(BLOCK_ROWS * qt.row_bytes, dtype=torch.uint8)
    qt.quantize_rows(rows[:BLOCK_ROWS], out=out)  # warm up: scratch buffers, gather index
    return rows, qt, out


def timed(state: tuple[torch.Tensor, QuantizedTensor, torch.Tensor], barrier: Any) -> float:
    rows, qt, out = state
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        for r0 in range(0, ROWS, BLOCK_ROWS):
            qt.quantize_rows(rows[r0 : r0 + BLOCK_ROWS], out=out)
    return time.perf_counter() - t0


def process_worker(barrier: Any, results: Any) -> None:
    results.put(timed(prepare(), barrier))


def main() -> None:
    counts = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,2").split(",")]
    for n in counts:
        report(n, "threads", threads_slowest(n))
        ctx = mp.get_context("spawn")
        pbarrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=process_worker, args=(pbarrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        times = [results.get() for _ in procs]
        for p in procs:
            p.join()
        report(n, "processes", max(times))


def threads_slowest(n: int) -> float:
    states = [prepare() for _ in range(n)]
    barrier = threading.Barrier(n)
    seconds = [0.0] * n

    def run(i: int) -> None:
        seconds[i] = timed(states[i], barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(seconds)


def report(n: int, kind: str, slowest: float) -> None:
    print(f"{n:2d} {kind:9s}: {n * NBYTES / slowest / 1e9:6.2f} GB/s in all ({NBYTES / slowest / 1e9:.2f} per worker)")


if __name__ == "__main__":
    main()
