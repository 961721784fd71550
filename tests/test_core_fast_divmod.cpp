// FastDivmod against the hardware's own division: every divisor up to 4096 and powers of two and
// their neighbours up to 2^31 + 1, and random large divisors, each with edge and random dividends.
#include <random>

#include <xquant/core/fast_divmod.hpp>

#include "support.hpp"

using xquant::FastDivmod;
using xquant::ceil_log2;

namespace {
// Checks d on the dividends around 0, around multiples of d near the top of the range, the top
// itself, and `draws` random ones; returns the number of mismatches.
int mismatches(std::uint32_t d, std::mt19937& rng, int draws) {
  const FastDivmod f(d);
  int bad = 0;
  auto check = [&](std::uint32_t n) {
    const std::uint32_t q = f.div(n);
    if (q != n / d || f.mod(n, q) != n % d) ++bad;
  };
  for (std::uint32_t n = 0; n < 64; ++n) check(n);
  const std::uint32_t top = 0xFFFFFFFFu;
  for (std::uint32_t k = 0; k < 4; ++k) {
    const std::uint32_t m = (top / d - k) * d;  // multiples of d near 2^32
    check(m);
    check(m - 1);
    if (m <= top - 1) check(m + 1);
  }
  check(top);
  check(top - 1);
  check(0x7FFFFFFFu);
  check(0x80000000u);
  std::uniform_int_distribution<std::uint32_t> any(0, top);
  for (int i = 0; i < draws; ++i) check(any(rng));
  return bad;
}
}  // namespace

TEST_CASE("FastDivmod equals / and % for small divisors, powers of two and random divisors") {
  std::mt19937 rng(20261130);
  int bad = 0;
  for (std::uint32_t d = 1; d <= 4096; ++d) bad += mismatches(d, rng, 200);
  for (int s = 0; s < 32; ++s) {
    const std::uint32_t p = 1u << s;
    for (std::uint32_t d : {p - 1, p, p + 1})
      if (d >= 1) bad += mismatches(d, rng, 200);
  }
  std::uniform_int_distribution<std::uint32_t> any(1, 0xFFFFFFFFu);
  for (int i = 0; i < 20000; ++i) bad += mismatches(any(rng), rng, 20);
  CHECK(bad == 0);
  CHECK(FastDivmod(3).div(0xFFFFFFFFu) == 0x55555555u);
}

TEST_CASE("FastDivmod rejects a zero divisor") {
  CHECK_THROWS_AS(FastDivmod(0), xquant::ConfigError);
}

TEST_CASE("ceil_log2 is the smallest b with 2^b >= n") {
  static_assert(ceil_log2(0) == 0 && ceil_log2(1) == 0 && ceil_log2(2) == 1 && ceil_log2(3) == 2 && ceil_log2(4) == 2);
  auto ok = [](std::uint64_t n) {
    const unsigned b = ceil_log2(n);
    if (n <= 1) return b == 0;
    if (n > (std::uint64_t(1) << 63)) return b == 64;
    return (std::uint64_t(1) << b) >= n && (std::uint64_t(1) << (b - 1)) < n;
  };
  int bad = 0;
  for (std::uint64_t n = 0; n <= 70000; ++n) bad += !ok(n);
  for (int s = 1; s < 64; ++s) {
    const std::uint64_t p = std::uint64_t(1) << s;
    for (std::uint64_t n : {p - 1, p, p + 1}) bad += !ok(n);
  }
  bad += !ok(~std::uint64_t(0));
  std::mt19937_64 rng(20261201);
  for (int i = 0; i < 100000; ++i) bad += !ok(rng() >> (rng() % 64));
  CHECK(bad == 0);
}
