#pragma once
// Division by a divisor fixed at launch, as a multiply-high, an add and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994, Figure 4.1). Kernels
// that map a thread index to (row, column) divide by a runtime count; a plain 32-bit `/` on the
// GPU is a ~20-instruction sequence, which per-thread index math pays once or twice.

#include <cstdint>

#include "../config.hpp"
#include "bits.hpp"
#include "error.hpp"

namespace xquant {

/// n / d and n % d for a divisor d >= 1 chosen on the host, for any 32-bit n.
/// With s = ceil(log2 d) and m = floor(2^32·(2^s − d)/d) + 1 (< 2^32), the quotient is
/// (floor(n·m / 2^32) + n) >> s, the sum taken in 64 bits (it can exceed 2^32 − 1).
struct FastDivmod {
  std::uint32_t divisor = 1, multiplier = 0, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(std::uint32_t d) : divisor(d), shift(ceil_log2(d)) {
    if (d == 0) throw ConfigError("FastDivmod: divisor must be >= 1, got 0");
    multiplier = static_cast<std::uint32_t>(((std::uint64_t(1) << 32) * ((std::uint64_t(1) << shift) - d)) / d + 1);
  }

  XQ_HOST_DEVICE std::uint32_t div(std::uint32_t n) const {
    const std::uint64_t hi = (static_cast<std::uint64_t>(n) * multiplier) >> 32;
    return static_cast<std::uint32_t>((hi + n) >> shift);
  }
  /// n mod d, given q = div(n).
  XQ_HOST_DEVICE std::uint32_t mod(std::uint32_t n, std::uint32_t q) const { return n - q * divisor; }
};

}  // namespace xquant
