#pragma once
// Small helpers shared by the codecs that keep several streams per layer (codec/latent.hpp,
// codec/kivi.hpp): an append must either store its tokens in every stream or in none, and a
// snapshot's description names the key and value streams' options.

#include <string>

#include "../cache/snapshot.hpp"
#include "../cache/stream.hpp"
#include "../core/half.hpp"
#include "../quant/ops.hpp"

namespace xquant::codec::detail {

/// Throws CapacityError unless every stream can take `n` more tokens of sequence `seq`.
template <class... Streams>
void require_room(std::size_t seq, index_t n, const Streams&... streams) {
  const auto check = [&](const auto& s) {
    const index_t need = s.blocks_needed(seq, n);
    require<CapacityError>(need <= s.free_blocks(), "cache capacity: appending ", n, " tokens needs ", need,
                           " more blocks of ", s.shape().block_tokens, " tokens, but only ", s.free_blocks(),
                           " are free");
  };
  (check(streams), ...);
}

/// Throws ValueError if a value of x (n values) does not fit fp16, before any stream sees it.
inline void require_fp16_range(const float* x, index_t n) {
  const auto count = static_cast<std::size_t>(n);
  if (const std::size_t i = find_half_misfit(x, count); i < count) quant::detail::throw_fp16_range(x[i], x[i]);
}

/// Quantizers whose stream may hold values in fp16 (windows, scales and zeros): all but Fp32.
template <class Q>
inline constexpr bool passes_fp16 = !(Q::is_float && Q::bits == 32);

/// The start of a key/value codec's snapshot description: "Name<KeyQ,ValueQ>{" and, each followed
/// by a comma, the options that change what is stored: the group of each quantized stream and the
/// window of a per-token value stream.
template <class KeyQ, class ValueQ>
std::string describe_key_value(const char* name, index_t key_group, index_t value_group, index_t window) {
  std::string d = xquant::detail::concat(name, "<", snapshot::describe_quantizer<KeyQ>(), ",",
                                         snapshot::describe_quantizer<ValueQ>(), ">{");
  if constexpr (!KeyQ::is_float) d += xquant::detail::concat("key_group=", key_group, ",");
  if constexpr (!ValueQ::is_float) d += xquant::detail::concat("value_group=", value_group, ",");
  if constexpr (!ValueQ::is_float && ValueQ::axis == Axis::Token) d += xquant::detail::concat("window=", window, ",");
  return d;
}

}  // namespace xquant::codec::detail
