"""TensorRT-LLM's convert_checkpoint.py flags that are not moe-convert options, each with a deliberate answer.

Scripts written for TensorRT-LLM's `examples/llama/convert_checkpoint.py` (0.11 to 1.x), which converts
Mixtral, run unchanged. The flags both tools have mean the same (see cli.py). Every other flag of that
script is here, with one of three answers:

- accepted: we always do what it asks, or it does not apply (one debug line says which);
- checked: it restates a config.json value (TensorRT-LLM reads them only to build a model without a
  checkpoint); given with a checkpoint, it must agree with the config.json we write, else one line names both;
- refused: exit 2 with one line naming the flag, why, and what to use instead, before anything is read.

docs/trtllm-flags.md has the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .errors import UsageError, collect

F = TypeVar("F", bound=Callable[..., Any])

QUANTIZE_PY = "TensorRT-LLM's quantize.py (NVIDIA ModelOpt)"
CALIBRATED = f"needs calibration (a model run over data), which moe-convert does not do; use {QUANTIZE_PY}"
PRE_QUANTIZED = (
    "is for GPTQ/AWQ-quantized checkpoints, which moe-convert does not read; use TensorRT-LLM's convert_checkpoint.py"
)
FP8 = f"needs calibrated FP8 scales, which moe-convert does not make; use {QUANTIZE_PY} --qformat fp8"
LEAVE_OUT_FFN = "sizes a Meta checkpoint's FFN; here config.json's intermediate_size does. Leave it out"


@dataclass(frozen=True)
class Flag:
    """One flag of TensorRT-LLM's convert_checkpoint.py that moe-convert answers here."""

    name: str  # TensorRT-LLM's spelling without the dashes, also the click parameter name
    answer: str  # "accepted", "checked" or "refused"
    reason: str = ""  # accepted: why nothing needs doing; refused: why, and what to use instead
    value: click.ParamType[Any] | None = None  # None: a switch
    config_key: str = ""  # checked: the config.json key it restates ("moe.top_k")
    aliases: tuple[str, ...] = ()


FLAGS = (
    # Always so, or not applicable here.
    Flag("load_by_shard", "accepted", "moe-convert always streams the source shard by shard"),
    Flag("load_model_on_cpu", "accepted", "moe-convert never loads a model (nor uses a GPU)"),
    Flag(
        "disable_weight_only_quant_plugin",
        "accepted",
        "an engine build choice for weight-only quantization; the checkpoint is the same either way",
    ),
    Flag("cp_size", "accepted", "context parallelism 1 is what is written (mapping.cp_size 1)", click.INT),
    # Values TensorRT-LLM uses only to build a model without a checkpoint: they must agree with config.json.
    Flag("vocab_size", "checked", value=click.INT, config_key="vocab_size"),
    Flag("n_positions", "checked", value=click.INT, config_key="max_position_embeddings"),
    Flag("n_layer", "checked", value=click.INT, config_key="num_hidden_layers"),
    Flag("n_head", "checked", value=click.INT, config_key="num_attention_heads"),
    Flag("n_kv_head", "checked", value=click.INT, config_key="num_key_value_heads"),
    Flag("n_embd", "checked", value=click.INT, config_key="hidden_size"),
    Flag("inter_size", "checked", value=click.INT, config_key="intermediate_size"),
    Flag("rms_norm_eps", "checked", value=click.FLOAT, config_key="norm_epsilon"),
    Flag("rotary_base", "checked", value=click.FLOAT, config_key="rotary_base"),
    Flag("hidden_act", "checked", value=click.STRING, config_key="hidden_act"),
    Flag("moe_num_experts", "checked", value=click.INT, config_key="moe.num_experts"),
    Flag("moe_top_k", "checked", value=click.INT, config_key="moe.top_k"),
    Flag(
        "moe_renorm_mode",
        "checked",
        value=click.INT,
        config_key="moe.normalization_mode",
        aliases=("--moe_normalization_mode",),
    ),
    # Refused: quantization that needs a model run or a pre-quantized checkpoint, and the rest.
    Flag("smoothquant", "refused", CALIBRATED, click.STRING, aliases=("-sq",)),
    Flag("per_channel", "refused", CALIBRATED),
    Flag("per_token", "refused", CALIBRATED),
    Flag("int8_kv_cache", "refused", CALIBRATED),
    Flag("calib_dataset", "refused", CALIBRATED, click.STRING),
    Flag("calib_size", "refused", CALIBRATED, click.STRING),
    Flag("calib_max_seq_length", "refused", CALIBRATED, click.STRING),
    Flag("quant_ckpt_path", "refused", PRE_QUANTIZED, click.STRING),
    Flag("per_group", "refused", PRE_QUANTIZED),
    Flag("group_size", "refused", PRE_QUANTIZED, click.STRING),
    Flag("use_fp8", "refused", FP8),
    Flag("use_fp8_rowwise", "refused", FP8),
    Flag("use_meta_fp8_rowwise_recipe", "refused", FP8),
    Flag("fp8_kv_cache", "refused", f"{FP8} --kv_cache_dtype fp8"),
    Flag("use_nvfp4", "refused", f"needs calibrated NVFP4 scales; use {QUANTIZE_PY} --qformat nvfp4"),
    Flag(
        "use_qserve",
        "refused",
        "is for QServe-quantized checkpoints, which moe-convert does not read; use TensorRT-LLM's "
        "convert_checkpoint.py",
    ),
    Flag(
        "meta_ckpt_dir",
        "refused",
        "Meta checkpoints (consolidated.*.pth) are pickles, which moe-convert never loads; pass the Hugging Face "
        "safetensors checkpoint as --model_dir",
        click.STRING,
    ),
    Flag(
        "remove_duplicated_kv_heads",
        "refused",
        "undoes the duplicated kv heads of Llama-3.1-405B; these models have none, it would drop real heads. "
        "Leave it out",
    ),
    Flag("multiple_of", "refused", LEAVE_OUT_FFN, click.STRING),
    Flag("ffn_dim_multiplier", "refused", LEAVE_OUT_FFN, click.STRING),
)
BY_NAME = {f.name: f for f in FLAGS}

# Weight-only quantization (TensorRT-LLM's --use_weight_only --weight_only_precision): int8 / int4 are done
# here; the precisions that need a GPTQ/AWQ checkpoint or a calibration run are refused.
WEIGHT_ONLY_PRECISIONS = ("int8", "int4", "int8_gptq", "int4_gptq", "int4_awq")


def options(fn: F) -> F:
    """Add every flag above (hidden from --help: docs/trtllm-flags.md lists them). The weight-only flags are
    real options (cli.py); their values are answered here too (`weight_only_problems`)."""
    for flag in reversed(FLAGS):
        names = (f"--{flag.name}", *flag.aliases, flag.name)
        if flag.value is None:
            fn = click.option(*names, is_flag=True, default=False, hidden=True)(fn)
        else:
            fn = click.option(*names, type=flag.value, default=None, hidden=True)(fn)
    return fn


NAMES = (*BY_NAME, "use_weight_only", "weight_only_precision")


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags of `values` (a command's parameters) that were given: switches on, values set.

    TensorRT-LLM's own "not set" values count as not given: 0 for --moe_num_experts / --moe_top_k.
    """
    out = {}
    for name in NAMES:
        v = values.get(name)
        if v is None or v is False or (name in ("moe_num_experts", "moe_top_k") and v == 0):
            continue
        out[name] = v
    return out


def spell(name: str, value: Any) -> str:
    """`--calib_size 512`, `--per_channel`."""
    return f"--{name}" if value is True else f"--{name} {value}"


def answer(name: str, value: Any) -> tuple[str, str]:
    """How a given flag is answered ("accepted", "checked" or "refused") and the reason."""
    flag = BY_NAME[name]
    if name == "cp_size" and value != 1:
        return "refused", (
            "context parallelism is not supported here; every cp rank holds the same weights: leave --cp_size out "
            "and set it when building the engine"
        )
    return flag.answer, flag.reason


def refuse(flags: dict[str, Any]) -> None:
    """Raise UsageError (exit 2) naming every refused flag given, why, and what to use instead."""
    problems = _answered(flags, "refused")
    problems += weight_only_problems(flags.get("use_weight_only", False), flags.get("weight_only_precision"))
    collect(problems, UsageError, "TensorRT-LLM flags that moe-convert does not do")


def weight_only_problems(use_weight_only: bool, precision: str | None) -> list[str]:
    """The weight-only precisions moe-convert does not make (GPTQ / AWQ checkpoints, calibration), and a
    precision without --use_weight_only: TensorRT-LLM ignores it then and writes unquantized weights, which
    a script that names a precision hardly means."""
    if precision is None or precision in ("int8", "int4"):
        if precision is not None and not use_weight_only:
            return [
                f"--weight_only_precision {precision} without --use_weight_only: TensorRT-LLM ignores it and writes "
                "unquantized weights; add --use_weight_only to quantize, or leave it out"
            ]
        return []
    flags = (
        f"--use_weight_only --weight_only_precision {precision}"
        if use_weight_only
        else spell("weight_only_precision", precision)
    )
    return [f"{flags}: {PRE_QUANTIZED if 'gptq' in precision else CALIBRATED}"]


def notes(flags: dict[str, Any]) -> list[str]:
    """One line per accepted flag given: why it needs no doing."""
    return _answered(flags, "accepted")


def _answered(flags: dict[str, Any], kind: str) -> list[str]:
    """`--flag value, --flag: reason` for the given flags answered `kind`, one item per reason."""
    by_reason: dict[str, list[str]] = {}
    for name, value in flags.items():
        if name in BY_NAME:
            answered, why = answer(name, value)
            if answered == kind:
                by_reason.setdefault(why, []).append(spell(name, value))
    return [f"{', '.join(names)}: {why}" for why, names in by_reason.items()]


def checked(flags: dict[str, Any]) -> dict[str, Any]:
    """The given flags that restate config.json values."""
    return {n: v for n, v in flags.items() if n in BY_NAME and BY_NAME[n].answer == "checked"}


def disagreements(flags: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Each checked flag whose value is not what the TensorRT-LLM config.json we write says."""
    problems = []
    for name, value in checked(flags).items():
        key = BY_NAME[name].config_key
        have: Any = config
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if not _agrees(key, value, have):
            problems.append(f"--{name} {value} disagrees with config.json's {key} {have}; leave it out or fix it")
    return problems


def _agrees(key: str, value: Any, have: Any) -> bool:
    if key == "hidden_act":
        # A gated FFN's activation: TensorRT-LLM's config says swiglu where Hugging Face (and the flag) say silu.
        return bool(value == have or {"swiglu": "silu", "geglu": "gelu"}.get(str(have)) == value)
    if isinstance(have, bool) or not isinstance(have, (int, float)):
        return False
    return bool(float(value) == float(have))
