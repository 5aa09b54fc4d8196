"""The library entry points: plan a conversion, run it. The CLI is a thin layer over these."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError
from .execute import DEFAULT_CHUNK_BYTES, RankResult, execute_plan
from .manifest import MANIFEST_FILE, build_manifest
from .mapping import resolve_mapping
from .plan import ConvertOptions, Plan, SourceTensor, plan_conversion
from .source import SourceCheckpoint, open_source
from .trtllm_config import trtllm_config
from .writer import PARTIAL_SUFFIX, write_json_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ConvertResult:
    output_dir: Path
    plan: Plan
    ranks: list[RankResult]
    seconds: float
    manifest: dict[str, Any]

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
) -> Plan:
    mapping = resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size)
    options = ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim)
    headers = {n: SourceTensor(t.dtype, t.shape) for n, t in source.tensors.items()}
    plan = plan_conversion(source.spec, headers, mapping, options)
    for w in plan.warnings:
        log.warning("%s", w)
    return plan


def plan(model_dir: str | os.PathLike[str], **options: Any) -> Plan:
    """Plan a conversion from headers alone (no tensor data is read). Options are those of `convert`."""
    return plan_source(open_source(Path(model_dir)), **options)


def source_record(source: SourceCheckpoint) -> dict[str, Any]:
    return {
        "path": str(source.model_dir.resolve()),
        "hub_id": None,
        "revision": None,
        "files": [{"name": name, "bytes": size} for name, size in source.file_sizes().items()],
    }


def prepare_output_dir(output_dir: Path, model_dir: Path, *, force: bool, needed_bytes: int) -> None:
    """Refuse unsafe output dirs; with --force, clear our own earlier outputs so nothing stale remains."""
    out, src = output_dir.resolve(), model_dir.resolve()
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise OutputError(
            f"--output_dir {output_dir} overlaps --model_dir {model_dir}; choose a directory outside the model"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"--output_dir {output_dir} is a file; choose a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not force:
            raise OutputError(f"--output_dir {output_dir} exists and is not empty; pass --force to overwrite it")
        # The manifest goes first: a directory without one is never taken for a finished conversion.
        for name in (MANIFEST_FILE, CONFIG_FILE):
            (output_dir / name).unlink(missing_ok=True)
        for old in output_dir.glob("rank*.safetensors*"):
            old.unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--output_dir {output_dir}: cannot create: {e.strerror or e}") from e
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"--output_dir {output_dir} is not writable")
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OutputError(
            f"--output_dir {output_dir}: needs {needed_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
            "is free; free space or choose another directory"
        )


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
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ConvertResult:
    """Convert a local Hugging Face Mixtral checkpoint into TensorRT-LLM rank files and a manifest.

    Args:
        model_dir: directory with config.json and safetensors shards.
        output_dir: where rank{N}.safetensors, config.json and manifest.json go.
        tp_size, pp_size: tensor- and pipeline-parallel sizes (world size is their product).
        moe_tp_size, moe_ep_size: how the TP group is re-sliced for experts; None resolves as in the spec.
        dtype: auto, float16, bfloat16 or float32 (the router stays float32).
        use_parallel_embedding, embedding_sharding_dim: split the embedding over TP on dim 0 or 1.
        workers: threads that overlap reading, casting and writing.
        force: allow a non-empty output dir (our earlier outputs in it are replaced).
        progress: show a progress bar on stderr.
        chunk_bytes: the most bytes of one source tensor held in memory at once, per worker.
    """
    started = time.perf_counter()
    source = open_source(Path(model_dir))
    the_plan = plan_source(
        source,
        tp_size=tp_size,
        pp_size=pp_size,
        moe_tp_size=moe_tp_size,
        moe_ep_size=moe_ep_size,
        dtype=dtype,
        use_parallel_embedding=use_parallel_embedding,
        embedding_sharding_dim=embedding_sharding_dim,
    )
    out = Path(output_dir)
    needed = sum(build_manifest(the_plan, {})["ranks"][i]["bytes"] for i in range(len(the_plan.ranks)))
    prepare_output_dir(out, source.model_dir, force=force, needed_bytes=needed)
    bar = _progress_bar(the_plan.total_data_bytes, progress)
    try:
        ranks = execute_plan(
            the_plan,
            source.tensors,
            out,
            workers=workers,
            chunk_bytes=chunk_bytes,
            on_bytes=bar.update if bar else lambda n: None,
            on_rank_done=_log_rank_done(bar),
        )
    finally:
        if bar:
            bar.close()
    manifest = build_manifest(the_plan, source_record(source), ranks)
    write_json_atomic(out / CONFIG_FILE, trtllm_config(the_plan))
    # Written last: its presence says the conversion finished.
    write_json_atomic(out / MANIFEST_FILE, manifest)
    seconds = time.perf_counter() - started
    return ConvertResult(out, the_plan, ranks, seconds, manifest)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr)


def _log_rank_done(bar: Any) -> Any:
    def done(output_dir: Path, r: RankResult) -> None:
        if bar is None:
            log.info("wrote %s (%.2f GB, sha256 %s)", output_dir / r.file, r.bytes / 1e9, r.sha256[:16])

    return done


def remove_partials(output_dir: Path) -> None:
    for p in output_dir.glob(f"*{PARTIAL_SUFFIX}"):
        p.unlink(missing_ok=True)
