// The policy for bad activations and full caches (docs/RELIABILITY.md): NaN/Inf rejected with a
// ValueError naming token and channel; values or groups outside fp16 rejected with ValueError;
// appending past capacity or to a sealed sequence raises CapacityError; and in every case the
// failed append leaves the cache bit-identical (lengths, snapshot bytes, dequantized content,
// allocated bytes, and what later appends produce).

#include <xquant/xquant.hpp>

#include <cstring>
#include <limits>
#include <string>

#include "reliability_support.hpp"

namespace xq = xquant;
using namespace xqtest;  // storage-path policies and helpers (reliability_support.hpp)

namespace {

constexpr int kLayers = 2;
constexpr xq::index_t kWidth = 64;

xq::CacheConfig config(xq::index_t capacity = 256) {
  xq::CacheConfig c;
  c.layers = kLayers;
  c.width = kWidth;
  c.attention = {4, 2, 16};
  c.capacity_tokens = capacity;
  c.block_tokens = 32;
  return c;
}

// Everything observable about a cache's sequence, to compare before and after a failed call.
template <class CacheT>
struct Observed {
  std::vector<xq::index_t> lengths;
  std::vector<std::vector<float>> values;
  std::vector<std::uint8_t> snapshot;
  std::size_t allocated = 0;
  Observed(const CacheT& c, xq::SequenceId s) : snapshot(c.snapshot(s)), allocated(c.allocated_bytes()) {
    for (int l = 0; l < kLayers; ++l) {
      lengths.push_back(c.length(s, l));
      values.push_back(dequantized(c, s, l));
    }
  }
  void require_same(const Observed& o) const {
    REQUIRE(lengths == o.lengths);
    REQUIRE(allocated == o.allocated);
    REQUIRE(snapshot == o.snapshot);
    for (int l = 0; l < kLayers; ++l) {
      REQUIRE(values[l].size() == o.values[l].size());
      REQUIRE(std::memcmp(values[l].data(), o.values[l].data(), values[l].size() * sizeof(float)) == 0);
    }
  }
};

// Appends the same chunk to every layer.
template <class CacheT>
void append_all(CacheT& c, xq::SequenceId s, const std::vector<float>& x) {
  for (int l = 0; l < kLayers; ++l) c.append(s, l, x.data(), static_cast<xq::index_t>(x.size()) / kWidth);
}

template <class CacheT>
std::string message_of(CacheT& c, xq::SequenceId s, int layer, const std::vector<float>& x) {
  try {
    c.append(s, layer, x.data(), static_cast<xq::index_t>(x.size()) / kWidth);
  } catch (const xq::ValueError& e) {
    return e.what();
  }
  return "no ValueError";
}

// Fills a cache the same way as a twin that never saw the failed call; returns both seq ids.
template <class P>
struct Twins {
  using CacheT = xq::Cache<typename P::Codec>;
  CacheT a{config(), P::codec()}, b{config(), P::codec()};
  xq::SequenceId sa, sb;
  Twins(std::mt19937_64& g, xq::index_t tokens) {
    // An extra sequence that grows and shrinks first, so the pool has a free list to disturb.
    for (CacheT* c : {&a, &b}) {
      const auto tmp = c->add_sequence();
      append_all(*c, tmp, xqtest::activations(g, 40, kWidth));
      c->remove_sequence(tmp);
    }
    sa = a.add_sequence();
    sb = b.add_sequence();
    const auto x = xqtest::activations(g, static_cast<std::size_t>(tokens), kWidth);
    append_all(a, sa, x);
    append_all(b, sb, x);
  }
  // After a failed call on `a`, both must still behave the same on a further append.
  void require_same_future(std::mt19937_64& g) {
    const auto more = xqtest::activations(g, 37, kWidth);
    append_all(a, sa, more);
    append_all(b, sb, more);
    Observed<CacheT>(a, sa).require_same(Observed<CacheT>(b, sb));
  }
};

}  // namespace

TEST_CASE_TEMPLATE("NaN and Inf are rejected, naming token and channel, and the cache is unchanged", P, TokenDirect,
                   TokenWindow, ChannelGroups, SymmetricWindow, Half, Single) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  Twins<P> t(g, 45);
  const Observed<typename Twins<P>::CacheT> before(t.a, t.sa);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    auto x = xqtest::activations(g, 7, kWidth);
    x[5 * kWidth + 17] = bad;
    const std::string msg = message_of(t.a, t.sa, 1, x);
    INFO(msg);
    CHECK(msg.find("token 5") != std::string::npos);
    CHECK(msg.find("channel 17") != std::string::npos);
    CHECK(msg.find("finite") != std::string::npos);
    Observed<typename Twins<P>::CacheT>(t.a, t.sa).require_same(before);
  }
  t.require_same_future(g);
}

TEST_CASE_TEMPLATE("values outside fp16 are rejected with ValueError and the cache is unchanged", P, TokenDirect,
                   TokenWindow, ChannelGroups, SymmetricWindow, Half) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  Twins<P> t(g, 45);
  const Observed<typename Twins<P>::CacheT> before(t.a, t.sa);
  // A finite float too large for fp16, in the last token of a chunk long enough that earlier
  // tokens would already have been stored (and blocks taken) by a non-atomic append.
  auto x = xqtest::activations(g, 40, kWidth);
  x[39 * kWidth + 3] = -1e30f;
  CHECK_THROWS_AS(t.a.append(t.sa, 0, x.data(), 40), xq::ValueError);
  Observed<typename Twins<P>::CacheT>(t.a, t.sa).require_same(before);
  t.require_same_future(g);
}

TEST_CASE("a per-token group whose scale does not fit fp16 is rejected and the cache is unchanged") {
  // Without a window, per-token groups are quantized from the floats themselves: each value may be
  // finite and still give a zero point outside fp16.
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  Twins<TokenDirect> t(g, 20);
  const Observed<Twins<TokenDirect>::CacheT> before(t.a, t.sa);
  auto x = xqtest::activations(g, 50, kWidth);  // 50 tokens: needs a new block beyond the 20
  x[49 * kWidth + 40] = 1e9f;
  CHECK_THROWS_AS(t.a.append(t.sa, 1, x.data(), 50), xq::ValueError);
  Observed<Twins<TokenDirect>::CacheT>(t.a, t.sa).require_same(before);
  t.require_same_future(g);
}

TEST_CASE_TEMPLATE("appending past capacity raises CapacityError and leaves the cache unchanged", P, TokenDirect,
                   TokenWindow, ChannelGroups, Half) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  Twins<P> t(g, 100);  // 4 of the 8 blocks of 32 tokens
  const auto other = t.a.add_sequence();
  append_all(t.a, other, xqtest::activations(g, 90, kWidth));  // 3 more: one block left
  const Observed<typename Twins<P>::CacheT> before(t.a, t.sa);
  const auto x = xqtest::activations(g, 70, kWidth);  // would need 2 more blocks
  try {
    t.a.append(t.sa, 0, x.data(), 70);
    FAIL("no CapacityError");
  } catch (const xq::CapacityError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("only 1 are free") != std::string::npos);
  }
  Observed<typename Twins<P>::CacheT>(t.a, t.sa).require_same(before);
  // Exactly the free room still fits (28 tokens to the end of block 4, 32 in the free one).
  t.a.append(t.sa, 0, x.data(), 60);
  CHECK(t.a.length(t.sa, 0) == 160);
  t.a.remove_sequence(other);
}

TEST_CASE_TEMPLATE("a sealed sequence rejects appends with CapacityError and stays unchanged", P, TokenWindow,
                   ChannelGroups, Single) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  Twins<P> t(g, 21);
  t.a.seal(t.sa);
  const Observed<typename Twins<P>::CacheT> before(t.a, t.sa);
  const auto x = xqtest::activations(g, 1, kWidth);
  for (int l = 0; l < kLayers; ++l) CHECK_THROWS_AS(t.a.append(t.sa, l, x.data(), 1), xq::CapacityError);
  Observed<typename Twins<P>::CacheT>(t.a, t.sa).require_same(before);
}

TEST_CASE_TEMPLATE("the fp16 window keeps every token: chunking and window size do not change the codes", P,
                   TokenWindow, SymmetricWindow, ChannelGroups) {
  // A windowed stream must store exactly what the same quantizer stores without a window for
  // fp16-rounded inputs (per-token groups), or for the same inputs in any chunking (per-channel).
  // Guards against a ring that overwrites the oldest waiting token before it is quantized.
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  auto x = xqtest::activations(g, 150, kWidth);
  for (float& v : x) v = xq::round_to_half(v);
  typename P::Codec reference_codec = P::codec();
  if (P::Codec::quantizer::axis == xq::Axis::Token) reference_codec.window = 0;
  xq::Cache<typename P::Codec> windowed(config(), P::codec()), reference(config(), reference_codec);
  const auto a = windowed.add_sequence(), b = reference.add_sequence();
  std::uniform_int_distribution<int> chunk(1, 9);
  for (xq::index_t t = 0; t < 150;) {
    const xq::index_t n = std::min<xq::index_t>(chunk(g), 150 - t);
    windowed.append(a, 0, x.data() + t * kWidth, n);
    t += n;
  }
  reference.append(b, 0, x.data(), 150);
  windowed.seal(a, 0);
  reference.seal(b, 0);
  const auto va = dequantized(windowed, a, 0), vb = dequantized(reference, b, 0);
  REQUIRE(va.size() == vb.size());
  for (std::size_t i = 0; i < va.size(); ++i) {
    INFO("token ", i / kWidth, " channel ", i % kWidth);
    REQUIRE(va[i] == vb[i]);
  }
}
