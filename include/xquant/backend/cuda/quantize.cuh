#pragma once
// Quantize/append and dequantize kernels for a device stream. The math is the CPU quantizer's
// own (quant::Uniform<...>::fit / encode / decode and quant::pack_codes, all XQ_HOST_DEVICE), so
// codes and fp16 parameters equal quant::QuantOps<backend::Reference>'s bit for bit.
//
// Work split: per-token, one thread per chunk of consecutive values of a row: a whole group (up
// to 128 values, staged through shared memory by coalesced cp.async) for prefill chunks, or 8
// values (one 16-byte load) for groups of 8 and 16 and for decode-sized appends; a group of G
// values spans G/chunk consecutive lanes, its min/max a butterfly over them. Codes come from the
// correctly rounded quotient without a division (Uniform::quotient: the reciprocal's product and
// one correction step), so they are encode()'s bit for bit; per-token ones are rounded by adding
// 1.5·2^23 (Uniform::encode_exact). Per-channel groups: one thread per 8 channels walks the G
// tokens of the group (coalesced across threads).

#include "../../core/fast_divmod.hpp"
#include "common.cuh"
#include "dequant.cuh"

namespace xquant::cuda {

/// Where the kernels find one stream's storage (device pointers, passed by value).
/// Layout, for `batch` sequences of up to `capacity` tokens, each sequence contiguous:
///   codes   [batch][capacity][code_bytes]                     packed rows, as the CPU stream's
///   params  Axis::Token:   [batch][capacity][width/group][ppg]  fp16 bits
///           Axis::Channel: [batch][capacity/group][width][ppg]
///   window  Axis::Channel: [batch][group][width] fp16 bits: the newest tokens of the unfilled group
///   length  [batch] tokens appended (device mirror of the host count)
template <class Q>
struct StreamView {
  std::uint8_t* codes = nullptr;
  std::uint16_t* params = nullptr;
  std::uint16_t* window = nullptr;
  int* length = nullptr;
  index_t width = 0, group = 0, capacity = 0, code_bytes = 0;
  int batch = 0;
  int group_shift = 0;  ///< log2(group): groups are powers of two, so indexing uses shifts, not 64-bit division

  XQ_HOST_DEVICE std::uint8_t* row(index_t seq, index_t tok) const { return codes + (seq * capacity + tok) * code_bytes; }
  /// Parameters of the group holding (tok, channel j).
  XQ_HOST_DEVICE std::uint16_t* param(index_t seq, index_t tok, index_t j) const {
    if constexpr (Q::axis == Axis::Token)
      return params + ((seq * capacity + tok) * (width >> group_shift) + (j >> group_shift)) * Q::params_per_group;
    else
      return params + ((seq * (capacity >> group_shift) + (tok >> group_shift)) * width + j) * Q::params_per_group;
  }
  XQ_HOST_DEVICE std::uint16_t* window_row(index_t seq, index_t tok) const {
    return window + (seq * group + (tok & (group - 1))) * width;
  }
  /// Tokens of a sequence with codes (per-channel: the whole groups; per-token: all of them).
  /// `group` is a power of two.
  XQ_HOST_DEVICE static index_t quantized(index_t len, index_t group) {
    if constexpr (Q::axis == Axis::Channel) return len - (len & (group - 1));
    else return len;
  }
};

namespace detail {

/// Status bits raised by kernels (read back by DeviceStream::check).
/// kCapacity: an append found a sequence full on the device (only a replayed CUDA graph can get
/// there: direct calls check the capacity on the host); its tokens were not written.
enum : unsigned { kNonFinite = 1u, kFp16Range = 2u, kCapacity = 4u };
/// The device status: word 0 the bits above; word 1 the channel bits c of a position key (set
/// once by the stream); then, 8-byte aligned, the first position of each value error (kNonFinite
/// at words 2-3, kFp16Range at 4-5) as the key (sequence << 31 | token) << c | channel, the
/// smallest such key (all ones: none). Tokens are below 2^31 (the capacity's bound); c is 0 where
/// the sequence and channel bits would not fit 64 (then no channel is recorded).
inline constexpr int kStatusWords = 6;
__host__ __device__ constexpr int position_word(unsigned bit) { return bit == kNonFinite ? 2 : 4; }

/// Raises a value error (kNonFinite or kFp16Range) met at token `tok`, channel `ch` of sequence
/// `seq` (for kFp16Range: the group's first token and channel). A cold path: it reads the key's
/// layout from the status itself, so the kernels carry no parameter for it.
__device__ __forceinline__ void flag_value_error(unsigned* status, unsigned bit, index_t seq, index_t tok, index_t ch) {
  atomicOr(status, bit);
  const unsigned c = status[1];
  const unsigned long long at = static_cast<unsigned long long>(seq) << 31 | static_cast<unsigned long long>(tok);
  const unsigned long long key = c == 0 ? at : at << c | static_cast<unsigned long long>(ch);
  atomicMin(reinterpret_cast<unsigned long long*>(status + position_word(bit)), key);
}

/// Index of the first value of a thread's packed chunk that is NaN or Inf (8·N if none): the
/// channel of a value error, found again on the cold path (packed_range keeps no index).
template <class T, int N>
__device__ __forceinline__ int first_non_finite(const uint4 (&raw)[N]) {
  const T* e = reinterpret_cast<const T*>(raw);
  int first = 8 * N;
#pragma unroll
  for (int i = 8 * N - 1; i >= 0; --i)  // constant indices: raw stays in registers
    if (!isfinite(to_float(e[i]))) first = i;
  return first;
}

/// Values per thread of the per-token append kernel, fixed for benchmarks and tests (8, 32, 64 or
/// 128; ignored where the stream's group cannot take it); 0, the default: chosen per launch.
inline int append_values_per_thread = 0;

/// Destination of input row r: sequence seq0 + r / rows_per_seq, token length[seq] + r % rows_per_seq.
/// (32-bit: a launch holds fewer than 2^31 rows.)
struct RowMap {
  int seq0 = 0;
  FastDivmod rows_per_seq{1};

  RowMap(int first_seq, index_t rows) : seq0(first_seq), rows_per_seq(static_cast<std::uint32_t>(rows)) {}
};

/// Range of a thread's values, on packed pairs: one min and one max instruction per two values.
/// NaN propagates (the _nan forms), so `finite` needs only the two results; on finite input the
/// min and max are the CPU loop's values (up to the sign of a zero, which Uniform::fit drops).
template <class T, int N>
__device__ __forceinline__ void packed_range(const uint4 (&raw)[N], float& lo, float& hi, bool& finite) {
  using T2 = std::conditional_t<std::is_same_v<T, bf16>, __nv_bfloat162, __half2>;
  const T2* e = reinterpret_cast<const T2*>(raw);
  T2 lo2 = e[0], hi2 = e[0];
#pragma unroll
  for (int k = 1; k < 4 * N; ++k) {
    lo2 = __hmin2_nan(lo2, e[k]);
    hi2 = __hmax2_nan(hi2, e[k]);
  }
  const float a = to_float(lo2.x), b = to_float(lo2.y), c = to_float(hi2.x), d = to_float(hi2.y);
  finite = isfinite(a) && isfinite(b) && isfinite(c) && isfinite(d);
  lo = fminf(a, b);
  hi = fmaxf(c, d);
}

/// Codes per group of pack_biased: a word's worth (3 bits: 8 codes in 24 bits), or all N.
template <int Bits, int N>
inline constexpr int codes_per_group = Bits == 3 ? 8 : (N * Bits < 32 ? N : 32 / Bits);

/// Packs codes given as Bias + code (encode_exact's float bits) into groups of codes_per_group
/// codes, code i of a group at bit Bits·i (quant::pack_codes' layout) with one shift-add; the
/// biases ride along modulo 2^32 and leave as one constant per group. group_words then makes the
/// row's words.
template <int Bits, std::uint32_t Bias, int N>
__device__ __forceinline__ void pack_biased(const std::uint32_t (&m)[N],
                                            std::uint32_t (&g)[N / codes_per_group<Bits, N>]) {
  constexpr int per = codes_per_group<Bits, N>;
  constexpr std::uint32_t bias = [] {
    std::uint32_t k = 0;
    for (int i = 0; i < per && Bits * i < 32; ++i) k += Bias << (Bits * i);
    return k;
  }();
#pragma unroll
  for (int k = 0; k < N / per; ++k) {
    std::uint32_t acc = m[k * per] - bias;
#pragma unroll
    for (int i = 1; i < per; ++i) acc += m[k * per + i] << (Bits * i);
    g[k] = acc;
  }
}

/// The little-endian words of the row's bit stream from pack_biased's groups: the groups
/// themselves, or (3 bits) the 24-bit groups funnelled into words.
template <int Bits, int N, int G>
__device__ __forceinline__ void group_words(const std::uint32_t (&g)[G], std::uint32_t (&w)[(N * Bits + 31) / 32]) {
  if constexpr (Bits == 3 && N > 8) {
    static_assert(N % 32 == 0, "3-bit rows: 8 or a multiple of 32 codes per thread");
#pragma unroll
    for (int k = 0; k < N / 32; ++k) {
      w[3 * k] = g[4 * k] | g[4 * k + 1] << 24;
      w[3 * k + 1] = g[4 * k + 1] >> 8 | g[4 * k + 2] << 16;
      w[3 * k + 2] = g[4 * k + 2] >> 16 | g[4 * k + 3] << 8;
    }
  } else {
#pragma unroll
    for (int k = 0; k < G; ++k) w[k] = g[k];
  }
}

/// The input values as floats (exact). bf16 pairs: a shift and a mask per pair, no extraction.
template <class T, int N>
__device__ __forceinline__ void unpack(const uint4 (&raw)[N], float (&xv)[8 * N]) {
  const std::uint32_t* u = reinterpret_cast<const std::uint32_t*>(raw);
#pragma unroll
  for (int k = 0; k < 4 * N; ++k) {
    if constexpr (std::is_same_v<T, bf16>) {
      xv[2 * k] = __uint_as_float(u[k] << 16);
      xv[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
    } else {
      const __half2 h = reinterpret_cast<const __half2*>(raw)[k];
      xv[2 * k] = __low2float(h);
      xv[2 * k + 1] = __high2float(h);
    }
  }
}

/// Stores the first Bytes bytes of `w` at p, in the widest stores its alignment allows (p is
/// aligned to the largest power of two dividing Bytes, at most 16: rows and chunks are).
template <int Bytes, int W>
__device__ __forceinline__ void store_words(std::uint8_t* p, const std::uint32_t (&w)[W]) {
  if constexpr (Bytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < Bytes / 16; ++k)
      reinterpret_cast<uint4*>(p)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
  } else if constexpr (Bytes == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  } else if constexpr (Bytes % 4 == 0) {
#pragma unroll
    for (int k = 0; k < Bytes / 4; ++k) reinterpret_cast<std::uint32_t*>(p)[k] = w[k];
  } else if constexpr (Bytes == 2) {
    *reinterpret_cast<std::uint16_t*>(p) = static_cast<std::uint16_t>(w[0]);
  } else {
#pragma unroll
    for (int b = 0; b < Bytes; ++b) p[b] = static_cast<std::uint8_t>(w[b / 4] >> (8 * (b % 4)));
  }
}

/// Encodes 8·N values (unpacked from `raw`) under the group's parameters and stores their packed
/// codes at `dst`. Codes: Uniform::encode_exact (the quotient from the reciprocal by one correction
/// step, exactly encode()'s division; rounded by adding 1.5·2^23; clamped only where the group can
/// reach past the levels), packed by shift-add.
template <class Q, class T, int N>
__device__ __forceinline__ void encode_store(const uint4 (&raw)[N], typename Q::Params P, float inv, bool in_levels,
                                             std::uint8_t* dst) {
  float xv[8 * N];
  unpack<T>(raw, xv);
  std::uint32_t m[8 * N];
  auto encode_all = [&](auto clamp) {
#pragma unroll
    for (int i = 0; i < 8 * N; ++i) m[i] = float_bits(Q::template encode_exact<decltype(clamp)::value>(xv[i], P, inv));
  };
  if (in_levels) encode_all(std::false_type{});  // the usual group: no clamp needed
  else encode_all(std::true_type{});
  constexpr unsigned per = codes_per_group<Q::bits, 8 * N>, groups = 8 * N / per;
  std::uint32_t g[groups];
  pack_biased<Q::bits, Q::exact_bias>(m, g);
  std::uint32_t w[(8 * N * Q::bits + 31) / 32];
  group_words<Q::bits, 8 * N>(g, w);
  store_words<N * Q::bits>(dst, w);
}

/// The last block of a launch to finish adds n to the lengths of `count` sequences from seq0: one
/// kernel instead of a second launch for the bump (which cost ~2 µs of a ~12 µs small append);
/// graph replays stay right. A launch that met a full sequence (kCapacity) leaves the lengths
/// alone: its rows were not written.
/// Ordering. Each block counts itself done (in `done`, a device word left at zero between
/// launches) after its barrier, which every thread reaches only after its length read has
/// returned: the value addresses the thread's code stores, which come before the barrier. So when
/// the last block bumps the lengths, no block still has a length read outstanding. A thread that
/// raises kCapacity fences after it (a rare path), so the flag is performed before its block's
/// count; the last block's acquire fence then orders its status read after every count. With a
/// device-scope release fence before each block's count (formerly two sequentially consistent
/// fences), every append ran 4-8 % slower: the fence waited for the block's code stores while its
/// warp held the block's slot (NOTES.md item 54).
__device__ __forceinline__ void bump_lengths_when_last(int* length, unsigned* done, const unsigned* status, int seq0,
                                                       int count, int n) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (atomicAdd(done, 1u) != gridDim.x - 1) return;
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  if (!(*reinterpret_cast<const volatile unsigned*>(status) & kCapacity))
    for (int i = 0; i < count; ++i) length[seq0 + i] += n;
  *done = 0;
}

/// Per-token quantize + append. One thread per chunk of VPT consecutive values of a row. A group of
/// G values is G/VPT consecutive lanes (a power of two ≤ 32 that divides the row's chunks, so groups
/// never straddle rows or warps); its min/max is a butterfly over those lanes. Threads map to
/// (row, chunk) over the flattened rows × chunks range.
/// Loads: VPT = 8 reads one 16-byte vector per thread straight into registers (small launches and
/// groups of 8 or 16). VPT ≥ 32 stages the warp's 32 chunks through shared memory: the warp reads
/// them with cp.async in 512-byte coalesced runs (a thread's own 2·VPT bytes, read directly, would
/// put its lanes 2·VPT bytes apart and make every load instruction touch 32 cache lines), then each
/// thread reads its chunk back through an XOR swizzle that keeps both sides free of bank conflicts.
/// Large VPT spreads the per-group work (index math, fit, reciprocal, shuffles) over more values.
template <class Q, class T, int VPT>
__global__ void __launch_bounds__(128) quantize_tokens_kernel(StreamView<Q> v, const T* __restrict__ x, index_t ld,
                                                              unsigned rows, FastDivmod chunks_per_row, RowMap map,
                                                              int count, unsigned* blocks_done, unsigned* status) {
  static_assert(VPT == 8 || VPT == 32 || VPT == 64 || VPT == 128, "chunk of 8, 32, 64 or 128 values");
  constexpr int pieces = VPT / 8;  // 16-byte vectors per chunk
  const unsigned lane = threadIdx.x & 31u;
  const unsigned id = blockIdx.x * 128u + threadIdx.x, total = rows * chunks_per_row.divisor;
  const unsigned r = chunks_per_row.div(id), chunk = chunks_per_row.mod(id, r);
  const bool active = id < total;
  const T* own = x + static_cast<index_t>(r) * ld + static_cast<index_t>(chunk) * VPT;
  // The destination token, read now: issued after the input's copies and their wait (which no load
  // may cross), this load added a second memory round trip to every thread's path.
  const unsigned in_seq = map.rows_per_seq.div(r), within = map.rows_per_seq.mod(r, in_seq);
  const index_t seq = map.seq0 + static_cast<int>(in_seq);
  const index_t tok = active ? v.length[seq] + within : 0;
  // A full sequence (reachable only by replaying a captured append): flag it, write nothing.
  const bool fits = tok < v.capacity;
  float lo = INFINITY, hi = -INFINITY;
  bool finite = true;
  uint4 raw[VPT == 8 ? 1 : 4];
  // Slot of piece p of lane L's chunk: swizzled so that 8 consecutive lanes (a 128-byte shared
  // memory phase) hit distinct 16-byte bank groups when writing consecutive pieces and when each
  // reads its own piece p.
  [[maybe_unused]] auto swizzle = [](unsigned L) {  // some bits of L
    return pieces >= 8 ? (L & 7u) : ((L >> (pieces == 4 ? 1 : 0)) & (pieces - 1));
  };
  [[maybe_unused]] auto slot = [&](unsigned L, unsigned p) { return L * pieces + (p ^ swizzle(L)); };
  [[maybe_unused]] uint4* stage = nullptr;
  // Pieces 4k .. 4k+3 of the lane's chunk into raw. They sit at slot(lane, 4k) ^ 0..3 (4k's low
  // bits are 0): byte offsets 16·slot(lane, 4k) ^ 16i.
  [[maybe_unused]] auto load4 = [&](int k) {
    const unsigned at = 16 * slot(lane, 4 * k);
#pragma unroll
    for (int i = 0; i < (VPT == 8 ? 1 : 4); ++i)
      raw[i] = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(stage) + (at ^ 16 * i));
  };
  if constexpr (VPT == 8) {
    if (active) {
      raw[0] = *reinterpret_cast<const uint4*>(own);
      packed_range<T>(raw, lo, hi, finite);
    }
  } else {
    __shared__ uint4 staged[4][32 * pieces];
    stage = staged[threadIdx.x / 32];
    const unsigned warp_first = id - lane;
    // Copy k moves piece k·32 + lane of the warp's chunks: piece p = lane % pieces of chunk
    // L = k·32/pieces + mine. The two terms of L share no bits and the swizzle takes bits of L, so
    // its slot is 32k + (slot(mine, p) ^ swizzle(k·32/pieces)): one constant xor and offset per
    // copy (slot() afresh, and the chunk's range check, cost ~15 instructions per copy).
    constexpr unsigned per_copy = 32 / pieces;  // chunks per copy
    const unsigned mine = lane / pieces, p = lane % pieces, at = 16 * slot(mine, p);
    const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(stage));
    // Chunk L exists iff warp_first + L < total, i.e. k·per_copy < room.
    const int room =
        warp_first < total ? static_cast<int>(min(total - warp_first, 32u)) - static_cast<int>(mine) : 0;
    // The check predicates the copy inside the asm: as a branch around it, the compiler sank the
    // address math into each branch and redid it there.
    auto copy = [&](int k, const T* src) {
      const unsigned dst = base + 512 * k + (at ^ 16 * swizzle(k * per_copy));
      asm volatile(
          "{\n .reg .pred p;\n setp.lt.s32 p, %2, %3;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(dst),
          "l"(src), "r"(k * static_cast<int>(per_copy)), "r"(room)
          : "memory");
    };
    // The warp's chunks are usually one contiguous run (rows of `ld` = width, or a warp inside one
    // row); otherwise each piece's address comes from its chunk's lane.
    const T* first = reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, reinterpret_cast<std::uintptr_t>(own), 0));
    if (__all_sync(0xffffffffu, !active || own == first + lane * VPT)) {
#pragma unroll
      for (int k = 0; k < pieces; ++k) copy(k, first + lane * 8 + k * 256);
    } else {
#pragma unroll
      for (int k = 0; k < pieces; ++k) {
        const unsigned L = k * per_copy + mine;
        copy(k, reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, reinterpret_cast<std::uintptr_t>(own), L)) + p * 8);
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncwarp();
    if (active) {
#pragma unroll
      for (int k = 0; k < pieces / 4; ++k) {
        load4(k);
        float l, h;
        bool f;
        packed_range<T>(raw, l, h, f);
        lo = fminf(lo, l);
        hi = fmaxf(hi, h);
        finite = finite && f;
      }
    }
  }
  segment_minmax(lo, hi, static_cast<int>(v.group / VPT));
  if (active && !fits) {
    atomicOr(status, kCapacity);
    __threadfence();  // performed before this block's count (bump_lengths_when_last)
  }
  if (active && fits) {
    std::uint16_t p[2] = {0, 0};
    const bool ok = Q::fit(lo, hi, p);
    const index_t j = static_cast<index_t>(chunk) * VPT;
    if (!finite) {  // the first bad value's channel (raw holds the chunk's last pieces: read them again)
      index_t at = j + VPT;
      if constexpr (VPT == 8) {
        at = j + first_non_finite<T>(raw);
      } else {
#pragma unroll 1
        for (int k = pieces / 4 - 1; k >= 0; --k) {
          load4(k);
          const int i = first_non_finite<T>(raw);
          if (i < 32) at = j + 32 * k + i;
        }
      }
      flag_value_error(status, kNonFinite, seq, tok, at);
    }
    if (!ok) flag_value_error(status, kFp16Range, seq, tok, j & ~(v.group - 1));
    if ((j & (v.group - 1)) == 0) {
      std::uint16_t* dst = v.param(seq, tok, j);
      if constexpr (Q::params_per_group == 2) *reinterpret_cast<std::uint32_t*>(dst) = p[0] | std::uint32_t(p[1]) << 16;
      else dst[0] = p[0];
    }
    const auto P = Q::load(p);
    const float inv = Q::reciprocal(P);
    const bool in_levels = Q::rounds_within_levels(lo, hi, P, inv);
    std::uint8_t* out = v.row(seq, tok) + (j / 8) * Q::bits;
    if constexpr (VPT == 8) {
      encode_store<Q, T, 1>(raw, P, inv, in_levels, out);
    } else {
#pragma unroll 1
      for (int k = 0; k < pieces / 4; ++k) {
        load4(k);
        encode_store<Q, T, 4>(raw, P, inv, in_levels, out + 4 * k * Q::bits);
      }
    }
  }
  bump_lengths_when_last(v.length, blocks_done, status, map.seq0, count, static_cast<int>(map.rows_per_seq.divisor));
}

/// Value of an input or window element after the trip through fp16 that every windowed token takes.
template <class T>
__device__ __forceinline__ float via_half(T v) { return half_to_float(float_to_half(to_float(v))); }
__device__ __forceinline__ float via_half(std::uint16_t h) { return half_to_float(h); }

/// Copies rows into the per-channel fp16 window (checking that they fit fp16).
template <class Q, class T>
__global__ void window_store_kernel(StreamView<Q> v, const T* __restrict__ x, index_t ld, index_t rows, RowMap map,
                                    unsigned* status) {
  const unsigned r = blockIdx.x;
  const unsigned in_seq = map.rows_per_seq.div(r);
  const index_t seq = map.seq0 + static_cast<int>(in_seq);
  const index_t tok = v.length[seq] + map.rows_per_seq.mod(r, in_seq);
  for (index_t j = threadIdx.x; j < v.width; j += blockDim.x) {
    const std::uint16_t h = float_to_half(to_float(x[r * ld + j]));
    if (!half_is_finite(h)) flag_value_error(status, kNonFinite, seq, tok, j);
    v.window_row(seq, tok)[j] = h;
  }
}

/// Quantizes whole per-channel groups: group gi of the launch covers source rows
/// [gi*G, gi*G+G) (row stride ld) and lands at tokens first_tok + gi*G of sequence `seq`.
template <class Q, class S>
__global__ void __launch_bounds__(128) quantize_channels_kernel(StreamView<Q> v, const S* __restrict__ src, index_t ld,
                                                                index_t seq, index_t first_tok, unsigned* status) {
  const index_t chunk = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk * 8 >= v.width) return;
  const index_t G = v.group, gi = blockIdx.y, j = chunk * 8;
  const S* base = src + gi * G * ld + j;
  float lo[8], hi[8];
  // Whole groups straight from x have not passed the window's check: a value that is NaN or Inf,
  // or overflows fp16 on the way in (via_half makes that an Inf), is flagged here (the min/max
  // below would skip a NaN), at the first row and channel that hold one.
  index_t bad_row = G;
  int bad_col = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    lo[i] = hi[i] = via_half(base[i]);
    if (!isfinite(lo[i]) && 0 < bad_row) bad_row = 0, bad_col = i;
  }
  for (index_t r = 1; r < G; ++r)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = via_half(base[r * ld + i]);
      if (!isfinite(x) && r < bad_row) bad_row = r, bad_col = i;
      lo[i] = x < lo[i] ? x : lo[i];
      hi[i] = x > hi[i] ? x : hi[i];
    }
  const index_t tok0 = first_tok + gi * G;
  if (bad_row < G) flag_value_error(status, kNonFinite, seq, tok0 + bad_row, j + bad_col);
  typename Q::Params P[8];
  float inv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    std::uint16_t* p = v.param(seq, tok0, j + i);
    std::uint16_t q[2] = {0, 0};
    if (!Q::fit(lo[i], hi[i], q)) flag_value_error(status, kFp16Range, seq, tok0, j + i);
#pragma unroll
    for (int k = 0; k < Q::params_per_group; ++k) p[k] = q[k];
    P[i] = Q::load(q);
    inv[i] = Q::reciprocal(P[i]);
  }
  for (index_t r = 0; r < G; ++r) {
    std::uint8_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = via_half(base[r * ld + i]);
      c[i] = Q::encode_scaled(x, P[i], inv[i]);  // encode()'s code (a constant group's too)
    }
    store_chunk<Q::bits>(v.row(seq, tok0 + r) + chunk * Q::bits, pack8<Q::bits>(c));
  }
}

static __global__ void add_length_kernel(int* length, int seq0, int count, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) length[seq0 + i] += n;
}

/// The values of (seq, tok, j..j+7) in a per-channel stream's fp16 window (its open group).
template <class Q>
__device__ __forceinline__ void window8(const StreamView<Q>& v, index_t seq, index_t tok, index_t j, float (&out)[8]) {
  const std::uint16_t* w = v.window_row(seq, tok) + j;
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = half_to_float(w[i]);
}

/// Per-channel streams: the parameters of channels j..j+7 in tok's token group, 8·ppg consecutive
/// values, 16-byte aligned (j % 8 == 0): read in 16-byte loads.
template <class Q>
__device__ __forceinline__ void channel_params8(const StreamView<Q>& v, index_t seq, index_t tok, index_t j,
                                                typename Q::Params (&P)[8]) {
  uint4 pv[Q::params_per_group];
#pragma unroll
  for (int k = 0; k < Q::params_per_group; ++k) pv[k] = __ldg(reinterpret_cast<const uint4*>(v.param(seq, tok, j)) + k);
  const std::uint16_t* p = reinterpret_cast<const std::uint16_t*>(pv);
#pragma unroll
  for (int i = 0; i < 8; ++i) P[i] = Q::load(p + i * Q::params_per_group);
}

/// Value of (seq, tok, j..j+7) of a stream: from codes, or (per-channel, newest tokens) the window.
template <class Q>
__device__ __forceinline__ void dequant8(const StreamView<Q>& v, index_t seq, index_t tok, index_t j, index_t quantized,
                                         float (&out)[8]) {
  if constexpr (Q::axis == Axis::Channel) {
    if (tok >= quantized) {
      window8(v, seq, tok, j, out);
      return;
    }
  }
  const std::uint64_t w = load_chunk<Q::bits>(v.row(seq, tok) + (j / 8) * Q::bits);
  constexpr std::uint32_t mask = Q::max_code;
  if constexpr (Q::axis == Axis::Token) {
    const auto P = Q::load(v.param(seq, tok, j));
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = Q::decode(static_cast<std::uint32_t>(w >> (i * Q::bits)) & mask, P);
  } else {
    typename Q::Params P[8];
    channel_params8(v, seq, tok, j, P);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = Q::decode(static_cast<std::uint32_t>(w >> (i * Q::bits)) & mask, P[i]);
  }
}

/// Rows [begin, begin+count) of every sequence -> bf16 or float rows, sequence-major (the simple
/// remat path's A): output row r = seq·count + (tok − begin), one block per row (per-token streams;
/// per-channel ones take dequantize_channel_kernel). Rows at or past a sequence's length are
/// written as zeros (the padded decode path relies on it).
template <class Q, class O>
__global__ void dequantize_kernel(StreamView<Q> v, index_t begin, index_t count, unsigned rows, O* __restrict__ out,
                                  index_t ldo) {
  const unsigned r = blockIdx.x;
  const unsigned cnt = static_cast<unsigned>(count);
  const index_t seq = r / cnt, tok = begin + r % cnt;
  const index_t len = v.length[seq];
  const index_t quantized = StreamView<Q>::quantized(len, v.group);
  for (index_t c = threadIdx.x; c * 8 < v.width; c += blockDim.x) {
    float x[8];
    if (tok < len) {
      dequant8(v, seq, tok, c * 8, quantized, x);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = 0.0f;
    }
    store8(out + static_cast<index_t>(r) * ldo + c * 8, x);
  }
}

/// The shape of dequantize_channel_kernel's work.
namespace dq {
inline constexpr int kMaxRows = 16, kBatch = 4, kThreads = 128;
/// Rows per block: kMaxRows, or fewer where that would leave fewer than 4 blocks per
/// multiprocessor (a short range: then more blocks, each with fewer rows).
inline int tile_rows(index_t rows, int multiprocessors) {
  int r = kMaxRows;
  while (r > kBatch && (rows + r - 1) / r < 4 * static_cast<index_t>(multiprocessors)) r /= 2;
  return r;
}
}  // namespace dq
/// Rows per block of the per-channel dequantize kernel, fixed for tests (4, 8 or 16); 0, the
/// default: dq::tile_rows.
inline int dequantize_tile_rows = 0;
/// Per-channel streams: the same rows as dequantize_kernel, `tile_rows` consecutive rows of one
/// sequence per block (a multiple of kBatch, at most kMaxRows). Each thread decodes the same
/// 8-channel chunks of all of its block's rows, so a token group's parameters are read and
/// converted once per block instead of once per row (one block per row read 32 bytes of
/// parameters from L2 for every 8 values, 2-4 bytes of codes); codes of kBatch rows are loaded
/// before any is decoded, and decoded by dequant_code (no integer to float conversion).
template <class Q, class O>
__global__ void __launch_bounds__(dq::kThreads)
    dequantize_channel_kernel(StreamView<Q> v, index_t begin, index_t count, int tile_rows, unsigned tiles,
                              O* __restrict__ out, index_t ldo) {
  static_assert(Q::axis == Axis::Channel, "dequantize_channel_kernel: per-channel streams");
  const index_t seq = blockIdx.x / tiles, r0 = static_cast<index_t>(blockIdx.x % tiles) * tile_rows;
  const int rows = static_cast<int>(count - r0 < tile_rows ? count - r0 : tile_rows);
  const index_t len = v.length[seq], quantized = StreamView<Q>::quantized(len, v.group);
  O* const out0 = out + (seq * count + r0) * ldo;
  for (index_t j = threadIdx.x * 8; j < v.width; j += dq::kThreads * 8) {
    typename Q::Params P[8];
    index_t group = -1;  // the token group whose parameters P holds
    for (int i0 = 0; i0 < rows; i0 += dq::kBatch) {
      std::uint64_t w[dq::kBatch];
#pragma unroll
      for (int i = 0; i < dq::kBatch; ++i) {
        const index_t tok = begin + r0 + i0 + i;
        w[i] = i0 + i < rows && tok < quantized ? load_chunk<Q::bits>(v.row(seq, tok) + (j / 8) * Q::bits) : 0;
      }
#pragma unroll
      for (int i = 0; i < dq::kBatch; ++i) {
        if (i0 + i >= rows) break;
        const index_t tok = begin + r0 + i0 + i;
        float x[8];
        if (tok >= len) {  // past the sequence: zeros (the padded decode path relies on it)
#pragma unroll
          for (int k = 0; k < 8; ++k) x[k] = 0.0f;
        } else if (tok >= quantized) {  // the open group: the fp16 window
          window8(v, seq, tok, j, x);
        } else {
          if ((tok >> v.group_shift) != group) {
            group = tok >> v.group_shift;
            channel_params8(v, seq, tok, j, P);
          }
#pragma unroll
          for (int k = 0; k < 8; ++k)
            x[k] = dequant_code<Q, 0>(static_cast<std::uint32_t>(w[i] >> (k * Q::bits)), P[k].scale, P[k].zero);
        }
        store8(out0 + (i0 + i) * ldo + j, x);
      }
    }
  }
}

}  // namespace detail
}  // namespace xquant::cuda
