#pragma once
// IEEE binary16 conversions written on the bit level, identical on host and device, so a scale
// stored by the CPU path and one stored by a CUDA kernel are the same 16 bits. Round to nearest
// even; overflow gives ±Inf (callers check with half_is_finite). Device code uses the hardware
// conversions, which give the same bits except for NaN payloads (those keep the bit-level path).

#include <cstring>

#include "../config.hpp"

namespace xquant {

XQ_HOST_DEVICE std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
XQ_HOST_DEVICE float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

namespace detail {
/// float -> fp16 bits on the bit level (the host's conversion, and the device's for NaN).
XQ_HOST_DEVICE std::uint16_t float_to_half_bitwise(float f) {
  std::uint32_t u = float_bits(f);
  const std::uint32_t sign = u & 0x80000000u;
  u ^= sign;
  std::uint32_t h;
  if (u >= (143u << 23)) {  // |f| >= 65536, Inf or NaN
    h = u > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // result is an fp16 subnormal or zero
    // Adding 0.5 aligns the mantissa so the hardware float add does the rounding.
    const std::uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    h = float_bits(bits_float(u) + bits_float(magic)) - magic;
  } else {
    const std::uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    h = u >> 13;  // a carry out of the mantissa correctly rounds up to the next binade / Inf
  }
  return static_cast<std::uint16_t>(h | (sign >> 16));
}

/// fp16 bits -> float on the bit level (exact).
XQ_HOST_DEVICE float half_to_float_bitwise(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
}  // namespace detail

/// float -> fp16 bits, round to nearest even (subnormals kept, NaN stays NaN).
XQ_HOST_DEVICE std::uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  // The hardware conversion rounds the same way (to nearest even, subnormals kept, overflow to
  // Inf); only its NaN differs, so NaN takes the bit-level path. One instruction instead of ~15;
  // tests/cuda compares the two over every float.
  if (f != f) return detail::float_to_half_bitwise(f);
  unsigned short hw;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hw) : "f"(f));
  return hw;
#else
  return detail::float_to_half_bitwise(f);
#endif
}

/// fp16 bits -> float (exact).
XQ_HOST_DEVICE float half_to_float(std::uint16_t h) {
#if defined(__CUDA_ARCH__)
  if ((h & 0x7fffu) <= 0x7c00u) {  // not NaN: the hardware conversion is exact
    float hw;
    asm("cvt.f32.f16 %0, %1;" : "=f"(hw) : "h"(static_cast<unsigned short>(h)));
    return hw;
  }
#endif
  return detail::half_to_float_bitwise(h);
}

XQ_HOST_DEVICE bool half_is_finite(std::uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

/// Round a float to the nearest fp16 value and back.
XQ_HOST_DEVICE float round_to_half(float f) { return half_to_float(float_to_half(f)); }

/// Largest finite fp16 value.
inline constexpr float kHalfMax = 65504.0f;

}  // namespace xquant
