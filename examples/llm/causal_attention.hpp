// causal_attention.hpp — softmax(Q Kᵀ / sqrt(head_size)) V with a causal mask, for a chunk of new
// queries against all keys/values of the sequence so far. Shared by every AttentionCache
// implementation so that they differ only in how K and V are stored and rebuilt.
#pragma once

#include <cmath>
#include <limits>

#include "eigen_types.hpp"

namespace llm {

// q:   n_new × (n_heads*head_size), already rotated (RoPE); row i is at position n_total-n_new+i.
// k,v: n_total × (n_kv_heads*head_size), row-major, keys already rotated.
// out: n_new × (n_heads*head_size). Query head h reads KV head h / (n_heads/n_kv_heads) (GQA).
inline void causal_attention(const float* q, int n_new, const float* k, const float* v, int n_total,
                             int n_heads, int n_kv_heads, int head_size, float* out) {
  const int q_dim = n_heads * head_size, kv_dim = n_kv_heads * head_size;
  const int kv_mul = n_heads / n_kv_heads;
  const int first = n_total - n_new;  // position of the chunk's first token
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_size));
  RowMatrixXf scores(n_new, n_total);
  for (int h = 0; h < n_heads; ++h) {
    const int g = h / kv_mul;
    ConstStridedMap Q(q + h * head_size, n_new, head_size, Eigen::OuterStride<>(q_dim));
    ConstStridedMap K(k + g * head_size, n_total, head_size, Eigen::OuterStride<>(kv_dim));
    ConstStridedMap V(v + g * head_size, n_total, head_size, Eigen::OuterStride<>(kv_dim));
    StridedMap O(out + h * head_size, n_new, head_size, Eigen::OuterStride<>(q_dim));
    scores.noalias() = (Q * K.transpose()) * scale;
    for (int i = 0; i < n_new; ++i) {
      const int n_vis = first + i + 1;  // positions [0, first+i]
      auto row = scores.row(i);
      auto vis = row.head(n_vis);
      const float mx = vis.maxCoeff();
      vis = (vis.array() - mx).exp();
      vis /= vis.sum();
      row.tail(n_total - n_vis).setZero();
    }
    O.noalias() = scores * V;
  }
}

}  // namespace llm
