// XQuant-CL (codec::CrossLayer, codec::LatentCrossLayer): each layer's reconstruction error is
// its own delta's quantization error (nothing accumulates over layers), checked element by
// element against an independent float64 model of the quantizer; call order, chunking and
// out-of-order visits.

#include "codec_support.hpp"

namespace xq = xquant;
using xq::index_t;
using U2 = xq::quant::Uniform<2>;
using U3 = xq::quant::Uniform<3>;
using U4 = xq::quant::Uniform<4>;

namespace {

constexpr int kLayers = 7;
constexpr index_t kGroup = 64;

// Appends X of every layer: one prefill chunk, or token by token (layers in order per token).
template <class CacheT>
void fill(CacheT& cache, xq::SequenceId seq, const std::vector<std::vector<float>>& x, index_t n, index_t d,
          bool decode) {
  if (!decode) {
    for (int l = 0; l < kLayers; ++l) cache.append(seq, l, x[l].data(), n);
  } else {
    for (index_t t = 0; t < n; ++t)
      for (int l = 0; l < kLayers; ++l) cache.append(seq, l, x[l].data() + t * d, 1);
  }
  cache.seal(seq);
}

template <class CacheT>
std::vector<float> reconstruction(CacheT& cache, xq::SequenceId seq, int layer, index_t n, index_t d) {
  auto out = xqtest::poisoned(static_cast<std::size_t>(n * d));
  cache.state().dequantize(seq, layer, 0, n, out.data(), d);
  return out;
}

// Rows (n × r) of x·U in double, U given as Uᵀ (r × d row-major); the identity when basis_t is null.
std::vector<double> in_space(const std::vector<double>& x, const float* basis_t, index_t n, index_t d, index_t r) {
  if (!basis_t) return x;
  std::vector<double> y(static_cast<std::size_t>(n * r), 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < r; ++j) {
      double acc = 0;
      for (index_t i = 0; i < d; ++i) acc += x[t * d + i] * basis_t[j * d + i];
      y[t * r + j] = acc;
    }
  return y;
}

template <class Codec>
struct Traits;
template <class D, class B>
struct Traits<xq::codec::CrossLayerCodec<D, B, false>> {
  static constexpr int delta_bits = D::bits, base_bits = B::bits;
};
template <class D, class B>
struct Traits<xq::codec::CrossLayerCodec<D, B, true>> {
  static constexpr int delta_bits = D::bits, base_bits = B::bits;
};

}  // namespace

TEST_CASE_TEMPLATE("cross-layer: each layer's error is its own delta's quantization error", Codec,
                   xq::codec::CrossLayer<U2>, xq::codec::CrossLayer<U3>, xq::codec::CrossLayer<U4>,
                   xq::codec::CrossLayer<U2, U3>, xq::codec::LatentCrossLayer<U2>, xq::codec::LatentCrossLayer<U3>) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const bool latent = Codec::latent;
  // GQA (dkv = 64 < d = 256) for the latent variant, so its basis is a real projection (r = 128).
  const auto m = xqtest::make_model(g, kLayers, 256, 8, latent ? 2 : 8, 32);
  const index_t n = 150, d = m.d;
  // The latent variant's float GEMMs over activations with ×20 outliers would blur the rounding
  // ties the reference has to recognise; it gets plain N(0, 1) activations.
  const auto x = xqtest::residual_stream(g, kLayers, n, d, 0.3f, !latent);
  for (const bool decode : {false, true}) {
  INFO("decode ", decode);

  Codec codec;
  codec.group = kGroup;
  // Decode with a window of 16 for plain CL (the window holds fp16 X exactly as the reference
  // rounds it); the latent window holds fp32-GEMM X·U rounded to fp16, which the float64
  // reference cannot reproduce at fp16 rounding ties, so latent decode runs without a window.
  codec.window = decode && !latent ? 16 : 0;
  if constexpr (Codec::latent) codec.weights = m.weights();
  xq::Cache<Codec> cache(m.config(256, 64), codec);
  const auto seq = cache.add_sequence();
  fill(cache, seq, x, n, d, decode);
  const int b = cache.state().base_layers();
  REQUIRE(b == 3);  // the default: layers 0, 1, 2 plain, layer 2 seeds the accumulator
  const index_t r = cache.state().cached_width();
  CHECK(r == (latent ? 2 * m.dkv() : d));

  // With a window every token passes through fp16 on its way in: the reference starts from that.
  auto input = [&](int l) {
    std::vector<double> v(x[l].begin(), x[l].end());
    if (codec.window > 0 && !latent)
      for (double& e : v) e = xqtest::round_fp16(e);
    return v;
  };
  std::vector<double> prev;  // X̂_{i−1} from the codec, as double
  double max_x = 0;
  for (const auto& xl : x)
    for (float v : xl) max_x = std::max(max_x, static_cast<double>(std::abs(v)));
  // Non-tie elements must agree to float32 rounding of sums of O(max|X|) values (a few ulps; the
  // latent variant adds two float GEMMs over d = 256 terms); a quantization step is ≥ 1e-2 here.
  const double tol = (latent ? 1e-5 : 1e-6) * max_x;
  index_t ties = 0, total = 0;
  for (int l = 0; l < kLayers; ++l) {
    CAPTURE(l);
    const auto rec = reconstruction(cache, seq, l, n, d);
    REQUIRE(xqtest::all_finite(rec));
    const std::vector<double> xr(rec.begin(), rec.end());
    const float* ut = latent ? cache.state().basis(l).basis_t.data() : nullptr;
    // Δ_i (against the codec's own X̂_{i−1}) and the error, both in the cached space of layer i.
    const std::vector<double> target = in_space(input(l), ut, n, d, r);
    std::vector<double> delta = target;
    if (l >= b) {
      const auto pu = in_space(prev, ut, n, d, r);
      for (std::size_t i = 0; i < delta.size(); ++i) delta[i] -= pu[i];
    }
    std::vector<double> err = in_space(xr, ut, n, d, r);  // (X̂_i − X_i)·U_i
    for (std::size_t i = 0; i < err.size(); ++i) err[i] -= target[i];
    const int bits = l < b ? Traits<Codec>::base_bits : Traits<Codec>::delta_bits;
    for (index_t t = 0; t < n; ++t)
      for (index_t g0 = 0; g0 < r; g0 += kGroup) {
        const double* v = delta.data() + t * r + g0;
        const auto [lo, hi] = std::minmax_element(v, v + kGroup);
        // Latent: lo and hi come out of float GEMMs (~1e-6 relative), so fp16 ties get a wider margin.
        const auto qs = xqtest::GroupQuant64::candidates(*lo, *hi, bits, latent ? 2e-2 : 1e-3);
        // One of the candidate quantizers must explain every element of the group: to float32
        // rounding, or within a step where the code itself sits on a rounding tie.
        bool matched = false;
        index_t group_ties = 0;
        double worst = 0;
        for (const auto& q : qs) {
          index_t tq = 0;
          double w = 0;
          for (index_t j = 0; j < kGroup; ++j) {
            bool tie = false;
            const double expect = q(v[j], &tie) - v[j];  // quantization error of the delta
            const double got = err[t * r + g0 + j];
            if (tie) {
              ++tq;
              w = std::max(w, std::abs(got) > xqtest::GroupQuant64::bound(*lo, *hi, bits) + tol ? 1e300 : 0.0);
            } else {
              w = std::max(w, std::abs(got - expect));
            }
          }
          if (w <= tol) {
            matched = true;
            group_ties = tq;
            break;
          }
          worst = std::max(worst, w);
        }
        total += kGroup;
        ties += group_ties;
        if (!matched) {
          INFO("token ", t, ", group at channel ", g0, ": largest difference from the delta's quantization error ",
               worst, " (tolerance ", tol, ")");
          REQUIRE(matched);
        }
      }
    prev = xr;
  }
  CHECK(ties < total / 100);  // ties are rare: the element-wise check above covers almost everything
  }
}

TEST_CASE("cross-layer: errors do not accumulate over layers") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const int L = 12;
  const index_t n = 64, d = 256;
  const auto x = xqtest::residual_stream(g, L, n, d, 0.3f, false);
  xq::CacheConfig c{L, d, {4, 4, 64}, 128, 64};
  xq::codec::CrossLayer<U2, xq::quant::Uniform<8>> codec;  // 8-bit base: the deltas' errors dominate
  codec.group = kGroup;
  xq::Cache<decltype(codec)> cache(c, codec);
  const auto seq = cache.add_sequence();
  for (int l = 0; l < L; ++l) cache.append(seq, l, x[l].data(), n);
  std::vector<double> rms;
  for (int l = 3; l < L; ++l) {
    std::vector<float> rec(static_cast<std::size_t>(n * d));
    cache.state().dequantize(seq, l, 0, n, rec.data(), d);
    double e2 = 0;
    for (std::size_t i = 0; i < rec.size(); ++i) e2 += std::pow(static_cast<double>(rec[i]) - x[l][i], 2);
    rms.push_back(std::sqrt(e2 / static_cast<double>(rec.size())));
  }
  // Layer i's delta is the step (σ 0.3) plus layer i−1's error e: e_i² = c·(0.09 + e_{i−1}²) with
  // c ≈ 0.2 for 2 bits, a fixed point ≈ 1.12·e_3. Errors that accumulated (deltas against the true
  // X_{i−1}) would reach sqrt(9)·e_3 = 3·e_3 at layer 11; 1.5·e_3 separates the two.
  CAPTURE(rms.front());
  CAPTURE(rms.back());
  for (double e : rms) CHECK(e < 1.5 * rms.front());
}

TEST_CASE("cross-layer: appending a layer before its predecessor raises and stores nothing") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t n = 10, d = 128;
  const auto x = xqtest::residual_stream(g, 5, n, d);
  xq::CacheConfig c{5, d, {2, 2, 64}, 256, 64};
  xq::codec::CrossLayer<U3> codec;
  codec.group = kGroup;
  xq::Cache<decltype(codec)> cache(c, codec);
  const auto seq = cache.add_sequence();
  for (int l = 0; l < 3; ++l) cache.append(seq, l, x[l].data(), n);
  CHECK_THROWS_AS(cache.append(seq, 4, x[4].data(), n), xq::Error);
  CHECK(cache.length(seq, 4) == 0);
  const std::size_t bytes = cache.allocated_bytes();
  cache.append(seq, 3, x[3].data(), n);
  cache.append(seq, 4, x[4].data(), n);
  CHECK(cache.allocated_bytes() > bytes);
  // A second chunk of a different size than layer 3's latest one is also out of order.
  cache.append(seq, 0, x[0].data(), 2);
  cache.append(seq, 1, x[1].data(), 2);
  cache.append(seq, 2, x[2].data(), 2);
  CHECK_THROWS_WITH_AS(cache.append(seq, 3, x[3].data(), 1), doctest::Contains("call order"), xq::Error);
  cache.append(seq, 3, x[3].data(), 2);
  CHECK_NOTHROW(cache.append(seq, 4, x[4].data(), 2));
  // Base layers below the seed (0, 1) may come in any order.
  cache.append(seq, 1, x[1].data(), 1);
  CHECK_NOTHROW(cache.append(seq, 0, x[0].data(), 1));
}

TEST_CASE("cross-layer: the cache does not depend on how tokens were chunked (window of 16)") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t n = 100, d = 128;
  const auto x = xqtest::residual_stream(g, kLayers, n, d);
  xq::CacheConfig c{kLayers, d, {2, 2, 64}, 256, 64};
  xq::codec::CrossLayer<U2> codec;
  codec.group = kGroup;
  codec.window = 16;
  xq::Cache<decltype(codec)> a(c, codec), b(c, codec);
  const auto sa = a.add_sequence(), sb = b.add_sequence();
  for (int l = 0; l < kLayers; ++l) a.append(sa, l, x[l].data(), n);  // one prefill chunk
  index_t t = 0;
  for (index_t chunk : {7, 1, 30, 1, 1, 60}) {  // uneven chunks, layers in order within each
    for (int l = 0; l < kLayers; ++l) b.append(sb, l, x[l].data() + t * d, chunk);
    t += chunk;
  }
  REQUIRE(t == n);
  for (int pass = 0; pass < 2; ++pass) {  // before sealing (16 tokens in fp16) and after
    CHECK(a.allocated_bytes() == b.allocated_bytes());
    for (int l = 0; l < kLayers; ++l) {
      CAPTURE(l);
      CHECK(a.state().committed(sa, l) == (pass == 0 ? n - 16 : n));
      const auto ra = reconstruction(a, sa, l, n, d), rb = reconstruction(b, sb, l, n, d);
      CHECK(std::memcmp(ra.data(), rb.data(), ra.size() * sizeof(float)) == 0);
    }
    a.seal(sa);
    b.seal(sb);
  }
}

TEST_CASE_TEMPLATE("cross-layer: visiting layers out of order rebuilds the same X̂ as in order", Codec,
                   xq::codec::CrossLayer<U2>, xq::codec::LatentCrossLayer<U3>) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto m = xqtest::make_model(g, kLayers, 128, 4, 1, 32);
  const index_t n = 90, d = m.d;
  const auto x = xqtest::residual_stream(g, kLayers, n, d);
  Codec codec;
  codec.group = kGroup;
  codec.window = 8;
  if constexpr (Codec::latent) codec.weights = m.weights();
  xq::Cache<Codec> cache(m.config(256, 64), codec);
  const auto live = cache.add_sequence();  // decoded token by token, 8 tokens still in the window
  for (index_t t = 0; t < n; ++t)
    for (int l = 0; l < kLayers; ++l) cache.append(live, l, x[l].data() + t * d, 1);
  std::vector<std::vector<float>> in_order;
  for (int l = 0; l < kLayers; ++l) in_order.push_back(reconstruction(cache, live, l, n, d));
  std::vector<int> order{6, 3, 4, 4, 0, 5, 2, 1, 6, 5};
  std::shuffle(order.begin(), order.end(), g);
  for (int l : order) {
    CAPTURE(l);
    const index_t begin = std::uniform_int_distribution<index_t>(0, n - 1)(g);
    std::vector<float> part(static_cast<std::size_t>((n - begin) * d));
    cache.state().dequantize(live, l, begin, n, part.data(), d);
    const std::vector<float> ref(in_order[l].begin() + begin * d, in_order[l].end());
    // Plain CL: the same float additions in the same order, so bit-identical. Latent: the
    // per-layer GEMMs may block rows differently (float rounding only).
    if (Codec::latent) CHECK(xqtest::rel_error(part, ref) < 1e-6);
    else CHECK(std::memcmp(part.data(), ref.data(), part.size() * sizeof(float)) == 0);
  }
  CHECK(cache.state().working_bytes() >= static_cast<std::size_t>(n * d) * sizeof(float));
}

TEST_CASE("cross-layer: configuration errors name the argument") {
  xq::CacheConfig c{4, 128, {2, 2, 64}, 256, 64};
  xq::codec::CrossLayer<U2> codec;
  codec.group = 64;
  codec.base_layers = 0;
  CHECK_THROWS_WITH_AS(xq::Cache<decltype(codec)>(c, codec), doctest::Contains("base_layers"), xq::ConfigError);
  codec.base_layers = 5;
  CHECK_THROWS_AS(xq::Cache<decltype(codec)>(c, codec), xq::ConfigError);
  codec.base_layers = 4;  // every layer plain: allowed (no deltas)
  CHECK_NOTHROW(xq::Cache<decltype(codec)>(c, codec));
  codec.base_layers = 3;
  codec.group = 96;
  CHECK_THROWS_WITH_AS(xq::Cache<decltype(codec)>(c, codec), doctest::Contains("group"), xq::ConfigError);
  xq::codec::LatentCrossLayer<U2> lat;
  CHECK_THROWS_WITH_AS(xq::Cache<decltype(lat)>(c, lat), doctest::Contains("weights"), xq::ConfigError);
}
