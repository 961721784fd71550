#pragma once
// Shared test helpers: fresh random inputs (never zeros), poisoned outputs, float64 references,
// and error metrics. Every test draws its own seed from doctest's test name so that failures
// reproduce, while different tests see different data.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace xqtest {

/// A fresh generator for every test run (seed from std::random_device), unless XQUANT_TEST_SEED
/// is set to reproduce a failure. Tests report the seed with INFO(...) so a failure names it:
///   std::uint64_t seed; auto g = xqtest::make_rng(seed); INFO("seed ", seed);
inline std::mt19937_64 make_rng(std::uint64_t& seed) {
  if (const char* env = std::getenv("XQUANT_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  else seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  return std::mt19937_64(seed);
}

/// n values from N(mean, stddev), with a few large outliers when `outliers` > 0 (as real
/// activations have: a handful of channels 10-50x the typical scale).
inline std::vector<float> randn(std::mt19937_64& g, std::size_t n, float stddev = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}
inline std::vector<float> activations(std::mt19937_64& g, std::size_t tokens, std::size_t width) {
  auto v = randn(g, tokens * width);
  std::uniform_int_distribution<std::size_t> ch(0, width - 1);
  for (int k = 0; k < 3; ++k) {  // outlier channels, like LLM residual streams
    const std::size_t c = ch(g);
    for (std::size_t t = 0; t < tokens; ++t) v[t * width + c] *= 20.0f;
  }
  return v;
}

/// A buffer pre-filled with NaN, so an element the code under test forgot to write is caught.
inline std::vector<float> poisoned(std::size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }
inline bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

/// X̂ of every token of a layer of a PerLayer-style cache (its state has dequantize()), into a
/// poisoned buffer; every value must have been written and be finite.
template <class CacheT>
std::vector<float> dequantized(const CacheT& cache, std::size_t seq, int layer) {
  const auto n = cache.length(seq, layer), d = cache.config().width;
  auto out = poisoned(static_cast<std::size_t>(n * d));
  cache.state().dequantize(seq, layer, 0, n, out.data(), d);
  REQUIRE(all_finite(out));
  return out;
}

/// ‖a − b‖ / ‖b‖ in double.
template <class A, class B>
double rel_error(const A& a, const B& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num / den);
}

/// Distance in units in the last place between two finite floats.
inline std::int64_t ulp_distance(float a, float b) {
  auto key = [](float f) {
    std::int32_t i;
    std::memcpy(&i, &f, 4);
    return i < 0 ? static_cast<std::int64_t>(std::numeric_limits<std::int32_t>::min()) - i : static_cast<std::int64_t>(i);
  };
  const std::int64_t d = key(a) - key(b);
  return d < 0 ? -d : d;
}

/// Float64 reference of y = x·Wᵀ (x: n × in, W: out × in, both row-major).
inline std::vector<double> project64(const std::vector<float>& x, const float* w, std::size_t n, std::size_t in,
                                     std::size_t out) {
  std::vector<double> y(n * out, 0.0);
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t o = 0; o < out; ++o) {
      double acc = 0;
      for (std::size_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * in + i]) * w[o * in + i];
      y[r * out + o] = acc;
    }
  return y;
}

/// Float64 Llama RoPE (interleaved pairs), rows of `heads`·`head_dim`, row r at position first + r.
inline void rope64(std::vector<double>& y, std::size_t n, std::size_t heads, std::size_t head_dim, std::size_t first,
                   double theta = 10000.0) {
  const std::size_t w = heads * head_dim;
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t h = 0; h < heads; ++h)
      for (std::size_t i = 0; i < head_dim / 2; ++i) {
        const double a = static_cast<double>(first + r) * std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
        double& x0 = y[r * w + h * head_dim + 2 * i];
        double& x1 = y[r * w + h * head_dim + 2 * i + 1];
        const double u = x0, v = x1;
        x0 = u * std::cos(a) - v * std::sin(a);
        x1 = u * std::sin(a) + v * std::cos(a);
      }
}

/// Float64 causal GQA attention from K (post-RoPE), V (n × dkv) and rotated queries (nq × H·Dh,
/// the last nq positions).
inline std::vector<double> attention64(const std::vector<double>& q, const std::vector<double>& K,
                                       const std::vector<double>& V, std::size_t nq, std::size_t n, std::size_t H,
                                       std::size_t Hkv, std::size_t Dh) {
  const std::size_t dkv = Hkv * Dh, first = n - nq;
  std::vector<double> out(nq * H * Dh, 0.0), p(n);
  for (std::size_t i = 0; i < nq; ++i)
    for (std::size_t h = 0; h < H; ++h) {
      const std::size_t g = h / (H / Hkv), last = first + i;
      double mx = -1e300;
      for (std::size_t t = 0; t <= last; ++t) {
        double s = 0;
        for (std::size_t k = 0; k < Dh; ++k) s += q[i * H * Dh + h * Dh + k] * K[t * dkv + g * Dh + k];
        p[t] = s / std::sqrt(static_cast<double>(Dh));
        mx = std::max(mx, p[t]);
      }
      double sum = 0;
      for (std::size_t t = 0; t <= last; ++t) sum += (p[t] = std::exp(p[t] - mx));
      for (std::size_t t = 0; t <= last; ++t)
        for (std::size_t k = 0; k < Dh; ++k) out[i * H * Dh + h * Dh + k] += p[t] / sum * V[t * dkv + g * Dh + k];
    }
  return out;
}

/// Directory of the shared models and data (../shared beside the checkout by default).
inline std::string shared_dir() { return XQUANT_SHARED_DIR; }

}  // namespace xqtest
