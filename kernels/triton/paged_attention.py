"""paged_attention over the flat batch (reference.paged_attention): one kernel for decodes and
prefill chunks, and a split-KV (flash-decoding) variant for long decodes with few sequences.

Each program takes one KV head of one sequence and a tile of BLOCK_M rows: BLOCK_Q query tokens
times the GROUP query heads that share the KV head (GQA folded into the rows, so each key tile
is read once for all of them). It walks the sequence's keys TILE_N at a time, through the block
table, with an online softmax. Pure-decode batches (one query per sequence) may also split each
sequence's keys into segments, one program each, whose partial results a second kernel merges.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from pagedserve.kernels.triton.common import (
    INTERPRETED,
    check_device,
    dot_precision,
    next_pow2,
    upcast_dots,
)

MIN_SEGMENT_TOKENS = 256  # a split-KV segment is never shorter: each one costs a partial write


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns global query block `q_block`. Sequence b's query blocks are
    numbered from `query_start_loc[b] // BLOCK_Q + b`: an upper bound on the blocks before it,
    so the grid size needs no sync with the device (T // BLOCK_Q + B programs)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attention_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    num_seqs, num_heads, scale_log2, window, segment_tokens,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    DECODE_ONLY: tl.constexpr, NUM_SEGMENTS: tl.constexpr, USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    if DECODE_ONLY:  # one query per sequence: program i is sequence i
        seq = tl.program_id(0)
        q_start = seq
        q_len = 1
        q_block = 0
    else:
        seq = _find_seq(query_start_loc_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block = tl.program_id(0) - (q_start // BLOCK_Q + seq)
        if q_block * BLOCK_Q >= q_len:  # past this sequence's last block (the grid's slack)
            return
    ctx = tl.load(context_lens_ptr + seq)

    # Row r is query token r // GROUP_P2 of this block, query head r % GROUP_P2 of the group.
    rows = tl.arange(0, BLOCK_M)
    token = q_block * BLOCK_Q + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_ok = (rows // GROUP_P2 < BLOCK_Q) & (token < q_len) & (rows % GROUP_P2 < GROUP)
    q_pos = ctx - q_len + token  # the query's own position among the sequence's tokens
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], row_ok[:, None] & dim_ok[None, :], 0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # The keys any row of this tile may see: causal up to the last query, the window's start
    # from the first, and this program's segment.
    first_pos = ctx - q_len + q_block * BLOCK_Q
    kv_end = tl.minimum(ctx, first_pos + BLOCK_Q)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(first_pos - window + 1, 0)
    if NUM_SEGMENTS > 1:
        kv_start = tl.maximum(kv_start, segment * segment_tokens)
        kv_end = tl.minimum(kv_end, (segment + 1) * segment_tokens)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range((kv_start // TILE_N) * TILE_N, kv_end, TILE_N):
        pos = tile + tl.arange(0, TILE_N)
        pos_ok = (pos >= kv_start) & (pos < kv_end)
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, TILE_N]
        allowed = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SEGMENTS > 1:  # partial results, merged by _merge_segments_kernel
        part = ((q_start + token) * num_heads + head) * NUM_SEGMENTS + segment
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        part_rows = part.to(tl.int64)[:, None] * HEAD_DIM_P2 + dims[None, :]
        tl.store(part_acc_ptr + part_rows, acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_rows = (q_start + token).to(tl.int64) * stride_ot + head * stride_oh
        out_ptrs = out_ptr + out_rows[:, None] + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_segments_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_heads, stride_ot, stride_oh,
    NUM_SEGMENTS: tl.constexpr, SEGMENTS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):  # fmt: skip
    # One program per (token, query head): a softmax-weighted sum of its segments.
    token = tl.program_id(0)
    head = tl.program_id(1)
    segs = tl.arange(0, SEGMENTS_P2)
    seg_ok = segs < NUM_SEGMENTS
    part = (token * num_heads + head) * NUM_SEGMENTS + segs
    m = tl.load(part_m_ptr + part, mask=seg_ok, other=float("-inf"))
    l_seg = tl.load(part_l_ptr + part, mask=seg_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty segments: 0
    dims = tl.arange(0, HEAD_DIM_P2)
    acc = tl.load(
        part_acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM_P2 + dims[None, :],
        mask=seg_ok[:, None], other=0.0,
    )  # fmt: skip
    total = tl.sum(l_seg * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a notional small device, so that splits stay rare
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_segments(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split the keys only when one program per (sequence, KV head) leaves most of the device
    idle, and never into segments shorter than MIN_SEGMENT_TOKENS."""
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, max_context // MIN_SEGMENT_TOKENS, 64))


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks], padded with -1 (never read past a context)
    context_lens: torch.Tensor,  # [B], tokens in cache per sequence (this step's included)
    query_start_loc: torch.Tensor,  # [B+1]
    scale: float,
    sliding_window: int | None = None,
    *,
    num_segments: int | None = None,  # split-KV segments for pure decodes; None: chosen here
    block_m: int | None = None,  # rows per program (tokens x GQA group); None: chosen here
    tile_n: int | None = None,  # keys per inner step; None: chosen here
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each query token over its own sequence's cached tokens (GQA aware).

    Nothing here reads a device value back to the host: the launch is sized from shapes alone.
    Every sequence has at least one query token, so a batch is decode-only exactly when it has
    as many tokens as sequences. The keyword-only arguments are tuning knobs for tests and
    benchmarks; the engine leaves them to the defaults chosen here."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = context_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    check_device(query, k_cache)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with contiguous head_dim")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} KV heads evenly")
    query = query if query.stride(-1) == 1 else query.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    context_lens, query_start_loc = context_lens.contiguous(), query_start_loc.contiguous()

    group = num_heads // num_kv_heads
    group_p2 = next_pow2(group)
    head_dim_p2 = max(16, next_pow2(head_dim))
    decode_only = num_tokens == num_seqs
    # tl.dot needs 16 rows at least; a decode tile is one token, a prefill tile many. Prefill
    # tiles of float32 (or head_dim > 128) are halved to stay within 99 KiB of shared memory.
    wide = query.dtype == torch.float32 or head_dim_p2 > 128
    block_m = max(block_m or (16 if decode_only else 64 if wide else 128), group_p2)
    block_q = 1 if decode_only else block_m // group_p2
    tile_n = max(16, tile_n or (32 if decode_only or wide else 64))
    max_context = block_tables.shape[1] * block_size  # a bound known without a sync

    segments = 1
    if decode_only:
        num_sms = _num_sms(query.device)
        segments = num_segments or _num_segments(num_seqs, num_kv_heads, max_context, num_sms)
    segment_tokens = triton.cdiv(triton.cdiv(max_context, segments), tile_n) * tile_n
    parts = (num_tokens * num_heads * segments,)
    part_m = part_l = part_acc = out  # unused without segments: any pointer will do
    if segments > 1:
        part_m = torch.empty(parts, dtype=torch.float32, device=query.device)
        part_l = torch.empty(parts, dtype=torch.float32, device=query.device)
        part_acc = torch.empty(parts[0] * head_dim_p2, dtype=torch.float32, device=query.device)

    grid = (num_seqs if decode_only else num_tokens // block_q + num_seqs, num_kv_heads, segments)
    _attention_kernel[grid](
        out, part_acc, part_m, part_l,
        query, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        num_seqs, num_heads, scale * math.log2(math.e), sliding_window or 0, segment_tokens,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n,
        DECODE_ONLY=decode_only, NUM_SEGMENTS=segments, USE_WINDOW=sliding_window is not None,
        UPCAST=upcast_dots(query.dtype), PRECISION=dot_precision(query.dtype),
        num_warps=num_warps or (4 if block_m <= 64 else 8),
        num_stages=num_stages or (1 if INTERPRETED else 2),
    )  # fmt: skip
    if segments > 1:
        _merge_segments_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, num_heads, out.stride(0), out.stride(1),
            NUM_SEGMENTS=segments, SEGMENTS_P2=next_pow2(segments),
            HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, num_warps=4,
        )  # fmt: skip
    return out
