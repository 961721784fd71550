#pragma once
// Bit counts of sizes: how many bits a shift, a mask or a key field needs for a count n.

#include <cstdint>

#include "../config.hpp"

namespace xquant {

/// The smallest b with 2^b >= n: ceil(log2 n), so log2 n for a power of two, and 0 for n <= 1
/// (64 for n > 2^63).
XQ_HOST_DEVICE constexpr unsigned ceil_log2(std::uint64_t n) {
  unsigned b = 0;
  while (b < 64 && (std::uint64_t(1) << b) < n) ++b;
  return b;
}

}  // namespace xquant
