// Builds a 4-bit XQuant cache, appends random X and checks the round trip is close.
#include <xquant/xquant.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  namespace xq = xquant;
  xq::CacheConfig config;
  config.layers = 1;
  config.width = 128;
  config.attention = {2, 2, 64};
  config.capacity_tokens = 256;
  xq::Cache<xq::codec::PerLayer<xq::quant::Uniform<4>>> cache(config);
  const auto seq = cache.add_sequence();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(16 * 128), back(x.size());
  for (float& v : x) v = normal(rng);
  cache.append(seq, 0, x.data(), 16);
  cache.state().dequantize(seq, 0, 0, 16, back.data(), 128);
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    err += (x[i] - back[i]) * (x[i] - back[i]);
    ref += x[i] * x[i];
  }
  const double rel = std::sqrt(err / ref);
  std::printf("installed xquant: 4-bit round trip relative error %.4f, %zu bytes\n", rel, cache.allocated_bytes());
  return rel < 0.15 ? 0 : 1;  // 4-bit, groups of 128 of N(0,1): about 0.08
}
