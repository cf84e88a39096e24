"""StableLM 2 and StableLM 3B-4E1T (`StableLmForCausalLM`): Llama's names and gated MLP with
LayerNorm, partial rotary, optional q/k/v bias, optional parallel residual and per-head
q/k LayerNorm. The StableLM alpha models are GPT-NeoX (gpt_neox.py)."""

from __future__ import annotations

from pagedserve.engine.models.decoder import (
    DecoderForCausalLM,
    DecoderSpec,
    partial_rotary_dim,
    rope_parameters,
)
from pagedserve.engine.parallel import ParallelContext


def stablelm_spec(config) -> DecoderSpec:
    head_dim = config.hidden_size // config.num_attention_heads
    return DecoderSpec.from_config(
        config,
        head_dim=head_dim,
        norm="layer",
        norm_eps=config.layer_norm_eps,
        act=config.hidden_act,
        qkv_bias=bool(config.use_qkv_bias),
        qk_norm=bool(getattr(config, "qk_layernorm", False)),
        rotary_dim=partial_rotary_dim(config, head_dim),
        rope=rope_parameters(config),
        residual="parallel_shared_norm" if config.use_parallel_residual else "sequential",
    )


class StableLmForCausalLM(DecoderForCausalLM):
    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(stablelm_spec(config), tp)
