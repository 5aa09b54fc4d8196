"""The work of `convert` and `plan`: one mapping or a batch (`--mapping`, `--job_file`), a dry run, a
config.json alone, and what is printed: human lines on stderr, or one `--json` document on stdout."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from .errors import ConfigError, MoeConvertError, UsageError, collect
from .jobs import JobFile, MappingRequest, OptionCheck, load_job_file, parse_mapping

if TYPE_CHECKING:
    from .convert import ConvertResult

log = logging.getLogger("moe_convert")

SIZE_OPTIONS = ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size")
# Options that change what is planned and written (passed to every library call alike).
PLAN_OPTIONS = (
    "dtype",
    "use_parallel_embedding",
    "embedding_sharding_dim",
    "use_embedding_sharing",
    "use_weight_only",
    "weight_only_precision",
    "weight_only_arch",
    "weight_only_sm90_layout",
)
# Options a job file may set; the same names as the CLI's parameters.
JOB_OPTIONS = ("model_dir", "revision", "output_dir", *PLAN_OPTIONS, "workers", "no_direct_io", "force")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def run(
    ctx: click.Context, mode: str, *, json_out: bool, progress: bool, config_flags: dict[str, Any] | None = None
) -> None:
    """`plan` (dry run), `config` (config.json only) or `convert`, single or batch.

    `config_flags` are TensorRT-LLM flags that restate config.json values: checked before anything is
    written. Errors raise; the CLI turns them into one line (and, with json_out, one document).
    """
    if config_flags and not (ctx.params.get("model_dir") or ctx.params.get("job_file")):
        from .trtllm_flags import spell

        given = ", ".join(spell(n, v) for n, v in config_flags.items())
        raise UsageError(
            f"{given}: TensorRT-LLM builds a model from these when no checkpoint is given, which moe-convert "
            "does not do; pass --model_dir (a checkpoint, or a config.json alone with --save_config_only)"
        )
    params, requests = _arguments(ctx)
    if config_flags:
        _check_config_flags(params, config_flags)
    if mode == "plan":
        _plan(params, requests, json_out)
    elif mode == "config":
        _save_config(params, requests, json_out)
    else:
        _convert(params, requests, json_out, progress)


def _arguments(ctx: click.Context) -> tuple[dict[str, Any], list[MappingRequest] | None]:
    """The command's options merged with a job file's (the command line wins), and the batch's mappings.

    A job file's values are checked by the command line's own option types, and every problem found
    (the file's, its options', its mappings' and, once those are read, whether the mappings fit the
    model) is reported together.
    """
    params = dict(ctx.params)
    requests: list[MappingRequest] | None = None
    if params.get("job_file"):
        job, problems = load_job_file(params["job_file"], _option_check(ctx))
        if job is not None:
            values = {"model_dir": job.model_dir, "output_dir": job.output_dir, **job.options}
            for name in JOB_OPTIONS:
                if name in values and not _given(ctx, name):
                    params[name] = values[name]
            requests = list(job.mappings)
        if problems and job is not None:
            problems += _fit_problems(params, job)
        where = f"--job_file {params['job_file']}"
        collect(problems, ConfigError, f"{where} is invalid", where=where)
    if params.get("mappings"):
        requests, problems = [], []
        for text in params["mappings"]:
            try:
                requests.append(parse_mapping(text))
            except UsageError as e:
                problems += e.problems
        collect(problems, UsageError, "--mapping is invalid")
    if requests is not None:
        sizes = [f"--{n}" for n in SIZE_OPTIONS if _given(ctx, n)]
        if sizes:
            raise UsageError(
                f"{', '.join(sizes)} cannot be combined with --mapping / --job_file; put the sizes in each "
                "mapping (e.g. --mapping tp=8,moe_ep=8)"
            )
    if not params.get("model_dir"):
        raise UsageError("--model_dir is required (or a --job_file that names model_dir)")
    _weight_only_arguments(params, requests)
    return params, requests


def _weight_only_arguments(params: dict[str, Any], requests: list[MappingRequest] | None) -> None:
    """TensorRT-LLM's int8 default; an arch or layout with nothing to quantize is refused (it would be silently
    ignored)."""
    params["weight_only_precision"] = params.get("weight_only_precision") or "int8"
    quantizing = params.get("use_weight_only") or any(
        r.weight_only_precision not in (None, "none") for r in requests or []
    )
    given = [f"--{n} {params[n]}" for n in ("weight_only_arch", "weight_only_sm90_layout") if params.get(n)]
    if given and not quantizing:
        raise UsageError(
            f"{' and '.join(given)}: nothing is quantized; add --use_weight_only (or a --mapping precision=int8)"
        )


def _option_check(ctx: click.Context) -> OptionCheck:
    """A job file's option value checked by the same click type as on the command line."""
    by_name = {p.name: p for p in ctx.command.params}

    def check(name: str, value: Any) -> str | None:
        param = by_name.get(name)
        if param is None or value is None:
            return None
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            return e.message.rstrip(".")
        return None

    return check


def _fit_problems(params: dict[str, Any], job: JobFile) -> list[str]:
    """Whether the job's mappings fit the model (and the output dir is usable), found by a dry run."""
    from .dryrun import dry_run

    try:
        report = dry_run(
            params["model_dir"],
            mappings=job.mappings,
            output_dir=params.get("output_dir"),
            workers=params.get("workers"),
            force=params.get("force", False),
            revision=params.get("revision"),
            **{k: params[k] for k in PLAN_OPTIONS},
        )
    except MoeConvertError as e:
        return e.problems
    return report.problems


def _check_config_flags(params: dict[str, Any], flags: dict[str, Any]) -> None:
    """TensorRT-LLM's config-from-flags values must agree with the config.json this conversion writes."""
    from .config_only import open_for_plan
    from .convert import plan_input_settings
    from .mapping import Mapping
    from .plan import convert_options, plan_conversion
    from .trtllm_config import trtllm_config
    from .trtllm_flags import disagreements

    source = open_for_plan(params["model_dir"], revision=params.get("revision"), dtype=params["dtype"])
    options = convert_options(**{k: params[k] for k in PLAN_OPTIONS})
    # These keys do not depend on the mapping: any plan's config.json has the same values.
    the_plan = plan_conversion(source.spec, source.headers, Mapping(), options)
    config = trtllm_config(the_plan, plan_input_settings(source))
    collect(disagreements(flags, config), UsageError, "TensorRT-LLM flags disagree with the checkpoint's config.json")


def _emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


def _sizes(params: dict[str, Any]) -> dict[str, Any]:
    return {n: params[n] for n in SIZE_OPTIONS}


def _plan(params: dict[str, Any], requests: list[MappingRequest] | None, json_out: bool) -> None:
    from .dryrun import dry_run

    report = dry_run(
        params["model_dir"],
        **_sizes(params),
        mappings=requests,
        output_dir=params.get("output_dir"),
        workers=params.get("workers"),
        force=params.get("force", False),
        revision=params.get("revision"),
        **{k: params[k] for k in PLAN_OPTIONS},
    )
    if json_out:
        doc = report.document()
        if not report.ok:
            problems = report.problems
            error = problems[0] if len(problems) == 1 else f"{len(problems)} checks failed: " + "; ".join(problems)
            doc.update(exit_code=report.exit_code, error=error, problems=problems)
        _emit(doc)
    else:
        click.echo(report.text(), nl=False)
    if report.exit_code:
        sys.exit(report.exit_code)


def _save_config(params: dict[str, Any], requests: list[MappingRequest] | None, json_out: bool) -> None:
    from .convert import CONFIG_FILE, save_config

    if requests is not None:
        raise UsageError("--save_config_only writes one config.json; it does not combine with --mapping / --job_file")
    others = [f"--{n}" for n in ("resume", "verify") if params.get(n)]
    if others:
        raise UsageError(f"--save_config_only writes no rank files, so {' and '.join(others)} cannot apply")
    out = Path(params["output_dir"])
    the_plan = save_config(
        params["model_dir"],
        out,
        **_sizes(params),
        force=params["force"],
        revision=params.get("revision"),
        **{k: params[k] for k in PLAN_OPTIONS},
    )
    log.info("wrote %s (--save_config_only: no rank files, no manifest)", out / CONFIG_FILE)
    if json_out:
        _emit(
            {
                "ok": True,
                "output_dir": str(out),
                "config": str(out / CONFIG_FILE),
                "config_only": True,
                "dtype": the_plan.dtype,
                "mapping": the_plan.mapping.as_dict(),
            }
        )


def _convert(params: dict[str, Any], requests: list[MappingRequest] | None, json_out: bool, progress: bool) -> None:
    from .convert import convert, convert_batch
    from .summary import batch_line, convert_summary, converted_line

    common = {
        **{k: params[k] for k in PLAN_OPTIONS},
        "workers": params["workers"],
        "direct_io": not params.get("no_direct_io", False),
        "force": params["force"],
        "progress": progress,
        "revision": params.get("revision"),
        "resume": params.get("resume", False),
        **({"chunk_bytes": params["chunk_bytes"]} if params.get("chunk_bytes") else {}),
    }
    if requests is None:
        results = [convert(params["model_dir"], params["output_dir"], **_sizes(params), **common)]
    else:
        results = convert_batch(params["model_dir"], params["output_dir"], requests, **common)
    for r in results:
        if len(r.kept) < len(r.ranks):  # else --resume found it complete and said so
            log.info("%s", converted_line(r, params["model_dir"]))
    if len(results) > 1:
        log.info("%s", batch_line(results))
    if params.get("verify"):
        results = [_verified(r, json_out, progress) for r in results]
    doc = convert_summary(results, batch=requests is not None)
    if json_out:
        _emit(doc)
    if not doc["ok"]:
        sys.exit(doc["exit_code"])


def _verified(result: ConvertResult, json_out: bool, progress: bool) -> ConvertResult:
    """--verify: every output byte against the source; problems printed as `moe-convert verify` does."""
    from .cli import print_verify_report
    from .verify import verify

    report = verify(result.output_dir, result.manifest["source"]["path"], progress=progress)
    if not json_out:
        print_verify_report(report, quiet=not progress)
    return replace(result, verify_report=report)
