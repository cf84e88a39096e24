"""What every Triton kernel wrapper needs: the device check and a few shape helpers."""

from __future__ import annotations

import os

import torch

# Read when this package is first imported, the moment its `@triton.jit` kernels are defined:
# that, not the variable's value later, decides whether they compile or run interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse CPU tensors outside the interpreter with a sentence that says what to do."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"the Triton kernels got a tensor on {tensor.device}: they run on CUDA tensors, "
                "or on CPU tensors with TRITON_INTERPRET=1 set before pagedserve.kernels.triton "
                "is first imported (or choose PAGEDSERVE_ATTENTION_BACKEND=torch)"
            )


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be float32: the interpreter multiplies bfloat16 tiles as
    their raw 16-bit integers (triton 3.9), so there they are widened first."""
    return INTERPRETED and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """float32 caches get exact float32 products (as the reference), not TF32's 10-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"
