#pragma once
// Quantize/append and dequantize kernels for a device stream. The math is the CPU quantizer's
// own (quant::Uniform<...>::fit / encode / decode and quant::pack_codes, all XQ_HOST_DEVICE), so
// codes and fp16 parameters equal quant::QuantOps<backend::Reference>'s bit for bit.
//
// Work split: per-token, one thread per chunk of 8 or 32 consecutive values of a row (16-byte
// input loads, packed stores of Bits bytes per 8 codes); a group of G values is G/8 or G/32
// consecutive lanes, and its min/max a butterfly over them. Codes use Uniform::encode_scaled (a
// reciprocal instead of a division per value; the same codes, see its comment). Per-channel groups: one thread per 8 channels walks
// the G tokens of the group (coalesced across threads).

#include "common.cuh"

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
enum : unsigned { kNonFinite = 1u, kFp16Range = 2u };

/// Destination of input row r: sequence seq0 + r / rows_per_seq, token length[seq] + r % rows_per_seq.
/// (32-bit: a launch holds fewer than 2^31 rows.)
struct RowMap {
  int seq0 = 0;
  unsigned rows_per_seq = 1;
};

/// Per-token quantize + append. One thread per chunk of VPT consecutive values of a row (VPT = 8 or
/// 32; 32 amortizes the per-thread work — index math, the group's fp16 parameters, the reciprocal —
/// over four 16-byte loads in flight). A group of G values is G/VPT consecutive lanes (a power of two
/// ≤ 32 that divides the row's chunks, so groups never straddle rows or warps); its min/max is a
/// butterfly over those lanes. Threads map to (row, chunk) over the flattened rows × chunks range.
template <class Q, class T, int VPT>
__global__ void __launch_bounds__(128) quantize_tokens_kernel(StreamView<Q> v, const T* __restrict__ x, index_t ld,
                                                              unsigned rows, unsigned chunks_per_row, RowMap map,
                                                              unsigned* status) {
  static_assert(VPT % 8 == 0, "whole 16-byte loads");
  const unsigned id = blockIdx.x * 128u + threadIdx.x;
  const unsigned r = id / chunks_per_row, chunk = id - r * chunks_per_row;
  const bool active = r < rows;
  float xv[VPT];
  float lo = INFINITY, hi = -INFINITY;
  bool finite = true;
  if (active) {
    const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<index_t>(r) * ld + static_cast<index_t>(chunk) * VPT);
    uint4 raw[VPT / 8];
#pragma unroll
    for (int k = 0; k < VPT / 8; ++k) raw[k] = src[k];  // all loads issued before any use
#pragma unroll
    for (int k = 0; k < VPT / 8; ++k) {
      const T* e = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[8 * k + i] = to_float(e[i]);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      finite &= isfinite(xv[i]);
      lo = xv[i] < lo ? xv[i] : lo;  // the CPU's comparisons, not fminf (same result on finite input)
      hi = xv[i] > hi ? xv[i] : hi;
    }
  }
  segment_minmax(lo, hi, static_cast<int>(v.group / VPT));
  if (!active) return;
  const unsigned within = r % map.rows_per_seq;
  const index_t seq = map.seq0 + static_cast<int>(r / map.rows_per_seq);
  const index_t tok = v.length[seq] + within;
  std::uint16_t p[2] = {0, 0};
  const bool ok = Q::fit(lo, hi, p);
  if (!finite) atomicOr(status, kNonFinite);
  if (!ok) atomicOr(status, kFp16Range);
  const index_t j = static_cast<index_t>(chunk) * VPT;
  if ((j & (v.group - 1)) == 0) {
    std::uint16_t* dst = v.param(seq, tok, j);
#pragma unroll
    for (int k = 0; k < Q::params_per_group; ++k) dst[k] = p[k];
  }
  const auto P = Q::load(p);
  std::uint8_t* out = v.row(seq, tok) + (j / 8) * Q::bits;
  std::uint8_t c[VPT];
  if (P.scale > 0.0f) {  // one branch per thread, not per value
    const float inv = 1.0f / P.scale;
#pragma unroll
    for (int i = 0; i < VPT; ++i) c[i] = Q::encode_scaled(xv[i], P, inv);
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) c[i] = Q::encode(xv[i], P);
  }
#pragma unroll
  for (int k = 0; k < VPT / 8; ++k) {
    std::uint8_t c8[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c8[i] = c[8 * k + i];
    store_chunk<Q::bits>(out + k * Q::bits, pack8<Q::bits>(c8));
  }
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
  const index_t seq = map.seq0 + static_cast<int>(r / map.rows_per_seq);
  const index_t tok = v.length[seq] + r % map.rows_per_seq;
  for (index_t j = threadIdx.x; j < v.width; j += blockDim.x) {
    const std::uint16_t h = float_to_half(to_float(x[r * ld + j]));
    if (!half_is_finite(h)) atomicOr(status, kNonFinite);
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
#pragma unroll
  for (int i = 0; i < 8; ++i) lo[i] = hi[i] = via_half(base[i]);
  for (index_t r = 1; r < G; ++r)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = via_half(base[r * ld + i]);
      lo[i] = x < lo[i] ? x : lo[i];
      hi[i] = x > hi[i] ? x : hi[i];
    }
  const index_t tok0 = first_tok + gi * G;
  typename Q::Params P[8];
  float inv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    std::uint16_t* p = v.param(seq, tok0, j + i);
    std::uint16_t q[2] = {0, 0};
    if (!Q::fit(lo[i], hi[i], q)) atomicOr(status, kFp16Range);
#pragma unroll
    for (int k = 0; k < Q::params_per_group; ++k) p[k] = q[k];
    P[i] = Q::load(q);
    inv[i] = P[i].scale > 0.0f ? 1.0f / P[i].scale : 0.0f;
  }
  for (index_t r = 0; r < G; ++r) {
    std::uint8_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = via_half(base[r * ld + i]);
      c[i] = P[i].scale > 0.0f ? Q::encode_scaled(x, P[i], inv[i]) : Q::encode(x, P[i]);
    }
    store_chunk<Q::bits>(v.row(seq, tok0 + r) + chunk * Q::bits, pack8<Q::bits>(c));
  }
}

__global__ void add_length_kernel(int* length, int seq0, int count, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) length[seq0 + i] += n;
}

/// Value of (seq, tok, j..j+7) of a stream: from codes, or (per-channel, newest tokens) the window.
template <class Q>
__device__ __forceinline__ void dequant8(const StreamView<Q>& v, index_t seq, index_t tok, index_t j, index_t quantized,
                                         float (&out)[8]) {
  if constexpr (Q::axis == Axis::Channel) {
    if (tok >= quantized) {
      const std::uint16_t* w = v.window_row(seq, tok) + j;
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = half_to_float(w[i]);
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
    // The 8 channels' parameters are 8·ppg consecutive fp16 values, 16-byte aligned (j % 8 == 0).
    uint4 pv[Q::params_per_group];
#pragma unroll
    for (int k = 0; k < Q::params_per_group; ++k) pv[k] = __ldg(reinterpret_cast<const uint4*>(v.param(seq, tok, j)) + k);
    const std::uint16_t* p = reinterpret_cast<const std::uint16_t*>(pv);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      out[i] = Q::decode(static_cast<std::uint32_t>(w >> (i * Q::bits)) & mask, Q::load(p + i * Q::params_per_group));
  }
}

/// Rows [begin, begin+count) of every sequence -> bf16 or float rows, sequence-major (the simple
/// remat path's A): output row r = seq·count + (tok − begin), one block per row. Rows at or past a
/// sequence's length are written as zeros (the padded decode path relies on it).
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
    O* dst = out + static_cast<index_t>(r) * ldo + c * 8;
    if constexpr (std::is_same_v<O, float>) {
      *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(x[4], x[5], x[6], x[7]);
    } else {
      alignas(16) O o[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = __float2bfloat16_rn(x[i]);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(o);
    }
  }
}

}  // namespace detail
}  // namespace xquant::cuda
