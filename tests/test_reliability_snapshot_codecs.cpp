// Snapshot/restore and fork for the codecs beyond PerLayer (docs/RELIABILITY.md): XQuant-CL
// (plain and latent), latent SVD (with and without fp16 key channels) and KIVI*. A restored or
// forked sequence is bit-identical to the original, also for every later append (the codec's
// windows and accumulators come back exactly, not only its streams); a snapshot of another
// configuration (an option, a quantizer, other weights) raises ConfigError, damaged bytes raise
// SnapshotError, and neither restores anything; a failed append leaves the snapshot unchanged.

#include <xquant/xquant.hpp>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include "codec_support.hpp"
#include "reliability_support.hpp"

namespace xq = xquant;
using xq::index_t;
using xqtest::error_of;
using xqtest::same_bits;

namespace {

constexpr int kLayers = 5;
constexpr index_t kWidth = 256, kHeads = 4, kKvHeads = 2, kHeadDim = 32, kBlock = 16;
// (A width of 256 matters: below it, the latent GEMMs happen to round a rebuilt running accumulator
// like one extended token by token, and a snapshot that dropped it would go unnoticed.)

template <int B>
using Tok = xq::quant::Uniform<B, xq::Axis::Token>;
template <int B>
using Chan = xq::quant::Uniform<B, xq::Axis::Channel>;

template <class C>
struct is_cross_layer : std::false_type {};
template <class D, class B, bool L>
struct is_cross_layer<xq::codec::CrossLayerCodec<D, B, L>> : std::true_type {};
template <class C>
struct is_latent : std::false_type {};
// Codecs whose description fingerprints SVD bases: Latent and LatentCrossLayer.
template <class C>
struct has_svd_bases : std::false_type {};
template <class D, class B>
struct has_svd_bases<xq::codec::CrossLayerCodec<D, B, true>> : std::true_type {};
template <class K, class V>
struct has_svd_bases<xq::codec::Latent<K, V>> : std::true_type {};
template <class K, class V>
struct is_latent<xq::codec::Latent<K, V>> : std::true_type {};

// The codecs under test, each with options that exercise its windows and groups.
struct CL2 {  // 2-bit deltas, windowed
  using Codec = xq::codec::CrossLayer<Tok<2>>;
  static Codec make(const xqtest::Model&) {
    Codec c;
    c.base_layers = 2;
    c.group = 16;
    c.window = 5;
    return c;
  }
};
struct CL3 {  // 3-bit deltas over an 8-bit base, no window (every token committed on arrival)
  using Codec = xq::codec::CrossLayer<Tok<3>, Tok<8>>;
  static Codec make(const xqtest::Model&) {
    Codec c;
    c.base_layers = 1;
    c.group = 32;
    c.window = 0;
    return c;
  }
};
struct CL4 {  // 4-bit deltas, one base layer, a full block of window
  using Codec = xq::codec::CrossLayer<Tok<4>>;
  static Codec make(const xqtest::Model&) {
    Codec c;
    c.base_layers = 3;
    c.group = 16;
    c.window = kBlock;
    return c;
  }
};
struct LatentCL {  // GQA-CL: deltas in the SVD basis of [Wk|Wv] (128 wide)
  using Codec = xq::codec::LatentCrossLayer<Tok<3>>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.base_layers = 2;
    c.group = 16;
    c.window = 4;
    c.weights = m.weights();
    return c;
  }
};
struct LatentPlain {  // every channel of X·Uk quantized
  using Codec = xq::codec::Latent<Chan<3>, Tok<3>>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.weights = m.weights();
    c.key_group = 8;
    c.value_group = 8;
    c.window = 6;
    return c;
  }
};
struct LatentOutliers {  // two leading channels of X·Uk in fp16
  using Codec = xq::codec::Latent<Chan<2>, Tok<4>>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.weights = m.weights();
    c.key_group = 16;
    c.value_group = 16;
    c.window = 0;
    c.fp16_key_channels = 2;
    return c;
  }
};
struct LatentLists {  // explicit fp16 channels per layer; layer 2 keeps none (no outlier stream)
  using Codec = xq::codec::Latent<Chan<4>, Tok<2>>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.weights = m.weights();
    c.key_group = 16;
    c.value_group = 8;
    c.window = 3;
    c.fp16_key_channel_lists = {{5, 0}, {1}, {}, {63, 3, 17}, {2}};
    return c;
  }
};
struct Kivi2 {
  using Codec = xq::codec::KiviStar<2>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.weights = m.weights();
    c.key_group = 16;
    c.value_group = 8;
    c.window = 8;
    return c;
  }
};
struct Kivi4 {  // no value window: values quantized on arrival
  using Codec = xq::codec::KiviStar<4>;
  static Codec make(const xqtest::Model& m) {
    Codec c;
    c.weights = m.weights();
    c.key_group = 8;
    c.value_group = 16;
    c.window = 0;
    return c;
  }
};

xqtest::Model model(std::mt19937_64& g) { return xqtest::make_model(g, kLayers, kWidth, kHeads, kKvHeads, kHeadDim); }

// X of every layer for n tokens.
using Tokens = std::vector<std::vector<float>>;
Tokens tokens(std::mt19937_64& g, index_t n) { return xqtest::residual_stream(g, kLayers, n, kWidth); }

// Appends the same tokens to layers [l0, l1) (all layers by default), in layer order.
template <class CacheT>
void feed(CacheT& c, xq::SequenceId s, const Tokens& x, int l0 = 0, int l1 = kLayers) {
  const index_t n = static_cast<index_t>(x[0].size()) / kWidth;
  for (int l = l0; l < l1; ++l) c.append(s, l, x[l].data(), n);
}


// What the codec itself reconstructs for every token of a layer: X̂ (XQuant-CL), the dequantized
// latents (latent SVD) or the dequantized pre-RoPE K and V (KIVI).
template <class CacheT>
std::vector<float> reconstructed(CacheT& c, xq::SequenceId s, int layer) {
  using Codec = typename CacheT::codec_type;
  const index_t n = c.length(s, layer);
  if constexpr (is_cross_layer<Codec>::value) {
    auto out = xqtest::poisoned(static_cast<std::size_t>(n * kWidth));
    c.state().dequantize(s, layer, 0, n, out.data(), kWidth);
    return out;
  } else if constexpr (is_latent<Codec>::value) {
    const index_t rk = c.state().key_factors(layer).rank, rv = c.state().value_factors(layer).rank;
    auto out = xqtest::poisoned(static_cast<std::size_t>(n * (rk + rv)));
    c.state().dequantize_latent(s, layer, 0, n, out.data(), rk, out.data() + n * rk, rv);
    return out;
  } else {
    const index_t dkv = kKvHeads * kHeadDim;
    auto out = xqtest::poisoned(static_cast<std::size_t>(2 * n * dkv));
    c.state().dequantize_kv(s, layer, 0, n, out.data(), dkv, out.data() + n * dkv, dkv);
    return out;
  }
}

// Everything a reader of the sequence sees, layer by layer: the codec's reconstruction, the
// materialized K and V, and attention outputs of two queries (materialized, and absorbed where
// the codec's values are linear). Reads may update the codec's working state (XQuant-CL's running
// accumulator), so two sequences are compared by calling this on both, in the same order. The
// last layer comes first: a decode step that reads it extends the accumulator left there.
template <class CacheT>
std::vector<float> observe(CacheT& c, xq::SequenceId s, const xqtest::Model& m, const std::vector<float>& q) {
  const xq::Rope rope(kHeadDim, 4096);
  const auto w = m.weights();
  const index_t nq = 2, dkv = m.dkv();
  std::vector<float> all;
  for (int l : {kLayers - 1, 0, 1, 2, 3, 4}) {
    const auto r = reconstructed(c, s, l);
    all.insert(all.end(), r.begin(), r.end());
    const index_t n = c.length(s, l);
    auto K = xqtest::poisoned(static_cast<std::size_t>(n * dkv)), V = K;
    xq::materialize(c, s, l, 0, n, w[l], rope, K.data(), V.data());
    all.insert(all.end(), K.begin(), K.end());
    all.insert(all.end(), V.begin(), V.end());
    if (n < nq) continue;
    auto out = xqtest::poisoned(static_cast<std::size_t>(nq * kHeads * kHeadDim));
    xq::attend<xq::remat::Materialize>(c, s, l, q.data(), nq, w[l], rope, out.data());
    all.insert(all.end(), out.begin(), out.end());
    if constexpr (CacheT::codec_type::values_are_linear) {
      xq::attend<xq::remat::AbsorbValues>(c, s, l, q.data(), nq, w[l], rope, out.data());
      all.insert(all.end(), out.begin(), out.end());
    }
  }
  REQUIRE(xqtest::all_finite(all));
  return all;
}

// Two sequences are the same: snapshot bytes, then everything a reader sees, then the bytes again.
template <class CacheA, class CacheB>
void require_same(CacheA& a, xq::SequenceId sa, CacheB& b, xq::SequenceId sb, const xqtest::Model& m,
                  const std::vector<float>& q) {
  for (int l = 0; l < kLayers; ++l) REQUIRE(a.length(sa, l) == b.length(sb, l));
  REQUIRE(a.snapshot(sa) == b.snapshot(sb));
  REQUIRE(same_bits(observe(a, sa, m, q), observe(b, sb, m, q)));
  REQUIRE(a.snapshot(sa) == b.snapshot(sb));
}


// A cache of codec P holding one sequence caught mid-decode-step: `prefill` tokens in every layer,
// every layer read once (XQuant-CL's running accumulator), then one more token in layers
// [0, partial) only (XQuant-CL's chunk accumulator).
template <class P>
struct MidStep {
  xqtest::Model m;
  std::vector<float> q;
  xq::Cache<typename P::Codec> cache;
  xq::SequenceId s;
  MidStep(std::mt19937_64& g, index_t prefill, int partial)
      : m(model(g)), q(xqtest::randn(g, 2 * kHeads * kHeadDim)), cache(m.config(512, kBlock), P::make(m)),
        s(cache.add_sequence()) {
    feed(cache, s, tokens(g, prefill));
    observe(cache, s, m, q);
    feed(cache, s, tokens(g, 1), 0, partial);
  }
};

void put(std::vector<std::uint8_t>& b, std::size_t at, std::uint64_t v, int width) {
  for (int i = 0; i < width; ++i) b[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
std::uint64_t get(const std::vector<std::uint8_t>& b, std::size_t at, int width) {
  std::uint64_t v = 0;
  for (int i = 0; i < width; ++i) v |= static_cast<std::uint64_t>(b[at + i]) << (8 * i);
  return v;
}
// Recomputes the trailing CRC, so that a crafted payload reaches the payload checks.
void reseal(std::vector<std::uint8_t>& b) {
  put(b, b.size() - 4, xq::snapshot::crc32(b.data(), b.size() - 4), 4);
}

}  // namespace

#define XQ_SNAPSHOT_CODECS CL2, CL3, CL4, LatentCL, LatentPlain, LatentOutliers, LatentLists, Kivi2, Kivi4

TEST_CASE_TEMPLATE("every codec: a restored sequence is bit-identical, also after further appends", P,
                   XQ_SNAPSHOT_CODECS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  const auto m = model(g);
  const auto q = xqtest::randn(g, 2 * kHeads * kHeadDim);
  const xq::Rope rope(kHeadDim, 4096);

  CacheT src(m.config(512, kBlock), P::make(m));
  const auto other = src.add_sequence();  // an interleaved neighbour: blocks are not contiguous
  feed(src, other, tokens(g, 21));
  const auto s = src.add_sequence();
  feed(src, s, tokens(g, std::uniform_int_distribution<index_t>(20, 60)(g)));  // prefill
  observe(src, s, m, q);  // builds XQuant-CL's running accumulator ...
  for (int t = 0; t < 4; ++t) {  // ... then extends it piece by piece while decoding
    feed(src, s, tokens(g, 1));
    auto out = xqtest::poisoned(static_cast<std::size_t>(2 * kHeads * kHeadDim));
    xq::attend<xq::remat::Materialize>(src, s, kLayers - 1, q.data(), 2, m.weights()[kLayers - 1], rope, out.data());
  }
  feed(src, other, tokens(g, 9));
  // Snapshot in the middle of a decode step: the next token has reached layers 0-2 only (so
  // XQuant-CL's layer 3 still needs layer 2's reconstruction of it).
  const auto pending = tokens(g, 1);
  feed(src, s, pending, 0, 3);
  const auto bytes = src.snapshot(s);

  CacheT dst(m.config(1024, kBlock), P::make(m));  // another capacity is fine
  const auto scratch = dst.add_sequence();      // reused blocks hold stale data
  feed(dst, scratch, tokens(g, 70));
  dst.remove_sequence(scratch);
  const auto r = dst.restore(bytes);
  REQUIRE(dst.snapshot(r) == bytes);
  require_same(src, s, dst, r, m, q);

  // The same further tokens to both: the rest of the pending step, decode steps, a chunk.
  feed(src, s, pending, 3, kLayers);
  feed(dst, r, pending, 3, kLayers);
  REQUIRE(src.snapshot(s) == dst.snapshot(r));
  for (index_t n : {1, 1, 13, 1, 1, 1}) {
    const auto x = tokens(g, n);
    feed(src, s, x);
    feed(dst, r, x);
    REQUIRE(src.snapshot(s) == dst.snapshot(r));
  }
  require_same(src, s, dst, r, m, q);
  src.seal(s);
  dst.seal(r);
  require_same(src, s, dst, r, m, q);
  // The neighbour was not disturbed by any of it, and a sealed sequence round-trips too.
  CHECK(src.length(other, 0) == 30);
  const auto sealed = src.snapshot(s);
  const auto r2 = dst.restore(sealed);
  CHECK(dst.snapshot(r2) == sealed);
}

TEST_CASE_TEMPLATE("every codec: forks diverge and each equals a cache fed the same tokens", P, XQ_SNAPSHOT_CODECS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  const auto m = model(g);
  const auto q = xqtest::randn(g, 2 * kHeads * kHeadDim);

  // The same history for the original (forked after it) and for each reference sequence.
  const auto prefill = tokens(g, 37);
  std::vector<Tokens> decode{tokens(g, 1), tokens(g, 1), tokens(g, 1)};
  auto history = [&](CacheT& c, xq::SequenceId s) {
    feed(c, s, prefill);
    observe(c, s, m, q);
    for (const auto& x : decode) feed(c, s, x);
  };
  CacheT c(m.config(1024, kBlock), P::make(m)), ref(m.config(1024, kBlock), P::make(m));
  const auto s = c.add_sequence();
  history(c, s);
  const auto f1 = c.fork(s);
  const auto f2 = c.fork(f1);
  REQUIRE(c.snapshot(f1) == c.snapshot(s));
  REQUIRE(c.snapshot(f2) == c.snapshot(s));

  // Different continuations: decode steps (one also mid-step), a chunk.
  std::vector<std::vector<Tokens>> tails(3);
  for (int k = 0; k < 3; ++k)
    for (index_t n : {index_t{1}, index_t{1 + 9 * k}, index_t{1}}) tails[k].push_back(tokens(g, n));
  const std::vector<xq::SequenceId> ids{s, f1, f2};
  std::vector<xq::SequenceId> refs;
  for (int k = 0; k < 3; ++k) {
    refs.push_back(ref.add_sequence());
    history(ref, refs[k]);
    for (const auto& x : tails[k]) feed(ref, refs[k], x);
  }
  for (int k : {2, 0, 1})  // in a scrambled order
    for (const auto& x : tails[k]) feed(c, ids[k], x);
  for (int k = 0; k < 3; ++k) {
    INFO("branch ", k);
    require_same(c, ids[k], ref, refs[k], m, q);
  }
  CHECK(c.snapshot(s) != c.snapshot(f1));
  CHECK(c.snapshot(f1) != c.snapshot(f2));
  CHECK(!same_bits(reconstructed(c, s, kLayers - 1), reconstructed(c, f1, kLayers - 1)));
  // Dropping the original leaves the forks intact (they own their blocks and state).
  c.remove_sequence(s);
  const auto junk = c.add_sequence();
  feed(c, junk, tokens(g, 50));
  require_same(c, f1, ref, refs[1], m, q);
  require_same(c, f2, ref, refs[2], m, q);
  // Forking mid-step: the fork finishes the step like the original.
  const auto pending = tokens(g, 1);
  feed(c, f1, pending, 0, 2);
  const auto f3 = c.fork(f1);
  feed(c, f1, pending, 2, kLayers);
  feed(c, f3, pending, 2, kLayers);
  require_same(c, f1, c, f3, m, q);
}

namespace {

// A cache of each configuration that a snapshot of P's cache must not restore into.
template <class P, class Rejects>
void other_configurations(const xqtest::Model& m, const xqtest::Model& other_weights, Rejects&& rejects) {
  using Codec = typename P::Codec;
  const auto cfg = m.config(512, kBlock);
  auto edited = [&](auto edit) {
    Codec c = P::make(m);
    edit(c);
    return c;
  };
  rejects(xq::Cache<Codec>(m.config(512, 2 * kBlock), P::make(m)), "block_tokens");
  if constexpr (is_cross_layer<Codec>::value) {
    using D = typename Codec::delta_quantizer;
    using B = typename Codec::base_quantizer;
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.base_layers += 1; })), "base_layers");
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.group = c.group == 16 ? 32 : 16; })), "group");
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.window = c.window == 0 ? 1 : c.window - 1; })), "window");
    using OtherDelta = xq::codec::CrossLayerCodec<Tok<D::bits == 2 ? 3 : 2>, B, Codec::latent>;
    using OtherBase = xq::codec::CrossLayerCodec<D, Tok<B::bits == 4 ? 8 : 4>, Codec::latent>;
    using OtherVariant = xq::codec::CrossLayerCodec<D, B, !Codec::latent>;
    auto as = [&](auto c) {
      const Codec mine = P::make(m);
      c.base_layers = mine.base_layers;
      c.group = mine.group;
      c.window = mine.window;
      if constexpr (decltype(c)::latent) c.weights = m.weights();
      return c;
    };
    rejects(xq::Cache<OtherDelta>(cfg, as(OtherDelta{})), "delta bits");
    rejects(xq::Cache<OtherBase>(cfg, as(OtherBase{})), "base bits");
    rejects(xq::Cache<OtherVariant>(cfg, as(OtherVariant{})), "latent vs plain");
    if constexpr (Codec::latent)
      rejects(xq::Cache<Codec>(cfg, edited([&](Codec& c) { c.weights = other_weights.weights(); })), "weights");
  } else {
    using K = typename Codec::key_quantizer;
    using V = typename Codec::value_quantizer;
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.key_group = c.key_group == 16 ? 8 : 16; })), "key_group");
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.value_group = c.value_group == 16 ? 8 : 16; })),
            "value_group");
    rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) { c.window = c.window == 0 ? 1 : c.window - 1; })), "window");
    constexpr bool latent = is_latent<Codec>::value;
    using OtherKey = std::conditional_t<latent, xq::codec::Latent<Chan<K::bits == 4 ? 3 : 4>, V>,
                                        xq::codec::Kivi<Chan<K::bits == 4 ? 3 : 4>, V>>;
    using OtherValue = std::conditional_t<latent, xq::codec::Latent<K, Tok<V::bits == 4 ? 3 : 4>>,
                                          xq::codec::Kivi<K, Tok<V::bits == 4 ? 3 : 4>>>;
    auto as = [&](auto c) {  // this codec's options in a codec of another type
      const Codec mine = P::make(m);
      c.weights = mine.weights;
      c.key_group = mine.key_group;
      c.value_group = mine.value_group;
      c.window = mine.window;
      if constexpr (latent) {
        c.fp16_key_channels = mine.fp16_key_channels;
        c.fp16_key_channel_lists = mine.fp16_key_channel_lists;
      }
      return c;
    };
    rejects(xq::Cache<OtherKey>(cfg, as(OtherKey{})), "key bits");
    rejects(xq::Cache<OtherValue>(cfg, as(OtherValue{})), "value bits");
    if constexpr (latent) {
      rejects(xq::Cache<Codec>(cfg, edited([&](Codec& c) { c.weights = other_weights.weights(); })), "weights");
      rejects(xq::Cache<Codec>(cfg, edited([](Codec& c) {
                if (c.fp16_key_channel_lists.empty()) c.fp16_key_channels += 1;
                else c.fp16_key_channel_lists[1] = {1, 2};
              })),
              "fp16 key channels");
    } else {
      using HalfKv = xq::codec::Kivi<xq::quant::Fp16, xq::quant::Fp16>;
      rejects(xq::Cache<HalfKv>(cfg, as(HalfKv{})), "fp16 KV cache");
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("every codec: restore into another configuration raises ConfigError and restores nothing", P,
                   XQ_SNAPSHOT_CODECS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Codec = typename P::Codec;
  const auto m = model(g), m2 = model(g);
  xq::Cache<Codec> src(m.config(512, kBlock), P::make(m));
  const auto s = src.add_sequence();
  feed(src, s, tokens(g, 29));
  const auto bytes = src.snapshot(s);
  int rejected = 0;
  other_configurations<P>(m, m2, [&](auto&& cache, const char* what) {
    INFO(what);
    const std::size_t allocated = cache.allocated_bytes();
    const std::string msg = error_of<xq::ConfigError>([&] { cache.restore(bytes); });
    INFO(msg);
    CHECK(msg.find("configured as") != std::string::npos);
    CHECK(cache.allocated_bytes() == allocated);
    CHECK(cache.add_sequence() == 0);  // nothing was left behind
    ++rejected;
  });
  CHECK(rejected >= 5);
  // The same weights at other addresses (a model loaded twice) restore: the fingerprint is of
  // the factors' bytes, not of pointers. The latent descriptions name it.
  const xqtest::Model copy = m;
  xq::Cache<Codec> same(m.config(256, kBlock), P::make(copy));
  const auto r = same.restore(bytes);
  CHECK(same.snapshot(r) == bytes);
  if constexpr (has_svd_bases<Codec>::value)
    CHECK(src.description().find(" svd_bases=") != std::string::npos);
  else
    CHECK(src.description().find("svd") == std::string::npos);
}

TEST_CASE_TEMPLATE("every codec: truncated or corrupted bytes raise SnapshotError and restore nothing", P,
                   XQ_SNAPSHOT_CODECS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  MidStep<P> mid(g, 33, 2);
  const auto& m = mid.m;
  const auto bytes = mid.cache.snapshot(mid.s);

  CacheT dst(m.config(512, kBlock), P::make(m));
  const auto keep = dst.add_sequence();
  feed(dst, keep, tokens(g, 10));
  const auto before = dst.snapshot(keep);
  const std::size_t allocated = dst.allocated_bytes();
  for (std::size_t n = 0; n < bytes.size(); n += (n < 300 ? 1 : 41)) {  // header and description whole, payload sampled
    INFO("truncated to ", n, " of ", bytes.size());
    CHECK_THROWS_AS(dst.restore(bytes.data(), n), xq::SnapshotError);
  }
  std::uniform_int_distribution<std::size_t> at(0, bytes.size() - 1);
  std::uniform_int_distribution<int> bit(0, 7);
  for (int k = 0; k < 200; ++k) {
    auto b = bytes;
    const std::size_t i = at(g);
    b[i] ^= static_cast<std::uint8_t>(1u << bit(g));
    INFO("flipped a bit of byte ", i);
    CHECK_THROWS_AS(dst.restore(b), xq::SnapshotError);
  }
  CHECK(dst.allocated_bytes() == allocated);
  CHECK(dst.snapshot(keep) == before);
  const auto again = dst.add_sequence();
  CHECK(again == keep + 1);  // no half-restored sequence took an id
}

TEST_CASE_TEMPLATE("cross-layer: a crafted record with a valid checksum is checked field by field", P, CL2, LatentCL) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  MidStep<P> mid(g, 30, 3);  // running accumulator: layer 4, all committed tokens; chunk: layer 2, one token
  const auto& m = mid.m;
  auto& src = mid.cache;
  const auto s = mid.s;
  const auto bytes = src.snapshot(s);
  const int b = P::make(m).base_layers;
  const index_t window = P::make(m).window, r = src.state().cached_width();
  // The cross-layer record follows the stream records: find its tag ("XQCL").
  const std::size_t payload = xq::snapshot::kHeaderBytes + src.description().size();
  const char tag[] = {'X', 'Q', 'C', 'L'};
  const auto it = std::search(bytes.begin() + static_cast<std::ptrdiff_t>(payload), bytes.end(), tag, tag + 4);
  REQUIRE(it != bytes.end());
  const std::size_t rec = static_cast<std::size_t>(it - bytes.begin());
  std::vector<std::size_t> layer_at;  // offset of each layer's length field
  std::size_t at = rec + 4;
  for (int l = 0; l < kLayers; ++l) {
    layer_at.push_back(at);
    const index_t waiting = src.length(s, l) - src.state().committed(s, l);
    REQUIRE(waiting == std::min<index_t>(window, src.length(s, l)));
    at += 8 + 1 + static_cast<std::size_t>(waiting * r * 2);
  }
  const std::size_t chunk_at = at;
  REQUIRE(get(bytes, chunk_at, 8) == 3);  // layer 2, stored as layer + 1
  const std::size_t chunk_rows = static_cast<std::size_t>(get(bytes, chunk_at + 16, 8) - get(bytes, chunk_at + 8, 8));
  REQUIRE(chunk_rows == 1);
  const std::size_t run_at = chunk_at + 24 + chunk_rows * kWidth * 4;
  REQUIRE(get(bytes, run_at, 8) == kLayers);
  REQUIRE(bytes.size() == run_at + 16 + static_cast<std::size_t>(src.state().committed(s, kLayers - 1)) * kWidth * 4 + 4);

  CacheT dst(m.config(512, kBlock), P::make(m));
  const std::size_t working = dst.state().working_bytes();
  auto expect = [&](std::size_t offset, std::uint64_t value, int width, const char* needle) {
    auto c = bytes;
    put(c, offset, value, width);
    reseal(c);
    const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(c); });
    INFO(msg);
    CHECK(msg.find(needle) != std::string::npos);
  };
  const auto committed0 = static_cast<std::uint64_t>(src.state().committed(s, 0));
  expect(rec, 0x12345678u, 4, "cross-layer record tag");
  expect(layer_at[0], committed0 + window + 1, 8, "layer length");  // more waiting tokens than the window holds
  expect(layer_at[0], committed0 - 1, 8, "layer length");           // fewer than the stream holds
  expect(layer_at[0], ~0ull, 8, "layer length");
  expect(layer_at[0] + 8, 1, 1, "layer sealed flag");                // the stream is not sealed
  expect(layer_at[0] + 8, 2, 1, "flag must be 0 or 1");
  expect(layer_at[0] + 9, 0x7c00, 2, "not finite");                  // a waiting value := +Inf
  expect(chunk_at, kLayers + 1, 8, "chunk accumulator layer");
  if (b > 1) expect(chunk_at, static_cast<std::uint64_t>(b - 1), 8, "below the seed layer");
  expect(chunk_at + 16, get(bytes, chunk_at + 16, 8) + 1, 8, "chunk accumulator end");
  expect(chunk_at + 8, get(bytes, chunk_at + 16, 8), 8, "holds no tokens");
  expect(chunk_at + 24, 0x7fc00000u, 4, "not finite");               // an accumulator value := NaN
  expect(run_at + 8, get(bytes, run_at + 8, 8) + 1, 8, "running accumulator end");
  expect(run_at, 0, 8, "running accumulator end");                   // none, but rows follow
  expect(run_at + 16 + 4 * 7, 0xff800000u, 4, "not finite");
  {  // a sealed sequence whose record says layer 0 is not (nothing waits in its window)
    const auto s2 = src.add_sequence();
    feed(src, s2, tokens(g, 20));
    src.seal(s2);
    auto c = src.snapshot(s2);
    const auto t = std::search(c.begin() + static_cast<std::ptrdiff_t>(payload), c.end(), tag, tag + 4);
    REQUIRE(t != c.end());
    const std::size_t flag = static_cast<std::size_t>(t - c.begin()) + 4 + 8;
    REQUIRE(c[flag] == 1);
    c[flag] = 0;
    reseal(c);
    const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(c); });
    INFO(msg);
    CHECK(msg.find("layer sealed flag") != std::string::npos);
  }
  {  // one byte too many at the end
    auto c = bytes;
    c.insert(c.end() - 4, 0);
    put(c, 24, c.size() - 4 - payload, 8);
    reseal(c);
    const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(c); });
    CHECK(msg.find("bytes left after the last record") != std::string::npos);
  }
  CHECK(dst.state().working_bytes() == working);  // closing the half-restored sequence freed its accumulators
  CHECK(dst.add_sequence() == 0);
}

namespace {

// A token of X (d wide) whose projections onto the key side fit fp16 but one value channel does
// not: the failure comes from the value stream, after the key (and fp16 channel) streams were
// checked. Returned as X for layer `layer` only.
template <class CacheT>
std::vector<float> value_overflow_token(const CacheT& c, const xqtest::Model& m, int layer) {
  using Codec = typename CacheT::codec_type;
  const index_t d = kWidth;
  std::vector<float> x(static_cast<std::size_t>(d));
  std::vector<const float*> key_rows;  // rows whose dot product with x lands on the key side
  index_t key_count = 0;
  if constexpr (is_latent<Codec>::value) {
    // X = c·u with u a row of Uvᵀ (unit length): X·Uv has c in one channel, X·Uk = c·(Ukᵀu).
    const auto& v = c.state().value_factors(layer);
    const auto& k = c.state().key_factors(layer);
    index_t best = 0;
    double best_coef = 2;
    for (index_t i = 0; i < v.rank; ++i) {
      double worst = 0;
      for (index_t j = 0; j < k.rank; ++j) {
        double dot = 0;
        for (index_t e = 0; e < d; ++e) dot += static_cast<double>(v.basis_t[i * d + e]) * k.basis_t[j * d + e];
        worst = std::max(worst, std::abs(dot));
      }
      if (worst < best_coef) best_coef = worst, best = i;
    }
    for (index_t e = 0; e < d; ++e) x[e] = 70000.0f * v.basis_t[best * d + e];
    for (index_t j = 0; j < k.rank; ++j) key_rows.push_back(k.basis_t.data() + j * d);
    key_count = k.rank;
  } else {
    // X = c·wv₀/|wv₀|²: V₀ = c + bv₀, K = c·Wk·wv₀/|wv₀|² + bk.
    const float* wv0 = m.wv[layer].data();
    double n2 = 0;
    for (index_t e = 0; e < d; ++e) n2 += static_cast<double>(wv0[e]) * wv0[e];
    for (index_t e = 0; e < d; ++e) x[e] = static_cast<float>(70000.0 * wv0[e] / n2);
    for (index_t j = 0; j < m.dkv(); ++j) key_rows.push_back(m.wk[layer].data() + j * d);
    key_count = m.dkv();
  }
  for (index_t j = 0; j < key_count; ++j) {  // the key side must fit fp16 for the test to mean anything
    double dot = 0;
    for (index_t e = 0; e < d; ++e) dot += static_cast<double>(key_rows[j][e]) * x[e];
    REQUIRE(std::abs(dot) < 60000.0);
  }
  return x;
}

}  // namespace

TEST_CASE_TEMPLATE("every codec: a failed append leaves the snapshot unchanged", P, XQ_SNAPSHOT_CODECS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using Codec = typename P::Codec;
  using CacheT = xq::Cache<Codec>;
  const auto m = model(g);
  const auto q = xqtest::randn(g, 2 * kHeads * kHeadDim);
  // 4 blocks of 16 tokens per stream; a reference cache sees the same tokens but no failures.
  CacheT c(m.config(64, kBlock), P::make(m)), ref(m.config(64, kBlock), P::make(m));
  const auto s = c.add_sequence(), rs = ref.add_sequence();
  const auto x0 = tokens(g, 40);
  feed(c, s, x0);
  feed(ref, rs, x0);
  observe(c, s, m, q);
  observe(ref, rs, m, q);
  const auto before = c.snapshot(s);
  const std::size_t allocated = c.allocated_bytes();
  auto unchanged = [&] {
    CHECK(c.snapshot(s) == before);
    CHECK(c.allocated_bytes() == allocated);
  };

  const auto big = tokens(g, 45);  // 85 tokens need at least 5 blocks per stream (69 committed)
  for (int l = 0; l < kLayers; ++l) {
    CAPTURE(l);
    if (l == 0 || !is_cross_layer<Codec>::value) CHECK_THROWS_AS(c.append(s, l, big[l].data(), 45), xq::CapacityError);
    else CHECK_THROWS_AS(c.append(s, l, big[l].data(), 45), xq::Error);  // XQuant-CL: layer l−1 did not take them
    unchanged();
  }
  if constexpr (is_cross_layer<Codec>::value) {
    // Values whose fp16 window slots, or whose group's fp16 zero, would overflow (also in the
    // latent basis).
    auto x = tokens(g, 1);
    std::fill(x[0].begin(), x[0].end(), -1e6f);
    CHECK_THROWS_AS(c.append(s, 0, x[0].data(), 1), xq::ValueError);
    unchanged();
  } else {
    // Midway: the key-side streams would take the token, the value stream would not (fp16 range).
    for (int l = 0; l < kLayers; ++l) {
      CAPTURE(l);
      const auto x = value_overflow_token(c, m, l);
      const std::string msg = error_of<xq::ValueError>([&] { c.append(s, l, x.data(), 1); });
      INFO(msg);
      CHECK(msg.find("fp16") != std::string::npos);
      unchanged();
    }
  }
  // The sequence carries on exactly like the one that never saw a failure.
  const auto x1 = tokens(g, 9);
  feed(c, s, x1);
  feed(ref, rs, x1);
  require_same(c, s, ref, rs, m, q);
  c.seal(s);
  ref.seal(rs);
  const auto sealed = c.snapshot(s);
  const auto x2 = tokens(g, 1);
  for (int l = 0; l < kLayers; ++l) CHECK_THROWS_AS(c.append(s, l, x2[l].data(), 1), xq::CapacityError);
  CHECK(c.snapshot(s) == sealed);
  require_same(c, s, ref, rs, m, q);
  // A fork needs as many blocks again: none left, nothing created.
  const auto before_fork = c.snapshot(s);  // (the reads above moved XQuant-CL's accumulator)
  CHECK_THROWS_AS(c.fork(s), xq::CapacityError);
  CHECK(c.snapshot(s) == before_fork);
  CHECK(c.add_sequence() == s + 1);
}

TEST_CASE_TEMPLATE("latent and KIVI: streams of one layer that disagree raise SnapshotError", P, LatentOutliers, Kivi4) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  const auto m = model(g);
  CacheT src(m.config(512, kBlock), P::make(m));
  const auto s = src.add_sequence();
  feed(src, s, tokens(g, 16));  // whole key groups, no value window: nothing waits anywhere
  auto bytes = src.snapshot(s);
  // Layer 0's second stream record (KIVI: values; latent: the fp16 key channels) says "sealed":
  // a valid record on its own, but its layer's key stream is not sealed.
  const std::size_t payload = xq::snapshot::kHeaderBytes + src.description().size();
  const char tag[] = {'X', 'Q', 'S', 'T'};
  auto it = std::search(bytes.begin() + static_cast<std::ptrdiff_t>(payload), bytes.end(), tag, tag + 4);
  REQUIRE(it != bytes.end());
  it = std::search(it + 4, bytes.end(), tag, tag + 4);
  REQUIRE(it != bytes.end());
  const std::size_t flag = static_cast<std::size_t>(it - bytes.begin()) + 4 + 8 + 8;
  REQUIRE(get(bytes, flag - 16, 8) == 16);  // the record's length field
  REQUIRE(bytes[flag] == 0);
  bytes[flag] = 1;
  reseal(bytes);
  CacheT dst(m.config(512, kBlock), P::make(m));
  const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(bytes); });
  INFO(msg);
  CHECK(msg.find("disagree on length or sealed flag") != std::string::npos);
  CHECK(dst.add_sequence() == 0);
}
