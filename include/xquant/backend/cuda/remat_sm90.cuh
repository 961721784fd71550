#pragma once
// The fused remat GEMM on Hopper (sm_90a): out = RoPE(X̂·Wᵀ + bias) where X̂ is dequantized in
// registers straight into the tensor cores' A operand, so X̂ never exists in memory, not even in
// shared memory.
//
// Per block: a 128 × 256 tile of out, two warpgroups of 64 rows each, K in steps of 64.
//   - W (bf16, N × width, K-major as nn.Linear stores it) and the tile's packed codes arrive by
//     bulk tensor copies (TMA) into a 4-stage shared-memory ring, each stage completing on an
//     mbarrier; W lands 128-byte swizzled, the layout wgmma reads through its descriptor.
//   - Each thread turns its rows' codes into the bf16 A fragment of wgmma m64n256k16 (rows g and
//     g+8 of its warp's 16, columns 2c, 2c+1, 2c+8, 2c+9 of each 16-wide k step; g = lane/4,
//     c = lane%4) while the previous k step's wgmmas run; A is double-buffered in registers.
//   - The dequantized value is Q::decode's float, bit for bit (see dequant_one), rounded to bf16
//     as the simple path's X̂ is: both paths multiply the same bf16 matrices.
//   - Epilogue from the accumulators: bias, RoPE on the adjacent column pairs each thread holds,
//     bf16 stores.
// Applies to per-token 2- and 4-bit quantizers with groups of >= 64 (a k step lies in one group)
// and width % 64 == 0; remat_fused falls back to the portable mainloop otherwise.

#include "epilogue.cuh"
#include "sm90.cuh"
#include "stream.cuh"

namespace xquant::cuda::detail {

namespace wg {
inline constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
inline constexpr int kConsumerWarps = 8;                 // two warpgroups of 64 rows each
inline constexpr int THREADS = 32 * kConsumerWarps + 128;  // + a producer warpgroup (one thread works)
inline constexpr int kBTileBytes = BN * BK * 2;  // 32 KB, a multiple of the 1024-byte swizzle atom
template <class Q>
inline constexpr int kCodeRowBytes = BK * Q::bits / 8;  // one row's codes of a k step
template <class Q>
inline constexpr int kStageTx = kBTileBytes + BM * kCodeRowBytes<Q>;  // bytes a stage receives
template <class Q>
inline constexpr int kSmemBytes = STAGES * kStageTx<Q> + 2 * STAGES * 8 + 1024;  // + barriers, + alignment slack

/// Quantizers the kernel handles.
template <class Q>
inline constexpr bool supports = Q::axis == Axis::Token && (Q::bits == 4 || Q::bits == 2);
}  // namespace wg

/// The four codes a thread needs from one row for one 16-wide k step, gathered into one word `u`
/// at bit offsets offset(0..3) (columns 2c, 2c+1, 2c+8, 2c+9). 4-bit: byte c of each of the
/// step's two code words; 2-bit: the step's word shifted right by 4c.
template <int Bits>
struct StepCodes;
template <>
struct StepCodes<4> {
  static constexpr int offset(int i) { return 4 * i; }
  static constexpr std::uint32_t kMask = 0xF;
  __device__ __forceinline__ static std::uint32_t gather(const std::uint32_t* w, int step, int c) {
    return __byte_perm(w[2 * step], w[2 * step + 1], static_cast<unsigned>(c | ((c + 4) << 4)));
  }
};
template <>
struct StepCodes<2> {
  static constexpr int offset(int i) { return (i & 1) * 2 + (i >> 1) * 16; }
  static constexpr std::uint32_t kMask = 0x3;
  __device__ __forceinline__ static std::uint32_t gather(const std::uint32_t* w, int step, int c) {
    return w[step] >> (4 * c);
  }
};

/// One row's group parameters, the scale pre-multiplied by 2^-offset(i) for each code position
/// (exact: a power-of-two scaling of an fp16 value stays a normal float).
struct RowScale {
  float s[4];
  float z;
};
template <class Q>
__device__ __forceinline__ RowScale row_scale(std::uint32_t prm) {
  const std::uint16_t p[2] = {static_cast<std::uint16_t>(prm), static_cast<std::uint16_t>(prm >> 16)};
  const auto P = Q::load(p);
  RowScale r;
#pragma unroll
  for (int i = 0; i < 4; ++i) r.s[i] = __fmul_rn(P.scale, __uint_as_float((127u - StepCodes<Q::bits>::offset(i)) << 23));
  r.z = P.zero;
  return r;
}

/// Q::decode of the code at position I of `u`, bit for bit, in three instructions. A code c at
/// bit offset o is read as a float by or-ing it into the mantissa of 2^23 (F = 2^23 + c·2^o, exact
/// for o + bits <= 23) and subtracting 2^23; (s·2^-o)·(c·2^o) is then exactly s·c. decode rounds
/// s·c, then s·c + z; the first rounding is exact (an fp16 scale has 11 significant bits, a code at
/// most 8, the product fits a float's 24), so one fused multiply-add gives the same float.
template <class Q, int I>
__device__ __forceinline__ float dequant_one(std::uint32_t u, const RowScale& r) {
  using C = StepCodes<Q::bits>;
  constexpr int o = C::offset(I);
  const float f = __uint_as_float(0x4B000000u | (u & (C::kMask << o)));
  if constexpr (Q::scheme == Scheme::Asymmetric) {
    return __fmaf_rn(r.s[I], __fsub_rn(f, 8388608.0f), r.z);
  } else {
    // (c − levels)·2^o exactly: both terms are integers below 2^24.
    constexpr float kBias = 8388608.0f + static_cast<float>(Q::sym_levels << o);
    return __fmul_rn(r.s[I], __fsub_rn(f, kBias));
  }
}

/// The A fragments of one 64-wide k step: [16-wide k step][fragment register].
struct AFrags {
  std::uint32_t r[4][4];
};

template <class Q>
__global__ void __launch_bounds__(wg::THREADS, 1)
    remat_wgmma_kernel(const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap code_map,
                       StreamView<Q> v, int begin, int count, int N, EpilogueArgs e, bf16* __restrict__ out,
                       index_t ldo) {
#if XQ_SM90A
  using namespace wg;
  using C = StepCodes<Q::bits>;
  constexpr int RB = kCodeRowBytes<Q>;
  extern __shared__ unsigned char smem_raw[];
  // The swizzled W tiles need 1024-byte alignment; dynamic shared memory guarantees only 16.
  unsigned char* smem = smem_raw + ((1024 - (sm90::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* const b_tiles = smem;                            // STAGES × 32 KB
  unsigned char* const code_tiles = smem + STAGES * kBTileBytes;  // STAGES × BM × RB
  std::uint64_t* const full = reinterpret_cast<std::uint64_t*>(code_tiles + STAGES * BM * RB);
  std::uint64_t* const empty = full + STAGES;

  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM, seq = blockIdx.z;
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31, g = lane >> 2, c = lane & 3;
  const int KT = static_cast<int>(v.width / BK);

  if (t == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], kConsumerWarps);
    }
    sm90::mbar_fence_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves after its loop

  if (warp >= kConsumerWarps) {  // producer: one thread keeps the ring full
    sm90::set_max_registers<false, 40>();  // hand its registers to the consumers
    if (t == 32 * kConsumerWarps) {
      for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % STAGES;
        if (kt >= STAGES) sm90::mbar_wait(&empty[s], static_cast<unsigned>(kt / STAGES - 1) & 1u);
        sm90::mbar_arrive_expect_tx(&full[s], kStageTx<Q>);
        sm90::tma_load_2d(b_tiles + s * kBTileBytes, &w_map, kt * BK, n0, &full[s]);
        sm90::tma_load_3d(code_tiles + s * BM * RB, &code_map, kt * RB, begin + m0, seq, &full[s]);
      }
    }
    return;
  }

  sm90::set_max_registers<true, 232>();
  // Consumers. This thread's two rows (tile-local), and their parameter rows (zeros past the range).
  const int lr0 = (warp >> 2) * 64 + (warp & 3) * 16 + g, lr1 = lr0 + 8;
  const bool ok0 = m0 + lr0 < count, ok1 = m0 + lr1 < count;
  const index_t gpr = (v.width >> v.group_shift) * Q::params_per_group;  // fp16 values per row
  const std::uint16_t* const prow0 = v.params + (static_cast<index_t>(seq) * v.capacity + begin + m0 + lr0) * gpr;
  const std::uint16_t* const prow1 = prow0 + 8 * gpr;
  auto param = [&](const std::uint16_t* prow, bool ok, int kt) -> std::uint32_t {
    if (!ok || kt >= KT) return 0u;
    const std::uint16_t* p = prow + ((kt * BK) >> v.group_shift) * Q::params_per_group;
    if constexpr (Q::params_per_group == 2) return __ldg(reinterpret_cast<const unsigned int*>(p));
    else return __ldg(reinterpret_cast<const unsigned short*>(p));
  };
  std::uint32_t pr0 = param(prow0, ok0, 0), pr1 = param(prow1, ok1, 0);

  // Waits for k step kt's stage and turns this thread's codes into A fragments.
  auto dequantize = [&](int kt, AFrags& a) {
    const int s = kt % STAGES;
    const RowScale rs0 = row_scale<Q>(pr0), rs1 = row_scale<Q>(pr1);
    pr0 = param(prow0, ok0, kt + 1), pr1 = param(prow1, ok1, kt + 1);  // in flight until the next call
    sm90::mbar_wait(&full[s], static_cast<unsigned>(kt / STAGES) & 1u);
    const unsigned char* codes = code_tiles + s * BM * RB;
    std::uint32_t w0[RB / 4], w1[RB / 4];
#pragma unroll
    for (int i = 0; i < RB / 16; ++i) {
      const uint4 x0 = reinterpret_cast<const uint4*>(codes + lr0 * RB)[i];
      const uint4 x1 = reinterpret_cast<const uint4*>(codes + lr1 * RB)[i];
      w0[4 * i] = x0.x, w0[4 * i + 1] = x0.y, w0[4 * i + 2] = x0.z, w0[4 * i + 3] = x0.w;
      w1[4 * i] = x1.x, w1[4 * i + 1] = x1.y, w1[4 * i + 2] = x1.z, w1[4 * i + 3] = x1.w;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const std::uint32_t u0 = C::gather(w0, k, c), u1 = C::gather(w1, k, c);
      a.r[k][0] = pack_bf16x2(dequant_one<Q, 0>(u0, rs0), dequant_one<Q, 1>(u0, rs0));
      a.r[k][1] = pack_bf16x2(dequant_one<Q, 0>(u1, rs1), dequant_one<Q, 1>(u1, rs1));
      a.r[k][2] = pack_bf16x2(dequant_one<Q, 2>(u0, rs0), dequant_one<Q, 3>(u0, rs0));
      a.r[k][3] = pack_bf16x2(dequant_one<Q, 2>(u1, rs1), dequant_one<Q, 3>(u1, rs1));
    }
  };

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  AFrags a, next;
  dequantize(0, a);
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % STAGES;
    std::uint64_t desc[4];
    const std::uint64_t desc0 = sm90::kmajor_sw128_desc(sm90::smem_addr(b_tiles + s * kBTileBytes));
#pragma unroll
    for (int k = 0; k < 4; ++k) desc[k] = desc0 + 2 * k;  // +32 bytes per 16-wide k step
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) sm90::fence_operand(a.r[k][r]);
    sm90::wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) sm90::wgmma_m64n256k16_rs(acc, a.r[k], desc[k]);
    sm90::wgmma_commit();
    // The next step's dequantization runs while the tensor cores work on this one.
    if (kt + 1 < KT) dequantize(kt + 1, next);
    sm90::wgmma_wait<0>();
    // The wgmmas read their register operands until they retire: keeping those live up to here
    // stops the allocator from handing them to `next` while in flight.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sm90::fence_operand(desc[k]);
#pragma unroll
      for (int r = 0; r < 4; ++r) sm90::fence_operand(a.r[k][r]);
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) sm90::fence_operand(acc[i]);
    if (lane == 0) sm90::mbar_arrive(&empty[s]);  // this warp is done with stage s
    a = next;
  }

  // Epilogue: accumulator 4j + 2h + q holds (row lr0 + 8h, column n0 + 8j + 2c + q).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = h ? lr1 : lr0;
    if (!(h ? ok1 : ok0)) continue;
    const index_t row = static_cast<index_t>(seq) * count + m0 + lr, pos = begin + m0 + lr;
    bf16* const dst = out + row * ldo;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = n0 + 8 * j + 2 * c;
      if (col < N) {
        float x0 = acc[4 * j + 2 * h], x1 = acc[4 * j + 2 * h + 1];
        epilogue2(x0, x1, col, pos, e);
        *reinterpret_cast<std::uint32_t*>(dst + col) = pack_bf16x2(x0, x1);
      }
    }
  }
#else
  (void)w_map, (void)code_map, (void)v, (void)begin, (void)count, (void)N, (void)e, (void)out, (void)ldo;
  __trap();
#endif
}

/// Whether remat_wgmma can serve `count` tokens of this stream on the current device (the operand
/// itself is valid: check_remat has required W's alignment and row stride).
template <class Q>
bool remat_wgmma_applies(const DeviceStreamShape& s, index_t count) {
  if constexpr (!wg::supports<Q>) {
    return false;
  } else {
    return s.width % wg::BK == 0 && s.group >= wg::BK && count < (index_t(1) << 30) &&
           (count + wg::BM - 1) / wg::BM <= 65535 && s.batch <= 65535 && sm90a_kernels();
  }
}

/// out rows seq·count + i = RoPE(X̂[seq, begin + i]·Wᵀ + bias), i < count, for every sequence.
template <class Q>
void launch_remat_wgmma(const DeviceStream<Q>& x, index_t begin, index_t count, const bf16* w, index_t ldw, index_t N,
                        const EpilogueArgs& e, bf16* out, index_t ldo, cudaStream_t stream) {
  using namespace wg;
  const auto& s = x.shape();
  const cuuint64_t wdims[2] = {static_cast<cuuint64_t>(s.width), static_cast<cuuint64_t>(N)};
  const cuuint64_t wstrides[1] = {static_cast<cuuint64_t>(ldw) * 2};
  const cuuint32_t wbox[2] = {BK, BN};
  const CUtensorMap w_map =
      sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, w, wdims, wstrides, wbox, CU_TENSOR_MAP_SWIZZLE_128B);
  const cuuint64_t cdims[3] = {static_cast<cuuint64_t>(x.code_bytes()), static_cast<cuuint64_t>(s.capacity),
                               static_cast<cuuint64_t>(s.batch)};
  const cuuint64_t cstrides[2] = {static_cast<cuuint64_t>(x.code_bytes()),
                                  static_cast<cuuint64_t>(x.code_bytes() * s.capacity)};
  const cuuint32_t cbox[3] = {static_cast<cuuint32_t>(kCodeRowBytes<Q>), BM, 1};
  const CUtensorMap code_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, x.codes().data(), cdims, cstrides,
                                                cbox, CU_TENSOR_MAP_SWIZZLE_NONE);
  auto kernel = remat_wgmma_kernel<Q>;
  XQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes<Q>));
  const dim3 grid(blocks_for(N, BN), blocks_for(count, BM), static_cast<unsigned>(s.batch));
  kernel<<<grid, THREADS, kSmemBytes<Q>, stream>>>(w_map, code_map, x.view(), static_cast<int>(begin),
                                                  static_cast<int>(count), static_cast<int>(N), e, out, ldo);
  check_launch("remat_wgmma_kernel");
}

}  // namespace xquant::cuda::detail
