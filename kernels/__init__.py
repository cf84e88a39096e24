"""Attention and cache kernels behind one interface.

The PyTorch reference runs anywhere and is the specification; faster backends (Triton on CUDA)
plug in here. `PAGEDSERVE_ATTENTION_BACKEND=torch|triton` forces one.
"""

from __future__ import annotations

import os

from pagedserve.kernels.reference import copy_blocks, paged_attention, store_kv

BACKENDS = ("torch",)


def attention_backend() -> str:
    backend = os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "torch")
    if backend not in BACKENDS:
        raise ValueError(
            f"PAGEDSERVE_ATTENTION_BACKEND={backend!r} is not available; choose from {BACKENDS}"
        )
    return backend


__all__ = ["attention_backend", "copy_blocks", "paged_attention", "store_kv"]
