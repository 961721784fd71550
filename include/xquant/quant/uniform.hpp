#pragma once
// Uniform (round-to-nearest) group quantization: the paper's quantizer. Host+device math only;
// the loops over rows and groups live in the backends (quant/reference.hpp is the scalar one).

#include <cmath>

#include "../core/half.hpp"
#include "format.hpp"
#include "packing.hpp"

namespace xquant::quant {

/// Uniform quantizer policy.
///
/// \tparam Bits      code width: 2, 3, 4 or 8. Codes are bit-packed densely.
/// \tparam GroupAxis Axis::Token groups `group` consecutive channels of one token (per-token
///                   quantization); Axis::Channel groups `group` consecutive tokens of one
///                   channel (per-channel; newest tokens wait in the fp16 window until a group fills).
/// \tparam S         Scheme::Asymmetric: scale s = (max-min)/(2^e-1) and zero z = min, both fp16.
///                   Scheme::Symmetric: s = max|x|/(2^(e-1)-1), fp16, no zero; codes are
///                   offset by 2^(e-1)-1 so they stay unsigned (2 bits gives levels -s, 0, s).
///
/// Codes are computed against the *stored* fp16 scale and zero, so that dequantization is the
/// exact inverse the encoder assumed: c = clamp(rint((x - z) / s), 0, 2^e-1), x̂ = z + s*c.
template <int Bits, Axis GroupAxis = Axis::Token, Scheme S = Scheme::Asymmetric>
struct Uniform {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8,
                "xquant::quant::Uniform: Bits must be 2, 3, 4 or 8");
  static constexpr int bits = Bits;
  static constexpr Axis axis = GroupAxis;
  static constexpr Scheme scheme = S;
  static constexpr bool is_float = false;
  /// fp16 values stored per group: scale and zero, or scale alone.
  static constexpr int params_per_group = S == Scheme::Asymmetric ? 2 : 1;
  static constexpr std::uint32_t max_code = (1u << Bits) - 1u;
  /// Symmetric: largest magnitude level; also the offset that makes codes unsigned.
  static constexpr int sym_levels = (1 << (Bits - 1)) - 1;

  /// Packed code bytes of one token row of `width` values.
  static constexpr index_t code_bytes(index_t width) { return packed_bytes<Bits>(width); }

  /// Exact storage of `tokens` tokens of `width` values in groups of `group`: packed codes plus
  /// fp16 parameters (per token: width/group groups per token; per channel: one row of `width`
  /// per started group of tokens).
  static constexpr index_t storage_bytes(index_t tokens, index_t width, index_t group) {
    const index_t groups = GroupAxis == Axis::Token ? tokens * (width / group) : (tokens + group - 1) / group * width;
    return tokens * code_bytes(width) + groups * params_per_group * 2;
  }

  /// Scale and zero as floats (already fp16-rounded).
  struct Params {
    float scale, zero;
  };

  /// Chooses the group's parameters from its range and stores them as fp16 bits in `out`.
  /// Returns false when a parameter does not fit fp16 (|value| > 65504): the caller raises.
  XQ_HOST_DEVICE static bool fit(float lo, float hi, std::uint16_t* out) {
    // −0 → +0: backends find the range in different orders (a vectorized min may return +0 where
    // the scalar loop returns −0), and the stored parameters must be the same bits everywhere.
    lo += 0.0f;
    hi += 0.0f;
    if constexpr (S == Scheme::Asymmetric) {
      out[0] = float_to_half((hi - lo) / static_cast<float>(max_code));
      out[1] = float_to_half(lo);
      return half_is_finite(out[0]) && half_is_finite(out[1]);
    } else {
      const float amax = (-lo > hi) ? -lo : hi;
      out[0] = float_to_half(amax / static_cast<float>(sym_levels));
      return half_is_finite(out[0]);
    }
  }

  XQ_HOST_DEVICE static Params load(const std::uint16_t* p) {
    if constexpr (S == Scheme::Asymmetric) return {half_to_float(p[0]), half_to_float(p[1])};
    else return {half_to_float(p[0]), 0.0f};
  }

  /// Code of x under p. A zero scale (constant group) gives code 0 (asym.) or the middle level.
  XQ_HOST_DEVICE static std::uint8_t encode(float x, Params p) {
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    return code_of(p.scale > 0.0f ? rintf(a / p.scale) : 0.0f);
  }

  /// encode(x, p) with a multiplication by `inv` = 1/p.scale in place of the division (for kernels
  /// where one division per value is the cost); the code is always encode()'s. Why: the product
  /// t = (x − z)·inv and the correctly rounded quotient d = (x − z)/s both come within three
  /// roundings of 2^-24 of the exact quotient, so |t − d| < 2^-22·|t|; rint(t) and rint(d) can then
  /// differ only if a half-integer lies within that distance of t, and exactly then the division is
  /// done. (|t| ≥ 2^21 always takes the division; a subnormal t errs by < 2^-126 absolutely.)
  /// Precondition: p.scale > 0 (a constant group has scale 0: use encode()).
  XQ_HOST_DEVICE static std::uint8_t encode_scaled(float x, Params p, float inv) {
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    float t = a * inv;
    const float f = t - floorf(t);
    if (fabsf(f - 0.5f) <= fabsf(t) * 0x1p-22f + 0x1p-126f) t = a / p.scale;
    return code_of(rintf(t));
  }

  /// Threshold of encode_biased's tie flag: |t − rint(t)| at or above it flags t (see there).
  static constexpr float tie_threshold = 0.5f - static_cast<float>(1u << Bits) * 0x1p-22f;
  /// float_bits(1.5·2^23): encode_biased's result is the float 1.5·2^23 + code, its bits this + code.
  static constexpr std::uint32_t biased_zero = 0x4B400000u;

  /// encode_scaled without its per-value division test, for kernels: returns the float
  /// 1.5·2^23 + code (its bits are biased_zero + code) and sets `tie` when that code may differ
  /// from encode()'s (the caller then encodes with encode()). `inv` = 1/p.scale correctly rounded,
  /// or 0 for a constant group (q = 0: encode()'s code 0, or the middle level). Clamp = false
  /// skips the clamp to the levels, for groups where rounds_within_levels() holds.
  ///
  /// Why it is exact. The quotient rounded here is q = a·inv (a = x − z), exact inside the fused
  /// multiply-adds, or, when clamped, fl(a·inv) clamped to the levels [L, H] (integers). Against
  /// d = a/s rounded (encode's), |q − d| < 3.01·2^-24·|q| + 2^-148 (at most three roundings).
  ///  - Clamping before rounding equals rounding before clamping (rounding is monotone and fixes
  ///    integers); unclamped, q is in (L − ½, H + ½). Either way q + 1.5·2^23 − L lies in
  ///    [2^23, 2^24), where floats are spaced 1: m is 1.5·2^23 − L plus the integer nearest q (a
  ///    tie may go either way: it is flagged), and m − (1.5·2^23 − L) is exact (Sterbenz).
  ///  - q clamped: fl(a·inv) > H gives d > H·(1 − 2^-22) > H − ½, so rint(d) clamps to H too;
  ///    below L likewise. No tie can matter there.
  ///  - Otherwise |q| < 2^Bits, so |q − d| < 2^(Bits−22). The codes can differ only if a
  ///    half-integer lies within |q − d| of q, i.e. |q − round(q)| > ½ − 2^(Bits−22) =
  ///    tie_threshold; r = q − round(q) rounded keeps |r| ≥ tie_threshold there (rounding is
  ///    monotone and the threshold is a float): `tie` is set.
  /// `threshold` is for the tests (a larger one must miss ties); kernels keep the default.
  template <bool Clamp = true>
  XQ_HOST_DEVICE static float encode_biased(float x, Params p, float inv, bool& tie,
                                            float threshold = tie_threshold) {
    constexpr float magic = 0x1.8p23f - lowest_level;
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    float m, r;
    if constexpr (Clamp) {
      const float t = fminf(fmaxf(a * inv, lowest_level), highest_level);  // NaN (non-finite x) → lowest
      m = t + magic;
      r = t - (m - magic);
    } else {  // fused: one instruction each, and the same code on every compiler
      m = fmaf(a, inv, magic);
      r = fmaf(a, inv, -(m - magic));
    }
    tie = tie | (fabsf(r) >= threshold);
    return m;
  }

  /// Whether every x in [lo, hi] has a quotient (x − z)·inv that rounds into the levels unclamped,
  /// in (L − ½, H + ½): the quotient is monotone in x, so the ends decide. NaN ends give false.
  XQ_HOST_DEVICE static bool rounds_within_levels(float lo, float hi, Params p, float inv) {
    const float z = S == Scheme::Asymmetric ? p.zero : 0.0f;
    return (lo - z) * inv > lowest_level - 0.5f && (hi - z) * inv < highest_level + 0.5f;
  }

  /// The levels, as rounded quotients: [0, 2^e − 1], or symmetric [−(2^(e−1) − 1), 2^(e−1) − 1].
  static constexpr float lowest_level = S == Scheme::Asymmetric ? 0.0f : -static_cast<float>(sym_levels);
  static constexpr float highest_level = S == Scheme::Asymmetric ? static_cast<float>(max_code)
                                                                  : static_cast<float>(sym_levels);

  /// The stored code of a rounded quotient: clamped to the levels (symmetric: offset by them).
  XQ_HOST_DEVICE static std::uint8_t code_of(float t) {
    if constexpr (S == Scheme::Asymmetric) {
      t = t < 0.0f ? 0.0f : (t > static_cast<float>(max_code) ? static_cast<float>(max_code) : t);
      return static_cast<std::uint8_t>(t);
    } else {
      constexpr float q = static_cast<float>(sym_levels);
      t = t < -q ? -q : (t > q ? q : t);
      return static_cast<std::uint8_t>(t + q);
    }
  }

  XQ_HOST_DEVICE static float decode(std::uint32_t c, Params p) {
    if constexpr (S == Scheme::Asymmetric) return mul_add_rn(p.scale, static_cast<float>(c), p.zero);
    else return p.scale * static_cast<float>(static_cast<int>(c) - sym_levels);
  }
};

}  // namespace xquant::quant
