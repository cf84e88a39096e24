// Decode attention (and short prefill rows) straight from the paged KV cache, for CPUs.
//
// The PyTorch reference gathers every sequence's blocks into a padded copy and then runs SDPA:
// on a CPU, decode attention is bound by memory traffic, and that copy (padded to the longest
// sequence) costs more than the attention itself. Here each key and value is read once, where
// it lies, through the block table: with AVX-512 (and a head_dim of whole vectors), each
// sequence's slots in order, every head at once, and a prefill chunk's rows too, a few at a
// time (query_start_loc); elsewhere, decode rows only, each (sequence, KV head) on its own.
// Work items run on torch's intra-op thread pool, so `torch.set_num_threads` (the
// engine's cpu_threads) governs them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

using pagedserve::exp_nonpositive;
using pagedserve::to_float;

bool vectorized_decode(int64_t head_dim);

namespace {

// Rows a few keys ahead are fetched early: keys of one head lie a slot apart (and blocks
// anywhere), a pattern the hardware prefetcher follows poorly.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* base, const int64_t* rows, int64_t head_dim) {
  const int64_t bytes = head_dim * int64_t(sizeof(scalar_t));
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + rows[r]) + b);
}

// Keys are taken four at a time: four independent dot products (and one pass over the
// accumulator for four values) keep the vector units busy instead of waiting on one chain.
constexpr int64_t kUnroll = 4;

template <typename scalar_t>
void decode(const scalar_t* query, const scalar_t* k_cache, const scalar_t* v_cache,
            const int32_t* block_tables, const int32_t* context_lens, scalar_t* out,
            int64_t num_seqs, int64_t max_blocks, int64_t block_size, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t query_stride, float scale,
            int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;  // one slot's keys (all heads)
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_dim), acc(group * head_dim), scores, sum(group);
    std::vector<int64_t> rows;  // offset of each key of this sequence and head in the cache
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t n = context_lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t len = n - first;
      const int32_t* table = block_tables + seq * max_blocks;
      rows.resize(len);
      for (int64_t pos = first; pos < n; ++pos) {
        const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
        rows[pos - first] = slot * token_stride + kv_head * head_dim;
      }
      // The `group` query heads that share this KV head, scaled once.
      for (int64_t h = 0; h < group; ++h) {
        const scalar_t* src = query + seq * query_stride + (kv_head * group + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) q[h * head_dim + d] = to_float(src[d]) * scale;
      }
      // Scores, [group][len]: each key row is loaded once for all the heads that read it.
      scores.resize(group * len);
      int64_t j = 0;
      for (; j + kUnroll <= len; j += kUnroll) {
        const scalar_t *k0 = k_cache + rows[j], *k1 = k_cache + rows[j + 1],
                       *k2 = k_cache + rows[j + 2], *k3 = k_cache + rows[j + 3];
        if (j + 3 * kUnroll <= len) prefetch_rows(k_cache, rows.data() + j + 2 * kUnroll, head_dim);
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = q.data() + h * head_dim;
          float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
          for (int64_t d = 0; d < head_dim; ++d) {
            d0 += qh[d] * to_float(k0[d]);
            d1 += qh[d] * to_float(k1[d]);
            d2 += qh[d] * to_float(k2[d]);
            d3 += qh[d] * to_float(k3[d]);
          }
          float* s = scores.data() + h * len + j;
          s[0] = d0, s[1] = d1, s[2] = d2, s[3] = d3;
        }
      }
      for (; j < len; ++j) {
        const scalar_t* k0 = k_cache + rows[j];
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = q.data() + h * head_dim;
          float d0 = 0.f;
#pragma omp simd reduction(+ : d0)
          for (int64_t d = 0; d < head_dim; ++d) d0 += qh[d] * to_float(k0[d]);
          scores[h * len + j] = d0;
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        float* s = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t i = 0; i < len; ++i) m = std::max(m, s[i]);
        for (int64_t i = 0; i < len; ++i) total += (s[i] = std::exp(s[i] - m));
        sum[h] = total;
      }
      // The weighted values, each value row loaded once for all the heads.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (j = 0; j + kUnroll <= len; j += kUnroll) {
        const scalar_t *v0 = v_cache + rows[j], *v1 = v_cache + rows[j + 1],
                       *v2 = v_cache + rows[j + 2], *v3 = v_cache + rows[j + 3];
        if (j + 3 * kUnroll <= len) prefetch_rows(v_cache, rows.data() + j + 2 * kUnroll, head_dim);
        for (int64_t h = 0; h < group; ++h) {
          const float* s = scores.data() + h * len + j;
          const float p0 = s[0], p1 = s[1], p2 = s[2], p3 = s[3];
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d)
            a[d] += p0 * to_float(v0[d]) + p1 * to_float(v1[d]) + p2 * to_float(v2[d]) +
                    p3 * to_float(v3[d]);
        }
      }
      for (; j < len; ++j) {
        const scalar_t* v0 = v_cache + rows[j];
        for (int64_t h = 0; h < group; ++h) {
          const float p0 = scores[h * len + j];
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p0 * to_float(v0[d]);
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        scalar_t* dst = out + (seq * num_heads + kv_head * group + h) * head_dim;
        const float inv = 1.f / sum[h];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = scalar_t(acc[h * head_dim + d] * inv);
      }
    }
  });
}

#if defined(__AVX512F__)
// With AVX-512 and a head_dim of whole vectors: each sequence's slots swept in order, 16 at a
// time, every head of the item from each slot row, with the next 16 slots fetched into L2
// meanwhile: a share of them as each head is computed, not all at once, so the prefetches do
// not queue up in front of the loads of the run at hand. After the last run of keys comes the
// first of values, after the last of values the next item's first of keys. Measured on 2 EPYC
// cores, 32 sequences of 100-320 tokens with caches not in cache (as in an engine step, where
// each layer's weights pass through in between): 0.42 ms a call, level with a plain `sum` of
// the same bytes, where the per-head kernel above takes 0.9-1.0 ms and the same sweep
// prefetching each run at once 0.60. Without any prefetch the sweep is no faster than per
// head: the hardware prefetcher does not follow block tables.

// One work item: query rows [row, row + rows) of sequence `seq`, its KV heads
// [first_kv_head, end_kv_head). A sequence's rows are consecutive positions, its last row at
// its last position.
struct Item {
  int64_t seq, row, rows, first_kv_head, end_kv_head;
};

// The query rows of each sequence: [query_start_loc[s], query_start_loc[s + 1]), or one row
// each where query_start_loc is null (a decode batch).
struct QueryRows {
  const int32_t* query_start_loc;
  const int32_t* context_lens;
  int64_t window;

  int64_t begin(int64_t seq) const { return query_start_loc ? query_start_loc[seq] : seq; }
  int64_t end(int64_t seq) const { return query_start_loc ? query_start_loc[seq + 1] : seq + 1; }
  // Keys that row `row` of `seq` attends to: [first_key(keys(...)), keys(...)).
  int64_t keys(int64_t seq, int64_t row) const {
    return context_lens[seq] - (end(seq) - 1 - row);
  }
  int64_t first_key(int64_t keys) const {
    return window > 0 ? std::max<int64_t>(0, keys - window) : 0;
  }
};

// The work items, split over torch's threads by the keys each reads (not by count), so that
// no thread waits on another that holds the long sequences. Each of a sequence's blocks of up
// to `rows_per_item` rows is an item, or where there are too few to share out, each block's
// KV heads are.
template <typename Fn>
void for_each_item(int64_t num_seqs, int64_t num_kv_heads, int64_t rows_per_item,
                   const QueryRows& q, const Fn& attend) {
  const int64_t threads = at::get_num_threads();
  std::vector<Item> items;
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t r = q.begin(s); r < q.end(s); r += rows_per_item)
      items.push_back({s, r, std::min(rows_per_item, q.end(s) - r), 0, num_kv_heads});
  if (int64_t(items.size()) < 4 * threads) {  // a KV head each
    std::vector<Item> split;
    for (const Item& it : items)
      for (int64_t h = 0; h < num_kv_heads; ++h) split.push_back({it.seq, it.row, it.rows, h, h + 1});
    items.swap(split);
  }
  const int64_t count = items.size();
  std::vector<int64_t> cost(count + 1, 0);  // cumulative keys read, plus a fixed cost each
  for (int64_t i = 0; i < count; ++i) {
    const Item& it = items[i];
    const int64_t keys = q.keys(it.seq, it.row + it.rows - 1);
    cost[i + 1] = cost[i] + it.rows * (keys - q.first_key(keys)) + 16;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    auto share_start = [&](int64_t t) {
      return std::lower_bound(cost.begin(), cost.end(), cost[count] * t / threads) - cost.begin();
    };
    std::vector<float> scratch;  // the thread's, reused by each of its items
    const int64_t last = std::min<int64_t>(share_start(end), count);
    for (int64_t i = share_start(begin); i < last; ++i)
      attend(items[i], i + 1 < last ? &items[i + 1] : nullptr, scratch);
  });
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bfloat16 widened by a shift, as to_float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Lane j of the result: the sum of v[j]'s 16 lanes (v is clobbered). A tree of shuffles
// and adds: 16 dot products cost about what one horizontal sum each would.
inline __m512 sum_lanes16(__m512* v) {
  for (int i = 0; i < 8; ++i)  // 16 -> 8: halves of 8 partial sums
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 8 -> 4: quarters of 4
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // 4 -> 2: pairs
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88),
                                    _mm512_shuffle_ps(v[0], v[1], 0xDD));
  // Lane 4q + i now holds v[q + 4i]'s sum.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// The slots of positions [first, end) of one sequence, in runs that stay inside one block.
struct Runs {
  const int32_t* table;
  int64_t block_size, row;  // row: elements of one slot (all KV heads)

  template <typename scalar_t>
  const scalar_t* slots(const scalar_t* cache, int64_t pos) const {
    return cache + (int64_t(table[pos / block_size]) * block_size + pos % block_size) * row;
  }
  int64_t length(int64_t pos, int64_t end, int64_t max_run) const {
    return std::min({max_run, block_size - pos % block_size, end - pos});
  }
  template <typename scalar_t, typename Fn>
  void each(const scalar_t* cache, int64_t first, int64_t end, int64_t max_run, Fn fn) const {
    for (int64_t pos = first, n; pos < end; pos += n) {
      n = length(pos, end, max_run);
      fn(slots(cache, pos), pos, n);
    }
  }
};

// The run to fetch while one is read: `length` slots from `slots`, the item's KV heads at
// `offset` in each slot row (of `row` elements), `width` elements of them.
template <typename scalar_t>
struct NextRun {
  const scalar_t* slots = nullptr;
  int64_t length = 0, row = 0, offset = 0, width = 0;

  // Part `part` of `parts` of its slots, into L2: fetched into L1 they would crowd out the
  // run being read. Inlined by force: gcc left it a call, and the kernel took 1.8x as long.
  [[gnu::always_inline]] void prefetch(int64_t part, int64_t parts) const {
    for (int64_t j = part * length / parts; j < (part + 1) * length / parts; ++j) {
      const char* p = reinterpret_cast<const char*>(slots + j * row + offset);
      for (int64_t b = 0; b < width * int64_t(sizeof(scalar_t)); b += 64)
        _mm_prefetch(p + b, _MM_HINT_T1);
    }
  }
};

// C: vectors of head_dim, known at compile time so that a key's dot product and a value's
// accumulators stay in registers. An item of several rows (a prefill chunk's) reads each run
// of keys and values once for all of them: on 15 prompts of 32-256 tokens, 3.6 ms a layer
// where a row at a time took 4.4.
template <typename scalar_t, int C>
void decode_avx512(const scalar_t* query, const scalar_t* k_cache, const scalar_t* v_cache,
                   const int32_t* block_tables, const int32_t* context_lens,
                   const int32_t* query_start_loc, scalar_t* out, int64_t num_seqs,
                   int64_t max_blocks, int64_t block_size, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t query_stride, float scale, int64_t window) {
  constexpr int64_t kRun = 16;  // slots per run: one vector of scores
  // Rows per item: a run and the rows' accumulators fit L1. Under a window, one: each row's
  // runs then start where its window does, the order a row alone sums in.
  const int64_t rows_per_item = window > 0 ? 1 : 4;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row = num_kv_heads * head_dim;
  const QueryRows rows_of{query_start_loc, context_lens, window};
  auto key_range = [&](const Item& it) {  // keys that some row of the item attends to
    return std::pair<int64_t, int64_t>{rows_of.first_key(rows_of.keys(it.seq, it.row)),
                                       rows_of.keys(it.seq, it.row + it.rows - 1)};
  };
  auto attend = [&](const Item& item, const Item* next_item, std::vector<float>& scratch) {
    const int64_t seq = item.seq, rows = item.rows;
    const auto [lo, hi] = key_range(item);
    const int64_t len = hi - lo;
    const int64_t h0 = item.first_kv_head * group, h1 = item.end_kv_head * group, nh = h1 - h0;
    const int64_t offset = item.first_kv_head * head_dim, width = (h1 - h0) / group * head_dim;
    const Runs runs{block_tables + seq * max_blocks, block_size, row};
    // The run after the one at `pos` (m slots) in `cache`, else `then`.
    auto next_run = [&](const scalar_t* cache, int64_t pos, int64_t m, NextRun<scalar_t> then) {
      if (pos + m >= hi) return then;
      return NextRun<scalar_t>{runs.slots(cache, pos + m), runs.length(pos + m, hi, kRun), row,
                               offset, width};
    };
    NextRun<scalar_t> first_values{runs.slots(v_cache, lo), runs.length(lo, hi, kRun), row,
                                   offset, width};
    NextRun<scalar_t> next_keys;  // the next item's first run, if this thread has one
    if (next_item) {
      const auto [next_lo, next_hi] = key_range(*next_item);
      const Runs r{block_tables + next_item->seq * max_blocks, block_size, row};
      next_keys = {r.slots(k_cache, next_lo), r.length(next_lo, next_hi, kRun), row,
                   next_item->first_kv_head * head_dim, width};
    }
    // Per (row, head) of the item, at index (r * nh + h - h0): its scaled query, accumulator,
    // softmax sum and scores (over keys lo..hi).
    scratch.resize(rows * nh * (2 * head_dim + 1 + len));
    float* q = scratch.data();
    float* acc = q + rows * nh * head_dim;
    float* sum = acc + rows * nh * head_dim;
    float* scores = sum + rows * nh;
    std::vector<int64_t> kv_head_offset(nh);  // of each query head's KV head in a slot
    for (int64_t h = h0; h < h1; ++h) kv_head_offset[h - h0] = h / group * head_dim;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t d = 0; d < head_dim; ++d)
          q[(r * nh + h - h0) * head_dim + d] =
              to_float(query[(item.row + r) * query_stride + h * head_dim + d]) * scale;
    auto keys_of = [&](int64_t r) { return rows_of.keys(seq, item.row + r); };

    // Scores: per run, row and head, 16 dot products summed into one vector.
    runs.each(k_cache, lo, hi, kRun, [&](const scalar_t* slots, int64_t pos, int64_t m) {
      const NextRun<scalar_t> next = next_run(k_cache, pos, m, first_values);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t keys = keys_of(r);
        const bool seen = pos < keys && pos + m > rows_of.first_key(keys);
        for (int64_t h = h0; h < h1; ++h) {
          next.prefetch(r * nh + h - h0, rows * nh);
          if (!seen) continue;
          const float* qh = q + (r * nh + h - h0) * head_dim;
          const scalar_t* slot_keys = slots + kv_head_offset[h - h0];
          __m512 qv[C], dots[kRun];
          for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);
          for (int64_t j = 0; j < kRun; ++j) {
            if (j >= m) {
              dots[j] = _mm512_setzero_ps();
              continue;
            }
            const scalar_t* key = slot_keys + j * row;
            __m512 x = _mm512_mul_ps(qv[0], load16(key));
            for (int c = 1; c < C; ++c) x = _mm512_fmadd_ps(qv[c], load16(key + 16 * c), x);
            dots[j] = x;
          }
          _mm512_mask_storeu_ps(scores + (r * nh + h - h0) * len + (pos - lo),
                                __mmask16((1u << m) - 1), sum_lanes16(dots));
        }
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t keys = keys_of(r), first = rows_of.first_key(keys);
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t rh = r * nh + h - h0;
        float* s = scores + rh * len + (first - lo);
        const int64_t n = keys - first;
        float m = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < n; ++i) total += (s[i] = exp_nonpositive(s[i] - m));
        sum[rh] = total;
      }
    }

    // The weighted values: per run, row, head and vector of head_dim, one accumulator register.
    std::fill(acc, acc + rows * nh * head_dim, 0.f);
    runs.each(v_cache, lo, hi, kRun, [&](const scalar_t* slots, int64_t pos, int64_t m) {
      const NextRun<scalar_t> next = next_run(v_cache, pos, m, next_keys);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t keys = keys_of(r);  // this row's slots of the run: [j0, j1)
        const int64_t j0 = std::max(pos, rows_of.first_key(keys)) - pos;
        const int64_t j1 = std::min(pos + m, keys) - pos;
        for (int64_t h = h0; h < h1; ++h) {
          next.prefetch(r * nh + h - h0, rows * nh);
          if (j0 >= j1) continue;
          const int64_t rh = r * nh + h - h0;
          const float* p = scores + rh * len + (pos - lo);
          const scalar_t* values = slots + kv_head_offset[h - h0];
          float* a = acc + rh * head_dim;
          __m512 even[C], odd[C];  // two chains per vector: FMA latency does not bound the loop
          for (int c = 0; c < C; ++c) even[c] = _mm512_loadu_ps(a + 16 * c), odd[c] = _mm512_setzero_ps();
          int64_t j = j0;
          for (; j + 2 <= j1; j += 2) {
            const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
            const scalar_t* v = values + j * row;
            for (int c = 0; c < C; ++c) {
              even[c] = _mm512_fmadd_ps(p0, load16(v + 16 * c), even[c]);
              odd[c] = _mm512_fmadd_ps(p1, load16(v + row + 16 * c), odd[c]);
            }
          }
          if (j < j1)
            for (int c = 0; c < C; ++c)
              even[c] = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(values + j * row + 16 * c), even[c]);
          for (int c = 0; c < C; ++c) _mm512_storeu_ps(a + 16 * c, _mm512_add_ps(even[c], odd[c]));
        }
      }
    });
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t rh = r * nh + h - h0;
        scalar_t* dst = out + ((item.row + r) * num_heads + h) * head_dim;
        const float inv = 1.f / sum[rh];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = scalar_t(acc[rh * head_dim + d] * inv);
      }
  };
  for_each_item(num_seqs, num_kv_heads, rows_per_item, rows_of, attend);
}

// decode_avx512 at this head_dim, compiled for 16, 32, ... 128; false where none is.
template <typename scalar_t, typename... Args>
bool decode_avx512_for(int64_t head_dim, Args... args) {
  if (!vectorized_decode(head_dim)) return false;
  switch (head_dim / 16) {
    case 1: decode_avx512<scalar_t, 1>(args...); return true;
    case 2: decode_avx512<scalar_t, 2>(args...); return true;
    case 3: decode_avx512<scalar_t, 3>(args...); return true;
    case 4: decode_avx512<scalar_t, 4>(args...); return true;
    case 5: decode_avx512<scalar_t, 5>(args...); return true;
    case 6: decode_avx512<scalar_t, 6>(args...); return true;
    case 7: decode_avx512<scalar_t, 7>(args...); return true;
    case 8: decode_avx512<scalar_t, 8>(args...); return true;
    default: return false;
  }
}
#endif  // __AVX512F__

}  // namespace

// The head_dims (float32 and bfloat16) whose decode takes the AVX-512 kernel: whole vectors,
// up to 8 of them.
bool vectorized_decode(int64_t head_dim) {
#if defined(__AVX512F__)
  return head_dim % 16 == 0 && head_dim / 16 >= 1 && head_dim / 16 <= 8;
#else
  return false;
#endif
}

// query/out [rows, num_heads, head_dim]. Without query_start_loc, a row per sequence: its one
// new token, whose keys are the first context_lens[s] tokens of its blocks (its own included).
// With it (int32, num_seqs + 1), sequence s's rows are [query_start_loc[s],
// query_start_loc[s + 1]), its last tokens, each attending causally (AVX-512 path only; see
// vectorized_decode). window <= 0: no window. The query's rows may be strided (a view of the
// fused qkv projection), its heads not.
void paged_attention_decode(at::Tensor out, at::Tensor query, at::Tensor k_cache,
                            at::Tensor v_cache, at::Tensor block_tables, at::Tensor context_lens,
                            double scale, int64_t window,
                            c10::optional<at::Tensor> query_start_loc) {
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2) && out.is_contiguous() &&
              k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_attention_decode needs contiguous tensors (the query's rows may be strided)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block tables and context lengths must be int32");
  const int64_t num_seqs = context_lens.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int32_t* starts = nullptr;
  if (query_start_loc) {
    TORCH_CHECK(query_start_loc->scalar_type() == at::kInt && query_start_loc->is_contiguous() &&
                query_start_loc->size(0) == num_seqs + 1,
                "query_start_loc must be contiguous int32, one more than the sequences");
    starts = query_start_loc->data_ptr<int32_t>();
    TORCH_CHECK(starts[num_seqs] == query.size(0), "query_start_loc must end at the query's rows");
  } else {
    TORCH_CHECK(query.size(0) == num_seqs, "a query row per sequence without query_start_loc");
  }
#if defined(__AVX512F__)
  auto fast = [&](auto tag) {
    using scalar_t = decltype(tag);
    return decode_avx512_for<scalar_t>(
        head_dim, query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
        context_lens.data_ptr<int32_t>(), starts, out.data_ptr<scalar_t>(), num_seqs,
        block_tables.size(1), block_size, num_heads, num_kv_heads, head_dim, query.stride(0),
        float(scale), window);
  };
  if (query.scalar_type() == at::kFloat && fast(float())) return;
  if (query.scalar_type() == at::kBFloat16 && fast(c10::BFloat16())) return;
#endif
  TORCH_CHECK(starts == nullptr || query.size(0) == num_seqs,
              "several query rows per sequence take the AVX-512 kernel, not built or not taken here");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "paged_attention_decode", [&] {
    decode<scalar_t>(query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                     v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                     context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), num_seqs,
                     block_tables.size(1), block_size, num_heads, num_kv_heads, head_dim,
                     query.stride(0), float(scale), window);
  });
}
