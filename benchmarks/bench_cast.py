"""Throughput of the executor's casts (moe_convert/casts.py, numpy) against torch's `copy_` with one thread.

Casts a source tensor of `--mb` MB (a [rows, 14336] matrix of normal random values, as a Mixtral w1/w3
is) block by block, 4 MB of output at a time as the lanes do, once whole rows and once a tp8 column slice
(1792 columns), on one thread, alternating numpy and torch `--repeat` times; prints the median GB/s of
output and the spread, and checks both give the same bytes.

    python benchmarks/bench_cast.py --mb 256 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from moe_convert.casts import cast_function
from moe_convert.execute import CAST_BLOCK_BYTES

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEM = {"F32": 4, "F16": 2, "BF16": 2}
RAW = {2: np.int16, 4: np.int32}
RAW_TORCH = {2: torch.int16, 4: torch.int32}
COLS = 14336


def source(code: str, mb: int) -> np.ndarray:
    rows = (mb << 20) // (COLS * ITEM[code])
    values = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, COLS), dtype=np.float32))
    return values.to(TORCH[code]).view(RAW_TORCH[ITEM[code]]).numpy()


def run(cast: object, view: np.ndarray, out: np.ndarray) -> float:
    """Seconds to cast all of `view` in blocks of CAST_BLOCK_BYTES of output."""
    rows = max(1, out.size // view.shape[1])
    started = time.perf_counter()
    for r in range(0, view.shape[0], rows):
        part = view[r : r + rows]
        cast(out[: part.size].reshape(part.shape), part)  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="source tensor size in MB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pairs", default="F32:F16,BF16:F16,F32:BF16,F16:BF16,F16:F32,BF16:F32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'cast':<12} {'layout':<10} {'numpy GB/s':>16} {'torch GB/s':>16} {'numpy/torch':>11}")
    for pair in args.pairs.split(","):
        src, dst = pair.split(":")
        raw = source(src, args.mb)
        out = np.empty(CAST_BLOCK_BYTES // ITEM[dst], RAW[ITEM[dst]])

        def with_torch(o: np.ndarray, p: np.ndarray, src: str = src, dst: str = dst) -> None:
            torch.from_numpy(o).view(TORCH[dst]).copy_(torch.from_numpy(p).view(TORCH[src]))

        for layout, view in (("rows", raw), ("cols/8", raw[:, : COLS // 8])):
            out_bytes = view.size * ITEM[dst]
            speeds: dict[str, list[float]] = {"numpy": [], "torch": []}
            for _ in range(args.repeat):
                for name, cast in (("numpy", cast_function(src, dst)), ("torch", with_torch)):
                    speeds[name].append(out_bytes / run(cast, view, out) / 1e9)
            a, b = np.empty_like(out), np.empty_like(out)
            part = view[: max(1, out.size // view.shape[1])]
            cast_function(src, dst)(a[: part.size].reshape(part.shape), part)
            with_torch(b[: part.size].reshape(part.shape), part)
            assert np.array_equal(a[: part.size], b[: part.size]), pair
            shown = {k: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in speeds.items()}
            ratio = statistics.median(speeds["numpy"]) / statistics.median(speeds["torch"])
            print(f"{src}->{dst:<6} {layout:<10} {shown['numpy']:>16} {shown['torch']:>16} {ratio:>11.2f}")


if __name__ == "__main__":
    main()
