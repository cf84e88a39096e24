"""CPU kernels in C++, compiled on first use with torch's extension builder and cached under
~/.cache/torch_extensions: decode attention read in place from the paged KV cache, RMSNorm
with its residual add, the rotary embedding in place, SiLU(gate) * up, the store of each
step's keys and values, and float32 linear layers (linear.cpp) on packed weights.

On a CPU the reference's decode attention spends more time gathering each sequence's blocks
into a padded copy than attending; `paged_attention_decode` reads every key and value once,
where it lies. With AVX-512, the rows of short sequences' prefill chunks take it too (each
row a decode over its own prefix); longer prefill chunks take SDPA (compute-bound, and SDPA's
blocked kernel is the faster one there), one sequence at a time. RMSNorm, rotary and
SiLU-and-mul, and greedy sampling's argmax with its logprob, are one pass over each row
instead of several torch calls; store_kv one copy per token where index_put costs ~80 us a
layer at 32 tokens. copy_blocks is the reference's.
Where no C++ compiler is at hand, `available()` says so once and the reference runs instead.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.kernels import reference
from pagedserve.kernels.reference import copy_blocks

logger = logging.getLogger(__name__)

# -fopenmp: torch's parallel_for is inlined into the kernel and needs it to run threaded; the
# extension then shares the libgomp that torch has already loaded (same soname). 512-bit
# vectors where the CPU has them: ~10% faster here than gcc's default 256. -fno-trapping-math
# (floating-point traps are masked anyway): without it gcc leaves the loops of the kernels'
# exp (softmax, SiLU) scalar, 5x slower.
_FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp",
]


def _cpu_tag() -> str:
    """This CPU's features, hashed. The kernel is built for the CPU it runs on (-march=native),
    so machines sharing one extension cache (an NFS home) keep one build per kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            features = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        features = ""
    return hashlib.sha1((features or platform.processor()).encode()).hexdigest()[:10]


def _checkout_tag(sources: Path) -> str:
    """The folder the sources lie in, hashed. torch's builder writes the sources' absolute
    paths into the build folder's build.ninja, so two checkouts sharing one build folder
    (worktrees on one machine) would rebuild in turn at each start (a minute each, under one
    lock); with one build folder per checkout each builds once."""
    return hashlib.sha1(str(sources.resolve()).encode()).hexdigest()[:8]


# A build takes about a minute; a build lock older than this was left by a killed build.
STALE_BUILD_LOCK_SECONDS = 600.0


def remove_stale_build_lock(build_dir: Path, max_age: float = STALE_BUILD_LOCK_SECONDS) -> bool:
    """torch's extension builder waits, forever, for the lock file of the process building it.
    A process killed mid-build (a worker stopped with -9 on its first start) never removes it,
    and every later start would hang; past `max_age` the lock is taken to be such a one."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age:
        return False
    logger.warning("removing a stale build lock (%.0f s old): %s", age, lock)
    lock.unlink(missing_ok=True)
    return True


@cache
def _ops():
    from torch.utils import cpp_extension

    here = Path(__file__).parent
    sources = [
        str(here / name)
        for name in ("bindings.cpp", "paged_attention.cpp", "fused_ops.cpp", "linear.cpp")
    ]
    name = f"pagedserve_cpu_kernels_{_cpu_tag()}_{_checkout_tag(here)}"
    remove_stale_build_lock(Path(cpp_extension._get_build_directory(name, verbose=False)))
    logger.info("loading the CPU kernels (compiled once per checkout and CPU, ~1 min)")
    return cpp_extension.load(
        name=name, sources=sources, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"]
    )


@cache
def available() -> bool:
    """True once the kernel is built and loaded; False (said once, with the reason) when it
    cannot be built here."""
    try:
        _ops()
    except Exception as e:  # no compiler, no ninja, no Python headers...
        logger.warning("CPU kernels unavailable, using the PyTorch reference: %s", e)
        return False
    return True


# Up to this many keys, a sequence's query rows attend in the decode kernel, each over its own
# prefix, a few rows at a time (its keys stay in cache from row to row): 1.2-2x faster than
# SDPA's causal kernel on prompts of 32-512 tokens, whose per-call cost dominates at those
# sizes; SDPA's blocks win past ~1,000.
ROW_WISE_KEYS = 768


def paged_attention(
    query, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
    sliding_window: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """reference.paged_attention, with the decode rows (one query token) computed in place;
    where the kernel is vectorized, so are the rows of sequences of up to ROW_WISE_KEYS keys."""
    window = int(sliding_window or 0)

    def rows(q, tables, lens, q_lens):
        starts = None
        if q.shape[0] != len(lens):  # prefill rows: each its own prefix of its sequence
            starts = F.pad(q_lens.cumsum(0), (1, 0)).int()
        if q.stride(-1) != 1 or q.stride(-2) != q.shape[-1]:
            q = q.contiguous()
        out = q.new_empty(q.shape)
        _ops().paged_attention_decode(
            out, q, k_cache, v_cache, tables.contiguous(), lens.int().contiguous(), float(scale),
            window, starts,
        )  # fmt: skip
        return out

    def prefill(q, tables, lens, q_lens):
        return _prefill(q, k_cache, v_cache, tables, lens, q_lens, scale, sliding_window)

    if query.shape[0] == len(context_lens):  # a query row per sequence: all decode
        return rows(query, block_tables, context_lens, None)
    row_wise = None
    if _vectorized_decode(query):
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        keys = context_lens if not window else context_lens.clamp(max=window)
        row_wise = (q_lens == 1) | (keys <= ROW_WISE_KEYS)
    return reference.split_by_kind(
        query, block_tables, context_lens, query_start_loc, rows, prefill, row_wise
    )


def _vectorized_decode(query) -> bool:
    """The decode kernel takes its AVX-512 path for this query (paged_attention.cpp)."""
    return query.dtype in (torch.float32, torch.bfloat16) and _ops().vectorized_decode(
        query.shape[-1]
    )


def _prefill(query, k_cache, v_cache, block_tables, context_lens, q_lens, scale, window):
    """The prefill chunks one sequence at a time: a whole prompt (no cached prefix, no window
    cutting in) takes SDPA's causal flash kernel over its own keys, ~3x faster than the
    reference's one batch padded to the longest prompt under a mask; the others, the
    reference's masked attention on their own."""
    out = torch.empty_like(query)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    start = 0
    for i, (n, q_len) in enumerate(zip(context_lens.tolist(), q_lens.tolist(), strict=True)):
        rows = slice(start, start + q_len)
        start += q_len
        if q_len != n or (window is not None and n > window):
            out[rows] = reference._padded_attention(
                query[rows], k_cache, v_cache, block_tables[i : i + 1], context_lens[i : i + 1],
                q_lens[i : i + 1], scale, window,
            )  # fmt: skip
            continue
        blocks = block_tables[i, : -(-n // block_size)]
        keys = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:n]
        values = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:n]
        # [1, heads, tokens, dim]: with a batch axis SDPA takes its flash kernel (1.5x faster)
        q, k, v = (t.transpose(0, 1)[None] for t in (query[rows], keys, values))
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        )
        out[rows] = attended[0].transpose(0, 1)
    return out


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """reference.store_kv, one row copy per token (views of the fused qkv projection are fine)."""
    if (
        key.dtype != k_cache.dtype
        or value.dtype != v_cache.dtype
        or key.stride(-1) != 1
        or key.stride(-2) != key.shape[-1]
        or value.stride(-1) != 1
        or value.stride(-2) != value.shape[-1]
    ):
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    _ops().store_kv(key, value, k_cache, v_cache, slot_mapping.long().contiguous())


def silu_and_mul(x):
    """reference.silu_and_mul in one pass per row."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return reference.silu_and_mul(x)
    x = x.contiguous()
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    _ops().silu_and_mul(out, x)
    return out


class PackedLinear:
    """A float32 linear weight packed once into linear.cpp's panels; called as F.linear is."""

    def __init__(self, weight: torch.Tensor, place=None):
        self.shape = tuple(weight.shape)  # the logical [out_features, in_features]
        self.data = _ops().pack_linear_weight(weight.detach().contiguous())
        if place is not None:  # the caller's choice of memory (the engine's: huge pages)
            self.data = place(self.data)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = x.new_empty((*x.shape[:-1], self.shape[0]))
        _ops().packed_linear(out.view(-1, self.shape[0]), rows, self.data, bias)
        return out


def pack_linear(weight: torch.Tensor, place=None) -> PackedLinear | None:
    """`weight` packed for linear.cpp, where it runs (float32, AVX-512); else None. `place`,
    if given, copies the packed tensor where it is to live."""
    if (
        weight.dtype != torch.float32
        or weight.device.type != "cpu"
        or not available()
        or not _ops().built_with_avx512()
    ):
        return None
    return PackedLinear(weight, place)


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of float32 logits [rows, vocab]: the token torch.argmax picks and its
    log_softmax, in one pass of fused_ops.cpp (the sampler's greedy rows, engine/sampler.py)."""
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    logprobs = torch.empty(logits.shape[0], dtype=torch.float32)
    _ops().greedy_sample(tokens, logprobs, logits)
    return tokens, logprobs


def rms_norm(x, weight, eps: float, residual=None):
    """reference.rms_norm in one pass per row (dtypes the kernel does not take: the reference)."""
    if (
        x.dtype not in (torch.float32, torch.bfloat16)
        or weight.dtype != x.dtype
        or (residual is not None and residual.dtype != x.dtype)
    ):
        return reference.rms_norm(x, weight, eps, residual)
    x = x.contiguous()
    out = torch.empty_like(x)
    if residual is None:
        _ops().rms_norm(out, x, weight.contiguous(), float(eps), None, None)
        return out
    new_residual = torch.empty_like(x)
    _ops().rms_norm(out, x, weight.contiguous(), float(eps), residual.contiguous(), new_residual)
    return out, new_residual


def rotary_embedding(positions, query, key, cos, sin, rotary_dim: int) -> None:
    """reference.rotary_embedding, in place, one pass per token."""
    if (
        query.dtype not in (torch.float32, torch.bfloat16)
        or key.dtype != query.dtype
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or query.stride(-1) != 1
        or key.stride(-1) != 1
    ):
        reference.rotary_embedding(positions, query, key, cos, sin, rotary_dim)
        return
    positions = positions.long().contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    _ops().rotary_embedding(positions, query, cos, sin, rotary_dim)
    _ops().rotary_embedding(positions, key, cos, sin, rotary_dim)


__all__ = [
    "available",
    "copy_blocks",
    "greedy_sample",
    "pack_linear",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
