"""rms_norm: RMSNorm with the residual add fused in front, one row per program
(reference.rms_norm). Rounds where the reference rounds, so 16-bit results match it closely."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.common import check_device, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # x + residual, rounded to the activations' dtype, is the new residual
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = h.to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    check_device(x)
    hidden = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    new_residual = (
        None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    )
    rows = _rows(x)
    if rows.shape[0]:
        res = rows if residual is None else _rows(residual)
        res_out = out if new_residual is None else new_residual.view(-1, hidden)
        out_rows = out.view(-1, hidden)
        block = next_pow2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight.contiguous(), out_rows, res_out,
            rows.stride(0), res.stride(0), out_rows.stride(0), res_out.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )  # fmt: skip
    return out if new_residual is None else (out, new_residual)
