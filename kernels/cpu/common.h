// Shared by the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <bit>

namespace pagedserve {

// An element as float. bfloat16 is the top half of a float32: a shift the compiler
// vectorizes, where c10's own conversion stays a scalar call per element.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  return std::bit_cast<float>(uint32_t(x.x) << 16);
}

// A float rounded to the element type and back: the value torch's own ops would hold between
// two steps that each round to the tensor's dtype.
template <typename scalar_t>
inline float rounded(float x) {
  return to_float(scalar_t(x));
}

// exp(x) for x <= 0, in a form the compiler vectorizes (libm's expf is a call per element):
// 2^n times 2^f, |f| <= 1/2, by its Taylor series to degree 7 (truncation under 1e-7
// relative, about an ulp).
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;  // log2(e)
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.525273380405984e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  return p * std::bit_cast<float>((int32_t(n) + 127) << 23);  // 2^n: n >= -126 after the clamp
}

}  // namespace pagedserve
