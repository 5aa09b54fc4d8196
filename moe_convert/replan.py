"""Planning from a source checkpoint, or again from what a manifest recorded of it.

This sits below both `convert` (which plans before writing) and `verify` (which re-plans to check an
output). The planner is pure, so the same functions (config.json dict -> ModelSpec -> plan_conversion)
give the same plan from the source's own headers or from the manifest's copy of them; nothing here
depends on the model family.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from .errors import MoeConvertError, VerifyError
from .fields import Malformed, ints, obj
from .header import ITEMSIZES
from .hub import resolve_model_dir
from .identity import source_identity
from .limits import MAX_RECORDED_TENSORS
from .manifest import parse_mapping, parse_options
from .mapping import resolve_mapping
from .model_config import ModelSettings, read_model
from .plan import ConvertOptions, Plan, SourceTensor, plan_conversion
from .source import SourceCheckpoint, open_source

log = logging.getLogger(__name__)


def open_model(model_dir: str | os.PathLike[str], revision: str | None = None) -> SourceCheckpoint:
    """A local checkpoint directory or a hub repo id (downloaded into, or found in, the hub cache)."""
    resolved = resolve_model_dir(model_dir, revision)
    source = open_source(resolved.path)
    return replace(source, hub_id=resolved.hub_id, revision=resolved.revision)


def plan_source(
    source: SourceCheckpoint,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    options: ConvertOptions | None = None,
) -> Plan:
    """Plan a conversion of an opened source; `options`, when given, replaces dtype ... use_embedding_sharing."""
    mapping = resolve_mapping(tp_size, pp_size, moe_tp_size, moe_ep_size)
    options = options or ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing)
    headers = {n: SourceTensor(t.dtype, t.shape) for n, t in source.tensors.items()}
    plan = plan_conversion(source.spec, headers, mapping, options)
    for w in plan.warnings:
        log.warning("%s", w)
    return plan


def source_record(source: SourceCheckpoint) -> dict[str, Any]:
    """The manifest's `source` object: where it came from, its shards, and its identity (for --resume)."""
    return {
        "path": str(source.model_dir.resolve()),
        "hub_id": source.hub_id,
        "revision": source.revision,
        "files": [{"name": name, "bytes": size} for name, size in source.file_sizes().items()],
        "identity": source_identity(source),
    }


def replan_from_manifest(manifest: dict[str, Any], where: str) -> tuple[Plan, ModelSettings]:
    """The plan (and the settings config.json needs, read through transformers: verify's cross-check of a
    conversion that read them from the JSON) of the model, mapping and options a manifest records;
    VerifyError (one line) if it cannot be made.

    The recorded config.json goes through the same reading (and bounds) as a source's, before the planner
    enumerates anything: a hostile manifest cannot make it loop.
    """
    try:
        model = obj(manifest.get("model"), "model")
        config = obj(model.get("config"), "model.config")
        recorded = obj(model.get("tensors"), "model.tensors")
        if len(recorded) > MAX_RECORDED_TENSORS:
            raise Malformed(f"model.tensors has {len(recorded)} entries, over the limit of {MAX_RECORDED_TENSORS}")
        headers = {}
        for name, entry in recorded.items():
            e = obj(entry, f"model.tensors[{name!r}]")
            dtype = e.get("dtype")
            if dtype not in ITEMSIZES:
                raise Malformed(f"model.tensors[{name!r}].dtype {dtype!r} is not a safetensors dtype")
            headers[name] = SourceTensor(str(dtype), ints(e.get("shape"), f"model.tensors[{name!r}].shape", max_len=8))
        mapping = parse_mapping(manifest.get("mapping"))
        options = parse_options(manifest.get("options"))
    except Malformed as bad:
        raise VerifyError(f"{where}: {bad}") from bad
    try:
        spec, settings = read_model(config, f"{where}: model.config", by_transformers=True)
        return plan_conversion(spec, headers, mapping, options), settings
    except MoeConvertError as e:
        raise VerifyError(f"{where}: its model and mapping cannot be planned: {e}") from e
