#pragma once
// Rotary position embedding, Llama convention as in llama2.c: within each head, the interleaved
// pairs (2i, 2i+1) rotate by the angle pos · θ^(−2i/Dh):
//   y[2i]   = x[2i]·cos − x[2i+1]·sin
//   y[2i+1] = x[2i]·sin + x[2i+1]·cos
// (HF checkpoints that rotate the halves (i, i+Dh/2) need their q/k rows permuted first, as
// llama2.c's export does.) Angles are computed in double and rounded to float once.

#include <cmath>
#include <vector>

#include "../config.hpp"
#include "../core/error.hpp"

namespace xquant {

class Rope {
 public:
  /// \param head_dim       Dh, even
  /// \param max_positions  positions [0, max_positions) get a precomputed cos/sin table
  /// \param theta          base of the frequencies (10000 for Llama 2)
  Rope(index_t head_dim, index_t max_positions, double theta = 10000.0)
      : head_dim_(head_dim), max_positions_(max_positions) {
    require<ConfigError>(head_dim > 0 && head_dim % 2 == 0, "head_dim: must be positive and even, got ", head_dim);
    require<ConfigError>(max_positions > 0, "max_positions: must be positive, got ", max_positions);
    require<ConfigError>(theta > 0, "theta: must be positive, got ", theta);
    const index_t half = head_dim / 2;
    cos_.resize(static_cast<std::size_t>(max_positions * half));
    sin_.resize(cos_.size());
    for (index_t p = 0; p < max_positions; ++p)
      for (index_t i = 0; i < half; ++i) {
        const double freq = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
        const double a = static_cast<double>(p) * freq;
        cos_[p * half + i] = static_cast<float>(std::cos(a));
        sin_[p * half + i] = static_cast<float>(std::sin(a));
      }
  }

  index_t head_dim() const { return head_dim_; }
  index_t max_positions() const { return max_positions_; }
  float cos(index_t pos, index_t pair) const { return cos_[pos * (head_dim_ / 2) + pair]; }
  float sin(index_t pos, index_t pair) const { return sin_[pos * (head_dim_ / 2) + pair]; }

  /// Rotates `n` rows of `heads`·Dh values (row stride `ld`); row r is at position first + r.
  void apply(float* rows, index_t n, index_t ld, index_t heads, index_t first) const {
    require<ConfigError>(first >= 0 && first + n <= max_positions_, "position: tokens [", first, ", ", first + n,
                         ") exceed the RoPE table's max_positions ", max_positions_);
    const index_t half = head_dim_ / 2;
    for (index_t r = 0; r < n; ++r) {
      const float* c = cos_.data() + (first + r) * half;
      const float* s = sin_.data() + (first + r) * half;
      for (index_t h = 0; h < heads; ++h) {
        float* v = rows + r * ld + h * head_dim_;
        for (index_t i = 0; i < half; ++i) {
          const float x0 = v[2 * i], x1 = v[2 * i + 1];
          v[2 * i] = x0 * c[i] - x1 * s[i];
          v[2 * i + 1] = x0 * s[i] + x1 * c[i];
        }
      }
    }
  }

 private:
  index_t head_dim_, max_positions_;
  std::vector<float> cos_, sin_;
};

}  // namespace xquant
