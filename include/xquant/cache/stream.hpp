#pragma once
// A quantized token stream: the storage unit every codec is built from (one per layer and per
// cached tensor). Tokens live in fixed-size blocks taken from a pool, so that a sequence's tokens
// need not be contiguous (the block table is what a paged or forked layout would share).
// The newest tokens that are not quantized yet wait in an fp16 ring (the "window"):
//   Axis::Channel — the tokens of the unfilled group (a group is quantized when it fills);
//   Axis::Token   — the newest `window` tokens (0: quantize on arrival).
// Every token passes through fp16 on its way into the window, so the codes do not depend on how
// the tokens were chunked into appends.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../core/error.hpp"
#include "../core/half.hpp"
#include "../quant/ops.hpp"
#include "snapshot.hpp"

namespace xquant::cache {

/// Geometry of one stream.
struct StreamShape {
  index_t width = 0;        ///< values per token
  index_t group = 128;      ///< group size along the quantizer's axis
  index_t block_tokens = 128;  ///< tokens per block; a multiple of `group` for per-channel groups
  index_t max_blocks = 0;   ///< block pool capacity (all sequences together)
  index_t window = 0;       ///< per-token quantizers: newest tokens kept in fp16 (≤ block_tokens)
};

/// Validates a stream geometry for quantizer Q; throws ConfigError naming the bad value.
template <class Q>
void check_shape(const StreamShape& s) {
  require<ConfigError>(s.width > 0, "width: must be positive, got ", s.width);
  require<ConfigError>(s.block_tokens > 0, "block_tokens: must be positive, got ", s.block_tokens);
  require<ConfigError>(s.max_blocks >= 0, "capacity: must be non-negative");
  require<ConfigError>(s.window >= 0 && s.window <= s.block_tokens, "window: must be in [0, block_tokens=",
                       s.block_tokens, "], got ", s.window);
  if constexpr (!Q::is_float) {
    require<ConfigError>(s.group > 0, "group: must be positive, got ", s.group);
    if constexpr (Q::axis == Axis::Token) {
      require<ConfigError>(s.width % s.group == 0, "group: must divide the width ", s.width,
                           " (per-token groups run along the hidden dimension), got ", s.group);
    } else {
      require<ConfigError>(s.block_tokens % s.group == 0, "group: must divide block_tokens ", s.block_tokens,
                           " (per-channel groups run along tokens and may not straddle blocks), got ", s.group);
    }
  }
}

template <class Q, class Backend>
class Stream {
  using Ops = quant::QuantOps<Backend>;

 public:
  using quantizer = Q;

  explicit Stream(const StreamShape& shape) : s_(shape) {
    check_shape<Q>(s_);
    if constexpr (Q::is_float) s_.window = 0;  // unquantized: nothing to wait for
    code_bytes_ = Q::code_bytes(s_.width);
    if constexpr (!Q::is_float) {
      if constexpr (Q::axis == Axis::Token)
        params_per_block_ = s_.block_tokens * (s_.width / s_.group) * Q::params_per_group;
      else
        params_per_block_ = (s_.block_tokens / s_.group) * s_.width * Q::params_per_group;
    }
    // Codes first, padded to an even byte count so the fp16 parameters that follow are aligned.
    codes_bytes_ = (s_.block_tokens * code_bytes_ + 1) / 2 * 2;
    block_bytes_ = static_cast<std::size_t>(codes_bytes_ + 2 * params_per_block_);
    window_tokens_ = (!Q::is_float && Q::axis == Axis::Channel) ? s_.group : s_.window;
  }

  const StreamShape& shape() const { return s_; }
  /// Bytes of one block: packed codes plus fp16 scales/zeros.
  std::size_t block_bytes() const { return block_bytes_; }
  /// Capacity of the fp16 window of each sequence, in tokens.
  index_t window_tokens() const { return window_tokens_; }

  /// Starts sequence `id` (ids are small integers chosen by the owner, reusable after close).
  void open(std::size_t id) {
    if (id >= seqs_.size()) seqs_.resize(id + 1);
    Seq& q = seqs_[id];
    require<Error>(!q.open, "sequence ", id, " is already open");
    q = Seq{};
    q.open = true;
    q.window.assign(static_cast<std::size_t>(window_tokens_ * s_.width), 0);
  }
  /// Ends sequence `id` and returns its blocks to the pool (they stay allocated for reuse).
  void close(std::size_t id) {
    Seq& q = seq(id);
    free_.insert(free_.end(), q.blocks.begin(), q.blocks.end());
    q = Seq{};
  }

  index_t length(std::size_t id) const { return seq(id).length; }
  /// Tokens already quantized into blocks (the rest wait in the window).
  index_t quantized(std::size_t id) const { return seq(id).quantized; }
  bool sealed(std::size_t id) const { return seq(id).sealed; }

  /// Blocks that appending `n` more tokens to `id` would take from the pool.
  index_t blocks_needed(std::size_t id, index_t n) const {
    const Seq& q = seq(id);
    const index_t need = (q.length + n + s_.block_tokens - 1) / s_.block_tokens;
    return std::max<index_t>(0, need - static_cast<index_t>(q.blocks.size()));
  }
  index_t free_blocks() const {
    return s_.max_blocks - static_cast<index_t>(blocks_.size()) + static_cast<index_t>(free_.size());
  }

  /// Appends `n` tokens (rows of `width` floats, row stride `ld`). Values must be finite (the
  /// cache checks). All or nothing: CapacityError (pool too small, or sealed) and ValueError (a
  /// value or a group's scale/zero outside fp16) leave the stream exactly as it was, down to the
  /// pool's free list.
  void append(std::size_t id, const float* x, index_t n, index_t ld) {
    Seq& q = seq(id);
    require<CapacityError>(!q.sealed, "sequence ", id, ": sealed sequences accept no more tokens");
    const index_t need = blocks_needed(id, n);
    require<CapacityError>(need <= free_blocks(), "cache capacity: appending ", n, " tokens needs ", need,
                           " more blocks of ", s_.block_tokens, " tokens, but only ", free_blocks(), " are free");
    bool direct = false;  // straight into blocks, no window
    if constexpr (Q::is_float || Q::axis == Axis::Token) direct = window_tokens_ == 0;
    // Window path: once every value fits fp16, flushing cannot fail (a group of finite fp16 values
    // always has a finite fp16 scale and zero), so check before the first token goes in.
    if (!direct) check_fp16(x, n, ld);
    const std::size_t had_blocks = q.blocks.size(), pool_blocks = blocks_.size();
    for (index_t i = 0; i < need; ++i) q.blocks.push_back(take_block());
    if constexpr (Q::is_float || Q::axis == Axis::Token) {
      if (direct) {
        try {
          quantize_rows(q, x, n, ld);
        } catch (...) {
          untake_blocks(q, had_blocks, pool_blocks);
          throw;
        }
        q.length += n;
        q.quantized = q.length;
        return;
      }
    }
    for (index_t i = 0; i < n; ++i) {
      if constexpr (Q::is_float || Q::axis == Axis::Token) {
        // The ring is full: its oldest token is quantized before its slot is reused.
        if (q.length - q.quantized == window_tokens_) flush(q, 1);
      }
      std::uint16_t* slot = window_row(q, q.length);
      floats_to_halves(x + i * ld, slot, static_cast<std::size_t>(s_.width));
      ++q.length;
      if constexpr (!Q::is_float && Q::axis == Axis::Channel) {
        if (q.length - q.quantized == s_.group) flush(q, s_.group);
      }
    }
  }

  /// Quantizes every waiting token now (a per-channel group may then be shorter than `group`);
  /// the sequence accepts no more tokens. Used when a whole sequence is scored at once.
  void seal(std::size_t id) {
    Seq& q = seq(id);
    if (q.length > q.quantized) flush(q, q.length - q.quantized);
    q.sealed = true;
  }

  /// Writes tokens [begin, end) as floats into `out` (row stride `ld`).
  void dequantize(std::size_t id, index_t begin, index_t end, float* out, index_t ld) const {
    const Seq& q = seq(id);
    require<ShapeError>(0 <= begin && begin <= end && end <= q.length, "token range: [", begin, ", ", end,
                        ") must lie within [0, ", q.length, ") of sequence ", id);
    index_t t = begin;
    while (t < std::min(end, q.quantized)) {  // from blocks, one run of same-block tokens at a time
      index_t run_end = std::min({end, q.quantized, (t / s_.block_tokens + 1) * s_.block_tokens});
      if constexpr (!Q::is_float && Q::axis == Axis::Channel)
        run_end = std::min(run_end, (t / s_.group + 1) * s_.group);
      const std::uint8_t* blk = block(q, t);
      const index_t row = t % s_.block_tokens;
      if constexpr (!Q::is_float && Q::axis == Axis::Channel)
        Ops::template dequantize_channels<Q>(blk + row * code_bytes_, params(blk) + (row / s_.group) * s_.width * Q::params_per_group,
                                             run_end - t, s_.width, out + (t - begin) * ld, ld);
      else
        Ops::template dequantize_tokens<Q>(blk + row * code_bytes_, params(blk) + row * params_per_row(), run_end - t,
                                           s_.width, s_.group, out + (t - begin) * ld, ld);
      t = run_end;
    }
    for (; t < end; ++t) {  // from the fp16 window
      const std::uint16_t* slot = window_row(q, t);
      halves_to_floats(slot, out + (t - begin) * ld, static_cast<std::size_t>(s_.width));
    }
  }

  /// Writes sequence `id` as one stream record of a snapshot (snapshot.hpp):
  ///   u32 tag "XQST", i64 length, i64 quantized, u8 sealed,
  ///   per block in token order: the packed code rows of its quantized tokens, then their fp16
  ///     parameters (per-token: one row of parameters per token; per-channel: one row of `width`
  ///     per group, the last group possibly short after seal),
  ///   the fp16 rows of the tokens waiting in the window, oldest first.
  /// Only the sequence's own tokens are written (never stale rows of a reused block), so equal
  /// contents give equal bytes.
  void save(std::size_t id, snapshot::Writer& w) const {
    const Seq& q = seq(id);
    w.u32(kRecordTag);
    w.i64(q.length);
    w.i64(q.quantized);
    w.u8(q.sealed ? 1 : 0);
    for (index_t t = 0; t < q.quantized; t += s_.block_tokens) {
      const index_t rows = std::min(s_.block_tokens, q.quantized - t);
      const std::uint8_t* blk = block(q, t);
      w.bytes(blk, static_cast<std::size_t>(rows * code_bytes_));
      w.u16s(params(blk), static_cast<std::size_t>(params_for(rows)));
    }
    for (index_t t = q.quantized; t < q.length; ++t) w.u16s(window_row(q, t), static_cast<std::size_t>(s_.width));
  }

  /// Reads a record written by save() into sequence `id`, which must be open and empty. Raises
  /// SnapshotError on a malformed record (inconsistent lengths, non-finite parameters or window
  /// values, truncation) and CapacityError when the pool lacks room; on error the sequence may
  /// hold some blocks, and the owner closes it.
  void load(std::size_t id, snapshot::Reader& r) {
    Seq& q = seq(id);
    require<Error>(q.length == 0 && q.blocks.empty(), "sequence ", id, ": load needs an empty sequence");
    if (r.u32("stream record tag") != kRecordTag) r.fail("stream record tag", ": not the start of a stream record");
    const index_t length = r.count("stream length", 0, index_t(1) << 40);
    const index_t quantized = r.count("quantized token count", 0, length);
    const bool sealed = r.flag("sealed flag");
    const index_t waiting = length - quantized;
    if (sealed && waiting != 0) r.fail("sealed flag", ": a sealed stream has no waiting tokens, this one has ", waiting);
    if constexpr (!Q::is_float && Q::axis == Axis::Channel) {
      if (!sealed && (quantized % s_.group != 0 || waiting >= s_.group))
        r.fail("stream lengths", ": ", quantized, " quantized and ", waiting,
               " waiting tokens do not fit per-channel groups of ", s_.group);
    } else {
      if (waiting > window_tokens_)
        r.fail("stream lengths", ": ", waiting, " waiting tokens exceed the window of ", window_tokens_);
    }
    // Every byte the record announces must be there before any block is taken (computed without
    // a loop over blocks and without overflow, whatever the lengths claim).
    {
      const index_t full = quantized / s_.block_tokens, rest = quantized % s_.block_tokens;
      const auto per_block = static_cast<std::size_t>(s_.block_tokens * code_bytes_ + 2 * params_for(s_.block_tokens));
      const auto tail = static_cast<std::size_t>(rest * code_bytes_ + 2 * params_for(rest) + waiting * s_.width * 2);
      if (static_cast<std::size_t>(full) > r.remaining() / per_block) r.need("stream contents", r.remaining() + 1);
      r.need("stream contents", static_cast<std::size_t>(full) * per_block + tail);
    }
    const index_t need = (length + s_.block_tokens - 1) / s_.block_tokens;
    require<CapacityError>(need <= free_blocks(), "cache capacity: restoring ", length, " tokens needs ", need,
                           " blocks of ", s_.block_tokens, " tokens, but only ", free_blocks(), " are free");
    for (index_t i = 0; i < need; ++i) q.blocks.push_back(take_block());
    for (index_t t = 0; t < quantized; t += s_.block_tokens) {
      const index_t rows = std::min(s_.block_tokens, quantized - t);
      std::uint8_t* blk = block(q, t);
      r.bytes("code rows", blk, static_cast<std::size_t>(rows * code_bytes_));
      const std::size_t np = static_cast<std::size_t>(params_for(rows));
      r.u16s("quantization parameters", params(blk), np);
      if constexpr (Q::is_float) {
        check_stored_floats(r, blk, rows);
      } else {
        for (std::size_t i = 0; i < np; ++i)
          if (!half_is_finite(params(blk)[i])) r.fail("quantization parameters", ": a scale or zero is not finite");
      }
    }
    for (index_t t = quantized; t < length; ++t) {
      std::uint16_t* slot = window_row(q, t);
      r.u16s("window tokens", slot, static_cast<std::size_t>(s_.width));
      for (index_t j = 0; j < s_.width; ++j)
        if (!half_is_finite(slot[j])) r.fail("window tokens", ": a waiting value is not finite");
    }
    q.length = length;
    q.quantized = quantized;
    q.sealed = sealed;
  }

  /// Makes `dst` (open and empty) a copy of `src`: its own blocks (a full copy, not shared
  /// copy-on-write), window, lengths and sealed flag. CapacityError, leaving `dst` empty, when the
  /// pool lacks room.
  void fork(std::size_t src, std::size_t dst) {
    require<Error>(src != dst, "fork: source and destination are both sequence ", src);
    require<Error>(seq(dst).length == 0 && seq(dst).blocks.empty(), "sequence ", dst, ": fork needs an empty destination");
    const index_t need = static_cast<index_t>(seq(src).blocks.size());
    require<CapacityError>(need <= free_blocks(), "cache capacity: forking sequence ", src, " needs ", need,
                           " blocks, but only ", free_blocks(), " are free");
    for (index_t i = 0; i < need; ++i) seqs_[dst].blocks.push_back(take_block());
    const Seq& a = seq(src);  // references taken after take_block, which may grow blocks_
    Seq& b = seq(dst);
    for (std::size_t i = 0; i < a.blocks.size(); ++i)
      std::memcpy(blocks_[b.blocks[i]].data(), blocks_[a.blocks[i]].data(), block_bytes_);
    b.window = a.window;
    b.length = a.length;
    b.quantized = a.quantized;
    b.sealed = a.sealed;
  }

  /// Bytes this stream has allocated: every block ever taken from the pool plus the windows.
  std::size_t allocated_bytes() const {
    std::size_t b = blocks_.size() * block_bytes_;
    for (const Seq& q : seqs_) b += q.window.size() * sizeof(std::uint16_t);
    return b;
  }

 private:
  struct Seq {
    bool open = false, sealed = false;
    index_t length = 0, quantized = 0;
    std::vector<index_t> blocks;
    std::vector<std::uint16_t> window;  // window_tokens × width fp16, ring indexed by token % window_tokens
  };

  Seq& seq(std::size_t id) {
    require<Error>(id < seqs_.size() && seqs_[id].open, "sequence ", id, " is not open");
    return seqs_[id];
  }
  const Seq& seq(std::size_t id) const {
    require<Error>(id < seqs_.size() && seqs_[id].open, "sequence ", id, " is not open");
    return seqs_[id];
  }
  index_t take_block() {
    if (!free_.empty()) {
      const index_t b = free_.back();
      free_.pop_back();
      return b;
    }
    blocks_.emplace_back(block_bytes_);
    return static_cast<index_t>(blocks_.size()) - 1;
  }
  static constexpr std::uint32_t kRecordTag = 0x54535158u;  // "XQST" little-endian

  // Returns the blocks taken since the sequence had `had` blocks and the pool `pool` (in reverse
  // order, so the free list and the pool end exactly as they were).
  void untake_blocks(Seq& q, std::size_t had, std::size_t pool) {
    while (q.blocks.size() > had) {
      const index_t b = q.blocks.back();
      q.blocks.pop_back();
      if (static_cast<std::size_t>(b) >= pool && static_cast<std::size_t>(b) + 1 == blocks_.size()) blocks_.pop_back();
      else free_.push_back(b);
    }
  }
  // Raises ValueError, before anything is stored, if a value does not fit fp16.
  void check_fp16(const float* x, index_t n, index_t ld) const {
    const auto width = static_cast<std::size_t>(s_.width);
    for (index_t i = 0; i < n; ++i)
      if (const std::size_t j = find_half_misfit(x + i * ld, width); j < width)
        throw ValueError(xquant::detail::concat("X: token ", i, " of the appended chunk, channel ", j, " is ",
                                                x[i * ld + static_cast<index_t>(j)], ", outside the fp16 range (|value| "
                                                "<= 65504) of the window that recent tokens wait in; rescale the activations"));
  }
  // fp16 values of the parameters of `rows` quantized tokens that start a block.
  index_t params_for(index_t rows) const {
    if constexpr (Q::is_float) return 0;
    else if constexpr (Q::axis == Axis::Token) return rows * params_per_row();
    else return (rows + s_.group - 1) / s_.group * s_.width * Q::params_per_group;
  }
  // Unquantized streams: every stored value read from a snapshot must be finite.
  void check_stored_floats(snapshot::Reader& r, const std::uint8_t* blk, index_t rows) const {
    for (index_t i = 0; i < rows * s_.width; ++i) {
      bool ok;
      if constexpr (Q::bits == 32) {
        float f;
        std::memcpy(&f, blk + 4 * i, 4);
        ok = std::isfinite(f);
      } else {
        std::uint16_t h;
        std::memcpy(&h, blk + 2 * i, 2);
        ok = half_is_finite(h);
      }
      if (!ok) r.fail("stored values", ": a value is not finite");
    }
  }
  index_t params_per_row() const {
    if constexpr (Q::is_float) return 0;
    else return (s_.width / s_.group) * Q::params_per_group;
  }
  std::uint8_t* block(Seq& q, index_t t) { return blocks_[q.blocks[t / s_.block_tokens]].data(); }
  const std::uint8_t* block(const Seq& q, index_t t) const { return blocks_[q.blocks[t / s_.block_tokens]].data(); }
  std::uint16_t* params(std::uint8_t* blk) const {
    return reinterpret_cast<std::uint16_t*>(blk + codes_bytes_);
  }
  const std::uint16_t* params(const std::uint8_t* blk) const {
    return reinterpret_cast<const std::uint16_t*>(blk + codes_bytes_);
  }
  std::uint16_t* window_row(Seq& q, index_t t) { return q.window.data() + (t % window_tokens_) * s_.width; }
  const std::uint16_t* window_row(const Seq& q, index_t t) const {
    return q.window.data() + (t % window_tokens_) * s_.width;
  }

  // Quantizes n floats rows straight into blocks at the end of q (no window).
  void quantize_rows(Seq& q, const float* x, index_t n, index_t ld) {
    static_assert(Q::is_float || Q::axis == Axis::Token, "per-channel streams always use the window");
    index_t t = q.length;
    for (index_t i = 0; i < n;) {
      const index_t row = t % s_.block_tokens, run = std::min(n - i, s_.block_tokens - row);
      std::uint8_t* blk = block(q, t);
      Ops::template quantize_tokens<Q>(x + i * ld, run, ld, s_.width, s_.group, blk + row * code_bytes_,
                                       params(blk) + row * params_per_row());
      i += run;
      t += run;
    }
  }

  // Quantizes the oldest `n` waiting tokens of q from the window.
  void flush(Seq& q, index_t n) {
    scratch_.resize(static_cast<std::size_t>(n * s_.width));
    for (index_t i = 0; i < n; ++i) {
      const std::uint16_t* slot = window_row(q, q.quantized + i);
      halves_to_floats(slot, scratch_.data() + i * s_.width, static_cast<std::size_t>(s_.width));
    }
    if constexpr (!Q::is_float && Q::axis == Axis::Channel) {
      const index_t t = q.quantized, row = t % s_.block_tokens;
      std::uint8_t* blk = block(q, t);
      Ops::template quantize_channels<Q>(scratch_.data(), n, s_.width, s_.width, blk + row * code_bytes_,
                                         params(blk) + (row / s_.group) * s_.width * Q::params_per_group);
      q.quantized += n;
    } else {
      const index_t len = q.length;
      q.length = q.quantized;  // quantize_rows appends at q.length
      quantize_rows(q, scratch_.data(), n, s_.width);
      q.quantized += n;
      q.length = len;
    }
  }

  StreamShape s_;
  index_t code_bytes_ = 0, codes_bytes_ = 0, params_per_block_ = 0, window_tokens_ = 0;
  std::size_t block_bytes_ = 0;
  std::vector<std::vector<std::uint8_t>> blocks_;
  std::vector<index_t> free_;
  std::vector<Seq> seqs_;
  std::vector<float> scratch_;
};

}  // namespace xquant::cache
