// Per-token ops for CPUs, one pass over each row instead of several torch calls (each of which
// reads and writes the whole [tokens, hidden] tensor): RMSNorm with the residual add in front,
// and the rotary embedding applied in place. kernels/reference.py is their specification,
// rounding included: where the reference rounds to the tensor's dtype between steps, so do
// these.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"

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
