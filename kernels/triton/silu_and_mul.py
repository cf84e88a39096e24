"""silu_and_mul: SiLU(gate) * up over a merged [gate, up] projection
(reference.silu_and_mul), rounding where the reference rounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.common import check_device

BLOCK = 1024  # output elements per program


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    check_device(x)
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, 2 * d)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    if rows.shape[0] and d:
        out_rows = out.view(-1, d)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, BLOCK))](
            rows, out_rows, rows.stride(0), out_rows.stride(0), d, BLOCK=BLOCK, num_warps=4
        )
    return out
