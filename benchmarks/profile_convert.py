"""Profile conversions in one process: where each write thread's time goes, for variants of the executor's knobs.

Runs `convert()` in-process (imports are paid once and excluded) with MOE_CONVERT_PROFILE=1, so each run
prints the executor's per-thread timers (see moe_convert/profiling.py), for every mapping and variant,
alternating round-robin; the output dir is deleted and the disk synced (untimed) before each run.
A variant sets module constants of the executor, e.g. `d2b4:writer.DEPTH=2,writer._MAX_BUFFER=4194304`
(`workers=N` sets convert's `workers`, `direct=0` writes through the page cache, `nohash=1` swaps sha256
for a hash that does nothing, to see what hashing costs).

    python benchmarks/profile_convert.py --model_dir bench-work/checkpoints/mixtral-4L-... \\
        --mapping tp=8,moe_ep=8 --mapping tp=4,moe_tp=2,moe_ep=2 --variant base: \\
        --variant d2:writer.DEPTH=2 --rounds 2

Prints one line per run (seconds, GB/s of output) and a table of medians; `--deadline S` starts no new
run after S seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MOE_CONVERT_PROFILE", "1")


def parse_variant(text: str) -> tuple[str, dict[str, int]]:
    name, _, settings = text.partition(":")
    values = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        values[key.strip()] = int(value)
    return name, values


def apply(settings: dict[str, int]) -> dict[str, int]:
    """Set `module.NAME` constants of moe_convert; returns the previous values."""
    old = {}
    for key, value in settings.items():
        if key in ("workers", "direct", "nohash"):
            continue
        module, _, attr = key.rpartition(".")
        mod = importlib.import_module(f"moe_convert.{module}")
        old[key] = getattr(mod, attr)
        setattr(mod, attr, value)
    return old


class NoHash:
    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--work_dir", type=Path, default=Path("bench-work/profile"))
    ap.add_argument("--mapping", action="append", required=True, help="e.g. tp=8,moe_ep=8 (repeatable)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:module.CONST=INT,... (repeatable)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="start no run after this many seconds")
    ap.add_argument("--json_out", type=Path)
    args = ap.parse_args()

    started = time.perf_counter()
    from moe_convert import convert, plan, writer

    plan(args.model_dir)  # reads the config: the first conversion would pay transformers' lazy imports

    variants = [parse_variant(v) for v in args.variant] or [("base", {})]
    mappings = [dict((k, int(v)) for k, v in (kv.split("=") for kv in m.split(","))) for m in args.mapping]
    print(f"imports: {time.perf_counter() - started:.2f} s", file=sys.stderr, flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    out_bytes: dict[str, int] = {}
    for rnd in range(args.rounds):
        for m in mappings:
            label = ",".join(f"{k}={v}" for k, v in m.items())
            for name, settings in variants:
                if time.perf_counter() - started > args.deadline:
                    break
                out = args.work_dir / "out"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                old = apply(settings)
                real_sha256 = writer._sha256
                if settings.get("nohash"):  # diagnosis only: what hashing costs
                    writer._sha256 = NoHash  # type: ignore[assignment]
                try:
                    print(f"--- round {rnd + 1} {label} {name}", file=sys.stderr, flush=True)
                    t0 = time.perf_counter()
                    result = convert(
                        args.model_dir,
                        out,
                        tp_size=m.get("tp", 1),
                        moe_tp_size=m.get("moe_tp"),
                        moe_ep_size=m.get("moe_ep"),
                        workers=settings.get("workers", args.workers),
                        direct_io=bool(settings.get("direct", 1)),
                        force=True,
                        progress=False,
                    )
                    seconds = time.perf_counter() - t0
                finally:
                    apply(old)
                    writer._sha256 = real_sha256
                t1 = time.perf_counter()
                os.sync()
                sync_s = time.perf_counter() - t1
                out_bytes[label] = result.bytes_written
                results.setdefault((label, name), []).append(seconds)
                digest = hashlib.sha256("".join(r.sha256 for r in result.ranks).encode()).hexdigest()[:12]
                print(
                    f"run: round {rnd + 1} {label} {name}: {seconds:.2f} s (+ sync {sync_s:.2f} s), "
                    f"{result.bytes_written / seconds / 1e9:.2f} GB/s, rank files' sha256 {digest}",
                    file=sys.stderr,
                    flush=True,
                )
    shutil.rmtree(args.work_dir / "out", ignore_errors=True)
    print("\n| mapping | variant | runs | median s | GB/s | all |\n|---|---|--:|--:|--:|---|")
    for (label, name), secs in results.items():
        med = statistics.median(secs)
        runs = " ".join(f"{s:.2f}" for s in secs)
        print(f"| {label} | {name} | {len(secs)} | {med:.2f} | {out_bytes[label] / med / 1e9:.2f} | {runs} |")
    if args.json_out:
        rows = [{"mapping": k[0], "variant": k[1], "seconds": v} for k, v in results.items()]
        args.json_out.write_text(json.dumps({"bytes": out_bytes, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
