"""moe-convert: Hugging Face MoE checkpoints -> per-rank TP/EP/PP shards (TensorRT-LLM layout)."""

from __future__ import annotations

__version__ = "0.1.0"

from .convert import ConvertResult, convert, convert_batch, plan
from .dryrun import DryRun, dry_run
from .errors import MoeConvertError
from .jobs import MappingRequest
from .mapping import Mapping
from .plan import Plan
from .verify import VerifyReport, verify

# Note: `convert` and `verify` here are the functions, which hide the submodules of the same name as
# attributes: use `importlib.import_module("moe_convert.verify")` (or `from moe_convert.verify import ...`)
# to reach a module, e.g. for monkeypatching.
__all__ = [
    "ConvertResult",
    "DryRun",
    "Mapping",
    "MappingRequest",
    "MoeConvertError",
    "Plan",
    "VerifyReport",
    "__version__",
    "convert",
    "convert_batch",
    "dry_run",
    "plan",
    "verify",
]
