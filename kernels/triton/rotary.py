"""rotary_embedding: neox-style rotary embedding applied in place to q and k, partial
`rotary_dim` allowed, one token per program (reference.rotary_embedding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.common import check_device, next_pow2


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, c1, c2, s1, s2,
                  HEADS_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr):  # fmt: skip
    # out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to x's dtype.
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, HALF_P2)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    ptrs = x_ptr + heads * stride_h + dims
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = (x1.to(tl.float32) * c1).to(dtype).to(tl.float32)
    b1 = (-x2.to(tl.float32) * s1).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2).to(dtype).to(tl.float32)
    tl.store(ptrs, (a1 + b1).to(dtype), mask=mask)
    tl.store(ptrs + HALF, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_P2)[None, :]
    dim_ok = dims < HALF
    # The caches hold float32; the reference rounds them to the activations' dtype first.
    dtype = q_ptr.dtype.element_ty
    cos = cos_ptr + pos * stride_cos + dims
    sin = sin_ptr + pos * stride_sin + dims
    c1 = tl.load(cos, mask=dim_ok, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos + HALF, mask=dim_ok, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin, mask=dim_ok, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin + HALF, mask=dim_ok, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_heads, c1, c2, s1, s2,
                  Q_HEADS_P2, HALF, HALF_P2)  # fmt: skip
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_kv_heads, c1, c2, s1, s2,
                  K_HEADS_P2, HALF, HALF_P2)  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, num_heads, head_dim], rotated in place (rows may be strided)
    key: torch.Tensor,  # [T, num_kv_heads, head_dim], rotated in place
    cos: torch.Tensor,  # [max_positions, rotary_dim]: both halves, as RotaryEmbedding caches
    sin: torch.Tensor,
    rotary_dim: int,
) -> None:
    num_tokens, num_heads, _ = query.shape
    if num_tokens == 0:
        return
    check_device(query)
    if query.stride(-1) != 1 or key.stride(-1) != 1 or key.dtype != query.dtype:
        raise ValueError("rotary_embedding rotates in place: q and k need one dtype, unit stride")
    if rotary_dim % 2 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_dim must be even and the cos/sin caches contiguous per row")
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions.contiguous(), query, key, cos, sin,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0), sin.stride(0),
        num_heads, key.shape[1],
        HALF=half, HALF_P2=next_pow2(half),
        Q_HEADS_P2=next_pow2(num_heads), K_HEADS_P2=next_pow2(key.shape[1]), num_warps=4,
    )  # fmt: skip
