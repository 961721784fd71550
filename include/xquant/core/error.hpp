#pragma once
// Exceptions thrown for bad input. Every message names the argument and the expected value, so
// an integrator can fix the call without reading the library.

#include <sstream>
#include <stdexcept>
#include <string>

namespace xquant {

/// Base of every error the library raises.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
/// A tensor or view has the wrong shape or stride.
struct ShapeError : Error {
  using Error::Error;
};
/// A configuration value is unsupported (bits, group size, block size, dimensions).
struct ConfigError : Error {
  using Error::Error;
};
/// Input values cannot be represented (NaN/Inf, or outside the fp16 range of scales and zeros).
struct ValueError : Error {
  using Error::Error;
};
/// The cache has no room for the tokens being appended, or the sequence is sealed.
struct CapacityError : Error {
  using Error::Error;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}
}  // namespace detail

/// Throws `E` with the concatenated message when `ok` is false.
template <class E = Error, class... Parts>
void require(bool ok, const Parts&... parts) {
  if (!ok) throw E(detail::concat(parts...));
}

}  // namespace xquant
