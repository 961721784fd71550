#pragma once
// Byte format of a cache snapshot: one sequence's cache (every layer, the codec's streams, their
// lengths, sealed flags, quantized blocks and fp16 windows) as a self-checking byte string, for
// swapping a sequence out to host memory or disk and for prefix reuse. docs/RELIABILITY.md has
// the format in a table; Cache::snapshot / Cache::restore (cache.hpp) are the entry points.
//
//   offset  size  field
//   0       8     magic "XQSNAP\r\n"
//   8       4     format version (kFormatVersion)
//   12      4     D: length of the configuration description
//   16      8     fingerprint: FNV-1a 64 of the description
//   24      8     P: payload length
//   32      D     description (ASCII): cache geometry, codec type, quantizer, codec options
//   32+D    P     payload, written by the codec's State::save (Stream records, see stream.hpp)
//   32+D+P  4     CRC-32 (ISO-HDLC, as zlib's crc32) of every byte before it
// Integers are little-endian. A snapshot restores only into a cache whose description is the same;
// capacity is not part of it (a sequence may move into a larger or smaller pool that has room).
//
// Every read goes through Reader, which checks bounds and raises SnapshotError naming the field
// and offset; nothing is allocated from a size field before the bytes behind it are known to exist.

#include <array>
#include <cstring>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../quant/format.hpp"

namespace xquant {

/// A snapshot is malformed: truncated, corrupted (checksum), of another format version, or
/// internally inconsistent. (A snapshot of a differently configured cache raises ConfigError.)
struct SnapshotError : Error {
  using Error::Error;
};

namespace snapshot {

inline constexpr char kMagic[8] = {'X', 'Q', 'S', 'N', 'A', 'P', '\r', '\n'};
inline constexpr std::uint32_t kFormatVersion = 1;
inline constexpr std::size_t kHeaderBytes = 32;
inline constexpr std::size_t kTrailerBytes = 4;
/// Longest description accepted from a snapshot (ours are a few hundred bytes).
inline constexpr std::uint32_t kMaxDescription = 4096;

/// CRC-32 (reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF), as zlib's crc32.
/// Pass the previous result as `crc` to continue over more bytes.
inline std::uint32_t crc32(const std::uint8_t* p, std::size_t n, std::uint32_t crc = 0) {
  static const std::array<std::array<std::uint32_t, 256>, 4> table = [] {
    std::array<std::array<std::uint32_t, 256>, 4> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (std::uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 4; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xffu];
    return t;
  }();
  crc = ~crc;
  for (; n >= 4; n -= 4, p += 4) {  // slicing by 4
    crc ^= static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
           static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
    crc = table[3][crc & 0xffu] ^ table[2][(crc >> 8) & 0xffu] ^ table[1][(crc >> 16) & 0xffu] ^ table[0][crc >> 24];
  }
  for (; n > 0; --n, ++p) crc = table[0][(crc ^ *p) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

/// FNV-1a 64 of `n` bytes; pass the previous result as `h` to continue over more bytes.
inline std::uint64_t fnv1a64(const void* p, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}
/// FNV-1a 64 of a string: the fingerprint of a configuration description.
inline std::uint64_t fnv1a64(const std::string& s) { return fnv1a64(s.data(), s.size()); }
/// A 64-bit fingerprint as 16 lowercase hex digits (for descriptions).
inline std::string hex64(std::uint64_t v) {
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[static_cast<std::size_t>(i)] = "0123456789abcdef"[v & 0xfu];
  return s;
}

/// Appends little-endian fields to a byte vector.
class Writer {
 public:
  explicit Writer(std::vector<std::uint8_t>& out) : out_(out) {}
  void u8(std::uint8_t v) { out_.push_back(v); }
  void u32(std::uint32_t v) { put(v, 4); }
  void u64(std::uint64_t v) { put(v, 8); }
  void i64(index_t v) { put(static_cast<std::uint64_t>(v), 8); }
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  /// fp16 bit patterns (or any 16-bit words), little-endian.
  void u16s(const std::uint16_t* p, std::size_t n) {
    const std::size_t at = out_.size();
    out_.resize(at + 2 * n);
    for (std::size_t i = 0; i < n; ++i) {
      out_[at + 2 * i] = static_cast<std::uint8_t>(p[i]);
      out_[at + 2 * i + 1] = static_cast<std::uint8_t>(p[i] >> 8);
    }
  }
  /// fp32 values as their little-endian bit patterns.
  void f32s(const float* p, std::size_t n) {
    const std::size_t at = out_.size();
    out_.resize(at + 4 * n);
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t u;
      std::memcpy(&u, p + i, 4);
      for (int k = 0; k < 4; ++k) out_[at + 4 * i + k] = static_cast<std::uint8_t>(u >> (8 * k));
    }
  }
  std::size_t size() const { return out_.size(); }
  std::vector<std::uint8_t>& buffer() { return out_; }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
  }
  std::vector<std::uint8_t>& out_;
};

/// Bounds-checked little-endian reads; every failure is a SnapshotError naming the field.
class Reader {
 public:
  Reader(const std::uint8_t* p, std::size_t n, std::size_t base = 0) : p_(p), n_(n), base_(base) {}
  std::uint8_t u8(const char* what) { return static_cast<std::uint8_t>(get(what, 1)); }
  std::uint32_t u32(const char* what) { return static_cast<std::uint32_t>(get(what, 4)); }
  std::uint64_t u64(const char* what) { return get(what, 8); }
  /// A signed count that must lie in [lo, hi].
  index_t count(const char* what, index_t lo, index_t hi) {
    const std::uint64_t v = get(what, 8);
    if (v > static_cast<std::uint64_t>(hi) || static_cast<index_t>(v) < lo)
      fail(what, ": value ", v, " is outside [", lo, ", ", hi, "]");
    return static_cast<index_t>(v);
  }
  bool flag(const char* what) {
    const std::uint8_t v = u8(what);
    if (v > 1) fail(what, ": flag must be 0 or 1, got ", static_cast<int>(v));
    return v == 1;
  }
  void bytes(const char* what, void* out, std::size_t n) {
    need(what, n);
    if (n) std::memcpy(out, p_ + pos_, n);
    pos_ += n;
  }
  void u16s(const char* what, std::uint16_t* out, std::size_t n) {
    need(what, n <= remaining() / 2 ? 2 * n : remaining() + 1);
    for (std::size_t i = 0; i < n; ++i)
      out[i] = static_cast<std::uint16_t>(p_[pos_ + 2 * i] | (p_[pos_ + 2 * i + 1] << 8));
    pos_ += 2 * n;
  }
  /// fp32 values written by Writer::f32s; each must be finite.
  void f32s(const char* what, float* out, std::size_t n) {
    need(what, n <= remaining() / 4 ? 4 * n : remaining() + 1);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint8_t* b = p_ + pos_ + 4 * i;
      const std::uint32_t u = static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8 |
                              static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24;
      if ((u & 0x7f800000u) == 0x7f800000u) fail(what, ": value ", i, " is not finite");
      std::memcpy(out + i, &u, 4);
    }
    pos_ += 4 * n;
  }
  /// Throws unless `n` more bytes are present (call before allocating from a size field).
  void need(const char* what, std::size_t n) const {
    if (n > remaining())
      fail(what, ": truncated, needs ", n, " bytes but only ", remaining(), " remain");
  }
  std::size_t remaining() const { return n_ - pos_; }
  std::size_t offset() const { return base_ + pos_; }

  template <class... Parts>
  [[noreturn]] void fail(const char* what, const Parts&... parts) const {
    throw SnapshotError(xquant::detail::concat("snapshot: ", what, " at byte ", offset(), parts...));
  }

 private:
  std::uint64_t get(const char* what, int n) {
    need(what, static_cast<std::size_t>(n));
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p_[pos_ + i]) << (8 * i);
    pos_ += static_cast<std::size_t>(n);
    return v;
  }
  const std::uint8_t* p_;
  std::size_t n_, pos_ = 0, base_;
};

/// A quantizer policy as text, for configuration descriptions: "Uniform<4,Token,Asymmetric>",
/// "Fp16", "Fp32".
template <class Q>
std::string describe_quantizer() {
  if constexpr (Q::is_float) {
    return Q::bits == 32 ? "Fp32" : "Fp16";
  } else {
    return xquant::detail::concat("Uniform<", Q::bits, ",", Q::axis == Axis::Token ? "Token" : "Channel", ",",
                                  Q::scheme == Scheme::Asymmetric ? "Asymmetric" : "Symmetric",
                                  Q::param_bits == ParamBits::Bf16 ? ",Bf16" : "", ">");
  }
}

/// Splits a snapshot into its parts after checking magic, version, lengths and checksum (in that
/// order, so that the message names the first thing wrong). The description is not compared here.
struct Parsed {
  std::string description;
  const std::uint8_t* payload = nullptr;
  std::size_t payload_bytes = 0;
};
inline Parsed parse(const std::uint8_t* data, std::size_t size) {
  require<SnapshotError>(data != nullptr || size == 0, "snapshot: null data pointer");
  require<SnapshotError>(size >= kHeaderBytes + kTrailerBytes, "snapshot: truncated, ", size,
                         " bytes is shorter than the smallest snapshot (", kHeaderBytes + kTrailerBytes, " bytes)");
  require<SnapshotError>(std::memcmp(data, kMagic, sizeof kMagic) == 0,
                         "snapshot: bad magic, these bytes are not an xquant cache snapshot");
  Reader r(data, size);
  std::uint8_t skip[8];
  r.bytes("magic", skip, 8);
  const std::uint32_t version = r.u32("version");
  require<SnapshotError>(version == kFormatVersion, "snapshot: format version ", version,
                         " is not supported (this library reads version ", kFormatVersion, ")");
  const std::uint32_t dlen = r.u32("description length");
  require<SnapshotError>(dlen <= kMaxDescription, "snapshot: description length ", dlen, " exceeds ",
                         kMaxDescription, " (corrupted header)");
  const std::uint64_t fingerprint = r.u64("fingerprint");
  const std::uint64_t plen = r.u64("payload length");
  const std::size_t body = size - kHeaderBytes - kTrailerBytes;
  require<SnapshotError>(dlen <= body && plen <= body - dlen && dlen + plen == body, "snapshot: the header announces ",
                         dlen, " description bytes and ", plen, " payload bytes, but ", body,
                         " bytes lie between header and checksum (truncated or padded)");
  Reader tail(data + size - kTrailerBytes, kTrailerBytes, size - kTrailerBytes);
  const std::uint32_t stored = tail.u32("checksum");
  const std::uint32_t actual = crc32(data, size - kTrailerBytes);
  require<SnapshotError>(stored == actual, "snapshot: checksum mismatch (stored CRC-32 ", stored, ", computed ", actual,
                         "): the snapshot is corrupted");
  Parsed p;
  p.description.assign(reinterpret_cast<const char*>(data + kHeaderBytes), dlen);
  require<SnapshotError>(fnv1a64(p.description) == fingerprint,
                         "snapshot: the fingerprint does not match the description (corrupted header)");
  p.payload = data + kHeaderBytes + dlen;
  p.payload_bytes = static_cast<std::size_t>(plen);
  return p;
}

/// Writes the header for `description`; returns the offset where the payload starts. Call
/// finish() after the payload has been written.
inline std::size_t begin(Writer& w, const std::string& description) {
  w.bytes(kMagic, sizeof kMagic);
  w.u32(kFormatVersion);
  w.u32(static_cast<std::uint32_t>(description.size()));
  w.u64(fnv1a64(description));
  w.u64(0);  // payload length, patched by finish()
  w.bytes(description.data(), description.size());
  return w.size();
}
inline void finish(Writer& w, std::size_t payload_start) {
  std::vector<std::uint8_t>& b = w.buffer();
  const std::uint64_t plen = b.size() - payload_start;
  for (int i = 0; i < 8; ++i) b[24 + i] = static_cast<std::uint8_t>(plen >> (8 * i));
  w.u32(crc32(b.data(), b.size()));
}

}  // namespace snapshot
}  // namespace xquant
