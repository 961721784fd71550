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
