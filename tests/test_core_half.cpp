// fp16 conversions: exhaustive over all 65536 halves, and against independent rounding for floats.
#include <xquant/xquant.hpp>

#include "support.hpp"

using xquant::float_to_half;
using xquant::half_to_float;

namespace {
// Independent float64 decode of fp16 bits.
double half_value(std::uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}
}  // namespace

TEST_CASE("half_to_float is exact for every finite fp16 value and float_to_half inverts it") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    if (((b >> 10) & 31) == 31) continue;  // Inf/NaN checked below
    REQUIRE(static_cast<double>(half_to_float(b)) == half_value(b));
    REQUIRE(float_to_half(half_to_float(b)) == b);
  }
  CHECK(std::isinf(half_to_float(0x7c00)));
  CHECK(std::isnan(half_to_float(0x7e00)));
  CHECK(float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(std::isnan(half_to_float(float_to_half(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("float_to_half rounds to the nearest fp16 value, ties to even, overflow to Inf") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> expo(-30, 17);
  std::vector<float> xs = {65504.0f, 65519.996f, 65520.0f, 1e-8f, 5.9604645e-8f, 2.9802322e-8f, 8.940697e-8f,
                           -0.0f, 1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 6.097555e-5f, 6.1035156e-5f};
  for (int i = 0; i < 200000; ++i)  // every binade from fp16 underflow to overflow, both signs
    xs.push_back(std::ldexp(mant(g), expo(g)) * (i % 2 ? -1.0f : 1.0f));
  for (float f : xs) {
    const std::uint16_t h = float_to_half(f);
    const double x = f;
    if (std::fabs(x) >= 65520.0) {
      CHECK(h == (std::signbit(f) ? 0xfc00 : 0x7c00));
      continue;
    }
    const double v = half_value(h);
    // Neighbours in magnitude: no representable half is closer; on a tie the mantissa is even.
    const std::uint16_t mag = h & 0x7fff;
    for (int step : {-1, 1}) {
      const int nb = mag + step;
      if (nb < 0 || nb >= 0x7c00) continue;
      const double w = half_value(static_cast<std::uint16_t>(nb)) * (std::signbit(f) ? -1 : 1);
      INFO("f = ", f, " h = ", h);
      REQUIRE(std::fabs(x - v) <= std::fabs(x - w));
      if (std::fabs(x - v) == std::fabs(x - w)) REQUIRE((mag & 1) == 0);
    }
#if defined(__FLT16_MAX__)
    REQUIRE(static_cast<double>(static_cast<_Float16>(f)) == v);  // the compiler's own conversion agrees
#endif
  }
}

TEST_CASE("fits_half is half_is_finite(float_to_half(f)) without the conversion") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::vector<float> xs = {65504.0f, 65519.996f, 65520.0f, 65536.0f, 1e30f, 0.0f, -0.0f, 1e-40f,
                           std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (float f = 65000.0f; f < 66000.0f; f = std::nextafter(f, 1e9f)) xs.push_back(f);  // every float near the edge
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 100000; ++i) xs.push_back(xquant::bits_float(bits(g)));  // NaNs included
  for (float f : xs)
    for (float v : {f, -f}) {
      INFO("v = ", v);
      REQUIRE(xquant::fits_half(v) == xquant::half_is_finite(float_to_half(v)));
    }
}

namespace {
// Every rounding case of float -> fp16: both signs, every float exponent, every pattern of the ten
// mantissa bits fp16 keeps, and low bits on, just below and just above the rounding point (for
// subnormal results the rounding point moves into the ten bits, which are all enumerated).
std::vector<float> rounding_cases(std::mt19937_64& g) {
  std::uniform_int_distribution<std::uint32_t> low(0, 0x1fff);
  std::vector<float> xs;
  for (std::uint32_t sign : {0u, 1u})
    for (std::uint32_t e = 0; e < 256; ++e)
      for (std::uint32_t hi = 0; hi < 1024; ++hi)
        for (std::uint32_t lo : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu, low(g)})
          xs.push_back(xquant::bits_float(sign << 31 | e << 23 | hi << 13 | lo));
  xs.push_back(1.0f);  // an odd count, so the vector loops leave a tail
  return xs;
}
bool same_or_both_nan(float a, float b) {
  return std::isnan(a) ? std::isnan(b) : xquant::float_bits(a) == xquant::float_bits(b);
}
}  // namespace

TEST_CASE("bulk conversions give the bits of the scalar ones (F16C when the CPU has it)") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const bool f16c = xquant::detail::cpu_has_f16c();
#if defined(XQUANT_NO_F16C)
  REQUIRE_FALSE(f16c);  // this build must test the scalar loops
#endif
  if (!f16c) MESSAGE("no F16C (CPU, compiler or XQUANT_NO_F16C): the bulk conversions take the scalar loops");
  const auto xs = rounding_cases(g);
  const std::size_t n = xs.size();
  REQUIRE(n % 8 != 0);

  std::vector<std::uint16_t> h(n, 0x7e01);  // a NaN no conversion produces
  xquant::floats_to_halves(xs.data(), h.data(), n);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint16_t want = float_to_half(xs[i]);
    wrong += std::isnan(xs[i]) ? !(((h[i] >> 10) & 31) == 31 && (h[i] & 1023)) : h[i] != want;
  }
  CHECK(wrong == 0);

  auto r = xs;
  xquant::round_floats_to_half(r.data(), n);
  wrong = 0;
  for (std::size_t i = 0; i < n; ++i) wrong += !same_or_both_nan(r[i], xquant::round_to_half(xs[i]));
  CHECK(wrong == 0);

  std::vector<std::uint16_t> all(65536 + 3);  // every fp16 value, plus a tail
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  auto f = xqtest::poisoned(all.size());  // an unwritten finite value shows as NaN below
  xquant::halves_to_floats(all.data(), f.data(), all.size());
  wrong = 0;
  for (std::size_t i = 0; i < all.size(); ++i) wrong += !same_or_both_nan(f[i], half_to_float(all[i]));
  CHECK(wrong == 0);
}

TEST_CASE("find_half_misfit names the first value outside the fp16 range") {
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  auto x = xqtest::randn(g, 1000, 1000.0f);
  CHECK(xquant::find_half_misfit(x.data(), x.size()) == x.size());
  CHECK(xquant::find_half_misfit(x.data(), 0) == 0);
  std::uniform_int_distribution<std::size_t> front(0, 499), back(500, 999);
  const std::size_t first = front(g), later = back(g);
  x[later] = std::numeric_limits<float>::quiet_NaN();
  x[first] = -65520.0f;  // the smallest magnitude that rounds to -Inf
  CHECK(xquant::find_half_misfit(x.data(), x.size()) == first);
  x[first] = 65519.996f;  // the largest that rounds to 65504
  CHECK(xquant::find_half_misfit(x.data(), x.size()) == later);
}

namespace {
// Independent float64 value of bf16 bits (finite ones).
double bf16_value(std::uint16_t b) {
  const int e = (b >> 7) & 255, m = b & 127;
  const double v = e == 0 ? std::ldexp(m, -133) : std::ldexp(128 + m, e - 134);
  return (b & 0x8000) ? -v : v;
}
}  // namespace

TEST_CASE("bf16_to_float is exact, and float_to_bf16_toward rounds toward +Inf or -Inf") {
  // Every finite bf16 value, sorted: the reference brackets each float between two of them.
  std::vector<double> values;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    if (((h >> 7) & 255) == 255) continue;  // Inf, NaN
    REQUIRE(static_cast<double>(xquant::bf16_to_float(h)) == bf16_value(h));
    CHECK(xquant::float_to_bf16_toward(xquant::bf16_to_float(h), true) == h);  // exact: unchanged,
    CHECK(xquant::float_to_bf16_toward(xquant::bf16_to_float(h), false) == h);  // −0 included
    values.push_back(bf16_value(h));
  }
  std::sort(values.begin(), values.end());
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 200000; ++i) {
    const float x = xquant::bits_float(any(g));
    if (!std::isfinite(x)) continue;
    CAPTURE(x);
    const double up = xquant::bf16_to_float(xquant::float_to_bf16_toward(x, true));
    const double down = xquant::bf16_to_float(xquant::float_to_bf16_toward(x, false));
    const auto above = std::lower_bound(values.begin(), values.end(), static_cast<double>(x));
    const auto below = std::upper_bound(values.begin(), values.end(), static_cast<double>(x));
    CHECK(up == (above == values.end() ? INFINITY : *above));      // the least bf16 >= x
    CHECK(down == (below == values.begin() ? -INFINITY : below[-1]));  // the greatest bf16 <= x
  }
  CHECK(std::isnan(xquant::bf16_to_float(xquant::float_to_bf16_toward(std::nanf(""), true))));
  CHECK(xquant::float_to_bf16_toward(INFINITY, false) == 0x7f80u);
  CHECK(xquant::float_to_bf16_toward(-INFINITY, true) == 0xff80u);
}
