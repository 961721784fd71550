// Fuzz target: Cache::restore on arbitrary bytes. Input: one selector byte (bits 0-1: which cache,
// bit 2: rewrite the trailing CRC-32 so that mutated payloads get past the checksum and reach the
// field checks), then the snapshot bytes.
//
// Oracles: restore ends in xquant::Error or in a sequence whose own snapshot is byte-identical to
// the input (the format has one encoding per content) and whose values are all finite; on error no
// sequence is left behind and the sequence already in the cache is untouched; a restored sequence
// takes further appends.

#include <xquant/xquant.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "snapshot_setup.hpp"

namespace xq = xquant;

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fuzz_snapshot: oracle violated: %s\n", what);
  std::abort();
}
#define XQ_CHECK(cond)      \
  do {                      \
    if (!(cond)) die(#cond); \
  } while (0)

template <class Codec>
void fuzz(const Codec& codec, const std::vector<std::uint8_t>& bytes) {
  xq::Cache<Codec> cache(fuzzsetup::snapshot_config(), codec);
  const xq::index_t d = cache.config().width;
  // A resident sequence, so that restore works on a pool in use.
  const auto resident = cache.add_sequence();
  std::vector<float> x(static_cast<std::size_t>(21 * d));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i)) * 3.0f;
  for (int l = 0; l < cache.config().layers; ++l) cache.append(resident, l, x.data(), 21);
  const auto before = cache.snapshot(resident);

  xq::SequenceId r = 0;
  bool ok = false;
  try {
    r = cache.restore(bytes.data(), bytes.size());
    ok = true;
  } catch (const xq::Error&) {
  }
  XQ_CHECK(cache.snapshot(resident) == before);
  if (!ok) {
    XQ_CHECK(cache.add_sequence() == resident + 1);  // nothing half-restored holds an id
    return;
  }
  XQ_CHECK(r == resident + 1);
  XQ_CHECK(cache.snapshot(r) == bytes);
  for (int l = 0; l < cache.config().layers; ++l) {
    const xq::index_t n = cache.length(r, l);
    std::vector<float> out(static_cast<std::size_t>(n * d), NAN);
    cache.state().dequantize(r, l, 0, n, out.data(), d);
    for (float v : out) XQ_CHECK(std::isfinite(v));
    try {
      cache.append(r, l, x.data(), 5);
    } catch (const xq::CapacityError&) {  // sealed, or no room left
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t sel = data[0];
  std::vector<std::uint8_t> bytes(data + 1, data + size);
  if ((sel & 4) && bytes.size() >= 4) {
    const std::uint32_t crc = xq::snapshot::crc32(bytes.data(), bytes.size() - 4);
    for (int i = 0; i < 4; ++i) bytes[bytes.size() - 4 + i] = static_cast<std::uint8_t>(crc >> (8 * i));
  }
  switch (sel & 3) {
    case 0: fuzz(fuzzsetup::token_codec(), bytes); break;
    case 1: fuzz(fuzzsetup::channel_codec(), bytes); break;
    default: fuzz(fuzzsetup::half_codec(), bytes); break;
  }
  return 0;
}
