"""GPT-2: learned absolute positions, LayerNorm, GELU MLP, fused c_attn, Conv1D weights."""

from __future__ import annotations

import torch

from pagedserve.engine.models.decoder import DecoderForCausalLM, DecoderSpec
from pagedserve.engine.parallel import ParallelContext

# Conv1D layers store their weight as [in, out], the transpose of nn.Linear's.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def gpt2_spec(config) -> DecoderSpec:
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention (an encoder-decoder) is not supported")
    head_dim = config.n_embd // config.n_head
    scales = [
        (head_dim**-0.5 if config.scale_attn_weights else 1.0)
        / (layer + 1 if config.scale_attn_by_inverse_layer_idx else 1)
        for layer in range(config.n_layer)
    ]
    return DecoderSpec.from_config(
        config,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        act=config.activation_function,
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        position_offset=0,
        attn_scales=tuple(scales),
    )


class GPT2LMHeadModel(DecoderForCausalLM):
    checkpoint_renames = (
        ("transformer.wte.", "model.embed_tokens."),
        ("transformer.wpe.", "model.embed_positions."),
        ("transformer.ln_f.", "model.norm."),
        ("transformer.h.", "model.layers."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".attn.c_attn.", ".self_attn.qkv_proj."),
        (".attn.c_proj.", ".self_attn.o_proj."),
        (".mlp.c_fc.", ".mlp.fc1."),
        (".mlp.c_proj.", ".mlp.fc2."),
    )
    packed_modules = {}

    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(gpt2_spec(config), tp)

    def normalize_checkpoint_name(self, name: str) -> str:
        # OpenAI's original checkpoints were saved from GPT2Model: no `transformer.` prefix.
        if name.startswith(("transformer.", "lm_head.")):
            return name
        return "transformer." + name

    def convert_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if name.endswith(_CONV1D) else tensor
