"""Command line: parse options, call the library, turn domain errors into one line and an exit code."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from . import __version__
from .errors import MoeConvertError, UsageError
from .example import DEFAULT_FAMILY, family_names
from .safe_text import OneLineFormatter, one_line

F = TypeVar("F", bound=Callable[..., Any])

MAPPING_HELP = (
    "MoE sizes resolve as in TensorRT-LLM: neither given -> moe_tp_size = tp_size, moe_ep_size = 1; "
    "only one given -> the other is tp_size divided by it. moe_tp_size * moe_ep_size must equal tp_size."
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 error (bad input, failed check, write failure); 2 usage or mapping error; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)

log = logging.getLogger("moe_convert")


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _handle_errors(fn: F) -> F:
    """One line on stderr and the error's exit code; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except MoeConvertError as e:
            if debug:
                raise
            click.echo(f"error: {one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            if debug:
                raise
            click.echo(
                "interrupted: temporary files removed, no output file was left incomplete "
                "(a conversion continues with --resume)",
                err=True,
            )
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preempted CI job, `kill`), handled like Ctrl-C; exits 128 + 15."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _opt(*names: str, **kwargs: Any) -> Callable[[F], F]:
    """An option spelled the TensorRT-LLM way (`--tp_size`) that also accepts `--tp-size`."""
    spellings = list(names)
    for n in names:
        if n.startswith("--") and "_" in n:
            spellings.append(n.replace("_", "-"))
    return click.option(*spellings, **kwargs)


def common_options(fn: F) -> F:
    for decorator in reversed(
        [
            _opt("--quiet", is_flag=True, help="Only warnings and errors on stderr; no progress bar."),
            _opt("--debug", is_flag=True, help="Debug logging and full tracebacks on errors."),
        ]
    ):
        fn = decorator(fn)
    return fn


def mapping_options(fn: F) -> F:
    for decorator in reversed(
        [
            _opt(
                "--model_dir",
                default=None,
                help="Hugging Face checkpoint directory (config.json + safetensors), or a hub repo id "
                "(owner/name) resolved through the hub cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN apply).",
            ),
            _opt("--revision", default=None, help="Branch, tag or commit of a hub repo id (default: main)."),
            _opt("--tp_size", type=int, default=1, show_default=True, help="Tensor-parallel size."),
            _opt("--pp_size", type=int, default=1, show_default=True, help="Pipeline-parallel size."),
            _opt(
                "--moe_tp_size",
                type=int,
                default=None,
                help="Tensor-parallel size of the experts. " + MAPPING_HELP,
            ),
            _opt("--moe_ep_size", type=int, default=None, help="Expert-parallel size. " + MAPPING_HELP),
            _opt(
                "--dtype",
                type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
                default="auto",
                show_default=True,
                help="Output dtype; auto takes config.json's (float32 becomes float16). Routers stay float32.",
            ),
            _opt("--use_parallel_embedding", is_flag=True, help="Split the embedding over the TP group."),
            _opt(
                "--embedding_sharding_dim",
                type=click.IntRange(0, 1),
                default=0,
                show_default=True,
                help="With --use_parallel_embedding: 0 splits the vocab (zero-padded), 1 the hidden dim.",
            ),
        ]
    ):
        fn = decorator(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="moe-convert")
def main() -> None:
    """Convert Hugging Face MoE checkpoints into per-rank TP/EP/PP shards (TensorRT-LLM layout)."""


def batch_options(fn: F) -> F:
    """--mapping, --job_file, --dry_run, --json: shared by `convert` and `plan`."""
    for decorator in reversed(
        [
            _opt(
                "--mapping",
                "mappings",
                multiple=True,
                help="Batch: one mapping such as tp=8,moe_ep=8 (keys tp, pp, moe_tp, moe_ep, subdir); repeat it "
                "to convert into several mappings in one pass over the source, each into OUTPUT_DIR/<label>.",
            ),
            _opt(
                "--job_file",
                default=None,
                help="Batch described in a YAML or JSON file (model_dir, output_dir, mappings, options); "
                "options given on the command line win.",
            ),
            _opt(
                "--dry_run",
                is_flag=True,
                help="Plan and check only: print the per-rank table; read no tensor data, write nothing.",
            ),
            _opt("--json", "json_out", is_flag=True, help="Print one JSON document on stdout (logs stay on stderr)."),
        ]
    ):
        fn = decorator(fn)
    return fn


@main.command(
    "convert", epilog=MAPPING_HELP + " " + EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@mapping_options
@_opt("--output_dir", default=None, help="Directory for rank{N}.safetensors, config.json and manifest.json.")
@_opt(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Write threads; each owns some rank files and reads, hashes and writes their bytes [default: two per "
    "core, 8-16].",
)
@_opt(
    "--no_direct_io",
    is_flag=True,
    help="Write through the page cache. By default rank files are written with O_DIRECT where the file "
    "system allows: faster, and a 300 GB conversion does not push everything else out of memory.",
)
@_opt("--force", is_flag=True, help="Allow a non-empty --output_dir (earlier outputs in it are replaced).")
@_opt(
    "--resume",
    is_flag=True,
    help="Continue an interrupted conversion into --output_dir with the same options and source: complete "
    "rank files (size and sha256 re-checked against the run's journal) are kept, the rest written. "
    "Refused if options or source differ; with --force such a directory is started over instead.",
)
@_opt(
    "--verify",
    is_flag=True,
    help="After converting, check every output byte against the source (as `moe-convert verify --model_dir`).",
)
@_opt("--chunk_bytes", type=click.IntRange(min=1), default=None, hidden=True)
@batch_options
@common_options
@click.version_option(__version__, "--version", prog_name="moe-convert")
@_handle_errors
def convert_command(
    model_dir: str | None,
    output_dir: str | None,
    tp_size: int,
    pp_size: int,
    moe_tp_size: int | None,
    moe_ep_size: int | None,
    dtype: str,
    use_parallel_embedding: bool,
    embedding_sharding_dim: int,
    workers: int | None,
    no_direct_io: bool,
    force: bool,
    resume: bool,
    verify: bool,
    chunk_bytes: int | None,
    revision: str | None,
    mappings: tuple[str, ...],
    job_file: str | None,
    dry_run: bool,
    json_out: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Convert a checkpoint in one streaming pass, in bounded memory."""
    from .convert import convert
    from .execute import DEFAULT_CHUNK_BYTES

    _setup_logging(quiet, debug)
    if dry_run or mappings or job_file or json_out:
        from .cli_batch import run

        run(click.get_current_context(), "plan" if dry_run else "convert", json_out=json_out, quiet=quiet)
        return
    if model_dir is None or output_dir is None:
        raise UsageError("--model_dir and --output_dir are required (or --job_file)")
    result = convert(
        model_dir,
        output_dir,
        tp_size=tp_size,
        pp_size=pp_size,
        moe_tp_size=moe_tp_size,
        moe_ep_size=moe_ep_size,
        dtype=dtype,
        use_parallel_embedding=use_parallel_embedding,
        embedding_sharding_dim=embedding_sharding_dim,
        workers=workers,
        direct_io=not no_direct_io,
        force=force,
        progress=not quiet,
        revision=revision,
        resume=resume,
        chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
    )
    m = result.plan.mapping
    if len(result.kept) < len(result.ranks):  # else --resume found it complete and said so
        log.info(
            "converted %s -> %s: %d rank files, %.2f GB, %s, tp%d pp%d moe_tp%d moe_ep%d, %.1f s",
            model_dir,
            output_dir,
            len(result.ranks),
            result.bytes_written / 1e9,
            result.plan.dtype,
            m.tp_size,
            m.pp_size,
            m.moe_tp_size,
            m.moe_ep_size,
            result.seconds,
        )
    if verify:
        _report_verify(result.output_dir, result.manifest["source"]["path"], quiet)


@main.command("verify", epilog=EXIT_CODES_HELP)
@click.argument("output_dir")
@_opt(
    "--model_dir",
    default=None,
    help="The source checkpoint: also compare every output byte with it and the manifest with a fresh plan.",
)
@_opt("--json", "json_out", is_flag=True, help="Print one JSON summary on stdout (problems included).")
@common_options
@_handle_errors
def verify_command(output_dir: str, model_dir: str | None, json_out: bool, quiet: bool, debug: bool) -> None:
    """Check a converted OUTPUT_DIR against its manifest.json (and, with --model_dir, its source).

    Without --model_dir: rank file headers, sizes and sha256 against the manifest, zero padding, replicated
    tensors identical across ranks, every expert x FFN slice held once per TP group, config.json against
    the manifest, no stray files. With it, also every tensor byte against the source and the manifest
    against a fresh plan. Every problem is printed on stderr, one per line; exit 1 if there is any.
    """
    _setup_logging(quiet, debug)
    _report_verify(output_dir, model_dir, quiet, json_out=json_out)


def _report_verify(
    output_dir: str | os.PathLike[str], model_dir: str | None, quiet: bool, *, json_out: bool = False
) -> None:
    import json

    from .summary import error_summary, verify_summary
    from .verify import verify

    try:
        report = verify(output_dir, model_dir, progress=not quiet)
    except MoeConvertError as e:
        if json_out:
            click.echo(json.dumps(error_summary(str(e), e.exit_code, e.problems), indent=2))
        raise
    if json_out:
        click.echo(json.dumps(verify_summary(report), indent=2))
    if report.ok:
        if json_out:
            return
        if not quiet:
            click.echo(report.summary())
        return
    for problem in report.problems:
        click.echo(f"problem: {one_line(problem)}", err=True)
    click.echo(f"error: {report.summary()}", err=True)
    sys.exit(1)


@main.command("plan", epilog=MAPPING_HELP + " " + EXIT_CODES_HELP)
@mapping_options
@_opt("--output_dir", default=None, help="Where the conversion would write: checks it and its free space.")
@_opt("--workers", type=click.IntRange(min=1), default=None, help="For the memory bound [default: as convert].")
@_opt("--force", is_flag=True, help="As for convert: a non-empty --output_dir is then no problem.")
@batch_options
@common_options
@_handle_errors
def plan_command(json_out: bool, quiet: bool, debug: bool, **_: Any) -> None:
    """Dry run: the per-rank table, sizes, disk and memory needed, and every failing check.

    --model_dir may be a checkpoint dir, a hub repo id, or a config.json alone (sizes implied by the
    config). No tensor data is read and nothing is written. Exit code 0 when every check passes.
    """
    from .cli_batch import run

    _setup_logging(quiet, debug)
    run(click.get_current_context(), "plan", json_out=json_out, quiet=quiet)


def convert_checkpoint_main() -> None:
    """`python convert_checkpoint.py --model_dir ...`: the convert command, TensorRT-LLM style."""
    convert_command.main(prog_name="convert_checkpoint.py")


@main.command("example")
@click.argument("directory")
@_opt(
    "--family",
    type=click.Choice(family_names()),
    default=DEFAULT_FAMILY,
    show_default=True,
    help="Which model family to build.",
)
@_opt("--fused_experts", is_flag=True, help="Save the transformers-5 fused expert layout.")
@_opt("--force", is_flag=True, help="Allow an existing non-empty directory.")
@common_options
@_handle_errors
def example_command(directory: str, family: str, fused_experts: bool, force: bool, quiet: bool, debug: bool) -> None:
    """Build a tiny random checkpoint in DIRECTORY (transformers' own save_pretrained, several shards)."""
    from pathlib import Path

    from .errors import OutputError
    from .example import build_example_checkpoint

    _setup_logging(quiet, debug)
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise OutputError(f"{path} exists and is not empty; pass --force to write into it")
    build_example_checkpoint(path, family=family, fused_experts=fused_experts)
    log.info("wrote a tiny %s checkpoint to %s", family, path)
