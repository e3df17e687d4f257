"""What a forward costs, counted from a model's config: multiply-adds as 2 FLOPs, norms, softmax and
activations left out.  The app predicts a budget's prefill cost with it; the benchmarks set measured
times beside it."""

from __future__ import annotations

from typing import Any


def llm_linear_params(text_config: Any) -> int:
    """Weights each token meets in one decoder layer: q, o (h x h), k, v (h x kv), gate/up/down (3 h I)."""
    width = text_config.hidden_size
    kv_width = text_config.num_key_value_heads * (width // text_config.num_attention_heads)
    return 2 * width * width + 2 * width * kv_width + 3 * width * text_config.intermediate_size


def prefill_flops(text_config: Any, tokens: int) -> float:
    """LM prefill of n tokens to the first token: per layer 2*n*W (W linear weights) plus causal
    attention 2*n*(n+1)*h (QK^T and AV over the n(n+1)/2 visible pairs), then the LM head on the last token."""
    width, layers = text_config.hidden_size, text_config.num_hidden_layers
    per_layer = 2 * tokens * llm_linear_params(text_config) + 2 * tokens * (tokens + 1) * width
    return float(layers * per_layer + 2 * width * text_config.vocab_size)
