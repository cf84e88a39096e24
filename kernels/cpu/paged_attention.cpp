// Decode attention straight from the paged KV cache, for CPUs.
//
// The PyTorch reference gathers every sequence's blocks into a padded copy and then runs SDPA:
// on a CPU, decode attention is bound by memory traffic, and that copy (padded to the longest
// sequence) costs more than the attention itself. Here each (sequence, KV head) reads its keys
// and values once, where they lie, through the block table. Work items run on torch's
// intra-op thread pool, so `torch.set_num_threads` (the engine's cpu_threads) governs them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

using pagedserve::to_float;

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
            int64_t num_kv_heads, int64_t head_dim, float scale, int64_t window) {
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
        const scalar_t* src = query + (seq * num_heads + kv_head * group + h) * head_dim;
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

}  // namespace

// query/out [num_seqs, num_heads, head_dim]: each sequence's one new token, whose keys are the
// first context_lens[s] tokens of its blocks (its own included); window <= 0: no window.
void paged_attention_decode(at::Tensor out, at::Tensor query, at::Tensor k_cache,
                            at::Tensor v_cache, at::Tensor block_tables, at::Tensor context_lens,
                            double scale, int64_t window) {
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && block_tables.is_contiguous() &&
              context_lens.is_contiguous(), "paged_attention_decode needs contiguous tensors");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block tables and context lengths must be int32");
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "paged_attention_decode", [&] {
    decode<scalar_t>(query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                     v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                     context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), num_seqs,
                     block_tables.size(1), block_size, num_heads, num_kv_heads, head_dim,
                     float(scale), window);
  });
}
