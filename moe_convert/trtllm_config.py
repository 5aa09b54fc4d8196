"""The TensorRT-LLM config.json of a converted checkpoint (spec section 4)."""

from __future__ import annotations

from typing import Any

from .plan import Plan


def trtllm_config(plan: Plan) -> dict[str, Any]:
    spec, rules = plan.spec, plan.spec.rules["trtllm_config"]
    return {
        "architecture": rules["architecture"],
        "dtype": plan.dtype,
        "logits_dtype": rules["logits_dtype"],
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": rules["hidden_act"],
        "norm_epsilon": spec.rms_norm_eps,
        "position_embedding_type": rules["position_embedding_type"],
        "rotary_base": spec.rope_theta,
        "rotary_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_parallel_embedding": plan.options.use_parallel_embedding,
        "embedding_sharding_dim": plan.options.embedding_sharding_dim,
        "mapping": {**plan.mapping.as_dict(), "cp_size": 1, "gpus_per_node": 8},
        "moe": {
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "normalization_mode": rules["moe_normalization_mode"],
        },
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
