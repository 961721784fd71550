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
#include <cstring>
#include <vector>

#include "../core/error.hpp"
#include "../core/half.hpp"
#include "../quant/ops.hpp"

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
  /// cache checks). Throws CapacityError, leaving the stream unchanged, if the pool is too small.
  void append(std::size_t id, const float* x, index_t n, index_t ld) {
    Seq& q = seq(id);
    require<CapacityError>(!q.sealed, "sequence ", id, ": sealed sequences accept no more tokens");
    const index_t need = blocks_needed(id, n);
    require<CapacityError>(need <= free_blocks(), "cache capacity: appending ", n, " tokens needs ", need,
                           " more blocks of ", s_.block_tokens, " tokens, but only ", free_blocks(), " are free");
    for (index_t i = 0; i < need; ++i) q.blocks.push_back(take_block());
    if constexpr (Q::is_float || Q::axis == Axis::Token) {
      if (window_tokens_ == 0) {  // straight into blocks
        quantize_rows(q, x, n, ld);
        q.length += n;
        q.quantized = q.length;
        return;
      }
    }
    for (index_t i = 0; i < n; ++i) {
      std::uint16_t* slot = window_row(q, q.length);
      for (index_t j = 0; j < s_.width; ++j) {
        slot[j] = float_to_half(x[i * ld + j]);
        if (!half_is_finite(slot[j])) quant::detail::throw_fp16_range(x[i * ld + j], x[i * ld + j]);
      }
      ++q.length;
      if constexpr (!Q::is_float && Q::axis == Axis::Channel) {
        if (q.length - q.quantized == s_.group) flush(q, s_.group);
      } else {
        if (q.length - q.quantized > s_.window) flush(q, 1);
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
      for (index_t j = 0; j < s_.width; ++j) out[(t - begin) * ld + j] = half_to_float(slot[j]);
    }
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
      for (index_t j = 0; j < s_.width; ++j) scratch_[i * s_.width + j] = half_to_float(slot[j]);
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
