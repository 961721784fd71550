// fp32_attention.hpp — a plain fp32 K/V cache (--cache fp32-kv), written the way a conventional
// inference engine does it: K (post-RoPE) and V are computed once when a token arrives and stored.
// It shares only the model and the RoPE table with the library path, so comparing it with the
// library's unquantized X cache (--cache fp32) checks the library's rematerialization, attention
// and cache plumbing end to end; both must give the same loss up to float rounding.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "attention_cache.hpp"
#include "causal_attention.hpp"
#include "model.hpp"

namespace llm {

class Fp32KvAttention final : public AttentionCache {
 public:
  explicit Fp32KvAttention(const Model& m)
      : m_(m), k_(static_cast<std::size_t>(m.config().n_layers)), v_(k_.size()) {}

  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    const Config& c = m_.config();
    if (layer < 0 || layer >= c.n_layers)
      throw std::runtime_error("attention: layer " + std::to_string(layer) + " outside 0.." +
                               std::to_string(c.n_layers - 1));
    std::vector<float>& ks = k_[static_cast<std::size_t>(layer)];
    std::vector<float>& vs = v_[static_cast<std::size_t>(layer)];
    const int before = static_cast<int>(ks.size() / static_cast<std::size_t>(c.kv_dim()));
    if (n_new <= 0 || before + n_new > c.seq_len)
      throw std::runtime_error("attention: " + std::to_string(before) + " + " + std::to_string(n_new) +
                               " tokens exceed the model's seq_len " + std::to_string(c.seq_len));
    const LayerWeights& w = m_.layer(layer);
    ConstMatMap X(x, n_new, c.dim);
    ks.resize(static_cast<std::size_t>(before + n_new) * c.kv_dim());
    vs.resize(ks.size());
    const std::size_t off = static_cast<std::size_t>(before) * c.kv_dim();
    MatMap Knew(ks.data() + off, n_new, c.kv_dim()), Vnew(vs.data() + off, n_new, c.kv_dim());
    Knew.noalias() = X * w.wk.transpose();
    Vnew.noalias() = X * w.wv.transpose();
    m_.rope().apply(Knew.data(), n_new, c.kv_dim(), c.n_kv_heads, before);
    RowMatrixXf qr = ConstMatMap(q, n_new, c.dim);
    m_.rope().apply(qr.data(), n_new, c.dim, c.n_heads, before);
    causal_attention(qr.data(), n_new, ks.data(), vs.data(), before + n_new, c.n_heads, c.n_kv_heads,
                     c.head_size(), out);
  }

  void reset() override {
    for (auto& v : k_) v.clear();
    for (auto& v : v_) v.clear();
  }
  std::size_t allocated_bytes() const override {
    std::size_t b = 0;
    for (std::size_t l = 0; l < k_.size(); ++l) b += (k_[l].capacity() + v_[l].capacity()) * sizeof(float);
    return b;
  }
  std::size_t empty_bytes() const override { return 0; }
  long tokens() const override { return static_cast<long>(k_[0].size() / static_cast<std::size_t>(m_.config().kv_dim())); }

 private:
  const Model& m_;
  std::vector<std::vector<float>> k_, v_;  // per layer: tokens × kv_dim
};

}  // namespace llm
