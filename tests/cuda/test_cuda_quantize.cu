// GPU quantize/append against the scalar CPU reference: same codes and fp16 parameters bit for
// bit, for every bit width, both groupings and both schemes, bf16 and fp16 inputs, prefill
// chunks, single tokens and batched decode steps.

#include <algorithm>
#include <cmath>
#include <limits>

#include "cuda_support.cuh"

namespace xq = xquant;
namespace xc = xquant::cuda;
using xq::Axis;
using xq::Scheme;
using xq::index_t;

namespace {

template <class Q, class T>
void check_append(index_t group) {
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const std::string what = std::string(Q::axis == Axis::Token ? " per-token" : " per-channel") +
                           (Q::scheme == Scheme::Symmetric ? " symmetric" : " asymmetric") +
                           (std::is_same_v<T, xc::bf16> ? " bf16" : " fp16");
  INFO("seed ", seed, " bits ", Q::bits, " group ", group, what);
  const int B = 3;
  const index_t width = 512, cap = 512;
  cudaStream_t s = nullptr;
  xc::DeviceStream<Q> st({B, cap, width, group});
  st.fill_storage(0xff, s);  // poison

  std::vector<std::vector<float>> rows(B);  // what each sequence received, as the device sees it
  auto chunk = [&](int b, index_t n) {
    auto x = xqcuda::round_to<T>(xqtest::activations(rng, static_cast<std::size_t>(n), width));
    auto d = xqcuda::to_device<T>(x);
    st.append(b, d.data(), n, width, s);
    rows[b].insert(rows[b].end(), x.begin(), x.end());
  };
  auto step = [&]() {
    auto x = xqcuda::round_to<T>(xqtest::activations(rng, B, width));
    auto d = xqcuda::to_device<T>(x);
    st.append_all(d.data(), width, s);
    for (int b = 0; b < B; ++b) rows[b].insert(rows[b].end(), x.begin() + b * width, x.begin() + (b + 1) * width);
  };
  auto batch = [&](index_t n) {  // n tokens to every sequence in one call
    auto x = xqcuda::round_to<T>(xqtest::activations(rng, static_cast<std::size_t>(B * n), width));
    auto d = xqcuda::to_device<T>(x);
    st.append_batch(d.data(), n, width, s);
    for (int b = 0; b < B; ++b)
      rows[b].insert(rows[b].end(), x.begin() + b * n * width, x.begin() + (b + 1) * n * width);
  };
  chunk(0, 300);
  chunk(1, 70);
  for (int i = 0; i < 60; ++i) chunk(1, 1);
  chunk(2, 125);
  for (int i = 0; i < 5; ++i) step();
  batch(100);  // 300 rows: the staged kernel over three sequences; per-channel: each at its own group offset
  batch(1);
  st.check(s);

  const auto codes = xqcuda::to_host(st.codes());
  const auto params = xqcuda::to_host(st.params());
  const index_t cb = Q::code_bytes(width);
  using Ops = xq::quant::QuantOps<xq::backend::Reference>;
  for (int b = 0; b < B; ++b) {
    const index_t len = st.length(b);
    REQUIRE(static_cast<std::size_t>(len * width) == rows[b].size());
    CAPTURE(b);
    if constexpr (Q::axis == Axis::Token) {
      const index_t G = width / group * Q::params_per_group;
      std::vector<std::uint8_t> c(static_cast<std::size_t>(len * cb));
      std::vector<std::uint16_t> p(static_cast<std::size_t>(len * G));
      Ops::quantize_tokens<Q>(rows[b].data(), len, width, width, group, c.data(), p.data());
      CHECK(std::equal(c.begin(), c.end(), codes.begin() + b * cap * cb));
      CHECK(std::equal(p.begin(), p.end(), params.begin() + b * cap * G));
    } else {
      std::vector<float> h(rows[b]);
      for (float& v : h) v = xq::round_to_half(v);
      std::vector<std::uint8_t> c(static_cast<std::size_t>(group * cb));
      std::vector<std::uint16_t> p(static_cast<std::size_t>(width * Q::params_per_group));
      for (index_t t = 0; t + group <= len; t += group) {
        CAPTURE(t);
        Ops::quantize_channels<Q>(h.data() + t * width, group, width, width, c.data(), p.data());
        CHECK(std::equal(c.begin(), c.end(), codes.begin() + (b * cap + t) * cb));
        CHECK(std::equal(p.begin(), p.end(), params.begin() + ((b * cap + t) / group) * width * Q::params_per_group));
      }
    }
  }
  // Dequantized values (window tokens included) equal the CPU's bit for bit.
  index_t common = cap;
  for (int b = 0; b < B; ++b) common = std::min(common, st.length(b));
  xc::DeviceBuffer<float> out(static_cast<std::size_t>(B * common * width));
  out.fill_bytes(0xff, s);
  xc::dequantize(st, 0, common, out.data(), width, s);
  const auto got = xqcuda::to_host(out);
  for (int b = 0; b < B; ++b) {
    const auto ref = xqcuda::reference_xhat<Q>(rows[b], st.length(b), width, group);  // first `common` rows used
    index_t bad = 0;
    for (index_t i = 0; i < common * width; ++i)
      bad += !(got[b * common * width + i] == ref[i]);  // NaN (unwritten) counts as bad
    CHECK_MESSAGE(bad == 0, "sequence ", b, ": ", bad, " dequantized values differ");
  }
}

template <class Q>
void check_all() {
  XQ_REQUIRE_DEVICE();
  // Per-token groups 8 and 16 take the kernel's 8-values-per-thread path; in the 300-row chunk and
  // the 100-token batch, groups of 32 and more take the staged path (these small launches: 64 values
  // a lane at 2 bits for groups of 64 and more, else 32; one to eight lanes per group; the
  // append_batch test forces every width);
  // per-channel groups of 32 and 128 tokens.
  std::vector<index_t> groups{32, 128};
  if constexpr (Q::axis == Axis::Token) groups = {8, 16, 32, 128, 256};
  for (index_t group : groups) {
    check_append<Q, xc::bf16>(group);
    check_append<Q, xc::fp16>(group);
  }
}

// Device fp16 conversions (hardware cvt) against the bit-level ones, over every float and half.
__global__ void conversion_mismatches(unsigned long long* bad) {
  unsigned long long local = 0;
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x;; u += stride) {
    const float f = xq::bits_float(u);
    local += xq::float_to_half(f) != xq::detail::float_to_half_bitwise(f);
    if (u < 65536u) {
      const auto h = static_cast<std::uint16_t>(u);
      local += xq::float_bits(xq::half_to_float(h)) != xq::float_bits(xq::detail::half_to_float_bitwise(h));
    }
    if (u > 0xffffffffu - stride) break;
  }
  atomicAdd(bad, local);
}

// Uniform::quotient (the reciprocal's product and one correction step) against the division, for
// one fp16 significand of the scale per block row (s in [1, 2)) and every float a with a/s in
// [2^-3, 2^9): every float significand of a in each binade from 2^-3 to 2^10. Scaling a and s by
// a power of two scales every step exactly while all stay normal, which they do for every fp16
// scale and such quotients, so this covers every (a, s) whose code quotient() decides.
__global__ void quotient_mismatches(unsigned long long* bad, unsigned* example) {
  const float s = 1.0f + static_cast<float>(blockIdx.y) * 0x1p-10f;
  const float inv = __frcp_rn(s);
  unsigned long long local = 0;
  constexpr unsigned kSignificands = 1u << 23, kBinades = 13;  // a in [2^-3, 2^10)
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < kSignificands * kBinades; i += stride) {
    const unsigned binade = i >> 23, frac = i & (kSignificands - 1);
    const float a = xq::bits_float(((127u - 3u + binade) << 23) | frac);
    const float q = xq::quant::Uniform<4>::quotient(a, s, inv);
    if (xq::float_bits(q) != xq::float_bits(__fdiv_rn(a, s))) {
      ++local;
      example[0] = xq::float_bits(a), example[1] = xq::float_bits(s);
    }
  }
  atomicAdd(bad, local);
}

}  // namespace

TEST_CASE("device fp16 conversions equal the bit-level ones for every float and every half") {
  XQ_REQUIRE_DEVICE();
  xc::DeviceBuffer<unsigned long long> bad(1);
  bad.fill_bytes(0, nullptr);
  conversion_mismatches<<<1024, 256>>>(bad.data());  // 2^18 threads, 2^14 floats each
  XQ_CUDA_CHECK(cudaGetLastError());
  CHECK(xqcuda::to_host(bad)[0] == 0);
}

TEST_CASE("the quotient from the reciprocal and one correction equals the division (exhaustive)") {
  XQ_REQUIRE_DEVICE();
  xc::DeviceBuffer<unsigned long long> bad(1);
  xc::DeviceBuffer<unsigned> example(2);
  bad.fill_bytes(0, nullptr);
  example.fill_bytes(0, nullptr);
  quotient_mismatches<<<dim3(128, 1024), 256>>>(bad.data(), example.data());  // 1024 scales × 13 · 2^23 values
  XQ_CUDA_CHECK(cudaGetLastError());
  const auto ex = xqcuda::to_host(example);
  INFO("one mismatch: a bits ", ex[0], ", s bits ", ex[1]);
  CHECK(xqcuda::to_host(bad)[0] == 0);
}

#define XQ_QUANTIZERS(A, S)                                                                             \
  xq::quant::Uniform<2, A, S>, xq::quant::Uniform<3, A, S>, xq::quant::Uniform<4, A, S>, \
      xq::quant::Uniform<8, A, S>

TEST_CASE_TEMPLATE("cuda quantize/append matches the CPU reference bit for bit", Q,
                   XQ_QUANTIZERS(Axis::Token, Scheme::Asymmetric), XQ_QUANTIZERS(Axis::Token, Scheme::Symmetric),
                   XQ_QUANTIZERS(Axis::Channel, Scheme::Asymmetric), XQ_QUANTIZERS(Axis::Channel, Scheme::Symmetric),
                   xq::quant::Uniform<4, Axis::Token, Scheme::Asymmetric, xq::ParamBits::Bf16>,
                   xq::quant::Uniform<2, Axis::Token, Scheme::Symmetric, xq::ParamBits::Bf16>,
                   xq::quant::Uniform<4, Axis::Channel, Scheme::Asymmetric, xq::ParamBits::Bf16>,
                   xq::quant::Uniform<8, Axis::Token, Scheme::Asymmetric, xq::ParamBits::Bf16>,
                   xq::quant::Uniform<8, Axis::Channel, Scheme::Symmetric, xq::ParamBits::Bf16>) {
  check_all<Q>();
}

/// dequantize over a token range of per-channel streams (dequantize_channel_kernel, at 4, 8 and 16
/// rows per block and the launcher's choice): rows from an offset that is neither a group's nor a
/// block's, a width past 128 threads × 8 channels, padded output rows, bf16 and float; then the
/// decode path's padded range, whose rows past each sequence's length must be zeros. Against the CPU reference bit for bit (bf16: its
/// float rounded to nearest even), outputs poisoned, padding checked untouched.
template <class Q>
void check_dequantize_range(index_t group) {
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed, " bits ", Q::bits, " group ", group, Q::scheme == Scheme::Symmetric ? " symmetric" : " asymmetric");
  constexpr int B = 3;
  const index_t width = 1088, cap = 1024, ldo = width + 24;
  const index_t lens[B] = {613, 5 * group + 7, 4 * group};  // window rows at the end of the first two
  cudaStream_t s = nullptr;
  xc::DeviceStream<Q> st({B, cap, width, group});
  std::vector<std::vector<float>> ref(B);
  for (int b = 0; b < B; ++b) {
    const auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(lens[b]), width));
    const auto d = xqcuda::to_device<xc::bf16>(x);
    st.append(b, d.data(), lens[b], width, s);
    ref[b] = xqcuda::reference_xhat<Q>(x, lens[b], width, group);
  }
  st.check(s);
  // Output row r of sequence b holds token begin + r; columns past the width must stay poisoned.
  auto check = [&](const std::vector<float>& got, index_t begin, index_t count, bool bf16, const std::string& what) {
    index_t bad = 0, padding = 0, zeros = 0;
    std::string first;  // the first value that differs
    for (int b = 0; b < B; ++b)
      for (index_t r = 0; r < count; ++r) {
        const float* row = got.data() + (b * count + r) * ldo;
        const index_t tok = begin + r;
        for (index_t c = 0; c < width; ++c) {
          if (tok >= lens[b]) {
            zeros += !(row[c] == 0.0f && !std::signbit(row[c]));
            continue;
          }
          const float want = bf16 ? xqcuda::round_to<xc::bf16>({ref[b][tok * width + c]})[0] : ref[b][tok * width + c];
          if (!(row[c] == want) && bad++ == 0)  // NaN (unwritten) counts
            first = "sequence " + std::to_string(b) + " token " + std::to_string(tok) + " channel " + std::to_string(c) +
                    ": " + std::to_string(row[c]) + " instead of " + std::to_string(want);
        }
        for (index_t c = width; c < ldo; ++c) padding += !std::isnan(row[c]);
      }
    CHECK_MESSAGE(bad == 0, what, ": ", bad, " values differ from the CPU's, first ", first);
    CHECK_MESSAGE(zeros == 0, what, ": ", zeros, " values past a sequence's length are not +0");
    CHECK_MESSAGE(padding == 0, what, ": ", padding, " padding values were written");
  };
  const index_t begin = 37, end = lens[2];  // every sequence holds [begin, end)
  xc::DeviceBuffer<xc::bf16> ob(static_cast<std::size_t>(B * (end - begin) * ldo));
  xc::DeviceBuffer<float> of(ob.size());
  ob.fill_bytes(0xff, s);
  of.fill_bytes(0xff, s);
  xc::dequantize(st, begin, end, ob.data(), ldo, s);
  xc::dequantize(st, begin, end, of.data(), ldo, s);
  check(xqcuda::to_host_float(ob), begin, end - begin, true, "bf16");
  check(xqcuda::to_host(of), begin, end - begin, false, "float");
  // The decode path dequantizes [0, Lp) of every sequence, Lp past the shorter ones' lengths.
  const index_t Lp = (std::max({lens[0], lens[1], lens[2]}) + 7) / 8 * 8;
  xc::DeviceBuffer<float> op(static_cast<std::size_t>(B * Lp * ldo));
  op.fill_bytes(0xff, s);
  xc::detail::launch_dequantize(st.view(), 0, Lp, op.data(), ldo, s);
  check(xqcuda::to_host(op), 0, Lp, false, "padded range");
}

TEST_CASE_TEMPLATE("cuda dequantize: token ranges of per-channel streams match the CPU bit for bit", Q,
                   XQ_QUANTIZERS(Axis::Channel, Scheme::Asymmetric), XQ_QUANTIZERS(Axis::Channel, Scheme::Symmetric)) {
  XQ_REQUIRE_DEVICE();
  for (int tile_rows : {0, 4, 8, 16}) {
    CAPTURE(tile_rows);
    const xqcuda::ScopedValue<int> rows(xc::detail::dequantize_tile_rows, tile_rows);
    for (index_t group : {32, 128}) check_dequantize_range<Q>(group);
  }
}

/// v moved by `u` units in the last place of T (bf16: 8 significant bits, fp16: 11), as T.
template <class T>
float nudged(float v, int u) {
  if (v == 0.0f || u == 0) return v;
  const int digits = std::is_same_v<T, xc::bf16> ? 8 : 11;
  return xqcuda::round_to<T>({v + std::ldexp(static_cast<float>(u), std::ilogb(v) + 1 - digits)})[0];
}

// Inputs on and next to rounding boundaries, where a quotient from the reciprocal alone would
// round some values apart from encode()'s division: each group's ends pin a scale with few mantissa bits
// and a zero on its grid, and the other values sit at z + (k + ½)·s (exact ties) and a few input
// ulps either side, plus level values. Codes and parameters must equal the CPU reference's.
template <class Q, class T>
void check_boundaries(index_t group) {
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed, " bits ", Q::bits, " group ", group,
       std::string(Q::scheme == Scheme::Symmetric ? " symmetric" : " asymmetric"),
       std::string(std::is_same_v<T, xc::bf16> ? " bf16" : " fp16"));  // (doctest prints a char* as a pointer)
  const index_t n = 512, width = 256;  // >= 256 rows: the 32-values-per-thread path where the group allows
  const bool sym = Q::scheme == Scheme::Symmetric;
  const int top = sym ? Q::sym_levels : static_cast<int>(Q::max_code);
  std::uniform_int_distribution<int> exp(-10, 2), mant(0, 7), zero_steps(-64, 64), level(sym ? -top - 1 : -1, top);
  std::uniform_int_distribution<int> nudge(-3, 3);
  std::vector<float> x(static_cast<std::size_t>(n * width));
  for (index_t g0 = 0; g0 < n * width; g0 += group) {
    const float s = std::ldexp(1.0f + mant(rng) / 8.0f, exp(rng));
    const float z = sym ? 0.0f : zero_steps(rng) * s / 4.0f;
    x[g0] = sym ? -top * s : z;
    x[g0 + 1] = sym ? top * s : z + top * s;
    const float lo = std::min(x[g0], x[g0 + 1]), hi = std::max(x[g0], x[g0 + 1]);
    for (index_t i = 2; i < group; ++i) {
      const float v = xqcuda::round_to<T>({z + (level(rng) + (i % 4 == 3 ? 0.0f : 0.5f)) * s})[0];  // mostly ties
      x[g0 + i] = std::min(std::max(nudged<T>(v, nudge(rng)), lo), hi);
    }
  }
  x = xqcuda::round_to<T>(x);
  cudaStream_t stream = nullptr;
  xc::DeviceStream<Q> st({1, n, width, group});
  st.fill_storage(0xff, stream);
  auto d = xqcuda::to_device<T>(x);
  st.append(0, d.data(), n, width, stream);
  st.check(stream);
  const index_t cb = Q::code_bytes(width), G = width / group * Q::params_per_group;
  std::vector<std::uint8_t> c(static_cast<std::size_t>(n * cb));
  std::vector<std::uint16_t> p(static_cast<std::size_t>(n * G));
  xq::quant::QuantOps<xq::backend::Reference>::quantize_tokens<Q>(x.data(), n, width, width, group, c.data(), p.data());
  // The inputs do probe ties: count the values whose quotient under the stored parameters is k + ½.
  long ties = 0;
  for (index_t g0 = 0, k = 0; g0 < n * width; g0 += group, k += Q::params_per_group) {
    const auto P = Q::load(p.data() + k);
    for (index_t i = 0; P.scale > 0.0f && i < group; ++i) {
      const float q = ((sym ? x[g0 + i] : x[g0 + i] - P.zero)) / P.scale;
      ties += q - std::floor(q) == 0.5f;
    }
  }
  INFO(ties, " inputs on a tie");
  CHECK(ties > n * width / 1000);  // 0.3% to 10% of them, by bits and input type
  CHECK(xqcuda::to_host(st.codes()) == c);
  CHECK(xqcuda::to_host(st.params()) == p);
}

TEST_CASE_TEMPLATE("cuda append: inputs on and next to rounding boundaries match the CPU bit for bit", Q,
                   XQ_QUANTIZERS(Axis::Token, Scheme::Asymmetric), XQ_QUANTIZERS(Axis::Token, Scheme::Symmetric)) {
  XQ_REQUIRE_DEVICE();
  for (index_t group : {8, 32, 128}) {
    check_boundaries<Q, xc::bf16>(group);
    check_boundaries<Q, xc::fp16>(group);
  }
}

TEST_CASE("cuda stream rejects bad geometry before touching the device") {
  using Q = xq::quant::Uniform<4>;
  CHECK_THROWS_AS(xc::DeviceStream<Q>({1, 128, 100, 32}), xq::ConfigError);   // width % 8
  CHECK_THROWS_AS(xc::DeviceStream<Q>({1, 128, 512, 96}), xq::ConfigError);   // group not a power of two
  CHECK_THROWS_AS(xc::DeviceStream<Q>({0, 128, 512, 128}), xq::ConfigError);  // batch
  using C = xq::quant::Uniform<4, Axis::Channel>;
  CHECK_THROWS_AS(xc::DeviceStream<C>({1, 100, 512, 128}), xq::ConfigError);  // capacity % group
}

TEST_CASE("cuda append refuses rows in pageable host memory the device cannot read, before any work") {
  XQ_REQUIRE_DEVICE();
  const xqcuda::ScopedValue<bool> strict(xc::detail::assume_no_pageable_access, true);
  using Q = xq::quant::Uniform<4>;
  const int width = 64;
  xc::DeviceStream<Q> st({2, 32, width, 32});
  std::vector<xc::bf16> host(static_cast<std::size_t>(2 * 4 * width), __float2bfloat16_rn(0.5f));
  const char* msg = "x: points to pageable host memory";
  CHECK_THROWS_WITH_AS(st.append(0, host.data(), 4, width, nullptr), doctest::Contains(msg), xq::ShapeError);
  CHECK_THROWS_WITH_AS(st.append_batch(host.data(), 4, width, nullptr), doctest::Contains(msg), xq::ShapeError);
  CHECK_THROWS_WITH_AS(st.append_all(host.data(), width, nullptr), doctest::Contains(msg), xq::ShapeError);
  CHECK(st.length(0) == 0);
  CHECK(st.length(1) == 0);
  // The same rows from device memory go in.
  std::vector<float> x(host.size(), 0.5f);
  const auto dx = xqcuda::to_device<xc::bf16>(x);
  st.append_batch(dx.data(), 4, width, nullptr);
  CHECK_NOTHROW(st.check(nullptr));
  CHECK(st.length(1) == 4);
}

TEST_CASE("cuda append reports values that cannot be quantized") {
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  xc::DeviceStream<Q> st({1, 16, 64, 32});
  std::vector<float> x(64, 1.0f);
  x[3] = 1e30f;  // bf16 holds it, an fp16 zero/scale cannot
  auto d = xqcuda::to_device<xc::bf16>(x);
  st.append(0, d.data(), 1, 64, nullptr);
  CHECK_THROWS_WITH_AS(st.check(nullptr),
                       doctest::Contains("does not fit fp16 (|value| <= 65504), first in the group that starts at "
                                         "sequence 0, token 0, channel 0;"),
                       xq::ValueError);
  CHECK_THROWS_AS(st.append(0, d.data(), 1, 60, nullptr), xq::ShapeError);  // ld < width
  CHECK_THROWS_AS(st.append(0, d.data(), 100, 64, nullptr), xq::CapacityError);
  CHECK_THROWS_AS(st.append_batch(d.data(), 16, 64, nullptr), xq::CapacityError);  // 1 + 16 > 16
  CHECK_THROWS_AS(st.append_batch(d.data(), -1, 64, nullptr), xq::ShapeError);
  CHECK_THROWS_AS(st.append_batch(d.data(), 1, 60, nullptr), xq::ShapeError);
  CHECK(st.length(0) == 1);  // the rejected calls appended nothing
}

// One bad value (NaN, ±Inf, or for per-channel streams a bf16 value past fp16's range, which the
// CPU stream refuses too) at a random row and column of an append must make check() raise
// ValueError naming its sequence, token and channel; with three (two in that row, one in a later
// row at any column) it must name the first in (sequence, token, channel) order. On every path:
// per-token chunks at each kernel width, decode steps and batches; per-channel whole groups
// straight from x (the bad value past a group's first row, where a min/max alone would skip a
// NaN), the fp16 window, and a chunk that tops up the open group, flushes whole ones and leaves a
// tail. The same appends without the bad value must pass, so the check cannot pass by raising
// always.
template <class Q>
void check_bad_values() {
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const index_t width = 256, group = Q::axis == Axis::Token ? 128 : 32, cap = 512;
  std::vector<float> bad = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  if (Q::axis == Axis::Channel) bad.push_back(1.0e5f);  // bf16 holds it, fp16 does not
  enum Path { Chunk, Step, Batch, Whole, Window, Mixed };
  const std::vector<Path> paths =
      Q::axis == Axis::Token ? std::vector<Path>{Chunk, Step, Batch} : std::vector<Path>{Whole, Window, Mixed, Step};
  const int B = 3;
  int raised = 0, runs = 0;
  for (Path path : paths)
    for (int vpt : path == Chunk ? std::vector<int>{8, 32, 64, 128} : std::vector<int>{0})  // 0: the rule
      for (float v : bad)
        for (int spoil : {0, 1, 3}) {  // bad values set
          // Rows: Chunk 300 (the staged kernels), Batch 64 per sequence, Step one per sequence, Whole 2
          // groups, Window 20, Mixed 90 after 10 tokens (22 to close the open group, 2 whole groups, a
          // tail of 4).
          const index_t n = path == Step ? 1 : path == Whole ? 2 * group : path == Window ? 20 : path == Mixed ? 90
                          : path == Chunk ? 300 : 64;
          const index_t rows = path == Step || path == Batch ? B * n : n;
          auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(rows), width));
          std::uniform_int_distribution<index_t> pick_row(0, rows - 1), pick_col(0, width - 1);
          index_t r = pick_row(rng);
          index_t c = pick_col(rng);
          if (path == Whole && r % group == 0) ++r;  // not a group's first row
          if (spoil) x[r * width + c] = v;
          index_t c2 = -1, r3 = -1, c3 = -1;
          if (spoil == 3) {
            do c2 = pick_col(rng);
            while (c2 == c);
            x[r * width + c2] = v;
            if (r + 1 < rows) {
              r3 = std::uniform_int_distribution<index_t>(r + 1, rows - 1)(rng), c3 = pick_col(rng);
              x[r3 * width + c3] = v;
            }
          }
          INFO("seed ", seed, " bits ", Q::bits, std::string(Q::axis == Axis::Token ? " per-token" : " per-channel"),
               " path ", static_cast<int>(path), " vpt ", vpt, " value ", v, " set ", spoil, " at row ", r, " columns ",
               c, " ", c2, ", row ", r3, " column ", c3);
          c = c2 >= 0 ? std::min(c, c2) : c;
          auto d = xqcuda::to_device<xc::bf16>(x);
          xc::DeviceStream<Q> st({B, cap, width, group});
          if (path == Mixed) {  // 10 clean tokens first: the chunk opens by topping up the group
            auto pre = xqcuda::to_device<xc::bf16>(
                xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(10), width)));
            st.append(0, pre.data(), 10, width, nullptr);
            REQUIRE_NOTHROW(st.check(nullptr));
          }
          {
            const xqcuda::ScopedValue<int> forced(xc::detail::append_values_per_thread, vpt);
            if (path == Step) st.append_all(d.data(), width, nullptr);
            else if (path == Batch) st.append_batch(d.data(), n, width, nullptr);
            else st.append(0, d.data(), n, width, nullptr);
          }
          ++runs;
          if (!spoil) {
            REQUIRE_NOTHROW(st.check(nullptr));
            continue;
          }
          std::string what;
          try {
            st.check(nullptr);
          } catch (const xq::ValueError& e) {
            what = e.what();
          }
          // The message names the token and the first bad channel of its row: rows go to sequence 0
          // from token 0 (Mixed: from 10), a decode step's row r to sequence r, a batch's row r to
          // sequence r / n at token r % n.
          const index_t seq = path == Step ? r : path == Batch ? r / n : 0;
          const index_t tok = path == Step ? 0 : path == Batch ? r % n : path == Mixed ? 10 + r : r;
          const std::string at = "first at sequence " + std::to_string(seq) + ", token " + std::to_string(tok) +
                                 ", channel " + std::to_string(c) + ";";
          INFO("message: ", what, "; expected: ", at);
          CHECK(what.find("NaN or Inf") != std::string::npos);
          CHECK(what.find(at) != std::string::npos);
          raised += !what.empty();
        }
  INFO("seed ", seed);
  CHECK(3 * raised == 2 * runs);
}

TEST_CASE_TEMPLATE("cuda append raises on NaN, Inf and fp16 overflow wherever they sit", Q, xq::quant::Uniform<4>,
                   xq::quant::Uniform<2, Axis::Token, Scheme::Symmetric>, xq::quant::Uniform<4, Axis::Channel>,
                   xq::quant::Uniform<2, Axis::Channel, Scheme::Symmetric>) {
  XQ_REQUIRE_DEVICE();
  check_bad_values<Q>();
}

TEST_CASE("cuda append: a value error sticks until clear(), and clear() makes the stream usable again") {
  // The device append cannot roll back: tokens with meaningless codes are in the stream. check()
  // must keep raising (a caller who catches the first error and goes on would otherwise attend over
  // them silently) until clear() empties the stream.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t width = 128;
  auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, 4, width));
  auto good = xqcuda::to_device<xc::bf16>(x);
  x[width + 5] = std::numeric_limits<float>::quiet_NaN();
  auto bad = xqcuda::to_device<xc::bf16>(x);
  xc::DeviceStream<Q> st({2, 16, width, 32});
  st.append(0, good.data(), 4, width, nullptr);
  REQUIRE_NOTHROW(st.check(nullptr));
  st.append(1, bad.data(), 4, width, nullptr);
  CHECK_THROWS_AS(st.check(nullptr), xq::ValueError);
  st.append(0, good.data(), 1, width, nullptr);  // a clean append does not clear it
  CHECK_THROWS_WITH_AS(st.check(nullptr), doctest::Contains("first at sequence 1, token 1, channel 5;"), xq::ValueError);
  CHECK_THROWS_WITH_AS(st.check(nullptr), doctest::Contains("first at sequence 1, token 1, channel 5;"), xq::ValueError);
  st.clear(nullptr);
  CHECK(st.length(0) == 0);
  CHECK(st.length(1) == 0);
  st.append(1, good.data(), 4, width, nullptr);
  CHECK_NOTHROW(st.check(nullptr));
}

TEST_CASE("cuda stream: capacity past 32-bit lengths, sequence indices out of range and bad dequantize outputs are refused") {
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  CHECK_THROWS_AS(xc::DeviceStream<Q>({1, index_t(1) << 31, 8, 8}), xq::ConfigError);  // before any allocation
  xc::DeviceStream<Q> st({2, 16, 64, 32});
  CHECK(st.length(1) == 0);
  CHECK_THROWS_AS((void)st.length(2), xq::ShapeError);
  CHECK_THROWS_AS((void)st.length(-1), xq::ShapeError);
  std::vector<float> x(2 * 64);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 13) - 6.0f;
  const auto dx = xqcuda::to_device<xc::bf16>(x);
  st.append_batch(dx.data(), 1, 64, nullptr);
  xc::DeviceBuffer<float> out(2 * 64 + 8);
  CHECK_THROWS_AS(xc::dequantize(st, 0, 1, out.data() + 1, 64, nullptr), xq::ShapeError);  // stores are 16 bytes wide
  CHECK_THROWS_AS(xc::dequantize(st, 0, 1, static_cast<float*>(nullptr), 64, nullptr), xq::ShapeError);
  CHECK_THROWS_AS(xc::dequantize(st, 0, 1, out.data(), 60, nullptr), xq::ShapeError);
  CHECK_NOTHROW(xc::dequantize(st, 0, 1, out.data() + 4, 64, nullptr));  // 16-byte aligned
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST_CASE("cuda append: a per-channel prefill of more than 65535 groups (several launches) matches the CPU") {
  // Whole groups are quantized one grid row each; the grid holds at most 65535 rows, so a longer
  // prefill is cut into launches. Groups of 8 over 8 channels: 65537 groups = 524296 tokens.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4, Axis::Channel>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t width = 8, group = 8, n = 65537 * group + 3;  // + 3 tokens left in the window
  auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(n), width));
  auto d = xqcuda::to_device<xc::bf16>(x);
  xc::DeviceStream<Q> st({1, n + 5, width, group});
  st.fill_storage(0xff, nullptr);
  st.append(0, d.data(), n, width, nullptr);
  REQUIRE_NOTHROW(st.check(nullptr));
  CHECK(st.length(0) == n);
  for (float& v : x) v = xq::round_to_half(v);
  const index_t whole = n / group * group, cb = Q::code_bytes(width);
  std::vector<std::uint8_t> c(static_cast<std::size_t>(whole * cb));
  std::vector<std::uint16_t> p(static_cast<std::size_t>(whole / group * width * Q::params_per_group));
  using Ops = xq::quant::QuantOps<xq::backend::Reference>;
  for (index_t t = 0; t < whole; t += group)
    Ops::quantize_channels<Q>(x.data() + t * width, group, width, width, c.data() + t * cb,
                              p.data() + t / group * width * Q::params_per_group);
  const auto codes = xqcuda::to_host(st.codes());
  const auto params = xqcuda::to_host(st.params());
  CHECK(std::equal(c.begin(), c.end(), codes.begin()));
  CHECK(std::equal(p.begin(), p.end(), params.begin()));
}

TEST_CASE("cuda append: a per-channel append inside a CUDA graph capture is refused") {
  // Its group flushes are decided on the host, which a graph replay would not redo.
  XQ_REQUIRE_DEVICE();
  xc::DeviceStream<xq::quant::Uniform<4, Axis::Channel>> st({1, 64, 64, 32});
  const std::vector<float> x(64, 0.5f);
  auto d = xqcuda::to_device<xc::bf16>(x);
  xqcuda::CapturedStream cs;
  const cudaStream_t s = cs.get();
  cs.begin();
  CHECK_THROWS_AS(st.append(0, d.data(), 1, 64, s), xq::ConfigError);
  CHECK_THROWS_AS(st.append_all(d.data(), 64, s), xq::ConfigError);
  cs.end(false);
  CHECK(st.length(0) == 0);
  st.append(0, d.data(), 1, 64, s);  // outside a capture it works
  st.check(s);
  CHECK(st.length(0) == 1);
}

TEST_CASE("cuda append: a captured append replayed past the capacity writes nothing and reports it") {
  // Direct calls check the capacity on the host; a replayed graph can only be stopped on the
  // device: the token is not written, the lengths stay, and check() raises CapacityError.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const int B = 2;
  const index_t width = 256, cap = 8;
  // Everything on the test's stream: a non-blocking stream does not wait for the legacy default
  // stream (under the sanitizers the replay below once ran before these appends had ended).
  xqcuda::CapturedStream cs;
  const cudaStream_t s = cs.get();
  xc::DeviceStream<Q> st({B, cap, width, 128});
  st.fill_storage(0xff, s);
  const auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, B * cap, width));
  const auto d = xqcuda::to_device<xc::bf16>(x);
  for (int b = 0; b < B; ++b) st.append(b, d.data(), cap - 1, width, s);  // one token left
  xc::DeviceBuffer<xc::bf16> tok(static_cast<std::size_t>(B * width));
  cs.begin();
  st.append_all(tok.data(), width, s);
  cs.end();
  XQ_CUDA_CHECK(cudaMemcpyAsync(tok.data(), d.data() + (cap - 1) * width, tok.bytes(), cudaMemcpyDeviceToDevice, s));
  cs.launch();  // fits: the last free token of each sequence
  st.sync_lengths(s);
  REQUIRE_NOTHROW(st.check(s));
  CHECK(st.length(0) == cap);
  CHECK(st.length(1) == cap);
  const auto full = xqcuda::to_host(st.codes());
  XQ_CUDA_CHECK(cudaMemsetAsync(tok.data(), 0x3f, tok.bytes(), s));  // other input: would change codes
  cs.launch();                                                       // full: nothing written
  cs.launch();
  st.sync_lengths(s);
  CHECK(st.length(0) == cap);
  CHECK(st.length(1) == cap);
  CHECK_THROWS_AS(st.check(s), xq::CapacityError);
  CHECK_NOTHROW(st.check(s));  // reported once
  CHECK(xqcuda::to_host(st.codes()) == full);
  // What the device holds is the CPU's encoding of the rows appended.
  const index_t cb = Q::code_bytes(width);
  for (int b = 0; b < B; ++b) {
    std::vector<float> rows(x.begin(), x.begin() + (cap - 1) * width);
    rows.insert(rows.end(), x.begin() + (cap - 1 + b) * width, x.begin() + (cap + b) * width);
    std::vector<std::uint8_t> c(static_cast<std::size_t>(cap * cb));
    std::vector<std::uint16_t> p(static_cast<std::size_t>(cap * (width / 128) * Q::params_per_group));
    xq::quant::QuantOps<xq::backend::Reference>::quantize_tokens<Q>(rows.data(), cap, width, width, 128, c.data(),
                                                                    p.data());
    CHECK(std::equal(c.begin(), c.end(), full.begin() + b * cap * cb));
  }
}

TEST_CASE("cuda append: padded input rows (ld > width) read only the row, on every chunk size") {
  // 300 rows of 4 groups: the staged kernel (a warp's chunks span several rows, and the last warp
  // is partial) for groups 32, 64 and 128; the padding holds NaN, so a read of it would raise.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const index_t n = 300, ld = 520;
  for (index_t group : {32, 64, 128}) {
    const index_t width = 4 * group;
    INFO("seed ", seed, " group ", group);
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(n), width));
    std::vector<float> padded(static_cast<std::size_t>(n * ld), std::numeric_limits<float>::quiet_NaN());
    for (index_t r = 0; r < n; ++r) std::copy(x.begin() + r * width, x.begin() + (r + 1) * width, padded.begin() + r * ld);
    auto d = xqcuda::to_device<xc::bf16>(padded);
    xc::DeviceStream<Q> st({1, n, width, group});
    st.fill_storage(0xff, nullptr);
    st.append(0, d.data(), n, ld, nullptr);
    REQUIRE_NOTHROW(st.check(nullptr));
    const index_t cb = Q::code_bytes(width), G = width / group * Q::params_per_group;
    std::vector<std::uint8_t> c(static_cast<std::size_t>(n * cb));
    std::vector<std::uint16_t> p(static_cast<std::size_t>(n * G));
    xq::quant::QuantOps<xq::backend::Reference>::quantize_tokens<Q>(x.data(), n, width, width, group, c.data(), p.data());
    CHECK(xqcuda::to_host(st.codes()) == c);
    CHECK(xqcuda::to_host(st.params()) == p);
  }
}

TEST_CASE("cuda append_batch: every values-per-thread kernel writes the CPU's codes for each sequence") {
  // append_batch puts 3 sequences' rows into one launch (a warp's chunks can span two sequences);
  // each kernel width is forced in turn (detail::append_values_per_thread), 2-bit asymmetric so
  // that the zero point and the 16-codes-per-word packing are covered too.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<2, Axis::Token, Scheme::Asymmetric>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const int B = 3;
  const index_t n = 37, width = 384, group = 128, cap = 64;  // 37 rows: warps straddle sequences
  const index_t cb = Q::code_bytes(width), G = width / group * Q::params_per_group;
  for (int vpt : {8, 32, 64, 128}) {
    INFO("seed ", seed, " values per thread ", vpt);
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(B * n), width));
    auto d = xqcuda::to_device<xc::bf16>(x);
    xc::DeviceStream<Q> st({B, cap, width, group});
    st.fill_storage(0xff, nullptr);
    st.append(1, d.data(), 5, width, nullptr);  // sequence 1 starts at token 5
    {
      const xqcuda::ScopedValue<int> forced(xc::detail::append_values_per_thread, vpt);
      st.append_batch(d.data(), n, width, nullptr);
    }
    REQUIRE_NOTHROW(st.check(nullptr));
    const auto codes = xqcuda::to_host(st.codes());
    const auto params = xqcuda::to_host(st.params());
    for (int b = 0; b < B; ++b) {
      CAPTURE(b);
      const index_t first = b == 1 ? 5 : 0;
      CHECK(st.length(b) == first + n);
      std::vector<float> rows(x.begin() + b * n * width, x.begin() + (b + 1) * n * width);
      if (b == 1) rows.insert(rows.begin(), x.begin(), x.begin() + 5 * width);
      const index_t len = first + n;
      std::vector<std::uint8_t> c(static_cast<std::size_t>(len * cb));
      std::vector<std::uint16_t> p(static_cast<std::size_t>(len * G));
      xq::quant::QuantOps<xq::backend::Reference>::quantize_tokens<Q>(rows.data(), len, width, width, group, c.data(),
                                                                      p.data());
      CHECK(std::equal(c.begin(), c.end(), codes.begin() + b * cap * cb));
      CHECK(std::equal(p.begin(), p.end(), params.begin() + b * cap * G));
    }
  }
}

TEST_CASE("cuda append: a long prefill chunk (several grid-stride passes) matches the CPU bit for bit") {
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t width = 512, n = 20000, group = 64;
  cudaStream_t s = nullptr;
  xc::DeviceStream<Q> st({2, n, width, group});
  st.fill_storage(0xff, s);
  auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, static_cast<std::size_t>(n), width));
  auto d = xqcuda::to_device<xc::bf16>(x);
  st.append(1, d.data(), n, width, s);
  st.check(s);
  const auto codes = xqcuda::to_host(st.codes());
  const auto params = xqcuda::to_host(st.params());
  const index_t cb = Q::code_bytes(width), G = width / group * Q::params_per_group;
  std::vector<std::uint8_t> c(static_cast<std::size_t>(n * cb));
  std::vector<std::uint16_t> p(static_cast<std::size_t>(n * G));
  xq::quant::QuantOps<xq::backend::Reference>::quantize_tokens<Q>(x.data(), n, width, width, group, c.data(), p.data());
  CHECK(std::equal(c.begin(), c.end(), codes.begin() + n * cb));
  CHECK(std::equal(p.begin(), p.end(), params.begin() + n * G));
  // Dequantize both halves of the range in one call (one grid, several passes) vs the reference.
  xc::DeviceBuffer<float> out(static_cast<std::size_t>(n * width));
  out.fill_bytes(0xff, s);
  xc::DeviceStream<Q> one({1, n, width, group});
  one.append(0, d.data(), n, width, s);
  xc::dequantize(one, 0, n, out.data(), width, s);
  const auto got = xqcuda::to_host(out);
  const auto ref = xqcuda::reference_xhat<Q>(x, n, width, group);
  index_t bad = 0;
  for (index_t i = 0; i < n * width; ++i) bad += !(got[i] == ref[i]);
  CHECK(bad == 0);
}
