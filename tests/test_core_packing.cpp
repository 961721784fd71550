// Dense bit packing: round trips for every width and odd lengths, and the exact bit layout.
#include <xquant/xquant.hpp>

#include "support.hpp"

using namespace xquant;

TEST_CASE_TEMPLATE("pack_codes/unpack_codes round-trip every length", B, std::integral_constant<int, 1>,
                   std::integral_constant<int, 2>, std::integral_constant<int, 3>, std::integral_constant<int, 4>,
                   std::integral_constant<int, 5>, std::integral_constant<int, 8>) {
  constexpr int Bits = B::value;
  std::uint64_t seed;
  auto g = xqtest::make_rng(seed);
  INFO("seed ", seed, " bits ", Bits);
  std::uniform_int_distribution<int> code(0, (1 << Bits) - 1);
  for (index_t n = 1; n <= 131; ++n) {
    std::vector<std::uint8_t> c(n), back(n, 0xAA), packed(quant::packed_bytes<Bits>(n) + 1, 0x5A);
    for (auto& v : c) v = static_cast<std::uint8_t>(code(g));
    quant::pack_codes<Bits>(c.data(), n, packed.data());
    REQUIRE(packed.back() == 0x5A);  // never writes past packed_bytes
    quant::unpack_codes<Bits>(packed.data(), n, back.data());
    REQUIRE(back == c);
    // Dense little-endian layout: code i sits at bit i*Bits of the row.
    for (index_t i = 0; i < n; ++i) {
      int v = 0;
      for (int b = 0; b < Bits; ++b) {
        const index_t bit = i * Bits + b;
        v |= ((packed[bit / 8] >> (bit % 8)) & 1) << b;
      }
      REQUIRE(v == c[i]);
    }
  }
  CHECK(quant::packed_bytes<3>(8) == 3);  // 3-bit codes are not padded to 4 bits
  CHECK(quant::packed_bytes<3>(128) == 48);
}
