// Cache snapshot/restore and fork (docs/RELIABILITY.md): a restored sequence is bit-identical
// (bytes, dequantized values, attention outputs, and whatever later appends make of it); bytes
// that are truncated, corrupted, of another version or of another configuration give a clear error
// and leave no sequence behind; forks diverge independently.

#include <xquant/xquant.hpp>

#include <cstring>
#include <string>

#include "reliability_support.hpp"

namespace xq = xquant;
using namespace xqtest;  // storage-path policies and helpers (reliability_support.hpp)

namespace {

constexpr int kLayers = 3;
constexpr xq::index_t kWidth = 64, kHeads = 4, kKvHeads = 2, kHeadDim = 16;

xq::CacheConfig config(xq::index_t capacity = 512, xq::index_t block_tokens = 32) {
  xq::CacheConfig c;
  c.layers = kLayers;
  c.width = kWidth;
  c.attention = {kHeads, kKvHeads, kHeadDim};
  c.capacity_tokens = capacity;
  c.block_tokens = block_tokens;
  return c;
}


// Random model weights for one layer.
struct Weights {
  std::vector<float> wk, wv, bv;
  explicit Weights(std::mt19937_64& g)
      : wk(xqtest::randn(g, kKvHeads * kHeadDim * kWidth, 0.125f)),
        wv(xqtest::randn(g, kKvHeads * kHeadDim * kWidth, 0.125f)),
        bv(xqtest::randn(g, kKvHeads * kHeadDim, 0.1f)) {}
  xq::LayerWeights view() const { return {wk.data(), wv.data(), nullptr, bv.data()}; }
};

// Attention outputs of the last `nq` tokens of every layer, both remat policies.
template <class CacheT>
std::vector<float> attention_outputs(CacheT& c, xq::SequenceId s, const std::vector<Weights>& w,
                                     const std::vector<float>& q, xq::index_t nq) {
  const xq::Rope rope(kHeadDim, 4096);
  std::vector<float> all;
  for (int l = 0; l < kLayers; ++l) {
    auto out = xqtest::poisoned(static_cast<std::size_t>(nq * kHeads * kHeadDim));
    xq::attend<xq::remat::Materialize>(c, s, l, q.data(), nq, w[l].view(), rope, out.data());
    all.insert(all.end(), out.begin(), out.end());
    xq::attend<xq::remat::AbsorbValues>(c, s, l, q.data(), nq, w[l].view(), rope, out.data());
    all.insert(all.end(), out.begin(), out.end());
  }
  REQUIRE(xqtest::all_finite(all));
  return all;
}

// Appends `tokens` random tokens to every layer in random chunks.
template <class CacheT>
void grow(CacheT& c, xq::SequenceId s, std::mt19937_64& g, xq::index_t tokens) {
  std::uniform_int_distribution<int> chunk(1, 40);
  for (xq::index_t t = 0; t < tokens;) {
    const xq::index_t n = std::min<xq::index_t>(chunk(g), tokens - t);
    const auto x = xqtest::activations(g, static_cast<std::size_t>(n), kWidth);
    for (int l = 0; l < kLayers; ++l) c.append(s, l, x.data(), n);
    t += n;
  }
}

template <class CacheT>
void require_same_sequence(const CacheT& a, xq::SequenceId sa, const CacheT& b, xq::SequenceId sb) {
  for (int l = 0; l < kLayers; ++l) {
    INFO("layer ", l);
    REQUIRE(a.length(sa, l) == b.length(sb, l));
    REQUIRE(same_bits(dequantized(a, sa, l), dequantized(b, sb, l)));
  }
  REQUIRE(a.snapshot(sa) == b.snapshot(sb));
}

void put_u32(std::vector<std::uint8_t>& b, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<std::uint8_t>(v >> (8 * i));
}
// Recomputes the trailing CRC, so that a crafted payload reaches the payload checks.
void reseal(std::vector<std::uint8_t>& b) {
  put_u32(b, b.size() - 4, xq::snapshot::crc32(b.data(), b.size() - 4));
}


}  // namespace

TEST_CASE_TEMPLATE("snapshot and restore: bit-identical bytes, values, attention and future appends", P, TokenDirect,
                   TokenWindow, ChannelGroups, SymmetricWindow, Half, Single) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  std::vector<Weights> w;
  for (int l = 0; l < kLayers; ++l) w.emplace_back(g);
  const auto q = xqtest::randn(g, 3 * kHeads * kHeadDim);

  for (const bool sealed : {false, true}) {
    INFO("sealed ", sealed);
    CacheT src(config(), P::codec());
    const auto other = src.add_sequence();  // interleaved neighbour: blocks are not contiguous
    grow(src, other, g, 30);
    const auto s = src.add_sequence();
    std::uniform_int_distribution<int> len(40, 150);
    grow(src, s, g, len(g));
    grow(src, other, g, 20);
    if (sealed) src.seal(s);
    const auto bytes = src.snapshot(s);

    CacheT dst(config(1024), P::codec());  // another capacity is fine
    const auto scratch = dst.add_sequence();  // a reused block holds stale data
    grow(dst, scratch, g, 70);
    dst.remove_sequence(scratch);
    const auto r = dst.restore(bytes);
    require_same_sequence(src, s, dst, r);
    REQUIRE(attention_outputs(src, s, w, q, 3) == attention_outputs(dst, r, w, q, 3));

    if (!sealed) {  // the restored window and lengths carry on exactly as the original's
      const auto x = xqtest::activations(g, 45, kWidth);
      for (int l = 0; l < kLayers; ++l) {
        src.append(s, l, x.data(), 45);
        dst.append(r, l, x.data(), 45);
      }
      require_same_sequence(src, s, dst, r);
      REQUIRE(attention_outputs(src, s, w, q, 3) == attention_outputs(dst, r, w, q, 3));
    } else {
      const auto x = xqtest::activations(g, 1, kWidth);
      CHECK_THROWS_AS(dst.append(r, 0, x.data(), 1), xq::CapacityError);
    }
  }
}

TEST_CASE("snapshot bytes depend only on the sequence's contents, and an empty sequence round-trips") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<TokenWindow::Codec>;
  CacheT a(config(), TokenWindow::codec()), b(config(), TokenWindow::codec());
  const auto e = a.add_sequence();
  const auto empty = a.snapshot(e);
  const auto re = b.restore(empty);
  CHECK(b.length(re, 0) == 0);
  CHECK(b.snapshot(re) == empty);
  b.remove_sequence(re);
  // Same tokens, different histories of the pool (b's blocks are reused and hold other data).
  const auto junk = b.add_sequence();
  grow(b, junk, g, 200);
  b.remove_sequence(junk);
  const auto x = xqtest::activations(g, 77, kWidth);
  const auto sb = b.add_sequence();
  for (int l = 0; l < kLayers; ++l) {
    a.append(e, l, x.data(), 77);
    b.append(sb, l, x.data(), 77);
  }
  CHECK(a.snapshot(e) == b.snapshot(sb));
}

TEST_CASE("restore into a differently configured cache raises ConfigError naming both configurations") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  xq::Cache<TokenWindow::Codec> src(config(), TokenWindow::codec());
  const auto s = src.add_sequence();
  grow(src, s, g, 50);
  const auto bytes = src.snapshot(s);

  auto rejects = [&](auto&& cache, const char* what) {
    INFO(what);
    const std::string msg = error_of<xq::ConfigError>([&] { cache.restore(bytes); });
    INFO(msg);
    CHECK(msg.find("configured as") != std::string::npos);
    CHECK(cache.add_sequence() == 0);  // nothing was left behind
  };
  auto other = [](auto edit) {
    auto c = config();
    edit(c);
    return c;
  };
  rejects(xq::Cache<TokenWindow::Codec>(other([](auto& c) { c.layers = 2; }), TokenWindow::codec()), "layers");
  rejects(xq::Cache<TokenWindow::Codec>(other([](auto& c) { c.width = 128; }), TokenWindow::codec()), "width");
  rejects(xq::Cache<TokenWindow::Codec>(other([](auto& c) { c.attention.kv_heads = 4; }), TokenWindow::codec()),
          "kv_heads");
  rejects(xq::Cache<TokenWindow::Codec>(other([](auto& c) { c.block_tokens = 64; }), TokenWindow::codec()),
          "block_tokens");
  rejects(xq::Cache<TokenWindow::Codec>(config(), {32, 7}), "group");
  rejects(xq::Cache<TokenWindow::Codec>(config(), {16, 6}), "window");
  rejects(xq::Cache<xq::codec::PerLayer<xq::quant::Uniform<3, xq::Axis::Token>>>(config(), {16, 7}), "bits");
  rejects(xq::Cache<xq::codec::PerLayer<xq::quant::Uniform<4, xq::Axis::Token, xq::Scheme::Symmetric>>>(config(),
                                                                                                     {16, 7}),
          "scheme");
  rejects(xq::Cache<xq::codec::PerLayer<xq::quant::Uniform<4, xq::Axis::Channel>>>(config(), {16, 7}), "axis");
  rejects(xq::Cache<xq::codec::PerLayer<xq::quant::Fp16>>(config()), "fp16");
  // The Reference backend stores the same codes: a snapshot moves between backends.
  xq::Cache<TokenWindow::Codec, xq::backend::Reference> ref(config(), TokenWindow::codec());
  const auto r = ref.restore(bytes);
  for (int l = 0; l < kLayers; ++l) CHECK(same_bits(dequantized(ref, r, l), dequantized(src, s, l)));
}

TEST_CASE_TEMPLATE("truncated, corrupted and foreign bytes raise SnapshotError and restore nothing", P, TokenWindow,
                   ChannelGroups, Single) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  CacheT src(config(), P::codec());
  const auto s = src.add_sequence();
  grow(src, s, g, 41);
  const auto bytes = src.snapshot(s);
  CacheT dst(config(), P::codec());
  const auto keep = dst.add_sequence();
  grow(dst, keep, g, 10);
  const auto before = dst.snapshot(keep);
  const std::size_t allocated = dst.allocated_bytes();

  auto expect = [&](const std::vector<std::uint8_t>& b, const char* needle) {
    const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(b.data(), b.size()); });
    INFO(msg);
    CHECK(msg.find(needle) != std::string::npos);
  };
  for (std::size_t n = 0; n < bytes.size(); n += (n < 64 ? 1 : 97)) {  // every header prefix, payload sampled
    INFO("truncated to ", n, " of ", bytes.size());
    expect(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n)), "truncated");
  }
  std::uniform_int_distribution<std::size_t> at(0, bytes.size() - 1);
  std::uniform_int_distribution<int> bit(0, 7);
  for (int k = 0; k < 200; ++k) {  // any flipped bit is caught (by CRC-32, or earlier by a header check)
    auto b = bytes;
    const std::size_t i = k < 32 ? static_cast<std::size_t>(k) : at(g);
    b[i] ^= static_cast<std::uint8_t>(1u << bit(g));
    INFO("flipped a bit of byte ", i);
    CHECK_THROWS_AS(dst.restore(b), xq::SnapshotError);
  }
  {
    auto b = bytes;
    b[0] = 'Y';
    expect(b, "not an xquant cache snapshot");
    b = bytes;
    put_u32(b, 8, 2);
    expect(b, "version 2");
    b = bytes;
    b[b.size() / 2] ^= 0x40;
    expect(b, "checksum mismatch");
    b = bytes;
    b.push_back(0);
    expect(b, "padded");
  }
  const auto again = dst.add_sequence();
  CHECK(again == keep + 1);  // no half-restored sequence took an id
  dst.remove_sequence(again);
  CHECK(dst.snapshot(keep) == before);
  CHECK(dst.allocated_bytes() == allocated);
}

TEST_CASE("a crafted payload with a valid checksum is still checked field by field") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<TokenWindow::Codec>;  // groups of 16, window 7
  CacheT src(config(), TokenWindow::codec());
  const auto s = src.add_sequence();
  grow(src, s, g, 40);  // 33 quantized, 7 waiting in every layer
  const auto bytes = src.snapshot(s);
  const std::size_t payload = xq::snapshot::kHeaderBytes + src.description().size();
  // Layer 0's record: tag (4), length (8), quantized (8), sealed (1), then 33 code rows...
  auto crafted = [&](std::size_t offset, std::uint64_t value, int width) {
    auto b = bytes;
    for (int i = 0; i < width; ++i) b[payload + offset + i] = static_cast<std::uint8_t>(value >> (8 * i));
    reseal(b);
    return b;
  };
  CacheT dst(config(), TokenWindow::codec());
  auto expect = [&](const std::vector<std::uint8_t>& b, const char* needle) {
    const std::string msg = error_of<xq::SnapshotError>([&] { dst.restore(b); });
    INFO(msg);
    CHECK(msg.find(needle) != std::string::npos);
  };
  expect(crafted(0, 0x12345678u, 4), "stream record tag");
  expect(crafted(4, ~0ull, 8), "stream length");                    // huge: rejected before any allocation
  expect(crafted(4, 1ull << 40, 8), "stream length");
  expect(crafted(12, 41, 8), "quantized token count");              // more than the length
  expect(crafted(12, 30, 8), "waiting tokens exceed the window");   // 10 waiting > 7
  expect(crafted(20, 2, 1), "flag must be 0 or 1");
  expect(crafted(20, 1, 1), "sealed stream has no waiting tokens");
  const std::size_t code_bytes = 64 * 4 / 8;
  expect(crafted(21 + 33 * code_bytes, 0x7c00, 2), "not finite");   // first scale := +Inf
  const std::size_t window = 21 + 33 * code_bytes + 33 * (64 / 16) * 2 * 2;
  expect(crafted(window + 6, 0xfe00, 2), "not finite");             // a waiting value := NaN
  {
    auto b = bytes;  // drop the last layer's final byte but keep the header consistent
    b.erase(b.end() - 5);
    for (int i = 0; i < 8; ++i) b[24 + i] = static_cast<std::uint8_t>((b.size() - 4 - payload) >> (8 * i));
    reseal(b);
    expect(b, "truncated");
  }
  {
    auto b = bytes;  // one byte too many after the last layer's record
    b.insert(b.end() - 4, 0);
    for (int i = 0; i < 8; ++i) b[24 + i] = static_cast<std::uint8_t>((b.size() - 4 - payload) >> (8 * i));
    reseal(b);
    expect(b, "bytes left after the last record");
  }
  CHECK(dst.add_sequence() == 0);
  // Capacity: a pool with room for fewer blocks than the snapshot needs.
  CacheT small(config(32), TokenWindow::codec());  // one block of 32; 40 tokens need two
  const std::string msg = error_of<xq::CapacityError>([&] { small.restore(bytes); });
  INFO(msg);
  CHECK(msg.find("restoring 40 tokens") != std::string::npos);
  CHECK(small.add_sequence() == 0);
}

TEST_CASE_TEMPLATE("forks diverge independently", P, TokenWindow, ChannelGroups, Half) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<typename P::Codec>;
  std::vector<Weights> w;
  for (int l = 0; l < kLayers; ++l) w.emplace_back(g);
  const auto q = xqtest::randn(g, 2 * kHeads * kHeadDim);

  // The reference: three independent caches fed the full token histories.
  CacheT c(config(), P::codec()), ref(config(), P::codec());
  const auto prefix = xqtest::activations(g, 53, kWidth);
  const auto s = c.add_sequence();
  for (int l = 0; l < kLayers; ++l) c.append(s, l, prefix.data(), 53);
  const auto f1 = c.fork(s);
  const auto f2 = c.fork(f1);
  require_same_sequence(c, s, c, f1);

  std::vector<xq::SequenceId> ids{s, f1, f2}, refs;
  std::vector<std::vector<float>> tails;
  for (int k = 0; k < 3; ++k) {
    refs.push_back(ref.add_sequence());
    tails.push_back(xqtest::activations(g, static_cast<std::size_t>(5 + 11 * k), kWidth));
    for (int l = 0; l < kLayers; ++l) {
      ref.append(refs[k], l, prefix.data(), 53);
      ref.append(refs[k], l, tails[k].data(), 5 + 11 * k);
    }
  }
  for (int k : {2, 0, 1})  // in a scrambled order
    for (int l = 0; l < kLayers; ++l) c.append(ids[k], l, tails[k].data(), 5 + 11 * k);
  for (int k = 0; k < 3; ++k) {
    INFO("branch ", k);
    require_same_sequence(c, ids[k], ref, refs[k]);
    REQUIRE(attention_outputs(c, ids[k], w, q, 2) == attention_outputs(ref, refs[k], w, q, 2));
  }
  CHECK(c.length(s, 0) == 58);
  CHECK(c.length(f2, 0) == 53 + 27);
  // Dropping the original leaves the forks intact (they own their blocks).
  c.remove_sequence(s);
  const auto junk = c.add_sequence();
  grow(c, junk, g, 100);
  require_same_sequence(c, f1, ref, refs[1]);
  require_same_sequence(c, f2, ref, refs[2]);
}

TEST_CASE("fork past capacity raises CapacityError and creates nothing") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  using CacheT = xq::Cache<ChannelGroups::Codec>;
  CacheT c(config(128), ChannelGroups::codec());  // 4 blocks of 32
  const auto s = c.add_sequence();
  grow(c, s, g, 70);  // 3 blocks
  const auto before = c.snapshot(s);
  const std::string msg = error_of<xq::CapacityError>([&] { c.fork(s); });
  INFO(msg);
  CHECK(msg.find("forking sequence") != std::string::npos);
  CHECK(c.add_sequence() == s + 1);
  CHECK(c.snapshot(s) == before);
  CHECK_THROWS_AS(c.fork(7), xq::Error);
}
