"""Decode attention on this CPU: the C++ kernel (kernels/cpu/) against the PyTorch reference
(gather each sequence's blocks into a padded copy, then SDPA), and against what the machine
could do at best: reading the sequences' keys and values once at the memory bandwidth measured
in the same run (a `sum` over a buffer of the same size).

    python -m benchmarks.cpu_attention [--dtype float32|bfloat16] [--json out.json]

Llama-7B-like heads (32 query heads, 8 KV heads, head dim 128), block size 16, block tables in
scrambled order, every sequence at the row's context length except that lengths vary +-25 %
(uniform), as they do in a running batch.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table, write_json
from pagedserve.engine.cpu_memory import keep_freed_memory_in_heap
from pagedserve.kernels import cpu, reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BATCHES, CONTEXTS = (1, 16, 64), (128, 512, 2048)


def best_ms(fn, repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def case(num_seqs: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    lens = torch.randint(max(1, context * 3 // 4), context * 5 // 4 + 1, (num_seqs,), generator=gen)
    blocks = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    shape = (int(blocks.sum()), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(shape[0], generator=gen).int()
    tables = torch.full((num_seqs, int(blocks.max())), -1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = order[start : start + n]
        start += n
    query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    starts = torch.arange(num_seqs + 1, dtype=torch.int32)
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return (query, k_cache, v_cache, tables, lens.int(), starts), kv_bytes


def read_gbps(nbytes: int) -> float:
    """This machine's read bandwidth over a buffer of `nbytes` (caches included)."""
    buf = torch.ones(max(nbytes, 1 << 20) // 4, dtype=torch.float32)
    return buf.numel() * 4 / (best_ms(buf.sum) * 1e-3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernel cannot be built here (see the log above)")
    keep_freed_memory_in_heap()  # as the engine runs: no page faults on every temporary
    dtype, gen = getattr(torch, args.dtype), torch.Generator().manual_seed(0)
    scale = HEAD_DIM**-0.5
    rows, results = [], []
    for num_seqs in BATCHES:
        for context in CONTEXTS:
            inputs, kv_bytes = case(num_seqs, context, dtype, gen)
            kernel = best_ms(lambda: cpu.paged_attention(*inputs, scale))  # noqa: B023
            ref = best_ms(lambda: reference.paged_attention(*inputs, scale))  # noqa: B023
            floor = kv_bytes / (read_gbps(kv_bytes) * 1e9) * 1e3
            results.append(dict(batch=num_seqs, context=context, kernel_ms=kernel,
                                reference_ms=ref, bandwidth_floor_ms=floor, kv_bytes=kv_bytes))  # fmt: skip
            rows.append((num_seqs, context, f"{kernel:.3f}", f"{ref:.3f}", f"{ref / kernel:.2f}x",
                         f"{floor:.3f}", f"{floor / kernel:.0%}"))  # fmt: skip
    print(f"decode attention, {args.dtype}, {torch.get_num_threads()} threads, ms per call")
    print_table(rows, ("batch", "context", "kernel", "reference", "speed-up", "read floor",
                       "of floor"))  # fmt: skip
    write_json(args.json, {"dtype": args.dtype, "threads": torch.get_num_threads(),
                           "rows": results})  # fmt: skip


if __name__ == "__main__":
    main()
