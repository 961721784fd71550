// xquant_attention.hpp — the library plugged into the model, as an engine would do it: the
// library owns the cache (xquant::Cache<Codec>) and the attention (xquant::attend), the driver
// owns the model and hands each layer's X and queries over.
//
//   XquantAttention<Codec>  one xquant::Cache for a contiguous range of the model's layers;
//   LayerSplit              two caches side by side, layers [0, split) in one and the rest in the
//                           other: how a per-layer or KV codec keeps its first layers at higher
//                           precision (the paper's "first 3 layers at 4 bits" layout).
//
// Two fill modes:
//   Fill::Stream       generation: tokens arrive one chunk at a time, the newest wait in the
//                      codec's fp16 window (per-channel groups until they fill, per-token streams
//                      the `window` newest tokens);
//   Fill::TeacherForce perplexity: each window is one prefill chunk and every layer is sealed
//                      right after its append, so causal attention for every position reads the
//                      fully quantized cache (per-channel groups formed over the window's tokens,
//                      the last one possibly short), as in the paper's evaluation.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <xquant/xquant.hpp>

#include "attention_cache.hpp"
#include "model.hpp"

namespace llm {

enum class Fill { Stream, TeacherForce };

// Cache geometry for `layers` layers of model config `c`: room for one window of seq_len tokens.
inline xquant::CacheConfig cache_config(const Config& c, int layers) {
  xquant::CacheConfig cc;
  cc.layers = layers;
  cc.width = c.dim;
  cc.attention = xquant::AttentionShape{c.n_heads, c.n_kv_heads, c.head_size()};
  cc.capacity_tokens = c.seq_len;
  cc.block_tokens = 128;
  return cc;
}

// The model's K/V projections of each layer, in the library's borrowed-weights form (row-major
// out × in, exactly the checkpoint's layout).
inline std::vector<xquant::LayerWeights> kv_weights(const Model& m) {
  std::vector<xquant::LayerWeights> w;
  for (int l = 0; l < m.config().n_layers; ++l) w.push_back({m.layer(l).wk.data(), m.layer(l).wv.data()});
  return w;
}

/// Layers [first, first + count) of the model in one xquant::Cache<Codec>.
template <class Codec>
class XquantAttention final : public AttentionCache {
 public:
  XquantAttention(const Model& m, const Codec& codec, Fill fill, int first = 0, int count = -1)
      : m_(m),
        first_(first),
        count_(count < 0 ? m.config().n_layers - first : count),
        fill_(fill),
        weights_(kv_weights(m)),
        cache_(cache_config(m.config(), count_), codec) {
    if (first_ < 0 || count_ <= 0 || first_ + count_ > m.config().n_layers)
      throw std::runtime_error("XquantAttention: layer range [" + std::to_string(first_) + ", " +
                               std::to_string(first_ + count_) + ") outside the model's " +
                               std::to_string(m.config().n_layers) + " layers");
    seq_ = cache_.add_sequence();
    empty_bytes_ = cache_.allocated_bytes();  // an open, empty sequence: its fp16 windows only
  }

  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    const int l = layer - first_;
    if (l < 0 || l >= count_)
      throw std::runtime_error("XquantAttention: layer " + std::to_string(layer) + " is not in this cache");
    cache_.append(seq_, l, x, n_new);
    if (fill_ == Fill::TeacherForce) cache_.seal(seq_, l);
    const xquant::LayerWeights& w = weights_[static_cast<std::size_t>(layer)];
    // Both policies are exact. Value absorption is cheaper for a single decode query (V is never
    // formed); for a prefill chunk forming V once is cheaper than weighting X̂ per query.
    if constexpr (Codec::values_are_linear) {
      if (n_new == 1) {
        xquant::attend<xquant::remat::AbsorbValues>(cache_, seq_, l, q, n_new, w, m_.rope(), out);
        return;
      }
    }
    xquant::attend<xquant::remat::Materialize>(cache_, seq_, l, q, n_new, w, m_.rope(), out);
  }

  void reset() override {
    cache_.remove_sequence(seq_);  // its blocks return to the pool and are reused
    seq_ = cache_.add_sequence();
  }
  std::size_t allocated_bytes() const override { return cache_.allocated_bytes(); }
  std::size_t empty_bytes() const override { return empty_bytes_; }
  long tokens() const override { return static_cast<long>(cache_.length(seq_, 0)); }

  xquant::Cache<Codec>& cache() { return cache_; }

 private:
  const Model& m_;
  int first_, count_;
  Fill fill_;
  std::vector<xquant::LayerWeights> weights_;
  xquant::Cache<Codec> cache_;
  xquant::SequenceId seq_ = 0;
  std::size_t empty_bytes_ = 0;
};

/// Layers [0, split) go to `base`, the others to `rest`.
class LayerSplit final : public AttentionCache {
 public:
  LayerSplit(int split, std::unique_ptr<AttentionCache> base, std::unique_ptr<AttentionCache> rest)
      : split_(split), base_(std::move(base)), rest_(std::move(rest)) {}
  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    (layer < split_ ? base_ : rest_)->append_and_attend(layer, x, q, n_new, out);
  }
  void reset() override {
    base_->reset();
    rest_->reset();
  }
  std::size_t allocated_bytes() const override { return base_->allocated_bytes() + rest_->allocated_bytes(); }
  std::size_t empty_bytes() const override { return base_->empty_bytes() + rest_->empty_bytes(); }
  long tokens() const override { return base_->tokens(); }

 private:
  int split_;
  std::unique_ptr<AttentionCache> base_, rest_;
};

}  // namespace llm
