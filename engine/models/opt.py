"""OPT: learned positions offset by 2, ReLU MLP, pre-norm (most sizes) or post-norm with
narrower word embeddings projected in and out (OPT-350m)."""

from __future__ import annotations

from pagedserve.engine.models.decoder import DecoderForCausalLM, DecoderSpec
from pagedserve.engine.parallel import ParallelContext


def opt_spec(config) -> DecoderSpec:
    pre_norm = config.do_layer_norm_before
    return DecoderSpec.from_config(
        config,
        intermediate_size=config.ffn_dim,
        norm="layer",
        norm_eps=1e-5,
        norm_affine=config.layer_norm_elementwise_affine,
        act=config.activation_function,
        gated_mlp=False,
        qkv_bias=config.enable_bias,
        o_bias=config.enable_bias,
        mlp_bias=config.enable_bias,
        position_offset=2,
        residual="sequential" if pre_norm else "post_norm",
        final_norm=pre_norm and not getattr(config, "_remove_final_layer_norm", False),
        embed_dim=config.word_embed_proj_dim,
    )


class OPTForCausalLM(DecoderForCausalLM):
    checkpoint_renames = (
        ("model.decoder.final_layer_norm.", "model.norm."),
        ("model.decoder.layers.", "model.layers."),
        ("model.decoder.embed_tokens.", "model.embed_tokens."),
        ("model.decoder.embed_positions.", "model.embed_positions."),
        ("model.decoder.project_in.", "model.project_in."),
        ("model.decoder.project_out.", "model.project_out."),
        (".self_attn.out_proj.", ".self_attn.o_proj."),
        (".self_attn_layer_norm.", ".input_layernorm."),
        (".final_layer_norm.", ".post_attention_layernorm."),
        (".fc1.", ".mlp.fc1."),
        (".fc2.", ".mlp.fc2."),
    )
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(opt_spec(config), tp)

    def normalize_checkpoint_name(self, name: str) -> str:
        # Meta's checkpoints were saved from OPTModel: `decoder.` without `model.`.
        return "model." + name if name.startswith("decoder.") else name
