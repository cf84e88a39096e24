"""PyTorch reference kernels: the specification every faster backend is tested against.

Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`; a token's slot is
`block_id * block_size + offset`. The batch is flat: sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]`, which are the last tokens of its `context_lens[b]`
cached tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T], -1 for padding tokens that must not be stored
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    row = k_cache.shape[2] * k_cache.shape[3]  # one token's keys, stored as one row
    k_cache.view(-1, row)[slots] = key[keep].reshape(-1, row)
    v_cache.view(-1, row)[slots] = value[keep].reshape(-1, row)


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32, padded with -1
    context_lens: torch.Tensor,  # [B] int32, tokens in cache per sequence (this step's included)
    query_start_loc: torch.Tensor,  # [B+1] int32
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each query token over its own sequence's cached tokens (GQA aware)."""

    def attend(q, tables, lens, q_lens):
        return _padded_attention(q, k_cache, v_cache, tables, lens, q_lens, scale, sliding_window)

    return split_by_kind(query, block_tables, context_lens, query_start_loc, attend, attend)


def split_by_kind(
    query, block_tables, context_lens, query_start_loc, decode, prefill, is_decode=None
):  # fmt: skip
    """Runs the decode rows (one query token each) and the prefill chunks of a flat batch
    apart, so that one long chunk does not pad every decode. Each of `decode` and `prefill` is
    called as f(query, block_tables, context_lens, q_lens) on its own sequences only (once,
    on the whole batch, when all are of its kind), and the rows are put back in order.
    `is_decode` (per sequence) may send other sequences to `decode` as well."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    if is_decode is None:
        is_decode = q_lens == 1
    if bool(is_decode.all()):
        return decode(query, block_tables, context_lens, q_lens)
    if not bool(is_decode.any()):
        return prefill(query, block_tables, context_lens, q_lens)
    out = torch.empty_like(query)
    token_seq = torch.repeat_interleave(torch.arange(len(q_lens), device=query.device), q_lens)
    for group, attend in ((is_decode, decode), (~is_decode, prefill)):
        rows = group[token_seq]
        out[rows] = attend(query[rows], block_tables[group], context_lens[group], q_lens[group])
    return out


def _padded_attention(query, k_cache, v_cache, block_tables, context_lens, q_lens, scale, window):
    num_seqs = len(q_lens)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = query.shape[1] // num_kv_heads
    device = query.device
    q_lens = q_lens.long()
    context_lens = context_lens.long()
    max_q, max_ctx = int(q_lens.max()), int(context_lens.max())

    # Keys and values of every sequence, gathered block by block: [B, kv_heads, L, dim].
    num_blocks = -(-max_ctx // block_size)
    blocks = block_tables[:, :num_blocks].long().clamp(min=0)
    keys = k_cache.index_select(0, blocks.flatten()).view(num_seqs, -1, num_kv_heads, head_dim)
    values = v_cache.index_select(0, blocks.flatten()).view(num_seqs, -1, num_kv_heads, head_dim)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    key_pos = torch.arange(num_blocks * block_size, device=device)

    # Queries padded to [B, max_q, heads, dim]; query i of sequence b sits at position
    # context_len - q_len + i.
    if max_q == 1:
        padded = query[:, None]
    else:
        token_seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_idx = torch.arange(len(token_seq), device=device) - starts[token_seq]
        padded = query.new_zeros(num_seqs, max_q, *query.shape[1:])
        padded[token_seq, token_idx] = query
    query_pos = (context_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None]

    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal; keys past the context masked
    if window is not None:
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - window

    # GQA without repeating K/V: the `group` query heads that share a KV head are folded into
    # the query axis, each keeping its own position's mask.
    q = padded.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    if max_q == 1:
        mask = mask[:, None]  # one mask row per sequence, broadcast over the group
    else:  # an additive mask: SDPA on CPU is slow with a per-row boolean one
        mask = mask[:, None].expand(-1, group, -1, -1).reshape(num_seqs, 1, group * max_q, -1)
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=device).masked_fill_(
            ~mask, float("-inf")
        )
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_seqs, max_q, -1, head_dim)
    return out[:, 0] if max_q == 1 else out[token_seq, token_idx]


def copy_blocks(k_caches, v_caches, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy-on-write: copy blocks `src[i]` to `dst[i]` in every layer's caches."""
    for k_cache, v_cache in zip(k_caches, v_caches, strict=True):
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


# --- the fused ops: what engine/layers.py computes, as functions the fused kernels match -----


def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm, with the residual add fused in front: returns `normed` without a residual, and
    `(normed, x + residual)` with one (engine/layers.py RMSNorm)."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, num_heads, head_dim], rotated in place
    key: torch.Tensor,  # [T, num_kv_heads, head_dim], rotated in place
    cos: torch.Tensor,  # [max_positions, rotary_dim]: both halves, as RotaryEmbedding caches
    sin: torch.Tensor,
    rotary_dim: int,
) -> None:
    """Neox-style rotary embedding of the first `rotary_dim` dims of each head, in place
    (engine/layers.py RotaryEmbedding: same arithmetic, in the query's dtype)."""
    cos = cos[positions].to(query.dtype)[:, None, :]
    sin = sin[positions].to(query.dtype)[:, None, :]
    for x in (query, key):
        rot = x[..., :rotary_dim]
        half = rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        rot.copy_(rot * cos + rotated * sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over a merged [..., 2 * d] projection (engine/layers.py SiluAndMul)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
