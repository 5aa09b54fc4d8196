"""Dry run: plan every requested mapping, run every check, and say what a conversion would write.

No tensor data is read and nothing is written. The JSON document of one mapping is the manifest a
conversion would write (sha256 null), plus `checks`, `disk` and `memory`, so tools read both the same way.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import quantize_pool, writer
from .config_only import PlanInput, open_for_plan
from .errors import CheckpointError, MappingError, UsageError
from .execute import CAST_BLOCK_BYTES, DEFAULT_CHUNK_BYTES, READ_BUFFERS
from .header import itemsize
from .jobs import MappingLike, MappingRequest, as_request, check_unique_subdirs
from .manifest import FORMAT, VERSION, build_manifest
from .mapping import Mapping
from .outdir import check_output_arg, overlap_problem
from .plan import CODE_NAMES, ConvertOptions, Plan, convert_options, plan_conversion
from .quantize_stream import lane_group_bytes
from .units import count, human_bytes
from .weight_only import GATHER_INDEX_BYTES
from .writer import staging_buffer_bytes, write_thread_count

# Interpreter, numpy and the plan itself: peak RssAnon 149 MB converting the
# tiny example, 173-200 MB for full-width layers; rounded up so the bound stays a bound for large plans.
BASE_MEMORY_BYTES = 256 * 2**20
# config.json of the output is about 1 KB; the manifest's sha256 strings are null in a dry run.
_CONFIG_JSON_BYTES = 4096
_SHA256_JSON_BYTES = 66


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    problems: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "problems": list(self.problems)}


@dataclass(frozen=True)
class JobReport:
    """One mapping of a dry run: its plan (None when the mapping does not fit) and its checks."""

    request: MappingRequest
    plan: Plan | None
    checks: tuple[Check, ...]
    output_dir: Path | None
    document: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class DryRun:
    """Everything a dry run found. `document()` is what `--json` prints, `text()` what the terminal shows."""

    source: PlanInput
    jobs: tuple[JobReport, ...]
    memory: dict[str, Any]
    disk: dict[str, Any]
    batch: bool

    @property
    def ok(self) -> bool:
        return all(j.ok for j in self.jobs) and self.disk.get("ok") is not False

    @property
    def exit_code(self) -> int:
        """0 when every check passes; 2 when a mapping or option is wrong; 1 for any other failing check."""
        if self.ok:
            return 0
        usage = {"mapping", "options"}
        return 2 if any(not c.ok and c.name in usage for j in self.jobs for c in j.checks) else 1

    @property
    def problems(self) -> list[str]:
        found = [
            f"{j.request.describe()}: {p}" if self.batch else p for j in self.jobs for c in j.checks for p in c.problems
        ]
        if self.disk.get("ok") is False and self.batch:
            found.append(self.disk["problem"])
        return found

    def document(self) -> dict[str, Any]:
        if not self.batch:
            return {**self.jobs[0].document, "ok": self.ok}
        return {
            "dry_run": True,
            "ok": self.ok,
            "source": self.source.record(),
            "total_bytes": sum(j.document["total_bytes"] for j in self.jobs),
            "disk": self.disk,
            "memory": self.memory,
            "jobs": [j.document for j in self.jobs],
        }

    def text(self) -> str:
        return render_text(self)


def dry_run(
    model_dir: str | os.PathLike[str],
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    mappings: Sequence[MappingLike] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    use_weight_only: bool = False,
    weight_only_precision: str = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
    workers: int | None = None,
    force: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    revision: str | None = None,
) -> DryRun:
    """Plan and check a conversion (or a batch, with `mappings`) without reading tensor data or writing.

    Args:
        model_dir: a checkpoint dir, a hub repo id, or a config.json (file, or a dir holding only it).
        tp_size, pp_size, moe_tp_size, moe_ep_size: one mapping, as for `convert`.
        mappings: several mappings, as for `convert_batch` (the sizes above are then ignored).
        output_dir: where the conversion would write; enables the output-dir and free-space checks.
        dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing, use_weight_only,
        weight_only_precision, weight_only_arch, weight_only_sm90_layout, workers, force, chunk_bytes,
        revision: as for `convert` (sizes are the quantized ones; a mapping's `precision` overrides).

    Mapping problems do not raise: they are in the checks (`ok`, `exit_code`, `problems`). Unreadable
    input (no config.json, a broken index, a hub error) raises as `convert` would.
    """
    batch = mappings is not None
    requests = (
        [as_request(m) for m in mappings]
        if mappings is not None
        else [MappingRequest(tp_size, pp_size, moe_tp_size, moe_ep_size)]
    )
    if batch:
        if not requests:
            raise UsageError("no mappings given; pass at least one")
        check_unique_subdirs(requests)
    options = convert_options(
        dtype,
        use_parallel_embedding,
        embedding_sharding_dim,
        use_embedding_sharing,
        use_weight_only=use_weight_only,
        weight_only_precision=weight_only_precision,
        weight_only_arch=weight_only_arch,
        weight_only_sm90_layout=weight_only_sm90_layout,
    )
    source = open_for_plan(model_dir, revision=revision, dtype=dtype)
    out = None if output_dir is None else check_output_arg(output_dir)
    jobs = []
    for r in requests:
        job_out = None if out is None else out / r.output_subdir() if batch else out
        mine = r.options(options, weight_only_arch, weight_only_sm90_layout)
        jobs.append(_job(source, r, mine, job_out, force, workers, chunk_bytes, check_disk=not batch))
    plans = [j.plan for j in jobs if j.plan is not None]
    memory = memory_bound(plans, workers=workers, chunk_bytes=chunk_bytes)
    needed = sum(j.document["disk"]["needed_bytes"] for j in jobs)
    disk = disk_space(out, needed)
    return DryRun(source, tuple(jobs), memory, disk, batch)


def _job(
    source: PlanInput,
    request: MappingRequest,
    options: ConvertOptions,
    out: Path | None,
    force: bool,
    workers: int | None,
    chunk_bytes: int,
    *,
    check_disk: bool,
) -> JobReport:
    checks: list[Check] = []
    plan: Plan | None = None
    mapping: Mapping | None = None
    try:
        mapping = request.resolve()
        plan = plan_conversion(source.spec, source.headers, mapping, options)
        checks.append(Check("mapping", True))
        checks.append(Check("source", True))
        checks.append(Check("options", True))
    except MappingError as e:
        checks.append(Check("mapping", False, tuple(e.problems or [str(e)])))
        # The source checks do not depend on the mapping: run them on one rank so they are reported too.
        checks += _source_checks(source, options)
    except CheckpointError as e:
        checks += [Check("mapping", True), Check("source", False, tuple(e.problems or [str(e)]))]
    except UsageError as e:
        checks += [Check("mapping", True), Check("source", True), Check("options", False, (str(e),))]
    model_dir = None if source.source is None else source.source.model_dir
    if out is not None:
        problems = output_dir_problems(out, model_dir, force=force)
        checks.append(Check("output_dir", not problems, tuple(problems)))
    if plan is not None:
        doc = build_manifest(plan, source.record())
        needed = doc["total_bytes"] + _CONFIG_JSON_BYTES + len(_json_bytes(doc)) + _SHA256_JSON_BYTES * len(plan.ranks)
    else:
        doc = _empty_document(source, request, mapping)
        needed = 0
    # A batch checks the space of all its mappings together (see dry_run), not one by one.
    disk = disk_space(out if check_disk else None, needed)
    if disk.get("ok") is False:
        checks.append(Check("disk_space", False, (disk["problem"],)))
    stats = plan_stats(plan, source) if plan is not None else {}
    doc = {
        **doc,
        "dry_run": True,
        "mapping_request": request.describe(),
        "output_dir": None if out is None else str(out),
        **stats,
        "checks": [c.as_dict() for c in checks],
        "disk": disk,
        "memory": memory_bound([plan] if plan else [], workers=workers, chunk_bytes=chunk_bytes),
    }
    return JobReport(request, plan, tuple(checks), out, doc)


def _source_checks(source: PlanInput, options: ConvertOptions) -> list[Check]:
    try:
        plan_conversion(source.spec, source.headers, Mapping(), options)
    except CheckpointError as e:
        return [Check("source", False, tuple(e.problems or [str(e)]))]
    except UsageError as e:
        return [Check("source", True), Check("options", False, (str(e),))]
    return [Check("source", True), Check("options", True)]


def _empty_document(source: PlanInput, request: MappingRequest, mapping: Mapping | None) -> dict[str, Any]:
    """The manifest's fields, for a mapping that could not be planned."""
    from . import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "tool": {"name": "moe-convert", "version": __version__},
        "source": source.record(),
        "architecture": source.spec.architecture,
        "dtype": None,
        "mapping": mapping.as_dict() if mapping else request.sizes(),
        "total_bytes": 0,
        "ranks": [],
        "experts": [],
    }


def _json_bytes(doc: dict[str, Any]) -> bytes:
    import json

    return (json.dumps(doc, indent=2) + "\n").encode()


def plan_stats(plan: Plan, source: PlanInput) -> dict[str, Any]:
    """Parameter count and bytes of the source, and how much of the output is distinct data."""
    params = sum(math.prod(t.shape) for t in source.headers.values())
    source_bytes = sum(math.prod(t.shape) * itemsize(t.dtype) for t in source.headers.values())
    distinct: set[tuple[str, tuple[tuple[int, int], ...], str]] = set()
    distinct_bytes = data_bytes = 0
    for r in plan.ranks:
        for t in r.tensors:
            data_bytes += t.nbytes
            if t.quantized is not None and not t.pieces:  # a per_channel_scale: computed, not copied
                distinct_bytes += t.nbytes
            for p in t.pieces:
                key = (p.source, p.box, t.dtype)
                if key not in distinct:
                    distinct.add(key)
                    distinct_bytes += p.numel * itemsize(t.piece_dtype) * t.nbytes // t.pieces_nbytes
    return {
        "parameters": params,
        "source_bytes": source_bytes,
        "source_dtypes": sorted({t.dtype for t in source.headers.values()}),
        "data_bytes": data_bytes,
        "distinct_bytes": distinct_bytes,
        "config_only": source.config_only,
    }


def memory_bound(plans: Sequence[Plan], *, workers: int | None, chunk_bytes: int) -> dict[str, Any]:
    """Peak host memory of a conversion, from how the executor works (execute.py, writer.py).

    The main thread reads chunks of at most `chunk_bytes` into one of READ_BUFFERS (2) reused buffers;
    each write thread slices and casts its pieces from them a block (4 MiB of output) at a time; every
    rank file has writer.DEPTH staging buffers (1 on small hosts, 2 from 8 cores) of at most 1 MiB (small
    hosts) or 8 MiB, shrinking so that all of them fit in 256 MiB. All jobs of a batch share the pass, so
    their rank files count together. Weight-only quantization adds the quantize pool (quantize_pool.py:
    its slots' stored bytes, and per worker process its scratch, input buffer, gather indexes and own
    pages; the read buffers become shared memory its workers read, counted once), per write thread what
    quantizing one row group a chunk left open takes (lane_group_bytes), the converter's own cached gather
    indexes (GATHER_INDEX_BYTES), and per rank file the scales of the quantized weights being filled (at
    most two at a time: a weight's sources are read before the next weight's, except where a fused gate_up
    source feeds two). Nothing else grows with the model. So:

        bound = base + 2 * chunk_bytes + write_threads * (block + one row group's quantizing)
                + rank_files * depth * staging_buffer + quantize pool + gather indexes + rank_files * 2 * largest scales
    """
    n_files = sum(len(plan.ranks) for plan in plans)
    threads = write_thread_count(workers, n_files)
    staging = n_files * writer.DEPTH * staging_buffer_bytes(n_files)
    scales = [t.nbytes for plan in plans for r in plan.ranks for t in r.tensors if t.quantized and not t.pieces]
    quantize = 0
    if scales:
        weights = [t.quantized.tensor() for p in plans for r in p.ranks for t in r.tensors if t.quantized and t.pieces]
        group = max(qt.group * qt.shape[-1] for qt in weights)
        pool = quantize_pool.memory_bytes(quantize_pool.worker_count(), group)
        quantize = pool + threads * lane_group_bytes(group) + GATHER_INDEX_BYTES + n_files * 2 * max(scales)
    bound = BASE_MEMORY_BYTES + READ_BUFFERS * chunk_bytes + threads * CAST_BLOCK_BYTES + staging + quantize
    return {
        "bound_bytes": bound,
        "base_bytes": BASE_MEMORY_BYTES,
        "workers": threads,
        "chunk_bytes": chunk_bytes,
        "read_buffers": READ_BUFFERS,
        "cast_block_bytes": CAST_BLOCK_BYTES,
        "staging_bytes": staging,
        "quantize_bytes": quantize,
        "formula": "base + read_buffers * chunk_bytes + workers * cast_block_bytes + staging_bytes + quantize_bytes",
    }


def output_dir_problems(out: Path, model_dir: Path | None, *, force: bool) -> list[str]:
    """What convert's output-dir checks would refuse, found without creating anything."""
    problems = []
    overlap = overlap_problem(out, model_dir, []) if model_dir is not None else None
    if overlap:
        problems.append(overlap)
    if out.exists() and not out.is_dir():
        problems.append(f"--output_dir {out} is a file; choose a directory")
    elif out.is_dir() and any(out.iterdir()) and not force:
        problems.append(f"--output_dir {out} exists and is not empty; pass --force to overwrite it")
    existing = _existing_ancestor(out)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK):
        problems.append(f"--output_dir {out}: {existing} is not writable")
    return problems


def disk_space(out: Path | None, needed: int) -> dict[str, Any]:
    """Bytes needed, and free bytes on the filesystem that would hold `out` (if given)."""
    if out is None:
        return {"output_dir": None, "needed_bytes": needed, "free_bytes": None, "ok": None}
    existing = _existing_ancestor(out)
    free = shutil.disk_usage(existing).free if existing is not None and existing.is_dir() else None
    ok = None if free is None else free >= needed
    disk: dict[str, Any] = {"output_dir": str(out), "needed_bytes": needed, "free_bytes": free, "ok": ok}
    if ok is False:
        assert free is not None
        disk["problem"] = (
            f"--output_dir {out}: needs {human_bytes(needed)} but only {human_bytes(free)} is free; "
            "free space or choose another directory"
        )
    return disk


def _existing_ancestor(path: Path) -> Path | None:
    for p in (path, *path.absolute().parents):
        if p.exists():
            return p
    return None


def human_count(n: int) -> str:
    """140620000000 -> `140.62 B`; small counts stay exact."""
    for div, unit in ((1e9, "B"), (1e6, "M")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:,}"


def id_ranges(ids: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) -> `0-3,8`; empty -> `-`."""
    if not ids:
        return "-"
    out, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def render_text(run: DryRun) -> str:
    src = run.source
    spec = src.spec
    if src.hub_id:
        where = f"{src.hub_id}@{src.revision[:12]}" if src.revision else src.hub_id
    else:
        where = str(src.config_path if src.source is None else src.source.model_dir)
    lines = [
        f"source: {where}"
        + ("  (config.json only: tensor sizes implied by the config, no shards read)" if src.config_only else ""),
        f"model: {spec.architecture}, {spec.num_layers} layers, {spec.num_experts} experts (top {spec.top_k}), "
        f"hidden {spec.hidden_size}, ffn {spec.expert_ffn_size}"
        + (f" + shared {spec.shared_ffn_size}" if spec.shared_ffn_size else "")
        + f", heads {spec.num_heads}/{spec.num_kv_heads} kv x {spec.head_dim}, "
        f"vocab {spec.vocab_size}",
    ]
    for job in run.jobs:
        lines.append("")
        lines += _job_lines(job, run.batch)
    lines.append("")
    if run.batch:
        total = sum(j.document["total_bytes"] for j in run.jobs)
        lines.append(f"batch: {count(len(run.jobs), 'mapping')}, {human_bytes(total)} in all, one pass over the source")
        lines.append(_disk_line(run.disk))
    m = run.memory
    lines.append(
        f"memory bound: {human_bytes(m['bound_bytes'])} = {human_bytes(m['base_bytes'])} base + {m['read_buffers']} x "
        f"{human_bytes(m['chunk_bytes'])} read buffers + {m['workers']} x {human_bytes(m['cast_block_bytes'])} "
        f"cast blocks + {human_bytes(m['staging_bytes'])} staging buffers"
        + (f" + {human_bytes(m['quantize_bytes'])} quantizing" if m.get("quantize_bytes") else "")
    )
    problems = run.problems
    if problems:
        lines.append(f"checks: {len(problems)} FAILED")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append(
            "checks: all passed (mapping, source, options"
            + (", output dir, disk space)" if run.disk["output_dir"] else ")")
        )
    return "\n".join(lines) + "\n"


def _job_lines(job: JobReport, batch: bool) -> list[str]:
    doc = job.document
    m = doc["mapping"]
    head = f"mapping: {job.request.describe()}"
    if "world_size" in m:
        head += (
            f" -> tp{m['tp_size']} pp{m['pp_size']} moe_tp{m['moe_tp_size']} moe_ep{m['moe_ep_size']}, "
            f"world {m['world_size']}"
        )
    if doc["dtype"]:
        head += f", dtype {doc['dtype']}"
    if job.plan is not None and (scheme := job.plan.options.weight_only) is not None:
        head += f", weight-only {scheme.describe()}"
    if batch and job.output_dir is not None:
        head += f", into {job.output_dir}"
    lines = [head]
    if job.plan is None:
        lines.append("  (not planned: the mapping does not fit; see the checks below)")
        return lines
    header = ("rank", "tp", "pp", "moe_tp", "moe_ep", "layers", "experts", "ffn slice", "tensors", "bytes")
    rows = [
        (
            str(r["rank"]),
            str(r["tp_rank"]),
            str(r["pp_rank"]),
            str(r["moe_tp_rank"]),
            str(r["moe_ep_rank"]),
            id_ranges(r["layers"]),
            id_ranges(r["experts"]),
            f"[{r['ffn_slice'][0]}, {r['ffn_slice'][1]})",
            str(len(r["tensors"])),
            human_bytes(r["bytes"]),
        )
        for r in doc["ranks"]
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    left = {5, 6, 7}  # text columns
    for row in (header, *rows):
        lines.append(
            "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    tensors = sum(len(r["tensors"]) for r in doc["ranks"])
    replicated = doc["data_bytes"] - doc["distinct_bytes"]
    lines.append(
        f"total: {count(len(doc['ranks']), 'file')}, {count(tensors, 'tensor')}, {human_bytes(doc['total_bytes'])} "
        f"({human_bytes(doc['distinct_bytes'])} distinct data + {human_bytes(replicated)} replicated or padding "
        f"+ {human_bytes(doc['total_bytes'] - doc['data_bytes'])} headers)"
    )
    lines.append(
        f"source: {human_count(doc['parameters'])} parameters, {human_bytes(doc['source_bytes'])} "
        f"in {'/'.join(CODE_NAMES.get(c, c) for c in doc['source_dtypes'])}"
    )
    if not batch:
        lines.append(_disk_line(doc["disk"]))
    return lines


def _disk_line(disk: dict[str, Any]) -> str:
    needed = human_bytes(disk["needed_bytes"])
    if disk["output_dir"] is None:
        return f"disk: needs {needed} (pass --output_dir to check free space)"
    if disk["free_bytes"] is None:
        return f"disk: needs {needed} in {disk['output_dir']} (free space unknown)"
    verdict = "ok" if disk["ok"] else "NOT ENOUGH"
    return f"disk: needs {needed} in {disk['output_dir']}; {human_bytes(disk['free_bytes'])} free: {verdict}"
