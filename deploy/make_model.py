"""Build tiny random-weight Hugging Face models with an offline byte-level BPE tokenizer.

Model hubs are out of reach, so tests and demos use models made here: a `transformers`
config from a size preset, random weights from a fixed seed, and a tokenizer trained on
the corpus shipped in `data/corpus.txt`. The same inputs always give byte-identical files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: pad=0, bos=1, eos=2 (Llama's defaults), then the chat tokens.
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture: its config and model classes, and per-preset kwargs."""

    config_cls: type[PretrainedConfig]
    model_cls: type[PreTrainedModel]
    presets: dict[str, dict[str, Any]]
    # A size field (see SIZE_FIELDS) -> this config class's name for it, where it differs;
    # None where the family has no such field (no GQA: every head has its own KV).
    size_names: dict[str, str | None] = field(default_factory=dict)


# The sizes `sized()` sets on any architecture, by their Llama names.
SIZE_FIELDS = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "max_positions": "max_position_embeddings",
    "init_std": "initializer_range",
}


# Add an architecture by adding a row; preset kwargs use that config class's own names.
# initializer_range is raised from transformers' 0.02: at 0.02 the tied tiny model only echoes
# its input token and ignores context, which would let attention bugs pass engine tests.
# Both presets get logits with std ~1.6, so greedy picks are context-dependent and clear-cut.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        presets={
            "tiny": dict(
                hidden_size=64,
                intermediate_size=172,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                max_position_embeddings=1024,
                rope_theta=10000.0,
                initializer_range=0.2,
            ),
            "small": dict(
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=4,
                tie_word_embeddings=False,
                max_position_embeddings=2048,
                rope_theta=10000.0,
                initializer_range=0.1,
            ),
        },
    ),
    # The other families get a tiny preset each (odd-ish widths, GQA where the family has it)
    # and, where a family has layouts that take different code paths, a tiny preset for each.
    "mistral": ArchSpec(
        config_cls=MistralConfig,
        model_cls=MistralForCausalLM,
        presets={
            # head_dim 24 != hidden / heads (as Mistral-Nemo), and a sliding window shorter
            # than the test prompts, so the window is exercised.
            "tiny": dict(
                hidden_size=64,
                intermediate_size=152,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=24,
                sliding_window=24,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
                initializer_range=0.2,
            ),
        },
    ),
    "qwen2": ArchSpec(
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        presets={
            "tiny": dict(
                hidden_size=72,
                intermediate_size=168,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                initializer_range=0.2,
            ),
            # Qwen2's per-layer window: layer 0 attends to everything, layer 1 to 16 tokens.
            "tiny-sliding": dict(
                hidden_size=72,
                intermediate_size=168,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=2,
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=1,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                initializer_range=0.2,
            ),
        },
    ),
    "gpt_neox": ArchSpec(
        config_cls=GPTNeoXConfig,
        model_cls=GPTNeoXForCausalLM,
        size_names={"kv_heads": None},
        presets={
            # Pythia's layout: parallel residual, a quarter of each head rotated.
            "tiny": dict(
                hidden_size=96,
                intermediate_size=200,
                num_hidden_layers=2,
                num_attention_heads=6,
                rotary_pct=0.25,
                use_parallel_residual=True,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
                initializer_range=0.2,
            ),
            "tiny-sequential": dict(
                hidden_size=80,
                intermediate_size=176,
                num_hidden_layers=2,
                num_attention_heads=5,
                rotary_pct=0.5,
                use_parallel_residual=False,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
                initializer_range=0.2,
            ),
        },
    ),
    "stablelm": ArchSpec(
        config_cls=StableLmConfig,
        model_cls=StableLmForCausalLM,
        presets={
            # StableLM 2 1.6B's layout: sequential residual, q/k/v bias, a quarter rotated.
            "tiny": dict(
                hidden_size=64,
                intermediate_size=152,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                partial_rotary_factor=0.25,
                use_qkv_bias=True,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
                initializer_range=0.2,
            ),
            # StableLM 2 12B's: parallel residual with one norm, per-head q/k LayerNorm.
            "tiny-parallel": dict(
                hidden_size=64,
                intermediate_size=152,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                partial_rotary_factor=0.5,
                use_qkv_bias=False,
                use_parallel_residual=True,
                qk_layernorm=True,
                max_position_embeddings=1024,
                tie_word_embeddings=False,
                initializer_range=0.2,
            ),
        },
    ),
    "gpt2": ArchSpec(
        config_cls=GPT2Config,
        model_cls=GPT2LMHeadModel,
        size_names={
            "hidden": "n_embd",
            "intermediate": "n_inner",
            "layers": "n_layer",
            "heads": "n_head",
            "kv_heads": None,
            "max_positions": "n_positions",
        },
        presets={
            "tiny": dict(
                n_embd=72,
                n_inner=200,
                n_layer=2,
                n_head=3,
                n_positions=512,
                tie_word_embeddings=True,
                initializer_range=0.2,
            ),
        },
    ),
    "opt": ArchSpec(
        config_cls=OPTConfig,
        model_cls=OPTForCausalLM,
        size_names={"intermediate": "ffn_dim", "kv_heads": None, "init_std": "init_std"},
        presets={
            # OPT-125m's layout: pre-norm, tied embeddings.
            "tiny": dict(
                hidden_size=80,
                ffn_dim=176,
                num_hidden_layers=2,
                num_attention_heads=5,
                max_position_embeddings=512,
                do_layer_norm_before=True,
                tie_word_embeddings=True,
                init_std=0.2,
            ),
            # OPT-350m's: post-norm, word embeddings narrower than hidden (project_in/out).
            "tiny-post-norm": dict(
                hidden_size=80,
                ffn_dim=176,
                num_hidden_layers=2,
                num_attention_heads=5,
                word_embed_proj_dim=48,
                max_position_embeddings=512,
                do_layer_norm_before=False,
                tie_word_embeddings=True,
                init_std=0.2,
            ),
        },
    ),
}


def _spec(arch: str, preset: str) -> tuple[ArchSpec, dict[str, Any]]:
    spec = ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"unknown arch {arch!r}; supported archs: {', '.join(ARCHS)}")
    kwargs = spec.presets.get(preset)
    if kwargs is None:
        raise ValueError(
            f"unknown preset {preset!r} for arch {arch!r}; "
            f"allowed presets: {', '.join(spec.presets)}"
        )
    return spec, kwargs


def sized(arch: str, **sizes: int | float) -> dict[str, Any]:
    """Config overrides that give `arch` the sizes named by SIZE_FIELDS' keys (hidden=512,
    layers=8, ...), in that family's own field names; for `build_model(overrides=...)`.
    kv_heads is dropped for families without grouped-query attention. Mistral gets its real
    configs' head_dim (hidden / heads) and Mistral 7B's 4096-token sliding window instead of
    the tiny preset's (which exists to exercise the window in tests)."""
    spec, _ = _spec(arch, "tiny")
    unknown = set(sizes) - set(SIZE_FIELDS)
    if unknown:
        raise ValueError(f"unknown size fields {sorted(unknown)}; known: {list(SIZE_FIELDS)}")
    overrides = {}
    for key, value in sizes.items():
        name = spec.size_names.get(key, SIZE_FIELDS[key])
        if name is not None:
            overrides[name] = value
    if arch == "mistral":
        overrides["sliding_window"] = 4096
        if "hidden" in sizes and "heads" in sizes:
            overrides["head_dim"] = sizes["hidden"] // sizes["heads"]
    return overrides


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the shipped corpus (deterministic)."""
    # Beside this file: importlib.resources cannot read a namespace package (deploy/ is one).
    corpus = Path(__file__).parent / "data" / "corpus.txt"
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)

    # No normalizer: any normalization (NFC, lowercasing) would break the byte round trip.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so text the corpus never showed still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # transformers 4 would strip " ." spaces on decode
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_model(
    arch: str, preset: str, out: Path, seed: int = 0, overrides: dict[str, Any] | None = None
) -> Path:
    """Write a random-weight `arch` model of size `preset` plus its tokenizer into `out`.

    `overrides` replaces config fields of the preset (benchmarks size models this way); a
    vocab_size below the tokenizer's is refused. Raises ValueError for an unknown arch or
    preset. Returns `out`.
    """
    spec, preset_kwargs = _spec(arch, preset)
    out = Path(out)
    tokenizer = train_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, PAD)}
    kwargs = {"vocab_size": len(tokenizer), **preset_kwargs, **(overrides or {})}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size must be at least the tokenizer's {len(tokenizer)}")

    config = spec.config_cls(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], **kwargs
    )
    tokenizer.model_max_length = config.max_position_embeddings
    torch.manual_seed(seed)
    model = spec.model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]
    )

    out.mkdir(parents=True, exist_ok=True)
    # safetensors is save_pretrained's default format (and the only one in transformers 5).
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built %s/%s (seed %d): %d params, vocab %d -> %s",
        arch,
        preset,
        seed,
        n_params,
        config.vocab_size,
        out,
    )
    return out
