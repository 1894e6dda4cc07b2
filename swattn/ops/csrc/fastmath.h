// Vectorisable exp and tanh shared by the attention kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace swattn {

// exp(x) as 2^n * e^r with a degree-6 polynomial (Cephes' expf): about 1 ulp, and written so
// that the compiler vectorises the loops that call it (libm's expf would not be).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // e^-87 ~ 1e-38: callers zero masked entries exactly
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float fast_tanh(float x) {
  const float e = fast_exp(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}

}  // namespace swattn
