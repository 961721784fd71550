#pragma once
// KIVI* baseline (DESIGN.md §1): quantize the KV cache itself, so that every comparison with
// XQuant runs side by side through the same cache and attention. Keys are computed from X at
// append time (K = X·Wkᵀ + bk) and quantized per channel *before* RoPE (RoPE is applied after
// dequantizing, at each token's own position); values (V = X·Wvᵀ + bv) per token. The newest
// keys wait in fp16 until their group of `key_group` tokens fills; values keep the newest
// `window` tokens in fp16.
//
// Snapshots: each layer's key and value streams in layer order. The description does not
// fingerprint the weights: the stored K and V read back without them (as a plain KV cache would).

#include <string>
#include <vector>

#include "../backend/eigen/linalg.hpp"
#include "../cache/config.hpp"
#include "../cache/snapshot.hpp"
#include "../cache/stream.hpp"
#include "../quant/uniform.hpp"
#include "../remat/weights.hpp"
#include "common.hpp"

namespace xquant::codec {

/// KV-cache quantization.
///
/// \tparam KeyQ   quantizer of pre-RoPE K: KIVI groups per channel, quant::Uniform<e, Axis::Channel>
/// \tparam ValueQ quantizer of V: KIVI groups per token, quant::Uniform<e, Axis::Token>
///                (quant::Fp16 for both is the FP16 KV cache)
template <class KeyQ, class ValueQ>
struct Kivi {
  using key_quantizer = KeyQ;
  using value_quantizer = ValueQ;

  /// Each layer's Wk, Wv (and optional bk, bv), borrowed: K and V are computed from X at append.
  std::vector<LayerWeights> weights;
  index_t key_group = 128;    ///< group size of K along its quantizer's axis (tokens for per-channel)
  index_t value_group = 128;  ///< group size of V along its quantizer's axis (channels for per-token)
  index_t window = 0;         ///< per-token V: newest tokens kept in fp16 (KIVI: up to one group)

  /// V is cached as itself, so there is no value projection to absorb: attend<remat::AbsorbValues>
  /// would only multiply the softmax by all dkv columns of V per KV head (Hkv times the work of
  /// remat::Materialize). It is a compile-time error; use remat::Materialize.
  static constexpr bool values_are_linear = false;

  /// Snapshot hook: the codec type, both quantizers and every option that changes what is stored.
  std::string describe() const {
    std::string d = detail::describe_key_value<KeyQ, ValueQ>("Kivi", key_group, value_group, window);
    if (d.back() == ',') d.pop_back();
    return d + "}";
  }

  template <class Backend>
  class State {
    using LA = remat::LinAlg<Backend>;
    using KeyStream = cache::Stream<KeyQ, Backend>;
    using ValueStream = cache::Stream<ValueQ, Backend>;

   public:
    State(const CacheConfig& c, const Kivi& codec) : config_(c), d_(c.width), dkv_(c.attention.kv_width()) {
      require<ConfigError>(static_cast<int>(codec.weights.size()) == c.layers, "weights: expected one LayerWeights per "
                           "layer (", c.layers, "), got ", codec.weights.size());
      const index_t mb = c.max_blocks();
      for (int l = 0; l < c.layers; ++l) {
        require<ConfigError>(codec.weights[l].wk != nullptr && codec.weights[l].wv != nullptr, "weights: wk and wv of "
                             "layer ", l, " must be given (KIVI computes K and V from X)");
        keys_.emplace_back(cache::StreamShape{dkv_, codec.key_group, c.block_tokens, mb, 0});
        values_.emplace_back(cache::StreamShape{dkv_, codec.value_group, c.block_tokens, mb, codec.window});
      }
      weights_ = codec.weights;
    }

    void open(std::size_t seq) {
      for (auto& s : keys_) s.open(seq);
      for (auto& s : values_) s.open(seq);
    }
    void close(std::size_t seq) {
      for (auto& s : keys_) s.close(seq);
      for (auto& s : values_) s.close(seq);
    }

    void append(std::size_t seq, int layer, const float* x, index_t n, index_t ld) {
      if (n == 0) return;
      const LayerWeights& w = weights_[layer];
      k_.resize(static_cast<std::size_t>(n * dkv_));
      v_.resize(static_cast<std::size_t>(n * dkv_));
      LA::project(RowsView{x, n, d_, ld}, Projection{w.wk, dkv_, d_, w.bk}, k_.data(), dkv_);  // pre-RoPE
      LA::project(RowsView{x, n, d_, ld}, Projection{w.wv, dkv_, d_, w.bv}, v_.data(), dkv_);
      // All or nothing: everything that could make either stream throw is checked before the keys
      // store (sealed, room in both pools, the fp16 range of every value that passes through fp16;
      // values within it always give finite fp16 scales and zeros).
      require<CapacityError>(!keys_[layer].sealed(seq), "sequence ", seq, ", layer ", layer,
                             ": sealed sequences accept no more tokens");
      if (detail::passes_fp16<KeyQ>) detail::require_fp16_range(k_.data(), n * dkv_);
      if (detail::passes_fp16<ValueQ>) detail::require_fp16_range(v_.data(), n * dkv_);
      detail::require_room(seq, n, keys_[layer], values_[layer]);
      keys_[layer].append(seq, k_.data(), n, dkv_);
      values_[layer].append(seq, v_.data(), n, dkv_);
    }
    void seal(std::size_t seq, int layer) {
      keys_[layer].seal(seq);
      values_[layer].seal(seq);
    }
    index_t length(std::size_t seq, int layer) const { return keys_[layer].length(seq); }

    /// Dequantized pre-RoPE K and V of tokens [begin, end) (dkv wide each).
    void dequantize_kv(std::size_t seq, int layer, index_t begin, index_t end, float* K, index_t ldk, float* V,
                       index_t ldv) const {
      keys_[layer].dequantize(seq, begin, end, K, ldk);
      values_[layer].dequantize(seq, begin, end, V, ldv);
    }

    /// Key: the dequantized pre-RoPE K (identity map; RoPE follows); value: the dequantized V.
    /// Biases were added before quantization; the LayerWeights argument is not read.
    LayerSources sources(std::size_t seq, int layer, index_t begin, index_t end, const LayerWeights&) {
      const index_t n = end - begin;
      kbuf_.resize(static_cast<std::size_t>(n * dkv_));
      vbuf_.resize(static_cast<std::size_t>(n * dkv_));
      dequantize_kv(seq, layer, begin, end, kbuf_.data(), dkv_, vbuf_.data(), dkv_);
      return {RowsView{kbuf_.data(), n, dkv_, dkv_}, RowsView{vbuf_.data(), n, dkv_, dkv_},
              Projection{nullptr, dkv_, dkv_, nullptr}, Projection{nullptr, dkv_, dkv_, nullptr}};
    }

    /// Snapshot hooks: per layer, in layer order, the key stream's record, then the value stream's.
    void save(std::size_t seq, snapshot::Writer& w) const {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].save(seq, w);
        values_[l].save(seq, w);
      }
    }
    /// SnapshotError also when a layer's two streams disagree on length or sealed flag.
    void load(std::size_t seq, snapshot::Reader& r) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].load(seq, r);
        values_[l].load(seq, r);
        if (keys_[l].length(seq) != values_[l].length(seq) || keys_[l].sealed(seq) != values_[l].sealed(seq))
          r.fail("stream lengths", ": the key and value streams of layer ", l, " disagree on length or sealed flag");
      }
    }
    void fork(std::size_t src, std::size_t dst) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].fork(src, dst);
        values_[l].fork(src, dst);
      }
    }

    std::size_t allocated_bytes() const {
      std::size_t b = 0;
      for (const auto& s : keys_) b += s.allocated_bytes();
      for (const auto& s : values_) b += s.allocated_bytes();
      return b;
    }
    const KeyStream& key_stream(int layer) const { return keys_.at(static_cast<std::size_t>(layer)); }
    const ValueStream& value_stream(int layer) const { return values_.at(static_cast<std::size_t>(layer)); }

   private:
    CacheConfig config_;
    index_t d_, dkv_;
    std::vector<LayerWeights> weights_;
    std::vector<KeyStream> keys_;
    std::vector<ValueStream> values_;
    std::vector<float> k_, v_, kbuf_, vbuf_;
  };
};

/// KIVI* at `Bits` bits: keys per channel, values per token, asymmetric.
template <int Bits>
using KiviStar = Kivi<quant::Uniform<Bits, Axis::Channel>, quant::Uniform<Bits, Axis::Token>>;

}  // namespace xquant::codec
