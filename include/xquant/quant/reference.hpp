#pragma once
// Scalar reference of every quantize/dequantize operation: one loop per concept, no tricks.
// Optimized backends must match its codes bit for bit and its values to 1 ulp.

#include <vector>

#include "ops.hpp"
#include "uniform.hpp"

namespace xquant::quant {

template <>
struct QuantOps<backend::Reference> {
  /// Per-token groups: quantizes `rows` tokens (row stride `ld` floats) of `width` values.
  template <class Q>
  static void quantize_tokens(const float* x, index_t rows, index_t ld, index_t width, index_t group,
                              std::uint8_t* codes, std::uint16_t* params) {
    const index_t cb = Q::code_bytes(width);
    if constexpr (Q::is_float) {
      for (index_t r = 0; r < rows; ++r) store_float<Q>(x + r * ld, width, codes + r * cb);
    } else {
      static_assert(Q::axis == Axis::Token, "quantize_tokens needs a per-token quantizer");
      std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
      const index_t groups = width / group;
      for (index_t r = 0; r < rows; ++r) {
        const float* row = x + r * ld;
        for (index_t g = 0; g < groups; ++g) {
          const float* v = row + g * group;
          float lo = v[0], hi = v[0];
          for (index_t i = 1; i < group; ++i) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
          }
          std::uint16_t* p = params + (r * groups + g) * Q::params_per_group;
          if (!Q::fit(lo, hi, p)) detail::throw_fp16_range(lo, hi);
          const auto P = Q::load(p);
          for (index_t i = 0; i < group; ++i) c[g * group + i] = Q::encode(v[i], P);
        }
        pack_codes<Q::bits>(c.data(), width, codes + r * cb);
      }
    }
  }

  /// Per-channel groups: quantizes one group of `rows` (≤ group) tokens; params has width entries.
  template <class Q>
  static void quantize_channels(const float* x, index_t rows, index_t ld, index_t width,
                                std::uint8_t* codes, std::uint16_t* params) {
    static_assert(!Q::is_float && Q::axis == Axis::Channel, "quantize_channels needs a per-channel quantizer");
    if (rows <= 0 || width <= 0) return;
    for (index_t j = 0; j < width; ++j) {
      float lo = x[j], hi = x[j];
      for (index_t r = 1; r < rows; ++r) {
        const float v = x[r * ld + j];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
      if (!Q::fit(lo, hi, params + j * Q::params_per_group)) detail::throw_fp16_range(lo, hi);
    }
    std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
    for (index_t r = 0; r < rows; ++r) {
      for (index_t j = 0; j < width; ++j)
        c[j] = Q::encode(x[r * ld + j], Q::load(params + j * Q::params_per_group));
      pack_codes<Q::bits>(c.data(), width, codes + r * Q::code_bytes(width));
    }
  }

  /// Inverse of quantize_tokens.
  template <class Q>
  static void dequantize_tokens(const std::uint8_t* codes, const std::uint16_t* params, index_t rows,
                                index_t width, index_t group, float* out, index_t ld) {
    const index_t cb = Q::code_bytes(width);
    if constexpr (Q::is_float) {
      for (index_t r = 0; r < rows; ++r) load_float<Q>(codes + r * cb, width, out + r * ld);
    } else {
      std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
      const index_t groups = width / group;
      for (index_t r = 0; r < rows; ++r) {
        unpack_codes<Q::bits>(codes + r * cb, width, c.data());
        for (index_t i = 0; i < width; ++i)
          out[r * ld + i] = Q::decode(c[i], Q::load(params + (r * groups + i / group) * Q::params_per_group));
      }
    }
  }

  /// Inverse of quantize_channels for `rows` tokens of one group.
  template <class Q>
  static void dequantize_channels(const std::uint8_t* codes, const std::uint16_t* params, index_t rows,
                                  index_t width, float* out, index_t ld) {
    std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
    for (index_t r = 0; r < rows; ++r) {
      unpack_codes<Q::bits>(codes + r * Q::code_bytes(width), width, c.data());
      for (index_t j = 0; j < width; ++j)
        out[r * ld + j] = Q::decode(c[j], Q::load(params + j * Q::params_per_group));
    }
  }

  template <class Q>
  static void store_float(const float* x, index_t width, std::uint8_t* out) {
    if constexpr (Q::bits == 32) {
      std::memcpy(out, x, static_cast<std::size_t>(width) * sizeof(float));
    } else {
      for (index_t i = 0; i < width; ++i) {
        const std::uint16_t h = float_to_half(x[i]);
        if (!half_is_finite(h)) detail::throw_fp16_range(x[i], x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
    }
  }
  template <class Q>
  static void load_float(const std::uint8_t* in, index_t width, float* out) {
    if constexpr (Q::bits == 32) {
      std::memcpy(out, in, static_cast<std::size_t>(width) * sizeof(float));
    } else {
      for (index_t i = 0; i < width; ++i) {
        std::uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = half_to_float(h);
      }
    }
  }
};

}  // namespace xquant::quant
