#pragma once
// IEEE binary16 conversions written on the bit level, identical on host and device, so a scale
// stored by the CPU path and one stored by a CUDA kernel are the same 16 bits. Round to nearest
// even; overflow gives ±Inf (callers check with half_is_finite). Device code uses the hardware
// conversions, which give the same bits except for NaN payloads (those keep the bit-level path).

#include <cmath>
#include <cstddef>
#include <cstring>

#include "../config.hpp"

// Bulk conversions use the x86 F16C instructions when the CPU has them, chosen at run time, so a
// library built without -mf16c still gets them (GCC and Clang on x86 only; host code only).
// Define XQUANT_NO_F16C to keep the scalar loops everywhere (the results are the same bits).
#if !defined(__CUDA_ARCH__) && !defined(XQUANT_NO_F16C) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define XQUANT_F16C_DISPATCH 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define XQUANT_F16C_DISPATCH 0
#endif

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

/// bf16 bits -> float (exact).
XQ_HOST_DEVICE float bf16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }
/// float -> bf16 bits, rounded toward +Inf (`up`) or toward -Inf: exact for a float of at most 8
/// significant bits (NaN stays NaN).
XQ_HOST_DEVICE std::uint16_t float_to_bf16_toward(float f, bool up) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  std::uint16_t b = static_cast<std::uint16_t>(u >> 16);  // toward zero
  const bool negative = (u >> 31) != 0;
  if ((u & 0xffffu) != 0 && up != negative) ++b;  // one step away from zero
  return b;
}

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

/// True when f rounds to a finite fp16 value: |f| < 65520, the midpoint between 65504 and 65536
/// that ties to 65536 = Inf (NaN gives false). The same answer as half_is_finite(float_to_half(f)),
/// without the conversion, so range checks over whole rows vectorize.
XQ_HOST_DEVICE bool fits_half(float f) { return std::fabs(f) < 65520.0f; }

#if !defined(__CUDA_ARCH__)
/// Index of the first of n floats that does not fit fp16, or n when all fit. The all-fit case,
/// the common one, is a count in one vectorized pass; only a misfit pays for the search.
inline std::size_t find_half_misfit(const float* x, std::size_t n) {
  std::size_t misfits = 0;
  for (std::size_t i = 0; i < n; ++i) misfits += !fits_half(x[i]);
  if (misfits == 0) return n;
  std::size_t i = 0;
  while (fits_half(x[i])) ++i;
  return i;
}

namespace detail {
#if XQUANT_F16C_DISPATCH
__attribute__((target("avx,f16c"))) inline void floats_to_halves_f16c(const float* x, std::uint16_t* h,
                                                                      std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) h[i] = float_to_half_bitwise(x[i]);
}
__attribute__((target("avx,f16c"))) inline void halves_to_floats_f16c(const std::uint16_t* h, float* x,
                                                                      std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) x[i] = half_to_float_bitwise(h[i]);
}
__attribute__((target("avx,f16c"))) inline void round_floats_to_half_f16c(float* x, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  for (; i < n; ++i) x[i] = half_to_float_bitwise(float_to_half_bitwise(x[i]));
}
/// Whether this CPU runs the F16C conversions (asked once). F16C is CPUID.1:ECX bit 29, read
/// directly because not every compiler's __builtin_cpu_supports knows "f16c" (clang 14 does
/// not); "avx" also confirms that the OS saves the YMM registers.
inline bool cpu_has_f16c() {
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __builtin_cpu_supports("avx") && __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
  }();
  return yes;
}
#else
inline bool cpu_has_f16c() { return false; }
#endif
}  // namespace detail

/// n floats to fp16 bits: the bits of float_to_half for every value except NaN (always some NaN).
inline void floats_to_halves(const float* x, std::uint16_t* h, std::size_t n) {
#if XQUANT_F16C_DISPATCH
  if (detail::cpu_has_f16c()) return detail::floats_to_halves_f16c(x, h, n);
#endif
  for (std::size_t i = 0; i < n; ++i) h[i] = detail::float_to_half_bitwise(x[i]);
}

/// n fp16 values to floats: exactly half_to_float for every value except NaN (always some NaN).
inline void halves_to_floats(const std::uint16_t* h, float* x, std::size_t n) {
#if XQUANT_F16C_DISPATCH
  if (detail::cpu_has_f16c()) return detail::halves_to_floats_f16c(h, x, n);
#endif
  for (std::size_t i = 0; i < n; ++i) x[i] = detail::half_to_float_bitwise(h[i]);
}
/// Rounds n floats to fp16 and back, in place: round_to_half of each value except NaN.
inline void round_floats_to_half(float* x, std::size_t n) {
#if XQUANT_F16C_DISPATCH
  if (detail::cpu_has_f16c()) return detail::round_floats_to_half_f16c(x, n);
#endif
  for (std::size_t i = 0; i < n; ++i) x[i] = detail::half_to_float_bitwise(detail::float_to_half_bitwise(x[i]));
}
#endif  // !__CUDA_ARCH__

}  // namespace xquant
