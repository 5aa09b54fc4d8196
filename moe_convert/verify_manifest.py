"""Verify without reading a tensor byte: what manifest.json and config.json determine.

- The manifest must be the plan of its own model description, mapping and options (re-planned here with
  the converter's own functions), or, given the source, of the source; config.json must be the
  TensorRT-LLM config of that plan. Any edit to a piece, a holder, a size or a rotary setting shows up.
- Independently of the planner: the manifest's ranks cover the world once, with the mapping's
  coordinates; each tensor's offsets fit its dtype and shape and its pieces do not overlap; the ranks of a
  stage hold the same layers, the stages split the layers, and each expert's FFN rows are held once per
  stage; config.json's mapping, dtype and embedding options agree with the manifest.
- No stray rank file or temporary file lies beside them.

Every size comes from the parsed, bounded manifest or from the plan, never from config.json, so an edited
number cannot make a check loop for hours.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .bounded_json import read_json_object
from .errors import MoeConvertError, VerifyError
from .fields import Malformed, as_dict, show
from .header import itemsize
from .manifest import MANIFEST_FILE, ManifestRank, ManifestTensor, build_manifest, parse_mapping
from .model_config import ModelSettings
from .plan import Plan
from .trtllm_config import trtllm_config
from .verify_findings import Findings
from .writer import PARTIAL_SUFFIX

CONFIG_FILE = "config.json"
_MAPPING_KEYS = ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size")
_MAX_DIFFS = 50  # lines per comparison; an edit that changes everything is clear from the first ones
# Files a moe-convert output may hold besides the rank files (its lock while a run writes).
_OWN_EXTRAS = (".moe-convert.lock",)


def read_output_config(out: Path, found: Findings) -> dict[str, Any] | None:
    path = out / CONFIG_FILE
    if not os.path.lexists(path):
        found.problem(f"{CONFIG_FILE}: missing; TensorRT-LLM cannot load the checkpoint without it")
        return None
    try:
        return read_json_object(path, VerifyError, follow_symlinks=False)
    except VerifyError as e:
        found.problem(f"{CONFIG_FILE}: {str(e).removeprefix(f'{path}: ')}")
        return None


def compare_with_plan(
    manifest: dict[str, Any],
    config: dict[str, Any] | None,
    plan: Plan,
    settings: ModelSettings,
    giver: str,
    found: Findings,
) -> None:
    """The manifest and config.json must be what `plan` gives (`giver` says where the plan came from)."""
    expected = build_manifest(plan, manifest.get("source") or {}, None)
    lines: list[str] = []
    for key in ("architecture", "expert_layout", "dtype", "options", "mapping", "total_bytes", "experts", "model"):
        for path, a, b in _diff(manifest.get(key), expected[key], key):
            lines.append(f"{MANIFEST_FILE}: {path} is {show(a)}, but {giver} {show(b)}")
    got = manifest.get("ranks")
    got = got if isinstance(got, list) else []
    if len(got) != len(expected["ranks"]):
        lines.append(f"{MANIFEST_FILE}: {len(got)} ranks, but {giver} {len(expected['ranks'])}")
    for want_rank, g in zip(expected["ranks"], got, strict=False):
        if isinstance(g, dict):
            lines += _rank_differences(want_rank, g, giver)
    if config is not None:
        for path, a, b in _diff(config, trtllm_config(plan, settings), ""):
            lines.append(f"{CONFIG_FILE}: {path.lstrip('.')} is {show(a)}, but {giver} {show(b)}")
    for line in lines[:_MAX_DIFFS]:
        found.problem(line)
    if len(lines) > _MAX_DIFFS:
        found.problem(f"{MANIFEST_FILE}, {CONFIG_FILE}: {len(lines) - _MAX_DIFFS} more differences like these")


def _rank_differences(want: dict[str, Any], got: dict[str, Any], giver: str) -> Iterator[str]:
    file = want["file"]
    for key in want:
        if key not in ("sha256", "tensors"):
            for path, a, b in _diff(got.get(key), want[key], key):
                yield f"{file}: manifest {path} is {show(a)}, but {giver} {show(b)}"
    tensors = as_dict(got.get("tensors"))
    for name in want["tensors"].keys() - tensors.keys():
        yield f"{file}: tensor {name!r} is missing from the manifest"
    for name in tensors.keys() - want["tensors"].keys():
        yield f"{file}: tensor {name!r} is in the manifest but not in the plan"
    for name, w in want["tensors"].items():
        if name in tensors:
            for path, a, b in _diff(tensors[name], w, ""):
                yield f"{file}: tensor {name!r}: manifest {path.lstrip('.')} is {show(a)}, but {giver} {show(b)}"


def rederive(manifest: dict[str, Any], config: dict[str, Any] | None, found: Findings) -> Plan | None:
    """Re-plan from the manifest's own model description, mapping and options, and compare."""
    from .replan import replan_from_manifest

    try:
        plan, settings = replan_from_manifest(manifest, MANIFEST_FILE)
    except MoeConvertError as e:
        found.problem(f"{e}; the manifest's pieces cannot be re-derived")
        return None
    compare_with_plan(manifest, config, plan, settings, "the manifest's model and mapping give", found)
    return plan


def check_structure(
    manifest: dict[str, Any],
    ranks: list[ManifestRank],
    config: dict[str, Any] | None,
    plan: Plan | None,
    found: Findings,
) -> None:
    """What the manifest and config.json say must hang together (needs neither the source nor the planner)."""
    try:
        mapping = parse_mapping(manifest.get("mapping"))
    except Malformed as bad:
        found.problem(f"{MANIFEST_FILE}: {bad}")
        return
    if config is not None:
        _config_agrees(manifest, mapping.as_dict(), config, found)
    seen = Counter(r.rank for r in ranks)
    for rank in range(mapping.world_size):  # bounded by parse_mapping
        if seen[rank] == 0:
            found.problem(f"{MANIFEST_FILE}: no entry for rank {rank} (rank{rank}.safetensors)")
    for rank, n in sorted(seen.items()):
        if rank >= mapping.world_size:
            found.problem(f"{MANIFEST_FILE}: rank {rank} is outside the world of {mapping.world_size} ranks")
        elif n > 1:
            found.problem(f"{MANIFEST_FILE}: rank {rank} has {n} entries")
    total = manifest.get("total_bytes")
    if total != sum(r.bytes for r in ranks):
        found.problem(f"{MANIFEST_FILE}: total_bytes {show(total)} != {sum(r.bytes for r in ranks)}, the sum")
    for r in ranks:
        if r.file != f"rank{r.rank}.safetensors":
            found.problem(f"{MANIFEST_FILE}: rank {r.rank}'s file is {r.file}, expected rank{r.rank}.safetensors")
        if r.rank < mapping.world_size:
            c = mapping.coords(r.rank)
            want = (c.tp_rank, c.pp_rank, c.moe_tp_rank, c.moe_ep_rank)
            if r.coords != want:
                found.problem(
                    f"{r.file}: manifest coordinates (tp_rank, pp_rank, moe_tp_rank, moe_ep_rank) "
                    f"{r.coords} disagree with the mapping, which gives {want}"
                )
        for t in r.tensors:
            _check_tensor_entry(r, t, found)
    layers = plan.spec.num_layers if plan else max((x + 1 for r in ranks for x in r.layers), default=0)
    _check_stages(ranks, layers, found)
    experts = plan.spec.num_experts if plan else max((e + 1 for r in ranks for e in r.experts), default=0)
    inter = plan.spec.expert_ffn_size if plan else max((r.ffn_slice[1] for r in ranks), default=0)
    _check_experts(ranks, experts, inter, found)


def _config_agrees(manifest: dict[str, Any], sizes: dict[str, int], config: dict[str, Any], found: Findings) -> None:
    cm = as_dict(config.get("mapping"))
    for k in _MAPPING_KEYS:
        if cm.get(k) != sizes[k]:
            found.problem(f"{CONFIG_FILE}: mapping.{k} is {show(cm.get(k))}, the manifest says {sizes[k]}")
    if config.get("dtype") != manifest.get("dtype"):
        found.problem(
            f"{CONFIG_FILE}: dtype is {show(config.get('dtype'))}, the manifest says {show(manifest.get('dtype'))}"
        )
    options = as_dict(manifest.get("options"))
    for k in ("use_parallel_embedding", "embedding_sharding_dim"):
        if config.get(k) != options.get(k):
            found.problem(f"{CONFIG_FILE}: {k} is {show(config.get(k))}, the manifest says {show(options.get(k))}")


def _check_tensor_entry(r: ManifestRank, t: ManifestTensor, found: Findings) -> None:
    """Offsets fit the dtype and shape; pieces lie inside the tensor (a quantized weight's: inside its rows)
    and never overlap; a quantized weight and its scales have the stored form their record implies."""
    where = f"{r.file}: tensor {t.name!r}"
    if t.end - t.begin != t.nbytes:
        found.problem(
            f"{where}: manifest data_offsets [{t.begin}, {t.end}) hold {t.end - t.begin} bytes, "
            f"but {t.dtype} {list(t.shape)} needs {t.nbytes}"
        )
    item, covered, limit = itemsize(t.piece_dtype), 0, t.pieces_nbytes
    for i, p in sorted(enumerate(t.pieces), key=lambda ip: ip[1].dst_offset):
        n = p.numel * item
        if any(b < a for a, b in p.box) or p.dst_offset % item:
            found.problem(f"{where}: manifest pieces[{i}] (from {p.source!r}) has a bad slice or offset")
        elif p.dst_offset < covered:
            found.problem(f"{where}: manifest pieces[{i}] (from {p.source!r}) overlaps the piece before it")
        elif p.dst_offset + n > limit:
            found.problem(f"{where}: manifest pieces[{i}] (from {p.source!r}) ends past the tensor's {limit} bytes")
        covered = max(covered, p.dst_offset + n)
    if t.quantized is not None:
        for problem in _quantized_entry_problems(r, t):
            found.problem(f"{where}: {problem}")


def _quantized_entry_problems(r: ManifestRank, t: ManifestTensor) -> list[str]:
    """A weight-only weight: int8 bytes of the stored shape, its pieces whole row groups covering its rows;
    its scales: the model dtype, one per row, next to a weight that names them."""
    q = t.quantized
    assert q is not None
    qt = q.tensor()
    if t.name == q.weight:
        want = ("I8", qt.weight_shape)
        rows = sorted(q.piece_rows(p) for p in t.pieces)
        whole = all(p.numel % qt.shape[-1] == 0 for p in t.pieces) and all(a % qt.group == 0 for a, _ in rows)
        if not whole or sum(b - a for a, b in rows) != qt.rows:
            return [f"manifest pieces do not cover its {qt.rows} rows in whole groups of {qt.group}"]
    elif t.name == q.scale:
        want = (q.rows_dtype, qt.scale_shape)
        weight = next((w for w in r.tensors if w.name == q.weight), None)
        if t.pieces or weight is None or weight.quantized != q:
            return [f"manifest weight_only record names weight {q.weight!r}, which this rank does not hold as such"]
    else:
        return [f"manifest weight_only record names neither it ({q.weight!r}, {q.scale!r})"]
    if (t.dtype, t.shape) != want:
        return [f"manifest says {t.dtype} {list(t.shape)}, but its weight_only record gives {want[0]} {list(want[1])}"]
    return []


def _check_stages(ranks: list[ManifestRank], num_layers: int, found: Findings) -> None:
    """A TP group (one pp stage) shares its layers; stages split the layers without gap or overlap."""
    stages: dict[int, dict[tuple[int, ...], list[str]]] = {}
    for r in ranks:
        stages.setdefault(r.coords[1], {}).setdefault(r.layers, []).append(r.file)
    owner: dict[int, int] = {}
    for stage, by_layers in sorted(stages.items()):
        if len(by_layers) > 1:
            desc = "; ".join(f"{', '.join(files)} hold {list(ls)}" for ls, files in by_layers.items())
            found.problem(f"pp stage {stage}: its ranks hold different layers: {desc}")
        for layers in by_layers:
            for layer in layers:
                if owner.setdefault(layer, stage) != stage:
                    found.problem(f"layer {layer} is held by pp stages {owner[layer]} and {stage}")
    missing = [layer for layer in range(num_layers) if layer not in owner]
    if missing:
        found.problem(f"layers {missing} are held by no rank")


def _check_experts(ranks: list[ManifestRank], num_experts: int, inter: int, found: Findings) -> None:
    """Per TP group, each expert's FFN rows [0, I) are split among its ranks exactly once."""
    stages: dict[int, list[ManifestRank]] = {}
    for r in ranks:
        stages.setdefault(r.coords[1], []).append(r)
    for stage, members in sorted(stages.items()):
        # One line per fault, listing the experts it hits (a wrong ffn_slice hits them all).
        faults: dict[str, list[int]] = {}
        holders: dict[int, list[tuple[tuple[int, int], str]]] = {}
        for r in members:
            for e in r.experts:
                holders.setdefault(e, []).append((r.ffn_slice, r.file))
        for e in range(num_experts):  # bounded: by the plan, or by the parsed manifest's expert ids
            held = sorted(holders.get(e, []))
            covered, last = 0, ""
            for (a, b), file in held:
                if a > covered:
                    faults.setdefault(f"FFN rows [{covered}, {a}) are held by no rank", []).append(e)
                elif a < covered:
                    what = f"FFN rows [{a}, {min(b, covered)}) are held twice, by {last} and {file}"
                    faults.setdefault(what, []).append(e)
                if b > covered:
                    covered, last = b, file
            if covered < inter:
                faults.setdefault(f"FFN rows [{covered}, {inter}) are held by no rank", []).append(e)
        for what, experts in faults.items():
            which = f"expert {experts[0]}" if len(experts) == 1 else f"experts {', '.join(map(str, experts))}"
            found.problem(f"pp stage {stage}: {which}: {what}")


def check_stray_files(out: Path, ranks: list[ManifestRank], found: Findings) -> None:
    listed = {r.file for r in ranks}
    for p in sorted(out.iterdir()):
        if p.name in _OWN_EXTRAS:
            continue
        if p.name.endswith(PARTIAL_SUFFIX):
            found.problem(f"{p.name}: a temporary file of an interrupted run; resume the conversion or remove it")
        elif p.name.endswith(".safetensors") and p.name not in listed:
            found.problem(f"{p.name}: not in the manifest (left over from another conversion?); remove it")


def _diff(got: object, want: object, path: str) -> Iterator[tuple[str, object, object]]:
    """Leaf differences between two JSON values, as (path, got, want)."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in want:
            if k not in got:
                yield f"{path}.{k}", "(missing)", want[k]
            else:
                yield from _diff(got[k], want[k], f"{path}.{k}")
        for k in got.keys() - want.keys():
            yield f"{path}.{k}", got[k], "(nothing)"
    elif isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            yield from _diff(a, b, f"{path}[{i}]")
    elif type(got) is not type(want) or got != want:
        yield path, got, want
