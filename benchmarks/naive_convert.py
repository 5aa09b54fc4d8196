"""Naive reference converter: HF Mixtral / Qwen2-MoE / Qwen3-MoE -> TensorRT-LLM per-rank safetensors.

Deliberately simple: it loads every source tensor into memory, then builds each rank's state dict
straight from the layout specs (shared/spec/trtllm-mixtral-layout.md, trtllm-qwen-moe-layout.md). It is the
benchmark baseline and an independent oracle for tests, so clarity wins over speed and memory everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# What the layout specs say differs per family (by HF model_type): the MoE module and per-expert names
# (gate, up, down), whether q/k/v have biases by default, per-head q/k norms, a shared expert, and the
# family's own config.json keys.
QWEN = {"moe": "mlp", "names": ("gate_proj", "up_proj", "down_proj"), "qwen_keys": True}
FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"moe": "block_sparse_moe", "names": ("w1", "w3", "w2"), "qwen_keys": False},
    "qwen2_moe": {**QWEN, "bias": True, "qk_norm": False, "shared_expert": True},
    "qwen3_moe": {**QWEN, "bias": False, "qk_norm": True, "shared_expert": False},
}


def resolve_moe(tp: int, moe_tp: int | None, moe_ep: int | None) -> tuple[int, int]:
    """Resolve (moe_tp, moe_ep) as in spec section 1."""
    if moe_tp is None and moe_ep is None:
        return tp, 1
    if moe_tp is None:
        assert moe_ep is not None
        return (tp // moe_ep if moe_ep > 0 else 0), moe_ep
    if moe_ep is None:
        return moe_tp, (tp // moe_tp if moe_tp > 0 else 0)
    return moe_tp, moe_ep


def resolve_dtype(dtype: str, config: Any) -> torch.dtype:
    """`auto` takes the source dtype (torch_dtype or dtype), turning float32 (or none) into float16."""
    if dtype != "auto":
        return DTYPES[dtype]
    src = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(src, str):
        src = DTYPES.get(src)
    return torch.float16 if src in (None, torch.float32) else src


def load_all(model_dir: str) -> dict[str, torch.Tensor]:
    """Load every tensor of the shards named by the index (never a glob: stray files must be ignored)."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(model_dir, name)))
    return state


Tensor4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def experts(state: dict[str, torch.Tensor], i: int, n_experts: int, inter: int, family: dict[str, Any]) -> Tensor4:
    """Return (router_EH, w1_EIH gate, w3_EIH up, w2_EHI down) of layer i, from either source layout."""
    fused = f"model.layers.{i}.mlp.experts.gate_up_proj"
    if fused in state:
        gate_up_E2IH = state[fused]
        w1_EIH, w3_EIH = gate_up_E2IH[:, :inter], gate_up_E2IH[:, inter:]
        w2_EHI = state[f"model.layers.{i}.mlp.experts.down_proj"]
        return state[f"model.layers.{i}.mlp.gate.weight"], w1_EIH, w3_EIH, w2_EHI
    p = f"model.layers.{i}.{family['moe']}"
    w1_EIH, w3_EIH, w2_EHI = (
        torch.stack([state[f"{p}.experts.{e}.{w}.weight"] for e in range(n_experts)]) for w in family["names"]
    )
    return state[f"{p}.gate.weight"], w1_EIH, w3_EIH, w2_EHI


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 up to a multiple of `multiple`."""
    pad = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def naive_convert(
    model_dir: str,
    output_dir: str,
    tp_size: int = 1,
    pp_size: int = 1,
    moe_tp_size: int | None = None,
    moe_ep_size: int | None = None,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
) -> None:
    """Convert model_dir into output_dir/rank{N}.safetensors + config.json, loading everything at once."""
    cfg = AutoConfig.from_pretrained(model_dir)
    family = FAMILIES[cfg.model_type]
    tp, pp = tp_size, pp_size
    moe_tp, moe_ep = resolve_moe(tp, moe_tp_size, moe_ep_size)
    out_dtype = resolve_dtype(dtype, cfg)
    H, E = cfg.hidden_size, cfg.num_experts  # num_experts: Mixtral maps it to num_local_experts
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size  # noqa: E741  # each expert's FFN
    S = cfg.shared_expert_intermediate_size if family.get("shared_expert") else 0
    bias = getattr(cfg, "qkv_bias", family.get("bias", False))
    nh, L = cfg.num_attention_heads, cfg.num_hidden_layers
    nkv = cfg.num_key_value_heads or nh
    d = getattr(cfg, "head_dim", None) or H // nh
    checks = {
        f"moe_tp*moe_ep ({moe_tp}*{moe_ep}) must equal tp_size ({tp})": moe_tp * moe_ep == tp,
        f"num_local_experts ({E}) must be divisible by moe_ep_size ({moe_ep})": E % moe_ep == 0,
        f"intermediate_size ({I}) must be divisible by moe_tp_size ({moe_tp})": I % moe_tp == 0,
        f"num_attention_heads ({nh}) must be divisible by tp_size ({tp})": nh % tp == 0,
        f"num_key_value_heads ({nkv}) and tp_size ({tp}) must divide one another": (
            nkv % tp == 0 if nkv >= tp else tp % nkv == 0
        ),
        f"pp_size ({pp}) must be <= num_hidden_layers ({L})": pp <= L,
        f"shared_expert_intermediate_size ({S}) must be divisible by tp_size ({tp})": S % tp == 0,
        f"all sizes must be >= 1 (tp {tp}, pp {pp}, moe_tp {moe_tp}, moe_ep {moe_ep})": min(tp, pp, moe_tp, moe_ep)
        >= 1,
        f"hidden_size ({H}) must be divisible by tp_size ({tp}) to shard the embedding on dim 1": not (
            use_parallel_embedding and embedding_sharding_dim == 1 and H % tp
        ),
    }
    failed = [msg for msg, ok in checks.items() if not ok]
    if failed:
        raise ValueError("; ".join(failed))

    state = load_all(model_dir)
    embed_VH = state["model.embed_tokens.weight"]
    lm_head_VH = state.get("lm_head.weight", embed_VH)  # tied checkpoints may omit lm_head
    stages = torch.tensor_split(torch.arange(L), pp)

    def own(t: torch.Tensor, dt: torch.dtype = out_dtype) -> torch.Tensor:
        # always a fresh contiguous copy, so no two saved tensors share storage
        return t.to(dtype=dt, copy=True).contiguous()

    os.makedirs(output_dir, exist_ok=True)
    for rank in range(tp * pp):
        tp_rank, pp_rank = rank % tp, rank // tp
        ep_rank, mtp_rank = tp_rank % moe_ep, tp_rank // moe_ep
        e_lo, e_hi = ep_rank * E // moe_ep, (ep_rank + 1) * E // moe_ep
        i_lo, i_hi = mtp_rank * I // moe_tp, (mtp_rank + 1) * I // moe_tp
        out: dict[str, torch.Tensor] = {}
        if pp_rank == 0:
            if not use_parallel_embedding:
                out["transformer.vocab_embedding.weight"] = own(embed_VH)
            elif embedding_sharding_dim == 0:
                out["transformer.vocab_embedding.weight"] = own(pad_rows(embed_VH, tp).chunk(tp, 0)[tp_rank])
            else:
                out["transformer.vocab_embedding.weight"] = own(embed_VH.chunk(tp, 1)[tp_rank])
        for j, i in enumerate(stages[pp_rank].tolist()):
            src, dst = f"model.layers.{i}", f"transformer.layers.{j}"
            out[f"{dst}.input_layernorm.weight"] = own(state[f"{src}.input_layernorm.weight"])
            for suffix in ("weight", "bias") if bias else ("weight",):
                q = state[f"{src}.self_attn.q_proj.{suffix}"]
                k = state[f"{src}.self_attn.k_proj.{suffix}"]
                v = state[f"{src}.self_attn.v_proj.{suffix}"]
                if nkv < tp:  # duplicate each kv head tp/nkv times consecutively: h0, h0, h1, h1, ...
                    k, v = (w.view(nkv, d, *w.shape[1:]).repeat_interleave(tp // nkv, 0).flatten(0, 1) for w in (k, v))
                qkv = torch.cat([w.chunk(tp, 0)[tp_rank] for w in (q, k, v)])
                out[f"{dst}.attention.qkv.{suffix}"] = own(qkv)
            if family.get("qk_norm"):
                out[f"{dst}.attention.q_layernorm.weight"] = own(state[f"{src}.self_attn.q_norm.weight"])
                out[f"{dst}.attention.k_layernorm.weight"] = own(state[f"{src}.self_attn.k_norm.weight"])
            out[f"{dst}.attention.dense.weight"] = own(state[f"{src}.self_attn.o_proj.weight"].chunk(tp, 1)[tp_rank])
            out[f"{dst}.post_layernorm.weight"] = own(state[f"{src}.post_attention_layernorm.weight"])
            router_EH, w1_EIH, w3_EIH, w2_EHI = experts(state, i, E, I, family)
            out[f"{dst}.mlp.router.weight"] = own(router_EH, torch.float32)
            # up (w3) rows first, then gate (w1) rows: TRT-LLM's fused gated MoE order
            fc_E2IH = torch.cat([w3_EIH[e_lo:e_hi, i_lo:i_hi], w1_EIH[e_lo:e_hi, i_lo:i_hi]], dim=1)
            out[f"{dst}.mlp.fc.weight"] = own(fc_E2IH)
            out[f"{dst}.mlp.proj.weight"] = own(w2_EHI[e_lo:e_hi, :, i_lo:i_hi])
            if S:  # the shared expert: a dense MLP split over the whole TP group, up chunk then gate chunk
                se = f"{src}.mlp.shared_expert"
                up, gate = state[f"{se}.up_proj.weight"], state[f"{se}.gate_proj.weight"]
                out[f"{dst}.mlp.shared_expert.fc.weight"] = own(
                    torch.cat([up.chunk(tp, 0)[tp_rank], gate.chunk(tp, 0)[tp_rank]])
                )
                out[f"{dst}.mlp.shared_expert.proj.weight"] = own(state[f"{se}.down_proj.weight"].chunk(tp, 1)[tp_rank])
                out[f"{dst}.mlp.shared_expert_gate.weight"] = own(state[f"{src}.mlp.shared_expert_gate.weight"])
        if pp_rank == pp - 1:
            out["transformer.ln_f.weight"] = own(state["model.norm.weight"])
            out["lm_head.weight"] = own(pad_rows(lm_head_VH, tp).chunk(tp, 0)[tp_rank])
        save_file(out, os.path.join(output_dir, f"rank{rank}.safetensors"))

    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope:  # transformers 5 folds rope_scaling into rope_parameters
        scaling = None if rope.get("rope_type", "default") == "default" else rope
    else:
        scaling = getattr(cfg, "rope_scaling", None)
    trt_config = {
        "architecture": cfg.architectures[0],
        "dtype": str(out_dtype).removeprefix("torch."),
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": H,
        "num_hidden_layers": L,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "intermediate_size": cfg.intermediate_size,
        "head_size": d,
        "hidden_act": "swiglu",
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope_theta,
        "rotary_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "use_parallel_embedding": use_parallel_embedding,
        "embedding_sharding_dim": embedding_sharding_dim,
        "share_embedding_table": False,  # TensorRT-LLM's --use_embedding_sharing is not offered here
        "mapping": {
            "world_size": tp * pp,
            "tp_size": tp,
            "pp_size": pp,
            "moe_tp_size": moe_tp,
            "moe_ep_size": moe_ep,
            "cp_size": 1,
            "gpus_per_node": 8,
        },
        "moe": {"num_experts": E, "top_k": cfg.num_experts_per_tok, "normalization_mode": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if family["qwen_keys"]:  # the keys trtllm-qwen-moe-layout.md adds
        trt_config |= {
            "qwen_type": cfg.model_type,
            "attn_bias": bias,
            "mlp_bias": False,
            "use_logn_attn": False,
            "seq_length": getattr(cfg, "seq_length", None) or 8192,
            "moe_intermediate_size": I,
            "moe_shared_expert_intermediate_size": S,
        }
        trt_config["moe"] |= {
            "normalization_mode": 1 if cfg.norm_topk_prob else 0,
            "sparse_mixer_epsilon": 0.01,
            "tp_mode": 0,
            "shared_expert_intermediate_size": S,
        }
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(trt_config, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    """Parse TensorRT-LLM-style flags and run naive_convert."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--moe_tp_size", type=int, default=None)
    p.add_argument("--moe_ep_size", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--use_parallel_embedding", action="store_true")
    p.add_argument("--embedding_sharding_dim", type=int, default=0, choices=[0, 1])
    a = p.parse_args(argv)
    naive_convert(
        a.model_dir,
        a.output_dir,
        tp_size=a.tp_size,
        pp_size=a.pp_size,
        moe_tp_size=a.moe_tp_size,
        moe_ep_size=a.moe_ep_size,
        dtype=a.dtype,
        use_parallel_embedding=a.use_parallel_embedding,
        embedding_sharding_dim=a.embedding_sharding_dim,
    )


if __name__ == "__main__":
    main()
