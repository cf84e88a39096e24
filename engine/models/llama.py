"""Llama and its kin: Vicuna, Koala, TinyLlama, SmolLM, and Mistral (sliding window honoured)."""

from __future__ import annotations

from pagedserve.engine.models.decoder import (
    DecoderForCausalLM,
    DecoderSpec,
    rope_parameters,
    sliding_windows,
)
from pagedserve.engine.parallel import ParallelContext


def llama_spec(config, **fields) -> DecoderSpec:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bias = bool(getattr(config, "attention_bias", False))
    base = dict(
        head_dim=head_dim,
        norm="rms",
        norm_eps=config.rms_norm_eps,
        act=getattr(config, "hidden_act", "silu"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        rotary_dim=head_dim,
        rope=rope_parameters(config),
        sliding_windows=sliding_windows(config),
    )
    return DecoderSpec.from_config(config, **{**base, **fields})


class LlamaForCausalLM(DecoderForCausalLM):
    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(llama_spec(config), tp)


# Mistral is Llama with a sliding window, which llama_spec reads from the config.
MistralForCausalLM = LlamaForCausalLM
