#pragma once
// Runtime → compile-time dispatch, in one place: a command line or config file says "--bits 3",
// the kernels want Bits as a template constant.

#include <type_traits>
#include <utility>

#include "error.hpp"

namespace xquant {

/// Calls f(std::integral_constant<int, B>{}) for B == bits; bits must be 2, 3, 4 or 8.
template <class F>
decltype(auto) dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return std::forward<F>(f)(std::integral_constant<int, 2>{});
    case 3: return std::forward<F>(f)(std::integral_constant<int, 3>{});
    case 4: return std::forward<F>(f)(std::integral_constant<int, 4>{});
    case 8: return std::forward<F>(f)(std::integral_constant<int, 8>{});
    default: throw ConfigError(detail::concat("bits: must be 2, 3, 4 or 8, got ", bits));
  }
}

}  // namespace xquant
