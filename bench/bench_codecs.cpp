// CPU benchmarks of the codecs side by side: append (prefill of every layer) and rematerialization
// (K and V of every layer, layers visited in order) per codec, and XQuant-CL's accumulator
// overhead as a ratio to per-layer XQuant measured in the same run.
//
//   ./build/bench/bench_codecs --benchmark_counters_tabular=true
//
// Geometry (modest so that the binary runs in well under a minute on 2 cores): 6 layers,
// d = 512, GQA with 8 query heads and 2 KV heads of 64 (dkv = 128), 512 cached tokens.
#include <benchmark/benchmark.h>
#include <xquant/xquant.hpp>

#include "bench_support.hpp"

#include <algorithm>
#include <ctime>
#include <random>
#include <vector>

namespace xq = xquant;
using xq::index_t;

namespace {

constexpr int kLayers = 6;
constexpr index_t kD = 512, kHeads = 8, kKvHeads = 2, kHeadDim = 64, kTokens = 512;
constexpr index_t kDkv = kKvHeads * kHeadDim;

using U2 = xq::quant::Uniform<2>;
using U3 = xq::quant::Uniform<3>;
using U4 = xq::quant::Uniform<4>;
using C3 = xq::quant::Uniform<3, xq::Axis::Channel>;

struct Data {
  std::vector<std::vector<float>> wk, wv, x;  // per layer
  std::vector<xq::LayerWeights> weights;
  Data() {
    std::mt19937 g(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const float s = 1.0f / std::sqrt(float(kD));
    std::vector<float> xr(static_cast<std::size_t>(kTokens * kD));
    for (float& v : xr) v = nd(g);
    for (int l = 0; l < kLayers; ++l) {
      wk.emplace_back(static_cast<std::size_t>(kDkv * kD));
      wv.emplace_back(static_cast<std::size_t>(kDkv * kD));
      for (float& v : wk.back()) v = s * nd(g);
      for (float& v : wv.back()) v = s * nd(g);
      for (float& v : xr) v += 0.3f * nd(g);  // a residual stream: consecutive layers are similar
      x.push_back(xr);
    }
    for (int l = 0; l < kLayers; ++l) weights.push_back({wk[l].data(), wv[l].data(), nullptr, nullptr});
  }
};
const Data& data() {
  static const Data d;
  return d;
}

xq::CacheConfig config() {
  xq::CacheConfig c;
  c.layers = kLayers;
  c.width = kD;
  c.attention = {kHeads, kKvHeads, kHeadDim};
  c.capacity_tokens = kTokens;
  c.block_tokens = 128;
  return c;
}

// The codecs under comparison, each at its paper configuration (group 128).
using XQ2 = xq::codec::PerLayer<U2>;
using CL2 = xq::codec::CrossLayer<U2>;
using CL3 = xq::codec::CrossLayer<U3>;
using LatentCL2 = xq::codec::LatentCrossLayer<U2>;
using Latent3 = xq::codec::Latent<C3, U3>;
using Kivi3 = xq::codec::KiviStar<3>;

template <class Codec>
Codec make_codec() {
  Codec c;
  if constexpr (!std::is_same_v<Codec, XQ2> && !std::is_same_v<Codec, CL2> && !std::is_same_v<Codec, CL3>)
    c.weights = data().weights;
  if constexpr (std::is_same_v<Codec, Latent3>) c.fp16_key_channels = 1;
  return c;
}

template <class CacheT>
void prefill(CacheT& cache, xq::SequenceId seq) {
  for (int l = 0; l < kLayers; ++l) cache.append(seq, l, data().x[l].data(), kTokens);
}

// Multiply-adds ×2 of rematerializing one layer: each projection the codec hands back.
double remat_flops(const xq::LayerSources& s) {
  double f = 0;
  if (s.key_proj.w) f += 2.0 * double(s.key.rows) * double(s.key_proj.in) * double(s.key_proj.out);
  if (s.value_proj.w) f += 2.0 * double(s.value.rows) * double(s.value_proj.in) * double(s.value_proj.out);
  return f;
}


// Append: a kTokens prefill of every layer per iteration (fp32 X read; sealed, nothing in fp16).
template <class Codec>
void BM_Append(benchmark::State& state) {
  xq::Cache<Codec> cache(config(), make_codec<Codec>());
  std::size_t bytes = 0;
  for (auto _ : state) {
    const auto seq = cache.add_sequence();
    prefill(cache, seq);
    cache.seal(seq);
    bytes = cache.allocated_bytes();
    cache.remove_sequence(seq);
  }
  const double x_bytes = double(kLayers) * kTokens * kD * sizeof(float);
  state.counters["X_GB/s"] = benchmark::Counter(x_bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["cache_B/tok"] = double(bytes) / kTokens;
  state.counters["vs_fp16_kv"] = double(bytes) / (double(kLayers) * kTokens * 2 * kDkv * 2);
}

// Remat: K (post-RoPE) and V of all kTokens tokens of every layer, layers in order.
template <class Codec>
void BM_Remat(benchmark::State& state) {
  xq::Cache<Codec> cache(config(), make_codec<Codec>());
  const auto seq = cache.add_sequence();
  prefill(cache, seq);
  cache.seal(seq);
  const xq::Rope rope(kHeadDim, kTokens);
  std::vector<float> K(static_cast<std::size_t>(kTokens * kDkv)), V(K.size());
  double flops = 0;
  for (int l = 0; l < kLayers; ++l) flops += remat_flops(cache.sources(seq, l, 0, kTokens, data().weights[l]));
  for (auto _ : state) {
    for (int l = 0; l < kLayers; ++l) {
      xq::materialize(cache, seq, l, 0, kTokens, data().weights[l], rope, K.data(), V.data());
      benchmark::DoNotOptimize(K.data());
      benchmark::DoNotOptimize(V.data());
    }
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["KV_GB/s"] = benchmark::Counter(double(kLayers) * kTokens * 2 * kDkv * sizeof(float) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// XQuant-CL vs per-layer XQuant at the same bits, same data, same run: the ratio of their
// append and remat times (> 1: what the deltas and the accumulator cost), and the accumulator's
// working memory next to the cache.
void BM_CrossLayerOverhead(benchmark::State& state) {
  xq::Cache<XQ2> xq_cache(config(), make_codec<XQ2>());
  xq::Cache<CL2> cl_cache(config(), make_codec<CL2>());
  const xq::Rope rope(kHeadDim, kTokens);
  std::vector<float> K(static_cast<std::size_t>(kTokens * kDkv)), V(K.size());
  auto append_time = [&](auto& cache) {
    return xqbench::median_seconds([&] {
      const auto seq = cache.add_sequence();
      prefill(cache, seq);
      cache.remove_sequence(seq);
    });
  };
  auto remat_time = [&](auto& cache, xq::SequenceId seq) {
    return xqbench::median_seconds([&] {
      for (int l = 0; l < kLayers; ++l) {
        xq::materialize(cache, seq, l, 0, kTokens, data().weights[l], rope, K.data(), V.data());
        benchmark::DoNotOptimize(K.data());
      }
    });
  };
  double append_ratio = 0, remat_ratio = 0, xq_remat = 0, cl_remat = 0;
  std::size_t working = 0;
  for (auto _ : state) {
    append_ratio = append_time(cl_cache) / append_time(xq_cache);
    const auto sx = xq_cache.add_sequence(), sc = cl_cache.add_sequence();
    prefill(xq_cache, sx);
    prefill(cl_cache, sc);
    xq_remat = remat_time(xq_cache, sx);
    cl_remat = remat_time(cl_cache, sc);
    remat_ratio = cl_remat / xq_remat;
    working = cl_cache.state().working_bytes();
    xq_cache.remove_sequence(sx);
    cl_cache.remove_sequence(sc);
  }
  state.counters["append_CL/XQ"] = append_ratio;
  state.counters["remat_CL/XQ"] = remat_ratio;
  state.counters["remat_XQ_ms"] = xq_remat * 1e3;
  state.counters["remat_CL_ms"] = cl_remat * 1e3;
  state.counters["CL_work_MB"] = double(working) * 1e-6;
}

}  // namespace

BENCHMARK_TEMPLATE(BM_Append, XQ2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Append, CL2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Append, CL3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Append, LatentCL2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Append, Latent3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Append, Kivi3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, XQ2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, CL2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, CL3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, LatentCL2)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, Latent3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK_TEMPLATE(BM_Remat, Kivi3)->Unit(benchmark::kMillisecond)->MeasureProcessCPUTime();
BENCHMARK(BM_CrossLayerOverhead)->Unit(benchmark::kMillisecond)->Iterations(1)->MeasureProcessCPUTime();

BENCHMARK_MAIN();
