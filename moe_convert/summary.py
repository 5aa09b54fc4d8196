"""What a finished command says: the one-line summaries on stderr, and the `--json` documents on stdout.

A line has the same shape whether the run was single, a batch or `--json`; a `--json` document that
reports a failure always has `ok: false`, `exit_code`, `error` and `problems`. Importing this module is
cheap (a usage error's document must not wait for torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .units import count, human_bytes, human_seconds

if TYPE_CHECKING:
    from .convert import ConvertResult
    from .verify import VerifyReport

# Checks every conversion runs before it writes (a failure raises, so a summary lists them all as passed).
PRE_CHECKS = ("mapping", "source", "options", "output_dir", "disk_space")


def converted_line(result: ConvertResult, model_dir: str) -> str:
    """`converted M -> OUT: 4 rank files, 4.21 GB, bfloat16, tp4 pp1 moe_tp2 moe_ep2, 9.2 s` (and the weight-only
    precision, when quantized)."""
    scheme = result.plan.options.weight_only
    dtype = result.plan.dtype if scheme is None else f"{result.plan.dtype} + weight-only {scheme.describe()}"
    return (
        f"converted {model_dir} -> {result.output_dir}: {count(len(result.ranks), 'rank file')}, "
        f"{human_bytes(result.bytes_written)}, {dtype}, {result.plan.mapping.describe()}, "
        f"{human_seconds(result.seconds)}"
    )


def batch_line(results: list[ConvertResult]) -> str:
    """The batch as a whole, after each mapping's own line: the one pass over the source took the longest."""
    files = sum(len(r.ranks) for r in results)
    written = sum(r.bytes_written for r in results)
    seconds = max(r.seconds for r in results)
    return (
        f"batch: {count(len(results), 'mapping')}, {count(files, 'rank file')}, {human_bytes(written)} "
        f"in one pass over the source, {human_seconds(seconds)}"
    )


def result_summary(result: ConvertResult) -> dict[str, Any]:
    """One conversion: where, what, how long, and which checks ran."""
    from .manifest import MANIFEST_FILE

    m = result.manifest
    summary: dict[str, Any] = {
        "ok": True,
        "output_dir": str(result.output_dir),
        "source": m["source"],
        "architecture": m["architecture"],
        "dtype": m["dtype"],
        "weight_only": None if (scheme := result.plan.options.weight_only) is None else scheme.as_dict(),
        "mapping": m["mapping"],
        "files": [
            {"rank": r["rank"], "file": r["file"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in m["ranks"]
        ],
        "total_bytes": m["total_bytes"],
        "config": str(result.output_dir / "config.json"),
        "manifest": str(result.output_dir / MANIFEST_FILE),
        "seconds": round(result.seconds, 3),
        "kept_files": list(result.kept),
        "checks": [{"name": name, "ok": True} for name in (*PRE_CHECKS, "sha256")],
    }
    if result.verify_report is not None:
        summary["verify"] = verify_summary(result.verify_report)
        summary["checks"].append({"name": "verify", "ok": result.verify_report.ok})
        summary["ok"] = result.verify_report.ok
    return summary


def convert_summary(results: list[ConvertResult], *, batch: bool) -> dict[str, Any]:
    """The document `convert --json` prints: one conversion's summary, or a batch of them under `jobs`.

    `ok` is false when `--verify` found problems; `exit_code`, `error` and `problems` then say which.
    """
    jobs = [result_summary(r) for r in results]
    if batch:
        doc: dict[str, Any] = {
            "ok": all(j["ok"] for j in jobs),
            "source": results[0].manifest["source"] if results else None,
            "total_bytes": sum(r.manifest["total_bytes"] for r in results),
            "seconds": round(max((r.seconds for r in results), default=0.0), 3),
            "jobs": jobs,
        }
    else:
        doc = jobs[0]
    if not doc["ok"]:
        reports = [r.verify_report for r in results if r.verify_report is not None and not r.verify_report.ok]
        problems = [f"{r.output_dir}: {p}" if batch else p for r in reports for p in r.problems]
        doc.update(exit_code=1, error="; ".join(r.summary() for r in reports), problems=problems)
    return doc


def error_summary(message: str, exit_code: int, problems: list[str] | None = None) -> dict[str, Any]:
    """What `--json` prints when a command fails: CI reads `ok` and `error` instead of parsing stderr."""
    return {"ok": False, "exit_code": exit_code, "error": message, "problems": list(problems or [message])}


def verify_summary(report: VerifyReport) -> dict[str, Any]:
    """The document `verify --json` prints: `ok`, what was read, and every problem found."""
    doc = {
        "ok": report.ok,
        "output_dir": str(report.output_dir),
        "with_source": report.with_source,
        "rank_files": report.rank_files,
        "bytes_read": report.bytes_read,
        "source_bytes_read": report.source_bytes_read,
        "seconds": round(report.seconds, 3),
        "problems": list(report.problems),
        "summary": report.summary(),
    }
    if not report.ok:
        doc.update(exit_code=1, error=report.summary())
    return doc
