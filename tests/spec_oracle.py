"""Test oracle: rebuild the HF source tensors from rank files using the layout specs' rules alone.

Independent of moe_convert's planner, rules files and manifest: everything here is written from
shared/spec/trtllm-mixtral-layout.md and trtllm-qwen-moe-layout.md, so a planner bug cannot hide behind a
matching oracle bug.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moe_convert import convert
from moe_convert.plan import SourceTensor

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# A model that tp8 fits: 8 query heads, 2 kv heads (duplicated 4x under tp8), head size 8.
WIDE = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}


@dataclass(frozen=True)
class Family:
    """What the two layout specs say differs between families, by HF model_type."""

    moe: str  # the module of router and experts in HF names
    gate: str  # per-expert HF names of the gate, up and down projections
    up: str
    down: str
    qkv_bias: bool  # q/k/v biases unless config.json says qkv_bias false
    qk_norm: bool  # per-head q/k RMSNorm


FAMILIES = {
    "mixtral": Family("block_sparse_moe", "w1", "w3", "w2", qkv_bias=False, qk_norm=False),
    "qwen2_moe": Family("mlp", "gate_proj", "up_proj", "down_proj", qkv_bias=True, qk_norm=False),
    "qwen3_moe": Family("mlp", "gate_proj", "up_proj", "down_proj", qkv_bias=False, qk_norm=True),
}


@dataclass(frozen=True)
class Sizes:
    """The HF model sizes the spec's rules need (read straight from config.json)."""

    H: int
    I: int  # noqa: E741  # each routed expert's FFN width
    L: int
    nh: int
    nkv: int
    d: int
    V: int
    E: int
    S: int = 0  # the shared expert's FFN width; 0: none
    model_type: str = "mixtral"
    bias: bool = False
    tied: bool = False

    @classmethod
    def of(cls, model_dir: Path) -> Sizes:
        c = json.loads((model_dir / "config.json").read_text())
        nh = c["num_attention_heads"]
        fam = FAMILIES[c["model_type"]]
        return cls(
            H=c["hidden_size"],
            I=c.get("moe_intermediate_size") or c["intermediate_size"],
            L=c["num_hidden_layers"],
            nh=nh,
            nkv=c.get("num_key_value_heads") or nh,
            d=c.get("head_dim") or c["hidden_size"] // nh,
            V=c["vocab_size"],
            E=c.get("num_local_experts") or c["num_experts"],
            S=c.get("shared_expert_intermediate_size", 0),
            model_type=c["model_type"],
            bias=c.get("qkv_bias", fam.qkv_bias),
            tied=c.get("tie_word_embeddings", False),
        )

    @property
    def fam(self) -> Family:
        return FAMILIES[self.model_type]

    def expert(self, layer: int, e: int, which: str) -> str:
        """The classic HF name of expert e's gate, up or down weight."""
        return f"model.layers.{layer}.{self.fam.moe}.experts.{e}.{getattr(self.fam, which)}.weight"

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.fam.moe}.gate.weight"


@dataclass(frozen=True)
class Layout:
    """A requested mapping and the options that change tensor contents."""

    tp: int = 1
    pp: int = 1
    moe_tp: int | None = None
    moe_ep: int | None = None
    dtype: str = "auto"
    parallel_embedding: bool = False
    sharding_dim: int = 0

    @property
    def moe(self) -> tuple[int, int]:
        """(moe_tp, moe_ep) resolved by the spec's rules."""
        if self.moe_tp is None and self.moe_ep is None:
            return self.tp, 1
        if self.moe_tp is None:
            assert self.moe_ep is not None
            return self.tp // self.moe_ep, self.moe_ep
        if self.moe_ep is None:
            return self.moe_tp, self.tp // self.moe_tp
        return self.moe_tp, self.moe_ep

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for moe_convert.convert and naive_convert."""
        return {
            "tp_size": self.tp,
            "pp_size": self.pp,
            "moe_tp_size": self.moe_tp,
            "moe_ep_size": self.moe_ep,
            "dtype": self.dtype,
            "use_parallel_embedding": self.parallel_embedding,
            "embedding_sharding_dim": self.sharding_dim,
        }

    def label(self) -> str:
        parts = [f"tp{self.tp}"]
        parts += [f"pp{self.pp}"] if self.pp > 1 else []
        parts += [f"moetp{self.moe_tp}"] if self.moe_tp else []
        parts += [f"moeep{self.moe_ep}"] if self.moe_ep else []
        parts += [self.dtype] if self.dtype != "auto" else []
        parts += [f"pemb{self.sharding_dim}"] if self.parallel_embedding else []
        return "-".join(parts)


def stage_sizes(n: int, pp: int) -> list[int]:
    """Layers per pipeline stage: the first n % pp stages get one extra layer."""
    return [n // pp + (1 if p < n % pp else 0) for p in range(pp)]


def load_raw_source(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards the index names (or model.safetensors), under its on-disk name."""
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(model_dir / f))
    return state


def classic_view(raw: dict[str, torch.Tensor], sizes: Sizes) -> dict[str, torch.Tensor]:
    """The source under classic per-expert names (a fused gate_up_proj is [gate; up] per expert)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        parts = name.split(".")
        if ".mlp.experts.gate_up_proj" in name:
            for e in range(sizes.E):
                out[sizes.expert(int(parts[2]), e, "gate")] = t[e, : sizes.I]
                out[sizes.expert(int(parts[2]), e, "up")] = t[e, sizes.I :]
        elif ".mlp.experts.down_proj" in name:
            for e in range(sizes.E):
                out[sizes.expert(int(parts[2]), e, "down")] = t[e]
        elif name.endswith(".mlp.gate.weight"):
            out[sizes.router(int(parts[2]))] = t
        else:
            out[name] = t
    return out


def expected_rank_names(pp_rank: int, pp: int, n_local: int, s: Sizes | None = None) -> set[str]:
    per_layer = ["input_layernorm", "attention.qkv", "attention.dense", "post_layernorm", "mlp.router", "mlp.fc"]
    per_layer.append("mlp.proj")
    if s is not None and s.S:
        per_layer += ["mlp.shared_expert.fc", "mlp.shared_expert.proj", "mlp.shared_expert_gate"]
    if s is not None and s.fam.qk_norm:
        per_layer += ["attention.q_layernorm", "attention.k_layernorm"]
    names = {f"transformer.layers.{j}.{x}.weight" for j in range(n_local) for x in per_layer}
    if s is not None and s.bias:
        names |= {f"transformer.layers.{j}.attention.qkv.bias" for j in range(n_local)}
    if pp_rank == 0:
        names.add("transformer.vocab_embedding.weight")
    if pp_rank == pp - 1:
        names |= {"transformer.ln_f.weight", "lm_head.weight"}
    return names


def _same(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    for t in tensors[1:]:
        assert t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]), f"{what} differs between ranks"
    return tensors[0]


def _unpad(parts: list[torch.Tensor], V: int, tp: int, what: str) -> torch.Tensor:
    """Concatenate vocab chunks (dim 0), check each is ceil(V/tp) rows and the padding is zero."""
    per = -(-V // tp)
    for p in parts:
        assert p.shape[0] == per, f"{what}: {p.shape[0]} rows per rank, expected {per}"
    full = torch.cat(parts)
    assert not full[V:].any(), f"{what}: padding rows {V}..{full.shape[0]} are not zero"
    return full[:V]


def reassemble(output_dir: Path, s: Sizes, lay: Layout, out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rebuild every HF source tensor (classic names) from the rank files, checking the layout on the way.

    Checks: rank file set, key set and shapes per rank, output dtype (router float32), zero padding,
    identical copies of duplicated kv heads and of replicated tensors, and that each expert x FFN slice
    appears exactly once per TP group.
    """
    tp, pp = lay.tp, lay.pp
    moe_tp, moe_ep = lay.moe
    world = tp * pp
    files = sorted(p.name for p in output_dir.glob("rank*.safetensors"))
    assert files == sorted(f"rank{r}.safetensors" for r in range(world))
    ranks = [load_file(output_dir / f"rank{r}.safetensors") for r in range(world)]
    per_stage = stage_sizes(s.L, pp)
    for rank, st in enumerate(ranks):
        assert set(st) == expected_rank_names(rank // tp, pp, per_stage[rank // tp], s), f"rank{rank} tensor names"
        for name, t in st.items():
            want = torch.float32 if name.endswith("mlp.router.weight") else out_dtype
            assert t.dtype == want, f"rank{rank} {name} is {t.dtype}, expected {want}"

    out: dict[str, torch.Tensor] = {}
    first, last = ranks[:tp], ranks[(pp - 1) * tp :]
    emb = [r["transformer.vocab_embedding.weight"] for r in first]
    if not lay.parallel_embedding:
        out["model.embed_tokens.weight"] = _same(emb, "vocab_embedding")
    elif lay.sharding_dim == 0:
        out["model.embed_tokens.weight"] = _unpad(emb, s.V, tp, "vocab_embedding")
    else:
        assert all(e.shape == (s.V, s.H // tp) for e in emb)
        out["model.embed_tokens.weight"] = torch.cat(emb, dim=1)
    out["model.norm.weight"] = _same([r["transformer.ln_f.weight"] for r in last], "ln_f")
    lm_head = _unpad([r["lm_head.weight"] for r in last], s.V, tp, "lm_head")
    if s.tied:  # a copy of the embedding, padded and split as lm_head; the source has no lm_head.weight
        assert torch.equal(lm_head, out["model.embed_tokens.weight"]), "tied lm_head differs from the embedding"
    else:
        out["lm_head.weight"] = lm_head

    q_rows = s.nh // tp * s.d
    kv_rows = (s.nkv // tp if s.nkv >= tp else 1) * s.d
    E_loc, I_loc = s.E // moe_ep, s.I // moe_tp
    layer = 0
    for p, n_local in enumerate(per_stage):
        group = ranks[p * tp : (p + 1) * tp]
        for j in range(n_local):
            src, dst = f"model.layers.{layer}", f"transformer.layers.{j}"
            for suffix in ("weight", "bias") if s.bias else ("weight",):  # bias rows split as the weight rows
                qkv = [r[f"{dst}.attention.qkv.{suffix}"] for r in group]
                assert all(t.shape == (q_rows + 2 * kv_rows, s.H)[: t.dim()] for t in qkv), f"{dst} qkv shape"
                out[f"{src}.self_attn.q_proj.{suffix}"] = torch.cat([t[:q_rows] for t in qkv])
                for i, kv in ((1, "k"), (2, "v")):
                    parts = [t[q_rows + (i - 1) * kv_rows : q_rows + i * kv_rows] for t in qkv]
                    if s.nkv < tp:  # each head repeated tp/nkv times on consecutive ranks
                        rep = tp // s.nkv
                        parts = [_same(parts[h * rep : (h + 1) * rep], f"{dst} {kv} head {h}") for h in range(s.nkv)]
                    out[f"{src}.self_attn.{kv}_proj.{suffix}"] = torch.cat(parts)
            if s.fam.qk_norm:
                for x in ("q", "k"):
                    norms = [r[f"{dst}.attention.{x}_layernorm.weight"] for r in group]
                    assert norms[0].shape == (s.d,), f"{dst} {x}_layernorm shape"
                    out[f"{src}.self_attn.{x}_norm.weight"] = _same(norms, f"{dst} {x}_layernorm")
            if s.S:  # the shared expert: a dense MLP over the whole TP group, fc = [up chunk; gate chunk]
                S_loc = s.S // tp
                fc = [r[f"{dst}.mlp.shared_expert.fc.weight"] for r in group]
                assert all(t.shape == (2 * S_loc, s.H) for t in fc), f"{dst} shared_expert.fc shape"
                out[f"{src}.mlp.shared_expert.up_proj.weight"] = torch.cat([t[:S_loc] for t in fc])
                out[f"{src}.mlp.shared_expert.gate_proj.weight"] = torch.cat([t[S_loc:] for t in fc])
                proj = [r[f"{dst}.mlp.shared_expert.proj.weight"] for r in group]
                assert all(t.shape == (s.H, S_loc) for t in proj), f"{dst} shared_expert.proj shape"
                out[f"{src}.mlp.shared_expert.down_proj.weight"] = torch.cat(proj, dim=1)
                gates = [r[f"{dst}.mlp.shared_expert_gate.weight"] for r in group]
                assert gates[0].shape == (1, s.H), f"{dst} shared_expert_gate shape"
                out[f"{src}.mlp.shared_expert_gate.weight"] = _same(gates, f"{dst} shared_expert_gate")
            dense = [r[f"{dst}.attention.dense.weight"] for r in group]
            assert all(t.shape == (s.H, s.nh * s.d // tp) for t in dense)
            out[f"{src}.self_attn.o_proj.weight"] = torch.cat(dense, dim=1)
            out[f"{src}.input_layernorm.weight"] = _same([r[f"{dst}.input_layernorm.weight"] for r in group], "norm")
            out[f"{src}.post_attention_layernorm.weight"] = _same(
                [r[f"{dst}.post_layernorm.weight"] for r in group], "post norm"
            )
            out[s.router(layer)] = _same([r[f"{dst}.mlp.router.weight"] for r in group], f"{dst} router")
            w1 = torch.zeros(s.E, s.I, s.H, dtype=out_dtype)
            w3 = torch.zeros_like(w1)
            w2 = torch.zeros(s.E, s.H, s.I, dtype=out_dtype)
            held = torch.zeros(s.E, moe_tp, dtype=torch.int64)  # how often each expert x FFN slice appears
            for tp_rank, r in enumerate(group):
                ep_rank, mtp_rank = tp_rank % moe_ep, tp_rank // moe_ep
                fc, proj = r[f"{dst}.mlp.fc.weight"], r[f"{dst}.mlp.proj.weight"]
                assert fc.shape == (E_loc, 2 * I_loc, s.H), f"{dst} fc shape {tuple(fc.shape)}"
                assert proj.shape == (E_loc, s.H, I_loc), f"{dst} proj shape {tuple(proj.shape)}"
                rows = slice(mtp_rank * I_loc, (mtp_rank + 1) * I_loc)
                for k in range(E_loc):
                    e = ep_rank * E_loc + k
                    held[e, mtp_rank] += 1
                    w3[e, rows], w1[e, rows] = fc[k, :I_loc], fc[k, I_loc:]  # up first, gate second
                    w2[e, :, rows] = proj[k]
            assert (held == 1).all(), f"{dst}: expert x FFN slice counts per TP group {held.tolist()}"
            for e in range(s.E):
                out[s.expert(layer, e, "gate")], out[s.expert(layer, e, "up")] = w1[e], w3[e]
                out[s.expert(layer, e, "down")] = w2[e]
            layer += 1
    return out


def assert_matches_source(
    rebuilt: dict[str, torch.Tensor], source: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Every source tensor, cast to the output dtype (router: float32), equals its rebuilt copy."""
    assert set(rebuilt) == set(source)
    for name, t in source.items():
        want = t.to(torch.float32 if name.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight")) else dtype)
        got = rebuilt[name]
        assert got.dtype == want.dtype and torch.equal(got, want), f"{name} differs from the source"


def rebuild_from_manifest(output_dir: Path, raw: dict[str, torch.Tensor]) -> int:
    """Rebuild every output tensor from source slices per manifest `pieces`; compare with the rank files.

    Returns the number of tensors checked. Also checks that `data_offsets` match the files' headers and
    that pieces never overlap (uncovered bytes must be zero: padding).
    """
    manifest = json.loads((output_dir / "manifest.json").read_text())
    checked = 0
    for rank in manifest["ranks"]:
        path = output_dir / rank["file"]
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8 : 8 + header_len])
        written = load_file(path)
        assert set(written) == set(rank["tensors"])
        for name, t in rank["tensors"].items():
            assert header[name]["data_offsets"] == t["data_offsets"], f"{rank['file']} {name} offsets"
            dtype = CODES[t["dtype"]]
            numel = math.prod(t["shape"])
            buf = torch.zeros(numel, dtype=dtype)
            covered = torch.zeros(numel, dtype=torch.bool)
            for piece in t["pieces"]:
                assert piece["dst_offset"] % dtype.itemsize == 0
                box = tuple(slice(a, b) for a, b in piece["slice"])
                values = raw[piece["source"]][box].to(dtype).reshape(-1)
                lo = piece["dst_offset"] // dtype.itemsize
                assert not covered[lo : lo + values.numel()].any(), f"{name}: pieces overlap"
                covered[lo : lo + values.numel()] = True
                buf[lo : lo + values.numel()] = values
            got = written[name]
            assert list(got.shape) == t["shape"] and got.dtype == dtype
            assert torch.equal(buf.reshape(got.shape), got), f"{rank['file']} {name}: pieces do not describe it"
            checked += 1
    return checked


_converted: dict[tuple[str, Layout], Path] = {}


def converted(factory: pytest.TempPathFactory, model_dir: Path, lay: Layout) -> Path:
    """Convert once per (model, layout) per session; shared by every test module that asks."""
    key = (str(model_dir), lay)
    if key not in _converted:
        out = factory.mktemp(lay.label()) / "out"
        convert(model_dir, out, **lay.kwargs())
        _converted[key] = out
    return _converted[key]


def naive() -> ModuleType:
    """benchmarks/naive_convert.py, the independent load-everything converter."""
    spec = importlib.util.spec_from_file_location("naive_convert", REPO / "benchmarks" / "naive_convert.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' own model class for the checkpoint (MixtralForCausalLM, ...) in float32, eval mode, no cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]  # no dropout, whatever the config says
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=input_ids, use_cache=False).logits
    return logits.float()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref|."""
    assert got.shape == ref.shape, f"{tuple(got.shape)} vs {tuple(ref.shape)}"
    return float((got - ref).abs().max() / ref.abs().max())


def synth_sources(c: dict[str, Any], dtype: str = "F32") -> dict[str, SourceTensor]:
    """Header entries of a classic-layout HF Mixtral checkpoint with config `c` (no data)."""
    H, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]  # noqa: E741
    d = c.get("head_dim") or H // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    shapes["lm_head.weight"] = (V, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (H,),
            f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.self_attn.q_proj.weight": (q, H),
            f"{p}.self_attn.k_proj.weight": (kv, H),
            f"{p}.self_attn.v_proj.weight": (kv, H),
            f"{p}.self_attn.o_proj.weight": (H, q),
            f"{p}.block_sparse_moe.gate.weight": (E, H),
        }
        for e in range(E):
            x = f"{p}.block_sparse_moe.experts.{e}"
            shapes |= {f"{x}.w1.weight": (I, H), f"{x}.w2.weight": (H, I), f"{x}.w3.weight": (I, H)}
    return {n: SourceTensor(dtype, s) for n, s in shapes.items()}
