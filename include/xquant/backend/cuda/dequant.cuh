#pragma once
// The exact dequantization of packed codes in three float instructions per value (no integer to
// float conversion): the code is or-ed into the mantissa of a power of two, which is subtracted,
// then one fused multiply-add applies the group's scale and zero. Bit for bit Q::decode's float.
// Used by the wgmma remat kernel (in its A fragments), the absorbed decode and the per-channel
// dequantize kernel.

#include "common.cuh"

namespace xquant::cuda::detail {

/// The fp16 parameter in the low 16 bits of `h` as a float, converted in hardware without
/// Q::load's NaN test: the conversion is exact for every other value, and a NaN parameter gives NaN
/// products either way (only its payload could differ).
__device__ __forceinline__ float param_float(std::uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
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

}  // namespace xquant::cuda::detail
