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
/// \tparam S         Scheme::Asymmetric: scale s = (max-min)/(2^e-1) and zero z = min (rounded as PB says).
///                   Scheme::Symmetric: s = max|x|/(2^(e-1)-1), no zero; codes are
///                   offset by 2^(e-1)-1 so they stay unsigned (2 bits gives levels -s, 0, s).
/// \tparam PB        how the scale and zero are stored (ParamBits): Fp16, or Bf16 (8 significant
///                   bits, chosen so that the GPU's packed bf16 decode is exact; see ParamBits).
///
/// Codes are computed against the *stored* scale and zero, so that dequantization is the
/// exact inverse the encoder assumed: c = clamp(rint((x - z) / s), 0, 2^e-1), x̂ = z + s*c.
template <int Bits, Axis GroupAxis = Axis::Token, Scheme S = Scheme::Asymmetric, ParamBits PB = ParamBits::Fp16>
struct Uniform {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8,
                "xquant::quant::Uniform: Bits must be 2, 3, 4 or 8");
  static constexpr int bits = Bits;
  static constexpr Axis axis = GroupAxis;
  static constexpr Scheme scheme = S;
  static constexpr ParamBits param_bits = PB;
  static constexpr bool is_float = false;
  /// Parameters stored per group (2 bytes each, fp16 or bf16): scale and zero, or scale alone.
  static constexpr int params_per_group = S == Scheme::Asymmetric ? 2 : 1;
  static constexpr std::uint32_t max_code = (1u << Bits) - 1u;
  /// Symmetric: largest magnitude level; also the offset that makes codes unsigned.
  static constexpr int sym_levels = (1 << (Bits - 1)) - 1;

  /// Packed code bytes of one token row of `width` values.
  static constexpr index_t code_bytes(index_t width) { return packed_bytes<Bits>(width); }

  /// Exact storage of `tokens` tokens of `width` values in groups of `group`: packed codes plus
  /// 2-byte parameters (per token: width/group groups per token; per channel: one row of `width`
  /// per started group of tokens).
  static constexpr index_t storage_bytes(index_t tokens, index_t width, index_t group) {
    const index_t groups = GroupAxis == Axis::Token ? tokens * (width / group) : (tokens + group - 1) / group * width;
    return tokens * code_bytes(width) + groups * params_per_group * 2;
  }

  /// Scale and zero as floats (as stored: fp16- or bf16-rounded).
  struct Params {
    float scale, zero;
  };

  /// Chooses the group's parameters from its range and stores them in `out` (fp16 bits, or bf16
  /// bits for ParamBits::Bf16). Returns false when a parameter does not fit fp16 (|value| > 65504;
  /// ParamBits::Bf16: when the range does not): the caller raises.
  XQ_HOST_DEVICE static bool fit(float lo, float hi, std::uint16_t* out) {
    // −0 → +0: backends find the range in different orders (a vectorized min may return +0 where
    // the scalar loop returns −0), and the stored parameters must be the same bits everywhere.
    lo += 0.0f;
    hi += 0.0f;
    if constexpr (PB == ParamBits::Bf16) {
      return fit_8_bits(lo, hi, out);
    } else if constexpr (S == Scheme::Asymmetric) {
      out[0] = float_to_half((hi - lo) / static_cast<float>(max_code));
      out[1] = float_to_half(lo);
      return half_is_finite(out[0]) && half_is_finite(out[1]);
    } else {
      const float amax = (-lo > hi) ? -lo : hi;
      out[0] = float_to_half(amax / static_cast<float>(sym_levels));
      return half_is_finite(out[0]);
    }
  }

  /// fit() for ParamBits::Bf16, parameters stored as bf16: the zero rounded down, then the scale
  /// from it rounded up (so that the levels still span [lo, hi]) and at least 2^-24, as fp16's
  /// smallest (the reciprocal-based encode is exact from there on, see quotient()); a zero below
  /// 2^-20 of the scale stored as 0 (what makes one bf16 rounding of the decode equal the float
  /// decode rounded to bf16, see ParamBits). Activations past fp16's range (|x| > 65504) are
  /// refused as with fp16 parameters, so that every stream takes the same activations.
  XQ_HOST_DEVICE static bool fit_8_bits(float lo, float hi, std::uint16_t* out) {
    constexpr float kMinScale = 0x1p-24f, kMaxInput = 65504.0f;
    if (!(std::fabs(lo) <= kMaxInput && std::fabs(hi) <= kMaxInput)) return false;  // (NaN included)
    float zero = 0.0f, scale = 0.0f, top = hi;  // top: the magnitude the levels must reach
    float levels = static_cast<float>(sym_levels);
    if constexpr (S == Scheme::Asymmetric) {
      zero = bf16_to_float(float_to_bf16_toward(lo, false));
      levels = static_cast<float>(max_code);
    } else {
      top = (-lo > hi) ? -lo : hi;
    }
    // The zero as stored under `s`: below 2^-20 of it, 0.
    auto stored_zero = [zero](float s) { return std::fabs(zero) < s * 0x1p-20f ? 0.0f : zero; };
    if (top > zero) {
      scale = bf16_to_float(float_to_bf16_toward((top - zero) / levels, true));
      if (scale < kMinScale) scale = kMinScale;
      // The division rounded down onto a bf16 value: one step up. The top level is compared with
      // the zero as stored and exactly (levels·scale is exact, 8 by 8 significant bits; rounded,
      // its sum with the zero can land on top when it falls short by less than half an ulp). The
      // step is far more than any such shortfall, so a zero that it gets flushed does no harm.
      if (sum_below(levels * scale, stored_zero(scale), top))
        scale = bf16_to_float(static_cast<std::uint16_t>(float_to_bf16_toward(scale, true) + 1u));
    }
    zero = stored_zero(scale);
    out[0] = float_to_bf16_toward(scale, true);  // (exact: both have 8 significant bits by now)
    if constexpr (S == Scheme::Asymmetric) out[1] = float_to_bf16_toward(zero, false);
    return true;
  }

  /// Whether the exact a + b is below t: the rounded sum decides unless it equals t, then the
  /// sign of its rounding error (Knuth's two-sum, exact in IEEE float arithmetic).
  XQ_HOST_DEVICE static bool sum_below(float a, float b, float t) {
    const float s = a + b;
    if (s != t) return s < t;  // rounding is monotone and t a float: the exact sum is on s's side
    const float bb = s - a;
    return (a - (s - bb)) + (b - bb) < 0.0f;
  }

  XQ_HOST_DEVICE static Params load(const std::uint16_t* p) {
    if constexpr (PB == ParamBits::Bf16) {
      return {bf16_to_float(p[0]), S == Scheme::Asymmetric ? bf16_to_float(p[1]) : 0.0f};
    } else {
      if constexpr (S == Scheme::Asymmetric) return {half_to_float(p[0]), half_to_float(p[1])};
      else return {half_to_float(p[0]), 0.0f};
    }
  }

  /// Code of x under p. A zero scale (constant group) gives code 0 (asym.) or the middle level.
  XQ_HOST_DEVICE static std::uint8_t encode(float x, Params p) {
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    return code_of(p.scale > 0.0f ? rintf(a / p.scale) : 0.0f);
  }

  /// The quotient a / s correctly rounded (what `a / s` gives), from `inv` = 1/s correctly rounded,
  /// without a division: q = a·inv, then one correction q + (a − s·q)·inv, whose remainder a − s·q
  /// is exact inside the fused multiply-add (Markstein's step). s = 0 with inv = 0 (a constant
  /// group) gives 0.
  /// Exact for every positive fp16 s and every float a with |a/s| in [2^-3, 2^9): checked
  /// exhaustively on the GPU (test_cuda_quantize: every fp16 significand of s against every float
  /// significand of a over those binades; scaling a and s by a power of two scales every step, and
  /// no step leaves the normal range there). Below 2^-3 the result stays within a few ulps of a/s
  /// (or 2^-125), so both round to level 0; 2^9 is past every level of 8-bit codes.
  XQ_HOST_DEVICE static float quotient(float a, float s, float inv) {
    const float q = a * inv;
    return fmaf(fmaf(-q, s, a), inv, q);
  }

  /// The `inv` that quotient(), encode_scaled() and encode_exact() take: 1/p.scale correctly
  /// rounded, or 0 for a constant group (scale 0). Device code uses __frcp_rn, which stays
  /// correctly rounded under fast-math flags (where a plain 1/x may become an approximation).
  XQ_HOST_DEVICE static float reciprocal(Params p) {
    if (!(p.scale > 0.0f)) return 0.0f;
#ifdef __CUDA_ARCH__
    return __frcp_rn(p.scale);
#else
    return 1.0f / p.scale;
#endif
  }

  /// encode(x, p) with the quotient from the reciprocal `inv` = 1/p.scale (correctly rounded, or 0
  /// for a constant group): the same code for every finite x, see quotient().
  XQ_HOST_DEVICE static std::uint8_t encode_scaled(float x, Params p, float inv) {
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    return code_of(rintf(quotient(a, p.scale, inv)));
  }

  /// encode_scaled for kernels, with the rounding and the offset to an unsigned code done by one
  /// addition: returns the float 1.5·2^23 + rint(quotient), whose bits are exact_bias + code (in
  /// [2^23, 2^24) floats are spaced 1, and 1.5·2^23 is even, so ties go to even as rintf's do).
  /// Clamping before rounding equals encode()'s rounding before clamping (rounding is monotone and
  /// the levels are integers). Clamp = false skips the clamp, for groups where
  /// rounds_within_levels() holds. Non-finite x gives a meaningless code (the kernels flag it).
  template <bool Clamp = true>
  XQ_HOST_DEVICE static float encode_exact(float x, Params p, float inv) {
    const float a = S == Scheme::Asymmetric ? x - p.zero : x;
    float d = quotient(a, p.scale, inv);
    if constexpr (Clamp) d = fminf(fmaxf(d, lowest_level), highest_level);  // NaN → lowest
    return d + 0x1.8p23f;
  }
  /// encode_exact's float bits minus the code: float_bits(1.5·2^23) plus the lowest level.
  static constexpr std::uint32_t exact_bias = 0x4B400000u - static_cast<std::uint32_t>(S == Scheme::Symmetric ? sym_levels : 0);

  /// Whether every x in [lo, hi] has a quotient that rounds into the levels unclamped, in
  /// (L − ½, H + ½): the correctly rounded quotient is monotone in x, so the ends decide. NaN ends
  /// give false.
  XQ_HOST_DEVICE static bool rounds_within_levels(float lo, float hi, Params p, float inv) {
    const float z = S == Scheme::Asymmetric ? p.zero : 0.0f;
    return quotient(lo - z, p.scale, inv) > lowest_level - 0.5f && quotient(hi - z, p.scale, inv) < highest_level + 0.5f;
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
