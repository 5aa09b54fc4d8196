"""How the weight-only quantizer scales with workers: N threads against N processes.

Each worker quantizes its own full-width Mixtral-8x7B expert weight (`[14336, 4096]` bf16, int8, the
interleaved layout every MoE weight uses) three times, in 4 MB blocks into a reused buffer as the
executor's quantize workers do (`bench_quantize.run_once`); all workers start together. Prints GB/s of
bf16 input in all and per worker. Threads share the GIL (between a step's numpy calls a thread holds it);
processes do not, so the gap between the two lines is what the GIL costs (why the quantize pool forks
worker processes).

    python benchmarks/bench_quantize_scaling.py 1,2,4,8,16
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
from typing import Any

import numpy as np
from bench_quantize import bf16_rows, run_once  # this folder is on sys.path when a script here runs

ROWS, K, BLOCK_ROWS, REPEATS = 14336, 4096, 512, 3
NBYTES = ROWS * K * 2 * REPEATS


def prepare() -> np.ndarray:
    rows = bf16_rows(ROWS, K)
    run_once(rows[:BLOCK_ROWS], "int8", 80, 3, BLOCK_ROWS)  # warm up: scratch buffers, gather index
    return rows


def timed(rows: np.ndarray, barrier: Any) -> float:
    barrier.wait()
    return sum(run_once(rows, "int8", 80, 3, BLOCK_ROWS)[0] for _ in range(REPEATS))


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
