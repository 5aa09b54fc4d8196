"""Benchmark checkpoint conversion against `cp -r`, `dd oflag=direct` and a naive load-everything converter.

Builds full-width synthetic Mixtral checkpoints (the shapes of a real config.json, by default
configs/mixtral-8x7b-v0.1.config.json, but only 1 and 2 decoder layers, bf16 random values, shards of at
most 4.9 GB plus `model.safetensors.index.json`, HF tensor names), caches them under the work dir, then
times, alternating round-robin in one invocation:

* `cp -r SRC OUT` -- the baseline: the same bytes copied through the page cache,
* our converter (`python convert_checkpoint.py --model_dir SRC --output_dir OUT --force --quiet ...`),
* the naive baseline (`python benchmarks/naive_convert.py --model_dir SRC --output_dir OUT ...`),

for the mappings tp4/moe_tp2/moe_ep2, tp8/moe_ep8 and tp8 (default MoE split), and with `--precisions
none,int8,int4` also our weight-only INT8 / INT4 conversions of each mapping (`--weight_only_arch`, default
80: the interleaved layout every MoE weight uses; 90 adds `--weight_only_sm90_layout`), reported against
the unquantized conversion of the same mapping (`t / t_unquantized`). Every command writes
to its own output dir, deleted (untimed) before each run. A run's time is the command plus a `sync`
right after it (our converter fsyncs its files, cp and the naive one leave dirty pages; `--no_sync`
times the command alone); a `sync` before each run starts it clean. Peak memory is the largest
PSS of anonymous and shared memory (Pss_Anon + Pss_Shmem) summed over the command's process tree, so
pages the quantize workers share with the converter count once, and the write threads' staging buffers
(shared anonymous mappings) count at all (before 2026-12-01: RssAnon, which missed them), polled from
/proc every ~20 ms, as is the time to
the first output byte (a file in the output dir with data on disk). The page cache cannot be dropped
here, so each command runs `--warmup` times (default 1, untimed) before the timed rounds: the numbers
are warm-cache numbers (the sources fit in RAM).

The disk's own write speed is measured before and after the runs with `dd if=/dev/zero oflag=direct`
(+ `sync`) into the work dir: one stream with 16 MB blocks, and as many streams as the widest mapping
writes rank files; our GB/s (bytes out over the median time) is reported against the faster of the two.

Run from the repository root:

    python benchmarks/bench_convert.py --repeat 3 --json_out bench-work/results.json
    python benchmarks/bench_convert.py --host big    # 16+ cores: 4 layers, tp8/moe_ep8 and
                                                     # tp4/moe_tp2/moe_ep2, no naive, 3 timed rounds

Options: --layers 1,2  --mappings tp4_moetp2_moeep2,tp8_moeep8,tp8  --repeat N  --warmup N
--work_dir DIR  --keep  --converter CMD  --convert_args "--workers 2"  --naive CMD  --naive_args ARGS
--skip_naive  --json_out FILE  --config FILE  --max_shard_gb 4.9  --no_sync  --seed N  --generate_only
--dd_gb 4 (0: no dd)  --host small|big  --compare LABEL=CMD (another converter, e.g. an older checkout,
alternating with ours: A/B in one invocation)  --precisions none,int8,int4  --weight_only_arch 80
--weight_only_sm90_layout column_major|permuted.

Weight-only on the full-width layers (the issue 14 measurement):

    python benchmarks/bench_convert.py --layers 1 --mappings tp4_moetp2_moeep2,tp8_moeep8 \
        --precisions none,int8,int4 --skip_naive --repeat 3 --work_dir /work/bench-shared

Quick plumbing check with a tiny config (e.g. hidden 256, intermediate 512, vocab 1000, 8 experts,
8 heads, 8 kv heads) instead of generating 6 GB; `--converter` swaps in another command prefix:

    python benchmarks/bench_convert.py --config /tmp/tiny-mixtral.json --work_dir /tmp/bench-smoke \\
        --max_shard_gb 0.005 --repeat 2

The result is printed as markdown tables (paste into the README) and written as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "mixtral-8x7b-v0.1.config.json"
GENERATOR_VERSION = 1  # bump when the synthetic layout changes, to invalidate cached checkpoints
# Length of the reusable random buffer, in bf16 elements: a prime (2**25 - 39), so the repeating
# pattern never lines up with rows or tensor boundaries.
RANDOM_BUFFER_ELEMS = 2**25 - 39
POLL_INTERVAL_S = 0.02

# name -> (table label, CLI arguments), passed identically to our converter and to the naive one.
MAPPINGS: dict[str, tuple[str, list[str]]] = {
    "tp4_moetp2_moeep2": (
        "tp4/moe_tp2/moe_ep2",
        ["--tp_size", "4", "--moe_tp_size", "2", "--moe_ep_size", "2"],
    ),
    "tp8_moeep8": ("tp8/moe_ep8", ["--tp_size", "8", "--moe_ep_size", "8"]),
    "tp8": ("tp8 (default MoE split)", ["--tp_size", "8"]),
}


# --------------------------------------------------------------------------------------------------
# Synthetic checkpoint


def tensor_specs(config: dict[str, object]) -> list[tuple[str, tuple[int, ...]]]:
    """HF Mixtral tensor names and shapes, in the module order `save_pretrained` writes them."""

    def num(key: str) -> int:
        value = config[key]
        assert isinstance(value, int), f"config[{key!r}] = {value!r} is not an int"
        return value

    hidden, inter, vocab = num("hidden_size"), num("intermediate_size"), num("vocab_size")
    heads, kv_heads = num("num_attention_heads"), num("num_key_value_heads")
    experts, layers = num("num_local_experts"), num("num_hidden_layers")
    head_dim = config.get("head_dim") or hidden // heads
    assert isinstance(head_dim, int)

    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "block_sparse_moe.gate.weight", (experts, hidden)),
        ]
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            specs += [(q + "w1.weight", (inter, hidden)), (q + "w2.weight", (hidden, inter))]
            specs += [(q + "w3.weight", (inter, hidden))]
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    specs.append(("model.norm.weight", (hidden,)))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


def nbytes_bf16(shape: tuple[int, ...]) -> int:
    return 2 * int(np.prod(shape, dtype=np.int64))


def plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order, like `save_pretrained`: start a new shard when the next tensor won't fit."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = nbytes_bf16(shape)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def random_bf16_buffer(seed: int) -> np.ndarray:
    """N(0, 0.02) values as raw little-endian bf16 bits (uint16), rounded to nearest even: all finite."""
    rng = np.random.default_rng(seed)
    out = np.empty(RANDOM_BUFFER_ELEMS, dtype="<u2")
    step = 1 << 22  # 4 Mi values at a time keeps the float32 temporaries small
    for lo in range(0, RANDOM_BUFFER_ELEMS, step):
        f32 = rng.standard_normal(min(step, RANDOM_BUFFER_ELEMS - lo), dtype=np.float32)
        f32 *= 0.02
        bits = f32.view(np.uint32)
        out[lo : lo + bits.shape[0]] = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return out


def buffer_slices(buf: np.ndarray, start: int, count: int) -> Iterator[memoryview]:
    """`count` elements of `buf` read cyclically from `start`, as byte views (no copies)."""
    n = buf.shape[0]
    pos = start % n
    while count > 0:
        take = min(count, n - pos)
        yield buf[pos : pos + take].data.cast("B")
        count -= take
        pos = 0


def write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], buf: np.ndarray, rng: np.random.Generator
) -> int:
    """Write one shard tensor by tensor from the shared random buffer; returns the file size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = nbytes_bf16(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape in tensors:
            start = int(rng.integers(0, buf.shape[0]))  # a different window of the buffer per tensor
            for chunk in buffer_slices(buf, start, nbytes_bf16(shape) // 2):
                f.write(chunk)
    return 8 + len(raw) + offset


@dataclass
class Checkpoint:
    path: Path
    layers: int
    bytes: int
    files: dict[str, int]  # file name -> size, to validate the cache


def ensure_checkpoint(
    base_config: dict[str, object], layers: int, work_dir: Path, max_shard_bytes: int, seed: int
) -> Checkpoint:
    """Generate (or reuse from the cache) a synthetic checkpoint with `layers` decoder layers."""
    config = {**base_config, "num_hidden_layers": layers}
    config_text = json.dumps(config, indent=2) + "\n"
    key = {
        "generator": GENERATOR_VERSION,
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "max_shard_bytes": max_shard_bytes,
        "seed": seed,
    }
    tag = hashlib.sha256(config_text.encode()).hexdigest()[:10]
    path = work_dir / "checkpoints" / f"mixtral-{layers}L-{tag}"
    meta_path = path.with_name(path.name + ".meta.json")
    if meta_path.exists() and path.is_dir():
        meta = json.loads(meta_path.read_text())
        files: dict[str, int] = meta.get("files", {})
        present = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        if meta.get("key") == key and present == files:
            log(f"reusing cached {layers}-layer checkpoint {path} ({sum(files.values()) / 1e9:.2f} GB)")
            return Checkpoint(path, layers, sum(files.values()), files)
        log(f"cached checkpoint {path} does not match, regenerating")

    specs = tensor_specs(config)
    shards = plan_shards(specs, max_shard_bytes)
    total = sum(nbytes_bf16(s) for _, s in specs)
    need = total + (64 << 20)
    free = shutil.disk_usage(work_dir).free
    if free < need:
        sys.exit(f"not enough disk in {work_dir}: need {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB")
    size = f"{len(specs)} tensors, {total / 1e9:.2f} GB, {len(shards)} shards"
    log(f"generating {layers}-layer checkpoint: {size}")

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    buf = random_bf16_buffer(seed)
    rng = np.random.default_rng(seed + layers)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / fname, shard, buf, rng)
        weight_map.update({name: fname for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(config_text)
    del buf
    os.sync()
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    meta_path.write_text(json.dumps({"key": key, "files": files}, indent=2) + "\n")
    log(f"  wrote {path} in {time.perf_counter() - t0:.1f} s")
    return Checkpoint(path, layers, sum(files.values()), files)


# --------------------------------------------------------------------------------------------------
# Running and measuring one command


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return kids


def memory_kb(pid: int) -> int:
    """A process's share of anonymous and shared memory: Pss_Anon + Pss_Shmem (a page shared by n processes
    counts 1/n in each, so a tree's sum counts it once: the quantize workers share the read buffers and the
    pages they were forked with). Without smaps_rollup, RssAnon + RssShmem."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("Pss_Anon:", "Pss_Shmem:")))
        if fields:
            return sum(int(v.split()[0]) for v in fields.values())
        with open(f"/proc/{pid}/status") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("RssAnon:", "RssShmem:")))
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return 0  # gone, or a zombie (no memory lines)


def tree_memory_kb(root: int) -> int:
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += memory_kb(pid)
        stack += children_of(pid)
    return total


@dataclass
class RunResult:
    seconds: float  # what the table reports: command_seconds + sync_seconds, or without --no_sync
    command_seconds: float  # the command alone
    sync_seconds: float  # the `sync` right after it: flushing what it left dirty in the page cache
    peak_memory_mb: float
    bytes_out: int
    returncode: int
    first_byte_s: float  # when a file in the output dir first had data on disk (NaN: never seen)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def has_data(out_dir: Path) -> bool:
    try:
        return any(e.is_file() and e.stat().st_size > 0 for e in os.scandir(out_dir))
    except OSError:  # not there yet, or a file renamed between listing and stat
        return False


def run_measured(argv: list[str], out_dir: Path, log_path: Path, count_sync: bool) -> RunResult:
    """Run `argv` from the repo root, timing it (plus the `sync` after it, if `count_sync`) and polling
    its process tree's anonymous RSS and when its first output byte is on disk. The sync matters: our
    converter fsyncs its outputs, cp does not."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.sync()  # start from a clean slate: no dirty pages left over from the previous run
    peak_kb = 0
    first_byte = float("nan")
    stop = threading.Event()

    with log_path.open("wb") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)

        def poll() -> None:
            nonlocal peak_kb, first_byte
            while not stop.is_set():
                peak_kb = max(peak_kb, tree_memory_kb(proc.pid))
                if first_byte != first_byte and has_data(out_dir):
                    first_byte = time.perf_counter() - t0
                stop.wait(POLL_INTERVAL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status = os.waitpid(proc.pid, 0)
        command_seconds = time.perf_counter() - t0
        stop.set()
        poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.perf_counter()
    os.sync()
    sync_seconds = time.perf_counter() - t1
    bytes_out = dir_bytes(out_dir) if out_dir.exists() else 0
    seconds = command_seconds + sync_seconds if count_sync else command_seconds
    return RunResult(seconds, command_seconds, sync_seconds, peak_kb / 1024, bytes_out, proc.returncode, first_byte)


# --------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Command:
    kind: str  # "cp", "ours" or "naive"
    mapping: str  # key of MAPPINGS, "" for cp
    label: str
    argv: list[str]
    out_dir: Path
    runs: list[RunResult] = field(default_factory=list)
    precision: str = "none"  # weight-only int8 / int4 (ours only)


def launcher(prefix: str) -> list[str]:
    """Split a command prefix; a leading `python` means this interpreter (sys.executable)."""
    argv = shlex.split(prefix)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    for token in argv[1:]:
        if token.endswith(".py") and not (REPO_ROOT / token).exists():
            sys.exit(f"{token} not found (relative to {REPO_ROOT}); see --converter / --naive")
    return argv


def build_commands(ckpt: Checkpoint, args: argparse.Namespace, out_root: Path) -> list[Command]:
    src = str(ckpt.path)
    tag = f"{ckpt.layers}L"
    cmds = [Command("cp", "", "cp -r", ["cp", "-r", src, str(out_root / f"{tag}-cp")], out_root / f"{tag}-cp")]
    converters = [("ours", args.converter)] + [tuple(c.split("=", 1)) for c in args.compare]
    for key in args.mappings:
        label, margs = MAPPINGS[key]
        for name, command in converters:
            for precision in args.precisions:
                suffix = "" if precision == "none" else f"-{precision}"
                out = out_root / f"{tag}-{name}-{key}{suffix}"
                argv = [*launcher(command), "--model_dir", src, "--output_dir", str(out), "--force", "--quiet"]
                argv += margs + weight_only_args(precision, args) + shlex.split(args.convert_args)
                shown = f"{name} {label}" + ("" if precision == "none" else f" {precision}")
                cmds.append(Command("ours", key, shown, argv, out, precision=precision))
    if not args.skip_naive:
        for key in args.mappings:
            label, margs = MAPPINGS[key]
            out = out_root / f"{tag}-naive-{key}"
            argv = [*launcher(args.naive), "--model_dir", src, "--output_dir", str(out)]
            cmds.append(Command("naive", key, f"naive {label}", argv + margs + shlex.split(args.naive_args), out))
    return cmds


def weight_only_args(precision: str, args: argparse.Namespace) -> list[str]:
    if precision == "none":
        return []
    out = ["--use_weight_only", "--weight_only_precision", precision, "--weight_only_arch", str(args.weight_only_arch)]
    return out + (["--weight_only_sm90_layout", args.weight_only_sm90_layout] if args.weight_only_arch == 90 else [])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_round_robin(ckpt: Checkpoint, cmds: list[Command], args: argparse.Namespace, logs: Path) -> None:
    rounds = [("warmup", i) for i in range(args.warmup)] + [("timed", i) for i in range(args.repeat)]
    for phase, i in rounds:
        for cmd in cmds:
            name = "-".join(x for x in (f"{ckpt.layers}L", cmd.kind, cmd.mapping, f"{phase}{i + 1}") if x)
            res = run_measured(cmd.argv, cmd.out_dir, logs / f"{name}.log", not args.no_sync)
            status = "ok" if res.returncode == 0 else f"FAILED rc={res.returncode}, see {logs / name}.log"
            log(
                f"[{ckpt.layers}L {phase} {i + 1}] {cmd.label:30s} {res.command_seconds:7.2f} s "
                f"+ sync {res.sync_seconds:5.2f} s  first byte {res.first_byte_s:5.2f} s  "
                f"peak mem {res.peak_memory_mb:8.0f} MB  out {human_bytes(res.bytes_out):>9s}  {status}"
            )
            if phase == "timed":
                cmd.runs.append(res)
            if not args.keep or (phase, i) != rounds[-1]:
                shutil.rmtree(cmd.out_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The disk's own write speed


@dataclass
class DiskSpeed:
    label: str
    streams: int
    block: int
    gb_per_s: list[float] = field(default_factory=list)  # one per measurement


def dd_variants(streams: int) -> list[DiskSpeed]:
    """One `dd` with large blocks, and as many in parallel as the most rank files a mapping writes."""
    return [DiskSpeed("1 stream, bs=16M", 1, 16 << 20), DiskSpeed(f"{streams} streams, bs=4M", streams, 4 << 20)]


def measure_dd(work_dir: Path, disk: DiskSpeed, total_bytes: int) -> float:
    """GB/s of `dd if=/dev/zero oflag=direct` into `work_dir` (the streams' files together, + a `sync`)."""
    count = max(1, total_bytes // (disk.streams * disk.block))
    files = [work_dir / f"dd-{k}" for k in range(disk.streams)]
    os.sync()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={f}", f"bs={disk.block}", f"count={count}", "oflag=direct", "status=none"],
            stderr=subprocess.PIPE,
        )
        for f in files
    ]
    errors = [p.communicate()[1].decode().strip() for p in procs if p.wait() != 0]
    os.sync()
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in files if f.exists())
    for f in files:
        f.unlink(missing_ok=True)
    if errors:
        log(f"dd {disk.label} failed: {errors[0]}")
        return float("nan")
    speed = written / seconds / 1e9
    log(f"dd oflag=direct, {disk.label}: {written / 1e9:.2f} GB in {seconds:.2f} s = {speed:.2f} GB/s")
    return speed


def best_dd(disks: list[DiskSpeed]) -> float:
    medians = [statistics.median(d.gb_per_s) for d in disks if d.gb_per_s]
    return max((m for m in medians if m == m), default=float("nan"))


@dataclass
class Row:
    model: str
    layers: int
    kind: str
    mapping: str
    label: str
    argv: list[str]
    bytes_in: int
    bytes_out: int
    median_s: float
    spread_s: tuple[float, float]  # fastest and slowest timed run
    ratio_vs_cp: float  # t / (t_cp * bytes_out / bytes_in)
    gb_per_s: float  # bytes_out / median_s
    vs_dd: float  # gb_per_s over the best dd oflag=direct speed
    first_byte_s: float  # median
    peak_memory_mb: float  # max over the timed runs
    failed_runs: int
    runs: list[RunResult]
    precision: str = "none"
    vs_unquantized: float = float("nan")  # weight-only: median over the same mapping's unquantized median


def summarize(model: str, ckpt: Checkpoint, cmds: list[Command], dd_gb_per_s: float) -> list[Row]:
    nan = float("nan")
    cp_ok = [r.seconds for r in cmds[0].runs if r.returncode == 0]
    t_cp = statistics.median(cp_ok) if cp_ok else nan
    rows: list[Row] = []
    for cmd in cmds:
        ok = [r for r in cmd.runs if r.returncode == 0]
        median = statistics.median(r.seconds for r in ok) if ok else nan
        bytes_out = max((r.bytes_out for r in ok), default=0)
        scaled_cp = t_cp * bytes_out / ckpt.bytes
        first = [r.first_byte_s for r in ok if r.first_byte_s == r.first_byte_s]
        rate = bytes_out / median / 1e9 if ok and median > 0 else nan
        rows.append(
            Row(
                model=model,
                layers=ckpt.layers,
                kind=cmd.kind,
                mapping=cmd.mapping,
                label=cmd.label,
                argv=cmd.argv,
                bytes_in=ckpt.bytes,
                bytes_out=bytes_out,
                median_s=median,
                spread_s=(min((r.seconds for r in ok), default=nan), max((r.seconds for r in ok), default=nan)),
                ratio_vs_cp=median / scaled_cp if ok and scaled_cp > 0 else nan,
                gb_per_s=rate,
                vs_dd=rate / dd_gb_per_s if dd_gb_per_s > 0 else nan,
                first_byte_s=statistics.median(first) if first else nan,
                peak_memory_mb=max((r.peak_memory_mb for r in ok), default=nan),
                failed_runs=len(cmd.runs) - len(ok),
                runs=cmd.runs,
                precision=cmd.precision,
            )
        )
    plain = {(r.kind, r.label): r.median_s for r in rows if r.precision == "none"}
    for r in rows:
        base = plain.get((r.kind, r.label.removesuffix(f" {r.precision}")))
        if r.precision != "none" and base:
            r.vs_unquantized = r.median_s / base
    return rows


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def markdown_tables(rows: list[Row], repeat: int, disks: list[DiskSpeed]) -> str:
    lines = []
    if disks:
        speeds = "; ".join(
            f"{d.label}: {statistics.median(d.gb_per_s):.2f} GB/s ({' '.join(f'{v:.2f}' for v in d.gb_per_s)})"
            for d in disks
            if d.gb_per_s
        )
        lines += [f"`dd if=/dev/zero oflag=direct` + `sync` on the same disk (median, then each): {speeds}.", ""]
    lines += [
        f"| model | command | bytes in | bytes out | seconds (median of {repeat}) | fastest-slowest "
        "| first byte s | t / (t_cp * out/in) | t / t_unquantized | GB/s out | / dd | peak mem MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        failed = f" ({r.failed_runs} failed)" if r.failed_runs else ""
        vs_plain = "" if r.precision == "none" else f"{r.vs_unquantized:.2f}"
        lines.append(
            f"| {r.model} ({r.layers}L) | `{r.label}`{failed} | {human_bytes(r.bytes_in)} "
            f"| {human_bytes(r.bytes_out)} | {r.median_s:.2f} | {r.spread_s[0]:.2f}-{r.spread_s[1]:.2f} "
            f"| {r.first_byte_s:.2f} | {r.ratio_vs_cp:.2f} | {vs_plain} | {r.gb_per_s:.2f} | {r.vs_dd:.2f} "
            f"| {r.peak_memory_mb:.0f} |"
        )
    one_layer = {r.label: r for r in rows if r.layers == 1}
    scaling = [(one_layer[r.label], r) for r in rows if r.layers == 2 and r.kind != "cp" and r.label in one_layer]
    if scaling:
        lines += ["", "| command | peak mem 1L MB | peak mem 2L MB | 2L / 1L |", "|---|--:|--:|--:|"]
        for r1, r2 in scaling:
            ratio = r2.peak_memory_mb / r1.peak_memory_mb if r1.peak_memory_mb > 0 else float("nan")
            lines.append(f"| `{r1.label}` | {r1.peak_memory_mb:.0f} | {r2.peak_memory_mb:.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def jsonable(value: object) -> object:
    """Strict JSON: NaN becomes null, paths become strings."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="HF config.json giving the shapes")
    ap.add_argument("--layers", default="1,2", help="comma-separated decoder layer counts (default 1,2)")
    ap.add_argument(
        "--mappings",
        default=",".join(MAPPINGS),
        help=f"comma-separated subset of {', '.join(MAPPINGS)} (default all)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="timed round-robin rounds (default 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first, to warm the page cache")
    ap.add_argument("--work_dir", type=Path, default=Path("bench-work"), help="cache + outputs (./bench-work)")
    ap.add_argument("--keep", action="store_true", help="keep the last round's output directories")
    ap.add_argument("--converter", default="python convert_checkpoint.py", help="our converter's command")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=CMD",
        help="another converter run alternating with ours, e.g. old='python /tmp/old/convert_checkpoint.py'",
    )
    ap.add_argument("--convert_args", default="", help="extra arguments for our converter, e.g. '--workers 2'")
    ap.add_argument("--naive", default="python benchmarks/naive_convert.py", help="the naive converter's command")
    ap.add_argument("--naive_args", default="", help="extra arguments for the naive converter")
    ap.add_argument("--skip_naive", action="store_true", help="don't run the naive converter (needs lots of RAM)")
    ap.add_argument("--json_out", type=Path, help="write results as JSON here (default WORK_DIR/results.json)")
    ap.add_argument("--max_shard_gb", type=float, default=4.9, help="max source shard size in GB (1e9 bytes)")
    ap.add_argument("--no_sync", action="store_true", help="time the command alone, not command + `sync` of its output")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    ap.add_argument("--generate_only", action="store_true", help="build/check the cached checkpoints and exit")
    ap.add_argument("--dd_gb", type=float, default=4.0, help="GB each dd measurement writes (0: no dd)")
    ap.add_argument(
        "--precisions",
        default="none",
        help="comma-separated: none (unquantized), int8, int4: our converter runs each mapping at each",
    )
    ap.add_argument("--weight_only_arch", type=int, default=80, help="target arch of the weight-only runs (80)")
    ap.add_argument("--weight_only_sm90_layout", default="permuted", help="with --weight_only_arch 90")
    ap.add_argument(
        "--host",
        choices=["small", "big"],
        default="small",
        help="big: 4 layers, tp8_moeep8 and tp4_moetp2_moeep2, no naive converter, at least 3 timed rounds",
    )
    args = ap.parse_args(argv)
    if args.host == "big":
        args.layers, args.mappings, args.skip_naive = "4", "tp8_moeep8,tp4_moetp2_moeep2", True
        args.repeat = max(args.repeat, 3)
    args.layers = [int(x) for x in args.layers.split(",") if x.strip()]
    args.mappings = [m.strip() for m in args.mappings.split(",") if m.strip()]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if bad := [p for p in args.precisions if p not in ("none", "int8", "int4")]:
        ap.error(f"--precisions takes none, int8, int4; got {bad}")
    if bad := [c for c in args.compare if "=" not in c or c.startswith(("ours=", "cp=", "naive="))]:
        ap.error(f"--compare takes LABEL=COMMAND with a label other than ours, cp, naive: {bad}")
    if unknown := [m for m in args.mappings if m not in MAPPINGS]:
        ap.error(f"unknown mapping(s) {unknown}; choose from {list(MAPPINGS)}")
    if args.repeat < 1 or args.warmup < 0 or not args.layers or min(args.layers) < 1:
        ap.error("need --repeat >= 1, --warmup >= 0 and layer counts >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base_config = json.loads(args.config.read_text())
    work_dir: Path = args.work_dir.resolve()
    out_root, logs = work_dir / "outputs", work_dir / "logs"
    for d in (work_dir, out_root, logs):
        d.mkdir(parents=True, exist_ok=True)
    max_shard_bytes = int(args.max_shard_gb * 1e9)

    model = args.config.name.removesuffix(".json").removesuffix(".config")  # shapes' source, for the table
    rows: list[Row] = []
    streams = max(int(m[m.index("--tp_size") + 1]) for m in (MAPPINGS[k][1] for k in args.mappings))
    disks = dd_variants(streams) if args.dd_gb > 0 else []
    for layers in args.layers:
        ckpt = ensure_checkpoint(base_config, layers, work_dir, max_shard_bytes, args.seed)
        if args.generate_only:
            continue
        cmds = build_commands(ckpt, args, out_root)
        for d in disks:  # the disk's speed before and after the runs: it drifts within minutes
            d.gb_per_s.append(measure_dd(work_dir, d, int(args.dd_gb * 1e9)))
        run_round_robin(ckpt, cmds, args, logs)
        for d in disks:
            d.gb_per_s.append(measure_dd(work_dir, d, int(args.dd_gb * 1e9)))
        rows += summarize(model, ckpt, cmds, best_dd(disks))
    if args.generate_only:
        return

    table = markdown_tables(rows, args.repeat, disks)
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_total_kb = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal:"))
    print(
        f"\nSource shapes: {args.config.name}; {os.cpu_count()} CPUs, {mem_total_kb / 2**20:.0f} GiB RAM; "
        f"warm page cache ({args.warmup} untimed warm-up round(s), cache not dropped); "
        f"seconds = {'the command alone' if args.no_sync else 'command + the `sync` after it'}; "
        f"our converter: `{shlex.join([*shlex.split(args.converter), *shlex.split(args.convert_args)])}`.\n"
    )
    print(table)
    json_out: Path = args.json_out or work_dir / "results.json"
    result = {
        "config": str(args.config),
        "machine": {
            "cpus": os.cpu_count(),
            "mem_total_kb": mem_total_kb,
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "settings": vars(args),
        "dd": [asdict(d) for d in disks],
        "results": [asdict(r) for r in rows],
        "markdown": table,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    log(f"\nwrote {json_out}")
    if any(r.failed_runs for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
