#pragma once
// The fused dequantize + tensor-core GEMM mainloop shared by the remat GEMM and the absorbed
// decode attention: C[128×128] = X̂[rows, :]·W[n0:n0+128, :]ᵀ with
//   A (X̂) unpacked from packed codes + fp16 group parameters in registers, written as bf16 to a
//     shared-memory tile (never to device memory);
//   B (W, bf16, row-major N × K as nn.Linear stores it) copied global -> shared by cp.async;
//   bf16 tensor-core MMAs (WMMA 16×16×16, fp32 accumulation), two shared-memory stages.
// One block of 256 threads (8 warps as 2 × 4, each a 64 × 32 piece of C).

#include <mma.h>

#include "quantize.cuh"

namespace xquant::cuda::detail {

namespace gemm {
inline constexpr int BM = 128, BN = 128, BK = 64, LDS = BK + 8, THREADS = 256;
inline constexpr int kStageBytes = (BM + BN) * LDS * 2;
inline constexpr int kSmemBytes = 2 * kStageBytes;
using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::col_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
}  // namespace gemm

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/// One thread's share of the A tile: 32 consecutive values (columns (t&1)*32 of the k-step) of
/// one row (t>>1). Codes are prefetched into registers one k-step ahead; parameters are read
/// when the values are formed.
template <class Q>
struct ALoader {
  static constexpr int kWords = Q::bits;  // 32 codes of Bits bits fill Bits 32-bit words
  static constexpr int kParamVecs = Q::axis == Axis::Channel ? 32 * Q::params_per_group / 8 : 1;
  std::uint32_t w[kWords];
  std::uint32_t prm[1];     // per-token: the row's (scale, zero) for this k-step
  uint4 pv[kParamVecs];     // per-channel: 32 columns' parameters
  const std::uint8_t* row = nullptr;  // codes of this row
  index_t seq = 0, tok = 0;
  bool valid = false, windowed = false;

  __device__ void init(const StreamView<Q>& v, index_t seq_, index_t tok_, bool valid_, index_t quantized) {
    seq = seq_;
    tok = tok_;
    valid = valid_;
    windowed = Q::axis == Axis::Channel && valid && tok >= quantized;
    row = valid ? v.row(seq, tok) : nullptr;
  }
  /// Issues the code loads for columns [k0, k0+32) of this thread's row.
  __device__ void fetch(const StreamView<Q>& v, index_t k0) {
    if (!valid || windowed) return;
    // Group parameters travel with the codes, so the dequantize step never waits on memory.
    const std::uint16_t* pp = v.param(seq, tok, k0);
    if constexpr (Q::axis == Axis::Token) {
      if constexpr (Q::params_per_group == 2) prm[0] = __ldg(reinterpret_cast<const std::uint32_t*>(pp));
      else prm[0] = __ldg(pp);
    } else {
#pragma unroll
      for (int i = 0; i < kParamVecs; ++i) pv[i] = __ldg(reinterpret_cast<const uint4*>(pp) + i);
    }
    const std::uint8_t* p = row + (k0 / 8) * Q::bits;
    if constexpr (kWords == 4) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    } else if constexpr (kWords == 2) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = u.x, w[1] = u.y;
    } else if constexpr (kWords == 8) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(p)), b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
      w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const std::uint32_t*>(p) + i);
    }
  }
  __device__ __forceinline__ std::uint32_t code(int i) const {  // i: compile-time after unrolling
    const int bit = i * Q::bits, wi = bit / 32, sh = bit % 32;
    std::uint32_t c = w[wi] >> sh;
    if (sh + Q::bits > 32) c |= w[wi + 1] << (32 - sh);
    return c & Q::max_code;
  }
  /// Forms the 32 bf16 values and stores them at `dst` (16-byte aligned shared memory).
  __device__ void store(const StreamView<Q>& v, index_t k0, bf16* dst) const {
    std::uint32_t out[16];
    if (!valid) {
#pragma unroll
      for (int i = 0; i < 16; ++i) out[i] = 0;
    } else if (Q::axis == Axis::Channel && windowed) {
      const std::uint16_t* h = v.window_row(seq, tok) + k0;
#pragma unroll
      for (int i = 0; i < 16; ++i) out[i] = pack_bf16x2(half_to_float(h[2 * i]), half_to_float(h[2 * i + 1]));
    } else if constexpr (Q::axis == Axis::Token) {
      const std::uint16_t pr[2] = {static_cast<std::uint16_t>(prm[0]), static_cast<std::uint16_t>(prm[0] >> 16)};
      const auto P = Q::load(pr);
#pragma unroll
      for (int i = 0; i < 16; ++i) out[i] = pack_bf16x2(Q::decode(code(2 * i), P), Q::decode(code(2 * i + 1), P));
    } else {
      const std::uint16_t* pr = reinterpret_cast<const std::uint16_t*>(pv);
#pragma unroll
      for (int i = 0; i < 16; ++i)
        out[i] = pack_bf16x2(Q::decode(code(2 * i), Q::load(pr + (2 * i) * Q::params_per_group)),
                             Q::decode(code(2 * i + 1), Q::load(pr + (2 * i + 1) * Q::params_per_group)));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
      reinterpret_cast<uint4*>(dst)[i] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
  }
};

/// Copies W[n0:n0+BN, k0:k0+BK] into shared memory (rows past N are zero-filled).
__device__ __forceinline__ void load_b_tile(const bf16* __restrict__ W, index_t ldw, index_t n0, index_t N, index_t k0,
                                            bf16* sB) {
  using namespace gemm;
#pragma unroll
  for (int i = 0; i < (BN * BK / 8) / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / (BK / 8), col = (c % (BK / 8)) * 8;
    const bool ok = n0 + r < N;
    cp_async16(sB + r * LDS + col, W + (ok ? (n0 + r) * ldw + k0 + col : 0), ok);
  }
}

/// acc += X̂[tile rows, 0:K]·W[n0:n0+128, 0:K]ᵀ. The calling thread's A row is given by
/// (seq, tok, valid); `quantized` is that sequence's count of tokens with codes. K % 64 == 0.
/// Leaves the shared memory free (ends with a barrier).
template <class Q>
__device__ void fused_mainloop(const StreamView<Q>& v, index_t seq, index_t tok, bool valid, index_t quantized,
                               const bf16* __restrict__ W, index_t ldw, index_t n0, index_t N, index_t K,
                               unsigned char* smem, gemm::FragC (&acc)[4][2]) {
  using namespace gemm;
  const int t = threadIdx.x, warp = t / 32, wm = warp >> 2, wn = warp & 3;
  auto sA = [&](int s) { return reinterpret_cast<bf16*>(smem + s * kStageBytes); };
  auto sB = [&](int s) { return reinterpret_cast<bf16*>(smem + s * kStageBytes) + BM * LDS; };
  bf16* const a_dst0 = sA(0) + (t >> 1) * LDS + (t & 1) * 32;
  bf16* const a_dst1 = sA(1) + (t >> 1) * LDS + (t & 1) * 32;

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);

  ALoader<Q> a;
  a.init(v, seq, tok, valid, quantized);
  const index_t KT = K / BK;
  a.fetch(v, (t & 1) * 32);
  load_b_tile(W, ldw, n0, N, 0, sB(0));
  cp_async_commit();
  a.store(v, (t & 1) * 32, a_dst0);
  int s = 0;
  for (index_t kt = 0; kt < KT; ++kt) {
    const bool more = kt + 1 < KT;
    if (more) {
      a.fetch(v, (kt + 1) * BK + (t & 1) * 32);
      load_b_tile(W, ldw, n0, N, (kt + 1) * BK, sB(s ^ 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* A = sA(s) + wm * 64 * LDS;
    const bf16* B = sB(s) + wn * 32 * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      FragA fa[4];
      FragB fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) nvcuda::wmma::load_matrix_sync(fa[i], A + i * 16 * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], B + j * 16 * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
    if (more) a.store(v, (kt + 1) * BK + (t & 1) * 32, s ? a_dst0 : a_dst1);
    s ^= 1;
  }
}

}  // namespace xquant::cuda::detail
