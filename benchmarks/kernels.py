"""Paged attention on a CUDA GPU: pagedserve's Triton kernel against the device's own copy
bandwidth and against PyTorch SDPA on contiguous (un-paged) KV of the same sizes.

    python -m benchmarks.kernels [--json out.json] [--quick]

Decode: batch 1/16/64/256 x context 512/2048/8192, 32 query heads, 8 KV heads, head dim 128,
bfloat16, block size 16, block tables in scrambled order. For each: the kernel's time, its
bandwidth (bytes of K and V read / time), that as a share of the device-to-device copy
bandwidth measured in the same run (bytes read + written / time of `Tensor.copy_`), SDPA's time
on the same K/V laid out contiguously ([B, kv_heads, context, dim], the query heads of a KV
head folded into its query rows), and the PyTorch reference backend's time (the engine's
fallback: gather the blocks, then SDPA). Goal: >= 80 % of copy bandwidth on large batches, and
no slower than SDPA.

Prefill: whole prompts (causal), TFLOP/s of the kernel against SDPA (`is_causal`, GQA).

Without CUDA the script says so and exits (status 0): the CPU test suite runs the same kernels
in Triton's interpreter instead (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, write_json

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_BATCHES, DECODE_CONTEXTS = (1, 16, 64, 256), (512, 2048, 8192)
DEVICE = "cuda"
PREFILL = ((1, 1024), (1, 4096), (4, 2048), (16, 512), (1, 8192))  # (sequences, prompt length)


def bench_ms(fn) -> float:
    """Median time of `fn` in milliseconds, L2 cache flushed between runs (triton's do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in GB/s: bytes read plus bytes written per second."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def paged_kv(num_seqs: int, context: int, gen: torch.Generator):
    """Caches holding `num_seqs` sequences of `context` tokens in scrambled blocks, and the same
    keys and values laid out contiguously, [B, kv_heads, context, head_dim], for SDPA."""
    per_seq = context // BLOCK_SIZE
    shape = (num_seqs * per_seq, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE, generator=gen)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE, generator=gen)
    perm = torch.randperm(shape[0], device=DEVICE, generator=gen)
    tables = perm.view(num_seqs, per_seq).to(torch.int32)

    def contiguous(cache):
        blocks = cache[tables.long()]  # [B, per_seq, block, kv_heads, dim]
        return blocks.view(num_seqs, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    return k_cache, v_cache, tables, contiguous(k_cache), contiguous(v_cache)


def decode_row(num_seqs: int, context: int, copy_gbps: float, knobs: dict) -> dict:
    from pagedserve.kernels import reference
    from pagedserve.kernels.triton import paged_attention
    from pagedserve.kernels.triton.paged_attention import _num_segments, _num_sms

    gen = torch.Generator(device=DEVICE).manual_seed(num_seqs * 7919 + context)
    k_cache, v_cache, tables, *contiguous = paged_kv(num_seqs, context, gen)
    query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE, generator=gen)
    ints = dict(dtype=torch.int32, device=DEVICE)
    lens = torch.full((num_seqs,), context, **ints)
    starts = torch.arange(num_seqs + 1, **ints)
    scale = HEAD_DIM**-0.5
    args = (query, k_cache, v_cache, tables, lens, starts, scale)

    # SDPA's best case for decode: the 4 query heads of a KV head are 4 rows against its keys.
    group = NUM_HEADS // NUM_KV_HEADS
    q_folded = query.view(num_seqs, NUM_KV_HEADS, group, HEAD_DIM)

    def sdpa():
        return F.scaled_dot_product_attention(q_folded, *contiguous, scale=scale)

    got = paged_attention(*args, **knobs)
    want = sdpa().reshape(num_seqs, NUM_HEADS, HEAD_DIM)
    error = (got.float() - want.float()).abs().max().item()

    kv_bytes = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    triton_ms = bench_ms(lambda: paged_attention(*args, **knobs))
    sdpa_ms = bench_ms(sdpa)
    contiguous.clear()  # room for the reference's gathered copies
    reference_ms = bench_ms(lambda: reference.paged_attention(*args))
    segments = knobs.get("num_segments") or _num_segments(
        num_seqs, NUM_KV_HEADS, tables.shape[1] * BLOCK_SIZE, _num_sms(query.device)
    )
    gbps = kv_bytes / (triton_ms * 1e-3) / 1e9
    return {
        "batch": num_seqs, "context": context, "segments": segments,
        "triton_us": triton_ms * 1e3, "triton_gbps": gbps, "copy_fraction": gbps / copy_gbps,
        "sdpa_us": sdpa_ms * 1e3, "sdpa_gbps": kv_bytes / (sdpa_ms * 1e-3) / 1e9,
        "speedup_vs_sdpa": sdpa_ms / triton_ms, "reference_us": reference_ms * 1e3,
        "max_abs_error_vs_sdpa": error,
    }  # fmt: skip


def prefill_row(num_seqs: int, length: int, knobs: dict) -> dict:
    from pagedserve.kernels.triton import paged_attention

    gen = torch.Generator(device=DEVICE).manual_seed(num_seqs * 31 + length)
    k_cache, v_cache, tables, k, v = paged_kv(num_seqs, length, gen)
    q = torch.randn(
        num_seqs, NUM_HEADS, length, HEAD_DIM, dtype=DTYPE, device=DEVICE, generator=gen
    )
    flat_q = q.transpose(1, 2).reshape(num_seqs * length, NUM_HEADS, HEAD_DIM)
    ints = dict(dtype=torch.int32, device=DEVICE)
    lens = torch.full((num_seqs,), length, **ints)
    starts = torch.arange(0, num_seqs * length + 1, length, **ints)
    scale = HEAD_DIM**-0.5
    args = (flat_q, k_cache, v_cache, tables, lens, starts, scale)

    if torch.__version__ < (2, 5):  # SDPA without enable_gqa
        k, v = (t.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, 1) for t in (k, v))
        gqa = {}
    else:
        gqa = {"enable_gqa": True}

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)

    got = paged_attention(*args, **knobs).view(num_seqs, length, NUM_HEADS, HEAD_DIM)
    error = (got.transpose(1, 2).float() - sdpa().float()).abs().max().item()
    # Causal: half of the QK^T and PV products, 2 flops per multiply-add.
    flops = 4 * num_seqs * NUM_HEADS * HEAD_DIM * length * (length + 1) / 2
    triton_ms = bench_ms(lambda: paged_attention(*args, **knobs))
    sdpa_ms = bench_ms(sdpa)
    return {
        "batch": num_seqs, "length": length,
        "triton_ms": triton_ms, "triton_tflops": flops / (triton_ms * 1e-3) / 1e12,
        "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / (sdpa_ms * 1e-3) / 1e12,
        "speedup_vs_sdpa": sdpa_ms / triton_ms, "max_abs_error_vs_sdpa": error,
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--quick", action="store_true", help="batch 1/64 x context 512/8192 only")
    knobs = ap.add_argument_group("kernel launch knobs (default: the kernel's own choice)")
    for knob in ("block-m", "tile-n", "num-warps", "num-stages", "num-segments"):
        knobs.add_argument(f"--{knob}", type=int)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py measures GPU kernels and found no CUDA device: skipped. "
              "(On a CPU, tests/test_triton_kernels.py runs the kernels in Triton's "
              "interpreter.)", file=sys.stderr)  # fmt: skip
        return 0
    try:
        import triton
    except ImportError:
        print(
            "the triton package is not installed: pip install 'pagedserve[triton]'", file=sys.stderr
        )
        return 1
    knob_args = {
        name: getattr(args, name)
        for name in ("block_m", "tile_n", "num_warps", "num_stages", "num_segments")
        if getattr(args, name) is not None
    }
    decode_knobs = knob_args
    prefill_knobs = {k: v for k, v in knob_args.items() if k != "num_segments"}
    batches = (1, 64) if args.quick else DECODE_BATCHES
    contexts = (512, 8192) if args.quick else DECODE_CONTEXTS
    prefills = PREFILL[:2] if args.quick else PREFILL

    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth()
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)", flush=True)

    decode = []
    for num_seqs in batches:
        for context in contexts:
            row = decode_row(num_seqs, context, copy_gbps, decode_knobs)
            decode.append(row)
            print(f"  decode batch {num_seqs:>3} context {context:>4}: {row['triton_us']:8.1f} us, "
                  f"{row['copy_fraction']:6.1%} of copy bandwidth, "
                  f"{row['speedup_vs_sdpa']:.2f}x SDPA", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    prefill = []
    for num_seqs, length in prefills:
        row = prefill_row(num_seqs, length, prefill_knobs)
        prefill.append(row)
        print(f"  prefill {num_seqs:>2} x {length:>4}: {row['triton_tflops']:6.1f} TFLOP/s, "
              f"{row['speedup_vs_sdpa']:.2f}x SDPA", flush=True)  # fmt: skip
        torch.cuda.empty_cache()

    print(f"\nDecode attention, {NUM_HEADS} query / {NUM_KV_HEADS} KV heads, head dim {HEAD_DIM}, "
          f"bf16, block size {BLOCK_SIZE} ({device}, copy {copy_gbps:.0f} GB/s)")  # fmt: skip
    print_table(
        [(r["batch"], r["context"], r["segments"], f"{r['triton_us']:.1f}",
          f"{r['triton_gbps']:.0f}", f"{r['copy_fraction']:.1%}", f"{r['sdpa_us']:.1f}",
          f"{r['speedup_vs_sdpa']:.2f}x", f"{r['reference_us']:.1f}",
          f"{r['max_abs_error_vs_sdpa']:.1e}") for r in decode],
        ("batch", "context", "splits", "triton us", "GB/s", "of copy", "SDPA us", "vs SDPA",
         "torch ref us", "max err"),
    )  # fmt: skip
    print("\nPrefill attention (causal, whole prompts)")
    print_table(
        [(r["batch"], r["length"], f"{r['triton_ms']:.3f}", f"{r['triton_tflops']:.1f}",
          f"{r['sdpa_ms']:.3f}", f"{r['sdpa_tflops']:.1f}", f"{r['speedup_vs_sdpa']:.2f}x",
          f"{r['max_abs_error_vs_sdpa']:.1e}") for r in prefill],
        ("batch", "length", "triton ms", "TFLOP/s", "SDPA ms", "SDPA TFLOP/s", "vs SDPA",
         "max err"),
    )  # fmt: skip
    write_json(
        args.json,
        {
            "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": copy_gbps, "knobs": knob_args,
            "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
                      "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": str(DTYPE)},
            "decode": decode, "prefill": prefill,
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
