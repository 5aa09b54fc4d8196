"""What computing the rank files' sha256 costs a conversion: the same conversion with hashing on and off.

Hashing is on in every real run (the manifest and --resume need it); "off" swaps the writer's sha256
for a hash that does nothing, so the write threads only write. Each run is a fresh process,
the two modes alternate round-robin after an untimed warm-up of each (warm page cache, as in
bench_convert.py), and the output dir is deleted and the disk synced (untimed) before every run. Only
convert() is timed (imports excluded). The machine's other load shows as spread: compare medians.

    python benchmarks/bench_checksum.py --model_dir bench-work/checkpoints/mixtral-1L-... --tp_size 4 \\
        --moe_tp_size 2 --moe_ep_size 2 --rounds 3

Without --model_dir it builds a moderate synthetic Mixtral (hidden 1024, intermediate 3584, vocab 32000,
2 layers, bf16, about 0.5 GB) under --work_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODERATE = {
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "vocab_size": 32000,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "dtype": "bfloat16",
    "max_shard_size": "200MB",
}


def child(args: argparse.Namespace) -> None:
    """One conversion in this process; prints its seconds as JSON."""
    from transformers import AutoConfig, MixtralConfig  # noqa: F401  (imported before timing: seconds, not work)

    from moe_convert import convert, writer

    class NoHash:
        def update(self, data: object) -> None:
            pass

        def hexdigest(self) -> str:
            return "0" * 64

    if args._child == "off":
        writer._sha256 = NoHash  # type: ignore[assignment]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    convert(
        args.model_dir,
        args.output_dir,
        tp_size=args.tp_size,
        moe_tp_size=args.moe_tp_size,
        moe_ep_size=args.moe_ep_size,
        workers=args.workers,
    )
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def run_once(args: argparse.Namespace, mode: str, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the last run's dirty pages are not this run's work
    time.sleep(1)
    cmd = [sys.executable, __file__, "--_child", mode, "--model_dir", str(args.model_dir), "--output_dir", str(out)]
    cmd += ["--tp_size", str(args.tp_size)] + (["--workers", str(args.workers)] if args.workers else [])
    if args.moe_tp_size:
        cmd += ["--moe_tp_size", str(args.moe_tp_size)]
    if args.moe_ep_size:
        cmd += ["--moe_ep_size", str(args.moe_ep_size)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=None)
    parser.add_argument("--output_dir", type=Path, default=None)
    parser.add_argument("--work_dir", type=Path, default=Path("bench-work/checksum"))
    parser.add_argument("--tp_size", type=int, default=4)
    parser.add_argument("--moe_tp_size", type=int, default=None)
    parser.add_argument("--moe_ep_size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="write threads (default: as convert)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--_child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args)
        return
    if args.model_dir is None:
        args.model_dir = args.work_dir / "moderate"
        if not (args.model_dir / "config.json").exists():
            from moe_convert.example import build_example_checkpoint

            build_example_checkpoint(args.model_dir, **MODERATE)  # type: ignore[arg-type]
    out = args.work_dir / "out"
    for mode in ("on", "off"):
        run_once(args, mode, out)  # warm-up: page cache, imports
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in ("on", "off"):
            runs[mode].append(run_once(args, mode, out))
    size = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    print(f"source {args.model_dir} ({size / 1e9:.2f} GB), tp{args.tp_size}, {args.rounds} rounds")
    med = {}
    for mode in ("on", "off"):
        wall = [r["seconds"] for r in runs[mode]]
        cpu = [r["cpu"] for r in runs[mode]]
        med[mode] = (statistics.median(wall), statistics.median(cpu))
        print(
            f"hashing {mode:3}: wall median {med[mode][0]:.2f} s {[round(t, 2) for t in wall]}, "
            f"cpu median {med[mode][1]:.2f} s"
        )
    (on, cpu_on), (off, cpu_off) = med["on"], med["off"]
    print(f"sha256 overhead: {100 * (on - off) / off:+.1f}% wall, {100 * (cpu_on - cpu_off) / cpu_off:+.1f}% cpu")


if __name__ == "__main__":
    main()
