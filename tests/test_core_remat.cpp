// Rematerialization: K/V against float64 math, absorbed values against materialized ones, the
// Eigen backend against the scalar reference, and quantized attention against unquantized.
#include <xquant/xquant.hpp>

#include "support.hpp"

using namespace xquant;
using quant::Uniform;

namespace {

struct Model {  // one attention layer's weights with realistic scales (Var(X·w) ≈ Var(X))
  CacheConfig config;
  std::vector<float> wk, wv, bk, bv;
  LayerWeights weights(bool bias) const {
    return {wk.data(), wv.data(), bias ? bk.data() : nullptr, bias ? bv.data() : nullptr};
  }
};

Model make_model(std::mt19937_64& g, index_t d, index_t H, index_t Hkv, index_t Dh, index_t capacity = 512) {
  Model m;
  m.config.layers = 2;
  m.config.width = d;
  m.config.attention = {H, Hkv, Dh};
  m.config.capacity_tokens = capacity;
  m.config.block_tokens = 64;
  const auto dkv = std::size_t(Hkv * Dh);
  m.wk = xqtest::randn(g, dkv * std::size_t(d), 1.0f / std::sqrt(float(d)));
  m.wv = xqtest::randn(g, dkv * std::size_t(d), 1.0f / std::sqrt(float(d)));
  m.bk = xqtest::randn(g, dkv, 0.1f);
  m.bv = xqtest::randn(g, dkv, 0.1f);
  return m;
}

template <class C>
std::vector<float> xhat(const C& cache, SequenceId s, int layer) {
  const index_t n = cache.length(s, layer), w = cache.config().width;
  auto out = xqtest::poisoned(std::size_t(n * w));
  cache.state().dequantize(s, layer, 0, n, out.data(), w);
  return out;
}

template <class T>
std::vector<double> to64(const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); }

struct Shape {
  index_t d, H, Hkv, Dh;
};
const Shape kShapes[] = {{128, 4, 4, 32}, {96, 8, 2, 16}};  // MHA and GQA (ratio 4)

}  // namespace

TEST_CASE_TEMPLATE("materialized K and V equal float64 RoPE(X̂·Wkᵀ + bk) and X̂·Wvᵀ + bv", B, backend::Reference,
                   backend::Eigen) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  for (const Shape sh : kShapes) {
    const auto m = make_model(g, sh.d, sh.H, sh.Hkv, sh.Dh);
    Cache<codec::PerLayer<Uniform<3, Axis::Channel>>, B> cache(m.config, {32, 0});
    const auto s = cache.add_sequence();
    const index_t n = 150, dkv = sh.Hkv * sh.Dh;
    const auto x = xqtest::activations(g, std::size_t(n), std::size_t(sh.d));
    cache.append(s, 1, x.data(), n);
    const Rope rope(sh.Dh, 1024);
    const auto X = xhat(cache, s, 1);
    for (const auto& range : {std::pair<index_t, index_t>{0, n}, {37, 101}, {149, 150}}) {
      const index_t a = range.first, b = range.second;  // named for INFO (C++17)
      INFO("range [", a, ", ", b, ") d ", sh.d, " Hkv ", sh.Hkv);
      auto K = xqtest::poisoned(std::size_t((b - a) * dkv)), V = xqtest::poisoned(std::size_t((b - a) * dkv));
      materialize(cache, s, 1, a, b, m.weights(true), rope, K.data(), V.data());
      REQUIRE(xqtest::all_finite(K));
      REQUIRE(xqtest::all_finite(V));
      const std::vector<float> Xr(X.begin() + a * sh.d, X.begin() + b * sh.d);
      auto K64 = xqtest::project64(Xr, m.wk.data(), std::size_t(b - a), std::size_t(sh.d), std::size_t(dkv));
      auto V64 = xqtest::project64(Xr, m.wv.data(), std::size_t(b - a), std::size_t(sh.d), std::size_t(dkv));
      for (std::size_t i = 0; i < K64.size(); ++i) K64[i] += m.bk[i % dkv], V64[i] += m.bv[i % dkv];
      xqtest::rope64(K64, std::size_t(b - a), std::size_t(sh.Hkv), std::size_t(sh.Dh), std::size_t(a));
      // fp32 dot products over d ≤ 128 terms and a float cos/sin table: ~1e-7 relative.
      CHECK(xqtest::rel_error(K, K64) <= 1e-5);
      CHECK(xqtest::rel_error(V, V64) <= 1e-5);
    }
  }
}

TEST_CASE_TEMPLATE("attention: absorbed values equal materialized, both equal float64 attention on X̂", B,
                   backend::Reference, backend::Eigen) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  for (const Shape sh : kShapes) {
    const auto m = make_model(g, sh.d, sh.H, sh.Hkv, sh.Dh);
    Cache<codec::PerLayer<Uniform<4>>, B> cache(m.config, {32, 0});
    const auto s = cache.add_sequence();
    const index_t n = 97, nq = 13, qw = sh.H * sh.Dh, dkv = sh.Hkv * sh.Dh;
    const auto x = xqtest::activations(g, std::size_t(n), std::size_t(sh.d));
    const auto q = xqtest::randn(g, std::size_t(nq * qw));
    cache.append(s, 0, x.data(), n);
    const Rope rope(sh.Dh, 512);
    auto out_m = xqtest::poisoned(std::size_t(nq * qw)), out_a = xqtest::poisoned(std::size_t(nq * qw));
    attend<remat::Materialize>(cache, s, 0, q.data(), nq, m.weights(true), rope, out_m.data());
    attend<remat::AbsorbValues>(cache, s, 0, q.data(), nq, m.weights(true), rope, out_a.data());
    REQUIRE(xqtest::all_finite(out_m));
    REQUIRE(xqtest::all_finite(out_a));
    // Same math in another order (p·X̂ then Wv instead of X̂·Wv then p): float rounding only.
    CHECK(xqtest::rel_error(out_a, out_m) <= 1e-5);
    // Float64 attention over the same X̂.
    const auto X = xhat(cache, s, 0);
    auto K64 = xqtest::project64(X, m.wk.data(), std::size_t(n), std::size_t(sh.d), std::size_t(dkv));
    auto V64 = xqtest::project64(X, m.wv.data(), std::size_t(n), std::size_t(sh.d), std::size_t(dkv));
    for (std::size_t i = 0; i < K64.size(); ++i) K64[i] += m.bk[i % dkv], V64[i] += m.bv[i % dkv];
    xqtest::rope64(K64, std::size_t(n), std::size_t(sh.Hkv), std::size_t(sh.Dh), 0);
    auto q64 = to64(q);
    xqtest::rope64(q64, std::size_t(nq), std::size_t(sh.H), std::size_t(sh.Dh), std::size_t(n - nq));
    const auto ref = xqtest::attention64(q64, K64, V64, std::size_t(nq), std::size_t(n), std::size_t(sh.H),
                                         std::size_t(sh.Hkv), std::size_t(sh.Dh));
    CHECK(xqtest::rel_error(out_m, ref) <= 1e-5);
    CHECK(xqtest::rel_error(out_a, ref) <= 1e-5);
  }
}

TEST_CASE("Eigen attention matches the scalar reference backend") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = make_model(g, 96, 8, 2, 16);
  Cache<codec::PerLayer<Uniform<2, Axis::Channel>>, backend::Eigen> fast(m.config, {32, 0});
  Cache<codec::PerLayer<Uniform<2, Axis::Channel>>, backend::Reference> ref(m.config, {32, 0});
  const auto a = fast.add_sequence(), b = ref.add_sequence();
  const auto x = xqtest::activations(g, 80, 96);
  const auto q = xqtest::randn(g, 5 * 128);
  fast.append(a, 0, x.data(), 80);
  ref.append(b, 0, x.data(), 80);
  CHECK(xhat(fast, a, 0) == xhat(ref, b, 0));  // same codes, same dequantized values
  const Rope rope(16, 128);
  auto o1 = xqtest::poisoned(5 * 128), o2 = xqtest::poisoned(5 * 128);
  attend<remat::AbsorbValues>(fast, a, 0, q.data(), 5, m.weights(false), rope, o1.data());
  attend<remat::AbsorbValues>(ref, b, 0, q.data(), 5, m.weights(false), rope, o2.data());
  CHECK(xqtest::rel_error(o1, o2) <= 1e-5);
}

TEST_CASE("decoding token by token gives the rows of one causal prefill") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = make_model(g, 96, 8, 2, 16);
  // Per-token groups with no window: each token is quantized on arrival, so both caches hold the
  // same values at every step (a per-channel stream would show decode the fp16 window instead).
  using C = Cache<codec::PerLayer<Uniform<4>>>;
  C prefill(m.config, {32, 0}), decode(m.config, {32, 0});
  const auto a = prefill.add_sequence(), b = decode.add_sequence();
  const index_t n = 70, qw = 128;
  const auto x = xqtest::activations(g, n, 96);
  const auto q = xqtest::randn(g, std::size_t(n * qw));
  const Rope rope(16, 128);
  prefill.append(a, 0, x.data(), n);
  auto all = xqtest::poisoned(std::size_t(n * qw));
  attend<remat::Materialize>(prefill, a, 0, q.data(), n, m.weights(true), rope, all.data());
  auto step = xqtest::poisoned(std::size_t(n * qw));
  for (index_t t = 0; t < n; ++t) {
    decode.append(b, 0, x.data() + t * 96, 1);
    attend<remat::AbsorbValues>(decode, b, 0, q.data() + t * qw, 1, m.weights(true), rope, step.data() + t * qw);
  }
  CHECK(xqtest::rel_error(step, all) <= 1e-5);
}

TEST_CASE("8-bit X gives attention within 1e-2 of unquantized attention") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  // X as an RMSNorm output: each token scaled to unit RMS, then per-channel gains in [0.5, 1.5];
  // queries of unit scale, so scores are of order 1 with or without outlier channels. 8-bit codes
  // over groups of 128 (or the whole width) carry an RMS error of about range/255/√12 ≈ 0.5% of X,
  // and the average over ~200 tokens shrinks it further. The error is measured against the RMS of
  // the value rows being averaged, not against the output: an average of random values can nearly
  // cancel, and a ratio to it has no useful bound (a run failed so, at 5.6%, before this change).
  // Measured over 3000 seeds per shape (median / max): 0.12% / 0.17% without outliers; with
  // residual-stream outliers (20x channels, which stretch each group's range) 0.22% / 0.38%.
  // Bounds, about 3x the maxima: 5e-3 and 1e-2.
  for (const Shape sh : kShapes) {
    for (bool outliers : {false, true}) {
      const auto m = make_model(g, sh.d, sh.H, sh.Hkv, sh.Dh);
      const index_t group = std::min<index_t>(128, sh.d);
      Cache<codec::PerLayer<Uniform<8>>> q8(m.config, {group, 0});
      Cache<codec::PerLayer<quant::Fp32>> full(m.config, {});
      const auto a = q8.add_sequence(), b = full.add_sequence();
      const index_t n = 200, nq = 8, qw = sh.H * sh.Dh, dkv = sh.Hkv * sh.Dh;
      auto x = outliers ? xqtest::activations(g, std::size_t(n), std::size_t(sh.d)) : xqtest::randn(g, std::size_t(n * sh.d));
      std::uniform_real_distribution<float> gain(0.5f, 1.5f);
      std::vector<float> gains(static_cast<std::size_t>(sh.d));
      for (float& v : gains) v = gain(g);
      for (index_t t = 0; t < n; ++t) {
        float* row = x.data() + t * sh.d;
        double ss = 0;
        for (index_t c = 0; c < sh.d; ++c) ss += double(row[c]) * row[c];
        const auto inv_rms = float(1.0 / std::sqrt(ss / double(sh.d)));
        for (index_t c = 0; c < sh.d; ++c) row[c] *= inv_rms * gains[std::size_t(c)];
      }
      const auto q = xqtest::randn(g, std::size_t(nq * qw));
      q8.append(a, 0, x.data(), n);
      full.append(b, 0, x.data(), n);
      const Rope rope(sh.Dh, 512);
      auto o8 = xqtest::poisoned(std::size_t(nq * qw)), o32 = xqtest::poisoned(std::size_t(nq * qw));
      attend<remat::AbsorbValues>(q8, a, 0, q.data(), nq, m.weights(true), rope, o8.data());
      attend<remat::AbsorbValues>(full, b, 0, q.data(), nq, m.weights(true), rope, o32.data());
      REQUIRE(xqtest::all_finite(o8));
      REQUIRE(xqtest::all_finite(o32));
      // Each output row (query, head) averages value rows of its KV head: compare the error with
      // the RMS norm of those rows, ‖o8 − o32‖ / √(nq·H · mean_t ‖v_t‖²/Hkv).
      auto v = xqtest::project64(x, m.wv.data(), std::size_t(n), std::size_t(sh.d), std::size_t(dkv));
      double v2 = 0;
      for (std::size_t i = 0; i < v.size(); ++i) {
        const double vi = v[i] + m.bv[i % std::size_t(dkv)];
        v2 += vi * vi;
      }
      const double value_scale = std::sqrt(double(nq * sh.H) * v2 / double(n * sh.Hkv));
      double err2 = 0;
      for (std::size_t i = 0; i < o8.size(); ++i) err2 += (double(o8[i]) - o32[i]) * (double(o8[i]) - o32[i]);
      const double e = std::sqrt(err2) / value_scale;
      INFO("relative error ", e, " outliers ", outliers);
      CHECK(e <= (outliers ? 1e-2 : 5e-3));
      CHECK(e > 1e-4);  // the quantized path really is quantized
    }
  }
}

TEST_CASE("RoPE matches float64 rotation of interleaved pairs") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const Rope rope(64, 4096);
  auto v = xqtest::randn(g, 10 * 2 * 64);
  auto v64 = to64(v);
  rope.apply(v.data(), 10, 128, 2, 4000);
  xqtest::rope64(v64, 10, 2, 64, 4000);
  CHECK(xqtest::rel_error(v, v64) <= 1e-6);
  CHECK_THROWS_AS(rope.apply(v.data(), 10, 128, 2, 4090), ConfigError);  // past the table
  CHECK_THROWS_AS(Rope(63, 10), ConfigError);
}

TEST_CASE("attention and materialize reject bad arguments") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = make_model(g, 96, 8, 2, 16);
  Cache<codec::PerLayer<Uniform<4>>> cache(m.config, {32, 0});
  const auto s = cache.add_sequence();
  const auto x = xqtest::activations(g, 10, 96);
  cache.append(s, 0, x.data(), 10);
  std::vector<float> q(11 * 128, 0.1f), out(11 * 128), K(10 * 32), V(10 * 32);
  const Rope rope(16, 64), wrong(32, 64);
  CHECK_THROWS_WITH_AS(attend<remat::Materialize>(cache, s, 0, q.data(), 11, m.weights(false), rope, out.data()),
                       doctest::Contains("nq: must be in [1, 10]"), ShapeError);
  CHECK_THROWS_AS(attend<remat::Materialize>(cache, s, 0, q.data(), 0, m.weights(false), rope, out.data()), ShapeError);
  CHECK_THROWS_WITH_AS(attend<remat::AbsorbValues>(cache, s, 0, q.data(), 1, m.weights(false), wrong, out.data()),
                       doctest::Contains("rope: head_dim 32"), ConfigError);
  CHECK_THROWS_WITH_AS(attend<remat::AbsorbValues>(cache, s, 0, q.data(), 1, LayerWeights{}, rope, out.data()),
                       doctest::Contains("weights: wk and wv"), ShapeError);
  CHECK_THROWS_AS(materialize(cache, s, 0, 5, 11, m.weights(false), rope, K.data(), V.data()), ShapeError);
  CHECK_THROWS_AS(materialize(cache, s, 0, 6, 5, m.weights(false), rope, K.data(), V.data()), ShapeError);
}
