"""Triton kernels with the reference's signatures (kernels/reference.py is their specification).

They run on CUDA tensors, or on CPU tensors in Triton's interpreter: `TRITON_INTERPRET=1` must
be set before this package is first imported, because `@triton.jit` decides between compiling
and interpreting when each kernel is defined.
"""

from __future__ import annotations

from pagedserve.kernels.triton.common import INTERPRETED
from pagedserve.kernels.triton.copy_blocks import copy_blocks
from pagedserve.kernels.triton.paged_attention import paged_attention
from pagedserve.kernels.triton.rms_norm import rms_norm
from pagedserve.kernels.triton.rotary import rotary_embedding
from pagedserve.kernels.triton.silu_and_mul import silu_and_mul
from pagedserve.kernels.triton.store_kv import store_kv

__all__ = [
    "INTERPRETED",
    "copy_blocks",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
