"""The library entry points: plan a conversion, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import progress as progress_lines
from .errors import MappingError, OutputError, UsageError, collect, shorten
from .execute import DEFAULT_CHUNK_BYTES, RankResult, WriteJob, execute_plans
from .identity import run_identity
from .jobs import MappingLike, as_request, check_unique_subdirs
from .manifest import MANIFEST_FILE, build_manifest
from .mapping import resolve_mapping
from .outdir import (
    OutputDirs,
    check_disjoint,
    check_output_arg,
    check_space,
    cleanup,
    entries,
    overlap_problem,
    refuse_busy,
)
from .plan import ConvertOptions, Plan, convert_options, plan_conversion
from .replan import open_model, plan_source, source_record
from .resume import Journal, earlier_run, final_names, remove_ours, resume_state
from .source import SourceCheckpoint
from .trtllm_config import trtllm_config
from .units import count, human_bytes
from .writer import PARTIAL_SUFFIX, layout_rank_file, write_json_atomic

if TYPE_CHECKING:
    from .config_only import PlanInput
    from .mapping import Mapping
    from .model_config import ModelSettings
    from .verify import VerifyReport

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
_CONFIG_BYTES = 4096  # room for config.json alone


@dataclass(frozen=True)
class ConvertResult:
    output_dir: Path
    plan: Plan
    ranks: list[RankResult]
    seconds: float
    manifest: dict[str, Any]
    kept: tuple[str, ...] = ()  # rank files an interrupted run completed, reused by --resume
    verify_report: VerifyReport | None = None  # with verify=True

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes for r in self.ranks)


def plan(
    model_dir: str | os.PathLike[str],
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    use_weight_only: bool = False,
    weight_only_precision: str = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
    revision: str | None = None,
) -> Plan:
    """Plan a conversion without reading any tensor data: what every rank file will hold.

    Args:
        model_dir: a checkpoint directory (its safetensors headers are read), a hub repo id (only
            config.json and the index are fetched), or a config.json file / a directory holding only
            config.json (tensor shapes implied by the config).
        tp_size, pp_size, moe_tp_size, moe_ep_size, dtype, use_parallel_embedding, embedding_sharding_dim,
        use_embedding_sharing, use_weight_only, weight_only_precision, weight_only_arch, weight_only_sm90_layout:
        as for `convert`.
        revision: branch, tag or commit when model_dir is a hub repo id.

    Raises MappingError (with `.problems`, every failing check) when the mapping does not fit the model.
    """
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
    return _plan_input(model_dir, revision, resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size), options)[1]


def _plan_input(
    model_dir: str | os.PathLike[str], revision: str | None, mapping: Mapping, options: ConvertOptions
) -> tuple[PlanInput, Plan]:
    """A checkpoint's headers, or a config.json alone, and the plan made from them."""
    from .config_only import open_for_plan

    source = open_for_plan(model_dir, revision=revision, dtype=options.dtype)
    the_plan = plan_conversion(source.spec, source.headers, mapping, options)
    for w in the_plan.warnings:
        log.warning("%s", w)
    return source, the_plan


def save_config(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    use_weight_only: bool = False,
    weight_only_precision: str = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
    force: bool = False,
    revision: str | None = None,
) -> Plan:
    """Write only the config.json a conversion would write (TensorRT-LLM's `--save_config_only`).

    Plans as `plan` does (no tensor data read; a config.json alone is enough) and checks the output dir
    as `convert` does; writes no rank file and no manifest. Arguments as for `convert`. Returns the plan.
    """
    out = check_output_arg(output_dir)
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
    mapping = resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size)
    source, the_plan = _plan_input(model_dir, revision, mapping, options)
    model_path = source.config_path.parent if source.source is None else source.source.model_dir
    read_from = [] if source.source is None else sorted({f.resolve().parent for f in source.source.files})
    problem = overlap_problem(out, model_path, read_from)
    if problem:
        raise OutputError(problem)
    refuse_busy(out, force=force, resume=False)
    with OutputDirs([out]) as dirs:
        earlier = earlier_run(out) if force and entries(out) else None
        doomed = cleanup(out, frozenset({CONFIG_FILE, CONFIG_FILE + PARTIAL_SUFFIX}), earlier, None, force=force)
        check_space([out], [_CONFIG_BYTES])
        dirs.commit()
        remove_ours(dirs.locks[out].dir_fd, out, doomed)
        write_json_atomic(out / CONFIG_FILE, trtllm_config(the_plan, plan_input_settings(source)))
    return the_plan


def plan_input_settings(source: PlanInput) -> ModelSettings:
    """The settings the output config.json needs (RoPE, norm epsilon, ...), also for a config.json alone."""
    if source.source is not None:
        return source.source.settings
    from .model_config import read_model
    from .source import load_config_json

    return read_model(load_config_json(source.config_path), str(source.config_path))[1]


def convert(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    use_weight_only: bool = False,
    weight_only_precision: str = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
    workers: int | None = None,
    direct_io: bool = True,
    force: bool = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    revision: str | None = None,
    resume: bool = False,
    verify: bool = False,
) -> ConvertResult:
    """Convert a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) into TensorRT-LLM rank files.

    Args:
        model_dir: directory with config.json and safetensors shards, or a hub repo id
            (`mistralai/Mixtral-8x7B-v0.1`) resolved through the hub cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN).
        output_dir: where rank{N}.safetensors, config.json and manifest.json go.
        tp_size, pp_size: tensor- and pipeline-parallel sizes (world size is their product).
        moe_tp_size, moe_ep_size: how the TP group is re-sliced for experts; None resolves as in the spec.
        dtype: auto, float16, bfloat16 or float32 (the router stays float32).
        use_parallel_embedding, embedding_sharding_dim: split the embedding over TP on dim 0 or 1.
        use_embedding_sharing: as TensorRT-LLM's flag: leave lm_head out and set share_embedding_table in
            config.json where the embedding is tied and lm_head would be a copy of it on every rank (else
            a warning, and lm_head is written).
        use_weight_only, weight_only_precision: as TensorRT-LLM's flags: quantize qkv, dense and the expert
            (and shared expert) fc / proj weights to int8 or int4 with per-channel scales (W8A16 / W4A16),
            byte-identical to TensorRT-LLM's own; docs/weight-only.md.
        weight_only_arch: the compute capability of the GPU TensorRT-LLM will run on (75, 80, 86, 87, 89,
            90): its weight layout depends on it. None: the visible GPU's (UsageError without one).
        weight_only_sm90_layout: for arch 90, which TensorRT-LLM version's layout of 2-D weights:
            "column_major" (0.10-0.11) or "permuted" (1.2); required there.
        workers: write threads; each owns some rank files and reads, hashes and writes their bytes (default:
            two per core, 8 to 16).
        direct_io: write with O_DIRECT, past the page cache, where the file system allows (False: buffered).
        force: allow a non-empty output dir: the files an earlier conversion's manifest or journal there lists
            are replaced; files it did not write are left alone (and refused if they are in the way).
        progress: show a progress bar on stderr.
        chunk_bytes: the most bytes of one source tensor held in memory at once.
        revision: branch, tag or commit when model_dir is a hub repo id.
        resume: continue an interrupted conversion into output_dir: rank files its journal records as
            complete (size and sha256 re-checked, also in a finished output) are kept, the rest written.
            Refused (UsageError naming what differs) if the options or the source (sizes, times, content
            fingerprint) differ; with `force`, such a dir is started over.
        verify: afterwards, check every output byte against the source (`moe_convert.verify.verify`);
            raises VerifyError listing the problems, if any.
    """
    started = time.perf_counter()
    out = check_output_arg(output_dir)
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
    source = open_model(model_dir, revision)
    the_plan = plan_source(
        source, tp_size=tp_size, pp_size=pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size, options=options
    )
    jobs = [(the_plan, out)]
    result = _convert_jobs(
        source,
        jobs,
        workers=workers,
        direct_io=direct_io,
        force=force,
        progress=progress,
        chunk_bytes=chunk_bytes,
        started=started,
        resume=resume,
    )[0]
    return _verified(result, source.model_dir) if verify else result


def _verified(result: ConvertResult, model_dir: Path) -> ConvertResult:
    from .verify import verify_or_raise

    return replace(result, verify_report=verify_or_raise(result.output_dir, model_dir))


def convert_batch(
    model_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    mappings: Sequence[MappingLike],
    *,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    use_weight_only: bool = False,
    weight_only_precision: str = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
    workers: int | None = None,
    direct_io: bool = True,
    force: bool = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    revision: str | None = None,
    resume: bool = False,
    verify: bool = False,
) -> list[ConvertResult]:
    """Convert one source into several mappings in a single pass over the source.

    Each mapping goes into its own subdirectory of `output_dir`: its `subdir`, else its label
    (`tp8_pp1_moetp1_moeep8`). Every mapping is planned and checked before anything is written.

    Args:
        model_dir, output_dir, dtype, ...: as for `convert` (shared by every mapping).
        mappings: each a dict (`{"tp": 8, "moe_ep": 8, "subdir": "ep8"}`; `tp_size`-style keys work too),
            a string (`"tp=8,moe_ep=8"`), a MappingRequest or a resolved Mapping. A mapping's `precision`
            (int8, int4, none) overrides the weight-only precision for it: one read, several precisions.

    `resume` and `verify` work on each mapping's subdirectory as for `convert`.

    Returns one ConvertResult per mapping, in order; `seconds` is the whole batch's time.
    """
    started = time.perf_counter()
    out = check_output_arg(output_dir)
    requests = [as_request(m) for m in mappings]
    if not requests:
        raise MappingError("convert_batch: no mappings given; pass at least one")
    check_unique_subdirs(requests)
    outs = [out / r.output_subdir() for r in requests]
    check_disjoint(outs, [r.describe() for r in requests])
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
    source = open_model(model_dir, revision)
    plans, problems = [], []
    for r in requests:
        try:
            mine = r.options(options, weight_only_arch, weight_only_sm90_layout)
            plans.append(
                plan_source(
                    source,
                    tp_size=r.tp_size,
                    pp_size=r.pp_size,
                    moe_tp_size=r.moe_tp_size,
                    moe_ep_size=r.moe_ep_size,
                    options=mine,
                )
            )
        except UsageError as e:  # a mapping that does not fit, or weights its precision cannot take
            problems += [f"{r.describe()}: {p}" for p in e.problems or [str(e)]]
    collect(problems, MappingError, "the batch's mappings do not fit the model")
    jobs = list(zip(plans, outs, strict=True))
    results = _convert_jobs(
        source,
        jobs,
        workers=workers,
        direct_io=direct_io,
        force=force,
        progress=progress,
        chunk_bytes=chunk_bytes,
        started=started,
        resume=resume,
    )
    return [_verified(r, source.model_dir) for r in results] if verify else results


def _convert_jobs(
    source: SourceCheckpoint,
    jobs: list[tuple[Plan, Path]],
    *,
    workers: int | None,
    direct_io: bool = True,
    force: bool,
    progress: bool,
    chunk_bytes: int,
    started: float,
    resume: bool = False,
) -> list[ConvertResult]:
    """Check, lock and prepare every output dir, write every plan's rank files in one source pass, then
    configs and manifests. Every refusal comes before the first write and leaves nothing behind."""
    outs = [out for _, out in jobs]
    source_dirs = sorted({f.resolve().parent for f in source.files})
    for out in outs:
        problem = overlap_problem(out, source.model_dir, source_dirs)
        if problem:
            raise OutputError(problem)
        refuse_busy(out, force=force, resume=resume)
    record = source_record(source)
    with OutputDirs(outs) as dirs:
        journals, states = {}, []
        for the_plan, out in jobs:
            empty = not entries(out)
            # Only a run that may keep or delete files needs to know which are ours.
            earlier = earlier_run(out) if (resume or force) and not empty else None
            identity = run_identity(record, the_plan)
            st = resume_state(out, the_plan, identity, earlier, force=force, empty=empty) if resume else None
            journals[out] = Journal(
                out, identity, st, cleanup(out, final_names(the_plan.mapping.world_size), earlier, st, force=force)
            )
            states.append(st)
        check_space(
            outs,
            [
                sum(layout_rank_file(r).size for r in p.ranks) - (st.kept_bytes if st else 0)
                for (p, _), st in zip(jobs, states, strict=True)
            ],
        )
        dirs.commit()
        # The journal exists before any rank file does, so every interrupted run can be resumed.
        for out, st in zip(outs, states, strict=True):
            journals[out].begin(dirs.locks[out].dir_fd)
            if st is not None:
                if st.redo:
                    keeping = count(len(st.kept), "complete rank file")
                    log.info("resuming %s: keeping %s, writing %d", out, keeping, len(st.redo))
                else:
                    log.info("nothing to do: %s is already complete (%s)", out, count(len(st.kept), "rank file"))
        write_jobs = [WriteJob(p, out, st.redo if st else None) for (p, out), st in zip(jobs, states, strict=True)]
        total = sum(r.data_bytes for job in write_jobs for r in job.ranks())
        bar = progress_lines.start("converting", total, enabled=progress, headline=_headline(write_jobs, total))
        # Lines per rank file, unless a terminal's bar shows the progress (log lines would break it up).
        per_file_lines = isinstance(bar, (progress_lines.LogProgress, progress_lines.NoProgress))
        finished: dict[Path, float] = {}

        def rank_done(output_dir: Path, r: RankResult) -> None:
            journals[output_dir].record(r)
            finished[output_dir] = time.perf_counter()
            if per_file_lines:
                log.info("wrote %s (%s, sha256 %s)", output_dir / r.file, human_bytes(r.bytes), r.sha256[:16])

        try:
            results = execute_plans(
                write_jobs,
                source.tensors,
                workers=workers,
                direct_io=direct_io,
                chunk_bytes=chunk_bytes,
                on_bytes=bar.update,
                on_rank_done=rank_done,
            )
        finally:
            bar.close()
        written_at = time.perf_counter()
        converted = []
        for (the_plan, out), written, st in zip(jobs, results, states, strict=True):
            documents_started = time.perf_counter()
            by_file = {r.file: r for r in [*(st.kept if st else ()), *written]}
            ranks = [by_file[r.file] for r in the_plan.ranks]
            manifest = build_manifest(the_plan, record, ranks)
            write_json_atomic(out / CONFIG_FILE, trtllm_config(the_plan, source.settings))
            # Written last: its presence says the conversion finished.
            write_json_atomic(out / MANIFEST_FILE, manifest)
            journals[out].finish()
            kept = tuple(r.file for r in st.kept) if st else ()
            # A batch writes every mapping in one pass: each one's time is until its own last rank file was
            # complete, plus writing its own config and manifest.
            seconds = finished.get(out, written_at) - started + time.perf_counter() - documents_started
            converted.append(ConvertResult(out, the_plan, ranks, seconds, manifest, kept=kept))
    return converted


def _headline(jobs: list[WriteJob], total: int) -> str:
    """What a conversion is about to write, for the first progress line of a log."""
    files = sum(len(job.ranks()) for job in jobs)
    where = ", ".join(f"{job.output_dir} ({job.plan.mapping.describe()}, {_precision(job.plan)})" for job in jobs)
    return shorten(f"{count(files, 'rank file')}, {human_bytes(total)} of tensor data into {where}")


def _precision(plan: Plan) -> str:
    scheme = plan.options.weight_only
    return plan.dtype if scheme is None else f"{plan.dtype}, weight-only {scheme.precision} for sm{scheme.arch}"
