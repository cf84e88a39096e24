"""GPT-NeoX: Pythia, Dolly v2, OpenAssistant's Pythia models, StableLM alpha. Parallel
residual (or not), partial rotary, LayerNorm, GELU MLP, biases, a fused q/k/v projection."""

from __future__ import annotations

import torch

from pagedserve.engine.models.decoder import (
    DecoderForCausalLM,
    DecoderSpec,
    partial_rotary_dim,
    rope_parameters,
)
from pagedserve.engine.parallel import ParallelContext


def gpt_neox_spec(config) -> DecoderSpec:
    head_dim = config.hidden_size // config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", True))
    return DecoderSpec.from_config(
        config,
        num_kv_heads=config.num_attention_heads,
        head_dim=head_dim,
        norm="layer",
        norm_eps=config.layer_norm_eps,
        act=config.hidden_act,
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rotary_dim=partial_rotary_dim(config, head_dim),
        rope=rope_parameters(config),
        residual="parallel" if config.use_parallel_residual else "sequential",
    )


class GPTNeoXForCausalLM(DecoderForCausalLM):
    checkpoint_renames = (
        ("gpt_neox.embed_in.", "model.embed_tokens."),
        ("gpt_neox.final_layer_norm.", "model.norm."),
        ("gpt_neox.layers.", "model.layers."),
        (".attention.query_key_value.", ".self_attn.qkv_proj."),
        (".attention.dense.", ".self_attn.o_proj."),
        (".mlp.dense_h_to_4h.", ".mlp.fc1."),
        (".mlp.dense_4h_to_h.", ".mlp.fc2."),
        ("embed_out.", "lm_head."),  # what transformers saves the LM head as, even in v5
    )
    packed_modules = {}

    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(gpt_neox_spec(config), tp)

    def convert_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # query_key_value holds [q, k, v] per head ([heads, 3, head_dim] rows); the merged
        # projection wants all q rows, then all k, then all v.
        if ".attention.query_key_value." not in name:
            return tensor
        heads, head_dim = self.spec.num_heads, self.spec.head_dim
        if tensor.shape[0] != 3 * heads * head_dim:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{3 * heads * head_dim} rows (3 x {heads} heads x {head_dim})"
            )
        rest = tensor.shape[1:]
        return tensor.view(heads, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape)
