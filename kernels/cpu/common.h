// Shared by the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace pagedserve {

// An element as float. bfloat16 is the top half of a float32: a shift the compiler
// vectorizes, where c10's own conversion stays a scalar call per element.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A float rounded to the element type and back: the value torch's own ops would hold between
// two steps that each round to the tensor's dtype.
template <typename scalar_t>
inline float rounded(float x) {
  return to_float(scalar_t(x));
}

}  // namespace pagedserve
