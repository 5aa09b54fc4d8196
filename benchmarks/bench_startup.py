"""Start-up cost of a conversion: time to the first output byte, and what the time before it is spent on.

Runs `python convert_checkpoint.py --model_dir M --output_dir O --tp_size 2 --force --quiet` (fresh
processes, `--repeat` times) and polls the output dir every 2 ms: `created` is when the first rank file
exists (imports, config, headers and planning are done), `first byte` when one has data on disk (the
first staging buffer was written, or for a tiny model the first file finished), `total` the whole
command. Then one run under `python -X importtime` gives the import breakdown (the top-level modules that
cost most, cumulative) and one under cProfile the functions that took the most time.

    python benchmarks/bench_startup.py                     # the tiny example, built under --work_dir
    python benchmarks/bench_startup.py --model_dir bench-work/checkpoints/mixtral-1L-... --tp_size 8
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def timed_run(argv: list[str], out: Path) -> tuple[float, float, float]:
    """(created, first byte, total) seconds of one conversion; NaN where it never happened."""
    shutil.rmtree(out, ignore_errors=True)
    nan = float("nan")
    created = first_byte = nan
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if out.is_dir():
            try:
                sizes = [e.stat().st_size for e in os.scandir(out) if e.name.startswith("rank")]
            except FileNotFoundError:  # a file renamed between listing and stat
                sizes = []
            now = time.perf_counter() - t0
            if sizes and created != created:
                created = now
            if any(sizes) and first_byte != first_byte:
                first_byte = now
                break
        time.sleep(0.002)
    _, err = proc.communicate()
    total = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"conversion failed ({proc.returncode}): {err.decode()[-2000:]}")
    if first_byte != first_byte:  # finished between two polls: the files exist now
        first_byte = created = total
    return created, first_byte, total


def import_breakdown(argv: list[str], out: Path, top: int) -> list[tuple[float, str]]:
    """The costliest packages of one run (cumulative seconds, wherever in the import tree they were first
    imported, so a package imported by another counts in both), from `python -X importtime`."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [argv[0], "-X", "importtime", *argv[1:]]
    err = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, check=True).stderr.decode()
    total, rows = 0.0, []
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if not m:
            continue
        seconds, depth, name = int(m.group(1)) / 1e6, len(m.group(2)) // 2, m.group(3)
        total += seconds if depth == 0 else 0.0
        if "." not in name or name.startswith("moe_convert."):
            rows.append((seconds, f"{name} (depth {depth})"))
    rows.sort(reverse=True)
    return [(total, "all imports"), *rows[:top]]


def profile_top(argv: list[str], out: Path, top: int) -> str:
    """The functions of one run with the most cumulative time, from cProfile."""
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name(out.name + ".pstats")
    subprocess.run([argv[0], "-m", "cProfile", "-o", str(stats), *argv[1:]], cwd=REPO_ROOT, check=True)
    code = f"import pstats; pstats.Stats({str(stats)!r}).sort_stats('cumulative').print_stats('moe_convert', {top})"
    text = subprocess.run([argv[0], "-c", code], capture_output=True, check=True).stdout.decode()
    return text[text.find("ncalls") :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", type=Path, help="default: the tiny example, built under --work_dir")
    ap.add_argument("--work_dir", type=Path, default=Path("bench-work/startup"))
    ap.add_argument("--tp_size", default="2")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no_profile", action="store_true", help="skip the -X importtime and cProfile runs")
    args = ap.parse_args()

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model_dir
    if model is None:
        model = work / "tiny-mixtral"
        if not (model / "config.json").exists():
            subprocess.run([args.python, "-m", "moe_convert", "example", str(model)], cwd=REPO_ROOT, check=True)
    out = work / "out"
    argv = [args.python, "convert_checkpoint.py", "--model_dir", str(model), "--output_dir", str(out)]
    argv += ["--tp_size", args.tp_size, "--force", "--quiet"]
    timed_run(argv, out)  # warm-up: page cache, .pyc files
    runs = [timed_run(argv, out) for _ in range(args.repeat)]
    print(f"model {model}, tp {args.tp_size}, {args.repeat} runs after a warm-up (median, then all):")
    for k, what in enumerate(("output file created", "first output byte", "whole command")):
        values = [r[k] for r in runs]
        print(f"  {what:20s} {statistics.median(values):6.2f} s   ({' '.join(f'{v:.2f}' for v in values)})")
    if args.no_profile:
        shutil.rmtree(out, ignore_errors=True)
        return
    print("\nimports (cumulative seconds of each package, where it was first imported):")
    for seconds, name in import_breakdown(argv, out, args.top):
        print(f"  {seconds:6.2f}  {name}")
    print("\ncProfile, moe_convert's functions by cumulative time (imports inside them included):")
    print(profile_top(argv, out, args.top))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
