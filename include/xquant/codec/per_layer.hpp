#pragma once
// XQuant codec: every layer caches Q(X), its quantized attention input; attention gets
// K = RoPE(X̂·Wkᵀ) and V = X̂·Wvᵀ back from it (DESIGN.md §1).

#include <string>
#include <vector>

#include "../cache/config.hpp"
#include "../cache/snapshot.hpp"
#include "../cache/stream.hpp"
#include "../remat/weights.hpp"

namespace xquant::codec {

/// Per-layer XQuant.
///
/// \tparam Q quantizer policy: quant::Uniform<bits, axis, scheme>, or quant::Fp16 / quant::Fp32
///           for an unquantized X cache.
template <class Q>
struct PerLayer {
  using quantizer = Q;
  index_t group = 128;  ///< group size: divides the width (per-token) or block_tokens (per-channel)
  index_t window = 0;   ///< per-token quantizers: newest tokens kept in fp16 (0 in teacher forcing)

  /// V is a linear map of the cached tensor, so attention may weight X̂ by the softmax first.
  static constexpr bool values_are_linear = true;

  /// Snapshot hook: the codec type and every option that changes what is stored.
  std::string describe() const {
    if constexpr (Q::is_float) return "PerLayer<" + snapshot::describe_quantizer<Q>() + ">";
    else return xquant::detail::concat("PerLayer<", snapshot::describe_quantizer<Q>(), ">{group=", group, ",window=", window, "}");
  }

  template <class Backend>
  class State {
   public:
    State(const CacheConfig& c, const PerLayer& codec) : config_(c) {
      const cache::StreamShape shape{c.width, codec.group, c.block_tokens, c.max_blocks(), codec.window};
      streams_.reserve(static_cast<std::size_t>(c.layers));
      for (int l = 0; l < c.layers; ++l) streams_.emplace_back(shape);
    }
    void open(std::size_t seq) {
      for (auto& s : streams_) s.open(seq);
    }
    void close(std::size_t seq) {
      for (auto& s : streams_) s.close(seq);
    }
    void append(std::size_t seq, int layer, const float* x, index_t n, index_t ld) {
      streams_[layer].append(seq, x, n, ld);
    }
    void seal(std::size_t seq, int layer) { streams_[layer].seal(seq); }
    index_t length(std::size_t seq, int layer) const { return streams_[layer].length(seq); }

    /// X̂ of tokens [begin, end) of a layer.
    void dequantize(std::size_t seq, int layer, index_t begin, index_t end, float* out, index_t ld) const {
      streams_[layer].dequantize(seq, begin, end, out, ld);
    }

    /// Key and value both come from X̂ through the model's Wk and Wv.
    LayerSources sources(std::size_t seq, int layer, index_t begin, index_t end, const LayerWeights& w) {
      require<ShapeError>(w.wk != nullptr && w.wv != nullptr, "weights: wk and wv of layer ", layer,
                          " must be given (XQuant rematerializes K and V from X)");
      const index_t n = end - begin, d = config_.width, dkv = config_.attention.kv_width();
      scratch_.resize(static_cast<std::size_t>(n * d));
      dequantize(seq, layer, begin, end, scratch_.data(), d);
      const RowsView x{scratch_.data(), n, d, d};
      return {x, x, Projection{w.wk, dkv, d, w.bk}, Projection{w.wv, dkv, d, w.bv}};
    }

    /// Snapshot hooks: one stream record per layer, in layer order.
    void save(std::size_t seq, snapshot::Writer& w) const {
      for (const auto& s : streams_) s.save(seq, w);
    }
    void load(std::size_t seq, snapshot::Reader& r) {
      for (auto& s : streams_) s.load(seq, r);
    }
    void fork(std::size_t src, std::size_t dst) {
      for (auto& s : streams_) s.fork(src, dst);
    }

    std::size_t allocated_bytes() const {
      std::size_t b = 0;
      for (const auto& s : streams_) b += s.allocated_bytes();
      return b;
    }
    const cache::Stream<Q, Backend>& stream(int layer) const { return streams_[layer]; }

   private:
    CacheConfig config_;
    std::vector<cache::Stream<Q, Backend>> streams_;
    std::vector<float> scratch_;
  };
};

}  // namespace xquant::codec
