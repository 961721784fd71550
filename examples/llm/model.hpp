// model.hpp — the Llama forward pass (llama2.c architecture) in fp32 with Eigen.
//
// Pre-norm blocks: x += Wo·attn(RMSNorm(x)); x += W2·(silu(W1·h) ⊙ W3·h) with h = RMSNorm(x);
// RMSNorm eps 1e-5, no biases, GQA, tied or untied classifier. RoPE is the library's xquant::Rope
// (llama2.c's interleaved-pair convention), applied inside the attention cache, because the cache
// rebuilds K from X; the model only owns the table so that every cache shares one.
//
// forward() runs a CHUNK of tokens layer by layer: a whole ppl window as one prefill, or one token
// per call when generating. Attention goes through AttentionCache, which receives the normalized
// input X of each layer and the (pre-RoPE) queries; the cache stores what it wants and computes K/V.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_cache.hpp"
#include "checkpoint.hpp"
#include "eigen_types.hpp"
#include <xquant/config.hpp>  // index_t (remat/rope.hpp does not include it itself)
#include <xquant/remat/rope.hpp>

namespace llm {

// Eigen views of one block's weights (row-major out × in, y = W x  <=>  Y = X Wᵀ for row tokens).
struct LayerWeights {
  ConstVecMap rms_att;  // dim
  ConstMatMap wq;       // dim × dim       (n_heads*head_size × dim)
  ConstMatMap wk;       // kv_dim × dim
  ConstMatMap wv;       // kv_dim × dim
  ConstMatMap wo;       // dim × dim
  ConstVecMap rms_ffn;  // dim
  ConstMatMap w1;       // hidden × dim
  ConstMatMap w2;       // dim × hidden
  ConstMatMap w3;       // hidden × dim
};

class Model {
 public:
  static constexpr float kRmsEps = 1e-5f;
  enum class Logits { None, Last, All };

  explicit Model(Checkpoint ck)
      : ck_(std::move(ck)),
        token_embedding_(ck_.token_embedding, ck_.config.vocab_size, ck_.config.dim),
        rms_final_(ck_.rms_final, ck_.config.dim),
        wcls_(ck_.wcls, ck_.config.vocab_size, ck_.config.dim),
        rope_(ck_.config.head_size(), ck_.config.seq_len) {
    const Config& c = ck_.config;
    layers_.reserve(ck_.layers.size());
    for (const LayerTensors& t : ck_.layers)
      layers_.push_back(LayerWeights{
          ConstVecMap(t.rms_att, c.dim),          ConstMatMap(t.wq, c.dim, c.dim),
          ConstMatMap(t.wk, c.kv_dim(), c.dim),   ConstMatMap(t.wv, c.kv_dim(), c.dim),
          ConstMatMap(t.wo, c.dim, c.dim),        ConstVecMap(t.rms_ffn, c.dim),
          ConstMatMap(t.w1, c.hidden_dim, c.dim), ConstMatMap(t.w2, c.dim, c.hidden_dim),
          ConstMatMap(t.w3, c.hidden_dim, c.dim)});
  }
  // The maps point into ck_.data; keep the object where it was built.
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Config& config() const { return ck_.config; }
  const LayerWeights& layer(int l) const { return layers_.at(static_cast<std::size_t>(l)); }
  const ConstMatMap& token_embedding() const { return token_embedding_; }  // vocab × dim
  const ConstVecMap& rms_final() const { return rms_final_; }              // dim
  const ConstMatMap& classifier() const { return wcls_; }                  // vocab × dim
  const xquant::Rope& rope() const { return rope_; }
  std::int64_t n_params() const { return ck_.n_params; }

  // Row-wise RMSNorm: out.row(i) = x.row(i) / sqrt(mean(x.row(i)²) + eps) ⊙ w.
  static void rmsnorm(const RowMatrixXf& x, const ConstVecMap& w, RowMatrixXf& out) {
    out.resize(x.rows(), x.cols());
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      const float ss = x.row(i).squaredNorm() / static_cast<float>(x.cols()) + kRmsEps;
      out.row(i) = (x.row(i) * (1.0f / std::sqrt(ss))).cwiseProduct(w.transpose());
    }
  }

  // Run n tokens through the model as one chunk, appending them to `cache` (their positions
  // continue the cache's sequence). Returns logits: n × vocab (All), 1 × vocab for the last token
  // (Last), or an empty matrix (None).
  RowMatrixXf forward(const int* tokens, int n, AttentionCache& cache, Logits which) const {
    const Config& c = ck_.config;
    if (n <= 0) throw std::runtime_error("forward: empty chunk");
    RowMatrixXf x(n, c.dim);
    for (int i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
        throw std::runtime_error("forward: token id " + std::to_string(tokens[i]) + " outside 0.." +
                                 std::to_string(c.vocab_size - 1));
      x.row(i) = token_embedding_.row(tokens[i]);
    }
    RowMatrixXf xn, q(n, c.dim), att(n, c.dim), h1(n, c.hidden_dim), h3(n, c.hidden_dim);
    for (int l = 0; l < c.n_layers; ++l) {
      const LayerWeights& w = layers_[static_cast<std::size_t>(l)];
      rmsnorm(x, w.rms_att, xn);
      q.noalias() = xn * w.wq.transpose();
      cache.append_and_attend(l, xn.data(), q.data(), n, att.data());
      x.noalias() += att * w.wo.transpose();
      rmsnorm(x, w.rms_ffn, xn);
      h1.noalias() = xn * w.w1.transpose();
      h3.noalias() = xn * w.w3.transpose();
      h1.array() = h1.array() / (1.0f + (-h1.array()).exp()) * h3.array();  // silu(w1 x) * w3 x
      x.noalias() += h1 * w.w2.transpose();
    }
    if (which == Logits::None) return RowMatrixXf();
    if (which == Logits::Last) {
      RowMatrixXf last = x.bottomRows(1);
      rmsnorm(last, rms_final_, xn);
    } else {
      rmsnorm(x, rms_final_, xn);
    }
    RowMatrixXf logits(xn.rows(), c.vocab_size);
    logits.noalias() = xn * wcls_.transpose();
    return logits;
  }

 private:
  Checkpoint ck_;
  ConstMatMap token_embedding_;
  ConstVecMap rms_final_;
  ConstMatMap wcls_;
  std::vector<LayerWeights> layers_;
  xquant::Rope rope_;
};

}  // namespace llm
