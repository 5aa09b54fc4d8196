"""Time to the first output byte of a conversion, and which imports, in which thread, come before it.

"First output byte": the first write into a rank file (`rank*.safetensors*`, its temporary name
included) as the kernel reports it through inotify (IN_MODIFY in the output dir), timed from just before
the command is started: interpreter start-up, imports, reading config.json and the shard headers,
planning and preparing the output dir all count. inotify wakes the benchmark at the write itself: no
polling, no CPU taken from the measured process on a small host. "created" is when the first rank file
appeared (IN_CREATE), "whole command" when the command exited.

Each round runs every command once, alternating: `python convert_checkpoint.py ...` and the console
script `moe-convert convert ...`, for this checkout and for every `--baseline` checkout (before/after in
one invocation), each into its own fresh, empty output dir, after one warm-up round (page cache, .pyc
files). Medians, min and max over `--repeat` rounds.

Then, per command, one run under `-X importtime` with an audit hook that records which thread imported
each module: the import time (the modules' own times) spent before the first byte in the main thread
and in the others, with the costliest packages of each; and `--memory_runs` runs polled every 5 ms for
the peak RssAnon of the process and its children summed (as bench_convert.py measures), and of the
process alone.

    python benchmarks/bench_startup.py --repeat 15                  # the tiny example (`moe-convert example`)
    python benchmarks/bench_startup.py --model_dir /work/bench-shared/checkpoints/mixtral-1L-<tag> \\
        --tp_size 8 --convert_args "--moe_ep_size 8" --repeat 7
    git worktree add /tmp/base main && python benchmarks/bench_startup.py --baseline /tmp/base

Linux only (inotify through ctypes). Outputs go under --work_dir.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import select
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_MODIFY, IN_CREATE = 0x2, 0x100
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then `len` bytes of name
NAN = float("nan")
# Runs a script after installing an audit hook that notes (monotonic time, thread, module) of every module
# imported; written out at exit to $BENCH_IMPORT_LOG. time.monotonic is one clock for all processes.
_IMPORT_LOG_BOOT = """
import atexit, os, runpy, sys, threading, time
_seen = []
def _hook(event, args):
    if event == "import":
        _seen.append((time.monotonic(), threading.current_thread().name, args[0]))
sys.addaudithook(_hook)
def _dump():
    with open(os.environ["BENCH_IMPORT_LOG"], "w") as f:
        f.writelines(f"{t}\\t{th}\\t{m}\\n" for t, th, m in _seen)
atexit.register(_dump)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as for `python script`, not the cwd of -c
runpy.run_path(sys.argv[0], run_name="__main__")
"""
_IMPORT_TIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| *(\S+)")


@dataclass
class Run:
    start: float  # time.monotonic() just before the command started
    created: float = NAN  # seconds from start
    first_byte: float = NAN
    total: float = NAN
    stderr: str = ""
    peak_anon_kb: int = 0  # the process and its children, summed
    peak_own_anon_kb: int = 0  # the process alone


class DirWatch:
    """inotify on one directory, for files whose names start with `prefix`."""

    def __init__(self, directory: Path, prefix: str = "rank") -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), IN_MODIFY | IN_CREATE) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.prefix = prefix.encode()

    def masks(self, timeout: float) -> list[int]:
        """The event masks that arrive within `timeout` seconds (none: an empty list)."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data, out, pos = os.read(self.fd, 65536), [], 0
        while pos < len(data):
            _, mask, _, n = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size : pos + _EVENT.size + n]
            pos += _EVENT.size + n
            if name.startswith(self.prefix):
                out.append(mask)
        return out

    def close(self) -> None:
        os.close(self.fd)


def _rss_anon_kb(pid: int) -> tuple[int, int]:
    """RssAnon of a process, and of it and its descendants summed."""
    own = total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            own = total = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(_rss_anon_kb(int(child))[1] for child in f.read().split())
    except (OSError, ValueError):
        pass
    return own, total


def run_once(argv: list[str], out: Path, env: dict[str, str], *, poll_memory: bool = False) -> Run:
    """One conversion into a fresh, empty `out`, watched by inotify."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    watch = DirWatch(out)
    run = Run(time.monotonic())
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    chunks: list[bytes] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        chunks.extend(iter(lambda: proc.stderr.read(65536), b""))  # type: ignore[union-attr]

    def poll_anon() -> None:
        while proc.poll() is None:
            own, total = _rss_anon_kb(proc.pid)
            run.peak_own_anon_kb = max(run.peak_own_anon_kb, own)
            run.peak_anon_kb = max(run.peak_anon_kb, total)
            time.sleep(0.005)

    helpers = [threading.Thread(target=read_stderr, daemon=True)]
    if poll_memory:
        helpers.append(threading.Thread(target=poll_anon, daemon=True))
    for t in helpers:
        t.start()
    try:
        while run.first_byte != run.first_byte and proc.poll() is None:
            for mask in watch.masks(0.05):
                now = time.monotonic() - run.start
                if mask & IN_CREATE and run.created != run.created:
                    run.created = now
                if mask & IN_MODIFY and run.first_byte != run.first_byte:
                    run.first_byte = now
        proc.wait()
        run.total = time.monotonic() - run.start
        if run.first_byte != run.first_byte and any(m & IN_MODIFY for m in watch.masks(0)):
            run.first_byte = run.total  # it exited between two wake-ups
    finally:
        watch.close()
    for t in helpers:
        t.join()
    run.stderr = b"".join(chunks).decode(errors="replace")
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{run.stderr[-3000:]}")
    if run.first_byte != run.first_byte:
        sys.exit(f"{' '.join(argv)}: no write into a rank file was seen in {out}")
    return run


def import_breakdown(run: Run, log: Path, top: int) -> dict[str, dict[str, object]]:
    """Per thread group and side of the first byte: the modules' own import time, and the costliest packages."""
    own_us: dict[str, int] = {}
    for line in run.stderr.splitlines():
        if m := _IMPORT_TIME.match(line):
            own_us[m.group(3)] = int(m.group(1))
    first_byte = run.start + run.first_byte
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    packages: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in log.read_text().splitlines():
        at, thread, module = line.split("\t")
        group = "main thread" if thread == "MainThread" else "other threads"
        key = (group, "before" if float(at) < first_byte else "after")
        s = own_us.get(module, 0) / 1e6
        seconds[key] += s
        packages[key][module.split(".")[0]] += s
    result: dict[str, dict[str, object]] = {}
    for key in sorted(seconds):
        ranked = sorted(packages[key].items(), key=lambda kv: -kv[1])[:top]
        result[f"{key[0]}, {key[1]} the first byte"] = {"seconds": seconds[key], "packages": ranked}
    return result


def profile_top(argv: list[str], env: dict[str, str], out: Path, top: int) -> str:
    """moe_convert's functions with the most cumulative time in one run, from cProfile (imports inside
    them included)."""
    shutil.rmtree(out, ignore_errors=True)
    stats = out.with_name(out.name + ".pstats")
    subprocess.run([argv[0], "-m", "cProfile", "-o", str(stats), *argv[1:]], env=env, check=True)
    code = f"import pstats; pstats.Stats({str(stats)!r}).sort_stats('cumulative').print_stats('moe_convert', {top})"
    text = subprocess.run([argv[0], "-c", code], capture_output=True, text=True, check=True).stdout
    stats.unlink()
    return text[text.find("ncalls") :]


def _label(repo: Path) -> str:
    """The checkout's commit (+dirty), or its directory's name where it is no git checkout of its own."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo)
    if head.returncode or not (repo / ".git").exists():
        return repo.name
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, cwd=repo)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _stats(values: list[float]) -> str:
    median = statistics.median(values)
    return f"median {median:6.3f} s   min {min(values):6.3f}   max {max(values):6.3f}   (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", type=Path, help="default: the tiny example, built under --work_dir")
    ap.add_argument("--work_dir", type=Path, default=Path("bench-work/first-byte"))
    ap.add_argument("--tp_size", default="2")
    ap.add_argument("--convert_args", default="", help="more arguments for every command, e.g. '--moe_ep_size 8'")
    ap.add_argument("--python", default=sys.executable, help="the interpreter (its bin/ holds moe-convert)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--commands", default="convert_checkpoint,moe-convert", help="which of the two to time")
    ap.add_argument("--baseline", type=Path, action="append", default=[], help="another checkout to compare")
    ap.add_argument("--no_profile", action="store_true", help="skip the import-breakdown and memory runs")
    ap.add_argument("--profile", action="store_true", help="also a cProfile run: moe_convert's costliest functions")
    ap.add_argument("--memory_runs", type=int, default=3, help="runs polled for peak memory, per command")
    ap.add_argument("--json_out", type=Path)
    args = ap.parse_args()

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model_dir
    if model is None:
        model = work / "tiny-mixtral"
        if not (model / "config.json").exists():
            subprocess.run([args.python, "-m", "moe_convert", "example", str(model)], check=True, cwd=REPO_ROOT)
    model = model.resolve()
    common = ["--model_dir", str(model), "--tp_size", args.tp_size, "--force", "--quiet", *args.convert_args.split()]
    console_script = str(Path(args.python).with_name("moe-convert"))
    # name -> (program, its arguments but --output_dir, environment)
    commands: dict[str, tuple[str, list[str], dict[str, str]]] = {}
    for repo in [REPO_ROOT, *(b.resolve() for b in args.baseline)]:
        env = {**os.environ, "PYTHONPATH": str(repo)}  # this checkout's package, ahead of the installed one
        programs = {
            "convert_checkpoint": (str(repo / "convert_checkpoint.py"), common),
            "moe-convert": (console_script, ["convert", *common]),
        }
        for kind in args.commands.split(","):
            program, arguments = programs[kind]
            commands[f"{kind}@{_label(repo)}"] = (program, arguments, env)
    outs = {name: work / f"out{k}" for k, name in enumerate(commands)}

    def argv(name: str, *python_options: str) -> list[str]:
        program, arguments, _ = commands[name]
        return [args.python, *python_options, program, *arguments, "--output_dir", str(outs[name])]

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"model {model}, --tp_size {args.tp_size} {args.convert_args}; load {load}")
    for name in commands:  # warm-up
        run_once(argv(name), outs[name], commands[name][2])
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name in commands:
            runs[name].append(run_once(argv(name), outs[name], commands[name][2]))
    result: dict[str, object] = {"model": str(model), "tp_size": args.tp_size, "convert_args": args.convert_args}
    for name, rs in runs.items():
        print(f"\n{name}, {args.repeat} runs:")
        for what, key in (
            ("rank file created", "created"),
            ("first output byte", "first_byte"),
            ("whole command", "total"),
        ):
            print(f"  {what:18s} {_stats([getattr(r, key) for r in rs])}")
        result[name] = {k: [getattr(r, k) for r in rs] for k in ("created", "first_byte", "total")}
    if not args.no_profile:
        log = work / "imports.tsv"
        for name in commands:
            env = {**commands[name][2], "BENCH_IMPORT_LOG": str(log)}
            timed = run_once(argv(name, "-X", "importtime", "-c", _IMPORT_LOG_BOOT), outs[name], env)
            breakdown = import_breakdown(timed, log, args.top)
            polled = [
                run_once(argv(name), outs[name], commands[name][2], poll_memory=True) for _ in range(args.memory_runs)
            ]
            peaks = [r.peak_anon_kb / 1024 for r in polled]
            own = [r.peak_own_anon_kb / 1024 for r in polled]
            print(f"\n{name} under -X importtime: first byte at {timed.first_byte:.3f} s; imports (own times):")
            for what, row in breakdown.items():
                shown = ", ".join(f"{p} {s:.3f}" for p, s in row["packages"])  # type: ignore[attr-defined]
                print(f"  {what}: {row['seconds']:.3f} s ({shown})")
            print(
                f"  peak RssAnon (5 ms polls): process and children {statistics.median(peaks):.0f} MiB "
                f"({' '.join(f'{p:.0f}' for p in peaks)}), the process alone {statistics.median(own):.0f} MiB"
            )
            result[f"{name} imports"] = breakdown
            result[f"{name} peak_anon_mib"] = {"tree": peaks, "process": own}
            if args.profile:
                functions = profile_top(argv(name), commands[name][2], outs[name], args.top)
                print(f"  cProfile, moe_convert's functions by cumulative time:\n{functions}")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
