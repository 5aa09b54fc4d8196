"""The `--json` summary of a conversion: one document on stdout for CI (logs and progress go to stderr)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .convert import ConvertResult
from .manifest import MANIFEST_FILE

if TYPE_CHECKING:
    from .verify import VerifyReport

# Checks every conversion runs before it writes (a failure raises, so a summary lists them all as passed).
PRE_CHECKS = ("mapping", "source", "options", "output_dir", "disk_space")


def result_summary(result: ConvertResult) -> dict[str, Any]:
    """One conversion: where, what, how long, and which checks ran."""
    m = result.manifest
    summary: dict[str, Any] = {
        "ok": True,
        "output_dir": str(result.output_dir),
        "source": m["source"],
        "architecture": m["architecture"],
        "dtype": m["dtype"],
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
    return summary


def convert_summary(results: list[ConvertResult], *, batch: bool) -> dict[str, Any]:
    """The document `convert --json` prints: one conversion's summary, or a batch of them under `jobs`."""
    if not batch:
        return result_summary(results[0])
    return {
        "ok": True,
        "source": results[0].manifest["source"] if results else None,
        "total_bytes": sum(r.manifest["total_bytes"] for r in results),
        "seconds": round(max((r.seconds for r in results), default=0.0), 3),
        "jobs": [result_summary(r) for r in results],
    }


def error_summary(message: str, exit_code: int, problems: list[str] | None = None) -> dict[str, Any]:
    """What `--json` prints when a command fails: CI reads `ok` and `error` instead of parsing stderr."""
    return {"ok": False, "exit_code": exit_code, "error": message, "problems": list(problems or [])}


def verify_summary(report: VerifyReport) -> dict[str, Any]:
    """The document `verify --json` prints: `ok`, what was read, and every problem found."""
    return {
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
