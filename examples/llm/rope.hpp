// rope.hpp — rotary position embedding exactly as llama2.c run.c applies it: within each head,
// the interleaved pairs (2i, 2i+1) are rotated by angle pos * freq_i, freq_i = 1 / 10000^(2i/head_size).
// The table is computed in double and cast to float once, so every consumer (the plain caches here,
// the library's compressed caches later) sees bit-identical rotations. The checkpoint's own
// freq_cis tables are ignored, as run.c ignores them.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace llm {

class Rope {
 public:
  Rope(int head_size, int max_positions) : half_(head_size / 2), max_pos_(max_positions) {
    cos_.resize(static_cast<std::size_t>(max_positions) * half_);
    sin_.resize(cos_.size());
    for (int p = 0; p < max_positions; ++p)
      for (int i = 0; i < half_; ++i) {
        const double freq = 1.0 / std::pow(10000.0, (2.0 * i) / head_size);
        const double a = p * freq;
        cos_[static_cast<std::size_t>(p) * half_ + i] = static_cast<float>(std::cos(a));
        sin_[static_cast<std::size_t>(p) * half_ + i] = static_cast<float>(std::sin(a));
      }
  }

  int max_positions() const { return max_pos_; }

  // Rotate n_heads consecutive heads of one token (vec has n_heads * head_size floats) to `pos`.
  void apply(float* vec, int n_heads, int pos) const {
    if (pos < 0 || pos >= max_pos_)
      throw std::runtime_error("RoPE position " + std::to_string(pos) + " outside 0.." +
                               std::to_string(max_pos_ - 1) + " (the model's seq_len)");
    const float* c = &cos_[static_cast<std::size_t>(pos) * half_];
    const float* s = &sin_[static_cast<std::size_t>(pos) * half_];
    for (int h = 0; h < n_heads; ++h) {
      float* v = vec + static_cast<std::size_t>(h) * 2 * half_;
      for (int i = 0; i < half_; ++i) {
        const float v0 = v[2 * i], v1 = v[2 * i + 1];
        v[2 * i] = v0 * c[i] - v1 * s[i];
        v[2 * i + 1] = v0 * s[i] + v1 * c[i];
      }
    }
  }

  // Rotate rows [0, n) of a row-major matrix (row stride `stride` floats), row r at position first_pos + r.
  void apply_rows(float* rows, int n, int stride, int n_heads, int first_pos) const {
    for (int r = 0; r < n; ++r) apply(rows + static_cast<std::size_t>(r) * stride, n_heads, first_pos + r);
  }

 private:
  int half_;
  int max_pos_;
  std::vector<float> cos_, sin_;
};

}  // namespace llm
