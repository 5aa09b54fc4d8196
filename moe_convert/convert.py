"""The library entry points: plan a conversion, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import progress as progress_lines
from .errors import MappingError, OutputError, collect, shorten
from .execute import DEFAULT_CHUNK_BYTES, RankResult, WriteJob, execute_plans
from .hub import resolve_model_dir
from .jobs import MappingLike, as_request, check_unique_subdirs
from .manifest import MANIFEST_FILE, build_manifest
from .mapping import resolve_mapping
from .plan import ConvertOptions, Plan, SourceTensor, plan_conversion
from .resume import JOURNAL_FILE, Journal, ResumeState, resume_state, run_identity
from .source import SourceCheckpoint, open_source
from .trtllm_config import trtllm_config
from .units import count, human_bytes
from .writer import layout_rank_file, write_json_atomic

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


def plan_source(
    source: SourceCheckpoint,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
) -> Plan:
    mapping = resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size)
    options = ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing)
    headers = {n: SourceTensor(t.dtype, t.shape) for n, t in source.tensors.items()}
    plan = plan_conversion(source.spec, headers, mapping, options)
    for w in plan.warnings:
        log.warning("%s", w)
    return plan


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
    revision: str | None = None,
) -> Plan:
    """Plan a conversion without reading any tensor data: what every rank file will hold.

    Args:
        model_dir: a checkpoint directory (its safetensors headers are read), a hub repo id (only
            config.json and the index are fetched), or a config.json file / a directory holding only
            config.json (tensor shapes implied by the config).
        tp_size, pp_size, moe_tp_size, moe_ep_size, dtype, use_parallel_embedding, embedding_sharding_dim,
        use_embedding_sharing: as for `convert`.
        revision: branch, tag or commit when model_dir is a hub repo id.

    Raises MappingError (with `.problems`, every failing check) when the mapping does not fit the model.
    """
    options = ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing)
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
    force: bool = False,
    revision: str | None = None,
) -> Plan:
    """Write only the config.json a conversion would write (TensorRT-LLM's `--save_config_only`).

    Plans as `plan` does (no tensor data read; a config.json alone is enough) and checks the output dir
    as `convert` does; writes no rank file and no manifest. Arguments as for `convert`. Returns the plan.
    """
    options = ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing)
    mapping = resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size)
    source, the_plan = _plan_input(model_dir, revision, mapping, options)
    model_path = source.config_path.parent if source.source is None else source.source.model_dir
    out = Path(output_dir)
    prepare_output_dir(out, model_path, force=force, needed_bytes=_CONFIG_BYTES)
    write_json_atomic(out / CONFIG_FILE, trtllm_config(the_plan, plan_input_settings(source)))
    return the_plan


def plan_input_settings(source: PlanInput) -> ModelSettings:
    """The settings the output config.json needs (RoPE, norm epsilon, ...), also for a config.json alone."""
    if source.source is not None:
        return source.source.settings
    from .model_config import read_model
    from .source import load_config_json

    return read_model(load_config_json(source.config_path), str(source.config_path))[1]


def open_model(model_dir: str | os.PathLike[str], revision: str | None = None) -> SourceCheckpoint:
    """A local checkpoint directory or a hub repo id (downloaded into, or found in, the hub cache)."""
    resolved = resolve_model_dir(model_dir, revision)
    source = open_source(resolved.path)
    return replace(source, hub_id=resolved.hub_id, revision=resolved.revision)


def source_record(source: SourceCheckpoint) -> dict[str, Any]:
    return {
        "path": str(source.model_dir.resolve()),
        "hub_id": source.hub_id,
        "revision": source.revision,
        "files": [{"name": name, "bytes": size} for name, size in source.file_sizes().items()],
    }


def _refuse_foreign_config(output_dir: Path) -> None:
    """--force replaces our outputs only: a config.json we did not write (a model's?) is not ours to delete."""
    config = output_dir / CONFIG_FILE
    if not config.is_file() or (output_dir / MANIFEST_FILE).is_file() or (output_dir / JOURNAL_FILE).is_file():
        return
    try:
        ours = "mapping" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputError(
            f"--output_dir {output_dir} holds a config.json that moe-convert did not write (a model?); "
            "--force will not delete it: choose another --output_dir"
        )


def prepare_output_dir(
    output_dir: Path, model_dir: Path, *, force: bool, needed_bytes: int, keep_existing: bool = False
) -> None:
    """Refuse unsafe output dirs; with --force, clear our own earlier outputs so nothing stale remains.

    `keep_existing` (--resume) accepts a non-empty dir as it is: the resume logic decides what stays.
    """
    out, src = output_dir.resolve(), model_dir.resolve()
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise OutputError(
            f"--output_dir {output_dir} overlaps --model_dir {model_dir}; choose a directory outside the model"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"--output_dir {output_dir} is a file; choose a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not keep_existing:
        if not force:
            if (output_dir / JOURNAL_FILE).is_file():
                raise OutputError(
                    f"--output_dir {output_dir} holds an interrupted conversion; pass --resume to continue it "
                    "or --force to overwrite it"
                )
            raise OutputError(f"--output_dir {output_dir} exists and is not empty; pass --force to overwrite it")
        _refuse_foreign_config(output_dir)
        # The manifest goes first: a directory without one is never taken for a finished conversion.
        try:
            for name in (MANIFEST_FILE, CONFIG_FILE):
                (output_dir / name).unlink(missing_ok=True)
            for old in output_dir.glob("rank*.safetensors*"):
                old.unlink()
        except OSError as e:
            raise OutputError(f"--output_dir {output_dir}: cannot remove {e.filename}: {e.strerror or e}") from e
    # The directories we create are removed again if a check below fails: a refused run leaves nothing.
    created = [d for d in (output_dir, *output_dir.parents) if not d.exists()]
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--output_dir {output_dir}: cannot create: {e.strerror or e}") from e
        _check_writable(output_dir)
        free = shutil.disk_usage(output_dir).free
        if free < needed_bytes:
            raise OutputError(
                f"--output_dir {output_dir}: needs {human_bytes(needed_bytes)} but only {human_bytes(free)} is free; "
                "free space or choose another directory"
            )
    except OutputError:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _check_writable(directory: Path) -> None:
    """Create and remove a file: os.access says yes to root even where writes fail (immutable, root_squash)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-convert-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--output_dir {directory} is not writable: {e.strerror or e}") from e


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
        workers: write threads; each owns some rank files and reads, hashes and writes their bytes (default:
            two per core, 8 to 16).
        direct_io: write with O_DIRECT, past the page cache, where the file system allows (False: buffered).
        force: allow a non-empty output dir (our earlier outputs in it are replaced).
        progress: show a progress bar on stderr.
        chunk_bytes: the most bytes of one source tensor held in memory at once.
        revision: branch, tag or commit when model_dir is a hub repo id.
        resume: continue an interrupted conversion into output_dir: rank files its journal records as
            complete (size and sha256 re-checked) are kept, the rest written. Refused (UsageError naming
            what differs) if the options or source differ; with `force`, such a dir is started over.
        verify: afterwards, check every output byte against the source (`moe_convert.verify.verify`);
            raises VerifyError listing the problems, if any.
    """
    started = time.perf_counter()
    source = open_model(model_dir, revision)
    the_plan = plan_source(
        source,
        tp_size=tp_size,
        pp_size=pp_size,
        moe_tp_size=moe_tp_size,
        moe_ep_size=moe_ep_size,
        dtype=dtype,
        use_parallel_embedding=use_parallel_embedding,
        embedding_sharding_dim=embedding_sharding_dim,
        use_embedding_sharing=use_embedding_sharing,
    )
    jobs = [(the_plan, Path(output_dir))]
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
            a string (`"tp=8,moe_ep=8"`), a MappingRequest or a resolved Mapping.

    `resume` and `verify` work on each mapping's subdirectory as for `convert`.

    Returns one ConvertResult per mapping, in order; `seconds` is the whole batch's time.
    """
    started = time.perf_counter()
    requests = [as_request(m) for m in mappings]
    if not requests:
        raise MappingError("convert_batch: no mappings given; pass at least one")
    check_unique_subdirs(requests)
    source = open_model(model_dir, revision)
    plans, problems = [], []
    for r in requests:
        try:
            plans.append(
                plan_source(
                    source,
                    tp_size=r.tp_size,
                    pp_size=r.pp_size,
                    moe_tp_size=r.moe_tp_size,
                    moe_ep_size=r.moe_ep_size,
                    dtype=dtype,
                    use_parallel_embedding=use_parallel_embedding,
                    embedding_sharding_dim=embedding_sharding_dim,
                    use_embedding_sharing=use_embedding_sharing,
                )
            )
        except MappingError as e:
            problems += [f"{r.describe()}: {p}" for p in e.problems or [str(e)]]
    collect(problems, MappingError, "the batch's mappings do not fit the model")
    jobs = [(p, Path(output_dir) / r.output_subdir()) for p, r in zip(plans, requests, strict=True)]
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
    """Prepare every output dir, write every plan's rank files in one source pass, then configs and manifests."""
    record = source_record(source)
    identities = [run_identity(source, record, p) for p, _ in jobs]
    states: list[ResumeState | None] = [
        resume_state(out, p, ident, force=force) if resume else None
        for (p, out), ident in zip(jobs, identities, strict=True)
    ]
    needed = [
        sum(layout_rank_file(r).size for r in p.ranks) - (st.kept_bytes if st else 0)
        for (p, _), st in zip(jobs, states, strict=True)
    ]
    for (_, out), n, st in zip(jobs, needed, states, strict=True):
        prepare_output_dir(out, source.model_dir, force=force, needed_bytes=n, keep_existing=st is not None)
    _check_combined_space([out for _, out in jobs], needed)
    # The journal exists before any rank file does, so every interrupted run can be resumed.
    journals = {out: Journal(out, ident, st) for (_, out), ident, st in zip(jobs, identities, states, strict=True)}
    for (_, out), st in zip(jobs, states, strict=True):
        journals[out].begin(st)
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
    where = ", ".join(f"{job.output_dir} ({job.plan.mapping.describe()}, {job.plan.dtype})" for job in jobs)
    return shorten(f"{count(files, 'rank file')}, {human_bytes(total)} of tensor data into {where}")


def _check_combined_space(dirs: list[Path], needed: list[int]) -> None:
    """Several output dirs on one filesystem must fit together (each was checked alone)."""
    by_device: dict[int, tuple[Path, int]] = {}
    for d, n in zip(dirs, needed, strict=True):
        dev = os.stat(d).st_dev
        first, total = by_device.get(dev, (d, 0))
        by_device[dev] = (first, total + n)
    for d, total in by_device.values():
        free = shutil.disk_usage(d).free
        if free < total:
            raise OutputError(
                f"--output_dir {d.parent}: the batch needs {human_bytes(total)} but only {human_bytes(free)} "
                "is free; free space, convert fewer mappings at once, or choose another directory"
            )
