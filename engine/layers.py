"""Building blocks shared by every architecture: linear layers that load packed weights, norms,
rotary embeddings, activations and paged attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve import kernels
from pagedserve.engine.batch import Batch


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


class MergedLinear(nn.Linear):
    """Several projections of the same input in one matmul (q/k/v, gate/up).

    Checkpoints store the parts separately; `shard_names` orders them in the merged weight.
    """

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes.values()), bias=bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for shard, size in output_sizes.items():
            self.offsets[shard] = (start, size)
            start += size
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(
        self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard: str | None = None
    ) -> None:
        if shard is None:  # a checkpoint that stores the projections already merged (GPT-2)
            default_weight_loader(param, loaded, name)
            return
        start, size = self.offsets[shard]
        default_weight_loader(param.data.narrow(0, start, size), loaded, name)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused here so each layer hands on (normed, residual) pairs.
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's calling convention: `norm(x, residual)` adds the residual
    first and returns (normed, new residual)."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x


class PerHeadLayerNorm(nn.Module):
    """A LayerNorm of its own for each head of q or k (StableLM 2's qk_layernorm), weights
    stored per head as `norms.{i}.weight`."""

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(
            nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads)
        )
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, heads, head_dim]
        weight = torch.stack([norm.weight for norm in self.norms])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight


def rope_inv_freq(head_dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and output scale for the rope types Llama-style checkpoints use."""
    base = rope.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / rope["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the first `rotary_dim` dims, cos/sin cached per position."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, rope: dict):
        super().__init__()
        inv_freq, scale = rope_inv_freq(rotary_dim, rope)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)
        self.rotary_dim = rotary_dim

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,  # exact, erf-based
    # The tanh approximation, under each name the Hugging Face configs use for it.
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
}


def activation(name: str) -> nn.Module:
    """The activation a Hugging Face config names in `hidden_act` / `activation_function`."""
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]()


class ActAndMul(nn.Module):
    """Gated MLP activation over a merged [gate, up] projection: act(gate) * up."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


class LearnedPositionEmbedding(nn.Embedding):
    """Absolute position embeddings (GPT-2, OPT). OPT's table starts `offset` = 2 rows in."""

    def __init__(self, max_positions: int, dim: int, offset: int = 0):
        super().__init__(max_positions + offset, dim)
        self.offset = offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + self.offset if self.offset else positions)


class PagedAttention(nn.Module):
    """Writes this step's keys/values into the layer's paged cache, then attends over it.

    `sliding_window` (Mistral, Qwen2): each query sees only the last `sliding_window` tokens,
    itself included; None attends to the whole context."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        kernels.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        window = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        return kernels.paged_attention(
            q, self.k_cache, self.v_cache, batch.block_tables, batch.context_lens,
            batch.query_start_loc, self.scale, **window,
        )  # fmt: skip
