"""moe-convert: Hugging Face MoE checkpoints -> per-rank TP/EP/PP shards (TensorRT-LLM layout).

The names below are imported on first use, not with the package: `moe-convert --help` and usage errors
then answer without importing torch and transformers (about a second).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ConvertResult": "convert",
    "convert": "convert",
    "convert_batch": "convert",
    "plan": "convert",
    "save_config": "convert",
    "DryRun": "dryrun",
    "dry_run": "dryrun",
    "MoeConvertError": "errors",
    "MappingRequest": "jobs",
    "Mapping": "mapping",
    "Plan": "plan",
    "VerifyReport": "verify",
    "verify": "verify",
}

if TYPE_CHECKING:
    from .convert import ConvertResult, convert, convert_batch, plan, save_config
    from .dryrun import DryRun, dry_run
    from .errors import MoeConvertError
    from .jobs import MappingRequest
    from .mapping import Mapping
    from .plan import Plan
    from .verify import VerifyReport, verify

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
    "save_config",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps `moe_convert.convert` / `.verify` / `.plan` the functions once their submodules are imported.

    Importing a submodule sets it as an attribute of the package, which would hide the function of the same
    name. (Reach a module through `importlib.import_module("moe_convert.verify")` or `from moe_convert.verify
    import ...`.)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
