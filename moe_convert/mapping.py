"""The parallel mapping: TP x PP world, MoE-TP x MoE-EP inside the TP group, rank coordinates, checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import MappingError, collect

if TYPE_CHECKING:
    from .model_config import ModelSpec


@dataclass(frozen=True)
class Mapping:
    """Resolved sizes. MoE parallelism re-slices the TP group: moe_tp * moe_ep == tp."""

    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def ranks(self) -> list[RankCoords]:
        return [self.coords(r) for r in range(self.world_size)]

    def coords(self, rank: int) -> RankCoords:
        tp_rank = rank % self.tp_size
        # EP index varies fastest inside a TP group (TensorRT-LLM's convention).
        return RankCoords(
            rank=rank,
            tp_rank=tp_rank,
            pp_rank=rank // self.tp_size,
            moe_tp_rank=tp_rank // self.moe_ep_size,
            moe_ep_rank=tp_rank % self.moe_ep_size,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "moe_tp_size": self.moe_tp_size,
            "moe_ep_size": self.moe_ep_size,
        }

    def describe(self) -> str:
        """For people: `tp4 pp1 moe_tp2 moe_ep2`."""
        return f"tp{self.tp_size} pp{self.pp_size} moe_tp{self.moe_tp_size} moe_ep{self.moe_ep_size}"

    def label(self) -> str:
        """Short name for logs and batch subdirectories, e.g. `tp4_pp1_moetp2_moeep2`."""
        return f"tp{self.tp_size}_pp{self.pp_size}_moetp{self.moe_tp_size}_moeep{self.moe_ep_size}"


@dataclass(frozen=True)
class RankCoords:
    rank: int
    tp_rank: int
    pp_rank: int
    moe_tp_rank: int
    moe_ep_rank: int


# TensorRT-LLM's convert_checkpoint.py spells "not set" for the MoE sizes as -1 (its default).
NOT_SET = -1


def _check_size(name: str, value: object, *, may_be_unset: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"--{name} must be a whole number, got {value!r}"
    if value < 1:
        return f"--{name} must be >= 1{' (or -1: not set)' if may_be_unset else ''}, got {value}"
    return None


def _unset(size: int | None) -> int | None:
    return None if type(size) is int and size == NOT_SET else size


def resolve_mapping(
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
) -> Mapping:
    """Apply the spec's resolution of the two MoE flags and check the sizes themselves.

    Neither given: moe_tp = tp, moe_ep = 1. Only one given: the other is tp divided by it.
    Then moe_tp * moe_ep must equal tp. A MoE size of -1 means not given, as in TensorRT-LLM.
    """
    moe_tp_size, moe_ep_size = _unset(moe_tp_size), _unset(moe_ep_size)
    problems = [
        p
        for p in (
            _check_size("tp_size", tp_size),
            _check_size("pp_size", pp_size),
            None if moe_tp_size is None else _check_size("moe_tp_size", moe_tp_size, may_be_unset=True),
            None if moe_ep_size is None else _check_size("moe_ep_size", moe_ep_size, may_be_unset=True),
        )
        if p
    ]
    collect(problems, MappingError, "invalid parallel sizes")
    if moe_tp_size is None and moe_ep_size is None:
        moe_tp_size, moe_ep_size = tp_size, 1
    elif moe_tp_size is None:
        assert moe_ep_size is not None
        if tp_size % moe_ep_size:
            raise MappingError(
                f"--moe_ep_size {moe_ep_size} does not divide --tp_size {tp_size}; "
                "moe_tp_size * moe_ep_size must equal tp_size"
            )
        moe_tp_size = tp_size // moe_ep_size
    elif moe_ep_size is None:
        if tp_size % moe_tp_size:
            raise MappingError(
                f"--moe_tp_size {moe_tp_size} does not divide --tp_size {tp_size}; "
                "moe_tp_size * moe_ep_size must equal tp_size"
            )
        moe_ep_size = tp_size // moe_tp_size
    if moe_tp_size * moe_ep_size != tp_size:
        raise MappingError(
            f"moe_tp_size * moe_ep_size must equal tp_size: {moe_tp_size} * {moe_ep_size} = "
            f"{moe_tp_size * moe_ep_size}, but --tp_size is {tp_size}"
        )
    return Mapping(tp_size=tp_size, pp_size=pp_size, moe_tp_size=moe_tp_size, moe_ep_size=moe_ep_size)


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layer ids of a pipeline stage: the first `num_layers % pp` stages get one extra layer."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def check_model_fit(mapping: Mapping, spec: ModelSpec) -> list[str]:
    """Every divisibility check of the spec, each naming the numbers and config.json's keys. Returns the
    problems found."""
    m = mapping
    experts, ffn = spec.key("num_experts"), spec.key("expert_ffn_size")
    heads, kv_heads, layers = spec.key("num_heads"), spec.key("num_kv_heads"), spec.key("num_layers")
    problems = []
    if spec.num_experts % m.moe_ep_size:
        problems.append(
            f"{experts} {spec.num_experts} is not divisible by moe_ep_size {m.moe_ep_size}; "
            f"choose an --moe_ep_size that divides {spec.num_experts}"
        )
    if spec.expert_ffn_size % m.moe_tp_size:
        problems.append(
            f"{ffn} {spec.expert_ffn_size} is not divisible by moe_tp_size {m.moe_tp_size}; "
            f"choose an --moe_tp_size that divides {spec.expert_ffn_size}"
        )
    if spec.num_heads % m.tp_size:
        problems.append(
            f"{heads} {spec.num_heads} is not divisible by tp_size {m.tp_size}; "
            f"choose a --tp_size that divides {spec.num_heads}"
        )
    if spec.num_kv_heads >= m.tp_size and spec.num_kv_heads % m.tp_size:
        problems.append(
            f"{kv_heads} {spec.num_kv_heads} is not divisible by tp_size {m.tp_size} (kv heads >= tp must split evenly)"
        )
    if spec.num_kv_heads < m.tp_size and m.tp_size % spec.num_kv_heads:
        problems.append(
            f"tp_size {m.tp_size} is not a multiple of {kv_heads} {spec.num_kv_heads} "
            f"(kv heads < tp are duplicated tp/nkv times, which must be whole)"
        )
    if m.pp_size > spec.num_layers:
        problems.append(
            f"pp_size {m.pp_size} is larger than {layers} {spec.num_layers}; "
            f"every pipeline stage needs at least one layer"
        )
    return problems
