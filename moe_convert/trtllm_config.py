"""The TensorRT-LLM config.json of a converted checkpoint (spec section 4), from the family's rules data."""

from __future__ import annotations

from typing import Any

from .model_config import ModelSettings
from .plan import Plan


def trtllm_config(plan: Plan, settings: ModelSettings) -> dict[str, Any]:
    """The keys every family writes, then the family's own (`extra`, `moe`) from its rules.

    In the rules, a string `$name` stands for the model's size, flag or setting of that name.
    """
    spec, rules = plan.spec, plan.spec.rules["trtllm_config"]
    values = {**spec.values(), **settings.family}

    def render(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("$"):
            return values[value[1:]]
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        return value

    return {
        "architecture": rules["architecture"],
        "dtype": plan.dtype,
        "logits_dtype": rules["logits_dtype"],
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": settings.max_position_embeddings,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.dense_ffn_size,
        "hidden_act": rules["hidden_act"],
        "norm_epsilon": settings.rms_norm_eps,
        "position_embedding_type": rules["position_embedding_type"],
        "rotary_base": settings.rope_theta,
        "rotary_scaling": settings.rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_parallel_embedding": plan.options.use_parallel_embedding,
        "embedding_sharding_dim": plan.options.embedding_sharding_dim,
        **render(rules["extra"]),
        "share_embedding_table": plan.share_embedding_table,
        "mapping": {**plan.mapping.as_dict(), "cp_size": 1, "gpus_per_node": 8},
        "moe": {"num_experts": spec.num_experts, "top_k": spec.top_k, **render(rules["moe"])},
        "quantization": _quantization(plan),
    }


def _quantization(plan: Plan) -> dict[str, Any]:
    """TensorRT-LLM's `quantization` block: W8A16 / W4A16 with its defaults when weight-only, else none."""
    scheme = plan.options.weight_only
    if scheme is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    return scheme.quantization_config()
