"""Attention and cache kernels behind one interface (`from pagedserve.kernels import ops`).

The PyTorch reference (`reference.py`) runs anywhere and is the specification; the Triton
kernels (`triton/`) implement the same functions for GPUs, and `cpu/` a C++ decode attention
for CPUs (compiled on first use). The default backend follows the device: Triton on CUDA when
the `triton` package is installed, the C++ kernel on CPU when it builds, the reference
otherwise. `EngineConfig.attention_backend` or `PAGEDSERVE_ATTENTION_BACKEND=torch|cpu|triton`
forces one (Triton on CPU tensors then needs `TRITON_INTERPRET=1`, Triton's interpreter).

The engine resolves its backend once (`resolve_backend`) and calls the module that
`backend_module` returns, so its steps do no lookups. The functions below are that same
interface for everyone else: each call picks the backend from its tensors' device and the
environment.

This lives in a named module, not in `kernels/__init__.py`: the top-level folders are PEP 420
namespace folders, so that from the checkout's root an installed package of the same name (Hugging
Face's `kernels`, which `transformers` imports) always wins over them.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from pagedserve.kernels import reference

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "PAGEDSERVE_ATTENTION_BACKEND"


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def attention_backend(device: torch.device | str | None = None) -> str:
    """The backend that runs kernels on `device`'s tensors: the env override if set, else
    "triton" on CUDA (when installed), "cpu" on a CPU (when its kernel builds; the first call
    builds it), else "torch"."""
    return resolve_backend("auto", device)


def resolve_backend(choice: str, device: torch.device | str | None = None) -> str:
    """The backend named by `choice` (EngineConfig.attention_backend), checked to run here;
    "auto" is the env override if set, else `device`'s default."""
    if choice != "auto":
        return _checked(choice, f"attention_backend {choice!r}")
    forced = os.environ.get(ENV_VAR)
    if forced:
        return _checked(forced, f"{ENV_VAR}={forced}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cuda" and triton_installed():
        return "triton"
    if device_type == "cpu" and _cpu_kernels().available():
        return "cpu"
    return "torch"


def _checked(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} is not a backend; choose from {BACKENDS}")
    if backend == "triton" and not triton_installed():
        raise ValueError(
            f"{source}, but the triton package is not installed (pip install 'pagedserve[triton]')"
        )
    if backend == "cpu" and not _cpu_kernels().available():
        raise ValueError(f"{source}, but the CPU kernel cannot be built here (see the log)")
    return backend


def backend_module(backend: str) -> ModuleType:
    """The module of `backend`'s kernels: the functions below, without the dispatch."""
    if backend == "triton":
        from pagedserve.kernels import triton as triton_kernels  # imported on first use only

        return triton_kernels
    return _cpu_kernels() if backend == "cpu" else reference


def _cpu_kernels() -> ModuleType:
    from pagedserve.kernels import cpu

    return cpu


def _impl(tensor: torch.Tensor) -> ModuleType:
    return backend_module(attention_backend(tensor.device))


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _impl(k_cache).store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
    sliding_window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    return _impl(query).paged_attention(
        query, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
        sliding_window=sliding_window,
    )  # fmt: skip


def copy_blocks(k_caches, v_caches, src, dst) -> None:
    impl = _impl(k_caches[0]) if k_caches else reference
    impl.copy_blocks(k_caches, v_caches, src, dst)


def rms_norm(x, weight, eps: float, residual=None):
    return _impl(x).rms_norm(x, weight, eps, residual)


def rotary_embedding(positions, query, key, cos, sin, rotary_dim: int) -> None:
    _impl(query).rotary_embedding(positions, query, key, cos, sin, rotary_dim)


def silu_and_mul(x) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


__all__ = [
    "BACKENDS",
    "attention_backend",
    "backend_module",
    "copy_blocks",
    "paged_attention",
    "resolve_backend",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
