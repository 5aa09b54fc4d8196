"""Pure planning: (architecture rules, model, source tensor headers, mapping) -> what every rank file holds.

No tensor data is read here. Every output tensor is described by the source boxes it is made of and the
byte offset each box lands at, so the executor can stream and the manifest can say where everything is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import CheckpointError, MappingError, UsageError, collect
from .header import FLOAT_CODES, itemsize
from .mapping import Mapping, RankCoords, check_model_fit, stage_layers
from .model_config import ModelSpec, evaluate
from .weight_only import Layout, QuantizedTensor, WeightOnly, resolve_arch

log = logging.getLogger(__name__)

Box = tuple[tuple[int, int], ...]  # [start, stop) per source dimension

DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class SourceTensor:
    """What the planner needs of a source tensor: its header entry."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One box of a source tensor, cast and copied to `dst_offset` bytes into an output tensor's data.

    The box's elements, in row-major order, land contiguously at the destination.
    """

    source: str
    box: Box
    dst_offset: int

    @property
    def numel(self) -> int:
        return math.prod(b - a for a, b in self.box)


@dataclass(frozen=True)
class Quantization:
    """How a weight-only quantized weight and its per_channel_scale are made from the weight's pieces.

    The pieces fill the rows of `rows_shape` (`[N, K]` or `[E, N, K]`, out x in features) in `rows_dtype`,
    the model dtype, exactly as they would fill the unquantized tensor; those rows are quantized one per
    scale and laid out for TensorRT-LLM's mixed GEMM (weight_only.py). Both tensors carry this; the scale
    tensor has no pieces of its own.
    """

    precision: str  # int8 / int4
    arch: int  # the target GPU's compute capability
    layout: str  # weight_only.Layout value: interleaved, column_major or permuted
    rows_shape: tuple[int, ...]
    rows_dtype: str  # safetensors code of the model dtype
    weight: str  # the quantized weight's name
    scale: str  # its per_channel_scale's name

    def tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight, self.rows_shape, self.rows_dtype, self.precision, Layout(self.layout))

    @property
    def rows_nbytes(self) -> int:
        """The bytes of the model-dtype rows the weight's pieces fill (before quantizing)."""
        return math.prod(self.rows_shape) * itemsize(self.rows_dtype)

    def piece_rows(self, piece: Piece) -> tuple[int, int]:
        """The rows [r0, r1) of `rows_shape` (experts flattened) a piece of the weight fills."""
        row_bytes = self.rows_shape[-1] * itemsize(self.rows_dtype)
        r0 = piece.dst_offset // row_bytes
        return r0, r0 + piece.numel // self.rows_shape[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "arch": self.arch,
            "layout": self.layout,
            "rows_shape": list(self.rows_shape),
            "rows_dtype": self.rows_dtype,
            "weight": self.weight,
            "scale": self.scale,
        }


class TensorBytes:
    """The sizes of an output tensor, for the plan's tensors and a manifest's (manifest.ManifestTensor)."""

    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    quantized: Quantization | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def piece_dtype(self) -> str:
        """What the pieces are cast to: the tensor's dtype, or a quantized weight's model-dtype rows."""
        return self.quantized.rows_dtype if self.quantized else self.dtype

    @property
    def pieces_nbytes(self) -> int:
        """The bytes the pieces fill: the tensor's, or a quantized weight's rows (before quantizing)."""
        return self.quantized.rows_nbytes if self.quantized else self.nbytes


@dataclass(frozen=True)
class PlannedTensor(TensorBytes):
    """One output tensor. Bytes no piece covers are zero (vocab padding), unless it is `quantized`: then
    its bytes are computed from its weight's pieces."""

    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    quantized: Quantization | None = None


@dataclass(frozen=True)
class RankPlan:
    coords: RankCoords
    file: str
    layers: tuple[int, ...]  # global layer ids
    experts: tuple[int, ...]  # global expert ids
    ffn_slice: tuple[int, int]  # [start, stop) of each expert's intermediate dim
    tensors: tuple[PlannedTensor, ...]  # in file order

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ConvertOptions:
    """Options that change what is written (and so must match on resume)."""

    dtype: str = "auto"
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    use_embedding_sharing: bool = False  # leave out lm_head where it would be the embedding (see _share_embedding)
    # Weight-only quantization of the rules' `weight_only` weights: int8 / int4, None for none; the target
    # GPU arch; for arch 90 which TensorRT-LLM version's layout of 2-D weights (weight_only.SM90_LAYOUTS).
    weight_only_precision: str | None = None
    weight_only_arch: int | None = None
    weight_only_sm90_layout: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """As recorded in manifests and journals (the weight-only keys only when quantizing, so unquantized
        runs keep their identity across versions)."""
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "use_parallel_embedding": self.use_parallel_embedding,
            "embedding_sharding_dim": self.embedding_sharding_dim,
            "use_embedding_sharing": self.use_embedding_sharing,
        }
        if self.weight_only_precision is not None:
            out["weight_only_precision"] = self.weight_only_precision
            out["weight_only_arch"] = self.weight_only_arch
            out["weight_only_sm90_layout"] = self.weight_only_sm90_layout
        return out

    @property
    def weight_only(self) -> WeightOnly | None:
        """The quantization scheme (checked: a bad precision or arch raises UsageError), or None."""
        if self.weight_only_precision is None:
            return None
        if self.weight_only_arch is None:
            raise UsageError(f"weight-only {self.weight_only_precision}: no target arch given (--weight_only_arch)")
        return WeightOnly(self.weight_only_precision, self.weight_only_arch, self.weight_only_sm90_layout)

    def with_weight_only(
        self, precision: str | None, arch: int | None, sm90_layout: str | None = None
    ) -> ConvertOptions:
        """These options quantizing to `precision` (None or "none": not at all). `arch` None asks the visible
        GPU (UsageError without one); the scheme is checked here, before anything is read."""
        if precision in (None, "none"):
            return replace(self, weight_only_precision=None, weight_only_arch=None, weight_only_sm90_layout=None)
        assert precision is not None
        scheme = WeightOnly(precision, resolve_arch(arch), sm90_layout)
        return replace(
            self,
            weight_only_precision=scheme.precision,
            weight_only_arch=scheme.arch,
            weight_only_sm90_layout=scheme.sm90_layout,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ConvertOptions:
        """The options a manifest or journal recorded (a key it lacks takes its default)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in names})


def convert_options(
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    use_embedding_sharing: bool = False,
    *,
    use_weight_only: bool = False,
    weight_only_precision: str | None = "int8",
    weight_only_arch: int | None = None,
    weight_only_sm90_layout: str | None = None,
) -> ConvertOptions:
    """The options of the library's and CLI's keyword arguments (TensorRT-LLM's spellings), checked.

    With `use_weight_only`, the precision defaults to int8 and `weight_only_arch` None means the visible
    GPU's (UsageError without one).
    """
    options = ConvertOptions(dtype, use_parallel_embedding, embedding_sharding_dim, use_embedding_sharing)
    if not use_weight_only:
        return options
    return options.with_weight_only(weight_only_precision or "int8", weight_only_arch, weight_only_sm90_layout)


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    mapping: Mapping
    options: ConvertOptions
    dtype: str  # resolved output dtype name, e.g. "bfloat16"
    expert_layout: str  # which source layout of the experts was found: "classic" or "fused"
    ranks: tuple[RankPlan, ...]
    sources: dict[str, SourceTensor] = field(repr=False)
    warnings: tuple[str, ...] = ()
    share_embedding_table: bool = False  # lm_head left out: it is the vocab embedding (config.json says so)

    @property
    def total_data_bytes(self) -> int:
        return sum(r.data_bytes for r in self.ranks)


def _count(items: list[str], singular: str, plural: str) -> str:
    return f"1 {singular}" if len(items) == 1 else f"{len(items)} {plural}"


def resolve_dtype(requested: str, spec: ModelSpec, sources: dict[str, SourceTensor]) -> str:
    """`auto` takes config.json's dtype (torch_dtype or dtype), turning float32 into float16."""
    if requested != "auto":
        if requested not in DTYPE_CODES:
            raise UsageError(f"--dtype {requested!r} is not one of auto, {', '.join(DTYPE_CODES)}")
        return requested
    name = (spec.dtype or "").removeprefix("torch.")
    if name not in DTYPE_CODES:
        # No dtype in config.json: the source tensors' own float dtype is the best evidence we have.
        codes = {t.dtype for t in sources.values() if t.dtype in FLOAT_CODES}
        if len(codes) != 1:
            raise UsageError(
                f"--dtype auto: config.json names no usable dtype ({spec.dtype!r}) and the source tensors "
                f"have {sorted(codes) or 'no float dtype'}; pass --dtype explicitly"
            )
        name = CODE_NAMES[codes.pop()]
    return "float16" if name == "float32" else name


@dataclass(frozen=True)
class _Ref:
    """A logical 1-D or 2-D source (e.g. expert 3's w1) inside a real tensor, perhaps a fused one."""

    tensor: str
    prefix: tuple[int, ...]  # fixed leading indices (the expert index in a fused tensor)
    row_offset: int
    shape: tuple[int, ...]  # logical shape

    def box(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Box:
        r0, r1 = rows if rows is not None else (0, self.shape[0])
        dims: list[tuple[int, int]] = [(i, i + 1) for i in self.prefix]
        dims.append((self.row_offset + r0, self.row_offset + r1))
        if len(self.shape) == 2:
            dims.append(cols if cols is not None else (0, self.shape[1]))
        return tuple(dims)


class _TensorBuilder:
    """Appends pieces to one output tensor in destination order."""

    def __init__(self, dtype: str) -> None:
        self.pieces: list[Piece] = []
        self.offset = 0
        self.itemsize = itemsize(dtype)

    def add(self, ref: _Ref, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> None:
        piece = Piece(ref.tensor, ref.box(rows, cols), self.offset)
        if piece.numel:
            self.pieces.append(piece)
        self.offset += piece.numel * self.itemsize


@dataclass
class _Context:
    spec: ModelSpec
    mapping: Mapping
    options: ConvertOptions
    coords: RankCoords
    resolve: Callable[[str, int | None, int | None], _Ref]

    def chunk(self, n: int, parts: int, index: int) -> tuple[int, int]:
        size = n // parts
        return index * size, (index + 1) * size

    def padded_rows(self, ref: _Ref) -> tuple[int, tuple[int, int]]:
        """Rows per rank after zero-padding to a multiple of tp, and this rank's real rows."""
        tp, n = self.mapping.tp_size, ref.shape[0]
        per_rank = -(-n // tp)
        start = min(self.coords.tp_rank * per_rank, n)
        return per_rank, (start, min(start + per_rank, n))


SplitFn = Callable[[_Context, list[str], int | None, _TensorBuilder], tuple[int, ...]]


def _replicate(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    ref = ctx.resolve(keys[0], layer, None)
    out.add(ref)
    return ref.shape


def _tp_columns(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    ref = ctx.resolve(keys[0], layer, None)
    cols = ctx.chunk(ref.shape[1], ctx.mapping.tp_size, ctx.coords.tp_rank)
    out.add(ref, cols=cols)
    return ref.shape[0], cols[1] - cols[0]


def _tp_rows_padded(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    ref = ctx.resolve(keys[0], layer, None)
    per_rank, rows = ctx.padded_rows(ref)
    out.add(ref, rows=rows)
    return per_rank, ref.shape[1]


def _embedding(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    if not ctx.options.use_parallel_embedding:
        return _replicate(ctx, keys, layer, out)
    if ctx.options.embedding_sharding_dim == 0:
        return _tp_rows_padded(ctx, keys, layer, out)
    return _tp_columns(ctx, keys, layer, out)


def _qkv_heads(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    """cat(q, k, v) rows of this rank's heads (weights [rows, H] or biases [rows]); kv heads fewer than tp
    are repeated tp/nkv times first."""
    spec, tp, tp_rank = ctx.spec, ctx.mapping.tp_size, ctx.coords.tp_rank
    d, rows_total = spec.head_dim, 0
    rest: tuple[int, ...] = ()
    for key, heads in zip(keys, (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads), strict=False):
        ref = ctx.resolve(key, layer, None)
        if heads >= tp:
            rows = ctx.chunk(heads * d, tp, tp_rank)
        else:
            head = tp_rank // (tp // heads)  # repeated consecutively: head 0, head 0, head 1, ...
            rows = (head * d, (head + 1) * d)
        out.add(ref, rows=rows)
        rows_total, rest = rows_total + rows[1] - rows[0], ref.shape[1:]
    return rows_total, *rest


def _tp_rows(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    """cat of each source's row chunk over tp, in `keys` order (a dense MLP's fc: up chunk, then gate chunk)."""
    rows_total = 0
    rest: tuple[int, ...] = ()
    for key in keys:
        ref = ctx.resolve(key, layer, None)
        rows = ctx.chunk(ref.shape[0], ctx.mapping.tp_size, ctx.coords.tp_rank)
        out.add(ref, rows=rows)
        rows_total, rest = rows_total + rows[1] - rows[0], ref.shape[1:]
    return rows_total, *rest


def _local_experts(ctx: _Context) -> range:
    per_rank = ctx.spec.num_experts // ctx.mapping.moe_ep_size
    return range(ctx.coords.moe_ep_rank * per_rank, (ctx.coords.moe_ep_rank + 1) * per_rank)


def _ffn_slice(ctx: _Context) -> tuple[int, int]:
    return ctx.chunk(ctx.spec.expert_ffn_size, ctx.mapping.moe_tp_size, ctx.coords.moe_tp_rank)


def _expert_rows(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    """[E_local, len(keys) * I/moe_tp, H]: per expert, the FFN slice of each source in `keys` order."""
    experts, rows = _local_experts(ctx), _ffn_slice(ctx)
    for e in experts:
        for key in keys:
            out.add(ctx.resolve(key, layer, e), rows=rows)
    return len(experts), len(keys) * (rows[1] - rows[0]), ctx.spec.hidden_size


def _expert_columns(ctx: _Context, keys: list[str], layer: int | None, out: _TensorBuilder) -> tuple[int, ...]:
    """[E_local, H, I/moe_tp]: per expert, the FFN slice of the columns."""
    experts, cols = _local_experts(ctx), _ffn_slice(ctx)
    for e in experts:
        out.add(ctx.resolve(keys[0], layer, e), cols=cols)
    return len(experts), ctx.spec.hidden_size, cols[1] - cols[0]


PER_EXPERT_SPLITS = ("expert_rows", "expert_columns")  # one piece per local expert and source
# Planning holds every piece in memory (a few hundred bytes each) and takes about 10 s per million. Real
# models need far fewer (Qwen3-235B at tp8 with the default moe_tp8: 0.3 million).
MAX_PLANNED_PIECES = 2_000_000

SPLITS: dict[str, SplitFn] = {
    "replicate": _replicate,
    "tp_columns": _tp_columns,
    "tp_rows": _tp_rows,
    "tp_rows_padded": _tp_rows_padded,
    "embedding": _embedding,
    "qkv_heads": _qkv_heads,
    "expert_rows": _expert_rows,
    "expert_columns": _expert_columns,
}


def _applies(spec: ModelSpec, entry: dict[str, Any]) -> bool:
    """Whether a source or weight rule is part of this model: `when` names a flag (e.g. qkv_bias)."""
    return "when" not in entry or bool(getattr(spec, entry["when"]))


def source_entries(spec: ModelSpec, layout: str) -> dict[str, dict[str, Any]]:
    """The rules' source tensors of this model with the given expert layout, by key."""
    rules = spec.rules
    entries = {**rules["sources"], **rules["expert_layouts"][layout]}
    return {key: entry for key, entry in entries.items() if _applies(spec, entry)}


def weight_rules(spec: ModelSpec) -> list[dict[str, Any]]:
    """The rules' output tensors of this model, in file order."""
    return [rule for rule in spec.rules["weights"] if _applies(spec, rule)]


def expected_names(
    spec: ModelSpec, entries: dict[str, dict[str, Any]]
) -> Iterator[tuple[str, str, int | None, int | None]]:
    """Every (key, tensor name, layer, expert) the source entries expect to read."""
    for key, entry in entries.items():
        name: str = entry["name"]
        layers: list[int | None] = list(range(spec.num_layers)) if "{layer}" in name else [None]
        per_expert = "{expert}" in name or entry.get("expert_dim")
        experts: list[int | None] = list(range(spec.num_experts)) if per_expert else [None]
        for layer in layers:
            for expert in experts:
                yield key, name.format(layer=layer, expert=expert), layer, expert


def detect_expert_layout(spec: ModelSpec, names: set[str] | dict[str, Any]) -> str:
    """Which expert layout the tensor names use, checked layer by layer (not from the version string)."""
    layouts = spec.rules["expert_layouts"]
    per_layer: dict[int, list[str]] = {}
    for layout, entries in layouts.items():
        for key, name, layer, _ in expected_names(spec, entries):
            if key != "router" and layer is not None and name in names:
                per_layer.setdefault(layer, [])
                if layout not in per_layer[layer]:
                    per_layer[layer].append(layout)
    problems = []
    for layer in range(spec.num_layers):
        found = per_layer.get(layer, [])
        if not found:
            problems.append(f"layer {layer} has no expert weights in any known layout ({', '.join(layouts)})")
        elif len(found) > 1:
            problems.append(f"layer {layer} has expert weights in both the {' and '.join(found)} layouts")
    used = sorted({lay for found in per_layer.values() for lay in found})
    if not problems and len(used) > 1:
        by_layout = {lay: [str(i) for i, found in sorted(per_layer.items()) if found == [lay]] for lay in used}
        problems.append(
            "the checkpoint mixes expert layouts: "
            + "; ".join(f"{lay} in layers {', '.join(ls)}" for lay, ls in by_layout.items())
        )
    collect(problems, CheckpointError, "expert weights are missing or mixed")
    return used[0]


def _check_sources(
    spec: ModelSpec, layout: str, sources: dict[str, SourceTensor]
) -> tuple[dict[tuple[str, int | None, int | None], _Ref], list[str]]:
    """Resolve every logical source to a tensor box; collect missing, misshapen and non-float tensors."""
    dims = spec.dims()
    entries = source_entries(spec, layout)
    refs: dict[tuple[str, int | None, int | None], _Ref] = {}
    missing: list[str] = []
    bad_shape: list[str] = []
    bad_dtype: list[str] = []
    used: set[str] = set()
    for key, name, layer, expert in expected_names(spec, entries):
        entry = entries[key]
        if name not in sources and entry.get("tied_to") and spec.tie_word_embeddings:
            tied = entries[entry["tied_to"]]["name"]
            log.debug("%s is absent and tie_word_embeddings is set: using %s", name, tied)
            name = tied
        if name not in sources:
            missing.append(name)
            continue
        src = sources[name]
        expected = tuple(evaluate(x, dims) for x in entry["shape"])
        if name not in used:
            used.add(name)
            if src.shape != expected:
                bad_shape.append(f"{name} is {list(src.shape)}, config.json implies {list(expected)}")
            if src.dtype not in FLOAT_CODES:
                bad_dtype.append(f"{name} is {src.dtype}")
        if entry.get("expert_dim"):
            rows = entry.get("rows", [0, expected[1]])
            r0, r1 = evaluate(rows[0], dims), evaluate(rows[1], dims)
            ref = _Ref(name, (expert or 0,), r0, (r1 - r0, *expected[2:]))
        else:
            ref = _Ref(name, (), 0, expected)
        refs[(key, layer, expert)] = ref
    problems = []
    if missing:
        problems.append(
            f"{_count(missing, 'expected tensor is', 'expected tensors are')} missing: {', '.join(missing)}"
        )
    if bad_shape:
        problems.append(
            f"{_count(bad_shape, 'tensor disagrees', 'tensors disagree')} with config.json: {'; '.join(bad_shape)}"
        )
    if bad_dtype:
        problems.append(f"unsupported dtypes (only {', '.join(FLOAT_CODES)} can be converted): {', '.join(bad_dtype)}")
    return refs, problems


def plan_conversion(
    spec: ModelSpec,
    sources: dict[str, SourceTensor],
    mapping: Mapping,
    options: ConvertOptions | None = None,
) -> Plan:
    """Plan every rank file. Raises with all problems found, before any tensor data is read.

    Args:
        spec: the model's sizes (from config.json).
        sources: every source tensor's dtype and shape (from the safetensors headers).
        mapping: the resolved parallel mapping.
        options: output dtype, embedding and weight-only options.
    """
    options = options or ConvertOptions()
    scheme = options.weight_only
    problems = check_model_fit(mapping, spec) + _split_problems(spec, mapping) + _size_problems(spec, mapping)
    if options.embedding_sharding_dim not in (0, 1):
        problems.append(f"--embedding_sharding_dim must be 0 or 1, got {options.embedding_sharding_dim}")
    elif options.use_parallel_embedding and options.embedding_sharding_dim == 1 and spec.hidden_size % mapping.tp_size:
        problems.append(
            f"hidden_size {spec.hidden_size} is not divisible by tp_size {mapping.tp_size}, "
            "needed by --embedding_sharding_dim 1; use dim 0"
        )
    collect(problems, MappingError, "the mapping does not fit the model")

    layout = detect_expert_layout(spec, sources)
    refs, problems = _check_sources(spec, layout, sources)
    collect(
        problems,
        CheckpointError,
        "the checkpoint does not match config.json (incomplete download, or the wrong config.json?)",
    )
    expected = {r.tensor for r in refs.values()}
    extra = sorted(set(sources) - expected)
    warnings = (f"{len(extra)} unexpected tensors are ignored: {', '.join(extra[:10])}",) if extra else ()
    dtype = resolve_dtype(options.dtype, spec, sources)

    def resolve(key: str, layer: int | None, expert: int | None) -> _Ref:
        return refs[(key, layer, expert)]

    ranks = []
    too_small: dict[str, None] = {}  # weights the weight-only kernels cannot take, once per rule and shape
    for coords in mapping.ranks():
        ctx = _Context(spec, mapping, options, coords, resolve)
        layers = stage_layers(spec.num_layers, mapping.pp_size, coords.pp_rank)
        tensors = []
        # Stage-wide tensors first, then layer by layer (the order of the source), then the head.
        rules = weight_rules(spec)
        slots: list[tuple[dict[str, Any], int | None, int | None]] = []
        if coords.pp_rank == 0:
            slots += [(rule, None, None) for rule in rules if rule["scope"] == "first_stage"]
        for local_id, layer_id in enumerate(layers):
            slots += [(rule, local_id, layer_id) for rule in rules if rule["scope"] == "layer"]
        if coords.pp_rank == mapping.pp_size - 1:
            slots += [(rule, None, None) for rule in rules if rule["scope"] == "last_stage"]
        for rule, local, layer in slots:
            out_dtype = DTYPE_CODES[rule.get("dtype", dtype)]
            out = _TensorBuilder(out_dtype)
            shape = SPLITS[rule["split"]](ctx, rule["sources"], layer, out)
            name = rule["target"].format(local_layer=local)
            planned = PlannedTensor(name, out_dtype, tuple(shape), tuple(out.pieces))
            if scheme is None or not rule.get("weight_only"):
                tensors.append(planned)
            elif limits := scheme.check(rule["target"].format(local_layer="N"), planned.shape):
                too_small.update(dict.fromkeys(limits))
            else:
                tensors += _quantize(scheme, planned)
        ranks.append(
            RankPlan(
                coords=coords,
                file=f"rank{coords.rank}.safetensors",
                layers=tuple(layers),
                experts=tuple(_local_experts(ctx)),
                ffn_slice=_ffn_slice(ctx),
                tensors=_file_order(tensors),
            )
        )
    if too_small:
        hint = "a smaller tp or moe_tp (a larger moe_ep), or int8, may fit"
        problems = list(too_small) if len(too_small) > 1 else [f"{next(iter(too_small))}; {hint}"]
        collect(problems, UsageError, f"weights TensorRT-LLM's weight-only kernels cannot take ({hint})")
    shared = False
    if options.use_embedding_sharing:
        ranks, why_not = _share_embedding(spec, ranks)
        shared = why_not is None
        if why_not:
            warnings = (*warnings, f"--use_embedding_sharing does not apply: {why_not}; lm_head is written")
    return Plan(spec, mapping, options, dtype, layout, tuple(ranks), sources, warnings, shared)


def _quantize(scheme: WeightOnly, planned: PlannedTensor) -> tuple[PlannedTensor, PlannedTensor]:
    """A planned weight as its quantized form and its per_channel_scale, next to each other in the file."""
    qt = scheme.tensor(planned.name, planned.shape, planned.dtype)
    # Every row is quantized from its own values: a padded tensor (lm_head's vocab) is not quantizable.
    assert sum(p.numel for p in planned.pieces) == math.prod(planned.shape), f"{planned.name} has padding"
    how = Quantization(
        scheme.precision, scheme.arch, qt.layout.value, planned.shape, planned.dtype, planned.name, qt.scale_name
    )
    # Each piece must be whole row groups, so that its bytes are a range of the stored weight that verify
    # can recompute from that piece alone. Every real model's are (its head size and FFN slices are
    # multiples of 4); the executor itself would cope.
    k, item = planned.shape[-1], itemsize(planned.dtype)
    for p in planned.pieces:
        r0, r1 = how.piece_rows(p)
        if p.numel % k or p.dst_offset % (k * item) or r0 % qt.group or r1 % qt.group:
            raise UsageError(
                f"{planned.name}: rows [{r0}, {r1}) from {p.source} are not whole groups of {qt.group} rows, which "
                f"{scheme.precision} weight-only quantization keeps together; this model cannot be quantized here"
            )
    weight = PlannedTensor(planned.name, qt.weight_dtype, qt.weight_shape, planned.pieces, how)
    return weight, PlannedTensor(qt.scale_name, planned.dtype, qt.scale_shape, (), how)


def _share_embedding(spec: ModelSpec, ranks: list[RankPlan]) -> tuple[list[RankPlan], str | None]:
    """Leave out the tied head (a rule whose source is `tied_to` the embedding's) if it is, on every rank
    that holds it, the very tensor the rank already holds as its embedding: same dtype, shape and pieces.

    That is TensorRT-LLM's condition for `share_embedding_table`, read off the plan rather than restated:
    the checkpoint has no lm_head of its own (tied), and the head and the embedding are split alike and lie
    on the same ranks (tp 1, or --use_parallel_embedding with --embedding_sharding_dim 0; pp 1).
    Returns the ranks, and why sharing does not apply (None when it does).
    """
    sources = {**spec.rules["sources"]}
    for layout in spec.rules["expert_layouts"].values():
        sources.update(layout)
    rules = spec.rules["weights"]
    pairs = [
        (head["target"], embed["target"])
        for head in rules
        if len(head["sources"]) == 1 and (tied := sources[head["sources"][0]].get("tied_to"))
        for embed in rules
        if embed["sources"] == [tied]
    ]
    if not pairs:
        return ranks, "this architecture has no tied embedding"
    head, embed = pairs[0]
    out = []
    for r in ranks:
        by_name = {t.name: t for t in r.tensors}
        if head not in by_name:
            out.append(r)
            continue
        h, e = by_name[head], by_name.get(embed)
        if e is None:
            return ranks, f"{head} and {embed} are on different pipeline stages (TensorRT-LLM shares at pp_size 1)"
        if {p.source for p in h.pieces} != {p.source for p in e.pieces}:
            return ranks, f"the checkpoint has its own {', '.join(sorted({p.source for p in h.pieces}))} (not tied)"
        if (h.dtype, h.shape, h.pieces) != (e.dtype, e.shape, e.pieces):
            return ranks, (
                f"{embed} is split differently from {head} (with tp_size > 1 TensorRT-LLM shares only with "
                "--use_parallel_embedding --embedding_sharding_dim 0)"
            )
        out.append(replace(r, tensors=tuple(t for t in r.tensors if t.name != head)))
    return out, None


def _split_problems(spec: ModelSpec, mapping: Mapping) -> list[str]:
    """Row counts a tp_rows split must cut evenly (e.g. the shared expert's FFN width), named as config.json
    names them."""
    problems = []
    dims = spec.dims()
    entries = source_entries(spec, next(iter(spec.rules["expert_layouts"])))
    for rule in weight_rules(spec):
        if rule["split"] != "tp_rows":
            continue
        for expr in dict.fromkeys(entries[key]["shape"][0] for key in rule["sources"]):
            rows = evaluate(expr, dims)
            if rows % mapping.tp_size:
                what = spec.key(expr) if isinstance(expr, str) else str(expr)
                target = rule["target"].format(local_layer="N")
                problems.append(
                    f"{what} {rows} is not divisible by tp_size {mapping.tp_size} ({target} is split over tp); "
                    f"choose a --tp_size that divides {rows}"
                )
    return problems


def _size_problems(spec: ModelSpec, mapping: Mapping) -> list[str]:
    """Refuse, before the loops, a plan too big to hold: the number of pieces it would have."""
    experts = max(spec.num_experts // mapping.moe_ep_size, 1)
    per_layer = sum(
        len(rule["sources"]) * (experts if rule["split"] in PER_EXPERT_SPLITS else 1)
        for rule in weight_rules(spec)
        if rule["scope"] == "layer"
    )
    pieces = mapping.tp_size * spec.num_layers * per_layer
    if pieces <= MAX_PLANNED_PIECES:
        return []
    return [
        f"tp_size {mapping.tp_size} x {spec.num_layers} layers x {per_layer} pieces per layer = {pieces} pieces "
        f"to plan, over the limit of {MAX_PLANNED_PIECES}; no real model needs that many: use a larger --moe_ep_size"
    ]


def _file_order(tensors: list[PlannedTensor]) -> tuple[PlannedTensor, ...]:
    """Rule order (embedding, layers, head), the same whatever the source layout or shard order, so
    equal models give byte-identical files; widest dtype first only if rule order would misalign data."""
    offset = 0
    for t in tensors:
        if offset % itemsize(t.dtype):
            return tuple(sorted(tensors, key=lambda t: -itemsize(t.dtype)))
        offset += t.nbytes
    return tuple(tensors)
