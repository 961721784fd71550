// KIVI* baseline (codec::Kivi): keys quantized per channel *before* RoPE, values per token,
// exact K and V with an identity quantizer; and, for every codec, attention (materialized and,
// where V is a linear map of the cached tensor, absorbed) against float64, plus exact bytes.

#include "codec_support.hpp"

namespace xq = xquant;
using xq::index_t;
using Fp32 = xq::quant::Fp32;
template <int B>
using Chan = xq::quant::Uniform<B, xq::Axis::Channel>;
template <int B>
using Tok = xq::quant::Uniform<B, xq::Axis::Token>;

TEST_CASE("kivi: an identity quantizer gives K (post-RoPE, with bias) and V to 1e-5") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, 2, 128, 4, 2, 32);
  const index_t n = 90;
  const auto x = xqtest::residual_stream(g, m.layers, n, m.d);
  xq::codec::Kivi<Fp32, Fp32> codec;
  codec.weights = m.weights();
  xq::Cache<decltype(codec)> cache(m.config(128, 64), codec);
  const auto seq = cache.add_sequence();
  for (int l = 0; l < m.layers; ++l) cache.append(seq, l, x[l].data(), n);
  const xq::Rope rope(m.head_dim, n);
  for (int l = 0; l < m.layers; ++l) {
    auto K = xqtest::poisoned(static_cast<std::size_t>(n * m.dkv())), V = K;
    xq::materialize(cache, seq, l, 0, n, m.weights()[l], rope, K.data(), V.data());
    std::vector<double> K64, V64;
    xqtest::kv64(x[l], m, l, n, K64, V64);
    CHECK(xqtest::rel_error(K, K64) <= 1e-5);  // one float GEMM over d = 128: ~1e-7
    CHECK(xqtest::rel_error(V, V64) <= 1e-5);
  }
}

TEST_CASE_TEMPLATE("kivi*: keys per channel before RoPE, values per token, newest in fp16", Codec,
                   xq::codec::KiviStar<2>, xq::codec::KiviStar<3>, xq::codec::KiviStar<4>) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, 1, 128, 4, 2, 64);
  const index_t n = 300, dkv = m.dkv(), G = 128, W = 128;
  constexpr int bits = Codec::key_quantizer::bits;
  // Channels of very different scales, so that a per-token grouping of keys would break the
  // per-channel bound on the small channels.
  auto x = xqtest::randn(g, static_cast<std::size_t>(n * m.d));
  auto wk = m.wk[0];
  for (index_t o = 0; o < dkv; ++o)
    for (index_t i = 0; i < m.d; ++i) wk[o * m.d + i] *= std::ldexp(1.0f, static_cast<int>(o % 6) - 2);
  Codec codec;
  codec.weights = {{wk.data(), m.wv[0].data(), m.bk[0].data(), m.bv[0].data()}};
  codec.window = W;  // KIVI keeps the newest values (up to one group) in fp16 too
  xq::Cache<Codec> cache(m.config(512, 128), codec);
  const auto seq = cache.add_sequence();
  for (index_t t = 0; t < n; t += 60) cache.append(seq, 0, x.data() + t * m.d, 60);
  // Float64 pre-RoPE K and V.
  auto K = xqtest::project64(x, wk.data(), n, m.d, dkv), V = xqtest::project64(x, m.wv[0].data(), n, m.d, dkv);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < dkv; ++j) K[t * dkv + j] += m.bk[0][j], V[t * dkv + j] += m.bv[0][j];
  const auto src = cache.sources(seq, 0, 0, n, m.weights()[0]);
  REQUIRE(src.key_proj.w == nullptr);  // the cached tensor is K itself: identity, RoPE follows
  REQUIRE(src.value_proj.w == nullptr);
  double scale = 0;
  for (double v : K) scale = std::max(scale, std::abs(v));
  const double slack = 1e-6 * scale;  // float GEMM vs float64
  for (index_t j = 0; j < dkv; ++j)
    for (index_t g0 = 0; g0 < n; g0 += G) {
      const index_t g1 = std::min(n, g0 + G);
      double lo = 1e300, hi = -1e300;
      for (index_t t = g0; t < g1; ++t) lo = std::min(lo, K[t * dkv + j]), hi = std::max(hi, K[t * dkv + j]);
      for (index_t t = g0; t < g1; ++t) {
        const double e = std::abs(src.key.data[t * src.key.ld + j] - K[t * dkv + j]);
        const double bound =
            g1 - g0 == G ? xqtest::GroupQuant64::bound(lo, hi, bits) : 0.5 * xqtest::fp16_spacing(K[t * dkv + j]);
        if (e > bound + slack) {
          INFO("key channel ", j, " token ", t, " error ", e, " bound ", bound);
          REQUIRE(e <= bound + slack);
        }
      }
    }
  for (index_t t = 0; t < n; ++t)
    for (index_t g0 = 0; g0 < dkv; g0 += G) {
      const double* v = V.data() + t * dkv + g0;
      const auto [lo, hi] = std::minmax_element(v, v + G);
      for (index_t j = 0; j < G; ++j) {
        const double e = std::abs(src.value.data[t * src.value.ld + g0 + j] - v[j]);
        const double bound = t < n - W ? xqtest::GroupQuant64::bound(*lo, *hi, bits) : 0.5 * xqtest::fp16_spacing(v[j]);
        if (e > bound + slack) {
          INFO("value token ", t, " channel ", g0 + j, " error ", e, " bound ", bound);
          REQUIRE(e <= bound + slack);
        }
      }
    }
  // Exact bytes: keys per channel (one fp16 group window), values per token (fp16 window).
  CHECK(cache.allocated_bytes() == xqtest::stream_bytes<Chan<bits>>(n, dkv, G, 128, 0) +
                                       xqtest::stream_bytes<Tok<bits>>(n, dkv, G, 128, W));
}

// ---- every codec through the same cache and attention ------------------------------------------

namespace {

using PerLayer4 = xq::codec::PerLayer<Tok<4>>;
using CL2 = xq::codec::CrossLayer<Tok<2>>;
using LatentCL2 = xq::codec::LatentCrossLayer<Tok<2>>;
using Latent3 = xq::codec::Latent<Chan<3>, Tok<3>>;
using Kivi3 = xq::codec::KiviStar<3>;

static_assert(PerLayer4::values_are_linear && CL2::values_are_linear && LatentCL2::values_are_linear &&
                  Latent3::values_are_linear,
              "XQuant, XQuant-CL (plain and latent) and latent SVD: V is a linear map of the cached tensor");
static_assert(!Kivi3::values_are_linear, "KIVI caches V itself: attend<AbsorbValues> must not compile for it");

template <class Codec>
Codec make_codec(const xqtest::Model& m) {
  Codec c;
  if constexpr (std::is_same_v<Codec, PerLayer4>) {
    c.group = 64;
  } else if constexpr (std::is_same_v<Codec, CL2> || std::is_same_v<Codec, LatentCL2>) {
    c.group = 64;
    c.window = 16;
    if constexpr (Codec::latent) c.weights = m.weights();
  } else if constexpr (std::is_same_v<Codec, Latent3>) {
    c.weights = m.weights();
    c.value_group = 64;
    c.window = 16;
    c.fp16_key_channels = 1;
  } else {
    c.weights = m.weights();
    c.value_group = 64;
    c.window = 16;
  }
  return c;
}

}  // namespace

TEST_CASE_TEMPLATE("every codec: attention (materialized, and absorbed where V is linear) matches float64", Codec,
                   PerLayer4, CL2, LatentCL2, Latent3, Kivi3) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, 4, 256, 8, 2, 32);  // GQA: H = 8, Hkv = 2
  const index_t n = 150, nq = 3, H = m.heads, Dh = m.head_dim, dkv = m.dkv();
  const auto x = xqtest::residual_stream(g, m.layers, n, m.d);
  xq::Cache<Codec> cache(m.config(256, 128), make_codec<Codec>(m));
  const auto seq = cache.add_sequence();
  for (int l = 0; l < m.layers; ++l) cache.append(seq, l, x[l].data(), n - 5);  // prefill
  for (index_t t = n - 5; t < n; ++t)                                              // decode
    for (int l = 0; l < m.layers; ++l) cache.append(seq, l, x[l].data() + t * m.d, 1);
  const xq::Rope rope(Dh, n);
  const auto w = m.weights();
  for (int l : {3, 0, 2, 1}) {  // out of order on purpose
    CAPTURE(l);
    const auto q = xqtest::randn(g, static_cast<std::size_t>(nq * H * Dh));
    // Reference: float64 attention over the codec's own K and V (materialized in float).
    std::vector<float> K(static_cast<std::size_t>(n * dkv)), V(K.size());
    xq::materialize(cache, seq, l, 0, n, w[l], rope, K.data(), V.data());
    std::vector<double> q64(q.begin(), q.end());
    xqtest::rope64(q64, nq, H, Dh, n - nq);
    const auto ref = xqtest::attention64(q64, std::vector<double>(K.begin(), K.end()),
                                         std::vector<double>(V.begin(), V.end()), nq, n, H, m.kv_heads, Dh);
    auto out = xqtest::poisoned(static_cast<std::size_t>(nq * H * Dh));
    xq::attend<xq::remat::Materialize>(cache, seq, l, q.data(), nq, w[l], rope, out.data());
    REQUIRE(xqtest::all_finite(out));
    // float32 softmax and products over 150 tokens: ~1e-6 relative.
    CHECK(xqtest::rel_error(out, ref) < 1e-5);
    if constexpr (Codec::values_are_linear) {
      auto absorbed = xqtest::poisoned(out.size());
      xq::attend<xq::remat::AbsorbValues>(cache, seq, l, q.data(), nq, w[l], rope, absorbed.data());
      REQUIRE(xqtest::all_finite(absorbed));
      CHECK(xqtest::rel_error(absorbed, ref) < 1e-5);  // same math, products reassociated
    }
    // The codec's K and V are close to the true ones (a sanity bound for 2-4 bits).
    std::vector<double> K64, V64;
    xqtest::kv64(x[l], m, l, n, K64, V64);
    CHECK(xqtest::rel_error(K, K64) < 0.5);
    CHECK(xqtest::rel_error(V, V64) < 0.5);
  }
}

TEST_CASE("every codec: exact bytes from the stream layout") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, 4, 256, 8, 2, 32);
  const index_t d = m.d, dkv = m.dkv(), B = 128;
  const auto x = xqtest::residual_stream(g, m.layers, 300, d);
  for (index_t n : {1, 127, 128, 129, 300}) {
    CAPTURE(n);
    auto fill = [&](auto& cache) {
      const auto seq = cache.add_sequence();
      for (int l = 0; l < m.layers; ++l) cache.append(seq, l, x[l].data(), n);
      return cache.allocated_bytes();
    };
    // XQuant-CL: 3 base layers 4-bit, 1 delta layer 2-bit; the newest 16 tokens of each layer wait
    // in the codec's fp16 window and take blocks only once committed.
    const index_t committed = std::max<index_t>(0, n - 16);
    {
      xq::Cache<CL2> c(m.config(512, B), make_codec<CL2>(m));
      CHECK(fill(c) == 3 * xqtest::stream_bytes<Tok<4>>(committed, d, 64, B, 0) + xqtest::stream_bytes<Tok<2>>(committed, d, 64, B, 0) +
                           static_cast<std::size_t>(m.layers * 16 * d * 2));
      CHECK(c.state().working_bytes() > 0);  // accumulators are reported apart from the cache
    }
    {
      xq::Cache<LatentCL2> c(m.config(512, B), make_codec<LatentCL2>(m));  // cached width 2·dkv
      CHECK(fill(c) == 3 * xqtest::stream_bytes<Tok<4>>(committed, 2 * dkv, 64, B, 0) +
                           xqtest::stream_bytes<Tok<2>>(committed, 2 * dkv, 64, B, 0) +
                           static_cast<std::size_t>(m.layers * 16 * 2 * dkv * 2));
    }
    {
      xq::Cache<Latent3> c(m.config(512, B), make_codec<Latent3>(m));  // 1 fp16 key channel
      CHECK(fill(c) == m.layers * (xqtest::stream_bytes<Chan<3>>(n, dkv - 1, 128, B, 0) +
                                   xqtest::stream_bytes<xq::quant::Fp16>(n, 1, 1, B, 0) +
                                   xqtest::stream_bytes<Tok<3>>(n, dkv, 64, B, 16)));
    }
    {
      xq::Cache<Kivi3> c(m.config(512, B), make_codec<Kivi3>(m));
      CHECK(fill(c) == m.layers * (xqtest::stream_bytes<Chan<3>>(n, dkv, 128, B, 0) +
                                   xqtest::stream_bytes<Tok<3>>(n, dkv, 64, B, 16)));
    }
  }
  // At 128 tokens, 2-bit per-token codes of width 256 cost (2 + 32/64)/8 bytes per value: the
  // formula above is the paper's e + 32/G bits per element.
  CHECK(xqtest::stream_bytes<Tok<2>>(128, 256, 64, 128, 0) == 128 * 256 * (2 * 64 + 32) / 64 / 8);
}

TEST_CASE("kivi: configuration errors name the argument") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, 2, 128, 4, 2, 32);
  Kivi3 codec;
  CHECK_THROWS_WITH_AS(xq::Cache<Kivi3>(m.config(256, 128), codec), doctest::Contains("weights"), xq::ConfigError);
  codec.weights = m.weights();
  codec.value_group = 48;
  CHECK_THROWS_WITH_AS(xq::Cache<Kivi3>(m.config(256, 128), codec), doctest::Contains("group"), xq::ConfigError);
}
