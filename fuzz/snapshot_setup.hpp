#pragma once
// The caches fuzz_snapshot restores into, shared with make_corpus (which writes valid snapshots
// of them as seeds): selector byte % 3 picks one.
#include <xquant/xquant.hpp>

namespace fuzzsetup {

namespace xq = xquant;

inline xq::CacheConfig snapshot_config() {
  xq::CacheConfig c;
  c.layers = 2;
  c.width = 16;
  c.attention = {2, 1, 8};
  c.capacity_tokens = 96;
  c.block_tokens = 16;
  return c;
}
using TokenCodec = xq::codec::PerLayer<xq::quant::Uniform<4, xq::Axis::Token>>;      // group 8, window 3
using ChannelCodec = xq::codec::PerLayer<xq::quant::Uniform<3, xq::Axis::Channel>>;  // group 8
using HalfCodec = xq::codec::PerLayer<xq::quant::Fp16>;
inline TokenCodec token_codec() { return {8, 3}; }
inline ChannelCodec channel_codec() { return {8, 0}; }
inline HalfCodec half_codec() { return {}; }

}  // namespace fuzzsetup
