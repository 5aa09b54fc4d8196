"""Command line: parse options, call the library, turn domain errors into one line and an exit code.

Importing this module imports click and nothing heavy: torch and transformers are imported inside the
commands that need them, so `--help`, `--version` and usage errors answer at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__, trtllm_flags
from .errors import MESSAGE_BUDGET, MESSAGE_LIMIT, MoeConvertError, shorten
from .example import DEFAULT_FAMILY, family_names
from .safe_text import OneLineFormatter, one_line
from .units import count

if TYPE_CHECKING:
    from .verify import VerifyReport

F = TypeVar("F", bound=Callable[..., Any])

MAPPING_HELP = (
    "MoE sizes resolve as in TensorRT-LLM: neither given (or -1) -> moe_tp_size = tp_size, moe_ep_size = 1; "
    "only one given -> the other is tp_size divided by it. moe_tp_size * moe_ep_size must equal tp_size."
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 error (bad input, failed check, write failure); 2 usage or mapping error; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)

TRTLLM_HELP = (
    "Every other flag of TensorRT-LLM's convert_checkpoint.py is accepted, checked against config.json, or "
    "refused in one line: docs/trtllm-flags.md."
)

# TensorRT-LLM's --log_level values onto ours. Its verbose/debug/trace are all our debug level (--debug
# additionally lets tracebacks through).
LOG_LEVELS = {
    "internal_error": logging.ERROR,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}
DEFAULT_OUTPUT_DIR = "tllm_checkpoint"  # TensorRT-LLM's default
MAX_PROBLEM_LINES = 20  # problems printed by verify; --json lists all
_MORE_HINT = " (--json lists all)"

log = logging.getLogger("moe_convert")


def _setup_logging(quiet: bool, debug: bool, log_level: str | None = None) -> bool:
    """Log one line per message on stderr; returns whether progress is shown (info level or below)."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else LOG_LEVELS[log_level or "info"]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s", budget=None if debug else MESSAGE_BUDGET))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return level <= logging.INFO


def _emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


def _emit_error(message: str, exit_code: int, problems: Sequence[str] = ()) -> None:
    from .summary import error_summary

    _emit(error_summary(message, exit_code, list(problems)))


def error_line(e: MoeConvertError) -> str:
    """`error: ...` within the message budget; a cut message says where the whole list is."""
    text = e.brief(MESSAGE_BUDGET - len("error: ") - len(_MORE_HINT), MESSAGE_LIMIT - len("error: "))
    return f"error: {one_line(text)}{_MORE_HINT if text != str(e) else ''}"


# What an interrupted command leaves: only a conversion has anything to continue.
_INTERRUPTED = {
    "convert_command": "interrupted: temporary files removed, no output file was left incomplete "
    "(a conversion continues with --resume)",
    "verify_command": "interrupted: verification stopped before it finished; nothing was written",
    "plan_command": "interrupted: nothing was written",
    "example_command": "interrupted: the example checkpoint may be incomplete; build it again with --force",
}


def _handle_errors(fn: F) -> F:
    """One line on stderr and the error's exit code; the traceback only with --debug. With --json, also
    one document on stdout, whatever the failure."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug, json_out = bool(kwargs.get("debug")), bool(kwargs.get("json_out"))
        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except MoeConvertError as e:
            if json_out:
                _emit_error(str(e), e.exit_code, e.problems)
            if debug:
                raise
            click.echo(error_line(e), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            code = 128 + getattr(e, "signum", signal.SIGINT)
            message = _INTERRUPTED.get(fn.__name__, _INTERRUPTED["convert_command"])
            if json_out:
                _emit_error(message, code)
            if debug:
                raise
            click.echo(message, err=True)
            sys.exit(code)
        except (SystemExit, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # a bug: the interpreter prints the traceback, --json still gets its document
            if json_out:
                _emit_error(f"internal error: {type(e).__name__}: {e}", 1)
            raise

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


def _wants_json(args: Sequence[str]) -> bool:
    args = list(args)
    return "--json" in (args[: args.index("--")] if "--" in args else args)


class _JsonUsageErrors:
    """click's own usage errors (`--bogus`, `--dtype bf16`) answer `--json` with one document too; click
    still prints its usual message on stderr."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        json_out = _wants_json(args)  # before parsing, which consumes `args`
        try:
            context: click.Context = super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]
            return context
        except click.ClickException as e:
            if json_out:
                _emit_error(e.format_message(), e.exit_code, [e.format_message()])
            raise


class Command(_JsonUsageErrors, click.Command):
    pass


class Group(_JsonUsageErrors, click.Group):
    command_class = Command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        json_out = _wants_json(args)
        try:
            return super().resolve_command(ctx, args)
        except click.ClickException as e:
            if json_out:
                _emit_error(e.format_message(), e.exit_code, [e.format_message()])
            raise


def _opt(*names: str, **kwargs: Any) -> Callable[[F], F]:
    """An option spelled the TensorRT-LLM way (`--tp_size`) that also accepts `--tp-size`."""
    spellings = list(names)
    for n in names:
        if n.startswith("--") and "_" in n:
            spellings.append(n.replace("_", "-"))
    return click.option(*spellings, **kwargs)


def _apply(fn: F, decorators: list[Callable[[F], F]]) -> F:
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def common_options(fn: F) -> F:
    return _apply(
        fn,
        [
            _opt("--quiet", is_flag=True, help="Only warnings and errors on stderr; no progress."),
            _opt("--debug", is_flag=True, help="Debug logging and full tracebacks on errors."),
            click.version_option(__version__, "--version", prog_name="moe-convert"),
        ],
    )


weight_only_options = [
    _opt(
        "--use_weight_only",
        is_flag=True,
        help="Quantize qkv, dense and the expert (and shared expert) fc/proj weights to --weight_only_precision "
        "with per-channel scales, byte-identical to TensorRT-LLM's; no GPU needed (docs/weight-only.md).",
    ),
    _opt(
        "--weight_only_precision",
        type=click.Choice(trtllm_flags.WEIGHT_ONLY_PRECISIONS),
        is_flag=False,
        flag_value="int8",
        default=None,
        help="int8 (W8A16, default) or int4 (W4A16). A --mapping's precision=... overrides it in a batch.",
    ),
    _opt(
        "--weight_only_arch",
        type=int,
        default=None,
        help="Compute capability of the GPU TensorRT-LLM will run on (75, 80, 86, 87, 89 or 90): the weight "
        "layout depends on it [default: the visible GPU's; without one, this option is required].",
    ),
    _opt(
        "--weight_only_sm90_layout",
        type=click.Choice(["column_major", "permuted"]),
        default=None,
        help="With arch 90 (required there): TensorRT-LLM's layout of 2-D weights changed between versions: "
        "column_major as 0.10-0.11 (the spec), permuted as 1.2. docs/weight-only.md shows how to check yours.",
    ),
]


def mapping_options(fn: F) -> F:
    return _apply(
        fn,
        [
            _opt(
                "--model_dir",
                default=None,
                help="Hugging Face checkpoint directory (config.json + safetensors), a hub cache folder "
                "(models--org--name), or a hub repo id (owner/name) resolved through the hub cache "
                "(HF_HOME, HF_HUB_OFFLINE, HF_TOKEN apply).",
            ),
            _opt("--revision", default=None, help="Branch, tag or commit of a hub repo id (default: main)."),
            _opt("--tp_size", type=int, default=1, show_default=True, help="Tensor-parallel size."),
            _opt("--pp_size", type=int, default=1, show_default=True, help="Pipeline-parallel size."),
            _opt(
                "--moe_tp_size",
                type=int,
                default=None,
                help="Tensor-parallel size of the experts (-1: not set). " + MAPPING_HELP,
            ),
            _opt("--moe_ep_size", type=int, default=None, help="Expert-parallel size (-1: not set). " + MAPPING_HELP),
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
            _opt(
                "--use_embedding_sharing",
                is_flag=True,
                help="As TensorRT-LLM: where the embedding is tied and lm_head would be a copy of it on every "
                "rank (tp 1, or --use_parallel_embedding with dim 0; pp 1), leave lm_head out and set "
                "share_embedding_table in config.json; otherwise a one-line warning.",
            ),
            *weight_only_options,
        ],
    )


def batch_options(fn: F) -> F:
    """--mapping, --job_file, --dry_run, --json: shared by `convert` and `plan`."""
    return _apply(
        fn,
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
            _opt(
                "--json",
                "json_out",
                is_flag=True,
                help="Print one JSON document on stdout, also on failure (logs stay on stderr).",
            ),
        ],
    )


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="moe-convert")
def main() -> None:
    """Convert Hugging Face MoE checkpoints into per-rank TP/EP/PP shards (TensorRT-LLM layout)."""


@main.command(
    "convert",
    epilog=f"{MAPPING_HELP} {TRTLLM_HELP} {EXIT_CODES_HELP}",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@mapping_options
@_opt(
    "--output_dir",
    default=DEFAULT_OUTPUT_DIR,
    show_default=True,
    help="Directory for rank{N}.safetensors, config.json and manifest.json.",
)
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
@_opt(
    "--save_config_only",
    is_flag=True,
    help="Write config.json only (no rank files, no manifest), as TensorRT-LLM does; no tensor data is read.",
)
@_opt(
    "--log_level",
    type=click.Choice(list(LOG_LEVELS), case_sensitive=False),
    default=None,
    help="TensorRT-LLM's levels: internal_error/error = errors only, warning = --quiet, info (default), "
    "verbose/debug/trace = debug logging. --quiet and --debug win.",
)
@_opt("--chunk_bytes", type=click.IntRange(min=1), default=None, hidden=True)
@batch_options
@trtllm_flags.options
@common_options
@_handle_errors
def convert_command(quiet: bool, debug: bool, log_level: str | None, **params: Any) -> None:
    """Convert a checkpoint in one streaming pass, in bounded memory."""
    ctx = click.get_current_context()
    progress = _setup_logging(quiet, debug, log_level)
    flags = trtllm_flags.given(params)
    trtllm_flags.refuse(flags)  # before anything is read or written
    for note in trtllm_flags.notes(flags):
        log.debug("%s", note)
    from .cli_batch import run

    mode = "plan" if params["dry_run"] else "config" if params["save_config_only"] else "convert"
    run(ctx, mode, json_out=params["json_out"], progress=progress, config_flags=trtllm_flags.checked(flags))


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
    against a fresh plan. Problems are printed on stderr, at most 20 lines grouped by kind (--json lists
    every one); exit 1 if there is any.
    """
    from .verify import verify

    progress = _setup_logging(quiet, debug)
    report = verify(output_dir, model_dir, progress=progress)
    if json_out:
        from .summary import verify_summary

        _emit(verify_summary(report))
    else:
        print_verify_report(report, quiet)
    if not report.ok:
        sys.exit(1)


def print_verify_report(report: VerifyReport, quiet: bool) -> None:
    """The summary on stdout when all is well; else at most MAX_PROBLEM_LINES problems and the summary."""
    if report.ok:
        if not quiet:
            click.echo(report.summary())
        return
    for line in problem_lines(report.problems):
        click.echo(line, err=True)
    click.echo(f"error: {one_line(report.summary())}", err=True)


def problem_lines(problems: Sequence[str], limit: int = MAX_PROBLEM_LINES) -> list[str]:
    """Problems grouped by kind (the same text but for numbers), one example line per kind, at most `limit`
    lines; then how many more there are."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        groups.setdefault(re.sub(r"\d+", "N", p), []).append(p)
    kinds = list(groups.values())
    shown = kinds if len(kinds) <= limit else kinds[: limit - 1]
    lines = []
    for members in shown:
        like = f" (and {len(members) - 1} more like it)" if len(members) > 1 else ""
        budget = MESSAGE_BUDGET - len("problem: ") - len(like)
        lines.append(f"problem: {one_line(shorten(members[0], budget))}{like}")
    hidden = kinds[len(shown) :]
    if hidden:
        n = sum(len(m) for m in hidden)
        lines.append(f"... and {count(n, 'more problem')} of {count(len(hidden), 'other kind')}{_MORE_HINT}")
    return lines


@main.command("plan", epilog=f"{MAPPING_HELP} {EXIT_CODES_HELP}")
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
    from .errors import UsageError, collect

    progress = _setup_logging(quiet, debug)
    params = click.get_current_context().params
    problems = trtllm_flags.weight_only_problems(params["use_weight_only"], params["weight_only_precision"])
    collect(problems, UsageError, "weight-only options moe-convert does not do")
    run(click.get_current_context(), "plan", json_out=json_out, progress=progress)


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
