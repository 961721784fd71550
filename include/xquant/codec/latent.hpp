#pragma once
// Latent (SVD) codec for GQA models (DESIGN.md §1): when X (d wide) is wider than K + V
// (2·dkv), cache the latents X·Uk and X·Uv instead, from the offline factorizations
// Wkᵀ = Uk Σk Bkᵀ and Wvᵀ = Uv Σv Bvᵀ (codec/svd_factors.hpp), and recover
// K = RoPE((X·Uk)(ΣkBkᵀ) + bk), V = (X·Uv)(ΣvBvᵀ) + bv. X·Uk is quantized per channel (groups of
// `key_group` tokens; the newest tokens wait in the stream's fp16 window until a group fills),
// X·Uv per token. Optionally some channels of X·Uk (channel 0 carries a massive outlier in real
// models) are kept unquantized in fp16, in a separate small stream.
//
// Snapshots: each layer's streams (X·Uk, the fp16 channels if any, X·Uv) in layer order; the
// description includes a fingerprint of the SVD bases Uk, Uv (State::describe), so a snapshot
// restores only into a cache factored from the same weights.

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../backend/eigen/linalg.hpp"
#include "../cache/config.hpp"
#include "../cache/snapshot.hpp"
#include "../cache/stream.hpp"
#include "../remat/weights.hpp"
#include "common.hpp"
#include "svd_factors.hpp"

namespace xquant::codec {

/// Latent (SVD) XQuant for GQA.
///
/// \tparam KeyQ   quantizer of X·Uk: the paper's choice is per channel, quant::Uniform<e, Axis::Channel>;
///                quant::Fp16 / quant::Fp32 store it unquantized
/// \tparam ValueQ quantizer of X·Uv: the paper's choice is per token, quant::Uniform<e, Axis::Token>
template <class KeyQ, class ValueQ>
struct Latent {
  using key_quantizer = KeyQ;
  using value_quantizer = ValueQ;

  /// Each layer's Wk, Wv (and optional bk, bv), borrowed; factored at State construction. The
  /// biases are applied at recovery; sources() does not read its LayerWeights argument.
  std::vector<LayerWeights> weights;
  index_t key_group = 128;    ///< group size of X·Uk along its quantizer's axis (tokens for per-channel)
  index_t value_group = 128;  ///< group size of X·Uv along its quantizer's axis (channels for per-token)
  index_t window = 0;         ///< per-token X·Uv: newest tokens kept in fp16 (0 in teacher forcing)
  /// Channels of X·Uk kept in fp16: 0 for none; k for latent channels 0..k−1 (the leading
  /// singular directions: the weight-only prediction, channel 0 being the paper's outlier).
  index_t fp16_key_channels = 0;
  /// Explicit fp16 channels per layer (e.g. measured on calibration data with
  /// svd::measure_top_channels); when non-empty, one list per layer, and fp16_key_channels is ignored.
  std::vector<std::vector<index_t>> fp16_key_channel_lists;

  /// V = (X·Uv)·(ΣvBvᵀ) is a linear map of the cached latent: absorbed-value attention applies.
  static constexpr bool values_are_linear = true;

  /// Snapshot hook: the codec type, both quantizers and every option that changes what is stored
  /// (the SVD bases are fingerprinted by State::describe). The fp16 channel lists appear sorted,
  /// as they are used; long lists as their count and an FNV-1a fingerprint.
  std::string describe() const {
    std::string d = detail::describe_key_value<KeyQ, ValueQ>("Latent", key_group, value_group, window);
    if (fp16_key_channel_lists.empty()) return d + xquant::detail::concat("fp16_key_channels=", fp16_key_channels, "}");
    std::string lists;
    for (std::size_t l = 0; l < fp16_key_channel_lists.size(); ++l) {
      std::vector<index_t> c = fp16_key_channel_lists[l];
      std::sort(c.begin(), c.end());
      lists += l == 0 ? "[" : ";";
      for (std::size_t i = 0; i < c.size(); ++i) lists += xquant::detail::concat(i == 0 ? "" : ",", c[i]);
    }
    lists += "]";
    if (lists.size() > 512)
      lists = xquant::detail::concat("#", fp16_key_channel_lists.size(), ":", snapshot::hex64(snapshot::fnv1a64(lists)));
    return d + "fp16_key_channel_lists=" + lists + "}";
  }

  template <class Backend>
  class State {
    using LA = remat::LinAlg<Backend>;
    using KeyStream = cache::Stream<KeyQ, Backend>;
    using OutlierStream = cache::Stream<quant::Fp16, Backend>;
    using ValueStream = cache::Stream<ValueQ, Backend>;

   public:
    State(const CacheConfig& c, const Latent& codec) : config_(c), d_(c.width), dkv_(c.attention.kv_width()) {
      require<ConfigError>(static_cast<int>(codec.weights.size()) == c.layers, "weights: expected one LayerWeights per "
                           "layer (", c.layers, "), got ", codec.weights.size());
      require<ConfigError>(codec.fp16_key_channel_lists.empty() ||
                               static_cast<int>(codec.fp16_key_channel_lists.size()) == c.layers,
                           "fp16_key_channel_lists: expected none or one list per layer (", c.layers, "), got ",
                           codec.fp16_key_channel_lists.size());
      const index_t mb = c.max_blocks();
      for (int l = 0; l < c.layers; ++l) {
        const LayerWeights& w = codec.weights[l];
        require<ConfigError>(w.wk != nullptr && w.wv != nullptr, "weights: wk and wv of layer ", l, " must be given");
        Layer ly;
        ly.k = svd::factorize(w.wk, dkv_, d_);
        ly.v = svd::factorize(w.wv, dkv_, d_);
        ly.bk = w.bk;
        ly.bv = w.bv;
        const index_t rk = ly.k.rank;
        if (!codec.fp16_key_channel_lists.empty()) {
          ly.fp16 = codec.fp16_key_channel_lists[l];
          std::sort(ly.fp16.begin(), ly.fp16.end());
        } else {
          require<ConfigError>(codec.fp16_key_channels >= 0 && codec.fp16_key_channels < rk, "fp16_key_channels: must "
                               "be in [0, rank of Wk = ", rk, "), got ", codec.fp16_key_channels);
          for (index_t j = 0; j < codec.fp16_key_channels; ++j) ly.fp16.push_back(j);
        }
        std::vector<bool> is16(static_cast<std::size_t>(rk), false);
        for (std::size_t i = 0; i < ly.fp16.size(); ++i) {
          const index_t j = ly.fp16[i];
          require<ConfigError>(j >= 0 && j < rk && (i == 0 || ly.fp16[i - 1] != j), "fp16_key_channel_lists[", l,
                               "]: channels must be distinct and in [0, ", rk, "), got ", j);
          is16[j] = true;
        }
        require<ConfigError>(static_cast<index_t>(ly.fp16.size()) < rk, "fp16 key channels: at least one of the ",
                             rk, " channels of X·Uk of layer ", l, " must be quantized");
        for (index_t j = 0; j < rk; ++j)
          if (!is16[j]) ly.quant.push_back(j);
        keys_.emplace_back(cache::StreamShape{static_cast<index_t>(ly.quant.size()), codec.key_group, c.block_tokens, mb, 0});
        if (!ly.fp16.empty())
          outliers_.emplace_back(std::in_place,
                                 cache::StreamShape{static_cast<index_t>(ly.fp16.size()), 1, c.block_tokens, mb, 0});
        else
          outliers_.emplace_back(std::nullopt);
        values_.emplace_back(cache::StreamShape{ly.v.rank, codec.value_group, c.block_tokens, mb, codec.window});
        layers_.push_back(std::move(ly));
      }
      // What the stored latents depend on besides the options: the bases they are projected on.
      std::vector<const svd::Factors*> bases;
      for (const Layer& ly : layers_) bases.insert(bases.end(), {&ly.k, &ly.v});
      description_ = svd::describe_bases(bases);
    }

    void open(std::size_t seq) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].open(seq);
        if (outliers_[l]) outliers_[l]->open(seq);
        values_[l].open(seq);
      }
    }
    void close(std::size_t seq) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].close(seq);
        if (outliers_[l]) outliers_[l]->close(seq);
        values_[l].close(seq);
      }
    }

    void append(std::size_t seq, int layer, const float* x, index_t n, index_t ld) {
      const Layer& ly = layers_[layer];
      const index_t rk = ly.k.rank, rv = ly.v.rank, nq = static_cast<index_t>(ly.quant.size()),
                    no = static_cast<index_t>(ly.fp16.size());
      if (n == 0) return;
      lk_.resize(static_cast<std::size_t>(n * rk));
      lv_.resize(static_cast<std::size_t>(n * rv));
      LA::project(RowsView{x, n, d_, ld}, Projection{ly.k.basis_t.data(), rk, d_, nullptr}, lk_.data(), rk);
      LA::project(RowsView{x, n, d_, ld}, Projection{ly.v.basis_t.data(), rv, d_, nullptr}, lv_.data(), rv);
      // All or nothing: everything that could make one of the streams throw is checked before the
      // first one stores (sealed, room in every pool, the fp16 range of every value that passes
      // through fp16; values within it always give finite fp16 scales and zeros).
      require<CapacityError>(!keys_[layer].sealed(seq), "sequence ", seq, ", layer ", layer,
                             ": sealed sequences accept no more tokens");
      if (detail::passes_fp16<KeyQ> || no > 0) detail::require_fp16_range(lk_.data(), n * rk);
      if (detail::passes_fp16<ValueQ>) detail::require_fp16_range(lv_.data(), n * rv);
      if (outliers_[layer]) detail::require_room(seq, n, keys_[layer], *outliers_[layer], values_[layer]);
      else detail::require_room(seq, n, keys_[layer], values_[layer]);
      const float* kq = lk_.data();
      if (no > 0) {  // split the fp16 channels from the quantized ones
        split_.resize(static_cast<std::size_t>(n * rk));
        float* q = split_.data();
        float* o = q + n * nq;
        for (index_t t = 0; t < n; ++t) {
          for (index_t j = 0; j < nq; ++j) q[t * nq + j] = lk_[t * rk + ly.quant[j]];
          for (index_t j = 0; j < no; ++j) o[t * no + j] = lk_[t * rk + ly.fp16[j]];
        }
        outliers_[layer]->append(seq, o, n, no);
        kq = q;
      }
      keys_[layer].append(seq, kq, n, nq);
      values_[layer].append(seq, lv_.data(), n, rv);
    }
    void seal(std::size_t seq, int layer) {
      keys_[layer].seal(seq);
      if (outliers_[layer]) outliers_[layer]->seal(seq);
      values_[layer].seal(seq);
    }
    index_t length(std::size_t seq, int layer) const { return keys_[layer].length(seq); }

    /// Dequantized latents of tokens [begin, end): key (X·Uk)^ into `key` (rank_k wide, row stride
    /// ldk) and value (X·Uv)^ into `value` (rank_v wide, row stride ldv).
    void dequantize_latent(std::size_t seq, int layer, index_t begin, index_t end, float* key, index_t ldk,
                           float* value, index_t ldv) {
      const Layer& ly = layers_[layer];
      const index_t n = end - begin, nq = static_cast<index_t>(ly.quant.size()),
                    no = static_cast<index_t>(ly.fp16.size());
      if (no == 0) {
        keys_[layer].dequantize(seq, begin, end, key, ldk);
      } else {
        split_.resize(static_cast<std::size_t>(n * (nq + no)));
        float* q = split_.data();
        float* o = q + n * nq;
        keys_[layer].dequantize(seq, begin, end, q, nq);
        outliers_[layer]->dequantize(seq, begin, end, o, no);
        for (index_t t = 0; t < n; ++t) {
          for (index_t j = 0; j < nq; ++j) key[t * ldk + ly.quant[j]] = q[t * nq + j];
          for (index_t j = 0; j < no; ++j) key[t * ldk + ly.fp16[j]] = o[t * no + j];
        }
      }
      values_[layer].dequantize(seq, begin, end, value, ldv);
    }

    /// Key: (X·Uk)^ through ΣkBkᵀ (+ bk); value: (X·Uv)^ through ΣvBvᵀ (+ bv).
    LayerSources sources(std::size_t seq, int layer, index_t begin, index_t end, const LayerWeights&) {
      const Layer& ly = layers_[layer];
      const index_t n = end - begin, rk = ly.k.rank, rv = ly.v.rank;
      kbuf_.resize(static_cast<std::size_t>(n * rk));
      vbuf_.resize(static_cast<std::size_t>(n * rv));
      dequantize_latent(seq, layer, begin, end, kbuf_.data(), rk, vbuf_.data(), rv);
      return {RowsView{kbuf_.data(), n, rk, rk}, RowsView{vbuf_.data(), n, rv, rv},
              Projection{ly.k.recover.data(), dkv_, rk, ly.bk}, Projection{ly.v.recover.data(), dkv_, rv, ly.bv}};
    }

    /// Snapshot hooks: per layer, in layer order, the stream records of X·Uk, of the fp16 key
    /// channels (layers that keep some) and of X·Uv.
    void save(std::size_t seq, snapshot::Writer& w) const {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].save(seq, w);
        if (outliers_[l]) outliers_[l]->save(seq, w);
        values_[l].save(seq, w);
      }
    }
    /// SnapshotError also when a layer's streams disagree on length or sealed flag (an append
    /// stores into all of them or none).
    void load(std::size_t seq, snapshot::Reader& r) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].load(seq, r);
        if (outliers_[l]) outliers_[l]->load(seq, r);
        values_[l].load(seq, r);
        const index_t n = keys_[l].length(seq);
        const bool sealed = keys_[l].sealed(seq);
        if (values_[l].length(seq) != n || values_[l].sealed(seq) != sealed ||
            (outliers_[l] && (outliers_[l]->length(seq) != n || outliers_[l]->sealed(seq) != sealed)))
          r.fail("stream lengths", ": the streams of layer ", l, " disagree on length or sealed flag");
      }
    }
    void fork(std::size_t src, std::size_t dst) {
      for (int l = 0; l < config_.layers; ++l) {
        keys_[l].fork(src, dst);
        if (outliers_[l]) outliers_[l]->fork(src, dst);
        values_[l].fork(src, dst);
      }
    }
    /// Snapshot description of what the state derived at construction: a fingerprint of every
    /// layer's SVD bases (the stored latents are X·Uk and X·Uv).
    const std::string& describe() const { return description_; }

    /// Key codes and parameters, the fp16 key channels and the value stream, of every layer.
    std::size_t allocated_bytes() const {
      std::size_t b = 0;
      for (int l = 0; l < config_.layers; ++l) {
        b += keys_[l].allocated_bytes() + values_[l].allocated_bytes();
        if (outliers_[l]) b += outliers_[l]->allocated_bytes();
      }
      return b;
    }

    const svd::Factors& key_factors(int layer) const { return layers_.at(static_cast<std::size_t>(layer)).k; }
    const svd::Factors& value_factors(int layer) const { return layers_.at(static_cast<std::size_t>(layer)).v; }
    /// Channels of X·Uk stored in fp16 (ascending); the others are quantized by KeyQ.
    const std::vector<index_t>& fp16_key_channels(int layer) const {
      return layers_.at(static_cast<std::size_t>(layer)).fp16;
    }
    const KeyStream& key_stream(int layer) const { return keys_.at(static_cast<std::size_t>(layer)); }
    const ValueStream& value_stream(int layer) const { return values_.at(static_cast<std::size_t>(layer)); }
    /// The fp16 channel stream of a layer, or nullptr when it keeps none.
    const OutlierStream* outlier_stream(int layer) const {
      const auto& o = outliers_.at(static_cast<std::size_t>(layer));
      return o ? &*o : nullptr;
    }

   private:
    struct Layer {
      svd::Factors k, v;
      std::vector<index_t> fp16, quant;  // channels of X·Uk kept in fp16 / quantized
      const float* bk = nullptr;
      const float* bv = nullptr;
    };
    CacheConfig config_;
    index_t d_, dkv_;
    std::vector<Layer> layers_;
    std::vector<KeyStream> keys_;
    std::vector<std::optional<OutlierStream>> outliers_;
    std::vector<ValueStream> values_;
    std::vector<float> lk_, lv_, split_, kbuf_, vbuf_;
    std::string description_;
  };
};

}  // namespace xquant::codec
