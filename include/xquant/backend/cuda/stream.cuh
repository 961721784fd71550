#pragma once
// DeviceStream<Q>: one layer's quantized tensor (X, or a latent X·U) for a batch of sequences on
// the GPU. Appends are stream-ordered (prefill chunks or one decode token per sequence); value
// errors found by the kernels (non-finite input, a group whose scale or zero overflows fp16) are
// recorded on the device and raised as ValueError by check().

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../../core/bits.hpp"
#include "memory.cuh"
#include "quantize.cuh"
#include "sm90.cuh"

namespace xquant::cuda {

/// Geometry of a device stream.
struct DeviceStreamShape {
  int batch = 1;           ///< sequences
  index_t capacity = 0;    ///< tokens per sequence (a multiple of `group` for per-channel groups)
  index_t width = 0;       ///< values per token (a multiple of 8)
  index_t group = 128;     ///< group size; 8, 16, 32, 64, 128 or 256
};

/// \tparam Q quant::Uniform<Bits, Axis, Scheme, ParamBits>: the CPU quantizer whose codes this stream holds.
/// The sequences' lengths live on the device (the kernels read and advance them) and are mirrored on
/// the host, which checks capacity and sizes later launches from them. A CUDA graph that captures an
/// append advances only the device's lengths when replayed: the host's copy (length(), capacity
/// checks) then lags until sync_lengths(). For per-token streams a decode step can be captured once
/// and replayed as the sequences grow (append_all, then attend_absorbed with a max_tokens bound,
/// which sizes its launches without the host's lengths); the caller keeps the lengths within the
/// capacity. A per-channel stream's append decides on the host when a group is full and is flushed,
/// so capturing it raises ConfigError.
template <class Q>
class DeviceStream {
  static_assert(!Q::is_float, "xquant::cuda::DeviceStream: Q must be a quant::Uniform quantizer");

 public:
  using quantizer = Q;
  /// Tokens per sequence at most: the device keeps lengths as 32-bit ints.
  static constexpr index_t kMaxCapacity = 0x7FFFFFFF;

  explicit DeviceStream(const DeviceStreamShape& s) : s_(s) {
    require<ConfigError>(s.batch > 0, "batch: must be positive, got ", s.batch);
    require<ConfigError>(s.capacity > 0 && s.capacity <= kMaxCapacity,
                         "capacity: must be in [1, 2^31 - 1] (the device keeps lengths as 32-bit ints), got ",
                         s.capacity);
    require<ConfigError>(s.width > 0 && s.width % 8 == 0, "width: the CUDA backend needs a positive multiple of 8, got ",
                         s.width);
    require<ConfigError>(s.group >= 8 && s.group <= 256 && (s.group & (s.group - 1)) == 0,
                         "group: the CUDA backend supports 8, 16, 32, 64, 128 or 256, got ", s.group);
    if constexpr (Q::axis == Axis::Token)
      require<ConfigError>(s.width % s.group == 0, "group: must divide the width ", s.width, ", got ", s.group);
    else
      require<ConfigError>(s.capacity % s.group == 0, "capacity: must be a multiple of the per-channel group ", s.group,
                           ", got ", s.capacity);
    code_bytes_ = Q::code_bytes(s.width);
    const index_t rows = s.batch * s.capacity;
    codes_.resize(static_cast<std::size_t>(rows * code_bytes_));
    const index_t groups_per_row = Q::axis == Axis::Token ? s.width / s.group : 0;
    params_.resize(static_cast<std::size_t>(Q::axis == Axis::Token ? rows * groups_per_row * Q::params_per_group
                                                                   : (rows / s.group) * s.width * Q::params_per_group));
    if constexpr (Q::axis == Axis::Channel) window_.resize(static_cast<std::size_t>(s.batch * s.group * s.width));
    length_.resize(static_cast<std::size_t>(s.batch));
    status_.resize(detail::kStatusWords);
    blocks_done_.resize(static_cast<std::size_t>(s.batch));
    XQ_CUDA_CHECK(cudaMemset(length_.data(), 0, length_.bytes()));
    const unsigned c = channel_bits();
    XQ_CUDA_CHECK(cudaMemcpy(status_.data() + 1, &c, sizeof c, cudaMemcpyHostToDevice));
    reset_status(nullptr);
    XQ_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    XQ_CUDA_CHECK(cudaMemset(blocks_done_.data(), 0, blocks_done_.bytes()));
    host_len_.assign(static_cast<std::size_t>(s.batch), 0);
    (void)sm90a_kernels();  // probe the device's kernel set now, outside any graph capture
  }

  const DeviceStreamShape& shape() const { return s_; }
  index_t length(int seq) const {
    require<ShapeError>(seq >= 0 && seq < s_.batch, "seq: must be in [0, ", s_.batch, "), got ", seq);
    return host_len_[static_cast<std::size_t>(seq)];
  }
  index_t code_bytes() const { return code_bytes_; }
  /// Device bytes of codes + parameters (+ window) this stream holds.
  std::size_t allocated_bytes() const { return codes_.bytes() + params_.bytes() + window_.bytes(); }

  StreamView<Q> view() const {
    StreamView<Q> v;
    v.codes = const_cast<std::uint8_t*>(codes_.data());
    v.params = const_cast<std::uint16_t*>(params_.data());
    v.window = const_cast<std::uint16_t*>(window_.data());
    v.length = const_cast<int*>(length_.data());
    v.width = s_.width;
    v.group = s_.group;
    v.capacity = s_.capacity;
    v.code_bytes = code_bytes_;
    v.batch = s_.batch;
    v.group_shift = static_cast<int>(bits_below(s_.group));
    return v;
  }
  const DeviceBuffer<std::uint8_t>& codes() const { return codes_; }
  const DeviceBuffer<std::uint16_t>& params() const { return params_; }

  /// Appends `n` tokens (a prefill chunk, or one decode token) of `width` bf16/fp16 values to
  /// sequence `seq` (device rows with stride `ld` elements, 16-byte aligned).
  template <class T>
  void append(int seq, const T* x, index_t n, index_t ld, cudaStream_t stream) {
    require<ShapeError>(seq >= 0 && seq < s_.batch, "seq: must be in [0, ", s_.batch, "), got ", seq);
    check_rows(x, n, ld);
    if (n == 0) return;
    require_room(seq, n);
    append_rows(seq, 1, x, n, ld, stream);
  }

  /// Appends `n` tokens to every sequence (a batched prefill chunk): rows b·n .. b·n + n − 1 of `x`
  /// (stride `ld` elements, 16-byte aligned) go to sequence b. Per-token streams quantize the whole
  /// batch in one launch, which fills the device where B launches of a short chunk would not; the
  /// codes are the same as B calls of append.
  template <class T>
  void append_batch(const T* x, index_t n, index_t ld, cudaStream_t stream) {
    require<ShapeError>(n >= 0, "n: must be non-negative, got ", n);
    check_rows(x, s_.batch * n, ld);
    if (n == 0) return;
    for (int b = 0; b < s_.batch; ++b) require_room(b, n);
    if constexpr (Q::axis == Axis::Token) {
      append_rows(0, s_.batch, x, n, ld, stream);
    } else {  // per-channel: each sequence's open group and window differ, so one sequence at a time
      for (int b = 0; b < s_.batch; ++b) append_rows(b, 1, x + static_cast<index_t>(b) * n * ld, n, ld, stream);
    }
  }

  /// Appends one token to every sequence (a decode step): row b of `x` goes to sequence b.
  template <class T>
  void append_all(const T* x, index_t ld, cudaStream_t stream) {
    check_rows(x, s_.batch, ld);
    for (int b = 0; b < s_.batch; ++b) require_room(b, 1);
    append_rows(0, s_.batch, x, 1, ld, stream);
  }

  /// Fills codes, parameters and window with `byte` (tests poison storage before appending).
  void fill_storage(int byte, cudaStream_t stream) {
    codes_.fill_bytes(byte, stream);
    params_.fill_bytes(byte, stream);
    if (window_.size()) window_.fill_bytes(byte, stream);
  }

  /// Reads the sequences' lengths back from the device into the host's copy (synchronizes
  /// `stream`): after replays of a CUDA graph that appends, which advance the device's lengths only.
  void sync_lengths(cudaStream_t stream) {
    std::vector<int> len(host_len_.size());
    XQ_CUDA_CHECK(cudaMemcpyAsync(len.data(), length_.data(), length_.bytes(), cudaMemcpyDeviceToHost, stream));
    XQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (std::size_t b = 0; b < len.size(); ++b) host_len_[b] = len[b];
  }

  /// Forgets every sequence's tokens (storage is kept), and a value error that check() reported.
  void clear(cudaStream_t stream) {
    XQ_CUDA_CHECK(cudaMemsetAsync(length_.data(), 0, length_.bytes(), stream));
    host_len_.assign(host_len_.size(), 0);
    bad_values_ = 0;
    first_non_finite_ = first_fp16_range_ = kNoPosition;
  }

  /// Synchronizes `stream` and raises ValueError if an append met a non-finite value or a group
  /// whose scale or zero does not fit fp16, naming where it first did: sequence, token and channel
  /// of the first bad value, or the first token and channel of the first such group, in (sequence,
  /// token, channel) order. (The channel is left out only where batch and width are too large for
  /// the 64-bit key: more than 33 bits together.) Unlike the CPU stream's append, the device's
  /// cannot leave the stream as it was: the tokens went in with meaningless codes. So the error
  /// sticks: every later check() raises it again, until clear(). CapacityError (a replayed append
  /// that found a sequence full wrote nothing) is reported once.
  void check(cudaStream_t stream) {
    unsigned st[detail::kStatusWords] = {};
    XQ_CUDA_CHECK(cudaMemcpyAsync(st, status_.data(), sizeof st, cudaMemcpyDeviceToHost, stream));
    XQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (st[0]) reset_status(stream);
    for (unsigned bit : {detail::kNonFinite, detail::kFp16Range}) {
      if (!(st[0] & bit)) continue;
      std::uint64_t key;
      std::memcpy(&key, st + detail::position_word(bit), sizeof key);
      auto& first = bit == detail::kNonFinite ? first_non_finite_ : first_fp16_range_;
      first = std::min(first, key);
      bad_values_ |= bit;
    }
    require<CapacityError>(!(st[0] & detail::kCapacity),
                           "append: a sequence was full on the device, and the tokens of that append were not written "
                           "(a captured append replayed past the capacity?); sync_lengths() shows the lengths");
    const unsigned c = channel_bits();
    auto where = [c](std::uint64_t key) {
      const std::uint64_t at = key >> c;
      return "sequence " + std::to_string(at >> 31) + ", token " + std::to_string(at & 0x7FFFFFFFu) +
             (c ? ", channel " + std::to_string(key & ((std::uint64_t(1) << c) - 1)) : std::string());
    };
    require<ValueError>(!(bad_values_ & detail::kNonFinite), "X: a value is NaN or Inf (or overflows fp16), first at ",
                        where(first_non_finite_), "; the stream holds meaningless codes until clear()");
    require<ValueError>(!(bad_values_ & detail::kFp16Range),
                        "X: a quantization group's scale or zero does not fit fp16 (|value| <= 65504), first in the "
                        "group that starts at ",
                        where(first_fp16_range_),
                        "; rescale the activations (the stream holds meaningless codes until clear())");
  }

 private:
  template <class T>
  void check_rows(const T* x, index_t n, index_t ld) const {
    static_assert(detail::is_input_type<T>, "DeviceStream::append: x must be bf16 (__nv_bfloat16) or fp16 (__half)");
    require<ShapeError>(n >= 0, "n: must be non-negative, got ", n);
    require<ShapeError>(n == 0 || x != nullptr, "x: null pointer");
    require<ShapeError>(ld >= s_.width && ld % 8 == 0, "ld: must be at least the width ", s_.width,
                        " and a multiple of 8 (16-byte rows), got ", ld);
    require<ShapeError>(reinterpret_cast<std::uintptr_t>(x) % 16 == 0, "x: must be 16-byte aligned");
    if (n > 0) require_device_accessible(x, "x");
  }

  // The host's check that sequence `seq` has room for n more tokens.
  void require_room(int seq, index_t n) const {
    require<CapacityError>(host_len_[seq] + n <= s_.capacity, "sequence ", seq, ": appending ", n, " tokens to ",
                           host_len_[seq], " exceeds the capacity ", s_.capacity);
  }

  // `count` sequences from seq0, n tokens each, rows of x in sequence-major order.
  template <class T>
  void append_rows(int seq0, int count, const T* x, index_t n, index_t ld, cudaStream_t stream) {
    const StreamView<Q> v = view();
    const index_t rows = count * n;
    if constexpr (Q::axis == Axis::Token) {
      // Values per thread: up to a whole group, at most 128. Smaller for small launches (a launch
      // of 128 would have fewer than 2^20 threads: a partial wave or two, latency-bound): 64 for
      // 2-bit codes, 32 for the others; and 64 for 2-bit codes at any size. Measured on an H200
      // (bench/cuda/NOTES.md items 41 and 62): at 2 bits 64 beat 128 by 4-10 % in every row and 32
      // in all but the smallest; below that size, at 4 bits, 32 beat 64 by 0-5 %. 8 for groups of
      // 8 and 16 and for decode-sized appends. The kernel also bumps the lengths (its last block).
      index_t vpt = 8;
      if (s_.group >= 32 && rows >= 256) {
        vpt = std::min<index_t>(s_.group, 128);
        const bool small = rows * (s_.width / 128) < (index_t(1) << 20);
        if (vpt > 32 && small) vpt = Q::bits == 2 ? 64 : 32;
        else if (vpt == 128 && Q::bits == 2) vpt = 64;
      }
      if (const int f = detail::append_values_per_thread;
          (f == 8 || (f >= 32 && f <= 128 && (f & (f - 1)) == 0)) && f <= s_.group && 32 * f >= s_.group)
        vpt = f;
      const index_t chunks = s_.width / vpt;
      require<ShapeError>(rows * chunks < (index_t(1) << 31), "n: ", rows, " rows of width ", s_.width,
                             " exceed one launch's 2^31 chunks; append in smaller pieces");
      const unsigned grid = detail::blocks_for(rows * chunks, 128);
      const detail::RowMap map(seq0, n);
      auto launch = [&](auto kernel) {
        kernel<<<grid, 128, 0, stream>>>(v, x, ld, static_cast<unsigned>(rows), FastDivmod(static_cast<std::uint32_t>(chunks)),
                                         map, count, blocks_done_.data() + seq0, status_.data());
      };
      if (vpt == 128) launch(detail::quantize_tokens_kernel<Q, T, 128>);
      else if (vpt == 64) launch(detail::quantize_tokens_kernel<Q, T, 64>);
      else if (vpt == 32) launch(detail::quantize_tokens_kernel<Q, T, 32>);
      else launch(detail::quantize_tokens_kernel<Q, T, 8>);
      check_launch("quantize_tokens_kernel");
      for (int b = seq0; b < seq0 + count; ++b) host_len_[b] += n;
      return;
    } else {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      XQ_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
      require<ConfigError>(capture == cudaStreamCaptureStatusNone,
                           "append: a per-channel stream decides on the host when a group is full, so its appends "
                           "cannot be captured in a CUDA graph (per-token streams can)");
      const index_t G = s_.group;
      if (count > 1) {  // one token per sequence: through the windows, then flush the full ones
        launch_window(v, x, ld, rows, detail::RowMap(seq0, 1), stream);
        bump(seq0, count, 1, stream);
        for (int b = seq0; b < seq0 + count; ++b) {
          ++host_len_[b];
          if (host_len_[b] % G == 0) launch_flush(v, v.window_row(b, 0), s_.width, b, host_len_[b] - G, 1, stream);
        }
        return;
      }
      // One sequence: top up the open group through the window, whole groups straight from x.
      const int b = seq0;
      index_t done = 0;
      const index_t open = host_len_[b] % G;
      if (open) {
        const index_t k = std::min(n, G - open);
        launch_window(v, x, ld, k, detail::RowMap(b, k), stream);
        bump(b, 1, static_cast<int>(k), stream);
        host_len_[b] += k;
        done = k;
        if (host_len_[b] % G == 0) launch_flush(v, v.window_row(b, 0), s_.width, b, host_len_[b] - G, 1, stream);
      }
      const index_t whole = (n - done) / G;
      if (whole) {
        launch_flush(v, x + done * ld, ld, b, host_len_[b], whole, stream);
        bump(b, 1, static_cast<int>(whole * G), stream);
        host_len_[b] += whole * G;
        done += whole * G;
      }
      if (done < n) {
        launch_window(v, x + done * ld, ld, n - done, detail::RowMap(b, n - done), stream);
        bump(b, 1, static_cast<int>(n - done), stream);
        host_len_[b] += n - done;
      }
      return;
    }
  }

  template <class T>
  void launch_window(const StreamView<Q>& v, const T* x, index_t ld, index_t rows, detail::RowMap map, cudaStream_t stream) {
    detail::window_store_kernel<Q, T><<<static_cast<unsigned>(rows), 256, 0, stream>>>(v, x, ld, rows, map, status_.data());
    check_launch("window_store_kernel");
  }
  template <class S>
  void launch_flush(const StreamView<Q>& v, const S* src, index_t ld, int seq, index_t first_tok, index_t groups,
                    cudaStream_t stream) {
    // At most 65535 groups per launch (the grid's y limit): a long prefill takes several.
    for (index_t g0 = 0; g0 < groups; g0 += 65535) {
      const index_t part = std::min<index_t>(groups - g0, 65535);
      const dim3 grid(detail::blocks_for(s_.width / 8, 128), static_cast<unsigned>(part));
      detail::quantize_channels_kernel<Q, S>
          <<<grid, 128, 0, stream>>>(v, src + g0 * s_.group * ld, ld, seq, first_tok + g0 * s_.group, status_.data());
      check_launch("quantize_channels_kernel");
    }
  }
  // Clears the status word and sets the first-position keys to "none" (word 1, the keys' layout,
  // stays).
  void reset_status(cudaStream_t stream) {
    XQ_CUDA_CHECK(cudaMemsetAsync(status_.data(), 0, sizeof(unsigned), stream));
    XQ_CUDA_CHECK(cudaMemsetAsync(status_.data() + 2, 0xFF, (detail::kStatusWords - 2) * sizeof(unsigned), stream));
  }
  void bump(int seq0, int count, int n, cudaStream_t stream) {
    detail::add_length_kernel<<<detail::blocks_for(count, 128), 128, 0, stream>>>(length_.data(), seq0, count, n);
    check_launch("add_length_kernel");
  }

  DeviceStreamShape s_;
  index_t code_bytes_ = 0;
  DeviceBuffer<std::uint8_t> codes_;
  DeviceBuffer<std::uint16_t> params_, window_;
  DeviceBuffer<int> length_;
  DeviceBuffer<unsigned> status_;
  // Per sequence: finished blocks of the append kernel in flight (zero between launches). One
  // word per first sequence of a launch, so appends to different sequences may run concurrently.
  DeviceBuffer<unsigned> blocks_done_;
  std::vector<index_t> host_len_;
  // The bits of n − 1 (n ≥ 1): the smallest b with 2^b ≥ n, so log2(n) for a power of two.
  static unsigned bits_below(index_t n) { return ceil_log2(static_cast<std::uint64_t>(n)); }
  // Bits of a position key's channel field (status word 1, detail::flag_value_error): enough for
  // width − 1 where the sequence, 31 token bits and the channel fit 64 bits; else 0, no channel.
  unsigned channel_bits() const {
    return bits_below(s_.batch) + 31 + bits_below(s_.width) <= 64 ? bits_below(s_.width) : 0u;
  }
  // Value errors check() has reported, and the first position of each (they stick until clear()).
  static constexpr std::uint64_t kNoPosition = ~std::uint64_t(0);
  unsigned bad_values_ = 0;
  std::uint64_t first_non_finite_ = kNoPosition, first_fp16_range_ = kNoPosition;
};

}  // namespace xquant::cuda
