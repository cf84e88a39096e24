// Decode attention straight from the paged KV cache, for CPUs.
//
// The PyTorch reference gathers every sequence's blocks into a padded copy and then runs SDPA:
// on a CPU, decode attention is bound by memory traffic, and that copy (padded to the longest
// sequence) costs more than the attention itself. Here each (sequence, KV head) reads its keys
// and values once, where they lie, through the block table. Work items run on torch's
// intra-op thread pool, so `torch.set_num_threads` (the engine's cpu_threads) governs them.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode(const scalar_t* query, const scalar_t* k_cache, const scalar_t* v_cache,
            const int32_t* block_tables, const int32_t* context_lens, scalar_t* out,
            int64_t num_seqs, int64_t max_blocks, int64_t block_size, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  // Calls f(j, slot) for the tokens first..n-1 of a sequence (j counted from 0), block by
  // block: one table lookup per block, not a division per token.
  auto for_each_slot = [block_size](const int32_t* table, int64_t first, int64_t n, auto&& f) {
    int64_t j = 0;
    for (int64_t pos = first; pos < n;) {
      const int64_t offset = pos % block_size;
      const int64_t stop = std::min(n, pos - offset + block_size);
      int64_t slot = int64_t(table[pos / block_size]) * block_size + offset;
      for (; pos < stop; ++pos, ++j, ++slot) f(j, slot);
    }
  };
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_dim), acc(group * head_dim), scores, top(group), sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t n = context_lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t len = n - first;
      const int32_t* table = block_tables + seq * max_blocks;
      // The `group` query heads that share this KV head, scaled once.
      for (int64_t h = 0; h < group; ++h) {
        const scalar_t* src = query + (seq * num_heads + kv_head * group + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) q[h * head_dim + d] = float(src[d]) * scale;
      }
      scores.resize(group * len);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for_each_slot(table, first, n, [&](int64_t j, int64_t slot) {
        const scalar_t* key = k_cache + (slot * num_kv_heads + kv_head) * head_dim;
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = q.data() + h * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * float(key[d]);
          scores[h * len + j] = dot;
          top[h] = std::max(top[h], dot);
        }
      });
      for (int64_t h = 0; h < group; ++h) {
        float total = 0.f;
        float* s = scores.data() + h * len;
        for (int64_t j = 0; j < len; ++j) total += (s[j] = std::exp(s[j] - top[h]));
        sum[h] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_slot(table, first, n, [&](int64_t j, int64_t slot) {
        const scalar_t* value = v_cache + (slot * num_kv_heads + kv_head) * head_dim;
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * len + j];
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * float(value[d]);
        }
      });
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
void paged_attention_decode(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor context_lens, double scale, int64_t window) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode);
}
