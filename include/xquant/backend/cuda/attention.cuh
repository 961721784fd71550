#pragma once
// Decode attention (one new query token per sequence, GQA) on the GPU.
//
// attend_absorbed — over the quantized cache, with absorbed values; K, V and X̂ are never written
//   to device memory. Two implementations:
//   - sm_90a (attend_absorbed_wgmma, where remat_wgmma applies to the key stream): the scores come
//     out of the wgmma remat kernel, whose epilogue rotates each K row in its accumulators and
//     dots it with the queries (score_tile); a softmax over each row; acc_h = P_h·X̂v by
//     absorb_values_kernel, which decodes X̂v into shared memory tile by tile (tensor cores,
//     split over tokens); then the projection o_h = (acc_h / l_h)·Wv_hᵀ + bv_h.
//   - elsewhere (absorbed_decode_kernel): a block takes one sequence, one KV head and a run of
//     128-token tiles. Per tile: K = X̂_tile·Wk_headᵀ through the portable fused mainloop (kept in
//     shared memory), RoPE at each token's position, scores for the head's query heads, online
//     softmax, and acc_h += p_h·X̂_tile. Then the blocks' partial softmax sums are merged (a kernel
//     of its own when there are several splits) and projected as above.
// attend_absorbed_gemm — the same result through cuBLAS, with X̂ and K in scratch.
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
  DeviceBuffer<float> y;            // the merged splits, when several are projected
  DeviceBuffer<bf16> xk, xv, k;     // attend_absorbed_gemm: X̂ (keys, values), K before RoPE
  DeviceBuffer<bf16> p;             // softmax weights (attend_absorbed_gemm; attend_absorbed on sm_90a)
  DeviceBuffer<float> s;            // scores (the same two)
  DeviceBuffer<float> part;         // attend_absorbed on sm_90a: P·X̂v partial sums per token split
};

namespace detail {
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
namespace attn {
inline constexpr int kDh = 128, kMaxGroup = 8, kTile = 128, kKsLd = kDh + 4;
}

/// Sums each of a lane's N = 2·O values over aligned groups of N lanes (N = 16 or 32): afterwards
/// lane l holds the group's sum of v[l % N]. At each butterfly step a lane keeps half of its values
/// and trades the other half: N − 1 shuffles. One step per instantiation, so that every index is a
/// constant (the values stay in registers).
template <int O, int N>
__device__ __forceinline__ float transpose_reduce(float (&v)[N], int lane) {
  static_assert(2 * O <= N);
  const bool upper = lane & O;
#pragma unroll
  for (int i = 0; i < O; ++i) {
    const float lo = v[i], hi = v[i + O];
    v[i] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, O);
  }
  if constexpr (O > 1) return transpose_reduce<O / 2>(v, lane);
  else return v[0];
}

/// Calls f(std::integral_constant<int, G>{}) with G the power of two >= hpg: kernels templated on G
/// keep G values per query head of the group in registers.
template <class F>
inline void dispatch_group(int hpg, F&& f) {
  if (hpg == 1) f(std::integral_constant<int, 1>{});
  else if (hpg == 2) f(std::integral_constant<int, 2>{});
  else if (hpg <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

/// qr[b][h][:] = RoPE(q[b][h][:], length(b) − 1) / sqrt(Dh). A length outside [1, positions]
/// (possible only when a replayed CUDA graph outgrew its max_tokens bound) gives NaN queries, so
/// the step's output shows it, instead of a read past the RoPE table.
static __global__ void rope_queries_kernel(const float* __restrict__ q, index_t ldq, int heads,
                                           const int* __restrict__ length, const float* cos, const float* sin,
                                           index_t positions, float* __restrict__ qr) {
  const int b = blockIdx.y, h = blockIdx.x, p = threadIdx.x;  // p: pair index
  const index_t pos = length[b] - 1;
  const float scale = rsqrtf(static_cast<float>(attn::kDh));
  const float* x = q + b * ldq + h * attn::kDh;
  const bool in_table = pos >= 0 && pos < positions;
  const float c = in_table ? cos[pos * (attn::kDh / 2) + p] : NAN, s = in_table ? sin[pos * (attn::kDh / 2) + p] : NAN;
  float* y = qr + (static_cast<index_t>(b) * heads + h) * attn::kDh;
  y[2 * p] = (x[2 * p] * c - x[2 * p + 1] * s) * scale;
  y[2 * p + 1] = (x[2 * p] * s + x[2 * p + 1] * c) * scale;
}

struct SplitArgs {
  int heads, hpg, splits, tiles_per_split;
  index_t limit;  // tokens past it are left out (a sequence longer than attend_absorbed's max_tokens)
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
  const index_t end = len < sa.limit ? len : sa.limit;  // the tokens attended over
  const index_t ntiles = (end + attn::kTile - 1) / attn::kTile;
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
    const index_t ntok = end - base < attn::kTile ? end - base : attn::kTile;
    FragC acc[4][2];
    const index_t tok = base + (t >> 1);
    fused_mainloop<QK>(vk, b, tok, tok < end, qk, wk, ldwk, static_cast<index_t>(g) * attn::kDh, nk, vk.width, smem, acc);
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

/// Merges the splits of each (b, h): y = Σ_s e^{m_s−M}·acc_s / Σ_s e^{m_s−M}·l_s with M = max_s m_s
/// (a split without tokens, m_s = −inf, weighs 0), written to out[b·ldo + h·width + c]. Block
/// (128 columns, h, b): warp w takes splits w, w+8, ..., a lane one float4 of columns, with the
/// loads of several splits in flight; the 8 warps' sums are added in shared memory.
static __global__ void __launch_bounds__(256)
    merge_splits_kernel(const float* __restrict__ part_acc, const float* __restrict__ part_ml, int heads, int splits,
                        index_t width, float* __restrict__ out, index_t ldo) {
  using BlockReduce = cub::BlockReduce<float, 256>;
  constexpr int kWarps = 8, kLoads = 4;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float wts[1024];
  __shared__ float4 sums[kWarps][32];
  __shared__ float stat[2];  // M, 1/L
  const int h = blockIdx.y, b = blockIdx.z, t = threadIdx.x, warp = t / 32, lane = t % 32;
  const index_t slot0 = (static_cast<index_t>(b) * heads + h) * splits;
  float m = -INFINITY;
  for (int s = t; s < splits; s += blockDim.x) m = fmaxf(m, part_ml[2 * (slot0 + s)]);
  m = BlockReduce(tmp).Reduce(m, MaxOp{});
  if (t == 0) stat[0] = m;
  __syncthreads();
  const float M = stat[0];
  float l = 0.0f;
  for (int s = t; s < splits; s += blockDim.x) {
    const float ms = part_ml[2 * (slot0 + s)];
    wts[s] = ms == -INFINITY ? 0.0f : __expf(ms - M);
    l += wts[s] * part_ml[2 * (slot0 + s) + 1];
  }
  l = BlockReduce(tmp).Sum(l);
  if (t == 0) stat[1] = 1.0f / l;
  __syncthreads();

  const index_t c = (static_cast<index_t>(blockIdx.x) * 32 + lane) * 4;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (c < width)
    for (int s0 = warp; s0 < splits; s0 += kWarps * kLoads) {
      float4 v[kLoads];
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int s = s0 + kWarps * i;
        v[i] = s < splits ? __ldg(reinterpret_cast<const float4*>(part_acc + (slot0 + s) * width + c))
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const float f = s0 + kWarps * i < splits ? wts[s0 + kWarps * i] : 0.0f;
        acc.x = fmaf(f, v[i].x, acc.x);
        acc.y = fmaf(f, v[i].y, acc.y);
        acc.z = fmaf(f, v[i].z, acc.z);
        acc.w = fmaf(f, v[i].w, acc.w);
      }
    }
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < width) {
    float4 y = sums[0][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 p = sums[w][lane];
      y.x += p.x, y.y += p.y, y.z += p.z, y.w += p.w;
    }
    const float inv = stat[1];
    float* o = out + b * ldo + h * width + c;  // scalar stores: ldo need not keep 16-byte alignment
    o[0] = y.x * inv, o[1] = y.y * inv, o[2] = y.z * inv, o[3] = y.w * inv;
  }
}

/// Output projection for the hpg <= G query heads of KV head g: out[b][g·hpg + j][r] =
/// y_j·Wv[g·Dh + r]ᵀ + bias[g·Dh + r], y_j = y[b·heads + g·hpg + j] (width floats; with ml, one
/// split's acc, scaled by 1/l here). Block (R = 32/G rows, g, b), up to 16 warps: a warp takes
/// 256-column segments, lane l columns 8l..8l+7 of each, with y of the G heads there in registers
/// (read once, no shared memory) and each Wv row read once for all heads with 16-byte loads, R·G
/// partial dot products per lane, reduced by transpose_reduce and then across the warps.
template <int G>
static __global__ void __launch_bounds__(512)
    project_heads_kernel(const float* __restrict__ y, const float* __restrict__ ml, int heads, int hpg, index_t width,
                         const bf16* __restrict__ w, index_t ldw, const float* __restrict__ bias,
                         float* __restrict__ out, index_t ldo) {
  constexpr int R = 32 / G, kBatch = R < 8 ? R : 8, kSegment = 256;
  __shared__ float red[16][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = static_cast<int>(blockDim.x) / 32;
  const int g = blockIdx.y, b = blockIdx.z, row0 = static_cast<int>(blockIdx.x) * R;
  const index_t head0 = static_cast<index_t>(b) * heads + g * hpg;
  const bf16* wrows = w + (static_cast<index_t>(g) * attn::kDh + row0) * ldw;
  float v[32] = {};  // v[j·R + r]: the lane's partial dot product of head j and row r
  const index_t stride = static_cast<index_t>(warps) * kSegment;
  for (index_t c = static_cast<index_t>(warp) * kSegment + lane * 8; c < width; c += stride) {
    float yv[G][8];
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const bool on = j < hpg;
      const float* yj = y + (head0 + j) * width + c;
      const float4 lo = on ? __ldg(reinterpret_cast<const float4*>(yj)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float4 hi = on ? __ldg(reinterpret_cast<const float4*>(yj + 4)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      yv[j][0] = lo.x, yv[j][1] = lo.y, yv[j][2] = lo.z, yv[j][3] = lo.w;
      yv[j][4] = hi.x, yv[j][5] = hi.y, yv[j][6] = hi.z, yv[j][7] = hi.w;
    }
#pragma unroll
    for (int r0 = 0; r0 < R; r0 += kBatch) {
      uint4 u[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) u[i] = __ldg(reinterpret_cast<const uint4*>(wrows + (r0 + i) * ldw + c));
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const bf16* e = reinterpret_cast<const bf16*>(&u[i]);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float x = __bfloat162float(e[k]);
#pragma unroll
          for (int j = 0; j < G; ++j) v[j * R + r0 + i] = fmaf(x, yv[j][k], v[j * R + r0 + i]);
        }
      }
    }
  }
  red[warp][lane] = transpose_reduce<16>(v, lane);
  __syncthreads();
  if (warp == 0) {
    float sum = 0.0f;
    for (int i = 0; i < warps; ++i) sum += red[i][lane];
    const int j = lane / R, r = row0 + lane % R;
    if (j < hpg) {
      const float inv = ml ? 1.0f / ml[2 * (head0 + j) + 1] : 1.0f;
      out[b * ldo + (g * hpg + j) * attn::kDh + r] = sum * inv + (bias ? bias[g * attn::kDh + r] : 0.0f);
    }
  }
}

/// The split count a decode call has settled on, checked before its first launch: merge_splits_kernel
/// keeps one weight per split in shared memory.
inline void require_splits(int splits, const char* fn) {
  require<ConfigError>(splits >= 1 && splits <= 1024, fn, ": 1 to 1024 splits, got ", splits);
}

/// Merges the splits of every (head, sequence) and projects: out_h = y_h·Wv_hᵀ + bias_h (w non-null),
/// or out_h = y_h (w null: attend_kv, width Dh). One split with a projection goes straight to
/// project_heads_kernel (it scales by 1/l); otherwise merge_splits_kernel writes y (into ws.y when
/// projected). `splits` has passed require_splits.
inline void launch_combine(DecodeWorkspace& ws, int heads, int hpg, int splits, int batch, index_t width,
                           const bf16* w, index_t ldw, const float* bias, float* out, index_t ldo,
                           cudaStream_t stream) {
  const float* y = ws.acc.data();
  const float* ml = ws.ml.data();
  if (!w || splits > 1) {
    float* merged = out;
    index_t ldm = ldo;
    if (w) {
      ws.y.reserve(static_cast<std::size_t>(batch) * heads * width);
      merged = ws.y.data();
      ldm = heads * width;
    }
    const dim3 grid(blocks_for(width, 128), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
    merge_splits_kernel<<<grid, 256, 0, stream>>>(ws.acc.data(), ws.ml.data(), heads, splits, width, merged, ldm);
    check_launch("merge_splits_kernel");
    if (!w) return;
    y = merged;
    ml = nullptr;
  }
  const unsigned segments = blocks_for(width, 256), warps = segments < 16 ? segments : 16;
  dispatch_group(hpg, [&](auto group) {
    constexpr int G = decltype(group)::value;
    const dim3 grid(attn::kDh / (32 / G), static_cast<unsigned>(heads / hpg), static_cast<unsigned>(batch));
    project_heads_kernel<G><<<grid, 32 * warps, 0, stream>>>(y, ml, heads, hpg, width, w, ldw, bias, out, ldo);
  });
  check_launch("project_heads_kernel");
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

/// Tokens each half-warp of gemm_scores_kernel<G> takes: whole rounds of 16/G, at least 8.
template <int G>
inline constexpr int kScoreHalfTokens = 16 / G > 8 ? 16 / G : 8;
/// Blocks per SM gemm_scores_kernel<G> is compiled for: the most (loads in flight) without spills.
template <int G>
inline constexpr int kScoreMinBlocks = G == 4 ? 3 : (G == 2 ? 2 : 1);

/// Scores of the GEMM path: S[b][h][t] = qr_h·RoPE(K[b·Lp + t, g·Dh:(g+1)·Dh], t) for t < len(b),
/// −inf for len(b) <= t < Lp, for the hpg <= G heads h = g·hpg + j of KV head g, with
/// qr_h = RoPE(q_h, len(b) − 1) / sqrt(Dh) formed here. Block: 8 warps, kv_slots KV heads × 8 / kv_slots
/// runs of tokens (the warps of one run share their cos/sin reads through L1). A half-warp takes
/// every other token of its warp's run, lane l dimensions 8l..8l+7 of it: per token the half-warp
/// reads the key row and the cos/sin pairs 4l..4l+3 with 16-byte loads (4 tokens' loads in flight;
/// they wait for nothing, so rows up to `rows` = min(Lp, RoPE table) are read, the unused ones
/// masked at the end), and the G partial dot products of 16/G tokens are reduced together by
/// transpose_reduce.
template <int G>
static __global__ void __launch_bounds__(256, kScoreMinBlocks<G>)
    gemm_scores_kernel(const bf16* __restrict__ K, index_t ldk, index_t Lp, index_t rows,
                       const int* __restrict__ length, const float* __restrict__ q, index_t ldq,
                       const float* __restrict__ cos, const float* __restrict__ sin, int heads, int kv_heads, int hpg,
                       int kv_slots, float* __restrict__ S) {
  constexpr int T = 16 / G, H = kScoreHalfTokens<G>, kBatch = 4, half = attn::kDh / 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, side = lane / 16, l16 = lane % 16, b = blockIdx.z;
  const int g = static_cast<int>(blockIdx.y) * kv_slots + warp % kv_slots;
  const index_t t0 = (static_cast<index_t>(blockIdx.x) * (8 / kv_slots) + warp / kv_slots) * 2 * H;
  if (g >= kv_heads || t0 >= Lp) return;
  const bf16* Kg = K + static_cast<index_t>(b) * Lp * ldk + g * attn::kDh + 8 * l16;
  const index_t len = length[b];

  float qr[G][8];
  {
    const index_t pos = len - 1;
    const float scale = rsqrtf(static_cast<float>(attn::kDh));
    const float4 c = __ldg(reinterpret_cast<const float4*>(cos + pos * half + 4 * l16));
    const float4 s = __ldg(reinterpret_cast<const float4*>(sin + pos * half + 4 * l16));
    const float cv[4] = {c.x, c.y, c.z, c.w}, sv[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float* x = q + b * ldq + (g * hpg + j) * attn::kDh + 8 * l16;  // ldq: no alignment promised
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float x0 = j < hpg ? x[2 * p] : 0.0f, x1 = j < hpg ? x[2 * p + 1] : 0.0f;
        qr[j][2 * p] = (x0 * cv[p] - x1 * sv[p]) * scale;
        qr[j][2 * p + 1] = (x0 * sv[p] + x1 * cv[p]) * scale;
      }
    }
  }

  float v[16];  // v[j·T + i]: the lane's partial score of head j, token i of the current round
#pragma unroll
  for (int k0 = 0; k0 < H; k0 += kBatch) {
    uint4 kraw[kBatch];
    float4 cs[kBatch], sn[kBatch];
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const index_t t = t0 + 2 * (k0 + i) + side;
      const bool in = t < rows;
      kraw[i] = in ? __ldg(reinterpret_cast<const uint4*>(Kg + t * ldk)) : make_uint4(0, 0, 0, 0);
      cs[i] = in ? __ldg(reinterpret_cast<const float4*>(cos + t * half + 4 * l16)) : zero;
      sn[i] = in ? __ldg(reinterpret_cast<const float4*>(sin + t * half + 4 * l16)) : zero;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bf16* e = reinterpret_cast<const bf16*>(&kraw[i]);
      const float cv[4] = {cs[i].x, cs[i].y, cs[i].z, cs[i].w}, sv[4] = {sn[i].x, sn[i].y, sn[i].z, sn[i].w};
      float r[8];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float x0 = __bfloat162float(e[2 * p]), x1 = __bfloat162float(e[2 * p + 1]);
        r[2 * p] = x0 * cv[p] - x1 * sv[p];
        r[2 * p + 1] = x0 * sv[p] + x1 * cv[p];
      }
      const int k = k0 + i, slot = k % T;
#pragma unroll
      for (int j = 0; j < G; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < 8; ++d) dot = fmaf(qr[j][d], r[d], dot);
        v[j * T + slot] = dot;
      }
      if (slot == T - 1) {  // a round done: lane l of each half gets head l / T, token l % T of it
        const float sum = transpose_reduce<8>(v, lane);
        const int j = l16 / T;
        const index_t t = t0 + 2 * (k + 1 - T + l16 % T) + side;
        if (j < hpg && t < Lp)
          S[(static_cast<index_t>(b) * heads + g * hpg + j) * Lp + t] = t < len ? sum : -INFINITY;
      }
    }
  }
}

/// gemm_scores_kernel for every token, KV head and sequence.
inline void launch_gemm_scores(const bf16* K, index_t Lp, int batch, const AttentionShape& a, const int* length,
                               const float* q, index_t ldq, const DeviceRope& rope, float* S, cudaStream_t stream) {
  require<ConfigError>(rope.head_dim() == a.head_dim, "rope: head_dim ", rope.head_dim(), " differs from ", a.head_dim);
  const int hpg = static_cast<int>(a.heads / a.kv_heads), kv_heads = static_cast<int>(a.kv_heads);
  int kv_slots = 8;  // KV heads per block: a power of two, at most kv_heads
  while (kv_slots > kv_heads) kv_slots /= 2;
  dispatch_group(hpg, [&](auto group) {
    constexpr int G = decltype(group)::value;
    const dim3 grid(blocks_for(Lp, static_cast<unsigned>(2 * kScoreHalfTokens<G> * 8 / kv_slots)),
                    static_cast<unsigned>((kv_heads + kv_slots - 1) / kv_slots), static_cast<unsigned>(batch));
    gemm_scores_kernel<G><<<grid, 256, 0, stream>>>(K, a.kv_width(), Lp, std::min(Lp, rope.max_positions()), length,
                                                    q, ldq, rope.cos(), rope.sin(), static_cast<int>(a.heads), kv_heads,
                                                    hpg, kv_slots, S);
  });
  check_launch("gemm_scores_kernel");
}

/// Threads of gemm_softmax_kernel: a row of up to 32k scores is one block's, and with one block per
/// (head, sequence) a batch of one runs only `heads` blocks, so each takes many threads.
inline constexpr int kSoftmaxThreads = 1024;
/// Softmax of the GEMM paths, one block per (head, sequence): P = bf16(e^{S−m}) (zeros past the
/// sequence's length or `limit` <= Lp, whichever is smaller), ml = (m, l) with l the sum of the
/// rounded weights (splits = 1 for combine).
static __global__ void __launch_bounds__(kSoftmaxThreads)
    gemm_softmax_kernel(const float* __restrict__ S, index_t Lp, index_t limit, const int* __restrict__ length,
                        int heads, bf16* __restrict__ P, float* __restrict__ ml) {
  using BlockReduce = cub::BlockReduce<float, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ float bcast;
  const int h = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
  const index_t slot = static_cast<index_t>(b) * heads + h, len = length[b] < limit ? length[b] : limit;
  const float* s = S + slot * Lp;
  bf16* p = P + slot * Lp;
  float mx = -INFINITY;
  for (index_t i = t; i < len; i += kSoftmaxThreads) mx = fmaxf(mx, s[i]);
  mx = BlockReduce(tmp).Reduce(mx, MaxOp{});
  if (t == 0) bcast = mx;
  __syncthreads();
  mx = bcast;
  float sum = 0.0f;
  for (index_t i = t; i < Lp; i += kSoftmaxThreads) {
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

/// gemm_softmax_kernel over ws.s (B·heads rows of Lp scores) into ws.p and ws.ml, both reserved;
/// tokens from `limit` (<= Lp) on are left out.
inline void launch_softmax(DecodeWorkspace& ws, index_t Lp, index_t limit, int batch, int heads, const int* length,
                           cudaStream_t stream) {
  gemm_softmax_kernel<<<dim3(static_cast<unsigned>(heads), static_cast<unsigned>(batch)), kSoftmaxThreads, 0, stream>>>(
      ws.s.data(), Lp, limit, length, heads, ws.p.data(), ws.ml.data());
  check_launch("gemm_softmax_kernel");
}

namespace pv {
/// absorb_values_kernel's tile: kTok tokens × kCols columns of X̂v against kHeads rows of weights.
inline constexpr int kCols = 128, kTok = 64, kHeads = 32, kThreads = 256;
/// Row strides in bf16 elements: rows 16 bytes apart modulo 128, so ldmatrix's eight row reads
/// hit distinct banks.
inline constexpr int kXld = kCols + 8, kPld = kTok + 8;
/// Rows of the X̂v tile a thread decodes (one 8-column chunk each) and its 16-byte weight loads.
inline constexpr int kRowsPerThread = kTok * kCols / 8 / kThreads, kChunksPerRow = kCols / 8;
}  // namespace pv

/// Whether absorb_values_kernel decodes QV's codes by dequant_bits (per-token, 2 or 4 bits); other
/// quantizers go through dequant8, at a few times the instructions per value.
template <class QV>
inline constexpr bool kAbsorbFastDecode = QV::axis == Axis::Token && (QV::bits == 2 || QV::bits == 4);

/// The 8 values of one chunk of a per-token row (codes of 8 consecutive columns from bit 0 of `w`;
/// `prm` the group's fp16 scale and zero) as 4 bf16 pairs: Q::decode's floats bit for bit
/// (dequant_bits), rounded as dequantize_kernel rounds them. Codes are taken 4 at a time from bit
/// offsets 0, bits, 2·bits, 3·bits, so each offset's pre-scaled scale serves both halves.
template <class Q>
__device__ __forceinline__ uint4 decode8_bf16(std::uint32_t w, std::uint32_t prm) {
  constexpr int b = Q::bits;
  const float scale = param_float<Q>(prm), z = Q::scheme == Scheme::Asymmetric ? param_float<Q>(prm >> 16) : 0.0f;
  const float s0 = scale, s1 = offset_scale(scale, b), s2 = offset_scale(scale, 2 * b), s3 = offset_scale(scale, 3 * b);
  const std::uint32_t hi = w >> (4 * b);
  return make_uint4(pack_bf16x2(dequant_bits<Q, 0>(w, s0, z), dequant_bits<Q, b>(w, s1, z)),
                    pack_bf16x2(dequant_bits<Q, 2 * b>(w, s2, z), dequant_bits<Q, 3 * b>(w, s3, z)),
                    pack_bf16x2(dequant_bits<Q, 0>(hi, s0, z), dequant_bits<Q, b>(hi, s1, z)),
                    pack_bf16x2(dequant_bits<Q, 2 * b>(hi, s2, z), dequant_bits<Q, 3 * b>(hi, s3, z)));
}

/// Whether absorb_values_kernel takes its row path (AbsorbRowLoads) for this stream: per-token 2 or
/// 4 bits with groups of at least 32 and a width that is a multiple of 32, so that a thread's 32
/// columns of a row are one 16- or 8-byte code load under one group's parameters.
template <class QV>
bool absorb_by_rows(const DeviceStreamShape& vs) {
  return kAbsorbFastDecode<QV> && vs.group >= 32 && vs.width % 32 == 0;
}

/// What one thread of absorb_values_kernel loads for a tile, issued two tiles ahead so that the
/// loads are in flight while the block decodes and multiplies the two before: for
/// kAbsorbFastDecode streams the code words and group parameters of its rows (column chunk t % 16,
/// rows t / 16 + 16j), and one 16-byte piece of the weights (head t / 8, tokens 8·(t % 8) ..).
template <class QV>
struct AbsorbLoads {
  std::uint32_t code[pv::kRowsPerThread], prm[pv::kRowsPerThread];
  uint4 w;

  __device__ void issue(const StreamView<QV>& vv, const bf16* P, index_t Lp, int heads, int b, int h0, int c0, int t0,
                        int t_end) {
    const int t = threadIdx.x, col = c0 + 8 * (t % pv::kChunksPerRow);
#pragma unroll
    for (int j = 0; j < pv::kRowsPerThread; ++j) {
      const int tok = t0 + t / pv::kChunksPerRow + j * (pv::kThreads / pv::kChunksPerRow);
      code[j] = 0, prm[j] = 0;
      if constexpr (kAbsorbFastDecode<QV>) {
        if (tok < t_end && col < vv.width) {
          const std::uint8_t* row = vv.row(b, tok) + (col / 8) * QV::bits;  // 8 codes: QV::bits bytes
          code[j] = QV::bits == 4 ? __ldg(reinterpret_cast<const std::uint32_t*>(row))
                                  : __ldg(reinterpret_cast<const std::uint16_t*>(row));
          const std::uint16_t* pp = vv.param(b, tok, col);
          prm[j] = QV::params_per_group == 2 ? __ldg(reinterpret_cast<const std::uint32_t*>(pp)) : __ldg(pp);
        }
      }
    }
    const int h = h0 + t / 8, tok = t0 + 8 * (t % 8);  // tok + 7 < Lp: Lp and tok are multiples of 8, tok < t_end <= Lp
    w = h < heads && tok < t_end ? __ldg(reinterpret_cast<const uint4*>(P + (static_cast<index_t>(b) * heads + h) * Lp + tok))
                                 : make_uint4(0, 0, 0, 0);
  }

  /// Writes the tile starting at token t0 into shared memory: X̂v rows (zeros at and past t_end)
  /// and the weights.
  __device__ void stage(bf16 (*Xs)[pv::kXld], bf16 (*Ps)[pv::kPld], const StreamView<QV>& vv, int b, int c0, int t0,
                        int t_end, index_t quantized) const {
    const int t = threadIdx.x, ch = t % pv::kChunksPerRow;
#pragma unroll
    for (int j = 0; j < pv::kRowsPerThread; ++j) {
      const int r = t / pv::kChunksPerRow + j * (pv::kThreads / pv::kChunksPerRow);
      const bool in = t0 + r < t_end && c0 + 8 * ch < vv.width;
      uint4 x = make_uint4(0, 0, 0, 0);
      if constexpr (kAbsorbFastDecode<QV>) {
        if (in) x = decode8_bf16<QV>(code[j], prm[j]);
      } else if (in) {
        float f[8];
        dequant8(vv, b, t0 + r, c0 + 8 * ch, quantized, f);
        x = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
      }
      *reinterpret_cast<uint4*>(&Xs[r][8 * ch]) = x;
    }
    *reinterpret_cast<uint4*>(&Ps[t / 8][8 * (t % 8)]) = w;
  }
};

/// AbsorbLoads for streams that absorb_by_rows accepts: thread t decodes row t / 4 of the tile,
/// columns 32·(t % 4) .. +31, from one code load and one parameter load, through base pointers set
/// once per block (the general loads re-derive every address from the stream's index math, which
/// was most of their ~11 instructions per value; this path takes ~6).
template <class QV>
struct AbsorbRowLoads {
  static constexpr int kCodeWords = QV::bits;  // 32 codes: 4 words at 4 bits, 2 at 2 bits
  static_assert(pv::kTok * pv::kCols / 32 == pv::kThreads, "one 32-column piece of a row per thread");
  const std::uint8_t* code_at;  // the thread's row and columns at token t_begin
  const std::uint16_t* prm_at;
  const bf16* w_at;             // the thread's weights at token t_begin
  index_t code_step, prm_step;  // bytes / parameters per token
  int t_begin, row_tok, w_tok;  // first token; the thread's row and weight-token offsets
  bool col_in, head_in;
  std::uint32_t code[kCodeWords], prm;
  uint4 w;

  __device__ AbsorbRowLoads(const StreamView<QV>& vv, const bf16* P, index_t Lp, int heads, int b, int h0, int c0,
                            int begin) {
    const int t = threadIdx.x, col = c0 + 32 * (t % 4), h = h0 + t / 8;
    t_begin = begin, row_tok = t / 4, w_tok = 8 * (t % 8);
    col_in = col < vv.width, head_in = h < heads;
    code_step = vv.code_bytes;
    prm_step = (vv.width >> vv.group_shift) * QV::params_per_group;
    code_at = vv.row(b, begin + row_tok) + col / 8 * QV::bits;
    prm_at = vv.param(b, begin + row_tok, col);
    w_at = P + (static_cast<index_t>(b) * heads + (head_in ? h : 0)) * Lp + begin + w_tok;
  }

  __device__ void issue(int t0, int t_end) {
    const index_t d = t0 - t_begin;
#pragma unroll
    for (int i = 0; i < kCodeWords; ++i) code[i] = 0;
    prm = 0;
    if (col_in && t0 + row_tok < t_end) {
      const std::uint8_t* c = code_at + d * code_step;
      if constexpr (kCodeWords == 4) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(c));
        code[0] = v.x, code[1] = v.y, code[2] = v.z, code[3] = v.w;
      } else {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(c));
        code[0] = v.x, code[1] = v.y;
      }
      const std::uint16_t* p = prm_at + d * prm_step;
      prm = QV::params_per_group == 2 ? __ldg(reinterpret_cast<const std::uint32_t*>(p)) : __ldg(p);
    }
    // (tok + 7 < Lp: Lp and tok are multiples of 8, tok < t_end <= Lp)
    w = head_in && t0 + w_tok < t_end ? __ldg(reinterpret_cast<const uint4*>(w_at + d)) : make_uint4(0, 0, 0, 0);
  }

  /// As AbsorbLoads::stage. Threads with columns 64 bytes apart in one row would write the same
  /// banks in one shared-memory phase, so the upper two chunks store their four pieces in the order
  /// 2, 3, 0, 1 (their code words swapped before decoding, the address xor'ed to match).
  __device__ void stage(bf16 (*Xs)[pv::kXld], bf16 (*Ps)[pv::kPld], int t0, int t_end) const {
    const int t = threadIdx.x, q = t % 4, swap = q & 2;
    const bool in = col_in && t0 + row_tok < t_end;
    std::uint32_t c[kCodeWords];
    if constexpr (kCodeWords == 4) {
      c[0] = swap ? code[2] : code[0], c[1] = swap ? code[3] : code[1];
      c[2] = swap ? code[0] : code[2], c[3] = swap ? code[1] : code[3];
    } else {  // word i holds pieces 2i and 2i + 1
      c[0] = swap ? code[1] : code[0], c[1] = swap ? code[0] : code[1];
    }
    bf16* row = &Xs[row_tok][32 * q];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const std::uint32_t word = kCodeWords == 4 ? c[k] : (k % 2 ? c[k / 2] >> 16 : c[k / 2]);
      const uint4 x = in ? decode8_bf16<QV>(word, prm) : make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(row + 8 * (k ^ swap)) = x;
    }
    *reinterpret_cast<uint4*>(&Ps[t / 8][w_tok]) = w;
  }
};

/// part[split][b][h][c] = Σ_t P[b][h][t]·X̂v[b][t][c] over the split's tokens t < length(b): the
/// absorbed values, with X̂v dequantized on the fly (never written to device memory). Block
/// (128 columns, 32 heads, sequence × split), 8 warps; per 64-token tile the block decodes X̂v into
/// shared memory as bf16 (the values dequantize_kernel writes, so the GEMM path's X̂v), stages the
/// bf16 weights, and warp w accumulates heads 0..31 × its columns 16w..16w+15 with mma m16n8k16
/// (fp32 accumulation), A from ldmatrix and B from ldmatrix.trans. The loads of the next two tiles
/// are in flight meanwhile (two AbsorbLoads). Rows of X̂v at or past the split's end are zeros: their
/// weights may belong to the next split, and stale codes there may decode to anything.
template <class QV, bool kRows>
__global__ void __launch_bounds__(pv::kThreads) absorb_values_kernel(StreamView<QV> vv, const bf16* __restrict__ P,
                                                                     index_t Lp, int heads, int splits, index_t per_split,
                                                                     float* __restrict__ part) {
  using namespace pv;
  __shared__ __align__(16) bf16 Xs[kTok][kXld];
  __shared__ __align__(16) bf16 Ps[kHeads][kPld];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
  const int b = static_cast<int>(blockIdx.z) / splits, split = static_cast<int>(blockIdx.z) % splits;
  // (32-bit indices: lengths and widths are below 2^31, per_split below the longest length)
  const int c0 = static_cast<int>(blockIdx.x) * kCols, h0 = static_cast<int>(blockIdx.y) * kHeads;
  const int width = static_cast<int>(vv.width), len = vv.length[b];
  [[maybe_unused]] const index_t quantized = StreamView<QV>::quantized(len, vv.group);
  // Not past Lp either: a sequence longer than max_tokens has weights only in [0, Lp).
  const int t_begin = split * static_cast<int>(per_split),
            t_end = min(t_begin + static_cast<int>(per_split), min(len, static_cast<int>(Lp)));
  float acc[2][2][4] = {};  // [head tile of 16][column tile of 8][fragment]
  // ldmatrix row addresses: A (weights, 16 × 16 per head tile) rows lane % 16, columns 8·(lane / 16);
  // B (X̂v, transposed) token rows lane % 8 + 8·((lane / 8) % 2), columns 16·warp + 8·(lane / 16).
  const std::uint32_t a_addr = sm90::smem_addr(&Ps[lane % 16][8 * (lane / 16)]);
  const std::uint32_t b_addr = sm90::smem_addr(&Xs[lane % 8 + 8 * ((lane / 8) % 2)][16 * warp + 8 * (lane / 16)]);
  using Loads = std::conditional_t<kRows, AbsorbRowLoads<QV>, AbsorbLoads<QV>>;
  [[maybe_unused]] const Loads proto = [&] {
    if constexpr (kRows) return Loads(vv, P, Lp, heads, b, h0, c0, t_begin);
    else return Loads{};
  }();
  auto issue = [&](Loads& ld, int t0) {
    if constexpr (kRows) ld.issue(t0, t_end);
    else ld.issue(vv, P, Lp, heads, b, h0, c0, t0, t_end);
  };
  // One tile: decode the loads `ld` holds into shared memory, then issue the tile two ahead into
  // `ld` (two register sets alternate, so a tile's loads have two tiles' time to arrive), multiply.
  auto step = [&](Loads& ld, int t0) {
    if constexpr (kRows) ld.stage(Xs, Ps, t0, t_end);
    else ld.stage(Xs, Ps, vv, b, c0, t0, t_end, quantized);
    __syncthreads();
    if (t0 + 2 * kTok < t_end) issue(ld, t0 + 2 * kTok);
#pragma unroll
    for (int k = 0; k < kTok; k += 16) {
      std::uint32_t a[2][4], x[4];
#pragma unroll
      for (int m = 0; m < 2; ++m)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(a[m][0]), "=r"(a[m][1]), "=r"(a[m][2]), "=r"(a[m][3])
                     : "r"(a_addr + 2 * (16 * m * kPld + k)));
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
                   : "r"(b_addr + 2 * k * kXld));
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n)
          asm volatile(
              "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
              "{%0, %1, %2, %3};\n"
              : "+f"(acc[m][n][0]), "+f"(acc[m][n][1]), "+f"(acc[m][n][2]), "+f"(acc[m][n][3])
              : "r"(a[m][0]), "r"(a[m][1]), "r"(a[m][2]), "r"(a[m][3]), "r"(x[2 * n]), "r"(x[2 * n + 1]));
    }
    __syncthreads();
  };
  Loads ld0 = proto, ld1 = proto;
  if (t_begin < t_end) issue(ld0, t_begin);
  if (t_begin + kTok < t_end) issue(ld1, t_begin + kTok);
  for (int t0 = t_begin; t0 < t_end; t0 += 2 * kTok) {
    step(ld0, t0);
    if (t0 + kTok < t_end) step(ld1, t0 + kTok);
  }
  // Fragment (m, n): element 2·rh + q is head 16m + g + 8·rh, column 16·warp + 8n + 2c + q.
  const index_t batch = gridDim.z / splits;
  float* const out = part + (split * batch + b) * heads * width;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const index_t h = h0 + 16 * m + g + 8 * rh;
      if (h >= heads) continue;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const index_t col = c0 + 16 * warp + 8 * n + 2 * c;
        if (col < width) *reinterpret_cast<float2*>(out + h * width + col) = make_float2(acc[m][n][2 * rh], acc[m][n][2 * rh + 1]);
      }
    }
}

/// acc[i] = Σ_s part[s·n + i], i < n (n % 4 == 0): the token splits of absorb_values_kernel added
/// in a fixed order (the result does not depend on the schedule).
static __global__ void __launch_bounds__(256) sum_splits_kernel(const float* __restrict__ part, int splits, index_t n,
                                                                float* __restrict__ acc) {
  const index_t i = (static_cast<index_t>(blockIdx.x) * 256 + threadIdx.x) * 4;
  if (i >= n) return;
  float4 a = __ldg(reinterpret_cast<const float4*>(part + i));
  for (int s = 1; s < splits; ++s) {
    const float4 p = __ldg(reinterpret_cast<const float4*>(part + s * n + i));
    a.x += p.x, a.y += p.y, a.z += p.z, a.w += p.w;
  }
  *reinterpret_cast<float4*>(acc + i) = a;
}

/// Tests set it to run the portable absorbed kernel where the sm_90a path would apply.
inline bool decode_wgmma_disabled = false;

inline void check_attention(const AttentionShape& a) {
  require<ConfigError>(a.head_dim == attn::kDh, "CUDA decode attention: head_dim must be 128, got ", a.head_dim);
  require<ConfigError>(a.heads > 0 && a.kv_heads > 0 && a.heads % a.kv_heads == 0 && a.heads / a.kv_heads <= attn::kMaxGroup,
                       "CUDA decode attention: heads must be a multiple of kv_heads with at most ", attn::kMaxGroup,
                       " query heads per KV head, got ", a.heads, " and ", a.kv_heads);
}

/// The query and output row strides (0: H·Dh, packed) as used; each must hold a row of H·Dh.
inline void resolve_strides(const AttentionShape& a, index_t& ldq, index_t& ldo, const char* fn) {
  if (ldq == 0) ldq = a.q_width();
  if (ldo == 0) ldo = a.q_width();
  require<ShapeError>(ldq >= a.q_width(), fn, ": ldq must be 0 or at least heads × head_dim = ", a.q_width(), ", got ", ldq);
  require<ShapeError>(ldo >= a.q_width(), fn, ": ldo must be 0 or at least heads × head_dim = ", a.q_width(), ", got ", ldo);
}

/// Splits so that about two blocks per multiprocessor are in flight.
inline int pick_splits(index_t blocks_per_split, index_t max_splits) {
  const int sms = multiprocessor_count();
  index_t s = (2 * sms + blocks_per_split - 1) / blocks_per_split;
  s = s < 1 ? 1 : (s > max_splits ? max_splits : s);
  return static_cast<int>(s < 1024 ? s : 1024);
}

inline void rope_queries(const float* q, index_t ldq, int batch, const AttentionShape& a, const int* length,
                         const DeviceRope& rope, DecodeWorkspace& ws, cudaStream_t stream) {
  require<ConfigError>(rope.head_dim() == a.head_dim, "rope: head_dim ", rope.head_dim(), " differs from ", a.head_dim);
  ws.q.reserve(static_cast<std::size_t>(batch * a.heads * a.head_dim));
  rope_queries_kernel<<<dim3(static_cast<unsigned>(a.heads), static_cast<unsigned>(batch)), attn::kDh / 2, 0, stream>>>(
      q, ldq, static_cast<int>(a.heads), length, rope.cos(), rope.sin(), rope.max_positions(), ws.q.data());
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
  require_device_accessible(w.wk, fn, ": wk");
  require_device_accessible(w.wv, fn, ": wv");
  require_device_accessible(w.bv, fn, ": bv");
}

/// Whether attend_absorbed takes its sm_90a path for these streams (tokens: the longest sequence).
template <class QK, class QV>
bool absorbed_wgmma_applies(const DeviceStreamShape& ks, const DeviceStreamShape& vs, index_t tokens) {
  return !decode_wgmma_disabled && vs.width % 8 == 0 && remat_wgmma_applies<QK>(ks, tokens + 8);  // (+8: Lp)
}

/// absorb_values_kernel for the stream: its row path where absorb_by_rows holds (`rows`).
template <class QV>
auto absorb_kernel(bool rows) {
  if constexpr (kAbsorbFastDecode<QV>) {
    if (rows) return absorb_values_kernel<QV, true>;
  }
  return absorb_values_kernel<QV, false>;
}

/// Blocks of absorb_kernel<QV>(rows) resident on the device at once (measured once, on the first
/// call's device: on a host with unlike GPUs only a heuristic).
template <class QV>
int absorb_resident(bool rows) {
  auto query = [](auto kernel) {
    int per_sm = 0;
    XQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, pv::kThreads, 0));
    return multiprocessor_count() * std::max(per_sm, 1);
  };
  if constexpr (kAbsorbFastDecode<QV>) {
    static const int by_rows = query(absorb_values_kernel<QV, true>);
    if (rows) return by_rows;
  }
  static const int general = query(absorb_values_kernel<QV, false>);
  return general;
}

/// attend_absorbed on sm_90a, in five steps (six launches with token splits), none of which writes
/// K, V or X̂ to device memory:
///   1. the queries rotated at their position and scaled (ws.q);
///   2. scores S = q·RoPE(X̂k·Wkᵀ) for tokens [0, Lp) by the wgmma remat kernel with its scores
///      epilogue (K stays in its accumulators), −inf at and past each sequence's length (ws.s);
///   3. softmax over each (sequence, head) row: bf16 weights (ws.p) and (m, l) for the combine
///      (ws.ml), as attend_absorbed_gemm's;
///   4. acc_h = P_h·X̂v by absorb_values_kernel, per token split, then the splits added (ws.acc);
///   5. o_h = (acc_h / l_h)·Wv_hᵀ + bv_h (launch_combine with one split).
/// `splits` > 0 fixes step 4's token splits (tests), 0 picks them.
template <class QK, class QV>
void attend_absorbed_wgmma(const DeviceStream<QK>& keys, const DeviceStream<QV>& values, const AttentionShape& a,
                           const DecodeWeights& w, const DeviceRope& rope, const float* q, index_t ldq, float* out,
                           index_t ldo, DecodeWorkspace& ws, int splits, index_t maxlen, cudaStream_t stream) {
  const auto &ks = keys.shape(), &vs = values.shape();
  const int B = ks.batch, H = static_cast<int>(a.heads), hpg = static_cast<int>(a.heads / a.kv_heads);
  const index_t Lp = (maxlen + 7) / 8 * 8, width = vs.width;
  const int* length = keys.view().length;
  ws.s.reserve(static_cast<std::size_t>(B) * H * Lp);
  ws.p.reserve(static_cast<std::size_t>(B) * H * Lp);
  ws.acc.reserve(static_cast<std::size_t>(B) * H * width);
  ws.ml.reserve(static_cast<std::size_t>(B) * H * 2);
  rope_queries(q, ldq, B, a, length, rope, ws, stream);
  const EpilogueArgs e{nullptr, rope.cos(), rope.sin(), static_cast<int>(a.head_dim)};
  const ScoreArgs sc{ws.q.data(), ws.s.data(), static_cast<int>(Lp), H, hpg, static_cast<int>(a.kv_heads)};
  launch_score_wgmma<QK>(keys, Lp, w.wk, w.ldwk ? w.ldwk : ks.width, a.kv_width(), e, sc, stream);
  launch_softmax(ws, Lp, maxlen, B, H, length, stream);

  const index_t col_blocks = blocks_for(width, pv::kCols), head_blocks = blocks_for(H, pv::kHeads);
  const index_t tiles = blocks_for(maxlen, pv::kTok), max_splits = std::max<index_t>(1, std::min<index_t>(tiles, 65535 / B));
  const bool rows = absorb_by_rows<QV>(vs);
  if (splits <= 0)  // as many as fill the device once: a second, partial wave would double the time
    splits = static_cast<int>(std::max<index_t>(1, absorb_resident<QV>(rows) / (col_blocks * head_blocks * B)));
  const index_t use = std::min<index_t>(splits, max_splits);
  const index_t per_split = (tiles + use - 1) / use * pv::kTok;  // whole tiles per split
  splits = static_cast<int>((maxlen + per_split - 1) / per_split);
  const index_t n = static_cast<index_t>(B) * H * width;
  float* part = ws.acc.data();  // one split: its sums are the result
  if (splits > 1) {
    ws.part.reserve(static_cast<std::size_t>(splits) * n);
    part = ws.part.data();
  }
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(head_blocks), static_cast<unsigned>(B * splits));
  absorb_kernel<QV>(rows)<<<grid, pv::kThreads, 0, stream>>>(values.view(), ws.p.data(), Lp, H, splits, per_split, part);
  check_launch("absorb_values_kernel");
  if (splits > 1) {
    sum_splits_kernel<<<blocks_for(n / 4, 256), 256, 0, stream>>>(ws.part.data(), splits, n, ws.acc.data());
    check_launch("sum_splits_kernel");
  }
  launch_combine(ws, H, hpg, 1, B, width, w.wv, w.ldwv ? w.ldwv : width, w.bv, out, ldo, stream);
}
}  // namespace detail

/// Decode attention with absorbed values over a quantized cache.
/// \tparam QK, QV quantizers of the key-side and value-side streams: the same stream (XQuant:
///                both are X) or two (latent codec: X·Uk and X·Uv, weights ΣBᵀ).
/// \param q   batch × H·Dh floats (row stride ldq, 0: H·Dh), before RoPE
/// \param out batch × H·Dh floats (row stride ldo, 0: H·Dh): the heads' outputs
/// \param splits how many token ranges the sequences are cut into for parallel work (0: chosen
///               for the device); the result does not depend on it beyond rounding
/// \param max_tokens 0: the grids are sized from the streams' host-side lengths, which are
///               checked. > 0: sized for sequences of up to max_tokens tokens, and the lengths are
///               read on the device only, so that a decode step (DeviceStream::append_all, then
///               this) can be captured in a CUDA graph once and replayed while the sequences grow.
///               Each sequence should then hold 1 .. max_tokens tokens when the work runs (not
///               checked: a longer one attends over its first max_tokens tokens only, its query
///               still rotated at its length − 1, and a length past the RoPE table gives NaN
///               outputs); max_tokens must not exceed either stream's capacity or the RoPE table.
///               The work grows with max_tokens, not with the lengths. Call once outside the
///               capture first, with the same arguments, so that the workspace is grown then.
template <class QK, class QV>
void attend_absorbed(const DeviceStream<QK>& keys, const DeviceStream<QV>& values, const AttentionShape& a,
                     const DecodeWeights& w, const DeviceRope& rope, const float* q, float* out, DecodeWorkspace& ws,
                     cudaStream_t stream, index_t ldq = 0, index_t ldo = 0, int splits = 0, index_t max_tokens = 0) {
  detail::check_attention(a);
  const auto &ks = keys.shape(), &vs = values.shape();
  const int B = ks.batch;
  const int hpg = static_cast<int>(a.heads / a.kv_heads);
  require<ShapeError>(vs.batch == B, "attend_absorbed: key and value streams hold ", B, " and ", vs.batch, " sequences");
  require<ShapeError>(w.wk && w.wv && q && out, "attend_absorbed: wk, wv, q and out must not be null");
  detail::check_decode_weights(w, ks.width, vs.width, "attend_absorbed");
  require_device_accessible(q, "attend_absorbed: q");
  require_device_accessible(out, "attend_absorbed: out");
  require<ConfigError>(ks.width % detail::gemm::BK == 0, "attend_absorbed: key width must be a multiple of 64, got ", ks.width);
  require<ConfigError>(QK::axis == Axis::Channel || ks.group >= 32, "attend_absorbed: per-token key groups must be >= 32");
  index_t maxlen = max_tokens;
  if (max_tokens > 0) {
    require<ShapeError>(max_tokens <= ks.capacity && max_tokens <= vs.capacity && max_tokens <= rope.max_positions(),
                        "attend_absorbed: max_tokens must not exceed the streams' capacities (", ks.capacity, ", ",
                        vs.capacity, ") or the RoPE table (", rope.max_positions(), "), got ", max_tokens);
  } else {
    require<ShapeError>(max_tokens == 0, "attend_absorbed: max_tokens must be 0 or positive, got ", max_tokens);
    for (int b = 0; b < B; ++b) {
      require<ShapeError>(keys.length(b) >= 1 && keys.length(b) == values.length(b), "attend_absorbed: sequence ", b,
                          " has ", keys.length(b), " key-side and ", values.length(b),
                          " value-side tokens (need equal, >= 1)");
      require<ConfigError>(keys.length(b) <= rope.max_positions(), "attend_absorbed: sequence ", b,
                           " is longer than the RoPE table");
      maxlen = std::max(maxlen, keys.length(b));
    }
  }
  detail::resolve_strides(a, ldq, ldo, "attend_absorbed");
  if (detail::absorbed_wgmma_applies<QK, QV>(ks, vs, maxlen)) {
    detail::attend_absorbed_wgmma(keys, values, a, w, rope, q, ldq, out, ldo, ws, splits, maxlen, stream);
    return;
  }
  const index_t tiles = (maxlen + detail::attn::kTile - 1) / detail::attn::kTile;
  if (splits <= 0) splits = detail::pick_splits(B * a.kv_heads, tiles);
  const int tps = static_cast<int>((tiles + splits - 1) / splits);
  splits = static_cast<int>((tiles + tps - 1) / tps);
  detail::require_splits(splits, "attend_absorbed");
  const std::size_t smem = detail::gemm::kSmemBytes +
                           sizeof(float) * (hpg * vs.width + 2 * hpg * 128 + 3 * detail::attn::kMaxGroup) + 8 * 64;
  require<ConfigError>(smem <= 227 * 1024, "attend_absorbed: ", hpg, " heads per KV head × value width ", vs.width,
                       " need ", smem, " bytes of shared memory (at most 227 KB)");
  const std::size_t slots = static_cast<std::size_t>(B) * a.heads * splits;
  ws.acc.reserve(slots * vs.width);
  ws.ml.reserve(slots * 2);
  detail::rope_queries(q, ldq, B, a, keys.view().length, rope, ws, stream);

  auto kernel = detail::absorbed_decode_kernel<QK, QV>;
  static detail::SmemAllowance allowance;
  allowance.ensure(kernel, static_cast<int>(smem));
  const detail::SplitArgs sa{static_cast<int>(a.heads), hpg, splits, tps, maxlen};
  kernel<<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(B)),
           detail::gemm::THREADS, smem, stream>>>(keys.view(), values.view(), w.wk, w.ldwk ? w.ldwk : ks.width,
                                                  a.kv_width(), ws.q.data(), rope.cos(), rope.sin(), sa, ws.acc.data(),
                                                  ws.ml.data());
  check_launch("absorbed_decode_kernel");
  detail::launch_combine(ws, static_cast<int>(a.heads), hpg, splits, B, vs.width, w.wv, w.ldwv ? w.ldwv : vs.width,
                         w.bv, out, ldo, stream);
}

/// Decode attention with absorbed values, through cuBLAS: the fastest path when K's GEMM dominates.
/// Same inputs and result as attend_absorbed, but it writes to device scratch (in `ws`, grown on
/// demand): X̂ of the key stream (and of the value stream when it is another stream) as bf16,
/// K = X̂k·Wkᵀ before RoPE (bf16, B·Lp × dkv, Lp = longest sequence rounded up to 8), scores and
/// bf16 softmax weights. Steps: dequantize; cuBLAS GEMM for K; scores with RoPE applied on the
/// fly (keys and query); softmax; acc_h = P_h·X̂v as one cuBLAS batched GEMM (fp32 out);
/// o_h = (acc_h/l_h)·Wv_hᵀ + bv.
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
  require_device_accessible(q, "attend_absorbed_gemm: q");
  require_device_accessible(out, "attend_absorbed_gemm: out");
  index_t maxlen = 0;
  for (int b = 0; b < B; ++b) {
    require<ShapeError>(keys.length(b) >= 1 && keys.length(b) == values.length(b), "attend_absorbed_gemm: sequence ",
                        b, " has ", keys.length(b), " key-side and ", values.length(b),
                        " value-side tokens (need equal, >= 1)");
    require<ConfigError>(keys.length(b) <= rope.max_positions(), "attend_absorbed_gemm: sequence ", b,
                         " is longer than the RoPE table");
    maxlen = std::max(maxlen, keys.length(b));
  }
  detail::resolve_strides(a, ldq, ldo, "attend_absorbed_gemm");
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
  detail::launch_dequantize(keys.view(), 0, Lp, ws.xk.data(), ks.width, stream);
  gemm_bf16_nt(blas, B * Lp, dkv, ks.width, ws.xk.data(), ks.width, w.wk, w.ldwk ? w.ldwk : ks.width, ws.k.data(), dkv,
               stream);
  detail::launch_gemm_scores(ws.k.data(), Lp, B, a, length, q, ldq, rope, ws.s.data(), stream);
  detail::launch_softmax(ws, Lp, maxlen, B, static_cast<int>(H), length, stream);
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
  detail::launch_combine(ws, static_cast<int>(H), hpg, 1, B, vs.width, w.wv, w.ldwv ? w.ldwv : vs.width, w.bv, out,
                         ldo, stream);
}

/// Decode attention over materialized K (post-RoPE) and V (T = bf16 or fp16): token t of
/// sequence b is row b·seq_rows + t (row stride ld elements, head g at columns g·Dh); every
/// sequence has `len` tokens and its query sits at position len−1. `length` is a device array
/// of `batch` ints equal to len (queries are rotated at length−1).
/// \tparam T the element type of K and V: bf16 or fp16 (deduced)
template <class T>
void attend_kv(const T* K, const T* V, index_t ld, index_t seq_rows, int batch, index_t len, const int* length,
               const AttentionShape& a, const DeviceRope& rope, const float* q, float* out, DecodeWorkspace& ws,
               cudaStream_t stream, index_t ldq = 0, index_t ldo = 0, int splits = 0) {
  static_assert(detail::is_input_type<T>, "attend_kv: K and V must be bf16 or fp16");
  detail::check_attention(a);
  require<ShapeError>(K && V && q && out && length, "attend_kv: K, V, q, out and length must not be null");
  require<ShapeError>(batch >= 1, "attend_kv: batch must be positive, got ", batch);
  require<ShapeError>(reinterpret_cast<std::uintptr_t>(K) % 8 == 0 && reinterpret_cast<std::uintptr_t>(V) % 8 == 0,
                      "attend_kv: K and V must be 8-byte aligned (4 elements are read at once)");
  require<ShapeError>(ld >= a.kv_width() && ld % 4 == 0, "attend_kv: ld must be a multiple of 4 and at least kv_heads × "
                      "head_dim = ", a.kv_width(), ", got ", ld);
  require<ShapeError>(len >= 1 && seq_rows >= len, "attend_kv: need 1 <= len <= seq_rows, got len ", len,
                      " and seq_rows ", seq_rows);
  // Last: each asks the driver about the pointer (the other entry points check cheap arguments first too).
  require_device_accessible(K, "attend_kv: K");
  require_device_accessible(V, "attend_kv: V");
  require_device_accessible(q, "attend_kv: q");
  require_device_accessible(out, "attend_kv: out");
  require_device_accessible(length, "attend_kv: length");
  detail::resolve_strides(a, ldq, ldo, "attend_kv");
  const int hpg = static_cast<int>(a.heads / a.kv_heads);
  if (splits <= 0) splits = detail::pick_splits(batch * a.kv_heads, (len + 127) / 128);
  const index_t chunk = ((len + splits - 1) / splits + 31) / 32 * 32;
  splits = static_cast<int>((len + chunk - 1) / chunk);
  detail::require_splits(splits, "attend_kv");
  const std::size_t slots = static_cast<std::size_t>(batch) * a.heads * splits;
  ws.acc.reserve(slots * a.head_dim);
  ws.ml.reserve(slots * 2);
  detail::rope_queries(q, ldq, batch, a, length, rope, ws, stream);
  const detail::SplitArgs sa{static_cast<int>(a.heads), hpg, splits, 0, len};
  detail::kv_decode_kernel<T><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(a.kv_heads),
                                     static_cast<unsigned>(batch)), 128, 0, stream>>>(K, V, ld, seq_rows, len, ws.q.data(),
                                                                                     sa, chunk, ws.acc.data(), ws.ml.data());
  check_launch("kv_decode_kernel");
  detail::launch_combine(ws, static_cast<int>(a.heads), hpg, splits, batch, a.head_dim, nullptr, 0, nullptr, out, ldo,
                         stream);
}

}  // namespace xquant::cuda
