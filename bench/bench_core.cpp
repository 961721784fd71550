// CPU benchmarks of the core: quantize/append throughput, rematerialization throughput next to
// Eigen's own GEMM on unquantized X of the same shape (measured in the same run), and one decode
// step of attention with materialized vs absorbed values.
//
//   ./build/bench/bench_core --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>
#include <xquant/xquant.hpp>

#include "bench_support.hpp"

#include <algorithm>
#include <ctime>
#include <map>
#include <random>
#include <tuple>
#include <vector>

namespace xq = xquant;
using xq::index_t;

namespace {

std::vector<float> random_vector(std::size_t n, float scale, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

xq::CacheConfig config_for(index_t d, index_t heads, index_t kv_heads, index_t capacity) {
  xq::CacheConfig c;
  c.layers = 1;
  c.width = d;
  c.attention = {heads, kv_heads, 128};
  c.capacity_tokens = capacity;
  c.block_tokens = 128;
  return c;
}


// Baseline: Eigen GEMM of unquantized fp32 X (n × d) by [Wk; Wv]ᵀ, measured once per shape.
double eigen_gemm_seconds(index_t n, index_t d, index_t dkv) {
  static std::map<std::tuple<index_t, index_t, index_t>, double> cache;
  const auto key = std::make_tuple(n, d, dkv);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const M X = M::Random(n, d), Wk = M::Random(dkv, d), Wv = M::Random(dkv, d);
  M K(n, dkv), V(n, dkv);
  const double s = xqbench::median_seconds([&] {
    K.noalias() = X * Wk.transpose();
    V.noalias() = X * Wv.transpose();
    benchmark::DoNotOptimize(K.data());
    benchmark::DoNotOptimize(V.data());
  });
  return cache[key] = s;
}

// Append throughput: a 512-token prefill chunk of d = 4096 per iteration (fp32 X read).
template <class Q>
void BM_Append(benchmark::State& state) {
  const index_t d = 4096, n = 512;
  const auto x = random_vector(std::size_t(n * d), 1.0f, 1);
  xq::Cache<xq::codec::PerLayer<Q>> cache(config_for(d, 32, 32, n), {128, 0});
  for (auto _ : state) {
    state.PauseTiming();
    const auto s = cache.add_sequence();
    state.ResumeTiming();
    cache.append(s, 0, x.data(), n);
    state.PauseTiming();
    cache.remove_sequence(s);
    state.ResumeTiming();
  }
  state.counters["GB/s"] = benchmark::Counter(double(n * d * 4) * double(state.iterations()), benchmark::Counter::kIsRate,
                                              benchmark::Counter::kIs1000);
}
BENCHMARK_TEMPLATE(BM_Append, xq::quant::Uniform<2>)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Append, xq::quant::Uniform<3>)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Append, xq::quant::Uniform<4>)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Append, xq::quant::Uniform<8>)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Append, xq::quant::Uniform<4, xq::Axis::Channel>)->Unit(benchmark::kMillisecond);

// Rematerialization of K (with RoPE) and V for n tokens: dequantize + two GEMMs, vs the GEMMs
// alone on fp32 X. Shape: d = 4096, dkv = 1024 (Llama-3.1-8B's 8 KV heads of 128).
template <class Q>
void BM_Remat(benchmark::State& state) {
  const index_t d = 4096, dkv = 1024, n = state.range(0);
  const auto x = random_vector(std::size_t(n * d), 1.0f, 2);
  const auto wk = random_vector(std::size_t(dkv * d), 0.015f, 3), wv = random_vector(std::size_t(dkv * d), 0.015f, 4);
  xq::Cache<xq::codec::PerLayer<Q>> cache(config_for(d, 32, 8, n), {128, 0});
  const auto s = cache.add_sequence();
  cache.append(s, 0, x.data(), n);
  const xq::Rope rope(128, n);
  std::vector<float> K(std::size_t(n * dkv)), V(K.size());
  for (auto _ : state) {
    xq::materialize(cache, s, 0, 0, n, {wk.data(), wv.data()}, rope, K.data(), V.data());
    benchmark::DoNotOptimize(K.data());
  }
  const double flops = 2.0 * 2.0 * double(n) * double(d) * double(dkv);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * double(state.iterations()), benchmark::Counter::kIsRate,
                                                 benchmark::Counter::kIs1000);
  const double base = eigen_gemm_seconds(n, d, dkv);
  state.counters["eigen_gemm_GFLOP/s"] = flops / base * 1e-9;
  // base·iterations / elapsed = (GEMM time) / (our time per iteration): our throughput over Eigen's.
  state.counters["ratio_vs_gemm"] = benchmark::Counter(base * double(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_Remat, xq::quant::Uniform<4>)->Arg(512)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Remat, xq::quant::Uniform<2>)->Arg(512)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Remat, xq::quant::Uniform<3, xq::Axis::Channel>)->Arg(512)->Unit(benchmark::kMillisecond);

// One decode step at Llama-2-7B's layer shape (d = 4096, 32 heads of 128, MHA) over n cached
// tokens: the new token is appended, then attention reads the 4-bit cache.
template <class Policy>
void BM_DecodeStep(benchmark::State& state) {
  const index_t d = 4096, n = state.range(0);
  const auto x = random_vector(std::size_t(n * d), 1.0f, 5);
  const auto wk = random_vector(std::size_t(d * d), 0.015f, 6), wv = random_vector(std::size_t(d * d), 0.015f, 7);
  const auto q = random_vector(std::size_t(d), 1.0f, 8);
  xq::Cache<xq::codec::PerLayer<xq::quant::Uniform<4>>> cache(config_for(d, 32, 32, n), {128, 0});
  const auto s = cache.add_sequence();
  cache.append(s, 0, x.data(), n);
  const xq::Rope rope(128, n);
  std::vector<float> out(static_cast<std::size_t>(d));
  for (auto _ : state) {
    xq::attend<Policy>(cache, s, 0, q.data(), 1, {wk.data(), wv.data()}, rope, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["tokens"] = double(n);
}
BENCHMARK_TEMPLATE(BM_DecodeStep, xq::remat::Materialize)->Arg(1024)->Arg(2048)->Arg(4096)->Arg(8192)->Iterations(2)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_DecodeStep, xq::remat::AbsorbValues)->Arg(1024)->Arg(2048)->Arg(4096)->Arg(8192)->Iterations(2)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
