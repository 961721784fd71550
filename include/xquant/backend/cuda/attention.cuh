#pragma once
// Decode attention (one new query token per sequence, GQA) on the GPU.
//
// attend_absorbed — over the quantized cache, with absorbed values. A block takes one sequence,
//   one KV head and a run of 128-token tiles. Per tile: K = X̂_tile·Wk_headᵀ through the fused
//   dequantize + tensor-core mainloop (kept in shared memory), RoPE at each token's position,
//   scores for the head's query heads, online softmax, and acc_h += p_h·X̂_tile. K and V are
//   never written to device memory. A second kernel merges the blocks' partial softmax sums and
//   projects once per head: o_h = (acc_h / l_h)·Wv_hᵀ + bv_h.
// attend_kv — the same decode attention over materialized K (post-RoPE) and V in bf16 or fp16:
//   the baseline (FP16 KV cache, or materialize-then-attend).
//
// Queries arrive before RoPE; the query of sequence b sits at position length(b)−1 and attends
// to tokens [0, length(b)). Head size 128, up to 8 query heads per KV head.

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "../../cache/config.hpp"
#include "remat.cuh"

namespace xquant::cuda {

/// Scratch of the decode kernels (partial softmax sums per split); grows on demand.
struct DecodeWorkspace {
  DeviceBuffer<float> acc, ml, q;
  DeviceBuffer<bf16> xk, xv, k, p;  // attend_absorbed_gemm: X̂ (keys, values), K before RoPE, weights
  DeviceBuffer<float> s;            // attend_absorbed_gemm: scores
};

namespace detail {
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
namespace attn {
inline constexpr int kDh = 128, kMaxGroup = 8, kTile = 128, kKsLd = kDh + 4;
}

/// qr[b][h][:] = RoPE(q[b][h][:], length(b) − 1) / sqrt(Dh).
static __global__ void rope_queries_kernel(const float* __restrict__ q, index_t ldq, int heads,
                                           const int* __restrict__ length, const float* cos, const float* sin,
                                           float* __restrict__ qr) {
  const int b = blockIdx.y, h = blockIdx.x, p = threadIdx.x;  // p: pair index
  const index_t pos = length[b] - 1;
  const float scale = rsqrtf(static_cast<float>(attn::kDh));
  const float* x = q + b * ldq + h * attn::kDh;
  const float c = cos[pos * (attn::kDh / 2) + p], s = sin[pos * (attn::kDh / 2) + p];
  float* y = qr + (static_cast<index_t>(b) * heads + h) * attn::kDh;
  y[2 * p] = (x[2 * p] * c - x[2 * p + 1] * s) * scale;
  y[2 * p + 1] = (x[2 * p] * s + x[2 * p + 1] * c) * scale;
}

struct SplitArgs {
  int heads, hpg, splits, tiles_per_split;
};

template <class QK, class QV>
__global__ void __launch_bounds__(gemm::THREADS, 1)
    absorbed_decode_kernel(StreamView<QK> vk, StreamView<QV> vv, const bf16* __restrict__ wk, index_t ldwk, index_t nk,
                           const float* __restrict__ qr, const float* cos, const float* sin, SplitArgs sa,
                           float* __restrict__ part_acc, float* __restrict__ part_ml) {
  using namespace gemm;
  using WarpReduce = cub::WarpReduce<float>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z, hpg = sa.hpg;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, wm = warp >> 2, wn = warp & 3;
  const index_t wv_width = vv.width;
  float* Ks = reinterpret_cast<float*>(smem);  // [128][kKsLd], aliases the mainloop's stages
  float* accS = reinterpret_cast<float*>(smem + kSmemBytes);  // [hpg][wv_width]
  float* S = accS + hpg * wv_width;                             // [hpg][128] scores, then weights
  float* qS = S + hpg * attn::kTile;                            // [hpg][128]
  float* stat = qS + hpg * attn::kDh;                           // m[8], l[8], alpha[8]
  auto* red = reinterpret_cast<typename WarpReduce::TempStorage*>(stat + 3 * attn::kMaxGroup);

  const index_t len = vk.length[b];
  const index_t qk = StreamView<QK>::quantized(len, vk.group), qv = StreamView<QV>::quantized(len, vv.group);
  const index_t ntiles = (len + attn::kTile - 1) / attn::kTile;
  const index_t tile0 = static_cast<index_t>(split) * sa.tiles_per_split;
  const index_t tile1 = tile0 + sa.tiles_per_split < ntiles ? tile0 + sa.tiles_per_split : ntiles;

  for (index_t i = t; i < hpg * wv_width; i += THREADS) accS[i] = 0.0f;
  for (int i = t; i < hpg * attn::kDh; i += THREADS)
    qS[i] = qr[(static_cast<index_t>(b) * sa.heads + g * hpg) * attn::kDh + i];
  if (t < attn::kMaxGroup) {
    stat[t] = -INFINITY;
    stat[attn::kMaxGroup + t] = 0.0f;
  }
  __syncthreads();

  for (index_t tile = tile0; tile < tile1; ++tile) {
    const index_t base = tile * attn::kTile;
    const index_t ntok = len - base < attn::kTile ? len - base : attn::kTile;
    FragC acc[4][2];
    const index_t tok = base + (t >> 1);
    fused_mainloop<QK>(vk, b, tok, tok < len, qk, wk, ldwk, static_cast<index_t>(g) * attn::kDh, nk, vk.width, smem, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Ks + (wm * 64 + i * 16) * attn::kKsLd + wn * 32 + j * 16, acc[i][j], attn::kKsLd,
                                        nvcuda::wmma::mem_row_major);
    __syncthreads();

    // Scores: warp w takes tokens w*16 .. w*16+15; lane takes pairs lane and lane+32.
    for (int r = warp * 16; r < warp * 16 + 16; ++r) {
      const index_t pos = base + r;
      float part[attn::kMaxGroup];
#pragma unroll
      for (int j = 0; j < attn::kMaxGroup; ++j) part[j] = 0.0f;
      if (r < ntok) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int p = lane + 32 * h;
          const float2 k = *reinterpret_cast<const float2*>(Ks + r * attn::kKsLd + 2 * p);
          const float c = cos[pos * (attn::kDh / 2) + p], s = sin[pos * (attn::kDh / 2) + p];
          const float k0 = k.x * c - k.y * s, k1 = k.x * s + k.y * c;
#pragma unroll
          for (int j = 0; j < attn::kMaxGroup; ++j)
            if (j < hpg) part[j] += qS[j * attn::kDh + 2 * p] * k0 + qS[j * attn::kDh + 2 * p + 1] * k1;
        }
      }
#pragma unroll
      for (int j = 0; j < attn::kMaxGroup; ++j)
        if (j < hpg) {
          const float sum = WarpReduce(red[warp]).Sum(part[j]);
          if (lane == 0) S[j * attn::kTile + r] = r < ntok ? sum : -INFINITY;
        }
    }
    __syncthreads();

    // Online softmax: warp j updates head j's running max and sum, turns scores into weights.
    if (warp < hpg) {
      float* s = S + warp * attn::kTile;
      float mx = -INFINITY;
      for (int r = lane; r < attn::kTile; r += 32) mx = fmaxf(mx, s[r]);
      mx = __shfl_sync(0xffffffffu, WarpReduce(red[warp]).Reduce(mx, MaxOp{}), 0);
      const float m_old = stat[warp], m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int r = lane; r < attn::kTile; r += 32) {
        const float p = r < ntok ? __expf(s[r] - m_new) : 0.0f;
        s[r] = p;
        sum += p;
      }
      sum = WarpReduce(red[warp]).Sum(sum);
      __syncwarp();  // every lane read m_old = stat[warp] above; lane 0 overwrites it (shuffles do not order memory)
      if (lane == 0) {
        const float alpha = __expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        stat[warp] = m_new;
        stat[attn::kMaxGroup + warp] = stat[attn::kMaxGroup + warp] * alpha + sum;
        stat[2 * attn::kMaxGroup + warp] = alpha;
      }
    }
    __syncthreads();

    // acc_j = alpha_j·acc_j + Σ_r p_j[r]·X̂_v[r]: thread per 8 columns, registers per chunk.
    for (index_t c8 = t; c8 * 8 < wv_width; c8 += THREADS) {
      float a[attn::kMaxGroup][8];
#pragma unroll
      for (int j = 0; j < attn::kMaxGroup; ++j)
        if (j < hpg) {
          const float al = stat[2 * attn::kMaxGroup + j];
#pragma unroll
          for (int i = 0; i < 8; ++i) a[j][i] = accS[j * wv_width + c8 * 8 + i] * al;
        }
#pragma unroll 4
      for (int r = 0; r < ntok; ++r) {
        float x[8];
        dequant8(vv, b, base + r, c8 * 8, qv, x);
#pragma unroll
        for (int j = 0; j < attn::kMaxGroup; ++j)
          if (j < hpg) {
            const float p = S[j * attn::kTile + r];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[j][i] = fmaf(p, x[i], a[j][i]);
          }
      }
#pragma unroll
      for (int j = 0; j < attn::kMaxGroup; ++j)
        if (j < hpg)
#pragma unroll
          for (int i = 0; i < 8; ++i) accS[j * wv_width + c8 * 8 + i] = a[j][i];
    }
    __syncthreads();
  }

  // Partial results of this split: acc (unnormalized), running max and sum.
  for (int j = 0; j < hpg; ++j) {
    const index_t slot = (static_cast<index_t>(b) * sa.heads + g * hpg + j) * sa.splits + split;
    for (index_t c = t; c < wv_width; c += THREADS) part_acc[slot * wv_width + c] = accS[j * wv_width + c];
    if (t == 0) {
      part_ml[2 * slot] = stat[j];
      part_ml[2 * slot + 1] = stat[attn::kMaxGroup + j];
    }
  }
}

/// Merges the splits of (b, h): y = Σ_s e^{m_s−M}·acc_s / Σ_s e^{m_s−M}·l_s, then
/// out = y·Wᵀ + bias (W: the head's Dh rows; nullptr: out = y, width Dh).
static __global__ void combine_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml, int heads,
                                      int hpg, int splits, index_t width, const bf16* __restrict__ w, index_t ldw,
                                      const float* __restrict__ bias, float* __restrict__ out, index_t ldo) {
  extern __shared__ __align__(16) float y[];  // [width]
  __shared__ float wts[1024];
  const int h = blockIdx.x, b = blockIdx.y, g = h / hpg, t = threadIdx.x, warp = t / 32, lane = t % 32;
  const index_t slot0 = (static_cast<index_t>(b) * heads + h) * splits;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part_ml[2 * (slot0 + s)]);
  float L = 0.0f;
  for (int s = t; s < splits; s += blockDim.x) wts[s] = part_ml[2 * (slot0 + s)] == -INFINITY ? 0.0f : __expf(part_ml[2 * (slot0 + s)] - M);
  __syncthreads();
  for (int s = 0; s < splits; ++s) L += wts[s] * part_ml[2 * (slot0 + s) + 1];
  const float inv = 1.0f / L;
  for (index_t c = t; c < width; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += wts[s] * part_acc[(slot0 + s) * width + c];
    y[c] = acc * inv;
  }
  __syncthreads();
  float* o = out + b * ldo + h * attn::kDh;
  if (!w) {
    if (blockIdx.z == 0)
      for (int i = t; i < attn::kDh; i += blockDim.x) o[i] = y[i];
    return;
  }
  // Block z of gridDim.z projects output rows [z·Dh/Z, (z+1)·Dh/Z): with few heads × sequences,
  // more blocks keep more of Wv's reads in flight.
  const int rows = attn::kDh / static_cast<int>(gridDim.z), row0 = static_cast<int>(blockIdx.z) * rows;
  for (int i = row0 + warp; i < row0 + rows; i += blockDim.x / 32) {
    const bf16* row = w + (static_cast<index_t>(g) * attn::kDh + i) * ldw;
    float acc = 0.0f;
    // 4 values per lane per step: y as float4 reads by consecutive lanes (no bank conflicts).
#pragma unroll 8
    for (index_t c = lane * 4; c < width; c += 128) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(row + c));
      const float4 yv = *reinterpret_cast<const float4*>(y + c);
      const bf16* e = reinterpret_cast<const bf16*>(&u);
      acc = fmaf(__bfloat162float(e[0]), yv.x, acc);
      acc = fmaf(__bfloat162float(e[1]), yv.y, acc);
      acc = fmaf(__bfloat162float(e[2]), yv.z, acc);
      acc = fmaf(__bfloat162float(e[3]), yv.w, acc);
    }
#pragma unroll
    for (int o2 = 16; o2 >= 1; o2 >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o2);
    if (lane == 0) o[i] = acc + (bias ? bias[g * attn::kDh + i] : 0.0f);
  }
}

/// combine_kernel for every (head, sequence). With a projection (w non-null) each block takes a
/// slice of the Dh output rows, sliced so that about two blocks per SM run in all (a power of two
/// dividing Dh, at most 8); without one (attend_kv: y is the output) one block per head and sequence.
inline void launch_combine(const float* part_acc, const float* part_ml, int heads, int hpg, int splits, int batch,
                           index_t width, const bf16* w, index_t ldw, const float* bias, float* out, index_t ldo,
                           cudaStream_t stream) {
  unsigned slices = 1;
  while (w && slices < 8 && static_cast<long>(heads) * batch * slices < 264) slices *= 2;
  combine_kernel<<<dim3(static_cast<unsigned>(heads), static_cast<unsigned>(batch), slices), w ? 256 : 128,
                   sizeof(float) * width, stream>>>(part_acc, part_ml, heads, hpg, splits, width, w, ldw, bias, out, ldo);
  check_launch("combine_kernel");
}

/// Decode attention over materialized K, V (T = bf16 or fp16): block (split, kv head, sequence),
/// 4 warps; a warp takes one token at a time, a lane 4 of its 128 dimensions.
template <class T>
__global__ void __launch_bounds__(128) kv_decode_kernel(const T* __restrict__ K, const T* __restrict__ V, index_t ld,
                                                        index_t seq_rows, index_t len, const float* __restrict__ qr,
                                                        SplitArgs sa, index_t chunk, float* __restrict__ part_acc,
                                                        float* __restrict__ part_ml) {
  const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z, hpg = sa.hpg;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  __shared__ float red[4][attn::kMaxGroup][attn::kDh + 2];
  float q[attn::kMaxGroup][4], acc[attn::kMaxGroup][4], m[attn::kMaxGroup], l[attn::kMaxGroup];
#pragma unroll
  for (int j = 0; j < attn::kMaxGroup; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc[j][i] = 0.0f;
      q[j][i] = j < hpg ? qr[(static_cast<index_t>(b) * sa.heads + g * hpg + j) * attn::kDh + lane * 4 + i] : 0.0f;
    }
  }
  const index_t t0 = split * chunk, t1 = t0 + chunk < len ? t0 + chunk : len;
  const T* Kb = K + static_cast<index_t>(b) * seq_rows * ld + g * attn::kDh + lane * 4;
  const T* Vb = V + static_cast<index_t>(b) * seq_rows * ld + g * attn::kDh + lane * 4;
  for (index_t tok = t0 + warp; tok < t1; tok += 4) {
    const uint2 ku = __ldg(reinterpret_cast<const uint2*>(Kb + tok * ld));
    const uint2 vu = __ldg(reinterpret_cast<const uint2*>(Vb + tok * ld));
    const T* ke = reinterpret_cast<const T*>(&ku);
    const T* ve = reinterpret_cast<const T*>(&vu);
    float k[4], v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) k[i] = to_float(ke[i]), v[i] = to_float(ve[i]);
#pragma unroll
    for (int j = 0; j < attn::kMaxGroup; ++j)
      if (j < hpg) {
        float s = q[j][0] * k[0] + q[j][1] * k[1] + q[j][2] * k[2] + q[j][3] * k[3];
#pragma unroll
        for (int o = 16; o >= 1; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float mn = fmaxf(m[j], s), al = __expf(m[j] - mn), p = __expf(s - mn);
        l[j] = l[j] * al + p;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = acc[j][i] * al + p * v[i];
        m[j] = mn;
      }
  }
  // Merge the 4 warps.
#pragma unroll
  for (int j = 0; j < attn::kMaxGroup; ++j)
    if (j < hpg) {
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][j][lane * 4 + i] = acc[j][i];
      if (lane == 0) red[warp][j][attn::kDh] = m[j], red[warp][j][attn::kDh + 1] = l[j];
    }
  __syncthreads();
  for (int j = 0; j < hpg; ++j) {
    float M = -INFINITY;
    for (int w = 0; w < 4; ++w) M = fmaxf(M, red[w][j][attn::kDh]);
    const index_t slot = (static_cast<index_t>(b) * sa.heads + g * hpg + j) * sa.splits + split;
    float L = 0.0f, a = 0.0f;
    for (int w = 0; w < 4; ++w) {
      const float mw = red[w][j][attn::kDh];
      const float f = mw == -INFINITY ? 0.0f : __expf(mw - M);
      L += f * red[w][j][attn::kDh + 1];
      a += f * red[w][j][t];
    }
    part_acc[slot * attn::kDh + t] = a;
    if (t == 0) part_ml[2 * slot] = M, part_ml[2 * slot + 1] = L;
  }
}

/// Scores of the GEMM path: S[b][h][t] = qr[b][h]·RoPE(K[b·Lp + t, g·Dh:(g+1)·Dh], t) for t < len(b),
/// −inf for len(b) <= t < Lp, for the hpg heads of KV head g. Block (token tile of 128, kv head,
/// sequence), one thread per token: its key row read as 16-byte vectors, the queries from shared memory.
static __global__ void __launch_bounds__(128)
    gemm_scores_kernel(const bf16* __restrict__ K, index_t ldk, index_t Lp, const int* __restrict__ length,
                       const float* __restrict__ qr, const float* __restrict__ cos, const float* __restrict__ sin,
                       int heads, int hpg, float* __restrict__ S) {
  __shared__ float qs[attn::kMaxGroup * attn::kDh];
  const int g = blockIdx.y, b = blockIdx.z;
  for (int i = threadIdx.x; i < hpg * attn::kDh; i += blockDim.x)
    qs[i] = qr[(static_cast<index_t>(b) * heads + g * hpg) * attn::kDh + i];
  __syncthreads();
  const index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= Lp) return;
  constexpr int half = attn::kDh / 2;
  float part[attn::kMaxGroup];
#pragma unroll
  for (int j = 0; j < attn::kMaxGroup; ++j) part[j] = 0.0f;
  if (t < length[b]) {
    const bf16* krow = K + (static_cast<index_t>(b) * Lp + t) * ldk + g * attn::kDh;
#pragma unroll 4
    for (int c = 0; c < attn::kDh; c += 8) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(krow + c));
      const float4 cs = __ldg(reinterpret_cast<const float4*>(cos + t * half + c / 2));
      const float4 sn = __ldg(reinterpret_cast<const float4*>(sin + t * half + c / 2));
      const bf16* e = reinterpret_cast<const bf16*>(&u);
      const float cv[4] = {cs.x, cs.y, cs.z, cs.w}, sv[4] = {sn.x, sn.y, sn.z, sn.w};
      float k[8];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float k0 = __bfloat162float(e[2 * p]), k1 = __bfloat162float(e[2 * p + 1]);
        k[2 * p] = k0 * cv[p] - k1 * sv[p];
        k[2 * p + 1] = k0 * sv[p] + k1 * cv[p];
      }
#pragma unroll
      for (int j = 0; j < attn::kMaxGroup; ++j)
        if (j < hpg)
#pragma unroll
          for (int i = 0; i < 8; ++i) part[j] = fmaf(qs[j * attn::kDh + c + i], k[i], part[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < attn::kMaxGroup; ++j) part[j] = -INFINITY;
  }
#pragma unroll
  for (int j = 0; j < attn::kMaxGroup; ++j)
    if (j < hpg) S[(static_cast<index_t>(b) * heads + g * hpg + j) * Lp + t] = part[j];
}
/// Softmax of the GEMM path, one block per (head, sequence): P = bf16(e^{S−m}) (zeros past the
/// sequence's length), ml = (m, l) with l the sum of the rounded weights (splits = 1 for combine).
static __global__ void __launch_bounds__(256) gemm_softmax_kernel(const float* __restrict__ S, index_t Lp,
                                                                  const int* __restrict__ length, int heads,
                                                                  bf16* __restrict__ P, float* __restrict__ ml) {
  using BlockReduce = cub::BlockReduce<float, 256>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float bcast;
  const int h = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
  const index_t slot = static_cast<index_t>(b) * heads + h, len = length[b];
  const float* s = S + slot * Lp;
  bf16* p = P + slot * Lp;
  float mx = -INFINITY;
  for (index_t i = t; i < len; i += 256) mx = fmaxf(mx, s[i]);
  mx = BlockReduce(tmp).Reduce(mx, MaxOp{});
  if (t == 0) bcast = mx;
  __syncthreads();
  mx = bcast;
  float sum = 0.0f;
  for (index_t i = t; i < Lp; i += 256) {
    const bf16 w = __float2bfloat16_rn(i < len ? __expf(s[i] - mx) : 0.0f);
    p[i] = w;
    sum += __bfloat162float(w);
  }
  __syncthreads();
  sum = BlockReduce(tmp).Sum(sum);
  if (t == 0) {
    ml[2 * slot] = mx;
    ml[2 * slot + 1] = sum;
  }
}

inline void check_attention(const AttentionShape& a) {
  require<ConfigError>(a.head_dim == attn::kDh, "CUDA decode attention: head_dim must be 128, got ", a.head_dim);
  require<ConfigError>(a.kv_heads > 0 && a.heads % a.kv_heads == 0 && a.heads / a.kv_heads <= attn::kMaxGroup,
                       "CUDA decode attention: heads must be a multiple of kv_heads with at most ", attn::kMaxGroup,
                       " query heads per KV head, got ", a.heads, " and ", a.kv_heads);
}

/// Splits so that about two blocks per multiprocessor are in flight.
inline int pick_splits(index_t blocks_per_split, index_t max_splits) {
  int dev = 0, sms = 132;
  XQ_CUDA_CHECK(cudaGetDevice(&dev));
  XQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  index_t s = (2 * sms + blocks_per_split - 1) / blocks_per_split;
  s = s < 1 ? 1 : (s > max_splits ? max_splits : s);
  return static_cast<int>(s < 1024 ? s : 1024);
}

inline void rope_queries(const float* q, index_t ldq, int batch, const AttentionShape& a, const int* length,
                         const DeviceRope& rope, DecodeWorkspace& ws, cudaStream_t stream) {
  require<ConfigError>(rope.head_dim() == a.head_dim, "rope: head_dim ", rope.head_dim(), " differs from ", a.head_dim);
  ws.q.reserve(static_cast<std::size_t>(batch * a.heads * a.head_dim));
  rope_queries_kernel<<<dim3(static_cast<unsigned>(a.heads), static_cast<unsigned>(batch)), attn::kDh / 2, 0, stream>>>(
      q, ldq, static_cast<int>(a.heads), length, rope.cos(), rope.sin(), ws.q.data());
  check_launch("rope_queries_kernel");
}

}  // namespace detail

/// Value/key weights of one layer for the absorbed decode, bf16 row-major (out × in).
struct DecodeWeights {
  const bf16* wk = nullptr;  ///< dkv × keys.width
  index_t ldwk = 0;          ///< 0: keys.width
  const bf16* wv = nullptr;  ///< dkv × values.width
  index_t ldwv = 0;          ///< 0: values.width
  const float* bv = nullptr; ///< dkv, optional (a key bias only shifts scores and is dropped)
};

namespace detail {
/// Weights the decode kernels read as 16-byte vectors: aligned, rows a multiple of 8 values.
inline void check_decode_weights(const DecodeWeights& w, index_t key_width, index_t value_width, const char* fn) {
  require<ShapeError>(reinterpret_cast<std::uintptr_t>(w.wk) % 16 == 0 && reinterpret_cast<std::uintptr_t>(w.wv) % 16 == 0,
                      fn, ": wk and wv must be 16-byte aligned");
  require<ShapeError>(w.ldwk == 0 || (w.ldwk >= key_width && w.ldwk % 8 == 0), fn, ": ldwk must be 0 or >= the key width ",
                      key_width, " and a multiple of 8, got ", w.ldwk);
  require<ShapeError>(w.ldwv == 0 || (w.ldwv >= value_width && w.ldwv % 8 == 0), fn,
                      ": ldwv must be 0 or >= the value width ", value_width, " and a multiple of 8, got ", w.ldwv);
}
}  // namespace detail

/// Decode attention with absorbed values over a quantized cache.
/// \tparam QK, QV quantizers of the key-side and value-side streams: the same stream (XQuant:
///                both are X) or two (latent codec: X·Uk and X·Uv, weights ΣBᵀ).
/// \param q   batch × H·Dh floats (row stride ldq, 0: H·Dh), before RoPE
/// \param out batch × H·Dh floats (row stride ldo, 0: H·Dh): the heads' outputs
template <class QK, class QV>
void attend_absorbed(const DeviceStream<QK>& keys, const DeviceStream<QV>& values, const AttentionShape& a,
                     const DecodeWeights& w, const DeviceRope& rope, const float* q, float* out, DecodeWorkspace& ws,
                     cudaStream_t stream, index_t ldq = 0, index_t ldo = 0, int splits = 0) {
  detail::check_attention(a);
  const auto &ks = keys.shape(), &vs = values.shape();
  const int B = ks.batch;
  const int hpg = static_cast<int>(a.heads / a.kv_heads);
  require<ShapeError>(vs.batch == B, "attend_absorbed: key and value streams hold ", B, " and ", vs.batch, " sequences");
  require<ShapeError>(w.wk && w.wv && q && out, "attend_absorbed: wk, wv, q and out must not be null");
  detail::check_decode_weights(w, ks.width, vs.width, "attend_absorbed");
  require<ConfigError>(ks.width % detail::gemm::BK == 0, "attend_absorbed: key width must be a multiple of 64, got ", ks.width);
  require<ConfigError>(QK::axis == Axis::Channel || ks.group >= 32, "attend_absorbed: per-token key groups must be >= 32");
  index_t maxlen = 0;
  for (int b = 0; b < B; ++b) {
    require<ShapeError>(keys.length(b) >= 1 && keys.length(b) == values.length(b), "attend_absorbed: sequence ", b,
                        " has ", keys.length(b), " key-side and ", values.length(b), " value-side tokens (need equal, >= 1)");
    require<ConfigError>(keys.length(b) <= rope.max_positions(), "attend_absorbed: sequence ", b,
                         " is longer than the RoPE table");
    maxlen = std::max(maxlen, keys.length(b));
  }
  ldq = ldq ? ldq : a.q_width();
  ldo = ldo ? ldo : a.q_width();
  const index_t tiles = (maxlen + detail::attn::kTile - 1) / detail::attn::kTile;
  if (splits <= 0) splits = detail::pick_splits(B * a.kv_heads, tiles);
  const int tps = static_cast<int>((tiles + splits - 1) / splits);
  splits = static_cast<int>((tiles + tps - 1) / tps);
  const std::size_t smem = detail::gemm::kSmemBytes +
                           sizeof(float) * (hpg * vs.width + 2 * hpg * 128 + 3 * detail::attn::kMaxGroup) + 8 * 64;
  require<ConfigError>(smem <= 227 * 1024, "attend_absorbed: ", hpg, " heads per KV head × value width ", vs.width,
                       " need ", smem, " bytes of shared memory (at most 227 KB)");
  const std::size_t slots = static_cast<std::size_t>(B) * a.heads * splits;
  ws.acc.reserve(slots * vs.width);
  ws.ml.reserve(slots * 2);
  detail::rope_queries(q, ldq, B, a, keys.view().length, rope, ws, stream);

  auto kernel = detail::absorbed_decode_kernel<QK, QV>;
  XQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const detail::SplitArgs sa{static_cast<int>(a.heads), hpg, splits, tps};
  kernel<<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(B)),
           detail::gemm::THREADS, smem, stream>>>(keys.view(), values.view(), w.wk, w.ldwk ? w.ldwk : ks.width,
                                                  a.kv_width(), ws.q.data(), rope.cos(), rope.sin(), sa, ws.acc.data(),
                                                  ws.ml.data());
  check_launch("absorbed_decode_kernel");
  require<ConfigError>(splits <= 1024, "attend_absorbed: too many splits");
  detail::launch_combine(ws.acc.data(), ws.ml.data(), static_cast<int>(a.heads), hpg, splits, B, vs.width, w.wv,
                         w.ldwv ? w.ldwv : vs.width, w.bv, out, ldo, stream);
}

/// Decode attention with absorbed values, through cuBLAS: the fastest path when K's GEMM dominates.
/// Same inputs and result as attend_absorbed, but it writes to device scratch (in `ws`, grown on
/// demand): X̂ of the key stream (and of the value stream when it is another stream) as bf16,
/// K = X̂k·Wkᵀ before RoPE (bf16, B·Lp × dkv, Lp = longest sequence rounded up to 8), scores and
/// bf16 softmax weights. Steps: dequantize; cuBLAS GEMM for K; scores with RoPE applied on the
/// fly; softmax; acc_h = P_h·X̂v as one cuBLAS batched GEMM (fp32 out); o_h = (acc_h/l_h)·Wv_hᵀ + bv.
/// V is never formed. attend_absorbed is the variant that writes neither K nor X̂.
template <class QK, class QV>
void attend_absorbed_gemm(const DeviceStream<QK>& keys, const DeviceStream<QV>& values, const AttentionShape& a,
                          const DecodeWeights& w, const DeviceRope& rope, const float* q, float* out, DecodeWorkspace& ws,
                          Cublas& blas, cudaStream_t stream, index_t ldq = 0, index_t ldo = 0) {
  detail::check_attention(a);
  const auto &ks = keys.shape(), &vs = values.shape();
  const int B = ks.batch;
  const int hpg = static_cast<int>(a.heads / a.kv_heads);
  require<ShapeError>(vs.batch == B, "attend_absorbed_gemm: key and value streams hold ", B, " and ", vs.batch,
                      " sequences");
  require<ShapeError>(w.wk && w.wv && q && out, "attend_absorbed_gemm: wk, wv, q and out must not be null");
  detail::check_decode_weights(w, ks.width, vs.width, "attend_absorbed_gemm");
  index_t maxlen = 0;
  for (int b = 0; b < B; ++b) {
    require<ShapeError>(keys.length(b) >= 1 && keys.length(b) == values.length(b), "attend_absorbed_gemm: sequence ",
                        b, " has ", keys.length(b), " key-side and ", values.length(b),
                        " value-side tokens (need equal, >= 1)");
    require<ConfigError>(keys.length(b) <= rope.max_positions(), "attend_absorbed_gemm: sequence ", b,
                         " is longer than the RoPE table");
    maxlen = std::max(maxlen, keys.length(b));
  }
  ldq = ldq ? ldq : a.q_width();
  ldo = ldo ? ldo : a.q_width();
  const index_t Lp = (maxlen + 7) / 8 * 8, dkv = a.kv_width(), H = a.heads;
  const bool same = keys.view().codes == reinterpret_cast<const void*>(values.view().codes);
  ws.xk.reserve(static_cast<std::size_t>(B * Lp * ks.width));
  if (!same) ws.xv.reserve(static_cast<std::size_t>(B * Lp * vs.width));
  ws.k.reserve(static_cast<std::size_t>(B * Lp * dkv));
  ws.s.reserve(static_cast<std::size_t>(B * H * Lp));
  ws.p.reserve(static_cast<std::size_t>(B * H * Lp));
  ws.acc.reserve(static_cast<std::size_t>(B * H * vs.width));
  ws.ml.reserve(static_cast<std::size_t>(B * H * 2));
  const int* length = keys.view().length;
  detail::rope_queries(q, ldq, B, a, length, rope, ws, stream);
  detail::launch_dequantize(keys.view(), 0, Lp, ws.xk.data(), ks.width, stream);
  gemm_bf16_nt(blas, B * Lp, dkv, ks.width, ws.xk.data(), ks.width, w.wk, w.ldwk ? w.ldwk : ks.width, ws.k.data(), dkv,
               stream);
  detail::gemm_scores_kernel<<<dim3(static_cast<unsigned>((Lp + 127) / 128), static_cast<unsigned>(a.kv_heads),
                                    static_cast<unsigned>(B)),
                               128, 0, stream>>>(ws.k.data(), dkv, Lp, length, ws.q.data(), rope.cos(), rope.sin(),
                                                 static_cast<int>(H), hpg, ws.s.data());
  check_launch("gemm_scores_kernel");
  detail::gemm_softmax_kernel<<<dim3(static_cast<unsigned>(H), static_cast<unsigned>(B)), 256, 0, stream>>>(
      ws.s.data(), Lp, length, static_cast<int>(H), ws.p.data(), ws.ml.data());
  check_launch("gemm_softmax_kernel");
  const bf16* xv = ws.xk.data();
  if (!same) {
    detail::launch_dequantize(values.view(), 0, Lp, ws.xv.data(), vs.width, stream);
    xv = ws.xv.data();
  }
  // acc_b (H × wv, row-major) = P_b (H × Lp) · X̂v_b (Lp × wv): column-major accᵀ = X̂vᵀ · Pᵀ.
  const float one = 1.0f, zero = 0.0f;
  XQ_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      blas.on(stream), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(vs.width), static_cast<int>(H), static_cast<int>(Lp),
      &one, xv, CUDA_R_16BF, static_cast<int>(vs.width), static_cast<long long>(Lp * vs.width), ws.p.data(), CUDA_R_16BF,
      static_cast<int>(Lp), static_cast<long long>(H * Lp), &zero, ws.acc.data(), CUDA_R_32F, static_cast<int>(vs.width),
      static_cast<long long>(H * vs.width), B, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  detail::launch_combine(ws.acc.data(), ws.ml.data(), static_cast<int>(H), hpg, 1, B, vs.width, w.wv,
                         w.ldwv ? w.ldwv : vs.width, w.bv, out, ldo, stream);
}

/// Decode attention over materialized K (post-RoPE) and V (T = bf16 or fp16): token t of
/// sequence b is row b·seq_rows + t (row stride ld elements, head g at columns g·Dh); every
/// sequence has `len` tokens and its query sits at position len−1. `length` is a device array
/// of `batch` ints equal to len (queries are rotated at length−1).
template <class T>
void attend_kv(const T* K, const T* V, index_t ld, index_t seq_rows, int batch, index_t len, const int* length,
               const AttentionShape& a, const DeviceRope& rope, const float* q, float* out, DecodeWorkspace& ws,
               cudaStream_t stream, index_t ldq = 0, index_t ldo = 0, int splits = 0) {
  static_assert(detail::is_input_type<T>, "attend_kv: K and V must be bf16 or fp16");
  detail::check_attention(a);
  require<ShapeError>(K && V && q && out && length, "attend_kv: null pointer");
  require<ShapeError>(ld >= a.kv_width() && ld % 4 == 0 && len >= 1 && seq_rows >= len, "attend_kv: bad ld/len/seq_rows");
  ldq = ldq ? ldq : a.q_width();
  ldo = ldo ? ldo : a.q_width();
  const int hpg = static_cast<int>(a.heads / a.kv_heads);
  if (splits <= 0) splits = detail::pick_splits(batch * a.kv_heads, (len + 127) / 128);
  const index_t chunk = ((len + splits - 1) / splits + 31) / 32 * 32;
  splits = static_cast<int>((len + chunk - 1) / chunk);
  const std::size_t slots = static_cast<std::size_t>(batch) * a.heads * splits;
  ws.acc.reserve(slots * a.head_dim);
  ws.ml.reserve(slots * 2);
  detail::rope_queries(q, ldq, batch, a, length, rope, ws, stream);
  const detail::SplitArgs sa{static_cast<int>(a.heads), hpg, splits, 0};
  detail::kv_decode_kernel<T><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads),
                                     static_cast<unsigned>(batch)), 128, 0, stream>>>(K, V, ld, seq_rows, len, ws.q.data(),
                                                                                     sa, chunk, ws.acc.data(), ws.ml.data());
  check_launch("kv_decode_kernel");
  detail::launch_combine(ws.acc.data(), ws.ml.data(), static_cast<int>(a.heads), hpg, splits, batch, a.head_dim,
                         nullptr, 0, nullptr, out, ldo, stream);
}

}  // namespace xquant::cuda
