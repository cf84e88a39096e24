"""copy_blocks: copy-on-write of whole blocks, every layer's caches in one launch
(reference.copy_blocks)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.common import check_device

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
CHUNK = 1024  # elements each program copies


@triton.jit
def _copy_blocks_kernel(
    cache_ptrs, pairs_ptr, block_numel, DTYPE: tl.constexpr, CHUNK: tl.constexpr
):
    # Program (cache, pair, chunk): `cache` indexes the table of every layer's K and V caches.
    cache = tl.load(cache_ptrs + tl.program_id(0)).to(tl.pointer_type(DTYPE))
    pair = tl.program_id(1)
    src = tl.load(pairs_ptr + 2 * pair)
    dst = tl.load(pairs_ptr + 2 * pair + 1)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    data = tl.load(cache + src * block_numel + offs, mask=mask)
    tl.store(cache + dst * block_numel + offs, data, mask=mask)


def copy_blocks(
    k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Copy-on-write: copy blocks `src[i]` to `dst[i]` in every layer's caches."""
    if len(k_caches) != len(v_caches):
        raise ValueError(f"{len(k_caches)} key caches but {len(v_caches)} value caches")
    caches = [*k_caches, *v_caches]
    if not caches or src.numel() == 0:
        return
    first = caches[0]
    check_device(first)
    for cache in caches:
        if cache.shape != first.shape or cache.dtype != first.dtype or not cache.is_contiguous():
            raise ValueError("copy_blocks needs contiguous caches of one shape and dtype")
    block_numel = first[0].numel()
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=first.device)
    pairs = torch.stack((src.long(), dst.long()), dim=1).to(first.device).contiguous()
    grid = (len(caches), pairs.shape[0], triton.cdiv(block_numel, CHUNK))
    _copy_blocks_kernel[grid](
        ptrs, pairs, block_numel, DTYPE=_TORCH_TO_TL[first.dtype], CHUNK=CHUNK, num_warps=4
    )
