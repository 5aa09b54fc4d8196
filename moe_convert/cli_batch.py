"""The CLI's dry run, batch and --json paths (`convert --dry_run/--mapping/--job_file/--json`, `plan`)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click
from click.core import ParameterSource

from .errors import MoeConvertError, UsageError
from .jobs import MappingRequest, parse_mapping, read_job_file

log = logging.getLogger("moe_convert")

SIZE_OPTIONS = ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size")
# Options a job file may set; the same names as the CLI's parameters.
JOB_OPTIONS = (
    "model_dir",
    "revision",
    "output_dir",
    "dtype",
    "use_parallel_embedding",
    "embedding_sharding_dim",
    "workers",
    "no_direct_io",
    "force",
)


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _arguments(ctx: click.Context) -> tuple[dict[str, Any], list[MappingRequest] | None]:
    """The command's options merged with a job file's (the command line wins), and the batch's mappings."""
    params = dict(ctx.params)
    requests: list[MappingRequest] | None = None
    if params.get("job_file"):
        job = read_job_file(params["job_file"])
        values = {"model_dir": job.model_dir, "output_dir": job.output_dir, **job.options}
        for name in JOB_OPTIONS:
            if name in values and not _given(ctx, name):
                params[name] = values[name]
        requests = list(job.mappings)
    if params.get("mappings"):
        requests = [parse_mapping(m) for m in params["mappings"]]
    if requests is not None:
        sizes = [f"--{n}" for n in SIZE_OPTIONS if _given(ctx, n)]
        if sizes:
            raise UsageError(
                f"{', '.join(sizes)} cannot be combined with --mapping / --job_file; put the sizes in each "
                "mapping (e.g. --mapping tp=8,moe_ep=8)"
            )
    if not params.get("model_dir"):
        raise UsageError("--model_dir is required (or a --job_file that names model_dir)")
    return params, requests


def run(ctx: click.Context, mode: str, *, json_out: bool, quiet: bool) -> None:
    """`plan` (dry run) or `convert`, single or batch; with json_out, one document on stdout even on error."""
    try:
        params, requests = _arguments(ctx)
        if mode == "plan":
            _plan(params, requests, json_out)
        else:
            _convert(params, requests, json_out, quiet)
    except MoeConvertError as e:
        if json_out:
            from .summary import error_summary

            _emit(error_summary(str(e), e.exit_code, e.problems))
        raise


def _emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


def _plan(params: dict[str, Any], requests: list[MappingRequest] | None, json_out: bool) -> None:
    from .dryrun import dry_run

    report = dry_run(
        params["model_dir"],
        tp_size=params["tp_size"],
        pp_size=params["pp_size"],
        moe_tp_size=params["moe_tp_size"],
        moe_ep_size=params["moe_ep_size"],
        mappings=requests,
        output_dir=params.get("output_dir"),
        dtype=params["dtype"],
        use_parallel_embedding=params["use_parallel_embedding"],
        embedding_sharding_dim=params["embedding_sharding_dim"],
        workers=params.get("workers"),
        force=params.get("force", False),
        revision=params.get("revision"),
    )
    if json_out:
        _emit(report.document())
    else:
        click.echo(report.text(), nl=False)
    if report.exit_code:
        sys.exit(report.exit_code)


def _convert(params: dict[str, Any], requests: list[MappingRequest] | None, json_out: bool, quiet: bool) -> None:
    from .convert import convert, convert_batch
    from .summary import convert_summary

    if not params.get("output_dir"):
        raise UsageError("--output_dir is required (or a --job_file that names output_dir)")
    common = {
        "dtype": params["dtype"],
        "use_parallel_embedding": params["use_parallel_embedding"],
        "embedding_sharding_dim": params["embedding_sharding_dim"],
        "workers": params["workers"],
        "direct_io": not params.get("no_direct_io", False),
        "force": params["force"],
        "progress": not quiet,
        "revision": params.get("revision"),
        "resume": params.get("resume", False),
        "verify": params.get("verify", False),
        **({"chunk_bytes": params["chunk_bytes"]} if params.get("chunk_bytes") else {}),
    }
    if requests is None:
        sizes = {n: params[n] for n in SIZE_OPTIONS}
        results = [convert(params["model_dir"], params["output_dir"], **sizes, **common)]
    else:
        results = convert_batch(params["model_dir"], params["output_dir"], requests, **common)
    for r in results:
        m = r.plan.mapping
        log.info(
            "converted -> %s: %d rank files, %.2f GB, %s, %s, %.1f s",
            r.output_dir,
            len(r.ranks),
            r.bytes_written / 1e9,
            r.plan.dtype,
            m.label(),
            r.seconds,
        )
    if json_out:
        _emit(convert_summary(results, batch=requests is not None))
