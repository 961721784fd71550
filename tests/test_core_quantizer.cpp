// Quantizers: the Eigen path against the scalar reference (codes bit for bit, values to 1 ulp),
// and the reference against float64 math (codes, and the per-element error bound).
#include <algorithm>

#include <xquant/xquant.hpp>

#include "support.hpp"

using namespace xquant;
using quant::Uniform;

#define XQ_TOKEN_QUANTIZERS                                                                                   \
  Uniform<2>, Uniform<3>, Uniform<4>, Uniform<8>, Uniform<2, Axis::Token, Scheme::Symmetric>,                 \
      Uniform<3, Axis::Token, Scheme::Symmetric>, Uniform<4, Axis::Token, Scheme::Symmetric>,                 \
      Uniform<8, Axis::Token, Scheme::Symmetric>
#define XQ_CHANNEL_QUANTIZERS                                                                                 \
  Uniform<2, Axis::Channel>, Uniform<3, Axis::Channel>, Uniform<4, Axis::Channel>, Uniform<8, Axis::Channel>, \
      Uniform<3, Axis::Channel, Scheme::Symmetric>, Uniform<4, Axis::Channel, Scheme::Symmetric>
// Parameters of 8 significant bits (ParamBits::Bf16).
#define XQ_BF16_PARAM_QUANTIZERS                                                                              \
  Uniform<2, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>,                                               \
      Uniform<4, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>,                                           \
      Uniform<2, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>,                                            \
      Uniform<4, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>,                                            \
      Uniform<2, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>,                                         \
      Uniform<3, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>,                                         \
      Uniform<4, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>,                                         \
      Uniform<4, Axis::Channel, Scheme::Symmetric, ParamBits::Bf16>,                                          \
      Uniform<8, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>,                                           \
      Uniform<8, Axis::Channel, Scheme::Symmetric, ParamBits::Bf16>

namespace {

struct Quantized {
  std::vector<std::uint8_t> codes;
  std::vector<std::uint16_t> params;
};

// Quantizes `rows` × `width` with backend B. Per-token: rows of width/group groups. Per-channel:
// consecutive groups of `group` rows (the last may be short), as the cache stores them.
template <class Q, class B>
Quantized quantize(const std::vector<float>& x, index_t rows, index_t width, index_t group) {
  using Ops = quant::QuantOps<B>;
  Quantized q;
  q.codes.assign(static_cast<std::size_t>(rows * Q::code_bytes(width)), 0xEE);
  if constexpr (Q::axis == Axis::Token) {
    q.params.assign(static_cast<std::size_t>(rows * (width / group) * Q::params_per_group), 0xFFFF);
    Ops::template quantize_tokens<Q>(x.data(), rows, width, width, group, q.codes.data(), q.params.data());
  } else {
    const index_t groups = (rows + group - 1) / group;
    q.params.assign(static_cast<std::size_t>(groups * width * Q::params_per_group), 0xFFFF);
    for (index_t g = 0; g < groups; ++g)
      Ops::template quantize_channels<Q>(x.data() + g * group * width, std::min(group, rows - g * group), width, width,
                                         q.codes.data() + g * group * Q::code_bytes(width),
                                         q.params.data() + g * width * Q::params_per_group);
  }
  return q;
}

template <class Q, class B>
std::vector<float> dequantize(const Quantized& q, index_t rows, index_t width, index_t group) {
  using Ops = quant::QuantOps<B>;
  auto out = xqtest::poisoned(static_cast<std::size_t>(rows * width));
  if constexpr (Q::axis == Axis::Token) {
    Ops::template dequantize_tokens<Q>(q.codes.data(), q.params.data(), rows, width, group, out.data(), width);
  } else {
    for (index_t g = 0; g * group < rows; ++g)
      Ops::template dequantize_channels<Q>(q.codes.data() + g * group * Q::code_bytes(width),
                                           q.params.data() + g * width * Q::params_per_group,
                                           std::min(group, rows - g * group), width, out.data() + g * group * width, width);
  }
  return out;
}

// Shapes: (rows, width, group). Odd widths exercise packing tails; short last channel groups too.
template <class Q>
std::vector<std::array<index_t, 3>> shapes() {
  if constexpr (Q::axis == Axis::Token) return {{7, 256, 32}, {5, 256, 64}, {9, 256, 128}, {4, 111, 37}, {3, 64, 64}};
  else return {{64, 40, 32}, {128, 33, 64}, {141, 24, 128}, {13, 17, 32}};
}

// The group of element (r, c) and its members, for the float64 checks.
template <class Q>
std::vector<std::size_t> members(index_t r, index_t c, index_t rows, index_t width, index_t group) {
  std::vector<std::size_t> m;
  if constexpr (Q::axis == Axis::Token) {
    for (index_t i = c / group * group; i < (c / group + 1) * group; ++i) m.push_back(static_cast<std::size_t>(r * width + i));
  } else {
    for (index_t t = r / group * group; t < std::min(rows, (r / group + 1) * group); ++t)
      m.push_back(static_cast<std::size_t>(t * width + c));
  }
  return m;
}

}  // namespace

TEST_CASE_TEMPLATE("Eigen quantization matches the scalar reference bit for bit", Q, XQ_TOKEN_QUANTIZERS,
                   XQ_CHANNEL_QUANTIZERS, XQ_BF16_PARAM_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  for (const auto& shape : shapes<Q>()) {
    const index_t rows = shape[0], width = shape[1], group = shape[2];  // named for INFO (C++17)
    INFO("rows ", rows, " width ", width, " group ", group);
    // Random activations, and values on a coarse grid, where (x − z)/s often lands exactly on a
    // tie: rint (ties to even) and round (ties away) differ there.
    auto x = xqtest::activations(g, rows, width);
    std::uniform_int_distribution<int> k(-6, 6);
    for (std::size_t i = 0; i < x.size(); i += 2) x[i] = 0.5f * static_cast<float>(k(g));
    const auto ref = quantize<Q, backend::Reference>(x, rows, width, group);
    // The policy's storage formula is exactly what the operations wrote.
    CHECK(Q::storage_bytes(rows, width, group) == index_t(ref.codes.size() + 2 * ref.params.size()));
    const auto fast = quantize<Q, backend::Eigen>(x, rows, width, group);
    REQUIRE(fast.codes == ref.codes);
    REQUIRE(fast.params == ref.params);
    const auto a = dequantize<Q, backend::Reference>(ref, rows, width, group);
    const auto b = dequantize<Q, backend::Eigen>(ref, rows, width, group);
    REQUIRE(xqtest::all_finite(a));
    REQUIRE(xqtest::all_finite(b));
    for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(xqtest::ulp_distance(a[i], b[i]) <= 1);
  }
}

/// Calls check(x) for inputs where a quantizer's product by the reciprocal and its quotient are
/// most likely to round apart: every rounding boundary k + 1/2 of the levels (and two beyond) under
/// scale s and zero z, the 13 floats around it, one random value per level and one a few ulps from
/// the boundary; then two extreme inputs. (For scale 0 pass a small positive s.)
template <class Q, class F>
void for_each_boundary_input(float s, float z, std::mt19937_64& g, F&& check) {
  std::uniform_int_distribution<int> ulps(-6, 6);
  std::uniform_real_distribution<float> unit(-1.5f, 1.5f);
  const bool sym = Q::scheme == Scheme::Symmetric;
  const int lo_k = sym ? -Q::sym_levels - 2 : -2, hi_k = sym ? Q::sym_levels + 2 : Q::max_code + 2;
  for (int k = lo_k; k <= hi_k; ++k) {
    const float b = z + (static_cast<float>(k) + 0.5f) * s;
    float x = b;
    for (int u = 0; u < 6; ++u) x = std::nextafter(x, -INFINITY);
    for (int u = -6; u <= 6; ++u, x = std::nextafter(x, INFINITY)) check(x);
    check(z + static_cast<float>(k) * s + unit(g) * s);
    check(b + static_cast<float>(ulps(g)) * 0x1p-24f * std::fabs(b));
  }
  check(z + unit(g) * 1e30f);
  check(z + unit(g) * 1e-40f);
}

// The CUDA kernels encode with a reciprocal (Uniform::encode_scaled); its codes must be encode()'s
// for every input. Drawn: scales over the whole fp16 range (subnormal ones included), and inputs
// at and within a few ulps of every rounding boundary z + (k + ½)·s, where the product and the
// quotient are most likely to round apart, plus random and extreme inputs.
TEST_CASE_TEMPLATE("encode with a reciprocal gives encode's code for every input", Q, Uniform<2>, Uniform<3>, Uniform<4>,
                   Uniform<8>, Uniform<2, Axis::Token, Scheme::Symmetric>, Uniform<3, Axis::Token, Scheme::Symmetric>,
                   Uniform<4, Axis::Token, Scheme::Symmetric>, Uniform<8, Axis::Token, Scheme::Symmetric>) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::uniform_int_distribution<int> scale_bits(1, 0x7bff), zero_bits(0, 0xfbff);
  const bool sym = Q::scheme == Scheme::Symmetric;
  long checked = 0, exact_halves = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::uint16_t p[2] = {static_cast<std::uint16_t>(scale_bits(g)), static_cast<std::uint16_t>(zero_bits(g))};
    const auto P = Q::load(p);
    const float inv = Q::reciprocal(P);
    const float z = sym ? 0.0f : P.zero;
    auto check = [&](float x) {
      if (!std::isfinite(x)) return;
      const float q = (x - z) / P.scale;
      exact_halves += (q - std::floor(q) == 0.5f);
      ++checked;
      REQUIRE(Q::encode_scaled(x, P, inv) == Q::encode(x, P));
    };
    for_each_boundary_input<Q>(P.scale, z, g, check);
  }
  INFO("checked ", checked, " inputs, ", exact_halves, " with a quotient of exactly k + 1/2");
  CHECK(exact_halves > 1000);  // the ties themselves were exercised
}

// The CUDA per-token kernel encodes with Uniform::encode_exact: the quotient from the reciprocal
// and one correction step, rounded by adding 1.5·2^23. Its code must be encode()'s for every
// input, clamped or (where rounds_within_levels holds) unclamped. Inputs as in the encode_scaled
// test: every rounding boundary of many fp16 scales and zeros, and a few ulps around it, plus
// constant groups (scale 0). The plain product a·inv must round some of them apart, or the
// inputs do not probe the correction.
TEST_CASE_TEMPLATE("encode_exact gives encode's code for every input", Q, XQ_TOKEN_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::uniform_int_distribution<int> scale_bits(1, 0x7bff), zero_bits(0, 0xfbff);
  const bool sym = Q::scheme == Scheme::Symmetric;
  long checked = 0, unclamped = 0, product_differs = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::uint16_t p[2] = {static_cast<std::uint16_t>(trial % 100 == 0 ? 0 : scale_bits(g)),
                          static_cast<std::uint16_t>(zero_bits(g))};
    const auto P = Q::load(p);
    const float inv = Q::reciprocal(P);
    const float z = sym ? 0.0f : P.zero;
    auto check = [&](float x) {
      if (!std::isfinite(x)) return;
      const unsigned want = Q::encode(x, P);
      ++checked;
      REQUIRE(float_bits(Q::template encode_exact<true>(x, P, inv)) - Q::exact_bias == want);
      if (Q::rounds_within_levels(x, x, P, inv)) {
        ++unclamped;
        REQUIRE(float_bits(Q::template encode_exact<false>(x, P, inv)) - Q::exact_bias == want);
      }
      if (P.scale > 0.0f) {  // the uncorrected product, rounded and clamped alike
        const float t = std::fmin(std::fmax((x - z) * inv, Q::lowest_level), Q::highest_level);
        product_differs += Q::code_of(std::rint(t)) != want;
      }
    };
    for_each_boundary_input<Q>(P.scale > 0.0f ? P.scale : 0x1p-20f, z, g, check);
  }
  INFO("checked ", checked, " inputs (", unclamped, " unclamped), ", product_differs,
       " where the uncorrected product rounds to another code");
  CHECK(unclamped > checked / 4);
  // (2-bit symmetric has only the boundaries ±½, where the product and quotient rarely part.)
  if (Q::bits > 2 || !sym) CHECK(product_differs > 0);
}

// A group's quotients lie between its ends' (the correctly rounded quotient is monotone), so
// rounds_within_levels on the group's range holds for each of its values.
TEST_CASE_TEMPLATE("rounds_within_levels of a range covers its values", Q, XQ_TOKEN_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  long groups_within = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    auto x = xqtest::activations(g, 1, 64);
    const auto [lo_it, hi_it] = std::minmax_element(x.begin(), x.end());
    std::uint16_t p[2] = {0, 0};
    if (!Q::fit(*lo_it, *hi_it, p)) continue;
    const auto P = Q::load(p);
    const float inv = Q::reciprocal(P);
    const bool within = Q::rounds_within_levels(*lo_it, *hi_it, P, inv);
    groups_within += within;
    for (float v : x) {
      if (within) REQUIRE(Q::rounds_within_levels(v, v, P, inv));
      REQUIRE(float_bits(Q::template encode_exact<true>(v, P, inv)) - Q::exact_bias == Q::encode(v, P));
    }
  }
  INFO(groups_within, " groups within the levels");
  CHECK(groups_within > 1900);
}

// Found by fuzz_quantize: a group of mixed ±0 (and denormals that flush to zero in fp16) has a
// range whose ends are zeros of either sign depending on the order of the search; the stored
// scale/zero must not depend on it.
TEST_CASE_TEMPLATE("signed zeros give the same parameter bits on every backend", Q, XQ_TOKEN_QUANTIZERS,
                   XQ_CHANNEL_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const index_t rows = 64, width = 64, group = 32;
  std::uniform_int_distribution<int> pick(0, 7);
  std::vector<float> x(static_cast<std::size_t>(rows * width));
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < width; ++c) {
      // Only ±0 in the first 32 rows and columns (so both token and channel groups of pure zeros
      // occur); elsewhere also a positive denormal, which leaves a zero as the minimum.
      const int k = (r < 32 || c < 32) ? pick(g) % 2 : pick(g);
      x[static_cast<std::size_t>(r * width + c)] = k >= 6 ? 1e-43f : k % 2 == 0 ? 0.0f : -0.0f;
    }
  const auto ref = quantize<Q, backend::Reference>(x, rows, width, group);
  const auto fast = quantize<Q, backend::Eigen>(x, rows, width, group);
  REQUIRE(fast.codes == ref.codes);
  REQUIRE(fast.params == ref.params);
}

TEST_CASE_TEMPLATE("reference quantization agrees with float64 math and meets the error bound", Q, XQ_TOKEN_QUANTIZERS,
                   XQ_CHANNEL_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const double levels = Q::scheme == Scheme::Asymmetric ? double(Q::max_code) : double(Q::sym_levels);
  for (const auto& shape : shapes<Q>()) {
    const index_t rows = shape[0], width = shape[1], group = shape[2];  // named for INFO (C++17)
    INFO("rows ", rows, " width ", width, " group ", group);
    const auto x = xqtest::activations(g, rows, width);
    const auto q = quantize<Q, backend::Reference>(x, rows, width, group);
    const auto xh = dequantize<Q, backend::Reference>(q, rows, width, group);
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(width));
    for (index_t r = 0; r < rows; ++r) {
      quant::unpack_codes<Q::bits>(q.codes.data() + r * Q::code_bytes(width), width, codes.data());
      for (index_t c = 0; c < width; ++c) {
        // Group statistics and stored parameters, in float64.
        double lo = 1e300, hi = -1e300;
        for (auto i : members<Q>(r, c, rows, width, group)) lo = std::min(lo, double(x[i])), hi = std::max(hi, double(x[i]));
        const std::size_t pidx =
            Q::axis == Axis::Token ? static_cast<std::size_t>((r * (width / group) + c / group) * Q::params_per_group)
                                   : static_cast<std::size_t>(((r / group) * width + c) * Q::params_per_group);
        const double sh = half_to_float(q.params[pidx]);
        const double zh = Q::params_per_group == 2 ? double(half_to_float(q.params[pidx + 1])) : 0.0;
        const double s = Q::scheme == Scheme::Asymmetric ? (hi - lo) / levels : std::max(-lo, hi) / levels;
        const double v = x[static_cast<std::size_t>(r * width + c)];
        // The stored parameters are the fp16 roundings of the exact ones.
        REQUIRE(std::fabs(sh - s) <= std::ldexp(std::fabs(s), -11) + 6e-8);
        if (Q::scheme == Scheme::Asymmetric) REQUIRE(std::fabs(zh - lo) <= std::ldexp(std::fabs(lo), -11) + 6e-8);
        // Code: round((x − z)/s) clamped, in float64; a tie within float rounding may go either way.
        const double t = Q::scheme == Scheme::Asymmetric ? (v - zh) / sh : v / sh + levels;
        const double top = Q::scheme == Scheme::Asymmetric ? levels : 2 * levels;
        const double want = sh > 0 ? std::clamp(std::nearbyint(Q::scheme == Scheme::Asymmetric ? t : t - levels) +
                                                    (Q::scheme == Scheme::Asymmetric ? 0 : levels), 0.0, top)
                                   : (Q::scheme == Scheme::Asymmetric ? 0.0 : levels);
        // Near a tie the float computation may land on either side: it rounds x − z and the
        // quotient, each by up to half an ulp of t's magnitude (up to 255 at 8 bits, where a fixed
        // 1e-5 window was too narrow: seed 1111260982727119438 put t within 2e-5 of 188.5).
        const bool near_tie = std::fabs(std::fabs(t - std::floor(t)) - 0.5) < 1e-5 + 8 * std::ldexp(std::fabs(t), -24);
        if (!near_tie) REQUIRE(double(codes[c]) == want);
        // Error bound. Rounding to the stored grid costs ≤ sh/2. Storing z in fp16 can push the
        // lowest values below the grid (clamped at 0: ≤ |zh − lo|), and storing s in fp16 can
        // shrink the grid's top below the max (clamped: ≤ levels·|s − sh| + |zh − lo|). The float
        // arithmetic adds a few ulps of the group's magnitude.
        const double bound = sh / 2 + std::fabs(zh - lo) + levels * std::fabs(s - sh) +
                             4 * std::ldexp(std::max(std::fabs(lo), std::fabs(hi)), -24);
        REQUIRE(std::fabs(double(xh[static_cast<std::size_t>(r * width + c)]) - v) <= bound);
      }
    }
  }
}

namespace {
/// x rounded once to bf16 (8 significant bits, nearest even), from float64.
double round_once_bf16(double x) {
  if (x == 0.0) return x;
  int e;
  const double m = std::frexp(x, &e);  // |m| in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
}
/// A float's value after rounding to bf16 (nearest even): the CPU decode as the GEMM takes it.
double float_to_bf16(float x) {
  std::uint32_t b = float_bits(x);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return bits_float(b & 0xFFFF0000u);
}
bool has_8_bits(float x) { return (float_bits(x) & 0xFFFFu) == 0; }
}  // namespace

TEST_CASE_TEMPLATE("ParamBits::Bf16: parameters of 8 significant bits span the group, and one bf16 rounding of the "
                   "exact decode equals the float decode rounded to bf16",
                   Q, XQ_BF16_PARAM_QUANTIZERS) {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-40, 14);  // past both ends of fp16's range: scales from 2^-24 on
  const float levels = Q::scheme == Scheme::Asymmetric ? float(Q::max_code) : float(Q::sym_levels);
  int zeros = 0;
  for (int it = 0; it < 200000; ++it) {
    // Ranges of every magnitude, centred on zero, offset from it, or tiny next to their offset.
    const float mag = std::ldexp(1.0f, ex(g)), centre = it % 3 == 0 ? 0.0f : u(g) * std::ldexp(1.0f, ex(g));
    float lo = centre + mag * u(g), hi = centre + mag * u(g);
    if (it % 7 == 0) lo = std::ldexp(u(g), -30) * std::fabs(hi);  // a minimum next to zero: the flushed zero
    if (lo > hi) std::swap(lo, hi);
    CAPTURE(lo);
    CAPTURE(hi);
    std::uint16_t p[2] = {0, 0};
    REQUIRE(Q::fit(lo, hi, p));
    const auto P = Q::load(p);
    REQUIRE(has_8_bits(P.scale));
    REQUIRE(has_8_bits(P.zero));
    REQUIRE((P.scale == 0.0f || P.scale >= 0x1p-24f));  // the floor that keeps encode_scaled exact
    if (Q::scheme == Scheme::Asymmetric) {
      // The levels span the group (the scale rounded up, the zero down), and a zero is 0 or at
      // least 2^-20 of the scale.
      REQUIRE((P.zero <= lo || P.zero == 0.0f));
      REQUIRE(double(P.zero) + double(levels) * P.scale >= double(hi));  // (exactly: fit compares with the stored zero)
      REQUIRE((P.zero == 0.0f || std::fabs(P.zero) >= P.scale * 0x1p-20f));
      zeros += P.zero == 0.0f && lo != 0.0f;
    } else {
      REQUIRE(double(levels) * P.scale >= std::max(-double(lo), double(hi)));
    }
    // The packed decode's exactness is claimed for codes of up to 4 bits (ParamBits): an 8-bit
    // code times an 8-bit scale has 16 significant bits, and the float sum with the zero can round.
    if (Q::bits > 4) continue;
    for (std::uint32_t c = 0; c <= Q::max_code; ++c) {
      CAPTURE(c);
      const double exact = Q::scheme == Scheme::Asymmetric
                               ? double(P.scale) * c + double(P.zero)
                               : double(P.scale) * (static_cast<int>(c) - Q::sym_levels);
      REQUIRE(float_to_bf16(Q::decode(c, P)) == round_once_bf16(exact));
    }
  }
  if (Q::scheme == Scheme::Asymmetric) CHECK(zeros > 0);  // the flush was reached
  // Ranges whose top level zero + levels·scale, rounded to float, lands on hi from below (the
  // draws above almost never make one): hi is that float sum rounded up, for a bf16 zero and
  // scale. fit must see the shortfall, below half an ulp of hi, and step the scale up.
  if (Q::scheme == Scheme::Asymmetric) {
    std::uniform_int_distribution<int> bits8(128, 255), e(-20, 12);
    for (int it = 0, tried = 0; tried < 2000; ++it) {
      REQUIRE(it < 1000000);
      const float z = std::ldexp(float(bits8(g)), e(g)) * (g() & 1 ? 1.0f : -1.0f);
      const float s = std::ldexp(float(bits8(g)), e(g) - 12);
      const double top = double(z) + double(levels) * s;
      const float hi = static_cast<float>(top);
      if (!(double(hi) > top) || std::fabs(hi) > 65504.0f || !(hi > z)) continue;
      ++tried;
      CAPTURE(z);
      CAPTURE(hi);
      std::uint16_t p[2] = {0, 0};
      REQUIRE(Q::fit(z, hi, p));
      const auto P = Q::load(p);
      REQUIRE(double(P.zero) + double(levels) * P.scale >= double(hi));
    }
    // And no step where none is needed: hi = levels·s exactly for a bf16 s, above a minimum next to
    // zero whose zero is flushed. The levels reach hi with s itself (the unflushed zero, tiny and
    // negative, would have them fall short by it).
    for (int it = 0; it < 2000; ++it) {
      const float s = std::ldexp(float(bits8(g)), e(g) - 12);
      const float hi = levels * s, lo = -std::ldexp(float(bits8(g)), -40) * s;
      if (hi > 65504.0f || s < 0x1p-24f) continue;  // (scales start at 2^-24)
      CAPTURE(lo);
      CAPTURE(hi);
      std::uint16_t p[2] = {0, 0};
      REQUIRE(Q::fit(lo, hi, p));
      const auto P = Q::load(p);
      REQUIRE(P.scale == s);
      REQUIRE(P.zero == 0.0f);
    }
  }
  // Ranges whose (hi − zero) / levels rounds down onto a bf16 value (about one draw in a million
  // above), and three of the kind just drawn: fit must move the scale one bf16 step up, or the
  // levels fall short of hi.
  struct Range {
    std::uint32_t max_code;
    float lo, hi;
  };
  for (const Range r : {Range{3, -0x1.ae746ep-18f, 0x1.c80004p-19f}, Range{7, -0x1.4a0174p+11f, 0x1.9a0002p+11f},
                        Range{7, -0x1.07455ep+4f, 0x1.380002p+3f}, Range{3, 0x1.86p-8f, 0x1.4a00c4p+9f},
                        Range{7, -0x1.a8p-9f, 0x1.19bfccp+10f}, Range{15, -0x1.1ep-12f, 0x1.085ff8p+9f}}) {
    if (Q::scheme != Scheme::Asymmetric || Q::max_code != r.max_code) continue;
    CAPTURE(r.lo);
    std::uint16_t p[2] = {0, 0};
    REQUIRE(Q::fit(r.lo, r.hi, p));
    const auto P = Q::load(p);
    CHECK(double(P.zero) + double(Q::max_code) * P.scale >= double(r.hi));
  }
  // Activations past fp16's range, or not finite, are refused as with fp16 parameters.
  std::uint16_t p[2];
  CHECK_FALSE(Q::fit(-1.0f, 70000.0f, p));
  CHECK_FALSE(Q::fit(-70000.0f, 1.0f, p));
  CHECK_FALSE(Q::fit(std::nanf(""), 1.0f, p));
  CHECK_FALSE(Q::fit(0.0f, std::numeric_limits<float>::infinity(), p));
}

TEST_CASE("constant groups quantize exactly and symmetric 2-bit has levels -s, 0, s") {
  std::vector<float> x(64, 3.25f);
  const auto q = quantize<Uniform<4>, backend::Eigen>(x, 1, 64, 32);
  const auto xh = dequantize<Uniform<4>, backend::Eigen>(q, 1, 64, 32);
  for (float v : xh) CHECK(v == 3.25f);
  using S2 = Uniform<2, Axis::Token, Scheme::Symmetric>;
  std::vector<float> y = {-1.0f, -0.4f, 0.1f, 0.9f, 1.0f, 0.6f, -0.6f, 0.0f};
  const auto qs = quantize<S2, backend::Reference>(y, 1, 8, 8);
  const auto ys = dequantize<S2, backend::Reference>(qs, 1, 8, 8);
  const std::vector<float> want = {-1, 0, 0, 1, 1, 1, -1, 0};
  CHECK(ys == want);
}

TEST_CASE("values beyond the fp16 range of scale/zero raise ValueError naming X") {
  std::vector<float> x(32, 1.0f);
  x[3] = 1e6f;
  CHECK_THROWS_AS((quantize<Uniform<4>, backend::Eigen>(x, 1, 32, 32)), ValueError);
  CHECK_THROWS_AS((quantize<Uniform<4>, backend::Reference>(x, 1, 32, 32)), ValueError);
  CHECK_THROWS_WITH((quantize<Uniform<4>, backend::Eigen>(x, 1, 32, 32)), doctest::Contains("X: a quantization group"));
}

TEST_CASE("dispatch_bits maps runtime bit widths to types and rejects the rest") {
  for (int b : {2, 3, 4, 8}) CHECK(dispatch_bits(b, [](auto B) { return int(B); }) == b);
  for (int b : {0, 1, 5, 6, 7, 16}) CHECK_THROWS_AS(dispatch_bits(b, [](auto B) { return int(B); }), ConfigError);
  CHECK_THROWS_WITH(dispatch_bits(5, [](auto B) { return int(B); }), "bits: must be 2, 3, 4 or 8, got 5");
}
