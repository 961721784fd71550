#pragma once
// The exact dequantization of packed codes in three float instructions per value (no integer to
// float conversion): the code is or-ed into the mantissa of a power of two, which is subtracted,
// then one fused multiply-add applies the group's scale and zero. Bit for bit Q::decode's float.
// Used by the wgmma remat kernel (in its A fragments), the absorbed decode and the per-channel
// dequantize kernel. For quantizers with 8-bit parameters, a packed variant decodes two codes per
// three bf16x2 instructions (dequant_pair, the wgmma kernel).

#include "common.cuh"

namespace xquant::cuda::detail {

/// Quantizers whose parameters have 8 significant bits (ParamBits::Bf16), stored as bf16: the
/// wgmma kernel decodes their codes two at a time with dequant_pair.
template <class Q, class = void>
inline constexpr bool bf16_params = false;
template <class Q>
inline constexpr bool bf16_params<Q, std::void_t<decltype(Q::param_bits)>> = Q::param_bits == ParamBits::Bf16;

/// Q's parameter in the low 16 bits of `h` as a float. fp16 is converted in hardware without
/// Q::load's NaN test: the conversion is exact for every other value, and a NaN parameter gives NaN
/// products either way (only its payload could differ). bf16 is the float's upper half.
template <class Q>
__device__ __forceinline__ float param_float(std::uint32_t h) {
  if constexpr (bf16_params<Q>) return __uint_as_float(h << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}
/// `scale` times 2^-o: what dequant_bits<Q, o> takes (exact: a power-of-two scaling of an fp16
/// value stays a normal float).
__device__ __forceinline__ float offset_scale(float scale, int o) {
  // (The compiler keeps a multiplication by 1 written as __fmul_rn: offset 0 skips it.)
  return o == 0 ? scale : __fmul_rn(scale, __uint_as_float((127u - o) << 23));
}

/// `(u & mask) | 0x4B000000` in one LOP3. Written as C++, the compiler emits an AND and an OR (a
/// LOP3 takes one immediate), four instructions per value instead of three. The asm takes the
/// exponent from a register, which ptxas keeps loaded across the loop.
template <std::uint32_t Mask>
__device__ __forceinline__ std::uint32_t or_exponent(std::uint32_t u, std::uint32_t exponent) {
  std::uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(u), "n"(Mask), "r"(exponent));  // (a & b) | c
  return r;
}
/// Q::decode of the code at bit offset O of `u`, bit for bit, in three instructions. A code c at
/// bit offset o is read as a float by or-ing it into the mantissa of 2^M (F = 2^M + c·2^(o+M−23),
/// exact for o + bits <= 23) and subtracting 2^M. With M = 23 that is c·2^o, and the scale is
/// taken times 2^-o: (s·2^-o)·(c·2^o) is exactly s·c. With M = 23 − o it is c itself, and the scale
/// is taken as it is. decode rounds s·c, then s·c + z; the first rounding is exact (an fp16 scale
/// has 11 significant bits, a code at most 8, the product fits a float's 24), so one fused
/// multiply-add gives the same float.
template <class Q, int O, int M>
__device__ __forceinline__ float dequant_magic(std::uint32_t u, float s, float z) {
  static_assert(O + Q::bits <= 23, "dequant_magic: the code must fit the mantissa below bit 23");
  static_assert(M == 23 || M == 23 - O, "dequant_magic: the code reads as c·2^O or as c");
  constexpr float kMagic = static_cast<float>(1u << M);
  const float f = __uint_as_float(or_exponent<(Q::max_code << O)>(u, (127u + M) << 23));
  if constexpr (Q::scheme == Scheme::Asymmetric) {
    return __fmaf_rn(s, __fsub_rn(f, kMagic), z);
  } else {
    // (c − levels)·2^(o+M−23) exactly: both terms are integers below 2^24.
    constexpr float kBias = kMagic + static_cast<float>(Q::sym_levels << (O + M - 23));
    return __fmul_rn(s, __fsub_rn(f, kBias));
  }
}
/// dequant_magic with one magic number for every position: `s` is the scale times 2^-O
/// (offset_scale). For scales converted once per group (per-token), whose 2^-O factors are then
/// free, and one exponent register serves all positions.
template <class Q, int O>
__device__ __forceinline__ float dequant_bits(std::uint32_t u, float s, float z) {
  return dequant_magic<Q, O, 23>(u, s, z);
}
/// dequant_magic with a magic number per position: `s` is the scale as it is. For scales converted
/// every k step (per-channel), where a 2^-O factor cost an FMUL for each of three positions;
/// the four exponents take four registers.
template <class Q, int O>
__device__ __forceinline__ float dequant_code(std::uint32_t u, float s, float z) {
  return dequant_magic<Q, O, 23 - O>(u, s, z);
}

/// Two codes of a ParamBits::Bf16 quantizer as a bf16 pair, bit for bit bf16(Q::decode), in three
/// instructions for both (dequant_magic takes three per value and half a pack): the first code at
/// bit 0 of `x`, the second at bit 16 + O1. Each code is or-ed into the mantissa of a bf16 power of
/// two whose last place at the code's offset is worth 1 (128, and 2^(7 − O1)), which is subtracted
/// exactly; then one bf16 fma with the pair's scales `s2` and zeros `z2` (a multiplication,
/// symmetric) rounds the exact s·c + z once to bf16. The quantizer's parameters make that equal the
/// float decode rounded to bf16 (ParamBits; tests/test_core_quantizer.cpp checks it on the CPU).
template <class Q, int O1>
__device__ __forceinline__ std::uint32_t dequant_pair(std::uint32_t x, std::uint32_t s2, std::uint32_t z2) {
  static_assert(bf16_params<Q>, "dequant_pair: exact only for ParamBits::Bf16 parameters");
  static_assert(Q::bits + O1 <= 7, "dequant_pair: the code must fit a bf16 mantissa");
  constexpr std::uint32_t kMagic = 0x4300u | (0x4300u - (O1 << 7)) << 16;  // bf16 128 | 2^(7 − O1)
  // Symmetric codes are offset by the levels: subtract magic + levels.
  constexpr std::uint32_t kBias =
      kMagic | (Q::scheme == Scheme::Symmetric ? Q::sym_levels | Q::sym_levels << (16 + O1) : 0u);
  const std::uint32_t v = or_exponent<Q::max_code | Q::max_code << (16 + O1)>(x, kMagic);
  std::uint32_t r;
  asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(kBias));
  if constexpr (Q::scheme == Scheme::Asymmetric) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(r), "r"(s2), "r"(z2));
  else asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(r), "r"(s2));
  return r;
}

}  // namespace xquant::cuda::detail
