"""The rank-mapping manifest: which rank file holds which layer, expert, FFN slice and source bytes.

Besides the plan's outcome it stores what re-planning needs (the source's config.json and the dtype and
shape of every source tensor used), so `verify` re-derives every piece from the manifest's own model
description and mapping, without the source. Reading one back is bounded and typed: an edited or damaged
manifest becomes one line per problem, never a traceback or a loop over a hostile number.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .bounded_json import read_json_object
from .errors import VerifyError
from .execute import RankResult
from .fields import Malformed, boolean, integer, ints, lst, obj, sha256_hex, show, text
from .header import FLOAT_CODES, ITEMSIZES, itemsize
from .limits import MAX_EXPERTS, MAX_INDEX, MAX_LAYERS, MAX_WORLD_SIZE
from .mapping import Mapping
from .plan import ConvertOptions, Piece, Plan, Quantization, TensorBytes
from .weight_only import ARCHS, PRECISIONS, SM90_LAYOUTS, Layout
from .writer import layout_rank_file

FORMAT = "moe-convert-manifest"
VERSION = 2  # 2: the model description (config.json, source tensors) and the source's identity
MANIFEST_FILE = "manifest.json"
# A Mixtral-8x22B tp8 manifest is a few MB; more than this is not one of ours.
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
RANK_FILE = re.compile(r"rank(0|[1-9][0-9]{0,5})\.safetensors")
_MAX_DIMS = 8


def build_manifest(plan: Plan, source: dict[str, Any], results: list[RankResult] | None = None) -> dict[str, Any]:
    """The manifest of a plan; `results` (file sizes and sha256) come from a finished conversion.

    A dry run gets the same document with `sha256` null, so tools read both the same way.
    """
    sha = {r.file: r.sha256 for r in results or []}
    ranks = []
    for r in plan.ranks:
        layout = layout_rank_file(r)
        ranks.append(
            {
                "rank": r.coords.rank,
                "tp_rank": r.coords.tp_rank,
                "pp_rank": r.coords.pp_rank,
                "moe_tp_rank": r.coords.moe_tp_rank,
                "moe_ep_rank": r.coords.moe_ep_rank,
                "file": r.file,
                "bytes": layout.size,
                "sha256": sha.get(r.file),
                "layers": list(r.layers),
                "experts": list(r.experts),
                "ffn_slice": list(r.ffn_slice),
                "tensors": {
                    t.name: {
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "data_offsets": [
                            layout.offsets[t.name] - layout.data_start,
                            layout.offsets[t.name] - layout.data_start + t.nbytes,
                        ],
                        "pieces": [
                            {
                                "source": p.source,
                                "slice": [list(b) for b in p.box],
                                "dst_offset": p.dst_offset,
                            }
                            for p in t.pieces
                        ],
                        # a weight-only weight and its scales: computed from the weight's pieces
                        **({"weight_only": t.quantized.as_dict()} if t.quantized else {}),
                    }
                    for t in r.tensors
                },
            }
        )
    experts: dict[int, list[dict[str, Any]]] = {}
    for r in plan.ranks:
        for e in r.experts:
            experts.setdefault(e, []).append(
                {"rank": r.coords.rank, "layers": list(r.layers), "ffn_slice": list(r.ffn_slice)}
            )
    return {
        "format": FORMAT,
        "version": VERSION,
        "tool": {"name": "moe-convert", "version": __version__},
        "source": source,
        "architecture": plan.spec.architecture,
        "expert_layout": plan.expert_layout,
        "dtype": plan.dtype,
        "options": plan.options.as_dict(),
        "mapping": plan.mapping.as_dict(),
        "total_bytes": sum(r["bytes"] for r in ranks),
        "ranks": ranks,
        "experts": [{"expert": e, "holders": holders} for e, holders in sorted(experts.items())],
        "model": model_record(plan),
    }


def model_record(plan: Plan) -> dict[str, Any]:
    """What re-planning needs besides the mapping and options: config.json, and the source tensors used."""
    used = sorted({p.source for r in plan.ranks for t in r.tensors for p in t.pieces})
    return {
        "config": plan.spec.config,
        "tensors": {n: {"dtype": plan.sources[n].dtype, "shape": list(plan.sources[n].shape)} for n in used},
    }


def read_manifest(output_dir: Path, *, accept_older: bool = False) -> dict[str, Any]:
    """manifest.json of an output dir: a regular file (never through a link), bounded, ours, this version.

    `accept_older` also takes older versions (whose rank list is the same), to know which files they list.
    """
    path = output_dir / MANIFEST_FILE
    if not os.path.lexists(path):
        raise VerifyError(f"{path}: not found; is {output_dir} a moe-convert output?")
    data = read_json_object(path, VerifyError, limit=MAX_MANIFEST_BYTES, follow_symlinks=False)
    if data.get("format") != FORMAT:
        raise VerifyError(f"{path}: not a moe-convert manifest (format is not {FORMAT!r})")
    version = data.get("version")
    if type(version) is int and 1 <= version < VERSION:
        if not accept_older:
            raise VerifyError(
                f"{path}: manifest version {version} was written by an older moe-convert and lacks the model "
                "description that verify and --resume need; convert again"
            )
    elif version != VERSION:
        raise VerifyError(f"{path}: manifest version {version!r}; this tool reads {VERSION}")
    return data


# --------------------------------------------------------------------------------------------------
# Reading a manifest back, typed and bounded.


@dataclass(frozen=True)
class ManifestTensor(TensorBytes):
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # data_offsets, relative to the first data byte
    end: int
    pieces: tuple[Piece, ...]
    quantized: Quantization | None = None  # a weight-only weight, or its per_channel_scale


@dataclass(frozen=True)
class ManifestRank:
    index: int  # position in the manifest's list
    rank: int
    coords: tuple[int, int, int, int]  # tp_rank, pp_rank, moe_tp_rank, moe_ep_rank
    file: str
    bytes: int
    sha256: str | None
    layers: tuple[int, ...]
    experts: tuple[int, ...]
    ffn_slice: tuple[int, int]
    tensors: tuple[ManifestTensor, ...]


def parse_mapping(v: object, what: str = "mapping") -> Mapping:
    """A mapping object (manifest, journal), its sizes consistent and bounded."""
    m = obj(v, what)
    sizes = {k: integer(m.get(k), f"{what}.{k}", lo=1, hi=MAX_WORLD_SIZE) for k in ("tp_size", "pp_size")}
    sizes |= {k: integer(m.get(k), f"{what}.{k}", lo=1, hi=sizes["tp_size"]) for k in ("moe_tp_size", "moe_ep_size")}
    mapping = Mapping(sizes["tp_size"], sizes["pp_size"], sizes["moe_tp_size"], sizes["moe_ep_size"])
    if mapping.moe_tp_size * mapping.moe_ep_size != mapping.tp_size:
        raise Malformed(f"{what} is impossible: moe_tp_size * moe_ep_size != tp_size")
    world = integer(m.get("world_size"), f"{what}.world_size", lo=1, hi=MAX_WORLD_SIZE)
    if world != mapping.world_size:
        raise Malformed(f"{what}.world_size {world} != tp_size * pp_size = {mapping.world_size}")
    return mapping


def parse_options(v: object, what: str = "options") -> ConvertOptions:
    o = obj(v, what)
    options = ConvertOptions(
        text(o.get("dtype"), f"{what}.dtype"),
        boolean(o.get("use_parallel_embedding"), f"{what}.use_parallel_embedding"),
        integer(o.get("embedding_sharding_dim"), f"{what}.embedding_sharding_dim", hi=1),
        boolean(o.get("use_embedding_sharing"), f"{what}.use_embedding_sharing"),
    )
    if o.get("weight_only_precision") is None:
        return options
    layout = o.get("weight_only_sm90_layout")
    return replace(
        options,
        weight_only_precision=_choice(o.get("weight_only_precision"), PRECISIONS, f"{what}.weight_only_precision"),
        weight_only_arch=_choice(o.get("weight_only_arch"), ARCHS, f"{what}.weight_only_arch"),
        weight_only_sm90_layout=None
        if layout is None
        else _choice(layout, SM90_LAYOUTS, f"{what}.weight_only_sm90_layout"),
    )


def _choice(v: Any, allowed: Any, what: str) -> Any:
    if v not in allowed or isinstance(v, bool):
        raise Malformed(f"{what} is {show(v)}, not one of {', '.join(map(str, allowed))}")
    return v


def _parse_quantization(v: object, where: str) -> Quantization:
    """A tensor's `weight_only` record: how it is made from its weight's pieces."""
    q = obj(v, f"{where}: weight_only")
    at = f"{where}: weight_only"
    rows_dtype = _choice(q.get("rows_dtype"), FLOAT_CODES, f"{at}.rows_dtype")
    rows_shape = ints(q.get("rows_shape"), f"{at}.rows_shape", max_len=3)
    if len(rows_shape) < 2 or math.prod(rows_shape) * itemsize(rows_dtype) > MAX_INDEX:
        raise Malformed(f"{at}.rows_shape {list(rows_shape)} is not a 2-D or 3-D shape of any file")
    return Quantization(
        precision=_choice(q.get("precision"), PRECISIONS, f"{at}.precision"),
        arch=_choice(q.get("arch"), ARCHS, f"{at}.arch"),
        layout=_choice(q.get("layout"), [layout.value for layout in Layout], f"{at}.layout"),
        rows_shape=rows_shape,
        rows_dtype=rows_dtype,
        weight=text(q.get("weight"), f"{at}.weight"),
        scale=text(q.get("scale"), f"{at}.scale"),
    )


def rank_file_name(v: object, what: str) -> str:
    name = text(v, what)
    if not RANK_FILE.fullmatch(name):
        raise Malformed(f"{what} {name!r} is not a rank file name like 'rank0.safetensors'")
    return name


def parse_rank(index: int, e: object) -> ManifestRank:
    r = obj(e, "the entry")
    sha = r.get("sha256")
    tensors = obj(r.get("tensors"), "tensors")
    return ManifestRank(
        index=index,
        rank=integer(r.get("rank"), "rank", hi=MAX_WORLD_SIZE - 1),
        coords=tuple(
            integer(r.get(k), k, hi=MAX_WORLD_SIZE - 1) for k in ("tp_rank", "pp_rank", "moe_tp_rank", "moe_ep_rank")
        ),  # type: ignore[arg-type]
        file=rank_file_name(r.get("file"), "file"),
        bytes=integer(r.get("bytes"), "bytes"),
        sha256=None if sha is None else sha256_hex(sha, "sha256"),
        layers=ints(r.get("layers"), "layers", hi=MAX_LAYERS - 1, max_len=MAX_LAYERS),
        experts=ints(r.get("experts"), "experts", hi=MAX_EXPERTS - 1, max_len=MAX_EXPERTS),
        ffn_slice=_pair(r.get("ffn_slice"), "ffn_slice"),
        tensors=tuple(_parse_tensor(str(n), t) for n, t in tensors.items()),
    )


def _pair(v: object, what: str) -> tuple[int, int]:
    a, b = ints(v, what, 2)
    return a, b


def _parse_tensor(name: str, e: object) -> ManifestTensor:
    where = f"tensor {name!r}"
    t = obj(e, where)
    dtype = t.get("dtype")
    if dtype not in ITEMSIZES:
        raise Malformed(f"{where}: dtype {dtype!r} is not a safetensors dtype")
    shape = ints(t.get("shape"), f"{where}: shape", max_len=_MAX_DIMS)
    if math.prod(shape) * itemsize(str(dtype)) > MAX_INDEX:
        raise Malformed(f"{where}: shape {list(shape)} is too large for any file")
    begin, end = _pair(t.get("data_offsets"), f"{where}: data_offsets")
    pieces = []
    for i, p in enumerate(lst(t.get("pieces"), f"{where}: pieces")):
        at = f"{where}: pieces[{i}]"
        p = obj(p, at)
        box = tuple(_pair(d, f"{at}.slice") for d in lst(p.get("slice"), f"{at}.slice", max_len=_MAX_DIMS))
        pieces.append(
            Piece(text(p.get("source"), f"{at}.source"), box, integer(p.get("dst_offset"), f"{at}.dst_offset"))
        )
    quantized = None if "weight_only" not in t else _parse_quantization(t["weight_only"], where)
    return ManifestTensor(name, str(dtype), shape, begin, end, tuple(pieces), quantized)


def parse_ranks(manifest: dict[str, Any]) -> tuple[list[ManifestRank], list[str]]:
    """Every well-formed rank entry, and a problem line for each malformed one."""
    try:
        entries = lst(manifest.get("ranks"), "'ranks'", max_len=MAX_WORLD_SIZE)
    except Malformed as bad:
        return [], [f"{MANIFEST_FILE}: {bad}"]
    ranks, problems = [], []
    for i, e in enumerate(entries):
        try:
            ranks.append(parse_rank(i, e))
        except Malformed as bad:
            name = e.get("file") if isinstance(e, dict) and isinstance(e.get("file"), str) else None
            shown = show(name, 40) if name else "no file"
            problems.append(f"{MANIFEST_FILE}: ranks[{i}] ({shown}): {bad}; this rank is not checked")
    return ranks, problems
