#pragma once
// Shared by the reliability tests: one PerLayer codec per storage path of cache::Stream, and the
// small comparison helpers they all use.

#include <xquant/xquant.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "support.hpp"

namespace xqtest {

// One codec per storage path of cache::Stream: per-token without window (straight into blocks),
// per-token with a window, per-channel (always windowed), symmetric, unquantized fp16 and fp32.
// Groups fit a width of 64 and blocks of 32 tokens.
struct TokenDirect {
  using Codec = xquant::codec::PerLayer<xquant::quant::Uniform<2, xquant::Axis::Token>>;
  static Codec codec() { return {32, 0}; }
};
struct TokenWindow {
  using Codec = xquant::codec::PerLayer<xquant::quant::Uniform<4, xquant::Axis::Token>>;
  static Codec codec() { return {16, 7}; }
};
struct ChannelGroups {
  using Codec = xquant::codec::PerLayer<xquant::quant::Uniform<3, xquant::Axis::Channel>>;
  static Codec codec() { return {16, 0}; }
};
struct SymmetricWindow {
  using Codec = xquant::codec::PerLayer<xquant::quant::Uniform<8, xquant::Axis::Token, xquant::Scheme::Symmetric>>;
  static Codec codec() { return {64, 3}; }
};
struct Half {
  using Codec = xquant::codec::PerLayer<xquant::quant::Fp16>;
  static Codec codec() { return {}; }
};
struct Single {
  using Codec = xquant::codec::PerLayer<xquant::quant::Fp32>;
  static Codec codec() { return {}; }
};

/// Equal bit for bit (NaN payloads and the sign of zero included).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// The message of the exception of type E that f throws (or a text saying there was none).
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "no error of the expected type";
}

}  // namespace xqtest
