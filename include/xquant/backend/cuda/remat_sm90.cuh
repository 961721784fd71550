#pragma once
// The fused remat GEMM on Hopper (sm_90a): out = RoPE(X̂·Wᵀ + bias) where X̂ is dequantized in
// registers straight into the tensor cores' A operand, so X̂ never exists in memory, not even in
// shared memory.
//
// Per tile: 128 × 256 of out, two warpgroups of 64 rows each, K in steps of 64. The grid is
// persistent (one block per SM, tiles N-tile fastest), so the producer loads the next tile while
// the consumers store this one.
//   - W (bf16, N × width, K-major as nn.Linear stores it) and the tile's packed codes arrive by
//     bulk tensor copies (TMA) into a 4-stage shared-memory ring (3 for per-channel 8-bit streams,
//     whose fourth stage would not fit beside the staged output tile), each stage completing on an
//     mbarrier; W lands 128-byte swizzled, the layout wgmma reads through its descriptor.
//   - Each thread turns its rows' codes into the bf16 A fragment of wgmma m64n256k16 (rows g and
//     g+8 of its warp's 16, columns 2c, 2c+1, 2c+8, 2c+9 of each 16-wide k step; g = lane/4,
//     c = lane%4). One wgmma per commit group, one kept in flight while the next k step's A is
//     built in the other of two register slots.
//   - The dequantized value is Q::decode's float, bit for bit (see dequant_magic), rounded to
//     bf16 as the simple path's X̂ is: both paths multiply the same bf16 matrices. Quantizers with
//     bf16 parameters (ParamBits::Bf16) take a packed decode instead, two codes per three bf16x2
//     instructions (dequant_pair), whose one rounding gives the same bf16 values (items 77-80).
//   - Epilogue from the accumulators: bias, RoPE on the adjacent column pairs each thread holds,
//     bf16 into a 128-byte swizzled tile in shared memory, stored by TMA (four 64-column boxes,
//     clipped at the range's rows and N). The stores run on while the consumers start the next
//     tile (measured: a few per cent in the K = 1024 latent rows, nothing visible at K = 4096).
//   - The RoPE tables of the tile's 128 positions (head width 64 or 128) arrive by TMA in that
//     same staged tile while the mainloop runs, once the previous tile's stores have read it; the
//     epilogue rotates each row in place. As global loads they cost 3-15 % (NOTES.md item 51).
//   - The next tile's first global loads (sequence length, first parameters) are issued before
//     this tile's epilogue, so the next tile's first wgmma does not wait for them (item 52).
// Measured (bench/cuda/NOTES.md, item 66): with an A operand that costs next to nothing the same
// kernel runs at 0.95-1.0 of cuBLAS (latent B1 32k: 0.97); the dequantization between two wgmma
// issues (three instructions per value and half a pack, plus the per-channel parameters'
// conversion) is what it loses, although issue slots are far from busy, and taking instructions
// out of it measured faster.
// Per-channel streams (the latent keys) take the same kernel: their parameters (per token group
// and channel) arrive by TMA with each stage, a tile's few token groups × the k step's 64
// channels, and each k step's A is dequantized with its four channels' scales; rows of the open
// group are read from the fp16 window instead. The k loop comes in two forms, chosen per tile and
// warpgroup: only warpgroups whose warps straddle two token groups or hold window rows take the
// one with those branches (items 68-69).
// The same kernel serves the decode attention (kScores): its epilogue rotates each K row in the
// accumulators and dots it with the queries of the tile's two KV heads (score_tile), so only the
// scores leave the block.
// Applies to 2-, 3-, 4- and 8-bit quantizers and width % 64 == 0 (3-bit: % 128, for TMA's 16-byte
// row stride), per-token groups of >= 64 (a k step lies in one group) and per-channel groups of
// >= 32 (a tile's 128 rows span at most 5 token groups); remat_fused falls back to the portable
// mainloop otherwise.

#include "dequant.cuh"
#include "epilogue.cuh"
#include "sm90.cuh"
#include "stream.cuh"
#include <type_traits>

namespace xquant::cuda::detail {

namespace wg {
inline constexpr int BM = 128, BN = 256, BK = 64;
inline constexpr int kConsumerWarps = 8;                 // two warpgroups of 64 rows each
inline constexpr int THREADS = 32 * kConsumerWarps + 128;  // + a producer warpgroup (one thread works)
inline constexpr int kBTileBytes = BN * BK * 2;  // 32 KB, a multiple of the 1024-byte swizzle atom
template <class Q>
inline constexpr int kCodeRowBytes = BK * Q::bits / 8;  // one row's codes of a k tile in the stream
/// A row's codes of a k tile in a stage: TMA boxes start at multiples of 16 bytes, so a 3-bit k
/// tile's 24 bytes (at byte 24·kt of the row) come in a box of 32 from byte 24·kt rounded down to
/// 16: odd k tiles' codes start 8 bytes in (kCodeSkip). Other widths' k tiles are whole boxes.
template <class Q>
inline constexpr int kCodeTileRow = kCodeRowBytes<Q> % 16 == 0 ? kCodeRowBytes<Q> : 32;
template <class Q>
inline constexpr int kCodeSkip = kCodeRowBytes<Q> % 16 == 0 ? 0 : kCodeRowBytes<Q> % 16;
inline constexpr int kMinChannelGroup = 32;
/// Per-channel streams: token groups whose parameters a stage holds (128 rows from any token on
/// span at most BM / group + 1 groups), each row the k step's 64 channels.
template <class Q>
inline constexpr int kParamRows = Q::axis == Axis::Channel ? BM / kMinChannelGroup + 1 : 0;
template <class Q>
inline constexpr int kParamTileBytes = kParamRows<Q> * BK * Q::params_per_group * 2;
template <class Q>
inline constexpr int kStageTx = kBTileBytes + BM * kCodeTileRow<Q> + kParamTileBytes<Q>;  // bytes a stage receives
inline constexpr int kOutBoxCols = 64;                      // 128 bytes of bf16: the swizzle's row
inline constexpr int kOutBoxBytes = BM * kOutBoxCols * 2;   // 16 KB
inline constexpr int kOutTileBytes = BN / kOutBoxCols * kOutBoxBytes;  // 64 KB, the staged output tile
/// The RoPE tables of a tile's 128 positions, staged by TMA in the output tile before the epilogue
/// (head width 64 or 128: a row's 32 or 64 pairs; boxes of 32 floats, 128 bytes, like the output's):
/// cos in boxes 0 and 1, sin in boxes 2 and 3.
inline constexpr int kTabBoxFloats = 32;
inline constexpr int kSinBox = 2;
/// k tiles into a tile: the consumers free the staged tile (the previous tile's stores have read it)
/// during k tile kFreeAt, and the producer loads the tables after it has loaded k tile kFreeAt +
/// STAGES, when the consumers have passed kFreeAt (so it never waits for them), or the last k tile.
inline constexpr int kFreeAt = 2;  // even (see the kernel)
/// Shared memory of the kernel with a ring of `stages`: the ring, the staged output tile (not for
/// the decode scores, which leave the block as a few floats per row), the barriers and the
/// alignment slack.
template <class Q, bool kScores>
constexpr int smem_bytes(int stages) {
  return stages * kStageTx<Q> + (kScores ? 0 : kOutTileBytes) + (2 * stages + 2) * 8 + 1024;
}
inline constexpr int kSmemLimit = 227 * 1024;  // sm_90's shared memory per block
/// The ring's stages: 4, or 3 where 4 would not fit (per-channel 8-bit streams beside the staged
/// output tile: 235 600 bytes).
template <class Q, bool kScores = false>
inline constexpr int kStages = smem_bytes<Q, kScores>(4) <= kSmemLimit ? 4 : 3;
template <class Q, bool kScores = false>
inline constexpr int kSmemBytes = smem_bytes<Q, kScores>(kStages<Q, kScores>);

/// Quantizers the kernel handles: 2, 3, 4 and 8 bits.
template <class Q>
inline constexpr bool supports = Q::bits <= 4 || Q::bits == 8;
}  // namespace wg

/// Quantizers whose codes the kernel decodes two at a time (dequant_pair): bf16 parameters and
/// 2- or 4-bit codes. 8-bit codes do not fit a bf16 mantissa, 3-bit ones have no pair placement
/// (StepCodes::pair); with bf16 parameters they take the float decode, which is Q::decode bit for
/// bit for either kind of parameter.
template <class Q>
inline constexpr bool packed_decode = bf16_params<Q> && (Q::bits == 2 || Q::bits == 4);

/// The four codes a thread needs from one row for one 16-wide k step, gathered into one Word `u`
/// at bit offsets offset(0..3) (columns 2c, 2c+1, 2c+8, 2c+9). 4-bit: byte c of each of the
/// step's two code words; 2-bit: the step's word shifted right by 4c; 8-bit: bytes 2c, 2c+1 of the
/// step's first two words and of its last two, in two 32-bit halves (a code is decoded from its
/// half: dequant_magic needs it below bit 23); 3-bit: the 30 bits from bit 6c of the step's 48,
/// and the same shifted right by 16.
template <int Bits>
struct StepCodes;
/// For dequant_pair, pair<I> places the codes of columns 2c, 2c+1 (I = 0) or 2c+8, 2c+9 (I = 1)
/// at bits 0 and 16 + kPairHigh of a word.
template <>
struct StepCodes<4> {
  using Word = std::uint32_t;
  static constexpr int offset(int i) { return 4 * i; }
  __device__ __forceinline__ static std::uint32_t gather(const std::uint32_t* w, int step, int c) {
    return __byte_perm(w[2 * step], w[2 * step + 1], static_cast<unsigned>(c | ((c + 4) << 4)));
  }
  // Byte I of u (the pair's codes at bits 8I and 8I + 4) and byte I of u >> 4.
  static constexpr int kPairHigh = 0;
  template <int I>
  __device__ __forceinline__ static std::uint32_t pair(std::uint32_t u) {
    return __byte_perm(u, u >> 4, I == 0 ? 0x0400u : 0x0501u);
  }
};
template <>
struct StepCodes<2> {
  using Word = std::uint32_t;
  static constexpr int offset(int i) { return (i & 1) * 2 + (i >> 1) * 16; }
  __device__ __forceinline__ static std::uint32_t gather(const std::uint32_t* w, int step, int c) {
    return w[step] >> (4 * c);
  }
  // Byte 2I of u (the pair's codes at bits 16I and 16I + 2) in bytes 0 and 2.
  static constexpr int kPairHigh = 2;
  template <int I>
  __device__ __forceinline__ static std::uint32_t pair(std::uint32_t u) {
    return __byte_perm(u, 0u, I == 0 ? 0x0000u : 0x0202u);
  }
};
template <>
struct StepCodes<3> {
  using Word = std::uint64_t;
  static constexpr int offset(int i) { return (i & 1) * 3 + (i >> 1) * 40; }
  // A k tile's 64 codes are 6 words; step s's 48 bits start at word 3s/2, at bit 16 for odd s.
  __device__ __forceinline__ static std::uint64_t gather(const std::uint32_t* w, int step, int c) {
    const int j = 3 * step / 2;
    const std::uint32_t lo = step & 1 ? __byte_perm(w[j], w[j + 1], 0x5432u) : w[j];
    const std::uint32_t hi = step & 1 ? w[j + 1] >> 16 : w[j + 1];
    // Columns 2c, 2c+1 at bits 0, 3 and 2c+8, 2c+9 at bits 24, 27 (6c + 30 <= 48: within lo, hi).
    const std::uint32_t win = __funnelshift_r(lo, hi, static_cast<unsigned>(6 * c));
    return win | static_cast<std::uint64_t>(win >> 16) << 32;
  }
};
template <>
struct StepCodes<8> {
  using Word = std::uint64_t;
  static constexpr int offset(int i) { return (i & 1) * 8 + (i >> 1) * 32; }
  __device__ __forceinline__ static std::uint64_t gather(const std::uint32_t* w, int step, int c) {
    const unsigned sel = static_cast<unsigned>(2 * c | (2 * c + 1) << 4);  // bytes 2c, 2c+1 of a word pair
    return __byte_perm(w[4 * step], w[4 * step + 1], sel) |
           static_cast<std::uint64_t>(__byte_perm(w[4 * step + 2], w[4 * step + 3], sel)) << 32;
  }
};
/// The 32-bit half of a StepCodes word that holds code position I, and I's offset in it.
template <int Bits, int I>
__device__ __forceinline__ std::uint32_t code_half(typename StepCodes<Bits>::Word u) {
  return static_cast<std::uint32_t>(u >> (StepCodes<Bits>::offset(I) & ~31));
}
template <int Bits>
constexpr int half_offset(int i) {
  return StepCodes<Bits>::offset(i) & 31;
}

/// One row's group parameters, the scale pre-multiplied by 2^-offset(i) for each code position
/// (exact: a power-of-two scaling of an fp16 value stays a normal float), converted by param_float.
struct RowScale {
  float s[4];
  float z;
};
/// `scale` times 2^-offset(i) (within its half): what dequant_at takes for code position i.
template <int Bits>
__device__ __forceinline__ float step_scale(float scale, int i) {
  return offset_scale(scale, half_offset<Bits>(i));
}
template <class Q>
__device__ __forceinline__ RowScale row_scale(std::uint32_t prm) {
  const float scale = param_float<Q>(prm);
  RowScale r;
#pragma unroll
  for (int i = 0; i < 4; ++i) r.s[i] = step_scale<Q::bits>(scale, i);
  r.z = Q::scheme == Scheme::Asymmetric ? param_float<Q>(prm >> 16) : 0.0f;
  return r;
}

/// dequant_bits at code position I of a StepCodes word; `s` is the scale times 2^-offset(I).
template <class Q, int I>
__device__ __forceinline__ float dequant_at(typename StepCodes<Q::bits>::Word u, float s, float z) {
  return dequant_bits<Q, half_offset<Q::bits>(I)>(code_half<Q::bits, I>(u), s, z);
}
/// dequant_code at code position I of a StepCodes word; `s` is the scale.
template <class Q, int I>
__device__ __forceinline__ float dequant_chan(typename StepCodes<Q::bits>::Word u, float s, float z) {
  return dequant_code<Q, half_offset<Q::bits>(I)>(code_half<Q::bits, I>(u), s, z);
}
template <class Q, int I>
__device__ __forceinline__ float dequant_one(typename StepCodes<Q::bits>::Word u, const RowScale& r) {
  return dequant_at<Q, I>(u, r.s[I], r.z);
}

/// Per-channel streams: the parameters of a thread's four channels of one k step (2c, 2c+1,
/// 2c+8, 2c+9 of the 16), for dequant_chan (the scales as they are). They are
/// read in two parts: chan_words takes the raw fp16 words from `row`, one token group's row of
/// the stage's parameter tile (the k step's 64 channels), and chan_scale converts them. The
/// kernel reads a step ahead, so the shared-memory latency is not on the path between two wgmma
/// issues.
struct ChanWords {
  std::uint32_t q[4];  // (scale | zero << 16) per channel
};
struct ChanScale {
  float s[4], z[4];
};
template <class Q>
__device__ __forceinline__ ChanWords chan_words(const std::uint16_t* row, int k, int c) {
  constexpr int P = Q::params_per_group;
  const std::uint16_t* p = row + (16 * k + 2 * c) * P;
  // volatile asm: the compiler moved plain loads down to their use, right behind the next wgmma
  // issue, where the conversion then waited for them (ncu: the mainloop's top stall).
  const std::uint32_t a = sm90::smem_addr(p);
  ChanWords w;
  if constexpr (P == 2) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%4];\n\tld.shared.v2.u32 {%2, %3}, [%4 + 32];\n"
                 : "=r"(w.q[0]), "=r"(w.q[1]), "=r"(w.q[2]), "=r"(w.q[3])
                 : "r"(a)
                 : "memory");
  } else {
    std::uint32_t lo, hi;
    asm volatile("ld.shared.u32 %0, [%2];\n\tld.shared.u32 %1, [%2 + 16];\n" : "=r"(lo), "=r"(hi) : "r"(a) : "memory");
    w.q[0] = lo & 0xFFFFu, w.q[1] = lo >> 16, w.q[2] = hi & 0xFFFFu, w.q[3] = hi >> 16;
  }
  return w;
}
template <class Q>
__device__ __forceinline__ ChanScale chan_scale(const ChanWords& w) {
  ChanScale r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    r.s[i] = param_float<Q>(w.q[i]);
    r.z[i] = Q::params_per_group == 2 ? param_float<Q>(w.q[i] >> 16) : 0.0f;
  }
  return r;
}

/// ParamBits::Bf16 quantizers (dequant_pair): a row's scale and zero, or a channel pair's, as bf16
/// pairs, taken from the stored bf16 parameters by byte permutes. Per-token they are made once per
/// group; per-channel, each k step (ChanPairs: the columns 2c, 2c+1, then 2c+8, 2c+9).
struct PairScale {
  std::uint32_t s, z;
};
/// From a row's (scale | zero << 16).
__device__ __forceinline__ PairScale row_pairs(std::uint32_t prm) {
  return {__byte_perm(prm, 0u, 0x1010u), __byte_perm(prm, 0u, 0x3232u)};
}
struct ChanPairs {
  PairScale lo, hi;
};
__device__ __forceinline__ ChanPairs chan_pairs(const ChanWords& w) {
  return {{__byte_perm(w.q[0], w.q[1], 0x5410u), __byte_perm(w.q[0], w.q[1], 0x7632u)},
          {__byte_perm(w.q[2], w.q[3], 0x5410u), __byte_perm(w.q[2], w.q[3], 0x7632u)}};
}
/// The bf16 pair of columns 2c, 2c+1 (I = 0) or 2c+8, 2c+9 (I = 1) of a StepCodes word.
template <class Q, int I>
__device__ __forceinline__ std::uint32_t dequant_step_pair(std::uint32_t u, const PairScale& p) {
  using C = StepCodes<Q::bits>;
  return dequant_pair<Q, C::kPairHigh>(C::template pair<I>(u), p.s, p.z);
}

/// Two adjacent fp16 window values as a bf16 pair (the open group of a per-channel stream).
__device__ __forceinline__ std::uint32_t window_pair(const std::uint16_t* p) {
  const std::uint32_t h = *reinterpret_cast<const std::uint32_t*>(p);
  return pack_bf16x2(half_to_float(static_cast<std::uint16_t>(h)), half_to_float(static_cast<std::uint16_t>(h >> 16)));
}

/// Upper bound on the wgmma kernel's grid; 0 (the default): one block per SM. Tests lower it so
/// that each block works through several tiles.
inline int remat_wgmma_max_blocks = 0;
/// Tests set it to run the portable kernel where the wgmma kernel would apply.
inline bool remat_wgmma_disabled = false;

/// Which output tile a block works on: tiles are numbered N-tile fastest (the blocks that run
/// together share their rows' codes and read all of W, which stays in L2).
struct RematTiles {
  long long n_tiles, m_tiles, total;
  __device__ void at(long long t, int& n0, int& m0, int& seq) const {
    if (total <= 0xFFFFFFFFll) {  // 32-bit divisions: a few instructions, not a 64-bit division's call
      const unsigned u = static_cast<unsigned>(t), nt = static_cast<unsigned>(n_tiles);
      const unsigned rest = u / nt;
      n0 = static_cast<int>(u - rest * nt) * wg::BN;
      m0 = static_cast<int>(rest % static_cast<unsigned>(m_tiles)) * wg::BM;
      seq = static_cast<int>(rest / static_cast<unsigned>(m_tiles));
      return;
    }
    const long long n = t % n_tiles, rest = t / n_tiles;
    n0 = static_cast<int>(n) * wg::BN, m0 = static_cast<int>(rest % m_tiles) * wg::BM;
    seq = static_cast<int>(rest / m_tiles);
  }
};

/// The decode scores the kernel forms instead of storing K (kScores): the tile's 256 columns are
/// two KV heads' keys, and each row, rotated, is dotted with those heads' queries.
struct ScoreArgs {
  const float* qr = nullptr;  // [batch][heads][128]: queries after RoPE at their own position, / sqrt(128)
  float* S = nullptr;         // [batch][heads][Lp]: scores of tokens [0, Lp); −inf at and past a sequence's length
  int Lp = 0, heads = 0, hpg = 0, kv_heads = 0;
};

/// Scores of one finished tile (kScores): S[seq][h][m0 + lr] = qr_h · RoPE(K row lr) for the hpg
/// query heads h of each KV head whose 128 columns the tile holds, −inf for rows at or past the
/// sequence's length. Thread layout as in the kernel's epilogue: accumulator 4j + 2r + q holds
/// (row lr_r, column n0 + 8j + 2c + q); a row's 128 columns of one KV head are spread over the
/// quad's four lanes (c), so each partial dot product is summed over the quad by two shuffles.
/// Every lane runs the shuffles (rows past the range only skip their stores).
__device__ __forceinline__ void score_tile(float (&acc)[128], int n0, int m0, int seq, int lr0, int count, int len,
                                           int c, const EpilogueArgs& e, const ScoreArgs& sc) {
  constexpr int kHeadPairs = 64;  // RoPE pairs of a 128-wide head
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pos = m0 + lr0 + 8 * r;
    if (pos >= len) continue;  // its score is −inf whatever the accumulators hold
    // Pair 4j + c of the head for column pair j: j and j + 16 (the second KV head) share a table entry.
    const float* cs = e.cos + static_cast<index_t>(pos) * kHeadPairs + c;
    const float* sn = e.sin + static_cast<index_t>(pos) * kHeadPairs + c;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float co = cs[4 * j], si = sn[4 * j];
#pragma unroll
      for (int kh = 0; kh < 2; ++kh) {
        float& x0 = acc[4 * (j + 16 * kh) + 2 * r];
        float& x1 = acc[4 * (j + 16 * kh) + 2 * r + 1];
        const float a = x0, b = x1;
        x0 = a * co - b * si;
        x1 = a * si + b * co;
      }
    }
  }
  const bool ok0 = m0 + lr0 < count, ok1 = m0 + lr0 + 8 < count;
  const bool in0 = m0 + lr0 < len, in1 = m0 + lr0 + 8 < len;
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    const int g = n0 / 128 + kh;  // the KV head (the same for the whole block)
    if (g >= sc.kv_heads) break;
#pragma unroll 1
    for (int jq = 0; jq < sc.hpg; ++jq) {
      const int h = g * sc.hpg + jq;
      const float* q = sc.qr + (static_cast<index_t>(seq) * sc.heads + h) * 128 + 2 * c;
      float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) {
        const float2 qq = __ldg(reinterpret_cast<const float2*>(q + 8 * jj));
        const int j = jj + 16 * kh;
        d0 = fmaf(qq.x, acc[4 * j], fmaf(qq.y, acc[4 * j + 1], d0));
        d1 = fmaf(qq.x, acc[4 * j + 2], fmaf(qq.y, acc[4 * j + 3], d1));
      }
      d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
      d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
      d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
      float* const srow = sc.S + (static_cast<index_t>(seq) * sc.heads + h) * sc.Lp + m0 + lr0;
      if (c == 0 && ok0) srow[0] = in0 ? d0 : -INFINITY;
      if (c == 1 && ok1) srow[8] = in1 ? d1 : -INFINITY;
    }
  }
}

/// kScores = false: out = RoPE(X̂·Wᵀ + bias) for rows [begin, begin + count) of every sequence.
/// kScores = true: the decode scores of rows [0, count) (score_tile; begin is 0, out_map unused).
/// `tables`: the RoPE tables come by TMA (cos_map, sin_map) into the staged output tile, which the
/// epilogue rotates in place (head width 64 or 128, not for the scores); otherwise the epilogue
/// reads them from global memory (cos_map and sin_map unused).
template <class Q, bool kScores = false>
__global__ void __launch_bounds__(wg::THREADS, 1)
    remat_wgmma_kernel(const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap code_map,
                       const __grid_constant__ CUtensorMap param_map, const __grid_constant__ CUtensorMap out_map,
                       const __grid_constant__ CUtensorMap cos_map, const __grid_constant__ CUtensorMap sin_map,
                       bool tables, StreamView<Q> v, int begin, int count, int N, RematTiles tiles, EpilogueArgs e,
                       ScoreArgs sc) {
#if XQ_SM90A
  using namespace wg;
  using C = StepCodes<Q::bits>;
  constexpr int RB = kCodeRowBytes<Q>;  // a row's codes of a k tile in the stream
  constexpr int RS = kCodeTileRow<Q>;   // and in a stage
  static_assert(kCodeSkip<Q> + RB <= RS, "remat_wgmma: a k tile's codes must lie in its box");
  constexpr int STAGES = kStages<Q, kScores>;
  constexpr bool kChannel = Q::axis == Axis::Channel;
  constexpr bool kPairs = packed_decode<Q>;  // two codes per dequant_pair
  // 8-bit codes take 16 registers a row and k tile: they are read half a tile at a time (the next
  // tile's steps 0-1 during step 2, this tile's steps 2-3 during step 0), so that no more are live
  // than the narrower codes keep (read a whole tile ahead, as those are, ptxas spilled 68 bytes).
  constexpr bool kHalves = Q::bits == 8;
  constexpr int PPG = Q::params_per_group;
  extern __shared__ unsigned char smem_raw[];
  // The swizzled W tiles need 1024-byte alignment; dynamic shared memory guarantees only 16.
  unsigned char* smem = smem_raw + ((1024 - (sm90::smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* const b_tiles = smem;                            // STAGES × 32 KB
  unsigned char* const out_tile = smem + STAGES * kBTileBytes;    // 64 KB, 1024-byte aligned (swizzle)
  unsigned char* const code_tiles = out_tile + (kScores ? 0 : kOutTileBytes);  // STAGES × BM × RS
  unsigned char* const param_tiles = code_tiles + STAGES * BM * RS;  // STAGES × kParamTileBytes (per-channel)
  std::uint64_t* const full = reinterpret_cast<std::uint64_t*>(param_tiles + STAGES * kParamTileBytes<Q>);
  std::uint64_t* const empty = full + STAGES;
  std::uint64_t* const tab_full = empty + STAGES;  // the tile's RoPE tables have landed (tables)
  std::uint64_t* const out_free = tab_full + 1;    // the previous tile's stores have read the staged tile

  const int t = threadIdx.x, warp = t >> 5, lane = t & 31, g = lane >> 2, c = lane & 3;
  const int KT = static_cast<int>(v.width / BK);
  tables = tables && !kScores;  // (the launcher passes false for the scores; this makes it a constant there)
  // (free_at is even: the consumers free the staged tile between an even k tile and the next.)
  const int free_at = min(kFreeAt, (KT - 1) & ~1), tab_at = min(kFreeAt + STAGES, KT - 1);

  if (t == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], kConsumerWarps);
    }
    sm90::mbar_init(tab_full, 1);
    sm90::mbar_init(out_free, 1);
    sm90::mbar_fence_init();
  }
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves after its loop

  // A block takes tiles blockIdx.x, + gridDim.x, ... (one tile each when the grid covers them all;
  // a persistent grid's producer runs ahead into the next tile while the consumers store this
  // one). k steps are counted across tiles: step i uses stage i % STAGES in phase i / STAGES.
  if (warp >= kConsumerWarps) {  // producer: one thread keeps the ring full
    sm90::set_max_registers<false, 40>();  // hand its registers to the consumers
    if (t == 32 * kConsumerWarps) {
      unsigned i = 0, u = 0;  // u: the block's tile count
      const unsigned tab_bytes = (e.head_dim / 2 / kTabBoxFloats) * 2 * kOutBoxBytes;
      for (long long tile = blockIdx.x; tile < tiles.total; tile += gridDim.x, ++u) {
        int n0, m0, seq;
        tiles.at(tile, n0, m0, seq);
        for (int kt = 0; kt < KT; ++kt, ++i) {
          const unsigned s = i % STAGES;
          if (i >= STAGES) sm90::mbar_wait(&empty[s], (i / STAGES - 1) & 1u);
          sm90::mbar_arrive_expect_tx(&full[s], kStageTx<Q>);
          sm90::tma_load_2d(b_tiles + s * kBTileBytes, &w_map, kt * BK, n0, &full[s]);
          sm90::tma_load_3d(code_tiles + s * BM * RS, &code_map, kt * RB & ~15, begin + m0, seq, &full[s]);
          if constexpr (kChannel)  // the parameters of the token groups from the tile's first row on
            sm90::tma_load_3d(param_tiles + s * kParamTileBytes<Q>, &param_map, kt * BK * PPG,
                              (begin + m0) >> v.group_shift, seq, &full[s]);
          if (tables && kt == tab_at) {  // the tile's RoPE tables, once the previous tile's stores have read the staged tile
            if (u > 0) sm90::mbar_wait(out_free, (u - 1) & 1u);
            sm90::mbar_arrive_expect_tx(tab_full, tab_bytes);
            for (int b = 0; b * kTabBoxFloats < e.head_dim / 2; ++b) {
              sm90::tma_load_2d(out_tile + b * kOutBoxBytes, &cos_map, b * kTabBoxFloats, begin + m0, tab_full);
              sm90::tma_load_2d(out_tile + (kSinBox + b) * kOutBoxBytes, &sin_map, b * kTabBoxFloats, begin + m0, tab_full);
            }
          }
        }
      }
    }
    return;
  }

  sm90::set_max_registers<true, 232>();
  const int lr0 = (warp >> 2) * 64 + (warp & 3) * 16 + g, lr1 = lr0 + 8;  // this thread's rows in a tile
  const int groups = static_cast<int>(v.width >> v.group_shift);            // token groups per row
  const index_t gpr = static_cast<index_t>(groups) * Q::params_per_group;  // fp16 parameters per row
  // Per-token groups span 2^tile_shift k tiles (group >= BK): the tiles of a group share its scales.
  const int tile_shift = kChannel ? 0 : v.group_shift - 6;
  static_assert(BK == 64, "tile_shift assumes 64-wide k tiles");
  // This thread's parameter rows of a tile (zeros past the range; for the scores also past the
  // sequence's length, whose rows may lie past the stream's capacity: their scores are −inf anyway).
  auto param_row = [&](int m0, int seq) {
    return v.params + (static_cast<index_t>(seq) * v.capacity + begin + m0 + lr0) * gpr;
  };
  auto row_limit = [&](int len) { return kScores ? min(count, len) : count; };
  // Per-token: the raw parameters of group gi of rows lr0, lr1 (zero past the row's groups).
  auto param = [&](const std::uint16_t* prow, bool ok, int gi) -> std::uint32_t {
    if (kChannel || !ok || gi >= groups) return 0u;
    const std::uint16_t* p = prow + gi * Q::params_per_group;
    if constexpr (Q::params_per_group == 2) return __ldg(reinterpret_cast<const unsigned int*>(p));
    else return __ldg(reinterpret_cast<const unsigned short*>(p));
  };
  // A tile's coordinates and the global loads its first k step waits for (the sequence's length,
  // the first group's parameters). The next tile's are read before this tile's epilogue, so that
  // their latency is not between the tile's start and its first wgmma (ncu: the tile start's top
  // stall once the epilogue's table loads were gone).
  struct TileHead {
    int n0, m0, seq, len;
    const std::uint16_t* prow0;  // per-token: the parameters of row lr0 (row lr1's: + 8 rows)
    std::uint32_t p0, p1;        // per-token: group 0's parameters of rows lr0, lr1
  };
  auto head_of = [&](long long tile) {
    TileHead h;
    tiles.at(tile, h.n0, h.m0, h.seq);
    h.len = kChannel || kScores ? v.length[h.seq] : 0;
    const int limit = row_limit(h.len);
    h.prow0 = param_row(h.m0, h.seq);
    h.p0 = param(h.prow0, h.m0 + lr0 < limit, 0), h.p1 = param(h.prow0 + 8 * gpr, h.m0 + lr1 < limit, 0);
    return h;
  };
  TileHead next = head_of(blockIdx.x);
  unsigned i0 = 0;  // the step counter at the current tile's first k step
  unsigned u = 0;   // the block's tile count
  for (long long tile = blockIdx.x; tile < tiles.total; tile += gridDim.x, i0 += KT, ++u) {
    const TileHead head = next;
    const int n0 = head.n0, m0 = head.m0, seq = head.seq;
    const int limit = row_limit(head.len);
    const bool ok0 = m0 + lr0 < limit, ok1 = m0 + lr1 < limit;
    const std::uint16_t* const prow0 = head.prow0;
    const std::uint16_t* const prow1 = prow0 + 8 * gpr;
    std::uint32_t pr0 = head.p0, pr1 = head.p1;
    // Per-channel: the rows' token groups as rows q0, q1 of the stage's parameter tile (split: a
    // warp whose rows straddle two groups), and which rows are in the open group, read from the
    // fp16 window (rows past the range need no care: an A row only reaches its own output row).
    int q0 = 0, q1 = 0;
    bool split = false, win0 = false, win1 = false, any_window = false;
    bool general = false;  // the k loop's form (k_loop): the same for the warpgroup's four warps
    const std::uint16_t *wrow0 = nullptr, *wrow1 = nullptr;  // window columns 2c of the k tile build reads
    if constexpr (kChannel) {
      const int first = (begin + m0) >> v.group_shift;
      q0 = ((begin + m0 + lr0) >> v.group_shift) - first, q1 = ((begin + m0 + lr1) >> v.group_shift) - first;
      split = __any_sync(~0u, q0 != q1);
      const index_t quantized = StreamView<Q>::quantized(head.len, v.group);
      win0 = ok0 && begin + m0 + lr0 >= quantized, win1 = ok1 && begin + m0 + lr1 >= quantized;
      any_window = __any_sync(~0u, win0 || win1);
      // The warpgroup takes the general form when any of its warps is split or holds window rows:
      // wgmma is .aligned, all 128 threads must issue the same instruction (warps of one
      // warpgroup in different forms produced wrong tiles). Worked out from the warpgroup's rows,
      // as a warp's vote does not reach the other warps: its warps hold rows wg_row + [16w,
      // 16w + 16), and group boundaries are multiples of 16, so a warp straddles one exactly when
      // the rows are not 16-aligned and a boundary lies among them; window rows are those from
      // `quantized` on, below the range's limit.
      const int wg_row = begin + m0 + (warp >> 2) * 64;  // the warpgroup's first row
      // (The vote changes no value: it lets ptxas see a warp-uniform branch. Without it, the k
      // loop's two forms were a divergent region and the per-channel kernels spilled.)
      general = __any_sync(~0u, ((wg_row & 15) != 0 && wg_row >> v.group_shift != (wg_row + 63) >> v.group_shift) ||
                                    max(wg_row, static_cast<int>(quantized)) < min(wg_row + 64, begin + limit));
      wrow0 = v.window_row(seq, begin + m0 + lr0) + 2 * c, wrow1 = v.window_row(seq, begin + m0 + lr1) + 2 * c;
    }
    const int free_kt = tables && u > 0 ? free_at : -1;  // the k tile after which the staged tile is freed
    auto stage_of = [&](int kt) { return static_cast<int>((i0 + kt) % STAGES); };
    auto phase_of = [&](int kt) { return (i0 + kt) / STAGES & 1u; };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    // One wgmma (one 16-wide k step) per commit group, and one group kept in flight while the next
    // step's A is built: the tensor cores never drain inside the loop. A lives in two register
    // slots, step j in slot j % 2; wait_group 1 after issuing step j retires step j − 1, whose slot
    // the next step then overwrites.
    // This tile's codes of rows lr0, lr1 and their scales, and the next tile's, read ahead so that
    // only one step's dequantization sits between two wgmma issues. Tiles alternate between two
    // register sets by the tile's parity, a compile-time index (the k-tile loop body is written
    // for an even and an odd tile): with one set copied into the other at each tile's end, the
    // copies (~30 moves) sat between two wgmma issues (ncu, NOTES item 46).
    std::uint32_t cw[2][2][RS / 4];  // [tile parity][row lr0, lr1]
    // This thread's row offset in a stage. Per-channel, made opaque to ptxas so that it stays live:
    // that kernel recomputed it for each tile into a temporary that the next build reused (NOTES
    // item 50; the per-token kernel keeps it live as it is).
    const std::uint32_t codes_smem = sm90::smem_addr(code_tiles);
    std::uint32_t code_row = static_cast<std::uint32_t>(lr0 * RS);
    if constexpr (kChannel) asm volatile("mov.b32 %0, %0;" : "+r"(code_row));
    // (ParamBits::Bf16 quantizers: the scales as bf16 pairs, for dequant_pair.)
    std::conditional_t<kPairs, PairScale, RowScale> rs[2][2];
    // Tile kt's scales into set P. Only a tile that opens a group converts (the others copy the
    // group's from the other set), and it starts loading the next group's parameters, a whole
    // group of k tiles ahead. (Per-channel scales come from the stage's parameter tile in build.)
    auto prefetch_scales = [&](int kt, auto P) {
      if constexpr (!kChannel) {
        if ((kt & ((1 << tile_shift) - 1)) == 0) {
          if constexpr (kPairs) rs[P][0] = row_pairs(pr0), rs[P][1] = row_pairs(pr1);
          else rs[P][0] = row_scale<Q>(pr0), rs[P][1] = row_scale<Q>(pr1);
          const int next = (kt >> tile_shift) + 1;
          pr0 = param(prow0, ok0, next), pr1 = param(prow1, ok1, next);
        } else {
          rs[P][0] = rs[1 - P][0], rs[P][1] = rs[1 - P][1];
        }
      }
    };
    // Tile kt's codes into set P: 16-byte loads [From, To) of each row (From = 0 waits for the stage).
    auto prefetch_codes = [&](int kt, auto P, auto From, auto To) {
      if constexpr (decltype(From)::value == 0) sm90::mbar_wait(&full[stage_of(kt)], phase_of(kt));
      // The address: this thread's row offset (live through the kernel) plus the stage's base (the
      // same for the warp), so that ptxas can address [row + uniform] without a temporary register.
      // With a temporary, the next build reused it and waited for these loads to read it, which sit
      // behind the wgmma in the memory pipeline (ncu, NOTES item 46: the mainloop's top stall).
      const std::uint32_t stage_base = codes_smem + static_cast<std::uint32_t>(stage_of(kt) * BM * RS);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int i = decltype(From)::value; i < decltype(To)::value; ++i) {
          const std::uint32_t a = code_row + stage_base + static_cast<std::uint32_t>(r * 8 * RS + 16 * i);
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(cw[P][r][4 * i]), "=r"(cw[P][r][4 * i + 1]), "=r"(cw[P][r][4 * i + 2]),
                         "=r"(cw[P][r][4 * i + 3])
                       : "r"(a)
                       : "memory");
        }
      }
    };
    // Per-channel: the parameter words of rows lr0, lr1 for step k in slot k % 2. They are read
    // two steps ahead, before the wait for the previous wgmma (ncu: read one step ahead, right
    // before the next wgmma issue, their conversion waited for shared memory).
    ChanWords pw0[2], pw1[2];
    // (G, a compile-time bool: the k loop's form, `general`; see k_loop.)
    auto fetch_params = [&](int kt, int k, auto G) {  // step k of k tile kt, whose stage has arrived
      if constexpr (kChannel) {
        const auto* prm = reinterpret_cast<const std::uint16_t*>(param_tiles + stage_of(kt) * kParamTileBytes<Q>);
        pw0[k & 1] = chan_words<Q>(prm + q0 * BK * PPG, k, c);
        if constexpr (decltype(G)::value)
          if (split) pw1[k & 1] = chan_words<Q>(prm + q1 * BK * PPG, k, c);
      }
    };
    // Step k of the k tile whose codes and scales are in set P (and, per-channel, parameter slot
    // k % 2 and window pointers wrow0/1).
    auto build = [&](int k, auto P, std::uint32_t(&a)[4], auto G) {
      // (The k tile's parity is P's: odd 3-bit k tiles start kCodeSkip bytes into their box.)
      constexpr int skip = decltype(P)::value * kCodeSkip<Q> / 4;
      const typename C::Word u0 = C::gather(cw[P][0] + skip, k, c), u1 = C::gather(cw[P][1] + skip, k, c);
      if constexpr (!kChannel && kPairs) {
        const PairScale &rs0 = rs[P][0], &rs1 = rs[P][1];
        a[0] = dequant_step_pair<Q, 0>(u0, rs0), a[1] = dequant_step_pair<Q, 0>(u1, rs1);
        a[2] = dequant_step_pair<Q, 1>(u0, rs0), a[3] = dequant_step_pair<Q, 1>(u1, rs1);
      } else if constexpr (!kChannel) {
        const RowScale &rs0 = rs[P][0], &rs1 = rs[P][1];
        a[0] = pack_bf16x2(dequant_one<Q, 0>(u0, rs0), dequant_one<Q, 1>(u0, rs0));
        a[1] = pack_bf16x2(dequant_one<Q, 0>(u1, rs1), dequant_one<Q, 1>(u1, rs1));
        a[2] = pack_bf16x2(dequant_one<Q, 2>(u0, rs0), dequant_one<Q, 3>(u0, rs0));
        a[3] = pack_bf16x2(dequant_one<Q, 2>(u1, rs1), dequant_one<Q, 3>(u1, rs1));
      } else {
        auto scales = [](const ChanWords& w) {
          if constexpr (kPairs) return chan_pairs(w);
          else return chan_scale<Q>(w);
        };
        auto dequant = [&](const auto& s0, const auto& s1) {
          if constexpr (kPairs) {
            a[0] = dequant_step_pair<Q, 0>(u0, s0.lo), a[1] = dequant_step_pair<Q, 0>(u1, s1.lo);
            a[2] = dequant_step_pair<Q, 1>(u0, s0.hi), a[3] = dequant_step_pair<Q, 1>(u1, s1.hi);
          } else {
            a[0] = pack_bf16x2(dequant_chan<Q, 0>(u0, s0.s[0], s0.z[0]), dequant_chan<Q, 1>(u0, s0.s[1], s0.z[1]));
            a[1] = pack_bf16x2(dequant_chan<Q, 0>(u1, s1.s[0], s1.z[0]), dequant_chan<Q, 1>(u1, s1.s[1], s1.z[1]));
            a[2] = pack_bf16x2(dequant_chan<Q, 2>(u0, s0.s[2], s0.z[2]), dequant_chan<Q, 3>(u0, s0.s[3], s0.z[3]));
            a[3] = pack_bf16x2(dequant_chan<Q, 2>(u1, s1.s[2], s1.z[2]), dequant_chan<Q, 3>(u1, s1.s[3], s1.z[3]));
          }
        };
        // Two code paths (split is the same for the whole warp): with `s1 = split ? ... : s0`, the
        // common case paid a register copy of s0 per value.
        const auto s0 = scales(pw0[k & 1]);
        if constexpr (decltype(G)::value) {
          if (split) dequant(s0, scales(pw1[k & 1]));
          else dequant(s0, s0);
          if (any_window) {  // (wrow0/1 point at k tile kt: constant offsets here, no address math per step)
            if (win0) a[0] = window_pair(wrow0 + 16 * k), a[2] = window_pair(wrow0 + 16 * k + 8);
            if (win1) a[1] = window_pair(wrow1 + 16 * k), a[3] = window_pair(wrow1 + 16 * k + 8);
          }
        } else {
          dequant(s0, s0);
        }
      }
    };
    using Even = std::integral_constant<int, 0>;
    using Odd = std::integral_constant<int, 1>;
    // The loads of a row's codes: all of a k tile's, or (kHalves) its steps 0-1 and 2-3.
    constexpr auto kFirst = std::integral_constant<int, 0>{};
    constexpr auto kMid = std::integral_constant<int, kHalves ? RS / 32 : RS / 16>{};
    constexpr auto kLast = std::integral_constant<int, RS / 16>{};
    std::uint32_t a[2][4];
    prefetch_scales(0, Even{});
    prefetch_codes(0, Even{}, kFirst, kMid);
    // k tile kt, its codes and scales in set P (kt's parity).
    auto k_tile = [&](int kt, auto P, auto G) {
      constexpr auto N = std::integral_constant<int, 1 - decltype(P)::value>{};  // the next tile's set
      const std::uint64_t desc0 = sm90::kmajor_sw128_desc(sm90::smem_addr(b_tiles + stage_of(kt) * kBTileBytes));
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        std::uint32_t(&cur)[4] = a[k & 1];
        std::uint32_t(&nxt)[4] = a[(k + 1) & 1];
#pragma unroll
        for (int r = 0; r < 4; ++r) sm90::fence_operand(cur[r]);
        sm90::wgmma_fence();
        sm90::wgmma_m64n256k16_rs(acc, cur, desc0 + 2 * k);  // +32 bytes per 16-wide k step
        sm90::wgmma_commit();
        // The next tile's codes, loaded while this step's wgmma runs: loaded after the wait, just
        // before the next issue, the build's first instruction waited for the loads to read their
        // address register, whose name it reused (ncu, NOTES item 46).
        // Step k + 2's parameters, into the slot build(k) has used. Their k tile's stage must have
        // arrived: the first code load of k tile kt + 1 waits for it, in step 1, or in step 2 for
        // kHalves, whose loads therefore come first. Otherwise the parameters come before the
        // codes: loads leave in order, and the parameters are needed a step sooner (ncu: their
        // conversion waited behind the code loads).
        if constexpr (kHalves) {
          if (k == 0) prefetch_codes(kt, P, kMid, kLast);
          if (k == 2 && kt + 1 < KT) prefetch_codes(kt + 1, N, kFirst, kMid);
        }
        if (k < 2) fetch_params(kt, k + 2, G);
        else if (kt + 1 < KT) fetch_params(kt + 1, k - 2, G);
        if constexpr (!kHalves) {
          if (k == 1 && kt + 1 < KT) prefetch_codes(kt + 1, N, kFirst, kLast);
        }
        sm90::wgmma_wait<1>();  // the previous step has retired: its slot (nxt) is free
#pragma unroll
        for (int r = 0; r < 4; ++r) sm90::fence_operand(nxt[r]);
        // Step 0's wait retired the previous tile's last step: its stage goes back to the producer.
        if (k == 0 && kt > 0 && lane == 0) sm90::mbar_arrive(&empty[stage_of(kt - 1)]);
        // The work between two issues stays short: the next tile's scales come in during step 0.
        if (k < 3) build(k + 1, P, nxt, G);
        if (k == 0 && kt + 1 < KT) prefetch_scales(kt + 1, N);
        if (k == 3 && kt + 1 < KT) {
          if constexpr (kChannel && decltype(G)::value) wrow0 += BK, wrow1 += BK;  // build reads k tile kt + 1 from here on
          build(0, N, nxt, G);
        }
      }
    };
    // The k loop. Per-channel, in two forms chosen once per tile and warpgroup: the general one
    // for warpgroups with a warp whose rows straddle two token groups or hold window rows, and one
    // without those branches for all others (a warp-uniform branch in every step's build cost
    // the per-token kernel 2-10 %, NOTES.md items 66-68).
    auto k_loop = [&](auto G) {
      fetch_params(0, 0, G);
      build(0, Even{}, a[0], G);
      fetch_params(0, 1, G);
#pragma unroll 1
      for (int kt = 0; kt < KT; kt += 2) {
        k_tile(kt, Even{}, G);
        // The previous tile's stores have read the staged tile by now: free it for this tile's
        // tables (the producer waits for this before loading them).
        if (kt == free_kt) {
          if (t == 0) {
            sm90::bulk_wait<0, true>();
            sm90::mbar_arrive(out_free);
          }
        }
        if (kt + 1 < KT) k_tile(kt + 1, Odd{}, G);
      }
    };
    if (general) k_loop(std::true_type{});
    else k_loop(std::false_type{});
    if (tile + gridDim.x < tiles.total) next = head_of(tile + gridDim.x);
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; ++i) sm90::fence_operand(acc[i]);
    if (lane == 0) sm90::mbar_arrive(&empty[stage_of(KT - 1)]);
    if constexpr (kScores) {
      score_tile(acc, n0, m0, seq, lr0, count, head.len, c, e, sc);
      continue;
    }

    // Epilogue: accumulator 4j + 2h + q holds (row lr0 + 8h, column n0 + 8j + 2c + q). Bias and
    // RoPE with epilogue2's float operations, arranged for few load latencies and instructions:
    //   - a row's table reads for 16 column pairs are issued together, before their use;
    //   - the pair's index within its head is a running remainder (no division per pair), and
    //     when the head width divides 128, columns j and j + 16 are 128 apart and read the same
    //     table entries: the second half of the row reuses the first half's reads;
    //   - the column checks against N are predicates; columns past N are written to the staged
    //     tile anyway (their W rows were zero-filled) and TMA does not store them.
    // (Measured, ncu: with both rows' reads issued before either is used, register pressure
    // made the epilogue spill and run slower.)
    // The results go to the staged tile: box j / 8 (columns 64·(j/8) on), row lr, 16-byte chunk
    // (j mod 8) xor (lr mod 8), as TMA's 128-byte swizzle lays it out (and free of bank conflicts:
    // the 8 rows of a warp's store hit 8 different chunks). Rows past the range are left out;
    // TMA clips them.
    if (tables) {
      // The tables sit where this row's results go: a row belongs to one quad (four lanes), which
      // reads all of its row's table entries before any lane writes the row. Rows past the range
      // are rotated too (TMA clips them; past the table the entries are zeros).
      sm90::mbar_wait(tab_full, u & 1u);
      const bool has_bias = e.bias != nullptr;
      const int box_mask = e.head_dim / 2 > kTabBoxFloats ? 1 : 0;  // head width 128: pairs 32..63 in box 1
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        unsigned char* const row = out_tile + (h ? lr1 : lr0) * (kOutBoxCols * 2) + 4 * c;
        // Column pair j (columns n0 + 8j + 2c) is pair 4j + c of its head (modulo the head's pairs):
        // box j / 8 (head width 64: box 0), 16-byte chunk j mod 8, swizzled like the results.
        float cs[16], sn[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int at = ((j >> 3) & box_mask) * kOutBoxBytes + (((j & 7) ^ g) << 4);
          cs[j] = *reinterpret_cast<const float*>(row + at);
          sn[j] = *reinterpret_cast<const float*>(row + kSinBox * kOutBoxBytes + at);
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const int col = n0 + 8 * j + 2 * c;
          float x0 = acc[4 * j + 2 * h], x1 = acc[4 * j + 2 * h + 1];
          if (has_bias && col < N) x0 += e.bias[col], x1 += e.bias[col + 1];
          const float a = x0, b = x1;
          x0 = a * cs[j & 15] - b * sn[j & 15];
          x1 = a * sn[j & 15] + b * cs[j & 15];
          *reinterpret_cast<std::uint32_t*>(row + (j / 8) * kOutBoxBytes + (((j % 8) ^ g) << 4)) = pack_bf16x2(x0, x1);
        }
      }
    } else {
      // First, the previous tile's stores must have read the staged tile.
      if (t == 0) sm90::bulk_wait<0, true>();
      sm90::named_barrier(1, 32 * kConsumerWarps);
      constexpr int kHalf = 16;  // column pairs per batch of table reads
      const bool has_bias = e.bias != nullptr;
      const int hd = e.head_dim;
      const bool same_halves = hd != 0 && (8 * kHalf) % hd == 0;
      const int c0 = hd ? (n0 + 2 * c) % hd : 0;  // column of j = 0 within its head
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!(h ? ok1 : ok0)) continue;
        const int lr = h ? lr1 : lr0;
        const index_t pos = begin + m0 + lr;
        unsigned char* const dst = out_tile + lr * (kOutBoxCols * 2) + 4 * c;
        const float* const cos_row = hd ? e.cos + pos * (hd / 2) : nullptr;
        const float* const sin_row = hd ? e.sin + pos * (hd / 2) : nullptr;
        float cs[kHalf], sn[kHalf];
        int within = c0;
#pragma unroll
        for (int j0 = 0; j0 < 32; j0 += kHalf) {
          if (j0 == 0 || !same_halves) {
#pragma unroll
            for (int jj = 0; jj < kHalf; ++jj) {
              const int col = n0 + 8 * (j0 + jj) + 2 * c;
              cs[jj] = 1.0f, sn[jj] = 0.0f;
              if (hd && col < N) cs[jj] = cos_row[within >> 1], sn[jj] = sin_row[within >> 1];
              within += 8;
              within = within >= hd ? within - hd : within;
            }
          }
#pragma unroll
          for (int jj = 0; jj < kHalf; ++jj) {
            const int j = j0 + jj, col = n0 + 8 * j + 2 * c;
            float x0 = acc[4 * j + 2 * h], x1 = acc[4 * j + 2 * h + 1];
            if (has_bias && col < N) x0 += e.bias[col], x1 += e.bias[col + 1];
            if (hd) {
              const float a = x0, b = x1;
              x0 = a * cs[jj] - b * sn[jj];
              x1 = a * sn[jj] + b * cs[jj];
            }
            *reinterpret_cast<std::uint32_t*>(dst + (j / 8) * kOutBoxBytes + (((j % 8) ^ (lr & 7)) << 4)) =
                pack_bf16x2(x0, x1);
          }
        }
      }
    }
    sm90::fence_proxy_async_smem();  // the writes above, visible to the TMA stores
    sm90::named_barrier(1, 32 * kConsumerWarps);
    if (t == 0) {
      for (int b = 0; b < BN / kOutBoxCols && n0 + b * kOutBoxCols < N; ++b)
        sm90::tma_store_3d(&out_map, out_tile + b * kOutBoxBytes, n0 + b * kOutBoxCols, m0, seq);
      sm90::bulk_commit();
    }
  }
  if (t == 0) sm90::bulk_wait<0, false>();  // the last stores done before the block (and its shared memory) ends
#else
  (void)w_map, (void)code_map, (void)param_map, (void)out_map, (void)cos_map, (void)sin_map, (void)tables;
  (void)v, (void)begin, (void)count, (void)N;
  (void)tiles, (void)e, (void)sc;
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
    const index_t min_group = Q::axis == Axis::Channel ? wg::kMinChannelGroup : wg::BK;
    // (TMA takes the code rows at a stride of a multiple of 16 bytes: 3-bit streams need width % 128 == 0.)
    return s.width % wg::BK == 0 && Q::code_bytes(s.width) % 16 == 0 && s.group >= min_group &&
           count < (index_t(1) << 30) && !remat_wgmma_disabled &&
           sm90a_kernels();
  }
}

/// Sets up and launches remat_wgmma_kernel<Q, kScores> (see there; out and ldo unused with kScores).
template <class Q, bool kScores>
void launch_wgmma(const DeviceStream<Q>& x, index_t begin, index_t count, const bf16* w, index_t ldw, index_t N,
                  const EpilogueArgs& e, bf16* out, index_t ldo, const ScoreArgs& sc, cudaStream_t stream) {
  using namespace wg;
  static_assert(kSmemBytes<Q, kScores> <= kSmemLimit, "remat_wgmma: over sm_90's 227 KB of shared memory per block");
  static_assert(kStages<Q, kScores> * kBTileBytes % 1024 == 0, "remat_wgmma: the staged output tile must start 1024-byte aligned");
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
  const cuuint32_t cbox[3] = {static_cast<cuuint32_t>(kCodeTileRow<Q>), BM, 1};
  const CUtensorMap code_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, x.codes().data(), cdims, cstrides,
                                                cbox, CU_TENSOR_MAP_SWIZZLE_NONE);
  CUtensorMap param_map = code_map;  // unused by per-token streams
  if constexpr (Q::axis == Axis::Channel) {  // (token group, channel) parameters, per sequence
    const cuuint64_t row = static_cast<cuuint64_t>(s.width) * Q::params_per_group, groups = s.capacity / s.group;
    const cuuint64_t pdims[3] = {row, groups, static_cast<cuuint64_t>(s.batch)};
    const cuuint64_t pstrides[2] = {row * 2, row * 2 * groups};
    const cuuint32_t pbox[3] = {static_cast<cuuint32_t>(BK * Q::params_per_group), kParamRows<Q>, 1};
    param_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, x.params().data(), pdims, pstrides, pbox,
                                 CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  CUtensorMap out_map = w_map;  // unused by the scores
  if constexpr (!kScores) {
    // The output as (N columns, count rows, batch): a box never reaches past a sequence's rows.
    const cuuint64_t odims[3] = {static_cast<cuuint64_t>(N), static_cast<cuuint64_t>(count),
                                 static_cast<cuuint64_t>(s.batch)};
    const cuuint64_t ostrides[2] = {static_cast<cuuint64_t>(ldo) * 2, static_cast<cuuint64_t>(ldo) * 2 * count};
    const cuuint32_t obox[3] = {kOutBoxCols, BM, 1};
    out_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, out, odims, ostrides, obox, CU_TENSOR_MAP_SWIZZLE_128B);
  }
  // The RoPE tables by TMA (head width 64 or 128; rows past the table's end arrive as zeros).
  const bool tables = !kScores && (e.head_dim == 64 || e.head_dim == 128) && e.positions > 0;
  CUtensorMap cos_map = w_map, sin_map = w_map;  // unused without tables
  if (tables) {
    const cuuint64_t tdims[2] = {static_cast<cuuint64_t>(e.head_dim / 2), static_cast<cuuint64_t>(e.positions)};
    const cuuint64_t tstrides[1] = {static_cast<cuuint64_t>(e.head_dim / 2) * 4};
    const cuuint32_t tbox[2] = {kTabBoxFloats, BM};
    cos_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, e.cos, tdims, tstrides, tbox, CU_TENSOR_MAP_SWIZZLE_128B);
    sin_map = sm90::tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, e.sin, tdims, tstrides, tbox, CU_TENSOR_MAP_SWIZZLE_128B);
  }
  auto kernel = remat_wgmma_kernel<Q, kScores>;
  static SmemAllowance allowance;
  allowance.ensure(kernel, kSmemBytes<Q, kScores>);
  const long long n_tiles = blocks_for(N, BN), m_tiles = blocks_for(count, BM);
  const RematTiles tiles{n_tiles, m_tiles, n_tiles * m_tiles * s.batch};
  int cap = remat_wgmma_max_blocks;
  if (cap <= 0) cap = multiprocessor_count();  // persistent: one block per SM, each working through its tiles
  const unsigned blocks = static_cast<unsigned>(tiles.total < cap ? tiles.total : cap);
  kernel<<<blocks, THREADS, kSmemBytes<Q, kScores>, stream>>>(w_map, code_map, param_map, out_map, cos_map, sin_map,
                                                             tables, x.view(),
                                                             static_cast<int>(begin), static_cast<int>(count),
                                                             static_cast<int>(N), tiles, e, sc);
  check_launch("remat_wgmma_kernel");
}

/// out rows seq·count + i = RoPE(X̂[seq, begin + i]·Wᵀ + bias), i < count, for every sequence.
template <class Q>
void launch_remat_wgmma(const DeviceStream<Q>& x, index_t begin, index_t count, const bf16* w, index_t ldw, index_t N,
                        const EpilogueArgs& e, bf16* out, index_t ldo, cudaStream_t stream) {
  launch_wgmma<Q, false>(x, begin, count, w, ldw, N, e, out, ldo, ScoreArgs{}, stream);
}

/// The decode scores over tokens [0, Lp) of every sequence (ScoreArgs, score_tile): K = X̂·Wkᵀ
/// rotated at each token's position, never written. e holds the RoPE tables (head width 128).
template <class Q>
void launch_score_wgmma(const DeviceStream<Q>& x, index_t Lp, const bf16* wk, index_t ldw, index_t N,
                        const EpilogueArgs& e, const ScoreArgs& sc, cudaStream_t stream) {
  launch_wgmma<Q, true>(x, 0, Lp, wk, ldw, N, e, nullptr, 0, sc, stream);
}

}  // namespace xquant::cuda::detail
