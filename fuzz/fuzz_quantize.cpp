// Fuzz target: quantize/dequantize through the cache with arbitrary shapes, bits, axes, schemes,
// windows, block sizes and values (NaN, ±Inf, denormals, huge ranges), with sequences added,
// sealed, forked, snapshotted and restored along the way.
//
// Oracles: every outcome (success or the exact error type) is predicted independently of the
// library; a failed call leaves the sequence's snapshot unchanged; the Eigen and Reference
// backends store the same bytes (compared through snapshots); every dequantized value is finite and within the quantizer's
// error bound of the value appended; snapshot → restore → snapshot is the identity.

#include <fuzzer/FuzzedDataProvider.h>

#include <xquant/xquant.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

namespace xq = xquant;

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fuzz_quantize: oracle violated: %s\n", what);
  std::abort();
}
#define XQ_CHECK(cond)      \
  do {                      \
    if (!(cond)) die(#cond); \
  } while (0)

enum class Outcome { Ok, Value, Capacity, Shape, Other };

template <class F>
Outcome run(F&& f) {
  try {
    f();
    return Outcome::Ok;
  } catch (const xq::ValueError&) {
    return Outcome::Value;
  } catch (const xq::CapacityError&) {
    return Outcome::Capacity;
  } catch (const xq::ShapeError&) {
    return Outcome::Shape;
  } catch (const xq::Error&) {
    return Outcome::Other;
  }
}

float value(FuzzedDataProvider& in, int mode) {
  switch (mode) {
    case 0: {  // any bit pattern: NaN, Inf, denormals, everything
      const std::uint32_t u = in.ConsumeIntegral<std::uint32_t>();
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case 1:  // small mantissas times a chosen power of two: denormals to huge ranges
      return std::ldexp(static_cast<float>(in.ConsumeIntegral<std::int8_t>()) / 64.0f,
                        in.ConsumeIntegralInRange<int>(-150, 130));
    default: {  // ordinary values with the occasional special one
      const std::uint8_t k = in.ConsumeIntegral<std::uint8_t>();
      if (k < 240) return static_cast<float>(static_cast<std::int8_t>(k)) / 16.0f;
      static const float special[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity(), 1e-45f, -1e-40f, 65504.0f, 65520.0f,
                                      -65519.0f, 1e30f, -std::numeric_limits<float>::max(), 6e-8f, 0.0f, -0.0f,
                                      1e9f, 3e-5f, 70000.0f};
      return special[k - 240];
    }
  }
}

struct Shadow {             // what one sequence of one layer was given
  std::vector<float> x;     // every accepted token, as appended
  bool sealed = false;
};

template <class Q>
struct Harness {
  using Codec = xq::codec::PerLayer<Q>;
  xq::CacheConfig cfg;
  Codec codec;
  xq::Cache<Codec, xq::backend::Eigen> fast;
  xq::Cache<Codec, xq::backend::Reference> ref;
  std::vector<std::vector<Shadow>> seqs;  // [id][layer]; empty: not open
  std::vector<bool> live;

  Harness(const xq::CacheConfig& c, const Codec& k) : cfg(c), codec(k), fast(c, k), ref(c, k) {}

  xq::index_t width() const { return cfg.width; }
  xq::index_t block() const { return cfg.block_tokens; }
  bool windowed() const {
    if constexpr (Q::is_float) return false;
    else return Q::axis == xq::Axis::Channel || codec.window > 0;
  }
  xq::index_t blocks_of(xq::index_t n) const { return (n + block() - 1) / block(); }
  xq::index_t free_blocks(int layer) const {
    xq::index_t used = 0;
    for (std::size_t s = 0; s < seqs.size(); ++s)
      if (live[s]) used += blocks_of(static_cast<xq::index_t>(seqs[s][layer].x.size()) / width());
    return cfg.max_blocks() - used;
  }
  xq::index_t length(std::size_t s, int layer) const {
    return static_cast<xq::index_t>(seqs[s][layer].x.size()) / width();
  }

  void same_snapshot(std::size_t s) const { XQ_CHECK(fast.snapshot(s) == ref.snapshot(s)); }

  std::size_t open_new() {
    const auto a = fast.add_sequence(), b = ref.add_sequence();
    XQ_CHECK(a == b);
    if (a >= seqs.size()) {
      seqs.resize(a + 1);
      live.resize(a + 1, false);
    }
    XQ_CHECK(!live[a]);
    seqs[a].assign(static_cast<std::size_t>(cfg.layers), Shadow{});
    live[a] = true;
    return a;
  }

  // Would appending x to a windowless per-token stream fail in Q::fit?
  bool fit_fails(const std::vector<float>& x, xq::index_t n) const {
    if constexpr (Q::is_float) {
      if constexpr (Q::bits == 16) {
        for (float v : x)
          if (!xq::half_is_finite(xq::float_to_half(v))) return true;
      }
      return false;
    } else {
      const xq::index_t G = codec.group;
      for (xq::index_t t = 0; t < n; ++t)
        for (xq::index_t g = 0; g < width() / G; ++g) {
          float lo = x[t * width() + g * G], hi = lo;
          for (xq::index_t i = 1; i < G; ++i) {
            const float v = x[t * width() + g * G + i];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
          }
          std::uint16_t p[2];
          if (!Q::fit(lo, hi, p)) return true;
        }
      return false;
    }
  }

  void append(std::size_t s, int layer, const std::vector<float>& x, xq::index_t n) {
    Shadow& sh = seqs[s][layer];
    bool finite = true, fits16 = true;
    for (float v : x) {
      finite = finite && std::isfinite(v);
      fits16 = fits16 && xq::half_is_finite(xq::float_to_half(v));
    }
    Outcome want;
    if (!finite) want = Outcome::Value;
    else if (sh.sealed || blocks_of(length(s, layer) + n) - blocks_of(length(s, layer)) > free_blocks(layer))
      want = Outcome::Capacity;
    else if (windowed() ? !fits16 : fit_fails(x, n)) want = Outcome::Value;
    else want = Outcome::Ok;
    const auto before = fast.snapshot(s);
    const Outcome a = run([&] { fast.append(s, layer, x.data(), n); });
    const Outcome b = run([&] { ref.append(s, layer, x.data(), n); });
    XQ_CHECK(a == want);
    XQ_CHECK(b == want);
    if (want == Outcome::Ok) sh.x.insert(sh.x.end(), x.begin(), x.end());
    else XQ_CHECK(fast.snapshot(s) == before);
    XQ_CHECK(fast.length(s, layer) == length(s, layer));
    same_snapshot(s);
  }

  // Every dequantized value finite and within the quantizer's bound of the appended value.
  void check_values(std::size_t s) const {
    for (int l = 0; l < cfg.layers; ++l) {
      const Shadow& sh = seqs[s][l];
      const xq::index_t n = length(s, l), d = width();
      std::vector<float> a(static_cast<std::size_t>(n * d), std::numeric_limits<float>::quiet_NaN());
      fast.state().dequantize(s, l, 0, n, a.data(), d);  // (the Reference backend's bytes are the same)
      for (xq::index_t t = 0; t < n; ++t)
        for (xq::index_t j = 0; j < d; ++j) {
          const std::size_t i = static_cast<std::size_t>(t * d + j);
          XQ_CHECK(std::isfinite(a[i]));
          XQ_CHECK(std::fabs(static_cast<double>(a[i]) - sh.x[i]) <= bound(sh, n, t, j));
        }
    }
  }

  double bound(const Shadow& sh, xq::index_t n, xq::index_t t, xq::index_t j) const {
    const double x = sh.x[static_cast<std::size_t>(t * width() + j)];
    const double e16 = 1.0 / 2048, tiny = std::ldexp(1.0, -25);
    const double rounding = std::fabs(x) * e16 + tiny;  // through the fp16 window
    if constexpr (Q::is_float) {
      return Q::bits == 32 ? 0.0 : rounding;
    } else {
      // The group's range, over the values as the quantizer saw them (fp16-rounded if windowed).
      xq::index_t t0 = t, t1 = t + 1, j0 = j, j1 = j + 1;
      if constexpr (Q::axis == xq::Axis::Token) {
        j0 = j / codec.group * codec.group;
        j1 = j0 + codec.group;
      } else {
        t0 = t / codec.group * codec.group;
        t1 = std::min(t0 + codec.group, n);
      }
      double lo = INFINITY, hi = -INFINITY;
      for (xq::index_t u = t0; u < t1; ++u)
        for (xq::index_t k = j0; k < j1; ++k) {
          float v = sh.x[static_cast<std::size_t>(u * width() + k)];
          if (windowed()) v = xq::round_to_half(v);
          lo = std::min(lo, static_cast<double>(v));
          hi = std::max(hi, static_cast<double>(v));
        }
      const double M = Q::max_code, slop = (std::fabs(lo) + std::fabs(hi)) * 1e-6;
      double b;
      if constexpr (Q::scheme == xq::Scheme::Asymmetric) {
        const double s = (hi - lo) / M * (1 + e16) + tiny;
        b = 0.5 * s + std::fabs(lo) * e16 + tiny + (hi - lo) * e16 + M * tiny;
      } else {
        const double q = Q::sym_levels, amax = std::max(-lo, hi), s = amax / q * (1 + e16) + tiny;
        b = 0.5 * s + amax * e16 + q * tiny;
      }
      return (b + slop + rounding) * 1.001 + 1e-30;
    }
  }

  static constexpr xq::SequenceId kNone = ~xq::SequenceId{0};

  // A new sequence made from s by `make` (fork or restore) in both caches: succeeds exactly when
  // every layer's blocks fit, else CapacityError creating nothing. Returns its id, or kNone.
  template <class Make>
  xq::SequenceId copy_of(std::size_t s, Make&& make) {
    bool room = true;
    for (int l = 0; l < cfg.layers; ++l) room = room && blocks_of(length(s, l)) <= free_blocks(l);
    xq::SequenceId f = 0, g = 0;
    const Outcome a = run([&] { f = make(fast); });
    const Outcome b = run([&] { g = make(ref); });
    XQ_CHECK(a == (room ? Outcome::Ok : Outcome::Capacity) && b == a);
    if (a != Outcome::Ok) return kNone;
    XQ_CHECK(f == g);
    if (f >= seqs.size()) {
      seqs.resize(f + 1);
      live.resize(f + 1, false);
    }
    seqs[f] = seqs[s];
    live[f] = true;
    return f;
  }

  void step(FuzzedDataProvider& in) {
    std::vector<std::size_t> open;
    for (std::size_t s = 0; s < live.size(); ++s)
      if (live[s]) open.push_back(s);
    const int op = in.ConsumeIntegralInRange<int>(0, 9);
    if (open.empty() || (op == 0 && open.size() < 4)) {
      open_new();
      return;
    }
    const std::size_t s = open[in.ConsumeIntegralInRange<std::size_t>(0, open.size() - 1)];
    const int layer = in.ConsumeIntegralInRange<int>(0, cfg.layers - 1);
    switch (op) {
      case 1: {  // seal one layer
        fast.seal(s, layer);
        ref.seal(s, layer);
        seqs[s][layer].sealed = true;
        same_snapshot(s);
        break;
      }
      case 2: {  // remove
        fast.remove_sequence(s);
        ref.remove_sequence(s);
        live[s] = false;
        break;
      }
      case 3: {  // fork: copy or CapacityError creating nothing
        const xq::SequenceId f = copy_of(s, [&](auto& cache) { return cache.fork(s); });
        if (f != kNone) XQ_CHECK(fast.snapshot(f) == fast.snapshot(s));
        break;
      }
      case 4: {  // snapshot → restore (into both backends) → snapshot
        const auto bytes = fast.snapshot(s);
        const xq::SequenceId f = copy_of(s, [&](auto& cache) { return cache.restore(bytes); });
        if (f != kNone) {
          XQ_CHECK(fast.snapshot(f) == bytes);
          XQ_CHECK(ref.snapshot(f) == bytes);
        }
        break;
      }
      default: {  // append a chunk
        const xq::index_t n = in.ConsumeIntegralInRange<xq::index_t>(0, 40);
        const int mode = in.ConsumeIntegralInRange<int>(0, 2);
        std::vector<float> x(static_cast<std::size_t>(n * width()));
        for (float& v : x) v = value(in, mode);
        append(s, layer, x, n);
      }
    }
  }
};

template <class Q>
void fuzz(FuzzedDataProvider& in) {
  xq::CacheConfig c;
  c.layers = in.ConsumeIntegralInRange<int>(1, 2);
  c.width = in.ConsumeIntegralInRange<xq::index_t>(1, 72);
  c.attention = {2, 1, 2};
  c.block_tokens = in.ConsumeIntegralInRange<xq::index_t>(1, 48);
  c.capacity_tokens = in.ConsumeIntegralInRange<xq::index_t>(1, 200);
  xq::codec::PerLayer<Q> k;
  // Mostly valid groups (a divisor of the width or of the block), sometimes anything.
  const xq::index_t along = Q::axis == xq::Axis::Token ? c.width : c.block_tokens;
  std::vector<xq::index_t> divisors;
  for (xq::index_t g = 1; g <= along; ++g)
    if (along % g == 0) divisors.push_back(g);
  k.group = in.ConsumeBool() ? divisors[in.ConsumeIntegralInRange<std::size_t>(0, divisors.size() - 1)]
                             : in.ConsumeIntegralInRange<xq::index_t>(-2, 100);
  k.window = in.ConsumeIntegralInRange<xq::index_t>(0, 8) == 0 ? in.ConsumeIntegralInRange<xq::index_t>(-1, 60)
                                                               : in.ConsumeIntegralInRange<xq::index_t>(0, 4);
  bool valid = k.window >= 0 && k.window <= c.block_tokens;
  if constexpr (!Q::is_float) {
    valid = valid && k.group > 0 && along % k.group == 0;
  }
  Harness<Q>* h = nullptr;
  const Outcome made = run([&] { h = new Harness<Q>(c, k); });
  XQ_CHECK(made == (valid ? Outcome::Ok : Outcome::Other));
  if (!h) return;
  for (int i = 0; i < 24 && in.remaining_bytes() > 0; ++i) h->step(in);
  for (std::size_t s = 0; s < h->live.size(); ++s)
    if (h->live[s]) h->check_values(s);
  delete h;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using xq::Axis;
  using xq::Scheme;
  using xq::quant::Uniform;
  FuzzedDataProvider in(data, size);
  switch (in.ConsumeIntegralInRange<int>(0, 12)) {
    case 0: fuzz<Uniform<2, Axis::Token>>(in); break;
    case 1: fuzz<Uniform<3, Axis::Token>>(in); break;
    case 2: fuzz<Uniform<4, Axis::Token>>(in); break;
    case 3: fuzz<Uniform<8, Axis::Token>>(in); break;
    case 4: fuzz<Uniform<2, Axis::Channel>>(in); break;
    case 5: fuzz<Uniform<3, Axis::Channel>>(in); break;
    case 6: fuzz<Uniform<4, Axis::Channel>>(in); break;
    case 7: fuzz<Uniform<8, Axis::Channel>>(in); break;
    case 8: fuzz<Uniform<2, Axis::Token, Scheme::Symmetric>>(in); break;
    case 9: fuzz<Uniform<4, Axis::Channel, Scheme::Symmetric>>(in); break;
    case 10: fuzz<Uniform<8, Axis::Token, Scheme::Symmetric>>(in); break;
    case 11: fuzz<xq::quant::Fp16>(in); break;
    default: fuzz<xq::quant::Fp32>(in); break;
  }
  return 0;
}
