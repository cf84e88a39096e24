// Per-token ops for CPUs, one pass over each row instead of several torch calls (each of which
// reads and writes the whole [tokens, hidden] tensor): RMSNorm with the residual add in front,
// the rotary embedding applied in place, SiLU(gate) * up, and the store of each token's keys
// and values into its cache slot. kernels/reference.py is their specification,
// rounding included: where the reference rounds to the tensor's dtype between steps, so do
// these.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

using pagedserve::exp_nonpositive;
using pagedserve::rounded;
using pagedserve::to_float;

namespace {

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* weight,
                   scalar_t* out, scalar_t* new_residual, int64_t rows, int64_t hidden,
                   float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * hidden;
      scalar_t* o = out + r * hidden;
      float squares = 0.f;
      if (residual != nullptr) {  // x + residual, kept as the next residual
        const scalar_t* res = residual + r * hidden;
        scalar_t* kept = new_residual + r * hidden;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
          kept[i] = scalar_t(to_float(xr[i]) + to_float(res[i]));
          const float v = to_float(kept[i]);
          squares += v * v;
        }
        xr = kept;
      } else {
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) squares += to_float(xr[i]) * to_float(xr[i]);
      }
      const float inv = 1.f / std::sqrt(squares / float(hidden) + eps);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i)
        o[i] = scalar_t(to_float(weight[i]) * rounded<scalar_t>(to_float(xr[i]) * inv));
    }
  });
}

template <typename scalar_t>
void rotate_rows(const int64_t* positions, scalar_t* x, int64_t tokens, int64_t heads,
                 int64_t token_stride, int64_t head_stride, const float* cos, const float* sin,
                 int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + positions[t] * rotary_dim;
      const float* s = sin + positions[t] * rotary_dim;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* v = x + t * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(v[i]), b = to_float(v[i + half]);
          // The reference: rot * cos + cat(-second half, first half) * sin, in the dtype.
          v[i] = scalar_t(rounded<scalar_t>(a * rounded<scalar_t>(c[i])) +
                          rounded<scalar_t>(-b * rounded<scalar_t>(s[i])));
          v[i + half] = scalar_t(rounded<scalar_t>(b * rounded<scalar_t>(c[i + half])) +
                                 rounded<scalar_t>(a * rounded<scalar_t>(s[i + half])));
        }
      }
    }
  });
}

}  // namespace

// out (and new_residual) [rows, hidden] contiguous; residual undefined: no residual add.
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps,
              c10::optional<at::Tensor> residual, c10::optional<at::Tensor> new_residual) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(),
              "rms_norm needs contiguous tensors");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x dtypes differ");
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(hidden, 1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(
        x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        new_residual ? new_residual->data_ptr<scalar_t>() : nullptr, rows, hidden, float(eps));
  });
}

// x [tokens, heads, head_dim], rows may be strided (a view of the fused qkv projection);
// cos/sin [max_positions, rotary_dim] float32, both halves, as RotaryEmbedding caches them.
void rotary_embedding(at::Tensor positions, at::Tensor x, at::Tensor cos, at::Tensor sin,
                      int64_t rotary_dim) {
  TORCH_CHECK(x.stride(-1) == 1, "rotary_embedding: the head dim must be contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous(), "rotary_embedding: float32 caches");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "rotary_embedding: int64 positions");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rotary_embedding", [&] {
    rotate_rows<scalar_t>(positions.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), x.size(0),
                          x.size(1), x.stride(0), x.stride(1), cos.data_ptr<float>(),
                          sin.data_ptr<float>(), rotary_dim);
  });
}

namespace {

template <typename scalar_t>
void silu_and_mul_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = x + r * 2 * d;
      const scalar_t* up = gate + d;
      scalar_t* o = out + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float g = to_float(gate[i]);
        const float e = exp_nonpositive(-std::abs(g));  // sigmoid from exp(-|g|): no overflow
        const float sigmoid = (g >= 0.f ? 1.f : e) / (1.f + e);
        // The reference rounds silu(gate) to the dtype before the product.
        o[i] = scalar_t(rounded<scalar_t>(g * sigmoid) * to_float(up[i]));
      }
    }
  });
}

}  // namespace

// x [rows, 2 * d] contiguous -> out [rows, d]: silu(x[:, :d]) * x[:, d:], one pass.
void silu_and_mul(at::Tensor out, at::Tensor x) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "silu_and_mul needs contiguous tensors");
  const int64_t d = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(2 * d, 1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, d);
  });
}

// key/value [tokens, kv_heads, head_dim] with each token's heads contiguous (a view of the
// fused qkv projection is); caches [blocks, block_size, kv_heads, head_dim]; slot -1: skip.
// One copy of each token's row, where the reference's index_put goes through TensorIterator.
void store_kv(at::Tensor key, at::Tensor value, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor slot_mapping) {
  const int64_t row = k_cache.size(2) * k_cache.size(3);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "store_kv: contiguous caches");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
              value.stride(1) == value.size(2) && key.size(1) * key.size(2) == row,
              "store_kv: each token's keys and values must be one contiguous row");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "store_kv: int64 slot mapping");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * key.element_size();
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size();
  const int64_t v_stride = value.stride(0) * value.element_size();
  at::parallel_for(0, key.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      std::memcpy(kc + slots[t] * bytes, k + t * k_stride, bytes);
      std::memcpy(vc + slots[t] * bytes, v + t * v_stride, bytes);
    }
  });
}

namespace {

// The index of the first largest of x[0..n), its value into `top`: per lane of 16, the
// lane's first largest (a strict >), then the smallest index among the lanes that hold the
// largest. In this form gcc vectorizes it; a scalar max then a scan for it took 7 us a row
// of 8,192.
int64_t row_argmax(const float* x, int64_t n, float& top) {
  constexpr int kLanes = 16;
  float value[kLanes];
  int64_t index[kLanes];
  std::fill(value, value + kLanes, -std::numeric_limits<float>::infinity());
  std::fill(index, index + kLanes, n);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const bool larger = x[i + j] > value[j];
      value[j] = larger ? x[i + j] : value[j];
      index[j] = larger ? i + j : index[j];
    }
  for (int j = 0; i < n; ++i, ++j)  // the tail, into the lanes (after their own indices)
    if (x[i] > value[j]) value[j] = x[i], index[j] = i;
  top = -std::numeric_limits<float>::infinity();
  int64_t best = n;
  for (int j = 0; j < kLanes; ++j)
    if (value[j] > top || (value[j] == top && index[j] < best)) top = value[j], best = index[j];
  return best < n ? best : 0;  // no value above -inf (all banned, or NaN): token 0, as argmax
}

}  // namespace

// Greedy decoding's pick per row of float32 logits [rows, vocab] (rows may be strided): the
// first index of the row's largest value, as torch.argmax picks, into `tokens` (int64), and
// its log-probability, -log(sum(exp(x - max))), into `logprobs` (float32). Two passes over
// each row where argmax, log_softmax and a gather take four: ~0.2 ms less a decode step at
// 32 rows of 8,192.
void greedy_sample(at::Tensor tokens, at::Tensor logprobs, at::Tensor logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1,
              "greedy_sample takes float32 logits [rows, vocab] with contiguous rows");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && logprobs.scalar_type() == at::kFloat &&
              tokens.is_contiguous() && logprobs.is_contiguous() &&
              tokens.numel() == logits.size(0) && logprobs.numel() == logits.size(0),
              "greedy_sample writes int64 tokens and float32 logprobs, one per row");
  const int64_t vocab = logits.size(1), stride = logits.stride(0);
  const float* x0 = logits.data_ptr<float>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  float* out_logprobs = logprobs.data_ptr<float>();
  at::parallel_for(0, logits.size(0), 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = x0 + r * stride;
      float top;
      const int64_t best = row_argmax(x, vocab, top);
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < vocab; ++i) total += exp_nonpositive(x[i] - top);
      out_tokens[r] = best;
      out_logprobs[r] = -std::log(total);
    }
  });
}
