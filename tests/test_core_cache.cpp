// The cache container with the XQuant codec: exact byte accounting, windows, chunking
// invariance, several sequences, capacity, and every bad input.
#include <xquant/xquant.hpp>

#include "support.hpp"

using namespace xquant;
using quant::Uniform;
using xqtest::dequantized;

#define XQ_CACHE_QUANTIZERS                                                                                   \
  Uniform<2>, Uniform<3>, Uniform<4>, Uniform<8>, Uniform<4, Axis::Token, Scheme::Symmetric>,                 \
      Uniform<2, Axis::Channel>, Uniform<3, Axis::Channel>, Uniform<4, Axis::Channel>, Uniform<8, Axis::Channel>, \
      quant::Fp16, quant::Fp32

namespace {

CacheConfig small_config(index_t width = 96, index_t capacity = 1024, index_t block = 64) {
  CacheConfig c;
  c.layers = 3;
  c.width = width;
  c.attention = {4, 2, 16};
  c.capacity_tokens = capacity;
  c.block_tokens = block;
  return c;
}

template <class Q>
codec::PerLayer<Q> codec_for(index_t window = 0) {
  codec::PerLayer<Q> c;
  c.group = Q::axis == Axis::Channel ? 32 : 32;
  c.window = window;
  return c;
}

// Independent byte formula for one layer holding n tokens (blocks of B tokens, width w, group G).
template <class Q>
std::size_t expected_layer_bytes(index_t n, index_t w, index_t G, index_t B, index_t window) {
  const index_t blocks = (n + B - 1) / B;
  std::size_t code_row = Q::is_float ? std::size_t(w * Q::bits / 8) : std::size_t((w * Q::bits + 7) / 8);
  std::size_t codes = (code_row * B + 1) / 2 * 2;  // padded to even bytes so fp16 params align
  std::size_t params = 0;
  if constexpr (!Q::is_float) {
    params = Q::axis == Axis::Token ? std::size_t(B * (w / G) * Q::params_per_group * 2)
                                    : std::size_t((B / G) * w * Q::params_per_group * 2);
  }
  const index_t window_tokens = Q::is_float ? 0 : (Q::axis == Axis::Channel ? G : window);
  return std::size_t(blocks) * (codes + params) + std::size_t(window_tokens * w * 2);
}

}  // namespace

TEST_CASE_TEMPLATE("allocated bytes equal the storage formula", Q, XQ_CACHE_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto config = small_config();
  const index_t window = (!Q::is_float && Q::axis == Axis::Token) ? 8 : 0;
  Cache<codec::PerLayer<Q>> cache(config, codec_for<Q>(window));
  CHECK(cache.allocated_bytes() == 0);
  const auto s = cache.add_sequence();
  for (index_t n : {1, 63, 64, 65, 200}) {
    const auto x = xqtest::activations(g, std::size_t(n), std::size_t(config.width));
    for (int l = 0; l < config.layers; ++l) cache.append(s, l, x.data(), n);
  }
  const index_t total = 1 + 63 + 64 + 65 + 200;
  CHECK(cache.length(s) == total);
  CHECK(cache.allocated_bytes() == std::size_t(config.layers) * expected_layer_bytes<Q>(total, config.width, 32, 64, window));
  // Removing a sequence keeps its blocks for reuse; a new sequence takes them before allocating.
  const std::size_t before = cache.allocated_bytes();
  cache.remove_sequence(s);
  const auto s2 = cache.add_sequence();
  CHECK(s2 == s);
  const auto x = xqtest::activations(g, 100, std::size_t(config.width));
  cache.append(s2, 0, x.data(), 100);
  CHECK(cache.allocated_bytes() == before);
}

TEST_CASE_TEMPLATE("codes do not depend on how tokens were chunked into appends", Q, XQ_CACHE_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const auto config = small_config();
  const index_t n = 173, w = config.width;
  const auto x = xqtest::activations(g, std::size_t(n), std::size_t(w));
  const index_t window = (!Q::is_float && Q::axis == Axis::Token) ? 5 : 0;
  Cache<codec::PerLayer<Q>> one(config, codec_for<Q>(window)), step(config, codec_for<Q>(window)),
      random(config, codec_for<Q>(window));
  const auto a = one.add_sequence(), b = step.add_sequence(), c = random.add_sequence();
  one.append(a, 1, x.data(), n);
  for (index_t t = 0; t < n; ++t) step.append(b, 1, x.data() + t * w, 1);
  std::uniform_int_distribution<index_t> len(1, 70);
  for (index_t t = 0; t < n;) {
    const index_t k = std::min(n - t, len(g));
    random.append(c, 1, x.data() + t * w, k);
    t += k;
  }
  const auto ref = dequantized(one, a, 1);
  CHECK(dequantized(step, b, 1) == ref);
  CHECK(dequantized(random, c, 1) == ref);
  CHECK(one.allocated_bytes() == step.allocated_bytes());
}

TEST_CASE("per-channel groups wait in the fp16 window until full; seal quantizes the rest") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Q = Uniform<2, Axis::Channel>;
  const auto config = small_config();
  const index_t w = config.width, n = 75;  // two full groups of 32 and 11 waiting
  const auto x = xqtest::activations(g, std::size_t(n), std::size_t(w));
  Cache<codec::PerLayer<Q>> cache(config, codec_for<Q>());
  const auto s = cache.add_sequence();
  cache.append(s, 0, x.data(), n);
  CHECK(cache.state().stream(0).quantized(s) == 64);
  auto xh = dequantized(cache, s, 0);
  for (index_t i = 64 * w; i < n * w; ++i) REQUIRE(xh[i] == round_to_half(x[i]));  // window: fp16 exact
  double err_q = 0;
  for (index_t i = 0; i < 64 * w; ++i) err_q = std::max(err_q, double(std::fabs(xh[i] - x[i])));
  CHECK(err_q > 1e-3);  // 2-bit: the quantized part really is quantized
  cache.seal(s, 0);
  CHECK(cache.state().stream(0).quantized(s) == n);
  xh = dequantized(cache, s, 0);
  double err_tail = 0;
  for (index_t i = 64 * w; i < n * w; ++i) err_tail = std::max(err_tail, double(std::fabs(xh[i] - x[i])));
  CHECK(err_tail > 1e-3);
  CHECK_THROWS_AS(cache.append(s, 0, x.data(), 1), CapacityError);
}

TEST_CASE("per-token window keeps the newest tokens in fp16") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Q = Uniform<3>;
  const auto config = small_config();
  const index_t w = config.width, n = 50, window = 7;
  const auto x = xqtest::activations(g, std::size_t(n), std::size_t(w));
  Cache<codec::PerLayer<Q>> cache(config, codec_for<Q>(window));
  const auto s = cache.add_sequence();
  cache.append(s, 2, x.data(), n);
  CHECK(cache.state().stream(2).quantized(s) == n - window);
  const auto xh = dequantized(cache, s, 2);
  for (index_t i = (n - window) * w; i < n * w; ++i) REQUIRE(xh[i] == round_to_half(x[i]));
}

TEST_CASE("sequences of different lengths stay independent") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Q = Uniform<4, Axis::Channel>;
  const auto config = small_config();
  const index_t w = config.width;
  Cache<codec::PerLayer<Q>> shared(config, codec_for<Q>());
  std::vector<SequenceId> ids;
  std::vector<std::vector<float>> data;
  const std::vector<index_t> lengths = {5, 130, 64, 33};
  for (index_t n : lengths) {
    ids.push_back(shared.add_sequence());
    data.push_back(xqtest::activations(g, std::size_t(n), std::size_t(w)));
  }
  // Interleave appends of all sequences, 7 tokens at a time.
  for (index_t t = 0; t < 130; t += 7)
    for (std::size_t k = 0; k < ids.size(); ++k)
      if (t < lengths[k]) shared.append(ids[k], 0, data[k].data() + t * w, std::min<index_t>(7, lengths[k] - t));
  for (std::size_t k = 0; k < ids.size(); ++k) {
    Cache<codec::PerLayer<Q>> alone(config, codec_for<Q>());
    const auto s = alone.add_sequence();
    alone.append(s, 0, data[k].data(), lengths[k]);
    CHECK(shared.length(ids[k]) == lengths[k]);
    CHECK(dequantized(shared, ids[k], 0) == dequantized(alone, s, 0));
  }
}

TEST_CASE("appending past capacity raises CapacityError and changes nothing") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Q = Uniform<4>;
  const auto config = small_config(96, 128, 64);  // two blocks per layer
  const auto x = xqtest::activations(g, 129, 96);
  Cache<codec::PerLayer<Q>> cache(config, codec_for<Q>());
  const auto s = cache.add_sequence();
  cache.append(s, 0, x.data(), 100);
  const auto before = dequantized(cache, s, 0);
  const auto bytes = cache.allocated_bytes();
  CHECK_THROWS_AS(cache.append(s, 0, x.data(), 29), CapacityError);
  CHECK_THROWS_WITH(cache.append(s, 0, x.data(), 29), doctest::Contains("cache capacity"));
  CHECK(cache.length(s) == 100);
  CHECK(cache.allocated_bytes() == bytes);
  CHECK(dequantized(cache, s, 0) == before);
  cache.append(s, 0, x.data(), 28);  // exactly full is fine
  CHECK(cache.length(s) == 128);
  const auto other = cache.add_sequence();  // pool is shared: no block left for a second sequence
  CHECK_THROWS_AS(cache.append(other, 0, x.data(), 1), CapacityError);
}

TEST_CASE("bad input raises the documented error, naming the argument") {
  using Q = Uniform<4>;
  auto config = small_config();
  std::vector<float> x(96 * 4, 0.5f);
  x[7] = 1.5f;
  SUBCASE("configuration") {
    using C4 = Cache<codec::PerLayer<Q>>;
    using CC = Cache<codec::PerLayer<Uniform<4, Axis::Channel>>>;
    auto make = [](const CacheConfig& cf, codec::PerLayer<Q> co = {}) { C4 built(cf, co); };
    auto make_channel = [](const CacheConfig& cf, codec::PerLayer<Uniform<4, Axis::Channel>> co) { CC built(cf, co); };
    auto c = config;
    c.layers = 0;
    CHECK_THROWS_WITH_AS(make(c), doctest::Contains("layers"), ConfigError);
    c = config;
    c.attention = {6, 4, 16};
    CHECK_THROWS_WITH_AS(make(c), doctest::Contains("attention.heads"), ConfigError);
    c = config;
    c.attention = {4, 2, 15};
    CHECK_THROWS_WITH_AS(make(c), doctest::Contains("head_dim"), ConfigError);
    codec::PerLayer<Q> bad_group{40, 0};  // 40 does not divide 96
    CHECK_THROWS_WITH_AS(make(config, bad_group), doctest::Contains("group: must divide the width 96"),
                         ConfigError);
    codec::PerLayer<Uniform<4, Axis::Channel>> bad_channel{48, 0};  // 48 does not divide block_tokens 64
    CHECK_THROWS_WITH_AS(make_channel(config, bad_channel),
                         doctest::Contains("group: must divide block_tokens 64"), ConfigError);
    CHECK_THROWS_AS(make(config, codec::PerLayer<Q>{32, 65}), ConfigError);  // window > block
  }
  Cache<codec::PerLayer<Q>> cache(config, codec_for<Q>());
  const auto s = cache.add_sequence();
  SUBCASE("shapes and ids") {
    CHECK_THROWS_WITH_AS(cache.append(s, 3, x.data(), 1), doctest::Contains("layer: must be in [0, 3)"), ShapeError);
    CHECK_THROWS_WITH_AS(cache.append(s, -1, x.data(), 1), doctest::Contains("layer"), ShapeError);
    CHECK_THROWS_WITH_AS(cache.append(s, 0, x.data(), 1, 95), doctest::Contains("ld: row stride"), ShapeError);
    CHECK_THROWS_AS(cache.append(s, 0, nullptr, 1), ShapeError);
    CHECK_THROWS_AS(cache.append(s, 0, x.data(), -1), ShapeError);
    CHECK_THROWS_WITH_AS(cache.append(s + 1, 0, x.data(), 1), doctest::Contains("not an open sequence"), Error);
    std::vector<float> out(96);
    cache.append(s, 0, x.data(), 2);
    CHECK_THROWS_AS(cache.state().dequantize(s, 0, 1, 3, out.data(), 96), ShapeError);
  }
  SUBCASE("non-finite and out-of-range activations") {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()}) {
      auto y = x;
      y[96 + 5] = bad;
      CHECK_THROWS_WITH_AS(cache.append(s, 0, y.data(), 2), doctest::Contains("X: token 1 of the appended chunk, channel 5"),
                           ValueError);
      CHECK(cache.length(s, 0) == 0);
    }
    auto y = x;
    y[3] = -7e4f;  // finite, but the group zero (its minimum) would overflow fp16
    CHECK_THROWS_AS(cache.append(s, 0, y.data(), 1), ValueError);
  }
}
