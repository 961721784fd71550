#pragma once
// Dense bit packing of e-bit codes. Code i of a row occupies bits [i*e, (i+1)*e) of the row's
// little-endian bit stream; a row is padded to a whole byte only at its end, so 3-bit codes take
// 3 bits (8 codes in 3 bytes), not 4.

#include "../config.hpp"

namespace xquant::quant {

/// Bytes that `n` codes of `Bits` bits occupy when packed.
template <int Bits>
XQ_HOST_DEVICE constexpr index_t packed_bytes(index_t n) {
  return (n * Bits + 7) / 8;
}

/// Packs `n` codes (each < 2^Bits) into `packed_bytes<Bits>(n)` bytes.
template <int Bits>
XQ_HOST_DEVICE void pack_codes(const std::uint8_t* codes, index_t n, std::uint8_t* out) {
  static_assert(Bits >= 1 && Bits <= 8, "pack_codes: Bits must be in [1, 8]");
  index_t i = 0;
  // Eight codes fill exactly Bits bytes: build them in one 64-bit word.
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w = 0;
    for (int k = 0; k < 8; ++k) w |= static_cast<std::uint64_t>(codes[i + k]) << (k * Bits);
    for (int b = 0; b < Bits; ++b) *out++ = static_cast<std::uint8_t>(w >> (8 * b));
  }
  if (i < n) {
    std::uint64_t w = 0;
    const int rest = static_cast<int>(n - i);
    for (int k = 0; k < rest; ++k) w |= static_cast<std::uint64_t>(codes[i + k]) << (k * Bits);
    const int bytes = (rest * Bits + 7) / 8;
    for (int b = 0; b < bytes; ++b) *out++ = static_cast<std::uint8_t>(w >> (8 * b));
  }
}

/// Inverse of pack_codes.
template <int Bits>
XQ_HOST_DEVICE void unpack_codes(const std::uint8_t* in, index_t n, std::uint8_t* codes) {
  static_assert(Bits >= 1 && Bits <= 8, "unpack_codes: Bits must be in [1, 8]");
  constexpr std::uint64_t mask = (1u << Bits) - 1u;
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w = 0;
    for (int b = 0; b < Bits; ++b) w |= static_cast<std::uint64_t>(*in++) << (8 * b);
    for (int k = 0; k < 8; ++k) codes[i + k] = static_cast<std::uint8_t>((w >> (k * Bits)) & mask);
  }
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    const int bytes = (rest * Bits + 7) / 8;
    std::uint64_t w = 0;
    for (int b = 0; b < bytes; ++b) w |= static_cast<std::uint64_t>(*in++) << (8 * b);
    for (int k = 0; k < rest; ++k) codes[i + k] = static_cast<std::uint8_t>((w >> (k * Bits)) & mask);
  }
}

}  // namespace xquant::quant
