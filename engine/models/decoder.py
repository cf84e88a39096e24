"""The decoder-only transformer that every supported architecture is, built from a spec.

An architecture file maps its Hugging Face config onto a `DecoderSpec` (which norm, which
activation, which biases, rotary or learned positions, how the residual runs) and its
checkpoint names onto this module's parameter names (`checkpoint_renames`, applied in order,
then `packed_modules` for projections that this module merges). Parameter names follow
Llama's checkpoints, so Llama itself needs no renames.

Tensor parallelism lives here once for every architecture, Megatron-style: q/k/v and
gate/up (or fc1) are column-parallel, split by heads and rows; o_proj and down (or fc2) are
row-parallel with an all-reduce; embedding and LM head are split by vocabulary; norms and
position embeddings are replicated. Each rank builds its shard (see engine/parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pagedserve.engine.batch import Batch
from pagedserve.engine.layers import (
    ActAndMul,
    ColumnParallelLinear,
    LayerNorm,
    LearnedPositionEmbedding,
    PagedAttention,
    ParallelLMHead,
    PerHeadLayerNorm,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    activation,
)
from pagedserve.engine.parallel import ParallelContext

RESIDUAL_STYLES = ("sequential", "parallel", "parallel_shared_norm", "post_norm")


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm: str = "rms"  # "rms" or "layer"
    norm_eps: float = 1e-6
    norm_affine: bool = True  # False: LayerNorms without weight and bias (an OPT option)
    act: str = "silu"
    gated_mlp: bool = True  # act(gate(x)) * up(x) (Llama); else fc2(act(fc1(x))) (GPT-2)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # a LayerNorm per head on q and k before rotary (StableLM 2)
    rotary_dim: int | None = None  # None: no rotary embedding; < head_dim: partial rotary
    rope: dict = field(default_factory=dict)
    position_offset: int | None = None  # learned absolute positions, table offset (OPT: 2)
    # sequential: x += attn(ln1(x)); x += mlp(ln2(x))            (Llama, GPT-2, OPT)
    # parallel: x += attn(ln1(x)) + mlp(ln2(x))                  (GPT-NeoX)
    # parallel_shared_norm: h = ln1(x); x += attn(h) + mlp(h)    (StableLM, parallel)
    # post_norm: x = ln1(x + attn(x)); x = ln2(x + mlp(x))       (OPT-350m)
    residual: str = "sequential"
    final_norm: bool = True
    embed_dim: int | None = None  # word embeddings narrower than hidden: project_in/out (OPT)
    attn_scales: tuple[float, ...] = ()  # per layer; empty: head_dim ** -0.5 everywhere
    sliding_windows: tuple[int | None, ...] = ()  # per layer; empty: no sliding window
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.residual not in RESIDUAL_STYLES:
            raise ValueError(f"residual must be one of {RESIDUAL_STYLES}, got {self.residual!r}")
        for name in ("attn_scales", "sliding_windows"):
            values = getattr(self, name)
            if values and len(values) != self.num_layers:
                raise ValueError(f"{name} needs one value per layer ({self.num_layers})")

    @classmethod
    def from_config(cls, config, **fields) -> DecoderSpec:
        """The fields every Hugging Face config names alike; `fields` adds or overrides."""
        heads = config.num_attention_heads
        base = dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=getattr(config, "intermediate_size", None),
            max_positions=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        return cls(**{**base, **fields})

    def make_norm(self, dim: int | None = None) -> nn.Module:
        dim = dim or self.hidden_size
        if self.norm == "rms":
            return RMSNorm(dim, self.norm_eps)
        return LayerNorm(dim, eps=self.norm_eps, elementwise_affine=self.norm_affine)


def rope_parameters(config) -> dict:
    """Rope settings from either transformers layout (v5 `rope_parameters`, v4 `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **(config.rope_scaling or {})}


def partial_rotary_dim(config, head_dim: int) -> int:
    factor = rope_parameters(config).get("partial_rotary_factor", 1.0)
    return int(head_dim * factor)


def sliding_windows(config) -> tuple[int | None, ...]:
    """Per-layer sliding windows: `sliding_window` on the layers `layer_types` marks
    "sliding_attention" (Qwen2), or on every layer when there are no layer types (Mistral)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return ()
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return tuple(window if t == "sliding_attention" else None for t in types)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, tp: ParallelContext):
        super().__init__()
        # This rank's heads; KV heads are replicated when there are fewer than ranks (GQA).
        q_heads = tp.shard(spec.num_heads, "the attention heads")
        kv_heads = tp.shard(spec.num_kv_heads, "the key/value heads", replicate=True)
        self.num_heads, self.num_kv_heads = q_heads[1], kv_heads[1]
        self.head_dim = hd = spec.head_dim
        self.qkv_proj = ColumnParallelLinear(
            spec.hidden_size,
            {"q": (spec.num_heads, hd), "k": (spec.num_kv_heads, hd), "v": (spec.num_kv_heads, hd)},
            spec.qkv_bias,
            replicate=("k", "v"),
            tp=tp,
        )
        self.o_proj = RowParallelLinear(
            (spec.num_heads, hd), spec.hidden_size, spec.o_bias, "the attention heads", tp=tp
        )
        if spec.qk_norm:
            self.q_layernorm = PerHeadLayerNorm(spec.num_heads, hd, spec.norm_eps, q_heads)
            self.k_layernorm = PerHeadLayerNorm(spec.num_kv_heads, hd, spec.norm_eps, kv_heads)
        self.qk_norm = spec.qk_norm
        self.rotary_emb = None
        if spec.rotary_dim:
            self.rotary_emb = RotaryEmbedding(hd, spec.rotary_dim, spec.max_positions, spec.rope)
        scale = spec.attn_scales[layer] if spec.attn_scales else hd**-0.5
        window = spec.sliding_windows[layer] if spec.sliding_windows else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, hd, scale, window)
        q_size, kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.split = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), batch)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, tp: ParallelContext):
        super().__init__()
        size, bias = spec.intermediate_size, spec.mlp_bias
        rows = (size, 1)
        if spec.gated_mlp:
            self.gate_up_proj = ColumnParallelLinear(
                spec.hidden_size, {"gate": rows, "up": rows}, bias, tp=tp
            )
            self.act = ActAndMul(activation(spec.act))
            self.down_proj = RowParallelLinear(
                rows, spec.hidden_size, bias, "intermediate_size", tp=tp
            )
        else:
            self.fc1 = ColumnParallelLinear(spec.hidden_size, {"fc1": rows}, bias, tp=tp)
            self.act = activation(spec.act)
            self.fc2 = RowParallelLinear(rows, spec.hidden_size, bias, "intermediate_size", tp=tp)
        self.gated = spec.gated_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        return self.fc2(self.act(self.fc1(x)))


class DecoderLayer(nn.Module):
    """One block. The residual stream travels as (hidden, residual), their sum being the
    stream, so that a norm can fuse the residual add (RMSNorm and LayerNorm take both)."""

    def __init__(self, spec: DecoderSpec, layer: int, tp: ParallelContext):
        super().__init__()
        self.residual = spec.residual
        self.input_layernorm = spec.make_norm()
        self.self_attn = Attention(spec, layer, tp)
        if spec.residual != "parallel_shared_norm":
            self.post_attention_layernorm = spec.make_norm()
        self.mlp = MLP(spec, tp)

    def forward(self, positions, hidden, residual, batch):
        if self.residual == "sequential":
            if residual is None:
                residual, hidden = hidden, self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = self.self_attn(positions, hidden, batch)
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        x = _stream(hidden, residual)
        if self.residual == "post_norm":
            x = self.input_layernorm(x + self.self_attn(positions, x, batch))
            return self.post_attention_layernorm(x + self.mlp(x)), None
        h = self.input_layernorm(x)
        attn = self.self_attn(positions, h, batch)
        mlp_in = h if self.residual == "parallel_shared_norm" else self.post_attention_layernorm(x)
        return attn + self.mlp(mlp_in), x


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return hidden if residual is None else hidden + residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, tp: ParallelContext):
        super().__init__()
        embed_dim = spec.embed_dim or spec.hidden_size
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, embed_dim, tp=tp)
        self.project_in = self.project_out = None
        if embed_dim != spec.hidden_size:
            self.project_in = nn.Linear(embed_dim, spec.hidden_size, bias=False)
            self.project_out = nn.Linear(spec.hidden_size, embed_dim, bias=False)
        self.embed_positions = None
        if spec.position_offset is not None:
            self.embed_positions = LearnedPositionEmbedding(
                spec.max_positions, spec.hidden_size, spec.position_offset
            )
        self.layers = nn.ModuleList(DecoderLayer(spec, i, tp) for i in range(spec.num_layers))
        self.norm = spec.make_norm() if spec.final_norm else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, batch)
        hidden = _stream(hidden, residual)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class DecoderForCausalLM(nn.Module):
    """The engine's model interface: `forward(input_ids, positions, batch) -> hidden` over the
    step's flat batch and `compute_logits(hidden)`; plus how checkpoints map onto it."""

    # checkpoint name part -> this module's name part; applied in order, then packed_modules.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # checkpoint name part -> (merged parameter name part, shard)
    packed_modules: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, spec: DecoderSpec, tp: ParallelContext | None = None):
        """`tp`: the rank this model is a shard of; none is the single rank of TP=1."""
        super().__init__()
        tp = tp or ParallelContext()
        self.spec = spec
        self.model = DecoderModel(spec, tp)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.embed_dim or spec.hidden_size, tp=tp)
        self.tie_word_embeddings = spec.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the vocabulary; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    # --- loading hooks (engine/weights.py calls them) --------------------------------------
    def normalize_checkpoint_name(self, name: str) -> str:
        """Older spellings of a checkpoint name -> what transformers saves today."""
        return name

    def convert_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor whose layout differs from this module's (transposed, interleaved)."""
        return tensor
