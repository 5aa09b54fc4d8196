"""Verify a converted checkpoint against its manifest and, given the source, against every source byte.

The work is split by what it needs: verify_manifest.py checks what manifest.json and config.json
determine (re-planning from the manifest's own model description, or from the source), verify_files.py
reads each rank file once (size, header, sha256, padding, digests), and verify_source.py reads each used
source tensor once and compares every piece. The two reading passes run side by side and meet as digests;
memory stays bounded.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MoeConvertError, VerifyError, collect
from .execute import DEFAULT_CHUNK_BYTES
from .fields import Malformed, as_dict, show
from .manifest import MANIFEST_FILE, model_record, parse_options, parse_ranks, read_manifest
from .model_config import settings_by_transformers
from .outdir import writer_pid
from .plan import Plan
from .replan import open_model, plan_source
from .source import SourceCheckpoint
from .units import count, human_bytes
from .verify_files import FileDigests, check_rank_file, compare_replicas, replicated_tensors
from .verify_findings import Findings, PieceKey
from .verify_manifest import check_stray_files, check_structure, compare_with_plan, read_output_config, rederive
from .verify_source import compare_pieces, hash_source, source_work


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. `problems` is empty when the output is good."""

    output_dir: Path
    problems: tuple[str, ...]
    rank_files: int
    bytes_read: int  # rank file bytes
    source_bytes_read: int  # 0 without a source
    seconds: float
    with_source: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        size = f"{count(self.rank_files, 'rank file')}, {human_bytes(self.bytes_read)}"
        if not self.ok:
            return f"{self.output_dir}: {count(len(self.problems), 'problem')} found ({size}, {self.seconds:.1f} s)"
        what = (
            f"every byte matches the source ({human_bytes(self.source_bytes_read)} read) and the manifest"
            if self.with_source
            else "headers, sizes and sha256 match the manifest, which matches its own model and mapping"
        )
        return f"verified {self.output_dir}: {size}, {what} ({self.seconds:.1f} s)"


def verify(
    output_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> VerifyReport:
    """Check a converted checkpoint; every problem found is reported, none raised.

    Args:
        output_dir: a moe-convert output (rank files, config.json, manifest.json).
        model_dir: the source checkpoint (a directory or a hub repo id); given, every output byte is
            compared with it.
        chunk_bytes: the most bytes of one source tensor held in memory at once.
        progress: show a progress bar on stderr (when it is a terminal).
    """
    started = time.perf_counter()
    out = Path(output_dir)
    found = Findings()
    try:
        _run(out, model_dir, chunk_bytes, progress, found)
    finally:
        found.close_bar()
    return VerifyReport(
        output_dir=out,
        problems=tuple(found.problems),
        rank_files=found.rank_files,
        bytes_read=found.bytes_read,
        source_bytes_read=found.source_bytes_read,
        seconds=time.perf_counter() - started,
        with_source=model_dir is not None,
    )


def verify_or_raise(
    output_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> VerifyReport:
    """`verify`, raising VerifyError with every problem if there is any."""
    report = verify(output_dir, model_dir, **kwargs)
    collect(list(report.problems), VerifyError, f"{output_dir} failed verification")
    return report


def _run(
    out: Path, model_dir: str | os.PathLike[str] | None, chunk_bytes: int, progress: bool, found: Findings
) -> None:
    if not out.is_dir():
        found.problem(f"{out}: not a directory; nothing to verify")
        return
    pid = writer_pid(out)
    if pid is not None:
        found.problem(f"{out}: a conversion (pid {pid}) is writing into it right now; verify once it has finished")
        return
    try:
        manifest = read_manifest(out)
    except VerifyError as e:
        found.problem(str(e))
        return
    ranks, malformed = parse_ranks(manifest)
    for p in malformed:
        found.problem(p)
    found.rank_files = len(ranks)
    config = read_output_config(out, found)
    source = None
    if model_dir is None:
        plan = rederive(manifest, config, found)
    else:
        try:
            source = open_model(model_dir)
        except MoeConvertError as e:
            found.problem(f"cannot open the source: {e}")
            return
        plan, same_model = _against_source(manifest, config, source, found)
        if not same_model:  # its bytes cannot be compared: check the output on its own, as without a source
            source = None
            plan = rederive(manifest, config, found)
    check_structure(manifest, ranks, config, plan, found)
    check_stray_files(out, ranks, found)
    work = source_work(ranks, source, found) if source is not None else {}
    if progress:
        rank_bytes = sum(r.bytes for r in ranks)
        source_bytes = sum(source.tensors[n].nbytes for n in work) if source else 0
        found.start_bar(
            rank_bytes + source_bytes,
            f"{count(len(ranks), 'rank file')}, {human_bytes(rank_bytes)} in {out}"
            + (f", against {human_bytes(source_bytes)} of the source" if source else ""),
        )
    replicated = replicated_tensors(ranks)
    expected: dict[PieceKey, str] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-verify-source") as pool:
        # The source pass and the rank-file pass run side by side (hashing and reads drop the GIL).
        source_pass = pool.submit(hash_source, source, work, chunk_bytes, found) if source is not None else None
        digests: dict[int, FileDigests] = {}
        for r in ranks:
            d = check_rank_file(out, r, replicated.get(r.index, set()), source is not None, found)
            if d is not None:
                digests[r.index] = d
        if source_pass is not None:
            try:
                expected = source_pass.result()
            except MoeConvertError as e:
                found.problem(f"reading the source failed: {e}")
    compare_replicas(ranks, digests, found)
    if source is not None:
        compare_pieces(ranks, digests, expected, found)


def _against_source(
    manifest: dict[str, Any], config: dict[str, Any] | None, source: SourceCheckpoint, found: Findings
) -> tuple[Plan | None, bool]:
    """Re-plan from the source with the manifest's mapping and options: the manifest must be that plan.
    Also says whether the source is the model the manifest records (its tensors' names, dtypes and shapes):
    a source of another shape cannot be compared byte by byte, and would only bury the one finding that
    matters under hundreds of consequences."""
    mapping = as_dict(manifest.get("mapping"))
    try:
        options = parse_options(manifest.get("options"))
    except Malformed as bad:
        found.problem(f"{MANIFEST_FILE}: {bad}")
        return None, True
    recorded = as_dict(manifest.get("source")).get("files")
    now = [{"name": name, "bytes": size} for name, size in source.file_sizes().items()]
    if recorded != now:
        found.problem(
            f"{MANIFEST_FILE}: the source files recorded ({show(recorded, 200)}) differ from "
            f"{source.model_dir}'s ({show(now, 200)}); is this the source it was converted from?"
        )
    try:
        plan = plan_source(
            source,
            tp_size=mapping.get("tp_size", 1),
            pp_size=mapping.get("pp_size", 1),
            moe_tp_size=mapping.get("moe_tp_size"),
            moe_ep_size=mapping.get("moe_ep_size"),
            options=options,
        )
    except MoeConvertError as e:
        found.problem(f"cannot re-plan from the source with the manifest's mapping and options: {e}")
        return None, True
    if not _same_model(manifest, plan, source, found):
        return None, False
    try:  # through transformers, whatever the conversion read them with: the cross-check of model_config.py's
        settings = settings_by_transformers(source.spec.config, source.spec, str(source.model_dir / "config.json"))
    except MoeConvertError as e:
        found.problem(str(e))
        return plan, True
    compare_with_plan(manifest, config, plan, settings, "the source and options give", found)
    return plan, True


def _same_model(manifest: dict[str, Any], plan: Plan, source: SourceCheckpoint, found: Findings) -> bool:
    """The source tensors the plan uses are those the manifest records as used, with their dtypes and shapes."""
    recorded = as_dict(as_dict(manifest.get("model")).get("tensors"))
    now = model_record(plan)["tensors"]
    differ = sorted(n for n in recorded.keys() | now.keys() if recorded.get(n) != now.get(n))
    if not differ:
        return True
    first = differ[0]
    found.problem(
        f"{source.model_dir} is not the model this output was converted from: the conversion would use "
        f"{count(len(now), 'source tensor')}, {MANIFEST_FILE} records {len(recorded)}, {len(differ)} differ (first: "
        f"{first}, recorded {show(recorded.get(first, '(none)'))}, in the source {show(now.get(first, '(none)'))}); "
        "its bytes were not compared. Verify against the model it was converted from, or without --model_dir"
    )
    return False
