"""Pure-torch simulation of TensorRT-LLM running a converted MoE checkpoint (TP x MoE-TP x MoE-EP x PP).

It reads only the converted directory (config.json + rank{N}.safetensors) and computes what each rank would
compute, summing partial outputs over the TP group as the all-reduce does. All math is float32. What a
layer has decides what it computes, as in TensorRT-LLM: a qkv bias, per-head q/k RMSNorm (Qwen3-MoE), a
shared expert with its sigmoid gate (Qwen2-MoE); moe.normalization_mode says whether top-k is renormalised.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

RankState = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_cos_sin(seq: int, d: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX RoPE tables [seq, d] (frequencies repeated over the two halves)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def attention_partial(
    x_BSH: torch.Tensor, r: RankState, p: str, q_heads: int, d: int, base: float, eps: float
) -> torch.Tensor:
    """One rank's attention: its heads only, times its dense column chunk (partial sum of the output)."""
    B, S, _ = x_BSH.shape
    qkv, dense = r[f"{p}.attention.qkv.weight"], r[f"{p}.attention.dense.weight"]
    kv_heads = (qkv.shape[0] // d - q_heads) // 2  # derived from the shape: nkv/tp, or 1 when duplicated
    q_rows, kv_rows = q_heads * d, kv_heads * d
    qkv_BSX = x_BSH @ qkv.T
    if f"{p}.attention.qkv.bias" in r:
        qkv_BSX = qkv_BSX + r[f"{p}.attention.qkv.bias"]
    q, k, v = (
        qkv_BSX[..., lo : lo + n].reshape(B, S, -1, d).transpose(1, 2)  # [B, heads, S, d]
        for lo, n in ((0, q_rows), (q_rows, kv_rows), (q_rows + kv_rows, kv_rows))
    )
    if f"{p}.attention.q_layernorm.weight" in r:  # RMSNorm over each head's d values, before RoPE
        q = rms_norm(q, r[f"{p}.attention.q_layernorm.weight"], eps)
        k = rms_norm(k, r[f"{p}.attention.k_layernorm.weight"], eps)
    cos, sin = rope_cos_sin(S, d, base)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = (t.repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v))  # GQA inside the rank
    scores = (q @ k.transpose(-1, -2)) / float(d) ** 0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    ctx = (probs @ v).transpose(1, 2).reshape(B, S, q_heads * d)
    return torch.matmul(ctx, dense.T)


def moe_partial(
    x_NH: torch.Tensor, weights_NE: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, first_expert: int
) -> torch.Tensor:
    """One rank's MoE output: its local experts, its FFN slice; fc rows = [up; gate]."""
    out = torch.zeros_like(x_NH)
    ffn = fc.shape[1] // 2
    for k in range(fc.shape[0]):
        up_FH, gate_FH, proj_HF = fc[k, :ffn], fc[k, ffn:], proj[k]
        h = F.silu(x_NH @ gate_FH.T) * (x_NH @ up_FH.T)
        out += weights_NE[:, first_expert + k, None] * (h @ proj_HF.T)
    return out


def route(x_NH: torch.Tensor, router_EH: torch.Tensor, top_k: int, normalization_mode: int) -> torch.Tensor:
    """Dense [N, E] routing weights: softmax over all experts, top-k, renormalised in mode 1 (not in mode 0)."""
    assert normalization_mode in (0, 1), f"normalization_mode {normalization_mode} is not simulated"
    probs = (x_NH @ router_EH.T).softmax(-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    if normalization_mode == 1:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_w)


def shared_expert_partial(x_NH: torch.Tensor, r: RankState, p: str) -> torch.Tensor:
    """One rank's share of the shared expert: its fc rows [up; gate] and proj columns, times the sigmoid gate
    (a rank file without the gate computes the expert ungated)."""
    fc_FH, proj_HF = r[f"{p}.mlp.shared_expert.fc.weight"], r[f"{p}.mlp.shared_expert.proj.weight"]
    up_FH, gate_FH = fc_FH.chunk(2, dim=0)
    y = (F.silu(x_NH @ gate_FH.T) * (x_NH @ up_FH.T)) @ proj_HF.T
    if f"{p}.mlp.shared_expert_gate.weight" in r:
        y = y * torch.sigmoid(x_NH @ r[f"{p}.mlp.shared_expert_gate.weight"].T)
    return y


def embed(ids: torch.Tensor, group: list[RankState], cfg: dict[str, Any]) -> torch.Tensor:
    tables = [r["transformer.vocab_embedding.weight"] for r in group]
    if not cfg.get("use_parallel_embedding", False):
        return F.embedding(ids, tables[0])
    if cfg.get("embedding_sharding_dim", 0) == 1:
        return torch.cat([F.embedding(ids, t) for t in tables], dim=-1)  # all-gather of hidden chunks
    out = torch.zeros(*ids.shape, tables[0].shape[1])
    lo = 0
    for t in tables:  # each rank looks up only the ids in its vocab chunk; all-reduce sums them
        local = ids - lo
        inside = (local >= 0) & (local < t.shape[0])
        out += F.embedding(local.clamp(0, t.shape[0] - 1), t) * inside[..., None]
        lo += t.shape[0]
    return out


def forward_from_rank_files(output_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits float32 [batch, seq, vocab] of the converted checkpoint in output_dir for input_ids."""
    with open(os.path.join(output_dir, "config.json")) as f:
        cfg = json.load(f)
    m = cfg["mapping"]
    tp, pp, moe_ep = m["tp_size"], m["pp_size"], m["moe_ep_size"]
    d, eps, base = cfg["head_size"], cfg["norm_epsilon"], cfg["rotary_base"]
    q_heads = cfg["num_attention_heads"] // tp
    top_k, mode = cfg["moe"]["top_k"], cfg["moe"]["normalization_mode"]
    ranks = [
        {n: t.float() for n, t in load_file(os.path.join(output_dir, f"rank{r}.safetensors")).items()}
        for r in range(m["world_size"])
    ]
    B, S = input_ids.shape

    x = embed(input_ids, ranks[:tp], cfg)
    for pp_rank in range(pp):
        group = ranks[pp_rank * tp : (pp_rank + 1) * tp]
        n_local = len({n.split(".")[2] for n in group[0] if n.startswith("transformer.layers.")})
        for j in range(n_local):
            p = f"transformer.layers.{j}"
            h = rms_norm(x, group[0][f"{p}.input_layernorm.weight"], eps)
            attn = [attention_partial(h, r, p, q_heads, d, base, eps) for r in group]
            x = x + torch.stack(attn).sum(0)  # all-reduce over the TP group
            h_NH = rms_norm(x, group[0][f"{p}.post_layernorm.weight"], eps).reshape(B * S, -1)
            routers = [r[f"{p}.mlp.router.weight"] for r in group]
            assert all(torch.equal(routers[0], w) for w in routers), "router must be identical on every rank"
            weights_NE = route(h_NH, routers[0], top_k, mode)
            moe = [
                moe_partial(
                    h_NH,
                    weights_NE,
                    r[f"{p}.mlp.fc.weight"],
                    r[f"{p}.mlp.proj.weight"],
                    (tp_rank % moe_ep) * r[f"{p}.mlp.fc.weight"].shape[0],
                )
                for tp_rank, r in enumerate(group)
            ]
            moe += [shared_expert_partial(h_NH, r, p) for r in group if f"{p}.mlp.shared_expert.fc.weight" in r]
            x = x + torch.stack(moe).sum(0).view(B, S, -1)  # all-reduce over the TP group

    last = ranks[(pp - 1) * tp :]
    h = rms_norm(x, last[0]["transformer.ln_f.weight"], eps)
    logits = torch.cat([h @ r["lm_head.weight"].T for r in last], dim=-1)  # all-gather of vocab chunks
    return logits[..., : cfg["vocab_size"]]
