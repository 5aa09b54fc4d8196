"""Command line: parse options, call the library, turn domain errors into one line and an exit code."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__
from .errors import MoeConvertError

F = TypeVar("F", bound=Callable[..., Any])

MAPPING_HELP = (
    "MoE sizes resolve as in TensorRT-LLM: neither given -> moe_tp_size = tp_size, moe_ep_size = 1; "
    "only one given -> the other is tp_size divided by it. moe_tp_size * moe_ep_size must equal tp_size."
)

log = logging.getLogger("moe_convert")


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _handle_errors(fn: F) -> F:
    """One line on stderr and the error's exit code; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug"))
        try:
            return fn(*args, **kwargs)
        except MoeConvertError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted: temporary files removed; no output file was left incomplete", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


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
                required=True,
                help="Hugging Face checkpoint directory (config.json + safetensors).",
            ),
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


@main.command("convert", epilog=MAPPING_HELP)
@mapping_options
@_opt("--output_dir", required=True, help="Directory for rank{N}.safetensors, config.json and manifest.json.")
@_opt(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads overlapping read, cast and write.",
)
@_opt("--force", is_flag=True, help="Allow a non-empty --output_dir (earlier outputs in it are replaced).")
@common_options
@_handle_errors
def convert_command(
    model_dir: str,
    output_dir: str,
    tp_size: int,
    pp_size: int,
    moe_tp_size: int | None,
    moe_ep_size: int | None,
    dtype: str,
    use_parallel_embedding: bool,
    embedding_sharding_dim: int,
    workers: int,
    force: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Convert a checkpoint in one streaming pass, in bounded memory."""
    from .convert import convert

    _setup_logging(quiet, debug)
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
        force=force,
        progress=not quiet,
    )
    m = result.plan.mapping
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


def convert_checkpoint_main() -> None:
    """`python convert_checkpoint.py --model_dir ...`: the convert command, TensorRT-LLM style."""
    convert_command.main(prog_name="convert_checkpoint.py")


@main.command("example")
@click.argument("directory")
@_opt("--fused_experts", is_flag=True, help="Save the transformers-5 fused expert layout.")
@_opt("--force", is_flag=True, help="Allow an existing non-empty directory.")
@common_options
@_handle_errors
def example_command(directory: str, fused_experts: bool, force: bool, quiet: bool, debug: bool) -> None:
    """Build a tiny random Mixtral checkpoint in DIRECTORY (transformers' own save_pretrained, 3 shards)."""
    from pathlib import Path

    from .errors import OutputError
    from .example import build_example_checkpoint

    _setup_logging(quiet, debug)
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise OutputError(f"{path} exists and is not empty; pass --force to write into it")
    build_example_checkpoint(path, fused_experts=fused_experts)
    log.info("wrote a tiny Mixtral checkpoint to %s", path)
