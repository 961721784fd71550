// fp32_attention.hpp — two unquantized AttentionCache implementations, the references every
// compressed cache is measured against:
//   Fp32Attention   stores X (what XQuant stores, here in fp32) and rebuilds K = RoPE(X·Wkᵀ),
//                   V = X·Wvᵀ for all cached tokens on every call;
//   Fp32KvAttention stores K (post-RoPE) and V, as a conventional inference engine does.
// Both must give the same loss up to float rounding; comparing them checks the X-path plumbing.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "attention_cache.hpp"
#include "causal_attention.hpp"
#include "model.hpp"

namespace llm {

namespace detail {
inline void check_layer(const Model& m, int layer) {
  if (layer < 0 || layer >= m.config().n_layers)
    throw std::runtime_error("attention: layer " + std::to_string(layer) + " outside 0.." +
                             std::to_string(m.config().n_layers - 1));
}
inline void check_room(const Model& m, int before, int n_new) {
  const Config& c = m.config();
  if (n_new <= 0 || before + n_new > c.seq_len)
    throw std::runtime_error("attention: " + std::to_string(before) + " + " + std::to_string(n_new) +
                             " tokens exceed the model's seq_len " + std::to_string(c.seq_len));
}
// Rotated copy of the queries: q is pre-RoPE per the interface.
inline RowMatrixXf rotated_queries(const Model& m, const float* q, int n_new, int first_pos) {
  const Config& c = m.config();
  RowMatrixXf qr = ConstMatMap(q, n_new, c.dim);
  m.rope().apply_rows(qr.data(), n_new, c.dim, c.n_heads, first_pos);
  return qr;
}
}  // namespace detail

class Fp32Attention final : public AttentionCache {
 public:
  explicit Fp32Attention(const Model& m) : m_(m), x_(static_cast<std::size_t>(m.config().n_layers)) {}

  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    const Config& c = m_.config();
    detail::check_layer(m_, layer);
    std::vector<float>& xs = x_[static_cast<std::size_t>(layer)];
    const int before = static_cast<int>(xs.size() / static_cast<std::size_t>(c.dim));
    detail::check_room(m_, before, n_new);
    xs.insert(xs.end(), x, x + static_cast<std::size_t>(n_new) * c.dim);
    const int total = before + n_new;
    ConstMatMap X(xs.data(), total, c.dim);
    const LayerWeights& w = m_.layer(layer);
    RowMatrixXf K(total, c.kv_dim()), V(total, c.kv_dim());
    K.noalias() = X * w.wk.transpose();
    V.noalias() = X * w.wv.transpose();
    m_.rope().apply_rows(K.data(), total, c.kv_dim(), c.n_kv_heads, 0);
    const RowMatrixXf qr = detail::rotated_queries(m_, q, n_new, before);
    causal_attention(qr.data(), n_new, K.data(), V.data(), total, c.n_heads, c.n_kv_heads,
                     c.head_size(), out);
  }

  void reset() override {
    for (auto& v : x_) v.clear();
  }

 private:
  const Model& m_;
  std::vector<std::vector<float>> x_;  // per layer: tokens × dim
};

class Fp32KvAttention final : public AttentionCache {
 public:
  explicit Fp32KvAttention(const Model& m)
      : m_(m), k_(static_cast<std::size_t>(m.config().n_layers)), v_(k_.size()) {}

  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    const Config& c = m_.config();
    detail::check_layer(m_, layer);
    std::vector<float>& ks = k_[static_cast<std::size_t>(layer)];
    std::vector<float>& vs = v_[static_cast<std::size_t>(layer)];
    const int before = static_cast<int>(ks.size() / static_cast<std::size_t>(c.kv_dim()));
    detail::check_room(m_, before, n_new);
    const LayerWeights& w = m_.layer(layer);
    ConstMatMap X(x, n_new, c.dim);
    ks.resize(static_cast<std::size_t>(before + n_new) * c.kv_dim());
    vs.resize(ks.size());
    const std::size_t off = static_cast<std::size_t>(before) * c.kv_dim();
    MatMap Knew(ks.data() + off, n_new, c.kv_dim()), Vnew(vs.data() + off, n_new, c.kv_dim());
    Knew.noalias() = X * w.wk.transpose();
    Vnew.noalias() = X * w.wv.transpose();
    m_.rope().apply_rows(Knew.data(), n_new, c.kv_dim(), c.n_kv_heads, before);
    const RowMatrixXf qr = detail::rotated_queries(m_, q, n_new, before);
    causal_attention(qr.data(), n_new, ks.data(), vs.data(), before + n_new, c.n_heads, c.n_kv_heads,
                     c.head_size(), out);
  }

  void reset() override {
    for (auto& v : k_) v.clear();
    for (auto& v : v_) v.clear();
  }

 private:
  const Model& m_;
  std::vector<std::vector<float>> k_, v_;  // per layer: tokens × kv_dim
};

}  // namespace llm
