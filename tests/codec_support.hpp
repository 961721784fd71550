#pragma once
// Helpers for the codec tests (test_codec_*.cpp): a random model's key/value projections, a
// residual-stream-like X for every layer, an independent float64 model of the asymmetric uniform
// quantizer (with its fp16 scale and zero), and the byte count of a stream from first principles.

#include <algorithm>
#include <cmath>
#include <vector>

#include "support.hpp"
#include <xquant/xquant.hpp>

namespace xqtest {

using xquant::index_t;

/// Key/value projections of a random GQA/MHA model (nn.Linear layout, dkv × d), with biases.
struct Model {
  int layers = 0;
  index_t d = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<std::vector<float>> wk, wv, bk, bv;
  index_t dkv() const { return kv_heads * head_dim; }
  std::vector<xquant::LayerWeights> weights(bool with_bias = true) const {
    std::vector<xquant::LayerWeights> w;
    for (int l = 0; l < layers; ++l)
      w.push_back({wk[l].data(), wv[l].data(), with_bias ? bk[l].data() : nullptr, with_bias ? bv[l].data() : nullptr});
    return w;
  }
  xquant::CacheConfig config(index_t capacity, index_t block_tokens) const {
    xquant::CacheConfig c;
    c.layers = layers;
    c.width = d;
    c.attention = {heads, kv_heads, head_dim};
    c.capacity_tokens = capacity;
    c.block_tokens = block_tokens;
    return c;
  }
};

inline Model make_model(std::mt19937_64& g, int layers, index_t d, index_t heads, index_t kv_heads, index_t head_dim) {
  Model m{layers, d, heads, kv_heads, head_dim, {}, {}, {}, {}};
  const float s = 1.0f / std::sqrt(static_cast<float>(d));
  for (int l = 0; l < layers; ++l) {
    m.wk.push_back(randn(g, static_cast<std::size_t>(m.dkv() * d), s));
    m.wv.push_back(randn(g, static_cast<std::size_t>(m.dkv() * d), s));
    m.bk.push_back(randn(g, static_cast<std::size_t>(m.dkv()), 0.1f));
    m.bv.push_back(randn(g, static_cast<std::size_t>(m.dkv()), 0.1f));
  }
  return m;
}

/// X of every layer for `n` tokens: a residual stream, X_{i+1} = X_i + `step`·noise, starting
/// from activations with outlier channels (or plain N(0, 1)). Consecutive layers are similar, as in real models.
inline std::vector<std::vector<float>> residual_stream(std::mt19937_64& g, int layers, index_t n, index_t d,
                                                       float step = 0.3f, bool outliers = true) {
  std::vector<std::vector<float>> x{outliers ? activations(g, static_cast<std::size_t>(n), static_cast<std::size_t>(d))
                                             : randn(g, static_cast<std::size_t>(n * d))};
  for (int l = 1; l < layers; ++l) {
    auto dx = randn(g, static_cast<std::size_t>(n * d), step);
    for (std::size_t i = 0; i < dx.size(); ++i) dx[i] += x.back()[i];
    x.push_back(std::move(dx));
  }
  return x;
}

/// Spacing of the fp16 grid at v (normal range; the subnormal spacing below 2^-14).
inline double fp16_spacing(double v) {
  int e = 0;
  std::frexp(v, &e);  // |v| = m·2^e, m in [0.5, 1)
  return std::ldexp(1.0, std::max(e - 1, -14) - 10);
}
/// Round-to-nearest-even onto the fp16 grid, in double (no overflow handling).
inline double round_fp16(double v) {
  if (v == 0.0) return 0.0;
  const double u = fp16_spacing(v);
  return std::nearbyint(v / u) * u;
}
/// True when v lies so close to the midpoint of two fp16 values that float32 arithmetic upstream
/// may round it the other way. A value exactly on the midpoint has few significant bits, so float32
/// computes it exactly too and both round it to even: that is no ambiguity.
inline bool near_fp16_tie(double v, double margin = 1e-3) {
  if (v == 0.0) return false;
  const double t = std::abs(v) / fp16_spacing(v), off = std::abs(t - std::floor(t) - 0.5);
  return off > 0.0 && off < margin;
}
/// The fp16 values float32 arithmetic may have rounded v to: one, or both neighbours at a near tie.
inline std::vector<double> fp16_candidates(double v, double margin) {
  if (!near_fp16_tie(v, margin)) return {round_fp16(v)};
  const double u = fp16_spacing(v);
  return {std::floor(v / u) * u, std::ceil(v / u) * u};
}

/// Float64 model of one group of the asymmetric uniform quantizer (scale, zero stored in fp16;
/// c = clamp(rint((x − z)/s), 0, 2^e − 1); x̂ = z + s·c).
struct GroupQuant64 {
  double s = 0, z = 0;
  int max_code = 0;
  double code_margin = 1e-3;
  GroupQuant64(double scale, double zero, int bits, double margin)
      : s(scale), z(zero), max_code((1 << bits) - 1), code_margin(margin) {}
  /// The quantizers of a group spanning [lo, hi]: one, or up to four when float32 arithmetic
  /// upstream may round the scale or the zero to the other fp16 neighbour. `margin`: how close to
  /// a rounding tie (in units of the grid spacing) that arithmetic may land on the other side.
  /// `code_margin`: the same for the code's rounding tie, in units of the step.
  static std::vector<GroupQuant64> candidates(double lo, double hi, int bits, double margin = 1e-3,
                                              double code_margin = 1e-3) {
    std::vector<GroupQuant64> out;
    for (double s : fp16_candidates((hi - lo) / ((1 << bits) - 1), margin))
      for (double z : fp16_candidates(lo, margin)) out.emplace_back(s, z, bits, code_margin);
    return out;
  }
  /// Dequantized value of x; `tie` reports a rounding tie of the code (either code is right).
  double operator()(double x, bool* tie = nullptr) const {
    if (s <= 0) return z;
    const double t = (x - z) / s, off = std::abs(t - std::floor(t) - 0.5);
    if (tie) *tie = off > 0.0 && off < code_margin && t > -0.5 && t < max_code + 0.5;
    const double c = std::min<double>(max_code, std::max(0.0, std::nearbyint(t)));
    return z + s * c;
  }
  /// Worst error of a value of [lo, hi] after quantization (half a step, plus what the fp16
  /// rounding of s and z adds at the ends of the range).
  static double bound(double lo, double hi, int bits) {
    const double s = (hi - lo) / ((1 << bits) - 1);
    return 0.5 * s * 1.001 + std::ldexp(std::abs(lo) + std::abs(hi) + (hi - lo), -10);
  }
};

/// Bytes one stream allocates for a single sequence of `n` tokens, from the documented layout:
/// blocks of `block` tokens, each `block`·⌈width·e/8⌉ code bytes (padded to even) plus the fp16
/// scale/zero of every group; plus the fp16 window (per-channel: one group of tokens).
template <class Q>
std::size_t stream_bytes(index_t n, index_t width, index_t group, index_t block, index_t window) {
  const index_t blocks = (n + block - 1) / block;
  const index_t code_row = (width * Q::bits + 7) / 8;
  index_t params = 0, win = 0;
  if constexpr (!Q::is_float) {
    if (Q::axis == xquant::Axis::Token) {
      params = block * (width / group) * Q::params_per_group;
      win = window;
    } else {
      params = (block / group) * width * Q::params_per_group;
      win = group;
    }
  }
  const index_t block_bytes = (block * code_row + 1) / 2 * 2 + 2 * params;
  return static_cast<std::size_t>(blocks * block_bytes + 2 * win * width);
}

/// Float64 K = RoPE(x·Wkᵀ + bk) and V = x·Wvᵀ + bv of n tokens at positions [0, n).
inline void kv64(const std::vector<float>& x, const Model& m, int layer, index_t n, std::vector<double>& K,
                 std::vector<double>& V, bool with_bias = true) {
  K = project64(x, m.wk[layer].data(), n, m.d, m.dkv());
  V = project64(x, m.wv[layer].data(), n, m.d, m.dkv());
  if (with_bias)
    for (index_t t = 0; t < n; ++t)
      for (index_t j = 0; j < m.dkv(); ++j) {
        K[t * m.dkv() + j] += m.bk[layer][j];
        V[t * m.dkv() + j] += m.bv[layer][j];
      }
  rope64(K, n, m.kv_heads, m.head_dim, 0);
}

}  // namespace xqtest
