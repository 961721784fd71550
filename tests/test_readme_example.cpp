// The README's integration example, compiled and run (at a small size) so it cannot rot.
#include <xquant/xquant.hpp>

#include "support.hpp"

TEST_CASE("the README integration example compiles and runs") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const int layer = 0;
  const xquant::index_t n_tokens = 40, n = n_tokens, n_queries = 1;
  const auto Xv = xqtest::randn(g, std::size_t(n * 256));
  const auto wkv = xqtest::randn(g, std::size_t(2 * 64 * 256), 0.06f), wvv = xqtest::randn(g, std::size_t(2 * 64 * 256), 0.06f);
  const auto qv = xqtest::randn(g, std::size_t(4 * 64));
  const float *X = Xv.data(), *wk = wkv.data(), *wv = wvv.data(), *q = qv.data();
  auto Kv = xqtest::poisoned(std::size_t(n * 128)), Vv = xqtest::poisoned(std::size_t(n * 128)), outv = xqtest::poisoned(4 * 64);
  float *K = Kv.data(), *V = Vv.data(), *out = outv.data();

  // ---- README snippet (sizes shrunk: 2 layers, d = 256, 4 heads / 2 KV heads of 64) ----
  namespace xq = xquant;
  using X4 = xq::quant::Uniform<4, xq::Axis::Token>;
  xq::CacheConfig config{/*layers*/ 2, /*width d*/ 256, /*heads*/ {4, 2, 64},
                         /*capacity_tokens*/ 1024, /*block_tokens*/ 128};
  xq::Cache<xq::codec::PerLayer<X4>> cache(config, {/*group*/ 128, /*fp16 window*/ 0});
  xq::Rope rope(/*head_dim*/ 64, /*max_positions*/ 1024);
  auto seq = cache.add_sequence();
  cache.append(seq, layer, X, n_tokens);
  xq::materialize(cache, seq, layer, 0, n, {wk, wv}, rope, K, V);
  xq::attend<xq::remat::AbsorbValues>(cache, seq, layer, q, n_queries, {wk, wv}, rope, out);
  // ---- end of snippet ----

  CHECK(xqtest::all_finite(Kv));
  CHECK(xqtest::all_finite(Vv));
  CHECK(xqtest::all_finite(outv));
}
