"""Building blocks shared by every architecture: Megatron-style parallel linear layers and
vocabulary-parallel embedding and LM head (each rank holds and loads only its shard; at
tensor_parallel_size 1 they are plain layers), norms, rotary embeddings, activations and
paged attention.

The layers that run kernels (norm, rotary, gated activation, attention) call them through
`self.kernels`: `kernels/ops.py`'s dispatch when built alone, the engine's resolved backend
once the model runner binds it (`bind_kernels`)."""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.engine.batch import Batch
from pagedserve.engine.parallel import ParallelContext
from pagedserve.kernels import ops


def loaded_tensor(loaded) -> torch.Tensor:
    """A checkpoint tensor as read: a torch tensor, or a lazy slice (weights.CheckpointSlice)
    of a memory-mapped file, which is read here and only here."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.load()


def _check_shape(loaded, expected: tuple[int, ...], name: str) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(loaded.shape)}, the model expects {tuple(expected)}"
        )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear; on a CPU through oneDNN, whose kernels beat MKL's (F.linear's) on AMD EPYC:
    10-20% per matmul on the engine's shapes, 15% of the throughput benchmark's CPU time."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNWeight:
    """A linear weight reordered once into oneDNN's blocked layout (which oneDNN otherwise
    does at every call); called as F.linear is."""

    def __init__(self, weight: torch.Tensor):
        self.shape = tuple(weight.shape)  # the logical [out_features, in_features]
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")


class PackableLinear:
    """A layer whose weight the model runner may pack once for a CPU matmul
    (`pack_linear_weights`)."""

    weight: torch.Tensor
    packed = None  # a callable as F.linear (x, bias), with the logical `shape`

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x, bias)
        return linear(x, self.weight, bias)


def pack_linear_weights(model: nn.Module, pack=None, place=None) -> None:
    """On a CPU, each linear layer's weight packed once: by `pack` (the CPU kernels' float32
    matmul, which prefetches the weights a decode step streams) where it takes the weight,
    else for oneDNN (13-25% faster per decode matmul than F.linear). `pack`'s packing is
    copied by `place` where given (the engine puts it on huge pages). The plain weight is then
    freed, unless another layer reads it (an embedding tied to the LM head), so packing costs
    no memory."""
    shared = {
        id(p)
        for m in model.modules()
        if not isinstance(m, PackableLinear)
        for p in m.parameters(recurse=False)
    }
    for module in model.modules():
        if not isinstance(module, PackableLinear):
            continue
        weight = module.weight
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
            module.packed = (pack and pack(weight, place)) or OneDNNWeight(weight)
            if id(weight) not in shared:
                weight.data = weight.data.new_empty(0)


def default_weight_loader(param: nn.Parameter, loaded, name: str) -> None:
    """A replicated parameter: every rank holds the whole tensor."""
    _check_shape(loaded, param.shape, name)
    param.data.copy_(loaded_tensor(loaded))


class ColumnParallelLinear(PackableLinear, nn.Linear):
    """A linear layer whose output features are split across the tensor-parallel ranks; with
    several named parts (q/k/v, gate/up), one matmul computes this rank's share of each.

    `parts` maps each part to (units, unit size): heads of head_dim rows, or MLP rows of one.
    Each rank holds its units of every part, in part order. `replicate` names the parts that
    may have fewer units than ranks (KV heads): each unit is then held by several ranks.
    Checkpoints store the parts separately (a `shard` per part) or already merged."""

    def __init__(
        self,
        in_features: int,
        parts: dict[str, tuple[int, int]],
        bias: bool = False,
        replicate: tuple[str, ...] = (),
        *,
        tp: ParallelContext,
    ):
        # part -> (offset in this rank's rows, first row in the full part, rows, full rows)
        self.ranges: dict[str, tuple[int, int, int, int]] = {}
        local = 0
        for part, (units, unit_size) in parts.items():
            first, n = tp.shard(units, _PART_NAMES.get(part, part or "the output features"),
                                replicate=part in replicate)  # fmt: skip
            self.ranges[part] = (local, first * unit_size, n * unit_size, units * unit_size)
            local += n * unit_size
        super().__init__(in_features, local, bias=bias)
        self.weight.weight_loader = self._load
        if bias:
            self.bias.weight_loader = self._load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def _load(self, param: nn.Parameter, loaded, name: str, shard: str | None = None) -> None:
        rest = tuple(param.shape[1:])
        if shard is not None:  # one part, as most checkpoints store q/k/v and gate/up
            offset, first, rows, full = self.ranges[shard]
            _check_shape(loaded, (full, *rest), name)
            param.data.narrow(0, offset, rows).copy_(loaded_tensor(loaded.narrow(0, first, rows)))
            return
        # The parts already merged (GPT-2's c_attn, GPT-NeoX's query_key_value, any fc1).
        _check_shape(loaded, (sum(r[3] for r in self.ranges.values()), *rest), name)
        start = 0
        for offset, first, rows, full in self.ranges.values():
            piece = loaded.narrow(0, start + first, rows)
            param.data.narrow(0, offset, rows).copy_(loaded_tensor(piece))
            start += full


# How errors name the parts of the merged projections the decoder builds.
_PART_NAMES = {
    "q": "the attention heads",
    "k": "the key/value heads",
    "v": "the key/value heads",
    "gate": "intermediate_size",
    "up": "intermediate_size",
    "fc1": "intermediate_size",
}


class RowParallelLinear(PackableLinear, nn.Linear):
    """A linear layer whose input features are split across the ranks (the output of a
    column-parallel layer); the partial products are summed by an all-reduce, then the bias
    is added once. `units` = (units, unit size) of the input, split as the layer before split
    its output."""

    def __init__(
        self,
        units: tuple[int, int],
        out_features: int,
        bias: bool = False,
        what: str = "",
        *,
        tp: ParallelContext,
    ):
        self.tp = tp
        first, n = self.tp.shard(units[0], what or "the input features")
        self.first, self.full = first * units[1], units[0] * units[1]
        super().__init__(n * units[1], out_features, bias=bias)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded, name: str) -> None:
        _check_shape(loaded, (self.out_features, self.full), name)
        param.data.copy_(loaded_tensor(loaded.narrow(1, self.first, self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.matmul(x, self.bias)
        out = self.tp.all_reduce(self.matmul(x))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Token embeddings with the vocabulary split across the ranks: each rank looks up the
    tokens in its range, the others' rows are zero, and an all-reduce sums them. The
    vocabulary is padded to a multiple of the ranks (padding rows are zero, never looked up)."""

    def __init__(self, vocab_size: int, dim: int, *, tp: ParallelContext):
        self.tp = tp
        self.vocab_size = vocab_size
        padded = -(-vocab_size // self.tp.size) * self.tp.size
        per_rank = padded // self.tp.size
        self.first = self.tp.rank * per_rank
        super().__init__(per_rank, dim)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded, name: str) -> None:
        _check_shape(loaded, (self.vocab_size, self.embedding_dim), name)
        rows = max(0, min(self.num_embeddings, self.vocab_size - self.first))
        param.data.zero_()
        param.data.narrow(0, 0, rows).copy_(loaded_tensor(loaded.narrow(0, self.first, rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~mine[:, None], 0))


class ParallelLMHead(PackableLinear, VocabParallelEmbedding):
    """The projection onto the vocabulary, split across the ranks as the embedding is (so a
    tied head shares the embedding's shard). Logits are gathered on rank 0 only: the other
    ranks get None."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.matmul(hidden)
        if self.tp.size == 1:
            return logits
        logits = self.tp.gather_to_driver(logits, dim=-1)
        return None if logits is None else logits[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels: ModuleType = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused in so each layer hands on (normed, residual) pairs.
        return self.kernels.rms_norm(x, self.weight, self.eps, residual)


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
    stored per head as `norms.{i}.weight`. Every rank holds all heads' weights (they are
    small) and applies those of its `heads` = (first, count)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, heads: tuple[int, int]):
        super().__init__()
        self.norms = nn.ModuleList(
            nn.LayerNorm(head_dim, eps=eps, bias=False) for _ in range(num_heads)
        )
        self.eps = eps
        self.heads = range(heads[0], heads[0] + heads[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, local heads, head_dim]
        weight = torch.stack([self.norms[i].weight for i in self.heads])
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
        self.kernels: ModuleType = ops

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q [T, heads, head_dim] and k in place (views of the qkv projection are
        fine) and returns them."""
        self.kernels.rotary_embedding(positions, q, k, self.cos, self.sin, self.rotary_dim)
        return q, k


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
        self.kernels: ModuleType = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.SiLU):  # the common case has a fused kernel
            return self.kernels.silu_and_mul(x)
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
        self.kernels: ModuleType = ops

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        self.kernels.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        window = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        return self.kernels.paged_attention(
            q, self.k_cache, self.v_cache, batch.block_tables, batch.context_lens,
            batch.query_start_loc, self.scale, **window,
        )  # fmt: skip


KERNEL_LAYERS = (RMSNorm, RotaryEmbedding, ActAndMul, PagedAttention)


def bind_kernels(model: nn.Module, kernels: ModuleType) -> None:
    """Make every kernel-running layer of `model` call `kernels` (a backend module of
    kernels/ops.py) directly."""
    for module in model.modules():
        if isinstance(module, KERNEL_LAYERS):
            module.kernels = kernels
