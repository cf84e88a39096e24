"""Read llama.cpp's GGUF files: config, tokenizer and dequantized weights under Hugging Face names.

The engine treats a GGUF file like a Hugging Face folder: `load_gguf_config` gives the
`PretrainedConfig` its model registry reads, `iter_gguf_weights` yields `(hf_name, tensor)` pairs
for the same weight loader the safetensors path uses, and `load_gguf_tokenizer` gives the tokenizer
with the file's chat template. Tensors are read with the ggml project's own `gguf` package and
dequantized to float32 at load time; nothing here needs llama.cpp.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names (llama.cpp's "standardized tensor names") -> Hugging Face Llama names.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Precomputed Llama 3.1 rope frequency factors: transformers' GGUF loader drops them as well, so we
# stay token-identical to it; the warning tells the user the long-context scaling is not applied.
_IGNORED_TENSORS = ("rope_freqs.weight",)


def resolve_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself if it ends in `.gguf`, the one `.gguf` in a folder, else None."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{path} holds several .gguf files ({names}); pass the one to load.")
        return found[0] if found else None
    return None


def load_gguf_config(path: str | Path):
    """A `LlamaConfig` built from the file's metadata, the way transformers builds it."""
    from transformers import LlamaConfig

    file, reader = _open(path)
    meta = _ArchMetadata(file, reader)
    tensor_names = {t.name for t in reader.tensors}

    hidden = meta.require("embedding_length")
    num_heads = meta.require("attention.head_count")
    # llama.cpp writes key_length only when head_dim != hidden / heads; transformers reads it from
    # rope.dimension_count, which for Llama is the whole head.
    head_dim = (
        meta.get("attention.key_length") or meta.get("rope.dimension_count") or hidden // num_heads
    )
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=_vocab_size(reader, meta),
        hidden_size=hidden,
        intermediate_size=meta.require("feed_forward_length"),
        num_hidden_layers=meta.require("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=meta.require("context_length"),
        rms_norm_eps=meta.get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(meta),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    name = _field(reader, "general.name")
    if name:
        config._name_or_path = name
    return config


def iter_gguf_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor)` one at a time, dequantized and in Hugging Face layout."""
    import gguf

    file, reader = _open(path)
    meta = _ArchMetadata(file, reader)
    num_heads = meta.require("attention.head_count")
    num_kv_heads = meta.get("attention.head_count_kv", num_heads)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    logger.info("reading %d GGUF tensors (%s) from %s", len(reader.tensors), counts, file)

    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            logger.warning("ignoring GGUF tensor %s (not used by the Llama model)", tensor.name)
            continue
        hf_name = _hf_name(tensor.name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf "
                f"package cannot dequantize ({e})."
            ) from None
        # GGUF lists dimensions fastest-moving first; torch wants them the other way round.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
            values = values.copy()
        weight = torch.from_numpy(values.reshape(shape))
        if ".attn_q." in tensor.name:
            weight = _unpermute_rotary(weight, num_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_rotary(weight, num_kv_heads)
        yield hf_name, weight


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer transformers builds from the file's metadata, with the file's chat template."""
    from transformers import AutoTokenizer

    file = _resolve_existing(path)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    if tokenizer.chat_template is None:  # transformers usually copies it; re-reading costs seconds
        tokenizer.chat_template = _field(_open(file)[1], "tokenizer.chat_template")
    return tokenizer


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's Q/K row permutation.

    llama.cpp's rotary embedding rotates adjacent pairs (x0, x1), Hugging Face's rotates the two
    halves of each head, so the converter interleaves each head's rows: (num_heads, 2, half) ->
    (num_heads, half, 2). Reading them back is the inverse swap.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no place in the Llama model; this variant of the "
        f"architecture is not supported."
    )


def _resolve_existing(path: str | Path) -> Path:
    file = resolve_gguf_file(path)
    if file is None:
        raise ValueError(f"{path} is neither a .gguf file nor a folder holding one.")
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist.")
    return file


def _open(path: str | Path):
    """`(file, reader)`, the reader a memory map: tensor data is read only when touched."""
    import gguf

    file = _resolve_existing(path)
    try:
        return file, gguf.GGUFReader(file)
    except ValueError as e:  # a bad magic number, or a tensor type this gguf version does not know
        raise ValueError(f"cannot read {file} as GGUF: {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(file: Path, reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"{file.name}: GGUF architecture {arch!r} is not supported; supported: {supported}."
        )
    return arch


class _ArchMetadata:
    """The `<arch>.*` metadata keys, e.g. `llama.block_count`; checks the architecture first."""

    def __init__(self, file: Path, reader) -> None:
        self.file, self.reader, self.arch = file, reader, _architecture(file, reader)

    def get(self, key: str, default: Any = None) -> Any:
        return _field(self.reader, f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF file {self.file} lacks the metadata key {self.arch}.{key}.")
        return value


def _vocab_size(reader, meta: _ArchMetadata) -> int:
    # Same order as transformers: the explicit key, then the token list, then the embedding itself.
    size = meta.get("vocab_size")
    if size is None and "tokenizer.ggml.tokens" in reader.fields:
        size = len(reader.fields["tokenizer.ggml.tokens"].data)
    if size is None:
        embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
        size = int(embedding.shape[-1])
    return size


def _rope_scaling(meta: _ArchMetadata) -> dict | None:
    kind = meta.get("rope.scaling.type")
    factor = meta.get("rope.scaling.factor")
    if kind is None and meta.get("rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta.get("rope.scale_linear")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; supported: linear, yarn.")
