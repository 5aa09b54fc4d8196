"""moe-convert: Hugging Face MoE checkpoints -> per-rank TP/EP/PP shards (TensorRT-LLM layout)."""

from __future__ import annotations

__version__ = "0.1.0"

from .convert import ConvertResult, convert, plan

__all__ = ["ConvertResult", "__version__", "convert", "plan"]
